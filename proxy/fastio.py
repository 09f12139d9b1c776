"""Non-blocking fast paths for plain TCP streams.

trio makes every ``send_all``/``receive_some`` a full trip through its scheduler (a
cancel-shielded checkpoint, conflict detectors, a few context managers), about 25 us of
Python each on the benchmark machine, and the session wraps each wait in a cancel scope
for its timeout. An SMTP relay does a dozen such operations per session and most of them
would not block: the send fits in the socket buffer, the reply is already there.
``try_send``/``try_receive`` make the system call directly and report what they did; the
caller falls back to the trio call (with its timeout) only when the call would block.

Fairness: a session whose peers never make it block would never yield to the others, nor
see a cancellation. So at most ``BUDGET`` fast operations run in a row (process-wide);
then the fast path declines once and the trio call checkpoints.

Only exact ``trio.SocketStream`` objects qualify (TLS streams and test doubles take the
ordinary path); errors are not handled here: the ordinary call repeats the operation and
raises trio's exception for it.
"""

from __future__ import annotations

import os

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


def try_receive(stream: trio.abc.Stream, max_bytes: int) -> bytes | None:
    """Bytes already readable (``b""`` at EOF), or ``None``: use ``receive_some``."""
    if type(stream) is not trio.SocketStream or not _spend():
        return None
    try:
        return stream.socket._sock.recv(max_bytes)  # type: ignore[attr-defined,no-any-return]
    except OSError:  # would block, or an error the ordinary call will raise properly
        return None


def try_send(stream: trio.abc.Stream, data: bytes) -> int:
    """How many leading bytes of ``data`` went out without blocking; ``send_all`` the rest."""
    if type(stream) is not trio.SocketStream or not data or not _spend():
        return 0
    try:
        return int(stream.socket._sock.send(data))  # type: ignore[attr-defined]
    except OSError:
        return 0
