"""Listeners, connection limits and signals."""

from __future__ import annotations

import functools
import logging
import signal
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from .config import Address, Config, ConfigError, load_config
from .httpd import Health, serve_http
from .metrics import Metrics
from .session import Session, _client_ip
from .smtp import Reply
from .tls import TLSConfigError, server_context
from .upstream import Endpoint

log = logging.getLogger("pipeconnect.server")

TOO_MANY = Reply.make(421, "4.7.0 Too many connections, try again later")
TOO_MANY_FROM_YOU = Reply.make(421, "4.7.0 Too many connections from your address, try again later")


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


async def _reject(stream: trio.SocketStream, reply: Reply) -> None:
    with trio.move_on_after(5):
        try:
            await stream.send_all(reply.to_bytes())
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await trio.aclose_forcefully(stream)


def _endpoint(sockaddr: tuple[str, int] | tuple[str, int, int, int]) -> Endpoint:
    return (sockaddr[0], sockaddr[1])


class Bound(list[Endpoint]):
    """What ``serve`` reports once it listens: the SMTP endpoints (a list, as before),
    plus ``metrics``, the metrics/health endpoint (``None`` when disabled or unbindable),
    and ``health``, the readiness state behind ``/healthz``."""

    def __init__(self, smtp: list[Endpoint], health: Health) -> None:
        super().__init__(smtp)
        self.health = health
        self.metrics: Endpoint | None = None
        self.tls_on_connect: list[Endpoint] = []  # not in the list: plain listeners only


class Snapshot:
    """The settings new sessions start with. A reload builds a new one completely (TLS
    context included: pyOpenSSL 26.2+ refuses changes to a context in use) and swaps the
    reference; a session keeps the snapshot it started with."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.tls_context = (
            server_context(config.tls.certificate, config.tls.key)
            if config.tls.certificate
            else None
        )


class Runtime:
    def __init__(self, config: Config) -> None:
        self.current = Snapshot(config)

    async def reload(self, path: str, metrics: Metrics) -> bool:
        """Load ``path`` off the event loop; keep the old settings if it is bad."""
        try:
            new = await trio.to_thread.run_sync(lambda: Snapshot(load_config(path)))
        except (ConfigError, TLSConfigError) as exc:
            log.error("reload of %s refused, previous configuration kept: %s", path, exc)
            metrics.record_reload(False)
            return False
        old = self.current.config
        if new.config.listen != old.listen or new.config.metrics != old.metrics:
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
    """Run the listeners until cancelled. ``task_status`` receives the bound addresses
    (a ``Bound``: the SMTP endpoints, and the metrics endpoint as ``.metrics``).
    ``runtime`` lets a caller swap the settings for new sessions (SIGHUP)."""
    rt = runtime if runtime is not None else Runtime(config)
    config = rt.current.config
    limits = Limits(config.limits.max_sessions, config.limits.max_sessions_per_client)

    async def open_listeners(addresses: tuple[Address, ...]) -> list[trio.SocketListener]:
        out: list[trio.SocketListener] = []
        for address in addresses:
            out += await trio.open_tcp_listeners(address.port, host=address.host)
        return out

    plain = await open_listeners(config.listen.plain)
    implicit = await open_listeners(config.listen.tls_on_connect)
    bound = [_endpoint(lst.socket.getsockname()) for lst in plain]
    if config.upstream.client_identity == "none":
        log.warning(
            "upstream.client_identity = none: the MTA sees every client as this proxy's "
            "address; its access policy, rate limits and logs lose the real client"
        )

    async def handle(stream: trio.SocketStream, listener: str) -> None:
        try:
            client = _endpoint(stream.socket.getpeername())
            local = _endpoint(stream.socket.getsockname())
        except OSError:  # reset before we looked
            await trio.aclose_forcefully(stream)
            return
        snapshot = rt.current
        limits.total = snapshot.config.limits.max_sessions
        limits.per_client = snapshot.config.limits.max_sessions_per_client
        with limits.admit(str(_client_ip(client[0]))) as refusal:
            if refusal is not None:
                metrics.sessions.labels(listener, "too-many").inc()
                await _reject(stream, refusal)
                return
            session = Session(
                stream,
                client=client,
                local=local,
                listener=listener,
                config=snapshot.config,
                metrics=metrics,
                tls_context=snapshot.tls_context,
                implicit_tls=listener == "tls_on_connect",
            )
            await session.run()

    health = Health(metrics, config.upstream.address)
    result = Bound(bound, health)
    result.tls_on_connect = [_endpoint(lst.socket.getsockname()) for lst in implicit]
    async with trio.open_nursery() as nursery:
        for name, listeners in (("plain", plain), ("tls_on_connect", implicit)):
            if listeners:
                metrics.active.labels(name)  # exported as 0 from the start
                handler = functools.partial(handle, listener=name)
                await nursery.start(trio.serve_listeners, handler, listeners)
        if config.metrics.listen is not None:
            result.metrics = await nursery.start(serve_http, config.metrics.listen, metrics, health)
        health.listening = True
        log.info(
            "listening on %s, upstream %s (%s)",
            ", ".join(f"{h}:{p}" for h, p in bound + result.tls_on_connect),
            config.upstream.address,
            config.upstream.client_identity,
        )
        task_status.started(result)


async def run_until_signal(config: Config, metrics: Metrics, path: str | None = None) -> None:
    """``serve`` in the foreground until SIGTERM or SIGINT; SIGHUP reloads ``path``."""
    runtime = Runtime(config)
    metrics.record_reload(True)  # the initial load
    wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    with trio.open_signal_receiver(*wanted) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve, config, metrics, runtime=runtime))
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if path is not None:
                        await runtime.reload(path, metrics)
                    continue
                log.info("%s: stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
