"""Limits: line lengths, held early input, MTA reply size, session counts, timeouts, slow
and flooding clients -- in process, against the scriptable fake MTA.

Functional assertions only: what each client is answered, what the MTA received, that a good
session completes while a hostile one is still at it. The one time checked is that a trickled
line is cut at its timeout, far sooner than it would take to complete.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio

from proxy.machine.mta import MtaConversation

from .fakemta import STALL, FakeMTA
from .samples import sample
from .test_session import ENVELOPE, MESSAGE, Client, running


@asynccontextmanager
async def client(port: int, source: str = "127.0.0.1") -> AsyncIterator[Client]:
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    async with stream:
        yield Client(stream)


async def good_session(port: int, source: str = "127.0.0.1", tag: bytes = b"good") -> None:
    """One complete transaction; fails the test unless every reply is the expected one."""
    async with client(port, source) as c:
        await c.stream.send_all(b"EHLO good.test\r\n" + ENVELOPE)
        assert [r.code for r in await c.replies_n(5)] == [220, 250, 250, 250, 354]
        await c.stream.send_all(b"Subject: " + tag + b"\r\n\r\n" + MESSAGE + b".\r\nQUIT\r\n")
        assert [r.code for r in await c.replies_n(2)] == [250, 221]


async def until_closed(c: Client) -> list[int]:
    """Codes of every reply until the proxy closes the connection."""
    codes = []
    while (r := await c.reply(10)) is not None:
        codes.append(r.code)
    return codes


def session_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeconnect.session"]


# ------------------------------------------------------------------- line lengths


@pytest.mark.parametrize("limit", [None, 1024])
async def test_command_line_length(limit: int | None) -> None:
    mta = FakeMTA()
    limits = {} if limit is None else {"max_command_line": limit}
    n = limit or 512
    # RSET: pipelinable (a client must wait for NOOP's reply)
    fits = b"RSET " + b"x" * (n - 7) + b"\r\n"
    too_long = b"RSET " + b"y" * (n - 6) + b"\r\n"
    async with running(mta, limits=limits) as (port, _), client(port) as c:
        assert len(fits) == n and len(too_long) == n + 1
        await c.stream.send_all(b"EHLO me.test\r\n" + fits + too_long + b"RSET\r\n")
        replies = await c.replies_n(5)
        assert [r.code for r in replies] == [220, 250, 250, 500, 250]
        assert replies[3].lines == (b"5.5.2 Line too long",)
        # a megabyte without a line end: dropped as it comes, refused once the line ends
        await c.stream.send_all(b"RSET " + b"z" * 1_000_000)
        await c.stream.send_all(b"\r\nQUIT\r\n")
        assert [r.code for r in await c.replies_n(2)] == [500, 221]
    assert fits in mta.commands
    assert not any(b"yyy" in cmd or b"zzz" in cmd for cmd in mta.commands)


@pytest.mark.parametrize("size", [1000, 5000, 200_000])
async def test_long_message_lines_are_the_mtas_to_judge(
    size: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Real mail has lines over RFC 5321's 1000 octets, and MTAs take them (Postfix up to
    line_length_limit, wrapping longer ones): the proxy passes them on in pieces. The old
    limits.max_text_line still loads, with a warning."""
    caplog.set_level(logging.INFO, "pipeconnect")
    message = b"a\r\n" + b"L" * size + b"\r\nb\r\n"
    mta = FakeMTA()
    async with running(mta, limits={"max_text_line": 2000}) as (port, _), client(port) as c:
        await c.stream.send_all(b"EHLO me.test\r\n" + ENVELOPE)
        await c.replies_n(5)
        await c.stream.send_all(message + b".\r\nQUIT\r\n")
        assert [r.code for r in await c.replies_n(2)] == [250, 221]
    assert mta.messages == [message]
    assert any("max_text_line is no longer used" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------- early input


@dataclass
class GatedMTA(FakeMTA):
    """Holds its first connection (before it reads even the PROXY header) until ``gate``
    is set, so that session's banner waits; later connections are served at once."""

    gate: trio.Event = field(default_factory=trio.Event)
    arrived: trio.Event = field(default_factory=trio.Event)

    async def _handle(self, stream: trio.SocketStream) -> None:
        if not self.arrived.is_set():
            self.arrived.set()
            await self.gate.wait()
        await super()._handle(stream)


async def test_pre_banner_flood_gets_backpressure_and_others_are_unaffected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """16 MB sent before the banner: the proxy holds max_early_bytes and stops reading, so
    the flooder's send blocks (far more than loopback socket buffers hold) while good
    sessions complete: backpressure, not failure. Once its banner comes, the commands it
    held are answered up to DATA; the message it streamed behind DATA without waiting for
    the 354 is a synchronization error (RFC 2920), and none of it reaches the MTA."""
    caplog.set_level(logging.INFO, "pipeconnect")
    body = b"".join(b"%07d " % i + b"b" * 990 + b"\r\n" for i in range(16_000))
    flood = b"EHLO flood.test\r\n" + ENVELOPE + body + b".\r\nQUIT\r\n"
    mta = GatedMTA()
    sent = trio.Event()
    async with running(mta) as (port, _), client(port, "127.0.0.2") as f:

        async def flooder() -> None:
            with contextlib.suppress(trio.BrokenResourceError):  # closed on the rest
                await f.stream.send_all(flood)
            sent.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flooder)
            with trio.fail_after(10):
                await mta.arrived.wait()
            for i in range(3):
                await good_session(port, tag=b"good%d" % i)
            assert not sent.is_set()  # still blocked: the proxy stopped reading it
            assert len(mta.messages) == 3
            mta.gate.set()
            with trio.fail_after(60):
                await sent.wait()
        codes = await until_closed(f)
        assert codes == [220, 250, 250, 250, 554]
        assert b"synchronization" in c_reads(f)
    assert len(mta.messages) == 3
    assert not any(cmd.startswith(b"DATA") for cmd in mta.commands[-3:])
    [line] = [ln for ln in session_lines(caplog) if "flood.test" in ln]
    assert re.search(r" E=65536 ", line), line  # held exactly max_early_bytes, no more


# ------------------------------------------------------------------- replies from the MTA


@pytest.mark.parametrize(
    ("ehlo", "limits", "ok"),
    [
        (b"250-fake.test\r\n250 " + b"L" * 5000 + b"\r\n", {}, False),
        (b"250-fake.test\r\n250 " + b"L" * 5000 + b"\r\n", {"max_reply_line": 8192}, True),
        (b"250-fake.test\r\n" * 300 + b"250 SIZE\r\n", {}, False),  # 301 lines
    ],
    ids=["line-over-limit", "line-limit-raised", "too-many-lines"],
)
async def test_reply_size_from_the_mta(ehlo: bytes, limits: dict[str, int], ok: bool) -> None:
    mta = FakeMTA(script={"EHLO": ehlo})
    async with running(mta, limits=limits) as (port, _), client(port) as c:
        c.conversation = MtaConversation(max_reply_line=65536)  # the test client takes anything
        await c.stream.send_all(b"EHLO me.test\r\nNOOP\r\n")
        codes = await until_closed(c) if not ok else [r.code for r in await c.replies_n(3)]
        if ok:
            assert codes == [220, 250, 250]
        else:
            assert codes == [220, 421]  # nothing of the oversized reply reached the client
            assert b"LLLL" not in b"".join(c.reads)
            assert b"Upstream MTA" in b"".join(c.reads)


# ------------------------------------------------------------------- session counts


async def test_max_sessions_global() -> None:
    mta = FakeMTA()
    async with running(mta, limits={"max_sessions": 2}) as (port, metrics):
        async with client(port, "127.0.0.2") as a, client(port, "127.0.0.3") as b:
            for c in (a, b):
                assert [r.code for r in await c.replies_n(1)] == [220]
            async with client(port, "127.0.0.4") as third:
                reply = await third.reply()
                assert reply is not None and reply.code == 421
                assert reply.lines == (b"4.7.0 Too many connections, try again later",)
                assert await third.reply() is None
            await a.stream.send_all(b"QUIT\r\n")
            assert await until_closed(a) == [221]
        # the slot is free again once a session ended (admission is checked at accept)
        with trio.fail_after(5):
            while True:
                async with client(port, "127.0.0.4") as late:
                    reply = await late.reply()
                    assert reply is not None
                    if reply.code == 220:
                        break
                await trio.sleep(0.05)
    assert sample(metrics, "sessions_total", listener="plain", outcome="too-many") >= 1


async def test_max_sessions_per_client_spares_other_addresses() -> None:
    mta = FakeMTA()
    async with (
        running(mta, limits={"max_sessions_per_client": 2}) as (port, _),
        client(port, "127.0.0.2") as a,
        client(port, "127.0.0.2") as b,
    ):
        for c in (a, b):
            assert [r.code for r in await c.replies_n(1)] == [220]
        async with client(port, "127.0.0.2") as third:
            reply = await third.reply()
            assert reply is not None and reply.code == 421
            assert b"Too many connections from your address" in reply.lines[0]
        await good_session(port, "127.0.0.3")  # another address is not affected
    assert len(mta.messages) == 1


# ------------------------------------------------------------------- timeouts


STALLS = {
    "banner": {},
    "mail": {"MAIL": STALL},
    "rcpt": {"RCPT": STALL},
    "data_init": {"DATA": STALL},
    "data_term": {"EOD": STALL},
    "reply": {"NOOP": STALL},
}


@pytest.mark.parametrize(
    ("phase", "codes"),
    [
        ("banner", [421]),
        ("mail", [220, 250, 421]),
        ("rcpt", [220, 250, 250, 421]),
        ("data_init", [220, 250, 250, 250, 421]),
        ("data_term", [220, 250, 250, 250, 354, 421]),  # the message is not acknowledged
        ("reply", [220, 250, 421]),
    ],
)
async def test_mta_stalls_in_each_phase(
    phase: str, codes: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    """The MTA goes silent; after that phase's timeout the client gets 421 (never a 250 the
    MTA did not send) and the session is closed."""
    caplog.set_level(logging.INFO, "pipeconnect")
    mta = FakeMTA(script=STALLS[phase], banner_delay=30 if phase == "banner" else 0)
    rest = b"NOOP\r\n" if phase == "reply" else ENVELOPE
    async with running(mta, timeouts={phase: 0.3}) as (port, _), client(port) as c:
        await c.stream.send_all(b"EHLO me.test\r\n" + rest)
        if phase == "data_term":  # the message after the 354, as a client must
            assert [r.code for r in await c.replies_n(5)] == codes[:5]
            await c.stream.send_all(MESSAGE + b".\r\n")
            codes = codes[5:]
        assert await until_closed(c) == codes
        assert b"4.4.2" in c.reads[-1]
        await trio.sleep(0.05)  # the log line follows the close
    # After the end of data the MTA has the message; the client, told 421, will retry: a
    # possible duplicate (RFC 1047), never a loss.
    assert mta.messages == ([MESSAGE] if phase == "data_term" else [])
    assert any("outcome=upstream-timeout" in ln for ln in session_lines(caplog))


@pytest.mark.parametrize(
    ("phase", "sent", "codes"),
    [
        ("command", b"EHLO me.test\r\nNOOP", [220, 250, 421]),  # idle mid-command
        ("data_block", b"EHLO me.test\r\n" + ENVELOPE, [220, 250, 250, 250, 354, 421]),
    ],
)
async def test_client_goes_silent(
    phase: str, sent: bytes, codes: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pipeconnect")
    mta = FakeMTA()
    async with running(mta, timeouts={phase: 0.3}) as (port, _), client(port) as c:
        await c.stream.send_all(sent)
        if phase == "data_block":  # half a message after the 354, then silence
            assert [r.code for r in await c.replies_n(5)] == codes[:5]
            await c.stream.send_all(b"Subject: half\r\n")
            codes = codes[5:]
        assert await until_closed(c) == codes
        assert b"421 4.4.2 Timeout" in c.reads[-1]
        await trio.sleep(0.05)
    assert mta.messages == []  # a message cut short by the timeout is never completed
    assert any("outcome=client-timeout" in ln for ln in session_lines(caplog))


# ------------------------------------------------------------------- slowloris


async def test_slowloris_does_not_stop_good_sessions() -> None:
    """Ten clients trickle a command at one byte per 0.4 s, each byte well within the
    timeout: the timeout bounds the whole line, so each is cut off with 421 about 2 s after
    its line began, long before the line is complete; good sessions run to completion
    meanwhile, and the MTA never sees a trickled command."""
    mta = FakeMTA()
    line = b"NOOP this is a long command line\r\n"  # 14 s at this pace
    cut: list[float] = []

    async def slowloris(port: int, n: int) -> None:
        async with client(port, f"127.0.1.{n}") as c:
            assert [r.code for r in await c.replies_n(1)] == [220]
            start = trio.current_time()
            with contextlib.suppress(trio.BrokenResourceError):
                for i in range(len(line)):
                    await c.stream.send_all(line[i : i + 1])
                    if c.next_reply() is not None or await _closed(c):
                        break
                    await trio.sleep(0.4)
            with trio.move_on_after(5), contextlib.suppress(trio.BrokenResourceError):
                while not await _closed(c):  # noqa: ASYNC110 (reads as it polls)
                    await trio.sleep(0.05)
            assert b"421 4.4.2 Timeout" in c_reads(c)
            cut.append(trio.current_time() - start)

    async with running(mta, timeouts={"command": 2}) as (port, _), trio.open_nursery() as nursery:
        for n in range(10):
            nursery.start_soon(slowloris, port, n + 1)
        await trio.sleep(0.5)  # every slow client is mid-line now
        for i in range(5):
            await good_session(port, "127.0.0.2", tag=b"good%d" % i)
    # cut at the line's deadline (2 s), far from the 14 s the line would take
    assert len(cut) == 10 and all(1.9 < t < 8 for t in cut), cut
    assert len(mta.messages) == 5
    assert not any(c.startswith(b"NOOP") for c in mta.commands)


async def _closed(c: Client) -> bool:
    """Read what has arrived (waiting 10 ms at most); True once the proxy closed."""
    with trio.move_on_after(0.01):
        data = await c.stream.receive_some(65536)
        c.reads.append(data)
        c.conversation.feed(data)
        return not data
    return False


def c_reads(c: Client) -> bytes:
    return b"".join(c.reads)
