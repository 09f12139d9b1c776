"""``proxy.replies.receive_reply``: the one async loop that reads a stream into an
``MtaConversation`` (probe, the built-in client and the test client read replies with it)."""

from __future__ import annotations

import pytest
import trio

from proxy.machine.mta import MtaConversation
from proxy.replies import receive_reply
from proxy.smtp import ProtocolError


class Chunks(trio.abc.ReceiveStream):
    """A stream that returns the given chunks one read at a time, then EOF."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.reads = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        self.reads += 1
        return self.chunks.pop(0) if self.chunks else b""

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_replies_in_order_with_their_tags_at_any_split() -> None:
    wire = b"220 hi\r\n250-mx.test\r\n250 PIPELINING\r\n250 ok\r\n354 go\r\n"
    for size in (1, 3, len(wire)):
        stream = Chunks(*(wire[i : i + size] for i in range(0, len(wire), size)))
        conv: MtaConversation[str] = MtaConversation()
        conv.expect("banner", banner=True)
        sent = conv.send("EHLO", b"EHLO me\r\n") + conv.send("MAIL", b"MAIL FROM:<>\r\n")
        assert sent == b"EHLO me\r\nMAIL FROM:<>\r\n"
        conv.send("DATA", b"DATA\r\n")
        seen = []
        chunks: list[bytes] = []
        while conv.pending:
            got = await receive_reply(stream, conv, on_data=chunks.append)
            assert got is not None
            seen.append((got[0], got[1].code))
        assert seen == [("banner", 220), ("EHLO", 250), ("MAIL", 250), ("DATA", 354)]
        assert b"".join(chunks) == wire
        assert conv.banner is not None and conv.banner.text == "hi"
        assert conv.pipelining and conv.buffered == 0


async def test_a_buffered_reply_costs_no_read() -> None:
    stream = Chunks(b"250 a\r\n250 b\r\n")
    conv: MtaConversation[int] = MtaConversation()
    conv.send(1, b"RSET\r\n")
    conv.send(2, b"RSET\r\n")
    assert (await receive_reply(stream, conv)) is not None
    assert stream.reads == 1
    got = await receive_reply(stream, conv)
    assert got is not None and got[0] == 2 and got[1].text == "b"
    assert stream.reads == 1


async def test_eof_before_the_reply_is_none() -> None:
    conv: MtaConversation[None] = MtaConversation()
    conv.expect(None, banner=True)
    assert await receive_reply(Chunks(b"220-partial\r\n"), conv) is None
    assert conv.pending == 1  # the reply never came


async def test_bytes_that_are_no_reply_raise() -> None:
    conv: MtaConversation[None] = MtaConversation()
    conv.expect(None, banner=True)
    with pytest.raises(ProtocolError, match="malformed reply line"):
        await receive_reply(Chunks(b"hello\r\n"), conv)


async def test_nothing_pending_is_refused_rather_than_read_forever() -> None:
    stream = Chunks(b"220 hi\r\n")
    with pytest.raises(ValueError, match="no reply is pending"):
        await receive_reply(stream, MtaConversation[None]())
    assert stream.reads == 0
