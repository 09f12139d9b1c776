"""A small SMTP client that uses early pipelining the way Exim does.

It caches each server's EHLO keywords; when the cache shows PIPELINING and an
early-pipelining keyword it sends EHLO, MAIL, RCPT and DATA right after the connect.
Used by ``demo``, the benchmarks and tests. It counts *turns*: how often it had to
stop and wait for the server. What was sent and which reply answers it are the sans-I/O
MTA conversation's (``MtaConversation``); this module only writes and reads the socket.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio

from .machine.mta import MtaConversation
from .replies import receive_reply
from .smtp import EARLY_PIPELINING_KEYWORDS, Reply


class ClientError(Exception):
    def __init__(self, stage: str, reply: Reply | None) -> None:
        detail = f"{reply.code} {reply.text}" if reply else "connection closed"
        super().__init__(f"{stage}: {detail}")
        self.stage = stage
        self.reply = reply


@dataclass
class Delivery:
    early: bool
    turns: int
    seconds: float
    keywords: dict[str, str]
    final: Reply


def dot_stuff(body: bytes) -> bytes:
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    lines = body.split(b"\r\n")
    return b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines) + b".\r\n"


@dataclass
class EarlyPipeliningClient:
    helo: str = "client.demo"
    cache: dict[tuple[str, int], dict[str, str]] = field(default_factory=dict)

    def can_pipe_connect(self, server: tuple[str, int]) -> bool:
        kw = self.cache.get(server, {})
        return "PIPELINING" in kw and any(k in kw for k in EARLY_PIPELINING_KEYWORDS)

    async def send(
        self, server: tuple[str, int], sender: str, rcpts: list[str], body: bytes
    ) -> Delivery:
        early = self.can_pipe_connect(server)
        t0 = time.monotonic()
        stream = await trio.open_tcp_stream(*server)
        async with stream:
            conv = _Conversation(stream)
            ehlo = ("EHLO", f"EHLO {self.helo}\r\n".encode())
            envelope = [("MAIL", f"MAIL FROM:<{sender}>\r\n".encode())]
            envelope += [("RCPT", f"RCPT TO:<{r}>\r\n".encode()) for r in rcpts]
            envelope.append(("DATA", b"DATA\r\n"))
            if early:
                await conv.send(ehlo, *envelope)
                conv.expect(await conv.reply(), 220, "banner")
                conv.expect(await conv.reply(), 250, "EHLO")
            else:
                conv.expect(await conv.reply(), 220, "banner")
                await conv.send(ehlo)
                conv.expect(await conv.reply(), 250, "EHLO")
            keywords = conv.mta.capabilities  # from the 250 to EHLO
            self.cache[server] = keywords
            replies: list[Reply | None] = []
            if early or conv.mta.pipelining:
                if not early:
                    await conv.send(*envelope)
                replies = [await conv.reply() for _ in envelope]
            else:
                for line in envelope:
                    await conv.send(line)
                    replies.append(await conv.reply())
            conv.expect(replies[0], 250, "MAIL")
            for reply in replies[1:-1]:
                conv.expect(reply, 250, "RCPT")
            conv.expect(replies[-1], 354, "DATA")
            await conv.send_data(dot_stuff(body))
            final = conv.expect(await conv.reply(), 250, "end of data")
            await conv.send(("QUIT", b"QUIT\r\n"))
            await conv.reply()
        return Delivery(early, conv.turns, time.monotonic() - t0, keywords, final)


class _Conversation:
    """The socket side of an ``MtaConversation``: it writes what the conversation records,
    reads until it has the next reply, and counts the turns."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.mta: MtaConversation[str] = MtaConversation()
        self.mta.expect("banner", banner=True)
        self.turns = 0

    async def send(self, *commands: tuple[str, bytes]) -> None:
        """Command lines, each under its stage's name, in one write."""
        await self.stream.send_all(b"".join(self.mta.send(tag, line) for tag, line in commands))

    async def send_data(self, data: bytes) -> None:
        """Message data up to and including the end-of-data line; its verdict comes next."""
        self.mta.expect("end of data")
        await self.stream.send_all(data)

    async def reply(self) -> Reply | None:
        """The next reply (None: the server closed the connection)."""
        got = self.mta.next_reply()
        if got is None:
            self.turns += 1  # nothing buffered: we wait for the server
            got = await receive_reply(self.stream, self.mta)
        return None if got is None else got[1]

    @staticmethod
    def expect(reply: Reply | None, code: int, stage: str) -> Reply:
        if reply is None or reply.code != code:
            raise ClientError(stage, reply)
        return reply
