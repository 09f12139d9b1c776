"""Client behaviours for the attack and load benchmarks (bench/attack.py, bench/mixed.py).

Each is one session against an SMTP server (the proxy), bounded by the caller's deadline,
and returns an ``Outcome`` naming what happened. Good and slow clients send a message with
a unique Message-ID so the benchmark can check that every message the proxy answered 250
reached the sink.
"""

from __future__ import annotations

import socket
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import trio

from proxy.client import EarlyPipeliningClient, dot_stuff
from proxy.smtp import Reply, ReplyReader

__all__ = ["Outcome", "flood", "good", "message", "slow", "slowloris", "smuggle"]

SENDER = "load@example.org"
RCPT = "box@dest.test"


@dataclass
class Outcome:
    kind: str  # good | slow | slowloris | flood | smuggle
    result: str  # delivered | refused | held | closed | error:<what> | ...
    seconds: float = 0.0
    message_id: str = ""
    code: int = 0
    connect_seconds: float | None = None  # set by the load benchmark (raw connects only)


def message(message_id: str, size: int = 1024) -> bytes:
    head = f"Message-ID: <{message_id}>\r\nSubject: load\r\n\r\n".encode()
    return head + (b"x" * 76 + b"\r\n") * max(1, size // 78)


# Seconds the last connect() of each task took (SYN retries show up here when the server's
# listen backlog overflows); read with connect_seconds().
_connects: weakref.WeakKeyDictionary[trio.lowlevel.Task, float] = weakref.WeakKeyDictionary()


def connect_seconds() -> float | None:
    """How long this task's last connect took (and forget it)."""
    return _connects.pop(trio.lowlevel.current_task(), None)


async def _connect(port: int, source: str = "127.0.0.1") -> trio.SocketStream:
    """A loopback connection from ``source`` (another 127/8 address for a distinct client)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t0 = trio.current_time()
    try:
        if source != "127.0.0.1":
            await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    _connects[trio.lowlevel.current_task()] = trio.current_time() - t0
    return trio.SocketStream(sock)


class _Conv:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.replies = ReplyReader()

    async def reply(self) -> Reply | None:
        while (reply := self.replies.next_reply()) is None:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.replies.feed(data)
        return reply


async def good(client: EarlyPipeliningClient, port: int, message_id: str) -> Outcome:
    """One delivery with the project's client (early pipelining once it learned the EHLO)."""
    t0 = trio.current_time()
    try:
        d = await client.send(("127.0.0.1", port), SENDER, [RCPT], message(message_id))
    except Exception as exc:
        return Outcome("good", f"error:{type(exc).__name__}", trio.current_time() - t0)
    return Outcome("good", "delivered", d.seconds, message_id, d.final.code)


async def slow(port: int, message_id: str, pause: float = 1.0) -> Outcome:
    """A legitimate but slow client: waits ``pause`` before every command and between the
    lines of its message; must still be delivered."""
    t0 = trio.current_time()
    code = 0
    try:
        stream = await _connect(port)
        async with stream:
            conv = _Conv(stream)
            steps = [b"EHLO slow.example\r\n", f"MAIL FROM:<{SENDER}>\r\n".encode()]
            steps += [f"RCPT TO:<{RCPT}>\r\n".encode(), b"DATA\r\n"]
            expect = [250, 250, 250, 354]
            if (r := await conv.reply()) is None or r.code != 220:
                return Outcome("slow", "refused", trio.current_time() - t0, code=r.code if r else 0)
            for line, want in zip(steps, expect, strict=True):
                await trio.sleep(pause)
                await stream.send_all(line)
                if (r := await conv.reply()) is None or r.code != want:
                    return Outcome("slow", f"error:{line[:4].decode()}", trio.current_time() - t0)
            body = dot_stuff(message(message_id, 400))
            for part in body.split(b"\r\n")[:-1]:
                await trio.sleep(pause / 4)
                await stream.send_all(part + b"\r\n")
            r = await conv.reply()
            code = r.code if r else 0
            await stream.send_all(b"QUIT\r\n")
            await conv.reply()
    except (OSError, trio.BrokenResourceError) as exc:
        return Outcome("slow", f"error:{type(exc).__name__}", trio.current_time() - t0)
    result = "delivered" if code == 250 else f"error:final-{code}"
    return Outcome("slow", result, trio.current_time() - t0, message_id, code)


async def slowloris(port: int, stop: Callable[[], bool], rate: float = 1.0) -> Outcome:
    """Read the banner, then send one byte per ``1/rate`` seconds of a line that never ends,
    until ``stop()``. ``held``: the proxy kept the connection the whole time."""
    t0 = trio.current_time()
    try:
        stream = await _connect(port)
        async with stream:
            conv = _Conv(stream)
            if (r := await conv.reply()) is None or r.code != 220:
                return Outcome("slowloris", "refused", code=r.code if r else 0)
            await stream.send_all(b"E")
            while not stop():
                await trio.sleep(1 / rate)
                await stream.send_all(b"H")
    except (OSError, trio.BrokenResourceError):
        return Outcome("slowloris", "closed", trio.current_time() - t0)
    return Outcome("slowloris", "held", trio.current_time() - t0)


async def flood(port: int, size: int, source: str = "127.0.0.1") -> Outcome:
    """Send ``size`` bytes of junk right after the connect, before any banner, then read
    what comes back. The proxy holds at most max_early_bytes and then stops reading (an
    allowed host) or refuses (421; a host not allowed early pipelining)."""
    t0 = trio.current_time()
    junk = (b"J" * 1000 + b"\r\n") * 64
    state = ["connect"]
    with trio.move_on_after(30):
        return Outcome(
            "flood", await _flood(port, size, source, junk, state), trio.current_time() - t0
        )
    # Not done after 30 s: say in which step (connect: the listen backlog was full).
    return Outcome("flood", f"stuck-30s-{state[0]}", trio.current_time() - t0)


async def _flood(port: int, size: int, source: str, junk: bytes, state: list[str]) -> str:
    code = 0
    try:
        stream = await _connect(port, source)
        state[0] = "send"
        async with stream:

            async def reader() -> None:
                nonlocal code
                conv = _Conv(stream)
                if (r := await conv.reply()) is not None:
                    code = r.code
                while await stream.receive_some(65536):
                    pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                sent = 0
                with trio.move_on_after(5):  # backpressure: the proxy stopped reading
                    while sent < size:
                        await stream.send_all(junk)
                        sent += len(junk)
                await stream.send_eof()
                state[0] = "await-close"
    except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the proxy closed on us (also inside the nursery's exception group)
    return f"code-{code}" if code else "closed"


async def smuggle(port: int, message_id: str) -> Outcome:
    """A message with a bare-LF end of data (``\\n.\\n``) and a hidden second message: the
    proxy must refuse it (5xx) and neither message may reach the sink."""
    t0 = trio.current_time()
    try:
        stream = await _connect(port)
        async with stream:
            conv = _Conv(stream)
            if (r := await conv.reply()) is None or r.code != 220:
                return Outcome("smuggle", "refused", code=r.code if r else 0)
            await stream.send_all(b"EHLO smuggle.example\r\n")
            await conv.reply()
            await stream.send_all(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode())
            for _ in range(3):
                await conv.reply()
            hidden = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode()
            await stream.send_all(
                f"Message-ID: <{message_id}>\r\n\r\nhi\n.\n".encode()
                + hidden
                + f"Message-ID: <{message_id}.hidden>\r\n\r\nsmuggled\r\n.\r\n".encode()
            )
            r = await conv.reply()
            code = r.code if r else 0
    except (OSError, trio.BrokenResourceError):
        return Outcome("smuggle", "closed", trio.current_time() - t0, message_id)
    result = "refused" if 500 <= code < 600 else f"accepted-{code}" if code else "closed"
    return Outcome("smuggle", result, trio.current_time() - t0, message_id, code)
