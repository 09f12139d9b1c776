"""A small SMTP client that uses early pipelining the way Exim does.

It caches each server's EHLO keywords; when the cache shows PIPELINING and an
early-pipelining keyword it sends EHLO, MAIL, RCPT and DATA right after the connect.
Used by ``demo``, the benchmarks and tests. It counts *turns*: how often it had to
stop and wait for the server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio

from .smtp import EARLY_PIPELINING_KEYWORDS, Reply, ReplyReader, ehlo_keywords


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
            ehlo = f"EHLO {self.helo}\r\n".encode()
            envelope = [f"MAIL FROM:<{sender}>\r\n".encode()]
            envelope += [f"RCPT TO:<{r}>\r\n".encode() for r in rcpts]
            envelope.append(b"DATA\r\n")
            if early:
                await conv.send(ehlo + b"".join(envelope))
                conv.expect(await conv.reply(), 220, "banner")
                ehlo_reply = conv.expect(await conv.reply(), 250, "EHLO")
            else:
                conv.expect(await conv.reply(), 220, "banner")
                await conv.send(ehlo)
                ehlo_reply = conv.expect(await conv.reply(), 250, "EHLO")
            keywords = ehlo_keywords(ehlo_reply)
            self.cache[server] = keywords
            replies: list[Reply | None] = []
            if early or "PIPELINING" in keywords:
                if not early:
                    await conv.send(b"".join(envelope))
                replies = [await conv.reply() for _ in envelope]
            else:
                for line in envelope:
                    await conv.send(line)
                    replies.append(await conv.reply())
            conv.expect(replies[0], 250, "MAIL")
            for reply in replies[1:-1]:
                conv.expect(reply, 250, "RCPT")
            conv.expect(replies[-1], 354, "DATA")
            await conv.send(dot_stuff(body))
            final = conv.expect(await conv.reply(), 250, "end of data")
            await conv.send(b"QUIT\r\n")
            await conv.reply()
        return Delivery(early, conv.turns, time.monotonic() - t0, keywords, final)


class _Conversation:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.replies = ReplyReader()
        self.turns = 0

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def reply(self) -> Reply | None:
        reply = self.replies.next_reply()
        if reply is None:
            self.turns += 1  # nothing buffered: we wait for the server
        while reply is None:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.replies.feed(data)
            reply = self.replies.next_reply()
        return reply

    @staticmethod
    def expect(reply: Reply | None, code: int, stage: str) -> Reply:
        if reply is None or reply.code != code:
            raise ClientError(stage, reply)
        return reply
