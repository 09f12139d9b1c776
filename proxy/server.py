"""Listeners, connection limits and signals."""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import socket
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from . import notify
from .addresses import Endpoint, endpoint
from .config import Address, Config, ConfigError, load_config
from .httpd import Health, serve_http
from .listen import AcceptErrors, open_listeners, refuse, serve_listeners
from .metrics import Metrics
from .outbound import Cache, OutboundSession, handle_outbound
from .outcomes import Outcome
from .session import Session
from .smtp import Reply
from .tls import TLSConfigError, client_context, server_context

log = logging.getLogger("pipeconnect.server")

TOO_MANY = Reply.make(421, "4.7.0 Too many connections, try again later")
TOO_MANY_FROM_YOU = Reply.make(421, "4.7.0 Too many connections from your address, try again later")

# Listening sockets handed down by ``proxy.workers`` to a worker process (bound by the parent
# with ``listen.bind``, SO_REUSEPORT, one set per worker), used instead of binding again.
INHERITED: dict[Address, list[socket.socket]] = {}


class Limits:
    """Global and per-client-address session counts."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.active = 0
        self.by_client: Counter[str] = Counter()

    @contextmanager
    def admit(self, client: str) -> Iterator[Reply | None]:
        if self.active >= self.total:
            yield TOO_MANY
            return
        if self.by_client[client] >= self.per_client:
            yield TOO_MANY_FROM_YOU
            return
        self.active += 1
        self.by_client[client] += 1
        try:
            yield None
        finally:
            self.active -= 1
            self.by_client[client] -= 1
            if not self.by_client[client]:
                del self.by_client[client]


_TFO_SYSCTL = Path("/proc/sys/net/ipv4/tcp_fastopen")
_tfo_warned: set[str] = set()  # one warning per kind and process, not per listener


def _tfo_warn(kind: str, message: str, *args: object) -> None:
    if kind not in _tfo_warned:
        _tfo_warned.add(kind)
        log.warning(message, *args)


def enable_fast_open(listeners: list[trio.SocketListener], queue: int) -> bool:
    """Let clients put their first bytes in the SYN (TCP Fast Open); they then reach the
    session as early input. Linux accepts the option after listen(). A kernel that refuses
    it only loses the saving: warn once and go on. Returns whether the option was set."""
    option = getattr(socket, "TCP_FASTOPEN", None)
    if option is None:
        _tfo_warn("platform", "TCP Fast Open is not available on this platform")
        return False
    for listener in listeners:
        try:
            listener.socket.setsockopt(socket.IPPROTO_TCP, option, queue)
        except OSError as exc:
            _tfo_warn("refused", "TCP Fast Open refused by the kernel (%s); going on without", exc)
            return False
    with contextlib.suppress(OSError, ValueError):
        # Bit 2 enables the server side; 0x400 enables it for every listener anyway.
        mode = int(_TFO_SYSCTL.read_text())
        if listeners and not mode & 0x402:
            _tfo_warn(
                "sysctl",
                "net.ipv4.tcp_fastopen = %d has no server bit: SYN data is ignored until it "
                "is 3 (set per network namespace: the container or pod sets it)",
                mode,
            )
    return True


def check_socket_mark(mark: int) -> None:
    """``outbound.socket_mark`` needs CAP_NET_ADMIN: without it every connection to an MX
    would fail and all outbound mail be deferred. Better not to start, and say why."""
    with socket.socket() as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_MARK", 36), mark)
        except OSError as exc:
            log.error(
                "outbound.socket_mark = %#x cannot be set (%s): it needs CAP_NET_ADMIN; "
                "give the proxy that capability or use a uid rule (socket_mark = 0)",
                mark,
                exc,
            )
            raise SystemExit(2) from exc


class Bound(list[Endpoint]):
    """What ``serve`` reports once it listens: the SMTP endpoints (a list, as before),
    plus ``metrics``, the metrics/health endpoint (``None`` when disabled or unbindable),
    and ``health``, the readiness state behind ``/healthz``."""

    def __init__(self, smtp: list[Endpoint], health: Health) -> None:
        super().__init__(smtp)
        self.health = health
        self.metrics: Endpoint | None = None
        self.tls_on_connect: list[Endpoint] = []  # not in the list: plain listeners only
        self.outbound: list[Endpoint] = []  # outbound mode's listeners


class Snapshot:
    """The settings new sessions start with. A reload builds a new one completely (TLS
    context included: pyOpenSSL 26.2+ refuses changes to a context in use) and swaps the
    reference; a session keeps the snapshot it started with."""

    def __init__(self, config: Config) -> None:
        self.config = config
        tls = config.tls
        self.tls_context = (
            server_context(
                tls.certificate,
                tls.key,
                min_version=tls.min_version,
                ciphers=tls.ciphers,
                session_tickets=tls.session_tickets,
            )
            if tls.certificate
            else None
        )
        up = config.upstream
        self.upstream_tls_context = (
            client_context(up.tls_ca or None, verify=up.tls_verify)
            if up.tls == "starttls"
            else None
        )


class Runtime:
    def __init__(self, config: Config) -> None:
        self.current = Snapshot(config)
        self.stopping = trio.Event()  # set: stop accepting and drain (``serve`` returns)

    async def reload(self, path: str, metrics: Metrics) -> bool:
        """Load ``path`` off the event loop; keep the old settings if it is bad."""
        try:
            new = await trio.to_thread.run_sync(lambda: Snapshot(load_config(path)))
        except (ConfigError, TLSConfigError) as exc:
            log.error("reload of %s refused, previous configuration kept: %s", path, exc)
            metrics.record_reload(False)
            return False
        old = self.current.config
        if (
            new.config.listen != old.listen
            or new.config.metrics != old.metrics
            or (new.config.outbound.enabled, new.config.outbound.listen)
            != (old.outbound.enabled, old.outbound.listen)
        ):
            log.warning("reload: listener and metrics addresses change only on a restart")
        self.current = new
        metrics.record_reload(True)
        log.info("reloaded %s; new sessions use it", path)
        return True


async def serve(
    config: Config,
    metrics: Metrics,
    *,
    runtime: Runtime | None = None,
    task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the listeners until cancelled, or until ``runtime.stopping`` is set: then stop
    accepting, give open sessions ``server.shutdown_grace`` seconds, end the rest with 421
    and return. ``task_status`` receives the bound addresses (a ``Bound``: the SMTP
    endpoints, and the metrics endpoint as ``.metrics``). ``runtime`` lets a caller swap the
    settings for new sessions (SIGHUP)."""
    rt = runtime if runtime is not None else Runtime(config)
    config = rt.current.config
    limits = Limits(config.limits.max_sessions, config.limits.max_sessions_per_client)

    listed = config.listen.plain + config.listen.tls_on_connect

    async def listeners_for(
        addresses: tuple[Address, ...], *, fast_open: bool = config.listen.tcp_fastopen
    ) -> list[trio.SocketListener]:
        out: list[trio.SocketListener] = []
        for address in addresses:
            if address in INHERITED:
                socks = INHERITED.pop(address)
                out += [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in socks]
                continue
            out += await open_listeners(address, listed)
        if fast_open:
            enable_fast_open(out, config.listen.tcp_fastopen_queue)
        return out

    plain = await listeners_for(config.listen.plain)
    implicit = await listeners_for(config.listen.tls_on_connect)
    if config.outbound.enabled and config.outbound.socket_mark:
        check_socket_mark(config.outbound.socket_mark)
    outbound_listeners: list[trio.SocketListener] = []
    if config.outbound.enabled:  # the MTA on the same host sends no SYN data
        outbound_listeners = await listeners_for(config.outbound.listen, fast_open=False)
    caches: dict[tuple[str, float], Cache] = {}  # a reload may name another file or TTL
    outbound_sessions: set[OutboundSession] = set()
    own_ends: set[Endpoint] = set()
    bound = [endpoint(lst.socket.getsockname()) for lst in plain]
    if config.upstream.client_identity == "none":
        log.warning(
            "upstream.client_identity = none: the MTA sees every client as this proxy's "
            "address; its access policy, rate limits and logs lose the real client"
        )
    if config.limits.max_text_line is not None:
        log.warning(
            "limits.max_text_line is no longer used: the MTA judges message line length "
            "(the proxy streams long lines in pieces); remove it from the file"
        )

    sessions: set[Session] = set()
    drained = trio.Event()  # set when the last session ends while stopping

    async def handle(stream: trio.SocketStream, listener: str) -> None:
        try:
            client = endpoint(stream.socket.getpeername())
            local = endpoint(stream.socket.getsockname())
        except OSError:  # reset before we looked
            await trio.aclose_forcefully(stream)
            return
        snapshot = rt.current
        limits.total = snapshot.config.limits.max_sessions
        limits.per_client = snapshot.config.limits.max_sessions_per_client
        with limits.admit(client[0]) as refusal:
            if refusal is not None:
                metrics.sessions.labels(listener, Outcome.TOO_MANY).inc()
                await refuse(stream, refusal)
                return
            session = Session(
                stream,
                client=client,
                local=local,
                listener=listener,
                config=snapshot.config,
                metrics=metrics,
                tls_context=snapshot.tls_context,
                upstream_tls_context=snapshot.upstream_tls_context,
                implicit_tls=listener == "tls_on_connect",
            )
            sessions.add(session)
            try:
                await session.run()
            except Exception:
                # A bug in one session must not take the listeners and every other
                # session down with it (its log line and close already happened).
                log.exception("session with %s:%d failed", *client)
                metrics.session_errors.inc()
            finally:
                sessions.discard(session)
                if not sessions and not outbound_sessions and rt.stopping.is_set():
                    drained.set()

    async def handle_out(stream: trio.SocketStream) -> None:
        try:
            now = rt.current.config
            key = (now.outbound.cache, now.outbound.cache_ttl)
            if key not in caches:
                caches[key] = Cache(*key, metrics)
            await handle_outbound(
                stream,
                config=now,
                cache=caches[key],
                metrics=metrics,
                own=own_ends,
                sessions=outbound_sessions,
            )
        except Exception:
            log.exception("outbound session failed")
            metrics.session_errors.inc()
        finally:
            if not sessions and not outbound_sessions and rt.stopping.is_set():
                drained.set()

    async def accept(
        name: str,
        listeners: list[trio.SocketListener],
        scope: trio.CancelScope,
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # Sessions live in the outer nursery so that stopping the accept loop leaves them be.
        handler = functools.partial(handle, listener=name)
        errors = AcceptErrors(metrics.accept_errors, name)
        with scope:
            await serve_listeners(
                handler, listeners, errors, handler_nursery=handler_nursery, task_status=task_status
            )

    async def accept_outbound(
        listeners: list[trio.SocketListener],
        scope: trio.CancelScope,
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        errors = AcceptErrors(metrics.accept_errors, "outbound")
        with scope:
            await serve_listeners(
                handle_out,
                listeners,
                errors,
                handler_nursery=handler_nursery,
                task_status=task_status,
            )

    health = Health(metrics, config.upstream.address)
    result = Bound(bound, health)
    result.tls_on_connect = [endpoint(lst.socket.getsockname()) for lst in implicit]
    result.outbound = [endpoint(lst.socket.getsockname()) for lst in outbound_listeners]
    accepting: list[trio.CancelScope] = []
    async with trio.open_nursery() as nursery:
        for name, listeners in (("plain", plain), ("tls_on_connect", implicit)):
            if listeners:
                metrics.expose_listener(name)
                accepting.append(trio.CancelScope())
                await nursery.start(accept, name, listeners, accepting[-1], nursery)
        if outbound_listeners:
            metrics.expose_outbound()
            accepting.append(trio.CancelScope())
            await nursery.start(accept_outbound, outbound_listeners, accepting[-1], nursery)
        if config.metrics.listen is not None:
            result.metrics = await nursery.start(serve_http, config.metrics.listen, metrics, health)
        health.listening = True
        where = ", ".join(f"{h}:{p}" for h, p in bound + result.tls_on_connect)
        if result.outbound:
            where += " (outbound: " + ", ".join(f"{h}:{p}" for h, p in result.outbound) + ")"
        log.info(
            "listening on %s, upstream %s (%s)",
            where,
            config.upstream.address,
            config.upstream.client_identity,
        )
        # systemd (Type=notify): started only once every socket is bound, metrics included
        notify.ready(f"listening on {where}, upstream {config.upstream.address}")
        task_status.started(result)

        await rt.stopping.wait()
        for scope in accepting:
            scope.cancel()
        for lst in plain + implicit + outbound_listeners:
            await lst.aclose()
        health.listening = False  # /healthz says 503: take this instance out of rotation
        grace = rt.current.config.server.shutdown_grace
        log.info("stopped accepting; %d sessions open, waiting up to %gs", len(sessions), grace)
        if sessions or outbound_sessions:
            with trio.move_on_after(grace):
                await drained.wait()
        if sessions or outbound_sessions:
            log.warning(
                "grace over: ending %d sessions with 421", len(sessions) + len(outbound_sessions)
            )
            for session in list(sessions):
                session.shutdown()
            for out in list(outbound_sessions):
                out.shutdown()
            # A session whose message is with the MTA relays the verdict first (else the
            # client retries and the message arrives twice): up to data_term for it, the
            # command timeout to send it, then the usual drain.
            t = rt.current.config.timeouts
            with trio.move_on_after(t.data_term + t.command + t.early_drain + 1):
                await drained.wait()
        nursery.cancel_scope.cancel()


async def run_until_signal(config: Config, metrics: Metrics, path: str | None = None) -> None:
    """``serve`` in the foreground until SIGTERM or SIGINT; SIGHUP reloads ``path``."""
    runtime = Runtime(config)
    metrics.record_reload(True)  # the initial load
    wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    async def watch(signals: AsyncIterator[int], everything: trio.CancelScope) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                if path is not None:
                    draining = runtime.stopping.is_set()  # systemd must not see READY again
                    if not draining:
                        notify.reloading(f"reloading {path}")
                    ok = await runtime.reload(path, metrics)
                    if not draining:
                        notify.ready(f"reloaded {path}" if ok else f"reload of {path} refused")
            elif not runtime.stopping.is_set():
                log.info("%s: stopping", name)
                notify.stopping(f"{name}: draining")
                runtime.stopping.set()
            else:
                log.warning("%s again: stopping now", name)
                everything.cancel()

    with trio.open_signal_receiver(*wanted) as signals:
        # A worker is forked with these blocked (proxy.workers): deliver what came meanwhile.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, signals, nursery.cancel_scope)
            await serve(config, metrics, runtime=runtime)
            nursery.cancel_scope.cancel()
