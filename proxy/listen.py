"""Listening sockets and the accept loop, shared by the SMTP listeners (``server``, and
``workers``, which binds them before forking) and the metrics endpoint (``httpd``).

- ``bind``, ``open_listeners``: like ``trio.open_tcp_listeners``, but ``[::]`` is
  dual-stack (IPV6_V6ONLY off: IPv4 clients reach it too, as Linux users expect) unless
  the configuration also lists ``0.0.0.0`` on that port, which then takes IPv4 itself.
  IPv4 clients of a dual-stack socket appear as ``::ffff:a.b.c.d``; ``server`` maps them.
- ``refuse``: the one reply to a connection turned away at accept, then the close.
- ``serve_listeners``: like ``trio.serve_listeners``, but an accept() that fails for lack
  of resources (EMFILE: out of file descriptors, ...) is counted and logged at most once
  per ``ACCEPT_LOG_PERIOD``, not with a traceback on every retry (ten a second).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import NoReturn

import trio
from prometheus_client import Counter

from .config import Address
from .smtp import Reply

log = logging.getLogger("pipeconnect.listen")

BACKLOG = 0xFFFF  # the kernel caps it at net.core.somaxconn (trio's default too)
ACCEPT_RETRY = 0.1  # seconds between accept() attempts while resources lack (as trio)
ACCEPT_LOG_PERIOD = 60.0  # at most one log line per listener kind in this many seconds
# accept() failures that mean "out of resources for now": wait and retry.
_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


def _unspecified(host: str, version: int) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.version == version and ip.is_unspecified


def dual_stack(address: Address, listed: Iterable[Address]) -> bool:
    """Whether ``address`` is ``[::]`` that also takes IPv4: not when ``listed`` (the
    whole configuration's listeners) has ``0.0.0.0`` on the same port, as both could not
    bind then."""
    return _unspecified(address.host, 6) and not any(
        a.port == address.port and _unspecified(a.host, 4) for a in listed
    )


def bind(
    address: Address, listed: Iterable[Address], *, copies: int = 1, backlog: int = BACKLOG
) -> list[list[socket.socket]]:
    """Listening sockets for every local address ``address`` resolves to, one list per
    copy; ``copies > 1`` shares each port among them (SO_REUSEPORT, for worker
    processes; port 0 resolves to one port for all). Families the system lacks are
    skipped unless none is left, as trio does."""
    v6only = 0 if dual_stack(address, listed) else 1
    infos = socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    out: list[list[socket.socket]] = [[] for _ in range(copies)]
    unsupported: OSError | None = None
    try:
        for family, type_, proto, _, sockaddr in infos:
            port = sockaddr[1]
            for socks in out:
                try:
                    sock = socket.socket(family, type_, proto)
                except OSError as exc:
                    if exc.errno != errno.EAFNOSUPPORT:
                        raise
                    unsupported = exc
                    break
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if copies > 1:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
                try:
                    sock.bind((sockaddr[0], port, *sockaddr[2:]))
                except OSError as exc:
                    raise OSError(exc.errno, f"{exc.strerror} (binding {address})") from None
                sock.listen(backlog)
                port = sock.getsockname()[1]  # port 0: the other copies take the same one
        if unsupported is not None and not any(out):
            raise unsupported
    except BaseException:
        for socks in out:
            for sock in socks:
                sock.close()
        raise
    return out


async def open_listeners(
    address: Address, listed: Iterable[Address] = ()
) -> list[trio.SocketListener]:
    """``bind`` as trio listeners, in a thread (a host name may need DNS)."""
    (socks,) = await trio.to_thread.run_sync(bind, address, listed)
    return [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in socks]


async def refuse(stream: trio.SocketStream, reply: Reply) -> None:
    """``reply`` to a connection not taken (session limits, outbound mode's refusals),
    bounded, then the close."""
    with trio.move_on_after(5):
        try:
            await stream.send_all(reply.to_bytes())
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await trio.aclose_forcefully(stream)


class AcceptErrors:
    """accept() failures of one kind of listener for lack of resources: each is counted in
    ``counter`` (labels: listener, errno); one log line per ``period`` says how many
    happened since the previous line."""

    def __init__(
        self, counter: Counter, listener: str, *, period: float = ACCEPT_LOG_PERIOD
    ) -> None:
        self.counter = counter
        self.listener = listener
        self.period = period
        self._unreported = 0
        self._next_report = -math.inf

    def record(self, exc: OSError) -> None:
        code = exc.errno if exc.errno is not None else 0
        name = errno.errorcode.get(code, str(code))
        self.counter.labels(self.listener, name).inc()
        self._unreported += 1
        now = trio.current_time()
        if now < self._next_report:
            return
        self._next_report = now + self.period
        log.error(
            "%s listener: accept() failed %d time(s) since the last report, now with %s (%s); "
            "retrying every %gs, reporting at most every %gs",
            self.listener,
            self._unreported,
            name,
            os.strerror(code),
            ACCEPT_RETRY,
            self.period,
        )
        self._unreported = 0


Handler = Callable[[trio.SocketStream], Awaitable[object]]


async def _run_handler(handler: Handler, stream: trio.SocketStream) -> None:
    try:
        await handler(stream)
    finally:
        if stream.socket.fileno() >= 0:  # the handler usually closed it itself
            await trio.aclose_forcefully(stream)


async def _accept_loop(
    listener: trio.SocketListener, handler: Handler, nursery: trio.Nursery, errors: AcceptErrors
) -> NoReturn:
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _CAPACITY_ERRNOS:
                    raise
                errors.record(exc)
                await trio.sleep(ACCEPT_RETRY)
                continue
            nursery.start_soon(_run_handler, handler, stream)


async def serve_listeners(
    handler: Handler,
    listeners: list[trio.SocketListener],
    errors: AcceptErrors,
    *,
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``trio.serve_listeners`` with resource errors going to ``errors``: run ``handler``
    for every connection (in ``handler_nursery`` if given) and close the stream after it,
    until cancelled."""
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, handler, handler_nursery or nursery, errors)
        task_status.started()
