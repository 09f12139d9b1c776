"""Bounds found with bench/attack.py: a client streaming junk is closed after a few protocol
errors, and the drain after a final reply stops after a bounded number of bytes.

Before these, 20 pre-banner flooders multiplied the delivery time of good sessions on the
same proxy by about 200 (the proxy answered megabytes of junk line by line, and drained a
refused flooder at full speed for two seconds). In process, against the fake MTA.
"""

from __future__ import annotations

import pytest
import trio

from proxy.machine.session import MAX_LOCAL_ERRORS
from proxy.session import DRAIN_LIMIT

from .fakemta import FakeMTA
from .test_limits import client, good_session, session_lines, until_closed
from .test_session import running

JUNK_LINE = b"J" * 1000 + b"\r\n"  # longer than a command line may be: answered 500 locally


async def test_junk_stream_is_closed_after_a_few_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="pipeconnect.session")
    mta = FakeMTA()
    async with running(mta) as (port, _), client(port) as c:
        async with trio.open_nursery() as nursery:

            async def flood() -> None:
                # Far more junk than the limit; the proxy stops reading it when it closes.
                with trio.move_on_after(10):
                    try:
                        for _ in range(4096):
                            await c.stream.send_all(JUNK_LINE * 16)
                    except trio.BrokenResourceError:
                        pass

            nursery.start_soon(flood)
            codes = await until_closed(c)
            nursery.cancel_scope.cancel()
        await good_session(port)  # the proxy is fine for everyone else
    assert codes == [220] + [500] * MAX_LOCAL_ERRORS + [421], codes
    assert not any(b"JJJ" in cmd for cmd in mta.commands)
    assert any("outcome=too-many-errors" in ln for ln in session_lines(caplog))


async def test_a_few_errors_are_answered_and_the_session_goes_on() -> None:
    mta = FakeMTA()
    async with running(mta) as (port, _), client(port) as c:
        await c.stream.send_all(b"EHLO me.test\r\n" + JUNK_LINE * (MAX_LOCAL_ERRORS - 1))
        codes = [r.code for r in await c.replies_n(2 + MAX_LOCAL_ERRORS - 1)]
        assert codes == [220, 250] + [500] * (MAX_LOCAL_ERRORS - 1)
        await c.stream.send_all(b"QUIT\r\n")
        assert [r.code for r in await c.replies_n(1)] == [221]


async def test_drain_after_a_refusal_is_bounded_in_bytes() -> None:
    """A host not allowed early pipelining talks early: 421, then the proxy drains what the
    client still sends so that the reply is not destroyed by an RST -- but only up to
    DRAIN_LIMIT bytes, not for the whole (here: a minute) drain time."""
    mta = FakeMTA()
    sections = {
        "pipe_connect": {"advertise_hosts": ["127.0.0.1"]},
        "timeouts": {"early_drain": 60.0},
    }
    async with running(mta, **sections) as (port, _), client(port, "127.0.0.2") as c:
        sent = 0
        with trio.fail_after(30):  # far below the drain time: the byte bound ended it
            try:
                while True:
                    await c.stream.send_all(b"X" * 65536)
                    sent += 65536
            except trio.BrokenResourceError:
                pass
        # What the proxy read and dropped, plus what the socket buffers held.
        assert sent > DRAIN_LIMIT
        # The refusal was sent before the drain began, so the reset that ends the drain
        # cannot destroy it: what the client already received stays readable.
        reply = await c.reply()
        assert reply is not None and reply.to_bytes() == (
            b"421 4.5.0 SMTP synchronization error: input before the greeting, try again later\r\n"
        )
