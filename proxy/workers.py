"""``server.workers = N``: N processes share each listening port (SO_REUSEPORT).

One trio process saturates one core at a few hundred sessions per second (bench/RESULTS.md,
P2), so on a multi-core host the proxy forks workers:

- **Listeners.** The parent binds every SMTP address once per worker, each socket with
  SO_REUSEPORT, before any worker starts (so a bad address or a port in use fails the start,
  and port 0 resolves to one port for all). Worker *i* keeps socket *i* of every address and
  runs the ordinary single-process server on it (``server.INHERITED``, ``run_until_signal``):
  sessions, reload and drain behave exactly as with one process. Linux hashes each new
  connection to one of the sockets; the parent keeps none open (a socket nobody accepts on
  would still receive its share of connections).
- **Metrics.** Each worker serves its own registry on a loopback port the parent picked; the
  parent serves ``metrics.listen`` and merges the workers' scrapes on every request (counters,
  histograms and most gauges summed; a few gauges by min/max, see ``_MAX``/``_MIN``). Chosen
  over prometheus-client's multiprocess mode because that mode cannot carry what this
  exporter has: the ``process_*``/``python_gc_*`` collectors, gauges evaluated at scrape time
  (``upstream_up``) and per-process ``build_info``; it also needs every gauge declared with a
  ``multiprocess_mode``, a directory of mmap files wiped at start, and it makes every
  ``inc()`` a locked file write. If any worker cannot be scraped the parent answers 503 rather
  than a partial sum, which Prometheus would read as counters going backwards.
- **Signals.** SIGTERM, SIGINT and SIGHUP to the parent are passed to every worker (each
  drains or reloads itself). Workers run in their own process group, so a terminal's Ctrl-C
  reaches them once, through the parent.
- **A worker that dies** on its own stops the whole proxy: the parent sends the others
  SIGTERM (they drain) and exits 1, so the supervisor (systemd ``Restart=``, Kubernetes)
  restarts it cleanly. Running on silently with fewer workers would hide the fault, and the
  merged counters would drop, which rate() misreads as a reset.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterable

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from . import notify
from .addresses import Endpoint
from .config import Address, Config, MetricsConfig
from .httpd import Health, MetricsServer, Request, Response
from .listen import bind, open_listeners
from .metrics import Metrics

log = logging.getLogger("pipeconnect.workers")

BACKLOG = 4096  # per worker socket; a single process asks for more (``listen.BACKLOG``)
SCRAPE_TIMEOUT = 5.0
MAX_SCRAPE = 16 * 1024 * 1024  # a worker's /metrics is a few tens of KiB
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
KILL_AFTER = 10.0  # seconds past server.shutdown_grace before a stuck worker is killed

# Gauges where a sum means nothing: one value per process, or "is everything fine".
_MAX = {
    "pipeconnect_build_info",
    "pipeconnect_upstream_up",  # any worker reached the MTA recently
    "python_info",
    "process_max_fds",
}
_MIN = {
    "pipeconnect_config_last_reload_successful",  # 0 if any worker refused a reload
    "pipeconnect_config_last_reload_success_timestamp_seconds",
    "process_start_time_seconds",
}


# --- listening sockets -------------------------------------------------------------------


def _loopback_port() -> int:
    """A free loopback port for a worker's own metrics endpoint (only the parent uses it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- metrics merging ---------------------------------------------------------------------


def merge_metrics(texts: Iterable[str]) -> list[Metric]:
    """Merge Prometheus text expositions of the same exporter from several processes."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                values[fam.name] = {}
            merged = values[fam.name]
            pick = max if fam.name in _MAX else min if fam.name in _MIN else None
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key not in merged:
                    merged[key] = s.value
                elif pick is None:
                    merged[key] += s.value
                else:
                    merged[key] = pick(merged[key], s.value)
    out = []
    for name, fam in families.items():
        fam.samples = [Sample(n, dict(labels), v) for (n, labels), v in values[name].items()]
        out.append(fam)
    return out


class _Merged:
    """A collector that yields a fixed list of families (one per scrape)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


async def _http_get(port: int, path: str) -> tuple[int, str]:
    """GET from a worker's loopback endpoint: (status, body). One request per connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        await stream.send_all(request.encode())
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
            if len(data) > MAX_SCRAPE:
                raise OSError(f"worker answer over {MAX_SCRAPE} bytes")
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode("utf-8", "replace")


class MergedMetricsServer(MetricsServer):
    """The parent's endpoint: every request is answered from the workers' own endpoints."""

    def __init__(self, ports: list[int], metrics: Metrics, health: Health) -> None:
        super().__init__(metrics, health)
        self.ports = ports

    async def _gather(self, path: str) -> list[tuple[int, str]] | str:
        results: list[tuple[int, str]] = []
        for i, port in enumerate(self.ports):
            try:
                with trio.fail_after(SCRAPE_TIMEOUT):
                    results.append(await _http_get(port, path))
            except (OSError, trio.TooSlowError, ValueError, IndexError) as exc:
                return f"worker {i} ({port}) {path} unavailable: {exc or type(exc).__name__}"
        return results

    async def respond(self, request: Request) -> Response:
        if request.path not in ("/metrics", "/healthz") or request.method not in ("GET", "HEAD"):
            return await super().respond(request)  # 404 / 405 / the index
        got = await self._gather(request.path)
        if isinstance(got, str):
            return Response.text(503, got)
        if request.path == "/healthz":
            healthy = all(status == 200 for status, _ in got)
            text = "; ".join(f"worker {i}: {body.strip()}" for i, (_, body) in enumerate(got))
            return Response.text(200 if healthy else 503, text)
        bad = [i for i, (status, _) in enumerate(got) if status != 200]
        if bad:
            return Response.text(503, f"worker(s) {bad} answered /metrics with an error")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(merge_metrics(body for _, body in got)))
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(200, encoder(registry), content_type)


async def _serve_merged(
    address: Address,
    ports: list[int],
    upstream: Endpoint,
    *,
    task_status: trio.TaskStatus[Endpoint | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        listeners = await open_listeners(address)
    except OSError as exc:
        log.error("metrics endpoint: cannot listen on %s (%s); running without it", address, exc)
        task_status.started(None)
        return
    metrics = Metrics(process=False)
    server = MergedMetricsServer(ports, metrics, Health(metrics, upstream))
    sockname = listeners[0].socket.getsockname()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, listeners)
        log.info("merged metrics of %d workers on http://%s:%d/metrics", len(ports), *sockname)
        task_status.started((sockname[0], sockname[1]))


# --- processes -----------------------------------------------------------------------------


def _worker(
    index: int,
    parent: int,
    config: Config,
    path: str,
    sockets: dict[Address, list[socket.socket]],
) -> int:
    """In the forked child: the ordinary server on this worker's share of the sockets."""
    from . import server

    os.setpgid(0, 0)  # signals come through the parent only
    os.environ.pop("NOTIFY_SOCKET", None)  # the parent alone speaks for the unit to systemd
    # Linux: SIGTERM (a drain) if the parent dies without passing a signal on (SIGKILL, OOM).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        return 1  # the parent died before the line above
    pid_format = logging.Formatter(
        f"%(asctime)s %(levelname)s %(name)s[%(process)d] w{index} %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.setFormatter(pid_format)
    server.INHERITED.clear()
    server.INHERITED.update(sockets)
    trio.run(server.run_until_signal, config, Metrics(), path)
    return 0


def run(config: Config, path: str) -> int:
    """Fork ``config.server.workers`` workers and supervise them until they have all ended.
    Returns the exit status: 0 after a requested stop, 1 if a worker died on its own."""
    count = config.server.workers
    outbound = config.outbound.listen if config.outbound.enabled else ()
    addresses = list(dict.fromkeys(config.listen.plain + config.listen.tls_on_connect + outbound))
    try:
        bound = {
            address: bind(address, addresses, copies=count, backlog=BACKLOG)
            for address in addresses
        }
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        return 1
    metrics_ports: list[int] = []
    pids: dict[int, int] = {}  # pid -> worker index
    parent = os.getpid()
    for i in range(count):
        child_config = config
        if config.metrics.listen is not None:
            metrics_ports.append(_loopback_port())
            child_config = dataclasses.replace(
                config, metrics=MetricsConfig(listen=Address("127.0.0.1", metrics_ports[-1]))
            )
        mine = {address: socks[i] for address, socks in bound.items()}
        sys.stdout.flush()
        sys.stderr.flush()
        # A worker starts with these blocked, until its trio receiver exists
        # (server.run_until_signal): a SIGHUP passed on before (`systemctl reload` right
        # after READY) would kill it, and with it the proxy.
        mask = signal.pthread_sigmask(
            signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        )
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if pid == 0:  # pragma: no cover - the child's coverage is not collected
            status = 1
            try:
                for socks in bound.values():
                    for j, worker_socks in enumerate(socks):
                        if j != i:
                            for sock in worker_socks:
                                sock.close()
                status = _worker(i, parent, child_config, path, mine)
            except BaseException:
                log.exception("worker %d failed", i)
            finally:
                logging.shutdown()
                os._exit(status)
        pids[pid] = i
    for socks in bound.values():
        for worker_socks in socks:
            for sock in worker_socks:
                sock.close()
    log.info(
        "%d workers (pids %s) share %s",
        count,
        ", ".join(map(str, pids)),
        ", ".join(str(a) for a in addresses),
    )
    return trio.run(_supervise, config, pids, metrics_ports)


async def _supervise(config: Config, pids: dict[int, int], metrics_ports: list[int]) -> int:
    failed = False
    stopping = False
    grace = config.server.shutdown_grace + KILL_AFTER
    wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)

    def send(signum: int) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def reap() -> list[tuple[int, int, int]]:
        ended = []
        while pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in pids:
                ended.append((pids.pop(pid), pid, os.waitstatus_to_exitcode(status)))
        return ended

    async def kill_later() -> None:
        await trio.sleep(grace)
        log.error("workers %s still running %gs after SIGTERM: killing", list(pids), grace)
        send(signal.SIGKILL)

    with trio.open_signal_receiver(*wanted) as signals:
        async with trio.open_nursery() as nursery:
            if config.metrics.listen is not None:
                upstream = (config.upstream.address.host, config.upstream.address.port)
                await nursery.start(_serve_merged, config.metrics.listen, metrics_ports, upstream)
            # Every SMTP socket was bound and listening before the fork: connections queue.
            notify.ready(f"{len(pids)} workers")
            # A worker may have died before the receiver existed: look once without a signal.
            pending: list[int] = [signal.SIGCHLD]
            while pids:
                signum = pending.pop() if pending else await signals.__anext__()
                if signum == signal.SIGCHLD:
                    for index, pid, code in reap():
                        if stopping:
                            log.info("worker %d (pid %d) exited with status %d", index, pid, code)
                            continue
                        log.error(
                            "worker %d (pid %d) exited with status %d: stopping the others",
                            index,
                            pid,
                            code,
                        )
                        failed = stopping = True
                        notify.stopping(f"worker {index} exited with status {code}")
                        send(signal.SIGTERM)
                        nursery.start_soon(kill_later)
                    continue
                name = signal.Signals(signum).name
                log.info("%s: passing it to %d workers", name, len(pids))
                if signum == signal.SIGHUP and not stopping:
                    # Each worker reloads (and logs the outcome) on its own; the parent does
                    # not wait for them, so the reload counts as done once passed on.
                    notify.reloading("passing SIGHUP to the workers")
                    send(signum)
                    notify.ready(f"{len(pids)} workers, SIGHUP passed on")
                    continue
                send(signum)
                if signum != signal.SIGHUP and not stopping:
                    notify.stopping(f"{name}: workers draining")
                    stopping = True
                    nursery.start_soon(kill_later)
            nursery.cancel_scope.cancel()
    return 1 if failed else 0


__all__ = ["MergedMetricsServer", "merge_metrics", "run"]
