"""The demo MTA over loopback, driven by a raw trio socket client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from proxy.demomta import DemoMessage, DemoMTA
from proxy.proxyproto import encode_v1, encode_v2, encode_v2_local

SYNC = (554, ["SMTP synchronization error"])
CLIENT = ("192.0.2.1", 56324)
PROXY_ADDR = ("127.0.0.1", 25)


class Client:
    opened: list[trio.SocketStream] = []  # closed after each test by the autouse fixture

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, port: int, first: bytes = b"") -> Client:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        cls.opened.append(client.stream)
        if first:
            await client.send(first)
        return client

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            data = await self.stream.receive_some(65536)
            assert data, f"EOF while waiting for a reply; have {bytes(self.buf)!r}"
            self.buf += data
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    async def reply(self) -> tuple[int, list[str]]:
        lines = []
        while True:
            line = (await self._line()).decode()
            lines.append(line[4:])
            if line[3:4] == " ":
                return int(line[:3]), lines
            assert line[3:4] == "-", line

    async def code(self) -> int:
        return (await self.reply())[0]

    async def command(self, line: str) -> tuple[int, list[str]]:
        await self.send(line.encode() + b"\r\n")
        return await self.reply()

    async def eof(self) -> bool:
        """True once the server has closed, with nothing more sent."""
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                return not self.buf
            self.buf += data

    async def greet(self, helo: str = "client.test") -> list[str]:
        assert await self.code() == 220
        code, lines = await self.command(f"EHLO {helo}")
        assert code == 250
        return lines


@pytest.fixture(autouse=True)
async def close_clients() -> AsyncIterator[None]:
    yield
    while Client.opened:
        await Client.opened.pop().aclose()


async def start(nursery: trio.Nursery, **options: Any) -> tuple[DemoMTA, int]:
    mta = DemoMTA(**options)
    port: int = await nursery.start(mta.serve)
    return mta, port


async def test_data_transaction(nursery: trio.Nursery) -> None:
    seen: list[DemoMessage] = []
    mta, port = await start(nursery, on_message=seen.append)
    with trio.fail_after(5):
        c = await Client.connect(port, encode_v1(CLIENT, PROXY_ADDR))
        assert await c.reply() == (220, ["demo-mta.test ESMTP demo"])
        code, ehlo = await c.command("EHLO client.test")
        assert code == 250
        assert ehlo == [
            "demo-mta.test",
            "PIPELINING",
            "SIZE 10485760",
            "8BITMIME",
            "CHUNKING",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        ]
        assert await c.command("MAIL FROM:<alice@src.test> SIZE=100 BODY=8BITMIME") == (
            250,
            ["2.1.0 Ok"],
        )
        assert await c.command("RCPT TO:<bob@dest.test>") == (250, ["2.1.5 Ok"])
        assert await c.command("RCPT TO:<carol@dest.test>") == (250, ["2.1.5 Ok"])
        assert await c.command("DATA") == (
            354,
            ["End data with <CR><LF>.<CR><LF>"],
        )
        await c.send(b"Subject: hi\r\n\r\nHello\r\n.\r\n")
        code, text = await c.reply()
        assert code == 250
        assert text[0].startswith("2.0.0 Ok: queued as ")
        assert await c.command("QUIT") == (221, ["2.0.0 demo-mta.test Bye"])
        assert await c.eof()
    expected = DemoMessage(
        "192.0.2.1",
        "client.test",
        "alice@src.test",
        ["bob@dest.test", "carol@dest.test"],
        b"Subject: hi\r\n\r\nHello\r\n",
        "DATA",
    )
    assert mta.messages == [expected]
    assert seen == [expected]


async def test_pipelined_group_and_dot_unstuffing(nursery: trio.Nursery) -> None:
    mta, port = await start(nursery)
    with trio.fail_after(5):
        c = await Client.connect(port, encode_v2(CLIENT, PROXY_ADDR))
        await c.greet()
        await c.send(b"MAIL FROM:<>\r\nRCPT TO:<bob@dest.test>\r\nDATA\r\n")
        assert [await c.code() for _ in range(3)] == [250, 250, 354]
        body = b"..leading dot\r\n..\r\n...\r\nnot.\r\n. x\r\n"
        # the end marker split across writes, byte by byte
        for byte in body + b".\r\n":
            await c.send(bytes([byte]))
        assert await c.code() == 250
        # an empty message, then the next transaction pipelined behind the final dot
        await c.send(b"MAIL FROM:<a@src.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n")
        assert [await c.code() for _ in range(3)] == [250, 250, 354]
        await c.send(b".\r\nMAIL FROM:<c@src.test>\r\nRSET\r\nQUIT\r\n")
        assert [await c.code() for _ in range(4)] == [250, 250, 250, 221]
    assert [m.data for m in mta.messages] == [b".leading dot\r\n.\r\n..\r\nnot.\r\n x\r\n", b""]
    assert [m.mail_from for m in mta.messages] == ["", "a@src.test"]


async def test_bdat_transaction(nursery: trio.Nursery) -> None:
    mta, port = await start(nursery)
    with trio.fail_after(5):
        c = await Client.connect(port, encode_v2(CLIENT, PROXY_ADDR))
        await c.greet()
        await c.send(
            b"MAIL FROM:<a@src.test>\r\nRCPT TO:<b@dest.test>\r\n"
            b"BDAT 12\r\nSubject: x\r\n"
            b"BDAT 9 LAST\r\n\r\n.body\r\n"
        )
        codes = [await c.reply() for _ in range(4)]
        assert [code for code, _ in codes] == [250, 250, 250, 250]
        assert codes[2][1] == ["2.0.0 12 octets received"]
        assert codes[3][1][0].startswith("2.0.0 Ok: queued as ")
        # DATA-only state errors: BDAT without a transaction
        assert await c.command("BDAT 0 LAST") == (503, ["5.5.1 Error: need MAIL command"])
    assert mta.messages[0].data == b"Subject: x\r\n\r\n.body\r\n"  # no unstuffing for BDAT
    assert mta.messages[0].via == "BDAT"


async def test_bdat_with_chunking_off_is_unknown(nursery: trio.Nursery) -> None:
    _, port = await start(nursery, chunking=False, proxy_protocol=False)
    with trio.fail_after(5):
        c = await Client.connect(port)
        assert "CHUNKING" not in await c.greet()
        assert (await c.command("BDAT 0 LAST"))[0] == 502


async def test_proxy_v2_source_captured(nursery: trio.Nursery) -> None:
    mta, port = await start(nursery)
    with trio.fail_after(5):
        header = encode_v2(("2001:db8::7", 4242), ("2001:db8::25", 25))
        c = await Client.connect(port, header)
        await c.greet("v6.client.test")
        await c.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        assert [await c.code() for _ in range(3)] == [250, 250, 354]
        await c.send(b"hi\r\n.\r\n")
        assert await c.code() == 250
    assert mta.messages[0].client_addr == "2001:db8::7"
    assert mta.messages[0].helo == "v6.client.test"


async def test_local_header_and_no_header_use_peer_address(nursery: trio.Nursery) -> None:
    mta, port = await start(nursery)
    _, plain_port = await start(nursery, proxy_protocol=False)
    with trio.fail_after(5):
        for p, first in ((port, encode_v2_local()), (plain_port, b"")):
            c = await Client.connect(p, first)
            await c.greet()
            await c.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
            assert [await c.code() for _ in range(3)] == [250, 250, 354]
            await c.send(b"hi\r\n.\r\n")
            assert await c.code() == 250
    assert mta.messages[0].client_addr == "127.0.0.1"


async def test_bad_proxy_header_drops_silently(nursery: trio.Nursery) -> None:
    _, port = await start(nursery)
    with trio.fail_after(5):
        c = await Client.connect(port, b"EHLO client.test\r\n")
        assert await c.eof()


@pytest.mark.parametrize(
    "pipelined",
    [
        b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n",
        b"NOOP\r\nNOOP\r\n",
        b"DATA\r\nSubject: early\r\n",
        b"BDAT 4\r\nabcdRSET\r\n",  # the chunk belongs to BDAT; RSET behind it does not
    ],
)
async def test_no_pipelining_sync_error(nursery: trio.Nursery, pipelined: bytes) -> None:
    mta, port = await start(nursery, pipelining=False)
    with trio.fail_after(5):
        c = await Client.connect(port, encode_v2(CLIENT, PROXY_ADDR))
        assert "PIPELINING" not in await c.greet()
        if pipelined.startswith(b"DATA"):  # make DATA itself valid
            assert await c.command("MAIL FROM:<a@x.test>") == (250, ["2.1.0 Ok"])
            assert await c.command("RCPT TO:<b@y.test>") == (250, ["2.1.5 Ok"])
        await c.send(pipelined)
        assert await c.reply() == SYNC
        assert await c.eof()
    assert mta.sync_errors == 1


async def test_no_pipelining_lockstep_is_fine(nursery: trio.Nursery) -> None:
    mta, port = await start(nursery, pipelining=False)
    with trio.fail_after(5):
        c = await Client.connect(port, encode_v2(CLIENT, PROXY_ADDR))
        await c.greet()
        for line in ("MAIL FROM:<a@x.test>", "RCPT TO:<b@y.test>", "BDAT 3"):
            await c.send(line.encode() + b"\r\n" + (b"abc" if line.startswith("BDAT") else b""))
            assert await c.code() == 250
        await c.send(b"BDAT 2 LAST\r\nde")
        assert await c.code() == 250
        await c.command("MAIL FROM:<a@x.test>")
        await c.command("RCPT TO:<b@y.test>")
        assert await c.command("DATA") == (354, ["End data with <CR><LF>.<CR><LF>"])
        await c.send(b"line\r\n.\r\n")
        assert await c.code() == 250
        assert await c.command("QUIT") == (221, ["2.0.0 demo-mta.test Bye"])
    assert [m.data for m in mta.messages] == [b"abcde", b"line\r\n"]
    assert mta.sync_errors == 0


async def test_strict_sync_after_ehlo(nursery: trio.Nursery) -> None:
    _, strict = await start(nursery)
    _, lenient = await start(nursery, strict_sync=False)
    with trio.fail_after(5):
        c = await Client.connect(strict, encode_v2(CLIENT, PROXY_ADDR))
        assert await c.code() == 220
        await c.send(b"EHLO client.test\r\nMAIL FROM:<a@x.test>\r\n")
        assert await c.reply() == SYNC
        assert await c.eof()
        c = await Client.connect(lenient, encode_v2(CLIENT, PROXY_ADDR))
        assert await c.code() == 220
        await c.send(b"EHLO client.test\r\nMAIL FROM:<a@x.test>\r\n")
        assert [await c.code() for _ in range(2)] == [250, 250]


@pytest.mark.parametrize("proxy_protocol", [True, False])
async def test_early_talker_same_segment(nursery: trio.Nursery, proxy_protocol: bool) -> None:
    # Without a PROXY header to read first, the EHLO may still be in flight when the server
    # checks: a short banner delay closes that window, as a real early-talker check does.
    delay = 0.0 if proxy_protocol else 0.2
    mta, port = await start(nursery, proxy_protocol=proxy_protocol, banner_delay=delay)
    with trio.fail_after(5):
        header = encode_v1(CLIENT, PROXY_ADDR) if proxy_protocol else b""
        c = await Client.connect(port, header + b"EHLO client.test\r\n")
        assert await c.reply() == SYNC  # instead of the banner
        assert await c.eof()
    assert mta.sync_errors == 1


async def test_early_talker_within_banner_delay(nursery: trio.Nursery) -> None:
    mta, port = await start(nursery, banner_delay=0.3)
    with trio.fail_after(5):
        c = await Client.connect(port, encode_v2(CLIENT, PROXY_ADDR))
        await trio.sleep(0.05)
        await c.send(b"EHLO client.test\r\n")
        assert await c.reply() == SYNC
        assert await c.eof()
        # waiting for the banner is rewarded
        c = await Client.connect(port, encode_v2(CLIENT, PROXY_ADDR))
        await c.greet()
    assert mta.sync_errors == 1


async def test_sequencing_errors(nursery: trio.Nursery) -> None:
    _, port = await start(nursery, proxy_protocol=False)
    with trio.fail_after(5):
        c = await Client.connect(port)
        assert await c.code() == 220
        assert (await c.command("MAIL FROM:<a@x.test>"))[0] == 503
        assert (await c.command("EHLO"))[0] == 501
        await c.command("EHLO client.test")
        assert (await c.command("RCPT TO:<b@y.test>"))[0] == 503
        assert (await c.command("DATA"))[0] == 503
        assert (await c.command("MAIL FROM:a@x.test"))[0] == 501
        assert (await c.command("MAIL FROM:<a@x.test> SIZE=99999999"))[0] == 552
        assert (await c.command("MAIL FROM:<a@x.test>"))[0] == 250
        assert (await c.command("MAIL FROM:<a@x.test>"))[0] == 503
        assert (await c.command("RCPT TO:<reject@y.test>"))[0] == 550
        assert (await c.command("RCPT TO:<tempfail@y.test>"))[0] == 450
        assert await c.command("DATA") == (554, ["5.5.1 Error: no valid recipients"])
        await c.send(b"BDAT 3 LAST\r\nabc")
        assert await c.code() == 554
        assert (await c.command("RCPT TO:<b@y.test>"))[0] == 250
        await c.send(b"BDAT 1\r\na")
        assert await c.code() == 250
        assert (await c.command("DATA"))[0] == 503
        assert (await c.command("RCPT TO:<c@y.test>"))[0] == 503
        assert (await c.command("RSET"))[0] == 250
        assert (await c.command("NOOP"))[0] == 250
        assert (await c.command("HELO client.test")) == (250, ["demo-mta.test"])
        assert (await c.command("VRFY bob"))[0] == 502
        assert (await c.command("STARTTLS"))[0] == 502
        assert (await c.command(""))[0] == 500


async def test_line_too_long(nursery: trio.Nursery) -> None:
    _, port = await start(nursery, proxy_protocol=False, max_line=100)
    with trio.fail_after(5):
        c = await Client.connect(port)
        await c.greet()
        await c.send(b"NOOP " + b"x" * 200)
        assert (await c.reply())[0] == 500
        assert await c.eof()


async def test_message_too_big(nursery: trio.Nursery) -> None:
    mta, port = await start(nursery, proxy_protocol=False, max_size=1000)
    with trio.fail_after(5):
        c = await Client.connect(port)
        await c.greet()
        await c.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        assert [await c.code() for _ in range(3)] == [250, 250, 354]
        await c.send(b"x" * 5000 + b"\r\n.\r\n")
        assert (await c.reply())[0] == 552
        await c.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 2000 LAST\r\n")
        await c.send(b"y" * 2000)
        assert [await c.code() for _ in range(3)] == [250, 250, 552]
        assert (await c.command("NOOP"))[0] == 250
    assert mta.messages == []


async def test_idle_timeout(nursery: trio.Nursery) -> None:
    _, port = await start(nursery, proxy_protocol=False, idle_timeout=0.2)
    with trio.fail_after(5):
        c = await Client.connect(port)
        await c.greet()
        assert (await c.reply())[0] == 421
        assert await c.eof()


async def test_cancellation_with_open_sessions() -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            _, port = await start(nursery, proxy_protocol=False)
            c = await Client.connect(port)
            await c.greet()
            nursery.cancel_scope.cancel()
        assert await c.eof()
