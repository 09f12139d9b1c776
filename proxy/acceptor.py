"""Accepting connections in batches.

``trio.serve_listeners`` takes one connection per trip through the scheduler: under a
connection storm, with thousands of runnable sessions, a worker accepted one connection
per pass while the kernel's queue grew (bench/RESULTS.md, "Load": connect() p99 0.5 s).
Here each listener waits until its socket is readable, then accepts everything queued (at
most ``BATCH``, then it waits again, which checkpoints) and starts a handler task for each.

Errors are treated as trio treats them: resource exhaustion (EMFILE, ...) is logged and
retried after a pause, a connection that died in the queue is skipped, anything else is a
bug and propagates. With ``PIPECONNECT_FASTIO=0`` trio's own loop is used, for comparison.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import NoReturn

import trio

from . import fastio

BATCH = 64
PAUSE = 0.1  # after EMFILE and the like, as trio.serve_listeners
CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# accept(2): the queued connection failed before we took it; the next one may be fine.
SKIP_ERRNOS = {
    errno.ECONNABORTED,
    errno.EPERM,
    errno.EPROTO,
    errno.ENETDOWN,
    errno.ENOPROTOOPT,
    errno.EHOSTDOWN,
    errno.ENONET,
    errno.EHOSTUNREACH,
    errno.EOPNOTSUPP,
    errno.ENETUNREACH,
}

Handler = Callable[[trio.SocketStream], Awaitable[object]]
log = logging.getLogger("pipeconnect.server")


async def serve_listeners(
    handler: Handler,
    listeners: list[trio.SocketListener],
    *,
    handler_nursery: trio.Nursery,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """``trio.serve_listeners`` for socket listeners, accepting in batches. Closes the
    listeners when cancelled; handlers run in ``handler_nursery``."""
    if not fastio.BUDGET:
        await trio.serve_listeners(
            handler, listeners, handler_nursery=handler_nursery, task_status=task_status
        )
    else:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_serve_one, listener, handler_nursery, handler)
            task_status.started(listeners)
    raise AssertionError("unreachable: the accept loops end only by an exception")


async def _serve_one(
    listener: trio.SocketListener, handler_nursery: trio.Nursery, handler: Handler
) -> None:
    sock: socket.socket = listener.socket._sock  # type: ignore[attr-defined]
    async with listener:
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(BATCH):
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in SKIP_ERRNOS:
                        continue
                    if exc.errno in CAPACITY_ERRNOS:
                        log.error(
                            "accept: %s (%s); retrying in %gs",
                            errno.errorcode[exc.errno],
                            os.strerror(exc.errno),
                            PAUSE,
                        )
                        await trio.sleep(PAUSE)
                        break
                    if exc.errno == errno.EBADF:
                        raise trio.ClosedResourceError("the listener was closed") from None
                    raise
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
                handler_nursery.start_soon(_run_handler, stream, handler)


async def _run_handler(stream: trio.SocketStream, handler: Handler) -> None:
    try:
        await handler(stream)
    finally:
        await trio.aclose_forcefully(stream)
