"""Cheap I/O for plain TCP streams.

trio makes every ``send_all``/``receive_some`` a full trip through its scheduler (a
cancel-shielded checkpoint, conflict detectors, a few context managers), about 25 us of
Python each on the benchmark machine, and the session wraps each wait in a cancel scope
for its timeout. An SMTP relay does a dozen such operations per session and most of them
would not block: the send fits in the socket buffer, the reply is already there.

``try_send``/``try_receive`` make the system call directly and report what they did; the
caller enters its timeout's cancel scope only when the call would block, and then calls
``send_all``/``receive_some`` here, which wait with ``trio.lowlevel.wait_writable`` /
``wait_readable`` on the socket itself (half the cost of the stream methods' machinery:
bench/RESULTS.md). Errors become the stream exceptions trio would raise.

Fairness: a session whose peers never make it block would never yield to the others, nor
see a cancellation. So at most ``BUDGET`` fast operations run in a row (process-wide);
then the fast path declines once and the waiting call checkpoints.

Only exact ``trio.SocketStream`` objects qualify (TLS streams and test doubles take the
stream's own methods). A stream used here must not be used concurrently by two tasks
(the session never does: trio's conflict detectors are what this skips).
"""

from __future__ import annotations

import errno
import os
import socket

import trio

# PIPECONNECT_FASTIO=0 turns the fast paths off (the benchmarks compare both ways).
BUDGET = 0 if os.environ.get("PIPECONNECT_FASTIO") == "0" else 16
_budget = BUDGET


def _spend() -> bool:
    global _budget
    if _budget > 0:
        _budget -= 1
        return True
    _budget = BUDGET
    return False


def _raw(stream: trio.abc.Stream) -> socket.socket | None:
    """The stdlib socket under a plain ``trio.SocketStream`` (when the fast paths are on)."""
    if BUDGET and type(stream) is trio.SocketStream:
        return stream.socket._sock  # type: ignore[attr-defined,no-any-return]
    return None


def _stream_error(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    """What trio's SocketStream raises for a failed system call."""
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


def try_receive(stream: trio.abc.Stream, max_bytes: int) -> bytes | None:
    """Bytes already readable (``b""`` at EOF), or ``None``: use ``receive_some``."""
    sock = _raw(stream)
    if sock is None or not _spend():
        return None
    try:
        return sock.recv(max_bytes)
    except OSError:  # would block, or an error the waiting call will raise properly
        return None


def poll_receive(stream: trio.SocketStream, max_bytes: int) -> bytes | None:
    """Bytes already readable (``b""`` at EOF) or ``None``, whatever the budget and even
    with the fast paths off: one look at what a peer has sent so far, not a loop."""
    sock: socket.socket = stream.socket._sock  # type: ignore[attr-defined]
    try:
        return sock.recv(max_bytes)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise _stream_error(exc) from exc


def try_send(stream: trio.abc.Stream, data: bytes) -> int:
    """How many leading bytes of ``data`` went out without blocking; ``send_all`` the rest."""
    sock = _raw(stream)
    if sock is None or not data or not _spend():
        return 0
    try:
        return sock.send(data)
    except OSError:
        return 0


async def receive_some(stream: trio.abc.Stream, max_bytes: int) -> bytes:
    """``stream.receive_some``, for a caller that found nothing ready: wait, then read."""
    sock = _raw(stream)
    if sock is None:
        return bytes(await stream.receive_some(max_bytes))
    while True:
        if sock.fileno() < 0:
            raise trio.ClosedResourceError("this socket was already closed")
        await trio.lowlevel.wait_readable(sock)
        try:
            return sock.recv(max_bytes)
        except BlockingIOError:
            continue  # a spurious wakeup
        except OSError as exc:
            raise _stream_error(exc) from exc


async def send_all(stream: trio.abc.Stream, data: bytes) -> None:
    """``stream.send_all``, for a caller whose first try did not send everything."""
    sock = _raw(stream)
    if sock is None:
        await stream.send_all(data)
        return
    view = memoryview(data)
    sent = 0
    while True:
        if sock.fileno() < 0:
            raise trio.ClosedResourceError("this socket was already closed")
        await trio.lowlevel.wait_writable(sock)
        try:
            sent += sock.send(view[sent:])
        except BlockingIOError:
            continue
        except OSError as exc:
            raise _stream_error(exc) from exc
        if sent >= len(data):
            return


def input_pending(stream: trio.abc.Stream) -> bool:
    """Whether unread bytes wait in the socket (``True`` when it cannot tell): closing a
    socket with unread input sends an RST, which can destroy a reply the peer has not read."""
    sock = _raw(stream)
    if sock is None:
        return True
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False
    except OSError:
        return True
