"""The session engine against a scriptable fake MTA (fault injection) over loopback."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from proxy.config import parse_config
from proxy.machine.mta import MtaConversation
from proxy.metrics import Metrics
from proxy.replies import receive_reply
from proxy.server import serve
from proxy.smtp import Reply

from .fakemta import CLOSE, STALL, FakeMTA
from .samples import sample

ENVELOPE = b"MAIL FROM:<a@src.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n"
MESSAGE = b"Subject: t\r\n\r\nline one\r\n..dot stuffed\r\n"


def make_config(mta_port: int, **sections: dict[str, Any]) -> Any:
    data: dict[str, Any] = {
        "listen": {"plain": ["127.0.0.1:0"]},
        "upstream": {"address": f"127.0.0.1:{mta_port}", "client_identity": "proxy-v2"},
        "pipe_connect": {"advertise_hosts": ["*"]},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data)


@asynccontextmanager
async def running(mta: FakeMTA, **sections: dict[str, Any]) -> AsyncIterator[tuple[int, Metrics]]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(mta.serve)
        metrics = Metrics()
        bound = await nursery.start(serve, make_config(port, **sections), metrics)
        try:
            yield bound[0][1], metrics
        finally:
            for client in _clients:
                await client.stream.aclose()
            _clients.clear()
            nursery.cancel_scope.cancel()


class Client:
    """A raw client of the proxy: tests write with ``stream.send_all``, each ``reply()``
    expects one reply, framed by the MTA-side conversation; ``reads`` holds every chunk."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conversation: MtaConversation[None] = MtaConversation()
        self.reads: list[bytes] = []

    async def reply(self, timeout: float = 5) -> Reply | None:
        with trio.fail_after(timeout):
            got = await receive_reply(self.stream, self._expecting(), on_data=self.reads.append)
            return None if got is None else got[1]

    async def replies_n(self, n: int) -> list[Reply]:
        out = []
        for _ in range(n):
            r = await self.reply()
            assert r is not None, f"connection closed after {out}"
            out.append(r)
        return out

    def _expecting(self) -> MtaConversation[None]:
        if not self.conversation.pending:  # (one left by a reply that never came stands)
            self.conversation.expect(None)
        return self.conversation

    def next_reply(self) -> Reply | None:
        """A reply already read (for tests that read the stream themselves)."""
        got = self._expecting().next_reply()
        return None if got is None else got[1]


_clients: list[Client] = []


async def connect(port: int) -> Client:
    """A raw client; ``running`` closes it."""
    client = Client(await trio.open_tcp_stream("127.0.0.1", port))
    _clients.append(client)
    return client


async def test_early_pipelining_replayed_in_one_write() -> None:
    mta = FakeMTA(pipelining=True, banner_delay=0.2)
    async with running(mta) as (port, metrics):
        c = await connect(port)
        await c.stream.send_all(b"EHLO me.test\r\n" + ENVELOPE)
        banner, ehlo, mail, rcpt, data = await c.replies_n(5)
        # banner + EHLO reply + three replies came in a single segment
        assert len(c.reads) == 1
        assert (banner.code, ehlo.code, mail.code, rcpt.code, data.code) == (
            220,
            250,
            250,
            250,
            354,
        )
        kws = [ln.split(b" ")[0] for ln in ehlo.lines[1:]]
        assert kws[:4] == [b"PIPELINING", b"PIPECONNECT", b"PIPE_CONNECT", b"X_PIPE_CONNECT"]
        assert b"STARTTLS" not in kws and b"XCLIENT" not in kws
        await c.stream.send_all(MESSAGE + b".\r\nQUIT\r\n")
        final, bye = await c.replies_n(2)
        assert (final.code, bye.code) == (250, 221)
    assert mta.violations == []
    assert mta.messages == [MESSAGE]
    assert mta.proxy_sources == [("127.0.0.1", mta.proxy_sources[0][1])]
    assert sample(metrics, "early_pipelining_used_total") == 1
    assert sample(metrics, "early_pipelining_advertised_total") == 1


async def test_no_pipelining_upstream_gets_one_command_at_a_time() -> None:
    mta = FakeMTA(pipelining=False, banner_delay=0.1)
    async with running(mta) as (port, _):
        c = await connect(port)
        await c.stream.send_all(b"EHLO me.test\r\n" + ENVELOPE)
        replies = await c.replies_n(5)
        assert [r.code for r in replies] == [220, 250, 250, 250, 354]
        assert b"PIPELINING" in [ln.split(b" ")[0] for ln in replies[1].lines]
        # (RSET, not NOOP: a client must wait for NOOP's reply, RFC 2920 3.1)
        await c.stream.send_all(MESSAGE + b".\r\nRSET\r\nRSET\r\nQUIT\r\n")
        assert [r.code for r in await c.replies_n(4)] == [250, 250, 250, 221]
    assert mta.violations == []
    assert mta.messages == [MESSAGE]


@pytest.mark.parametrize(
    ("action", "code"), [("defer", 421), ("reject", 554)], ids=["defer", "reject"]
)
async def test_early_input_from_unadvertised_host_refused(action: str, code: int) -> None:
    mta = FakeMTA(banner_delay=0.2)
    pc = {"advertise_hosts": ["!127.0.0.1", "*"], "unadvertised_early_input": action}
    async with running(mta, pipe_connect=pc) as (port, metrics):
        c = await connect(port)
        await c.stream.send_all(b"EHLO me.test\r\n" + ENVELOPE)
        reply = await c.reply()
        assert reply is not None and reply.code == code
        assert b"SMTP synchronization error" in reply.lines[0]
        assert await c.reply() is None  # closed after the one reply
        await trio.sleep(0.3)
    assert mta.commands == [] and bytes(mta.received) == b""
    assert sample(metrics, "early_input_refused_total", action=action) == 1


async def test_early_input_forwarded_to_judge() -> None:
    mta = FakeMTA(banner_delay=0.2)
    pc = {"advertise_hosts": [], "unadvertised_early_input": "forward"}
    async with running(mta, pipe_connect=pc) as (port, _):
        c = await connect(port)
        await c.stream.send_all(b"EHLO me.test\r\nQUIT\r\n")
        replies = await c.replies_n(3)
        assert [r.code for r in replies] == [220, 250, 221]
        assert b"PIPECONNECT" not in b"".join(replies[1].lines)
    assert mta.early_input == [b"EHLO me.test\r\nQUIT\r\n"]
    assert mta.commands == [b"EHLO me.test\r\n", b"QUIT\r\n"]  # each byte reached it once


async def test_early_input_accepted_without_advertising() -> None:
    mta = FakeMTA(banner_delay=0.2, pipelining=False)
    pc = {"advertise_hosts": [], "unadvertised_early_input": "accept"}
    async with running(mta, pipe_connect=pc) as (port, _):
        c = await connect(port)
        await c.stream.send_all(b"EHLO me.test\r\nQUIT\r\n")
        banner, ehlo, bye = await c.replies_n(3)
        assert (banner.code, ehlo.code, bye.code) == (220, 250, 221)
        assert b"PIPECONNECT" not in b"".join(ehlo.lines)
    assert mta.violations == []


@pytest.mark.parametrize(
    ("banner", "after"),
    [
        # a 421 closes the channel (RFC 5321 3.8): relayed, and the session ends with it
        (b"421 4.3.2 busy\r\n", None),
        # a 554 greeting leaves the MTA to answer what follows; this one hung up instead, so
        # the client's EHLO gets the proxy's 421 4.4.2, never a reply the MTA did not send
        (b"554 5.7.1 go away\r\n", b"421 4.4.2 "),
    ],
)
async def test_error_banner_relayed_and_session_ends(banner: bytes, after: bytes | None) -> None:
    mta = FakeMTA(banner=banner)
    async with running(mta) as (port, _):
        c = await connect(port)
        reply = await c.reply()
        assert reply is not None and reply.to_bytes() == banner
        await c.stream.send_all(b"EHLO me.test\r\n")
        reply = await c.reply()
        if after is None:
            assert reply is None
        else:
            assert reply is not None and reply.to_bytes().startswith(after)
            assert await c.reply() is None


async def test_json_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "pipeconnect")
    mta = FakeMTA(banner_delay=0.1)
    async with running(mta, log={"format": "json"}) as (port, _):
        c = await connect(port)
        await c.stream.send_all(b"EHLO me.test\r\n" + ENVELOPE)
        await c.replies_n(5)
        await c.stream.send_all(MESSAGE + b".\r\nQUIT\r\n")
        await c.replies_n(2)
        await trio.sleep(0.1)
    [line] = [r.getMessage() for r in caplog.records if r.name == "pipeconnect.session"]
    record = json.loads(line)
    assert record["L"] == "L*" and record["outcome"] == "quit" and record["helo"] == "me.test"
    assert record["messages"] == 1 and record["rcpts"] == 1 and record["round_trips_saved"] == 2
    assert record["bytes"] == len(MESSAGE) and record["early_bytes"] == 14 + len(ENVELOPE)


async def test_mta_closing_mid_data_gives_4xx_never_250() -> None:
    mta = FakeMTA(script={"EOD": CLOSE})
    async with running(mta) as (port, _):
        c = await connect(port)
        await c.reply()
        await c.stream.send_all(b"EHLO me.test\r\n")
        await c.reply()
        await c.stream.send_all(ENVELOPE)
        assert [r.code for r in await c.replies_n(3)] == [250, 250, 354]
        await c.stream.send_all(MESSAGE + b".\r\n")
        reply = await c.reply()
        assert reply is not None and 400 <= reply.code < 500
        assert await c.reply() is None


async def test_mta_stalls_then_client_gets_421() -> None:
    mta = FakeMTA(script={"MAIL": STALL})
    async with running(mta, timeouts={"mail": 0.3}) as (port, _):
        c = await connect(port)
        await c.reply()
        await c.stream.send_all(b"EHLO me.test\r\n")
        await c.reply()
        await c.stream.send_all(b"MAIL FROM:<a@src.test>\r\n")
        reply = await c.reply()
        assert reply is not None and reply.code == 421


async def test_silent_client_times_out(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "pipeconnect")
    mta = FakeMTA()
    async with running(mta, timeouts={"command": 0.3}) as (port, _):
        c = await connect(port)
        banner = await c.reply()
        assert banner is not None and banner.code == 220
        reply = await c.reply()
        assert reply is not None and reply.code == 421 and b"Timeout" in reply.lines[0]
        await trio.sleep(0.1)
    assert any("outcome=client-timeout" in r.getMessage() for r in caplog.records)


async def test_proxy_only_commands_refused_locally() -> None:
    mta = FakeMTA()
    async with running(mta) as (port, _):
        c = await connect(port)
        await c.reply()
        await c.stream.send_all(b"EHLO me.test\r\nXCLIENT ADDR=1.2.3.4\r\nSTARTTLS\r\nQUIT\r\n")
        replies = await c.replies_n(4)
        assert [r.code for r in replies] == [250, 550, 454, 221]
    assert not any(b"XCLIENT" in cmd or b"STARTTLS" in cmd for cmd in mta.commands)


async def test_bare_lf_in_message_refused_after_its_end_and_never_completed() -> None:
    mta = FakeMTA()
    async with running(mta, limits={"bare_newline": "reject"}) as (port, _):
        c = await connect(port)
        await c.reply()
        await c.stream.send_all(b"EHLO me.test\r\n")
        await c.reply()
        await c.stream.send_all(ENVELOPE)
        await c.replies_n(3)
        await c.stream.send_all(b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@x>\r\n")
        with pytest.raises(trio.TooSlowError):  # no reply before the end of data
            await c.reply(timeout=0.3)
        await c.stream.send_all(b"more\r\n.\r\n")
        reply = await c.reply()
        assert reply is not None and reply.code == 554
        assert await c.reply() is None  # and the session ends
    assert mta.messages == []
    assert not any(b"evil" in cmd for cmd in mta.commands)


async def test_bare_lf_in_message_normalized_by_default() -> None:
    mta = FakeMTA()
    async with running(mta) as (port, _):
        c = await connect(port)
        await c.stream.send_all(b"EHLO me.test\r\n" + ENVELOPE)
        await c.replies_n(5)
        await c.stream.send_all(b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@x>\r\n.\r\n")
        reply = await c.reply()
        assert reply is not None and reply.code == 250
    assert mta.messages == [b"Subject: x\r\n\r\nhello\r\n..\r\nMAIL FROM:<evil@x>\r\n"]


async def test_bdat_relayed_by_length() -> None:
    mta = FakeMTA(banner_delay=0.1)
    body = b"Subject: b\r\n\r\n.\r\nnot an end\r\n"
    async with running(mta) as (port, _):
        c = await connect(port)
        cmds = b"EHLO me.test\r\nMAIL FROM:<a@src.test>\r\nRCPT TO:<b@dest.test>\r\n"
        await c.stream.send_all(cmds + b"BDAT %d LAST\r\n" % len(body) + body)
        replies = await c.replies_n(5)
        assert [r.code for r in replies] == [220, 250, 250, 250, 250]
    assert mta.messages == [body]


async def test_xclient_identity_sent_after_banner_before_anything_else() -> None:
    mta = FakeMTA(proxy_protocol=False, script={"XCLIENT": b"220 fake.test ESMTP\r\n"})
    up = {"client_identity": "xclient"}
    async with running(mta, upstream=up) as (port, _):
        c = await connect(port)
        await c.stream.send_all(b"EHLO me.test\r\nQUIT\r\n")
        assert [r.code for r in await c.replies_n(3)] == [220, 250, 221]
    assert mta.commands[0].startswith(b"XCLIENT ADDR=127.0.0.1 PORT=")
    assert b" NAME=" in mta.commands[0]
    assert mta.commands[1:] == [b"EHLO me.test\r\n", b"QUIT\r\n"]
    assert mta.violations == []


async def test_xclient_refused_gives_client_421() -> None:
    mta = FakeMTA(proxy_protocol=False, script={"XCLIENT": b"550 5.7.0 not authorized\r\n"})
    async with running(mta, upstream={"client_identity": "xclient"}) as (port, _):
        c = await connect(port)
        reply = await c.reply()
        assert reply is not None and reply.code == 421
        assert await c.reply() is None


async def test_upstream_down_gives_421() -> None:
    mta = FakeMTA()  # a live MTA, but not the configured one: it must see nothing
    async with trio.open_nursery() as nursery:
        await nursery.start(mta.serve)
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        dead_port = listener.socket.getsockname()[1]
        await listener.aclose()  # nothing listens there now
        metrics = Metrics()
        bound = await nursery.start(serve, make_config(dead_port), metrics)
        c = Client(await trio.open_tcp_stream("127.0.0.1", bound[0][1]))
        async with c.stream:
            reply = await c.reply()
            assert reply is not None and reply.code == 421
            assert reply.lines[0].startswith(b"4.4.2 Upstream MTA unavailable (connect failed")
            assert await c.reply() is None
        down = {"listener": "plain", "outcome": "upstream-down"}
        with trio.fail_after(5):  # the session is counted once it has closed the client
            while sample(metrics, "sessions_total", **down) != 1:  # noqa: ASYNC110
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert mta.connections == 0


async def test_connection_limit_per_client() -> None:
    mta = FakeMTA()
    async with running(mta, limits={"max_sessions_per_client": 1}) as (port, metrics):
        first = await connect(port)
        assert (await first.reply()) is not None
        second = await connect(port)
        reply = await second.reply()
        assert reply is not None and reply.code == 421 and b"Too many" in reply.lines[0]
    assert sample(metrics, "sessions_total", listener="plain", outcome="too-many") == 1


async def test_forwarded_early_input_in_pieces_reaches_mta_once() -> None:
    mta = FakeMTA(banner_delay=0.3)
    pc = {"advertise_hosts": [], "unadvertised_early_input": "forward"}
    async with running(mta, pipe_connect=pc) as (port, _):
        c = await connect(port)
        await c.stream.send_all(b"EHLO me.te")
        await trio.sleep(0.05)
        await c.stream.send_all(b"st\r\nRSET\r\n")
        await trio.sleep(0.05)
        await c.stream.send_all(b"QUIT\r\n")
        assert [r.code for r in await c.replies_n(4)] == [220, 250, 250, 221]
    assert mta.commands == [b"EHLO me.test\r\n", b"RSET\r\n", b"QUIT\r\n"]


@pytest.mark.parametrize(
    "line",
    [b"XCLIENT ADDR=10.0.0.1", b"XCLIENT\tADDR=10.0.0.1", b" XCLIENT ADDR=10.0.0.1", b"DATA\t"],
    ids=repr,
)
async def test_forward_never_passes_proxy_only_commands(line: bytes) -> None:
    mta = FakeMTA(banner_delay=0.3)
    pc = {"advertise_hosts": [], "unadvertised_early_input": "forward"}
    async with running(mta, pipe_connect=pc) as (port, metrics):
        c = await connect(port)
        await c.stream.send_all(b"EHLO me.test\r\n" + line + b"\r\n")
        reply = await c.reply()
        assert reply is not None and reply.code == 421
        await trio.sleep(0.4)
    assert bytes(mta.received) == b"" and mta.early_input == []
    assert sample(metrics, "early_input_refused_total", action="defer") == 1


async def test_proxy_v1_identity() -> None:
    mta = FakeMTA(banner_delay=0.1)
    async with running(mta, upstream={"client_identity": "proxy-v1"}) as (port, _):
        c = await connect(port)
        await c.stream.send_all(b"EHLO me.test\r\nQUIT\r\n")
        assert [r.code for r in await c.replies_n(3)] == [220, 250, 221]
    assert mta.proxy_sources and mta.proxy_sources[0][0] == "127.0.0.1"
    assert mta.violations == []


async def test_message_reply_not_held_behind_a_slow_quit() -> None:
    """QUIT pipelined behind the message: the 250 reaches the client although the MTA has
    not answered QUIT (native Exim takes 200 ms over it; found by test_exim_matrix)."""
    mta = FakeMTA(script={"QUIT": STALL})
    async with running(mta) as (port, _):
        c = await connect(port)
        await c.stream.send_all(b"EHLO me.test\r\n" + ENVELOPE)
        assert [r.code for r in await c.replies_n(5)] == [220, 250, 250, 250, 354]
        await c.stream.send_all(MESSAGE + b".\r\nQUIT\r\n")
        final = await c.reply(timeout=2)
        assert final is not None and final.code == 250
    assert mta.messages == [MESSAGE]


async def test_quit_closes_at_once_without_waiting_for_the_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After the 221 the proxy closes, as Postfix does: it does not sit out the lingering
    drain (30 s here) waiting for a client that keeps its side open."""
    caplog.set_level(logging.INFO, logger="pipeconnect.session")
    async with running(FakeMTA(), timeouts={"early_drain": 30}) as (port, _):
        c = await connect(port)
        await c.stream.send_all(b"EHLO me.test\r\nQUIT\r\n")
        assert [r.code for r in await c.replies_n(3)] == [220, 250, 221]
        assert await c.reply(5) is None  # EOF from the proxy, our side still open
        await trio.testing.wait_all_tasks_blocked()  # the session has ended and logged
        assert any("outcome=quit" in r.getMessage() for r in caplog.records)


async def test_a_failing_session_leaves_the_others_be(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error in one session (a bug) is logged and counted; the listener and
    the next sessions carry on."""
    from proxy.machine.session import SessionMachine

    real = SessionMachine._begin_relay
    calls = 0

    def flaky(self: SessionMachine) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected")
        real(self)

    monkeypatch.setattr(SessionMachine, "_begin_relay", flaky)
    mta = FakeMTA()
    async with running(mta) as (port, metrics):
        first = await connect(port)
        with trio.fail_after(5):  # closed by the failure
            while await first.reply() is not None:
                pass
        second = await connect(port)
        await second.stream.send_all(b"EHLO me.test\r\n" + ENVELOPE)
        assert [r.code for r in await second.replies_n(5)] == [220, 250, 250, 250, 354]
    assert sample(metrics, "session_errors_total") == 1


@pytest.mark.parametrize(
    "early",
    [
        b"RSET " + b"a" * 600 + b"\r\n",  # over max_command_line: the relay would not send it
        b"BDAT 5\r\nRSET\r\n",  # a chunk is not lines
        b"NOOP\r\nRSET\r\n",  # input behind a sync point
        b"DATA\r\nSubject: x\r\n",
    ],
    ids=["too-long", "bdat", "after-noop", "after-data"],
)
async def test_forward_passes_only_what_the_relay_sends_as_is(early: bytes) -> None:
    """Found by review: a forwarded line the relay then answered itself made the byte-count
    skip eat the next command, so the MTA read a line's tail as a command of its own."""
    mta = FakeMTA(banner_delay=0.3)
    pc = {"advertise_hosts": [], "unadvertised_early_input": "forward"}
    async with running(mta, pipe_connect=pc) as (port, metrics):
        c = await connect(port)
        await c.stream.send_all(b"EHLO me.test\r\n" + early)
        reply = await c.reply()
        assert reply is not None and reply.code == 421
        await trio.sleep(0.4)
    assert mta.early_input == []
    assert sample(metrics, "early_input_refused_total", action="defer") == 1


@pytest.mark.parametrize(("policy", "code"), [("defer", 421), ("reject", 554), ("accept", 250)])
async def test_unadvertised_group_behind_ehlo_gets_the_early_input_policy(
    policy: str, code: int
) -> None:
    """A host not offered early pipelining (a stale cache) whose EHLO + group arrives just
    after the banner: its early-input policy (421 by default, so it defers and re-learns),
    not the 554 of a sync violation, which would bounce the message."""
    mta = FakeMTA()
    pc = {"advertise_hosts": [], "unadvertised_early_input": policy}
    async with running(mta, pipe_connect=pc) as (port, metrics):
        c = await connect(port)
        assert [r.code for r in await c.replies_n(1)] == [220]
        await c.stream.send_all(b"EHLO me.test\r\n" + ENVELOPE)
        reply = await c.reply()
        assert reply is not None and reply.code == code
        if policy != "accept":
            assert b"synchronization" in reply.lines[0]
            assert sample(metrics, "early_input_refused_total", action=policy) == 1
            assert not any(cmd.startswith(b"MAIL") for cmd in mta.commands)


async def test_every_outcome_is_exported_at_zero_from_the_start() -> None:
    """rate() sees no increase in a series born at its first value: each listener's
    sessions_total series for every outcome exists before any session ends."""
    from prometheus_client import generate_latest

    from proxy.outcomes import ENDED

    async with running(FakeMTA()) as (_, metrics):
        text = generate_latest(metrics.registry).decode()
    for outcome in ENDED:
        assert f'sessions_total{{listener="plain",outcome="{outcome}"}} 0.0' in text, outcome


def test_log_line_escapes_what_a_peer_chose() -> None:
    """The HELO name cannot forge the client address; the quoted detail (MTA reply text)
    cannot end its quotes or the line, and stays readable."""
    from proxy.session import SessionLog

    log = SessionLog("plain", ("192.0.2.7", 4000), "127.0.0.1:2525")
    log.helo = "x) [10.9.9.9]:1 I=plain"
    log.detail = 'MTA: 421 4.3.2 "bye" (now)\nH=(evil) [10.9.9.9]'
    line = log.render("text")
    assert "\n" not in line
    assert line.startswith(r"H=(x\x29\x20[10.9.9.9]:1\x20I=plain) [192.0.2.7]:4000 ")
    assert r'detail="MTA: 421 4.3.2 \x22bye\x22 (now)\x0aH=(evil) [10.9.9.9]"' in line


async def test_xclient_lookup_outlasting_the_connect_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client-name lookup for XCLIENT runs after the connect: a deadline left from the
    connect (1 s) must not cut it. The lookup takes 1 s, the banner 0.6 s."""
    import proxy.session

    async def slow_name(addr: str, timeout: float = 5.0) -> str:
        await trio.sleep(1.0)
        return "[UNAVAILABLE]"

    monkeypatch.setattr(proxy.session, "client_name", slow_name)
    xclient_ok = {"XCLIENT": b"220 fake.test ESMTP\r\n"}
    mta = FakeMTA(proxy_protocol=False, banner_delay=0.6, script=xclient_ok)
    upstream = {"client_identity": "xclient", "connect_timeout": 1}
    async with running(mta, upstream=upstream) as (port, metrics):
        c = await connect(port)
        await c.stream.send_all(b"QUIT\r\n")
        assert [r.code for r in await c.replies_n(2)] == [220, 221]
        assert await c.reply() is None
    assert sample(metrics, "sessions_total", listener="plain", outcome="quit") == 1
    assert mta.commands[0].startswith(b"XCLIENT ADDR=127.0.0.1 ")
