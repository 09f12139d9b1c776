"""The session machine alone: every scenario of tests/test_session.py (and more) as bytes in,
exact bytes to the MTA and exact writes to the client. No sockets, no trio, no sleeps: the
harness (tests/machine_harness.py) keeps the clock and plays a scripted MTA."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.machine.events import (
    CloseClient,
    CloseUpstream,
    ConnectUpstream,
    ResolveClientName,
    SendClient,
    SendUpstream,
    Shutdown,
    Side,
    StartTls,
    TlsFailed,
    UpstreamConnectFailed,
)
from proxy.machine.session import Phase
from proxy.proxyproto import encode_v1, encode_v2, tls_tlv
from tests.machine_harness import (
    AUTH_CANCELLED,
    CLIENT,
    CLOSE,
    LOCAL,
    STALL,
    Harness,
    MtaModel,
    make_config,
    verdict_text,
)

EHLO = b"EHLO me.test\r\n"
MAIL = b"MAIL FROM:<a@src.test>\r\n"
RCPT = b"RCPT TO:<b@dest.test>\r\n"
DATA = b"DATA\r\n"
ENVELOPE = MAIL + RCPT + DATA
MESSAGE = b"Subject: t\r\n\r\nline one\r\n..dot stuffed\r\n"
QUIT = b"QUIT\r\n"

BANNER = b"220 fake.test ESMTP\r\n"
MAIL_OK = b"250 2.1.0 Ok\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
OK = b"250 2.0.0 Ok\r\n"
BYE = b"221 2.0.0 Bye\r\n"
QUEUED = verdict_text(1)


def ehlo_out(*, early: bool = True, starttls: bool = False) -> bytes:
    """The fake MTA's EHLO reply as the client must see it: PIPELINING first, then the
    early-pipelining keywords (if advertised), STARTTLS and XCLIENT gone (STARTTLS at the
    end when the proxy offers its own)."""
    kws = [b"PIPELINING"]
    if early:
        kws += [b"PIPECONNECT", b"PIPE_CONNECT", b"X_PIPE_CONNECT"]
    lines = [b"fake.test", *kws, b"SIZE 1000000", b"8BITMIME", b"CHUNKING", b"ENHANCEDSTATUSCODES"]
    if starttls:
        lines.append(b"STARTTLS")
    return b"".join(
        b"250" + (b" " if i == len(lines) - 1 else b"-") + ln + b"\r\n"
        for i, ln in enumerate(lines)
    )


EHLO_OUT = ehlo_out()
PROXY_V2 = encode_v2(CLIENT, LOCAL)
UNAVAILABLE = b"421 4.4.2 Upstream MTA unavailable (%s), try again later\r\n"
DEFER = b"421 4.5.0 SMTP synchronization error: input before the greeting, try again later\r\n"
REJECT = b"554 SMTP synchronization error\r\n"
SHUTTING_DOWN = b"421 4.3.2 Service shutting down, closing transmission channel\r\n"


def harness(mta: MtaModel | None = None, **sections: dict[str, Any]) -> Harness:
    return Harness(mta or MtaModel(), config=make_config(**sections))


def unadvertised(policy: str) -> dict[str, Any]:
    return {"advertise_hosts": [], "unadvertised_early_input": policy}


def lockstep(h: Harness, *lines: bytes) -> None:
    """The client sends each line after the reply to the one before."""
    for line in lines:
        h.client(line)


# ---------------------------------------------------------------- early pipelining


def test_early_pipelining_replayed_in_one_write() -> None:
    h = harness()
    h.start(banner=False)
    assert isinstance(h.actions[0], ConnectUpstream) and h.header == PROXY_V2
    h.client(EHLO + ENVELOPE)
    assert h.writes == [] and h.sent == [] and h.mta.received == b""  # held until the banner
    h.banner()
    # banner + EHLO reply (rewritten) + MAIL/RCPT/354 replies: exactly one write
    assert h.writes == [BANNER + EHLO_OUT + MAIL_OK + RCPT_OK + GO_AHEAD]
    assert h.sent == [EHLO, ENVELOPE]  # EHLO alone, then the group (the MTA has PIPELINING)
    assert h.machine.phase is Phase.DATA
    h.client(MESSAGE + b".\r\n" + QUIT)
    assert h.writes[1:] == [QUEUED, BYE]  # the verdict does not wait for the QUIT reply
    assert h.sent[2:] == [MESSAGE + b".\r\n", QUIT]
    assert h.mta.messages == [MESSAGE] and h.mta.violations == [] and h.mta.early_input == b""
    assert h.done and h.outcome == "quit" and h.client_closes == [CloseClient(linger=False)]
    log = h.machine.log
    assert (log.l_field, log.early_used, log.advertised) == ("L*", True, True)
    assert (log.replayed, log.round_trips_saved, log.commands) == (4, 2, 5)
    assert (log.messages, log.rcpts, log.bytes_in, log.helo) == (1, 1, len(MESSAGE), "me.test")
    assert log.early_bytes == len(EHLO + ENVELOPE)
    assert h.counters.names() == ["advertised", "message"]
    assert ("message_bytes", len(MESSAGE)) in h.counters.calls


def test_no_pipelining_upstream_gets_one_command_at_a_time() -> None:
    h = harness(MtaModel(pipelining=False))
    h.start(banner=False)
    h.client(EHLO + ENVELOPE)
    h.banner()
    assert h.writes == [BANNER + EHLO_OUT + MAIL_OK + RCPT_OK + GO_AHEAD]
    assert h.sent == [EHLO, MAIL, RCPT, DATA]  # one command per reply
    # (RSET, not NOOP: a client must wait for NOOP's reply, RFC 2920 3.1)
    h.client(MESSAGE + b".\r\nRSET\r\nRSET\r\n" + QUIT)
    assert h.writes[1:] == [QUEUED, OK + OK + BYE]
    assert h.sent[4:] == [MESSAGE + b".\r\n", b"RSET\r\n", b"RSET\r\n", QUIT]
    assert h.mta.violations == [] and h.mta.messages == [MESSAGE]


def test_the_model_flags_a_group_sent_without_pipelining() -> None:
    """The check behind the test above can fail: the same group to an MTA without
    PIPELINING, written at once, is a violation."""
    mta = MtaModel(pipelining=False)
    mta.connect(b"")
    mta.send_banner()
    mta.take()
    mta.receive(EHLO)
    mta.take()
    mta.receive(MAIL + RCPT)
    assert mta.violations == [f"{RCPT!r} pipelined without PIPELINING"]


def test_nothing_but_the_header_reaches_the_mta_before_its_banner() -> None:
    h = harness()
    h.start(banner=False)
    h.client(EHLO)
    h.client(ENVELOPE)
    h.client(MESSAGE)  # behind DATA: a sync violation, but nothing is judged before the banner
    assert h.header == PROXY_V2 and h.sent == [] and h.writes == []
    assert h.machine.wants_upstream and h.machine.wants_client


def test_early_input_arriving_before_the_connect_is_held_too() -> None:
    h = harness()
    h.start(connect=False)
    assert isinstance(h.pending, ConnectUpstream)
    assert h.machine.wants_client and not h.machine.wants_upstream
    h.client(EHLO + ENVELOPE)
    h.pump()  # the connect completes
    assert h.sent == [] and h.machine.wants_upstream
    h.banner()
    assert h.writes == [BANNER + EHLO_OUT + MAIL_OK + RCPT_OK + GO_AHEAD]


def test_early_input_is_bounded_by_max_early_bytes() -> None:
    h = harness(pipe_connect={"max_early_bytes": 32})
    h.start(banner=False)
    assert h.machine.read_size == 32
    h.client(EHLO)
    assert h.machine.read_size == 32 - len(EHLO)
    h.client(b"RSET\r\nRSET\r\nRSET\r\n")
    assert h.machine.read_size == 0 and not h.machine.wants_client
    assert h.machine.wants_upstream  # only the banner now


def test_group_behind_first_ehlo_just_after_the_banner_counts_as_early() -> None:
    """EHLO + group sent without waiting, arriving after the banner left (a fast MTA)."""
    h = harness()
    h.start()
    assert h.writes == [BANNER]
    h.client(EHLO + MAIL)
    assert h.writes[1:] == [EHLO_OUT + MAIL_OK]
    log = h.machine.log
    assert (log.l_field, log.round_trips_saved, log.replayed) == ("L*", 2, 2)


def test_lockstep_client_is_advertised_not_used() -> None:
    h = harness()
    h.start()
    lockstep(h, EHLO, QUIT)
    assert h.writes == [BANNER, EHLO_OUT, BYE] and h.sent == [EHLO, QUIT]
    log = h.machine.log
    assert (log.l_field, log.round_trips_saved, log.replayed) == ("L.", 0, 0)
    assert log.render("text").split()[4] == "L."


# ---------------------------------------------------------------- unadvertised hosts


@pytest.mark.parametrize(("action", "reply"), [("defer", DEFER), ("reject", REJECT)])
def test_early_input_from_unadvertised_host_refused(action: str, reply: bytes) -> None:
    pc = {"advertise_hosts": ["!192.0.2.7", "*"], "unadvertised_early_input": action}
    h = harness(pipe_connect=pc)
    h.start(banner=False)
    h.client(EHLO + ENVELOPE)
    assert h.writes == [reply] and h.done and h.outcome == "sync-error"
    assert h.actions[-3:] == [CloseUpstream(), SendClient(reply), CloseClient()]
    assert h.sent == [] and h.mta.received == b""
    assert h.counters.calls == [("early_refused", action)]
    assert h.machine.log.detail == f"early input refused ({action})"


def test_early_input_refused_before_the_connect_completes() -> None:
    h = harness(pipe_connect=unadvertised("defer"))
    h.start(connect=False)
    h.client(EHLO)
    assert h.writes == [DEFER] and h.done
    assert CloseUpstream() not in h.actions  # never connected


def test_early_input_forwarded_to_judge() -> None:
    h = harness(pipe_connect=unadvertised("forward"))
    h.start(banner=False)
    h.client(EHLO + QUIT)
    assert h.sent == [EHLO + QUIT]  # right behind the header, before the banner
    h.banner()
    # (a QUIT's reply waits for nothing: what is queued before it leaves first)
    assert h.writes == [BANNER + ehlo_out(early=False), BYE]
    assert h.mta.early_input == EHLO + QUIT
    assert h.mta.commands == [EHLO, QUIT] and h.to_mta == EHLO + QUIT  # each byte once
    assert h.machine.log.detail == "early input forwarded" and h.outcome == "quit"


def test_forward_before_the_connect_goes_right_behind_the_header() -> None:
    h = harness(pipe_connect=unadvertised("forward"))
    h.start(connect=False)
    h.client(EHLO, pump=False)
    assert h.sent == []
    h.pump()
    assert h.sent == [EHLO] and h.mta.header == PROXY_V2


def test_forwarded_early_input_in_pieces_reaches_mta_once() -> None:
    h = harness(pipe_connect=unadvertised("forward"))
    h.start(banner=False)
    h.client(b"EHLO me.te")
    assert h.sent == []  # only whole lines are forwarded
    h.client(b"st\r\nRSET\r\n")
    h.client(QUIT)
    assert h.sent == [EHLO + b"RSET\r\n", QUIT]
    h.banner()
    assert h.codes == [220, 250, 250, 221]
    assert h.mta.commands == [EHLO, b"RSET\r\n", QUIT] and h.to_mta == EHLO + b"RSET\r\n" + QUIT


@pytest.mark.parametrize(
    "line",
    [b"XCLIENT ADDR=10.0.0.1", b"XCLIENT\tADDR=10.0.0.1", b" XCLIENT ADDR=10.0.0.1", b"DATA\t"],
    ids=repr,
)
def test_forward_never_passes_proxy_only_commands(line: bytes) -> None:
    h = harness(pipe_connect=unadvertised("forward"))
    h.start(banner=False)
    h.client(EHLO + line + b"\r\n")
    assert h.writes == [DEFER] and h.sent == [] and h.mta.received == b""
    assert h.counters.calls == [("early_refused", "defer")]


@pytest.mark.parametrize(
    "early",
    [
        b"RSET " + b"a" * 600 + b"\r\n",
        b"BDAT 5\r\nRSET\r\n",
        b"NOOP\r\nRSET\r\n",
        DATA + b"Subj\r\n",
    ],
    ids=["too-long", "bdat", "after-noop", "after-data"],
)
def test_forward_passes_only_what_the_relay_sends_as_is(early: bytes) -> None:
    h = harness(pipe_connect=unadvertised("forward"))
    h.start(banner=False)
    h.client(EHLO + early)
    assert h.writes == [DEFER] and h.mta.received == b""


def test_forward_already_passed_lines_stay_passed_when_a_later_line_is_refused() -> None:
    h = harness(pipe_connect=unadvertised("forward"))
    h.start(banner=False)
    h.client(EHLO)
    h.client(b"XFORWARD NAME=x\r\n")
    assert h.sent == [EHLO] and h.writes == [DEFER] and h.done
    assert h.actions[-3:] == [CloseUpstream(), SendClient(DEFER), CloseClient()]


@pytest.mark.parametrize(
    ("upstream", "upstream_tls"), [({"client_identity": "xclient"}, False), ({}, True)]
)
def test_forward_acts_as_defer_where_bytes_cannot_go_first(
    upstream: dict[str, Any], upstream_tls: bool
) -> None:
    cfg = make_config(pipe_connect=unadvertised("forward"), upstream=upstream)
    h = Harness(MtaModel(), config=cfg, upstream_tls=upstream_tls)
    assert h.machine.policy == "defer"
    h.start(banner=False)
    h.client(EHLO)
    assert h.writes == [DEFER] and h.sent == []


def test_early_input_accepted_without_advertising() -> None:
    h = harness(MtaModel(pipelining=False), pipe_connect=unadvertised("accept"))
    h.start(banner=False)
    h.client(EHLO + QUIT)
    h.banner()
    assert h.writes == [BANNER + ehlo_out(early=False), BYE]
    assert h.sent == [EHLO, QUIT] and h.mta.violations == []
    # accepted early input is used (it saved the wait for the banner), never advertised
    log = h.machine.log
    assert (log.l_field, log.advertised, log.round_trips_saved) == ("L*", False, 1)
    assert h.counters.names() == []


@pytest.mark.parametrize(
    ("policy", "reply"), [("defer", DEFER), ("reject", REJECT), ("accept", None)]
)
def test_unadvertised_group_behind_ehlo_gets_the_early_input_policy(
    policy: str, reply: bytes | None
) -> None:
    h = harness(pipe_connect=unadvertised(policy))
    h.start()
    h.client(EHLO + ENVELOPE)
    if reply is None:
        assert h.writes == [BANNER, ehlo_out(early=False) + MAIL_OK + RCPT_OK + GO_AHEAD]
        assert h.sent == [EHLO, ENVELOPE]
    else:
        assert h.writes == [BANNER, reply] and h.outcome == "sync-error"
        assert h.sent == []  # not even the EHLO
        assert h.counters.calls == [("early_refused", policy)]


# ---------------------------------------------------------------- sync points


@pytest.mark.parametrize("verb", ["HELO", "NOOP", "VRFY"])
def test_input_behind_a_sync_point_is_a_violation(verb: str) -> None:
    h = harness()
    h.start()
    h.client(EHLO)
    h.client(MAIL + verb.encode() + b" x\r\nRSET\r\n")
    error = b"554 5.5.0 SMTP synchronization error: input sent before the reply to %s\r\n"
    # the commands before it are answered; it and what follows are not executed
    assert h.writes[2:] == [MAIL_OK + error % verb.encode()]
    assert h.sent == [EHLO, MAIL] and h.done and h.outcome == "sync-violation"
    assert h.counters.calls[-1] == ("sync_violation", verb)
    assert h.machine.log.detail == f"input pipelined after {verb}"


def test_message_sent_behind_data_is_a_violation() -> None:
    h = harness()
    h.start()
    lockstep(h, EHLO, MAIL, RCPT)
    h.client(DATA + MESSAGE + b".\r\n")
    assert h.writes[-1] == (
        b"554 5.5.0 SMTP synchronization error: input sent before the reply to DATA\r\n"
    )
    assert h.sent == [EHLO, MAIL, RCPT] and h.mta.messages == []


def test_a_sync_point_alone_in_its_read_is_fine() -> None:
    h = harness()
    h.start()
    lockstep(h, EHLO, b"NOOP\r\n", b"HELO again\r\n", QUIT)
    assert h.codes == [220, 250, 250, 250, 221] and h.outcome == "quit"


# ---------------------------------------------------------------- banners and identities


def test_error_banner_421_relayed_and_session_ends() -> None:
    h = harness(MtaModel(banner=b"421 4.3.2 busy\r\n"))
    h.start()
    assert h.writes == [b"421 4.3.2 busy\r\n"] and h.done and h.outcome == "upstream-421"
    assert h.client_closes == [CloseClient(linger=True)]
    assert h.machine.log.detail == "MTA: 421 4.3.2 busy"


def test_error_banner_554_then_hang_up_gives_421_never_an_mta_reply() -> None:
    h = harness(MtaModel(banner=b"554 5.7.1 go away\r\n"))
    h.start()
    assert h.writes == [b"554 5.7.1 go away\r\n"] and not h.done
    assert h.machine.log.detail == "banner 554"
    h.client(EHLO)
    assert h.writes[1:] == [UNAVAILABLE % b"connection closed awaiting EHLO"]
    assert h.done and h.outcome == "upstream-lost"


def test_proxy_v1_identity() -> None:
    h = harness(upstream={"client_identity": "proxy-v1"})
    h.start()
    assert h.header == encode_v1(CLIENT, LOCAL) == b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n"


def test_no_identity() -> None:
    h = harness(upstream={"client_identity": "none"})
    h.start()
    assert h.header == b"" and h.writes == [BANNER]


def test_ipv4_mapped_client_is_unmapped() -> None:
    h = Harness(MtaModel(), client_address=("::ffff:192.0.2.7", 40000))
    h.start()
    assert h.header == PROXY_V2 and h.machine.log.client == CLIENT


def test_xclient_identity_sent_after_banner_before_anything_else() -> None:
    mta = MtaModel(replies={"XCLIENT": b"220 after.xclient ESMTP\r\n"})
    h = harness(mta, upstream={"client_identity": "xclient"})
    h.start(banner=False)
    assert h.header == b""
    h.client(EHLO + QUIT)
    assert h.sent == []
    h.mta.send_banner()
    h.pump(connect=False)
    assert h.pending is None  # the lookup was answered by pump
    assert ResolveClientName("192.0.2.7") in h.actions
    # the client sees the MTA's first banner; the XCLIENT's 220 is the proxy's
    assert h.writes == [BANNER + EHLO_OUT, BYE]
    assert h.sent == [b"XCLIENT ADDR=192.0.2.7 PORT=40000 NAME=client.test\r\n", EHLO, QUIT]
    assert h.mta.violations == [] and h.mta.early_input == b""


def test_xclient_refused_gives_client_421() -> None:
    mta = MtaModel(replies={"XCLIENT": b"550 5.7.0 not authorized\r\n"})
    h = harness(mta, upstream={"client_identity": "xclient"})
    h.start()
    assert h.writes == [UNAVAILABLE % b"XCLIENT refused: 550 5.7.0 not authorized"]
    assert h.done and h.outcome == "upstream-xclient" and CloseUpstream() in h.actions


def test_upstream_down_gives_421() -> None:
    h = harness()
    h.start(connect=False)
    h.pending = None
    h.feed(UpstreamConnectFailed("Connection refused"))
    assert h.writes == [UNAVAILABLE % b"connect failed: Connection refused"]
    assert h.done and h.outcome == "upstream-down" and h.upstream_closes == 0
    assert h.mta.connected is False


def test_connect_timeout_gives_421() -> None:
    h = harness(upstream={"connect_timeout": 3})
    h.start(connect=False)
    assert h.machine.deadline == h.now + 3
    h.pending = None
    h.timeout()
    assert h.writes == [UNAVAILABLE % b"connect timed out after 3s"]
    assert h.outcome == "upstream-down"


def test_implicit_tls_first_then_the_connect_with_the_tls_tlv() -> None:
    h = Harness(MtaModel(), implicit_tls=True)
    actions = h.machine.start(h.now)
    assert actions == [StartTls(Side.CLIENT)] and h.machine.phase is Phase.TLS_ON_CONNECT
    h._record(actions)
    h.pump(connect=False)  # the handshake completes; the connect is now pending
    assert isinstance(h.pending, ConnectUpstream)
    assert h.header == encode_v2(CLIENT, LOCAL, [tls_tlv("TLSv1.3", "TLS_AES_128_GCM_SHA256")])
    h.pump()
    h.banner()
    assert h.writes == [BANNER] and h.machine.log.tls == "TLSv1.3"


def test_implicit_tls_failure_ends_without_a_reply() -> None:
    h = Harness(MtaModel(), implicit_tls=True)
    h._record(h.machine.start(h.now))
    h.pending = None
    h.feed(TlsFailed(Side.CLIENT, "bad record"))
    assert h.writes == [] and h.done and h.outcome == "tls-failed"
    assert not any(isinstance(a, ConnectUpstream) for a in h.actions)


def test_implicit_tls_timeout() -> None:
    h = Harness(MtaModel(), implicit_tls=True, config=make_config(timeouts={"command": 7}))
    h._record(h.machine.start(h.now))
    assert h.machine.deadline == h.now + 7
    h.pending = None
    h.timeout()
    assert h.writes == [] and h.outcome == "tls-timeout"


def test_upstream_starttls_before_the_relay() -> None:
    h = Harness(MtaModel(), upstream_tls=True)
    h.start(banner=False)
    h.client(EHLO)
    h.mta.send_banner()
    h.pump()
    assert h.sent == [b"EHLO proxy.test\r\n", b"STARTTLS\r\n", EHLO]
    assert h.tls_starts == [StartTls(Side.UPSTREAM, server_name=None)]
    assert h.writes == [BANNER + EHLO_OUT] and h.machine.log.upstream_tls == "TLSv1.3"


def test_upstream_starttls_forgets_the_cleartext_capabilities() -> None:
    """RFC 3207: what the MTA offered before TLS is void after it. A client that sends
    MAIL and DATA without EHLO must not be pipelined on the proxy's cleartext EHLO."""
    h = Harness(MtaModel(), upstream_tls=True)
    h.start()
    assert h.machine.mta.capabilities == {}
    h.client(MAIL + RCPT)
    assert h.sent[-2:] == [MAIL, RCPT]  # one per reply: PIPELINING is not known over TLS


def test_upstream_without_starttls_fails() -> None:
    h = Harness(MtaModel(ehlo=b"250-fake.test\r\n250 PIPELINING\r\n"), upstream_tls=True)
    h.start()
    assert h.writes == [UNAVAILABLE % b"MTA does not offer STARTTLS (250)"]
    assert h.outcome == "upstream-tls"


# ---------------------------------------------------------------- the session log


def test_json_log_line() -> None:
    h = harness(log={"format": "json"})
    h.start(banner=False)
    h.client(EHLO + ENVELOPE)
    h.banner()
    h.client(MESSAGE + b".\r\n" + QUIT)
    record = json.loads(h.machine.log.render("json"))
    assert record["L"] == "L*" and record["outcome"] == "quit" and record["helo"] == "me.test"
    assert record["messages"] == 1 and record["rcpts"] == 1 and record["round_trips_saved"] == 2
    assert record["bytes"] == len(MESSAGE) and record["early_bytes"] == 14 + len(ENVELOPE)
    assert (
        record["replayed"] == 4
        and record["commands"] == 5
        and record["client"] == ("192.0.2.7:40000")
    )


def test_refused_rcpt_is_not_counted() -> None:
    mta = MtaModel(replies={"RCPT": b"550 5.1.1 no such user\r\n"})
    h = harness(mta)
    h.start()
    lockstep(h, EHLO, MAIL, RCPT, QUIT)
    assert h.machine.log.rcpts == 0 and h.codes == [220, 250, 250, 550, 221]


# ---------------------------------------------------------------- the MTA fails


def test_mta_closing_mid_data_gives_4xx_never_250() -> None:
    h = harness(MtaModel(eod=CLOSE))
    h.start()
    lockstep(h, EHLO, ENVELOPE)
    h.client(MESSAGE + b".\r\n")
    assert h.writes[-1] == UNAVAILABLE % b"connection closed awaiting end of data reply"
    assert b"queued" not in h.to_client and h.outcome == "upstream-lost"
    assert h.machine.log.messages == 0


def test_mta_stalls_then_client_gets_421() -> None:
    h = harness(MtaModel(replies={"MAIL": STALL}), timeouts={"mail": 0.3})
    h.start()
    h.client(EHLO)
    t0 = h.now
    h.client(MAIL)
    assert h.machine.wants_upstream and h.machine.deadline == t0 + 0.3
    h.timeout()
    assert h.writes[-1] == UNAVAILABLE % b"no MAIL within 0.3s"
    assert h.done and h.outcome == "upstream-timeout" and CloseUpstream() in h.actions


def test_end_of_data_waits_data_term() -> None:
    h = harness(MtaModel(eod=STALL), timeouts={"data_term": 42})
    h.start()
    lockstep(h, EHLO, ENVELOPE)
    h.client(MESSAGE + b".\r\n")
    assert h.machine.deadline == h.now + 42
    h.timeout()
    assert h.writes[-1] == UNAVAILABLE % b"no end of data reply within 42s"


def test_421_from_the_mta_mid_session_is_relayed_and_ends_it() -> None:
    h = harness(MtaModel(replies={"RCPT": b"421 4.3.0 shutting down\r\n"}))
    h.start()
    lockstep(h, EHLO)
    h.client(ENVELOPE)  # a group: the DATA's reply never comes
    assert h.writes[-1] == MAIL_OK + b"421 4.3.0 shutting down\r\n"
    assert h.done and h.outcome == "upstream-421" and h.client_closes == [CloseClient()]
    assert h.machine.log.detail == "MTA: 421 4.3.0 shutting down"


def test_221_to_a_non_quit_ends_the_session() -> None:
    h = harness(MtaModel(replies={"RSET": BYE}))
    h.start()
    lockstep(h, EHLO)
    h.client(b"RSET\r\nMAIL FROM:<x@y>\r\n")
    assert h.writes[-1] == BYE and h.sent[-1] == b"RSET\r\nMAIL FROM:<x@y>\r\n"
    assert h.done and h.outcome == "upstream-221"
    assert h.client_closes == [CloseClient(linger=False)]


def test_junk_from_the_mta_gives_421() -> None:
    h = harness(MtaModel(replies={"MAIL": b"hello there\r\n"}))
    h.start()
    lockstep(h, EHLO, MAIL)
    assert h.writes[-1] == UNAVAILABLE % b"4.4.2 Upstream MTA protocol error: malformed reply line"
    assert h.outcome == "upstream-protocol"


def test_upstream_write_stalls() -> None:
    h = harness()
    h.start()
    lockstep(h, EHLO, ENVELOPE)
    h.client(MESSAGE)
    h.send_timed_out(Side.UPSTREAM)
    assert h.writes[-1] == UNAVAILABLE % b"MTA took no data for 180s"
    assert h.outcome == "upstream-timeout"


# ---------------------------------------------------------------- the client fails


def test_silent_client_times_out() -> None:
    h = harness(timeouts={"command": 0.3})
    h.start()
    assert h.writes == [BANNER] and h.machine.deadline == h.now + 0.3
    h.timeout()
    assert h.writes == [BANNER, b"421 4.4.2 Timeout, closing connection\r\n"]
    assert h.done and h.outcome == "client-timeout"
    assert h.machine.log.detail == "client timeout after 0.3s"


def test_a_trickling_client_does_not_move_the_deadline() -> None:
    h = harness(timeouts={"command": 10})
    h.start()
    deadline = h.machine.deadline
    for byte in b"EHLO":
        h.advance(2)
        h.client(bytes([byte]))
        assert h.machine.deadline == deadline
    h.advance(2)
    h.client(b" me.test\r\n")  # the unit is complete: its reply, then a new deadline
    assert h.machine.deadline == h.now + 10


def test_client_reading_nothing_ends_without_another_write() -> None:
    h = harness()
    h.start()
    h.send_timed_out(Side.CLIENT)
    assert h.writes == [BANNER] and h.done and h.outcome == "client-timeout"
    assert h.machine.log.detail == "client read nothing for 300s"


def test_client_gone_before_the_banner() -> None:
    h = harness()
    h.start(banner=False)
    h.client_eof()
    assert h.done and h.outcome == "client-gone" and h.writes == []
    assert h.upstream_closes == 1


def test_client_closing_after_a_command_sends_quit_upstream() -> None:
    h = harness()
    h.start()
    lockstep(h, EHLO)
    h.client_eof()
    assert h.sent == [EHLO, QUIT] and h.outcome == "client-closed"


def test_client_gone_in_data() -> None:
    h = harness()
    h.start()
    lockstep(h, EHLO, ENVELOPE)
    h.client(MESSAGE)
    h.client_eof()
    assert h.outcome == "client-gone-in-data" and QUIT not in h.sent
    assert h.mta.messages == []


def test_client_broken() -> None:
    h = harness()
    h.start()
    h.client_broken()
    assert h.done and h.outcome == "client-gone"


# ---------------------------------------------------------------- local refusals


@pytest.mark.parametrize("verb", [b"XCLIENT", b"XFORWARD"])
def test_proxy_only_commands_refused_locally(verb: bytes) -> None:
    h = harness()
    h.start()
    h.client(EHLO + verb + b" ADDR=1.2.3.4\r\nSTARTTLS\r\n" + QUIT)
    assert h.writes[1:] == [
        EHLO_OUT
        + b"550 5.7.1 "
        + verb
        + b" not permitted: only the proxy speaks for you\r\n"
        + b"454 4.7.0 TLS not available\r\n",
        BYE,
    ]
    assert h.sent == [EHLO, QUIT] and verb not in h.mta.received


def test_proxy_only_command_inside_a_group_keeps_the_reply_order() -> None:
    h = harness()
    h.start()
    lockstep(h, EHLO)
    h.client(MAIL + b"XFORWARD NAME=x\r\n" + RCPT)
    assert h.writes[-1] == (
        MAIL_OK + b"550 5.7.1 XFORWARD not permitted: only the proxy speaks for you\r\n" + RCPT_OK
    )
    assert h.sent[1:] == [MAIL, RCPT]


def test_proxy_header_from_the_client_is_refused() -> None:
    h = harness()
    h.start()
    h.client(b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n")
    assert h.writes[-1] == b"554 5.7.1 PROXY protocol is not accepted from clients\r\n"
    assert h.outcome == "protocol-error" and h.sent == []


def test_too_many_protocol_errors() -> None:
    h = harness()
    h.start()
    h.client(b"bad\tline\r\n" * 12)
    syntax = b"500 5.5.2 Syntax error: blank, control character or NUL in command line\r\n"
    assert h.writes[1:] == [
        syntax * 10 + b"421 4.7.0 Too many protocol errors, closing connection\r\n"
    ]
    assert h.outcome == "too-many-errors" and h.sent == []


SYNTAX = b"500 5.5.2 Syntax error: blank, control character or NUL in command line\r\n"


def test_an_empty_line_is_answered() -> None:
    h = harness()
    h.start()
    lockstep(h, EHLO, b"\r\n")
    assert h.writes[2:] == [SYNTAX] and h.sent == [EHLO]


def test_an_empty_first_line_waits_for_what_follows() -> None:
    """Decision: a first line that could still begin a PROXY v2 signature ("\\r\\n\\r\\n
    \\x00\\r\\nQUIT\\n") is held until the bytes after it tell, so that the header is
    refused as a whole (554) however it is cut. No SMTP client begins with an empty line;
    one that does gets its 500 with its next line (or the command timeout)."""
    h = harness()
    h.start()
    h.client(b"\r\n")
    assert h.writes[1:] == []
    h.client(QUIT)
    assert h.writes[1:] == [SYNTAX, BYE]  # (QUIT ends its group: what came before leaves first)


def test_over_long_command_line() -> None:
    h = harness()
    h.start()
    h.client(b"MAIL FROM:<" + b"a" * 600)
    assert h.machine.reader.buffered == 0  # dropped as it comes
    h.client(b">\r\n" + QUIT)
    assert h.writes[1:] == [b"500 5.5.2 Line too long\r\n", BYE] and h.sent == [QUIT]


# ---------------------------------------------------------------- STARTTLS


def test_starttls_discards_plaintext_behind_it() -> None:
    h = Harness(MtaModel(), offer_starttls=True)
    h.start()
    h.client(EHLO)
    assert h.writes[1] == ehlo_out(starttls=True)
    h.client(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n")
    assert h.writes[2] == b"220 2.0.0 Ready to start TLS\r\n"
    assert h.tls_starts == [StartTls(Side.CLIENT)]
    assert h.machine.log.detail == "20 plaintext bytes after STARTTLS discarded"
    assert h.machine.client_tls and h.machine.log.tls == "TLSv1.3"
    h.client(EHLO)  # over TLS: no STARTTLS offered again
    h.client(b"STARTTLS\r\n")
    assert h.writes[3:] == [EHLO_OUT, b"454 4.7.0 TLS not available\r\n"]
    assert h.sent == [EHLO, EHLO] and b"evil" not in h.mta.received


def test_starttls_in_a_transaction_resets_the_mta() -> None:
    h = Harness(MtaModel(), offer_starttls=True)
    h.start()
    lockstep(h, EHLO, MAIL)
    h.client(b"STARTTLS\r\n")
    assert h.sent == [EHLO, MAIL, b"RSET\r\n"]
    assert h.writes[3] == b"220 2.0.0 Ready to start TLS\r\n"  # the RSET's 250 is the proxy's
    assert len(h.writes) == 4 and not h.machine.in_transaction


def test_starttls_after_tls_ehlo_group_saves_a_round_trip() -> None:
    h = Harness(MtaModel(), offer_starttls=True)
    h.start()
    lockstep(h, EHLO, b"STARTTLS\r\n")
    h.client(EHLO + MAIL)
    assert h.writes[-1] == EHLO_OUT + MAIL_OK
    log = h.machine.log
    assert (log.l_field, log.round_trips_saved) == ("L*", 1)


def test_client_tls_handshake_failure_after_starttls() -> None:
    h = Harness(MtaModel(), offer_starttls=True)
    h.start()
    h.client(EHLO)
    h.client(b"STARTTLS\r\n", pump=False)
    assert isinstance(h.pending, StartTls)
    h.pending = None
    h.feed(TlsFailed(Side.CLIENT, "no shared cipher"))
    assert h.done and h.outcome == "tls-failed"


# ---------------------------------------------------------------- AUTH


def test_auth_continuations_are_relayed() -> None:
    mta = MtaModel(replies={"AUTH": b"334 VXNlcm5hbWU6\r\n"}, auth=[b"334 UGFzc3dvcmQ6\r\n"])
    h = harness(mta)
    h.start()
    lockstep(h, EHLO, b"AUTH LOGIN\r\n", b"dXNlcg==\r\n", b"cGFzcw==\r\n")
    assert h.writes[2:] == [
        b"334 VXNlcm5hbWU6\r\n",
        b"334 UGFzc3dvcmQ6\r\n",
        b"235 2.7.0 Authentication successful\r\n",
    ]
    assert h.sent[1:] == [b"AUTH LOGIN\r\n", b"dXNlcg==\r\n", b"cGFzcw==\r\n"]
    assert h.mta.auth_lines == [b"dXNlcg==\r\n", b"cGFzcw==\r\n"]
    assert h.machine.phase is Phase.COMMANDS


def test_bad_auth_line_is_cancelled_upstream() -> None:
    h = harness()
    h.start()
    lockstep(h, EHLO, b"AUTH PLAIN\r\n")
    assert h.writes[-1] == b"334 \r\n"
    h.client(b"not base64\r\n")
    assert h.sent[-1] == b"*\r\n" and h.mta.auth_lines == [b"*\r\n"]
    # the client hears about its own line, not the MTA's answer to "*"
    assert h.writes[-1] == (
        b"500 5.5.2 Syntax error: blank, control character or NUL in command line\r\n"
    )
    assert AUTH_CANCELLED not in h.to_client
    h.client(QUIT)
    assert h.writes[-1] == BYE


def test_over_long_auth_line_is_cancelled_too() -> None:
    h = harness()
    h.start()
    lockstep(h, EHLO, b"AUTH PLAIN\r\n")
    h.client(b"A" * 20000 + b"\r\n")
    assert h.sent[-1] == b"*\r\n" and h.writes[-1] == b"500 5.5.2 Line too long\r\n"
    assert b"AAAA" not in h.mta.received


# ---------------------------------------------------------------- messages


def test_dot_stuffing_kept_verbatim() -> None:
    body = b"..\r\n...x\r\n. \r\n.\tx\r\n"
    h = harness()
    h.start()
    lockstep(h, EHLO, ENVELOPE)
    h.client(body + b".\r\n")
    assert h.sent[-1] == body + b".\r\n" and h.mta.messages == [body]


def test_message_in_pieces_goes_on_per_read() -> None:
    h = harness()
    h.start()
    lockstep(h, EHLO, ENVELOPE)
    h.client(b"Subject: t\r\n\r\npart")
    h.client(b" one\r\n")
    h.client(b".\r\n")
    assert h.sent[-3:] == [b"Subject: t\r\n\r\n", b"part one\r\n", b".\r\n"]
    assert h.writes[-1] == QUEUED


def test_bare_lf_in_message_refused_after_its_end_and_never_completed() -> None:
    h = harness(limits={"bare_newline": "reject"})
    h.start()
    lockstep(h, EHLO, ENVELOPE)
    h.client(b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@x>\r\n")
    assert h.writes[2:] == [MAIL_OK + RCPT_OK + GO_AHEAD]  # no reply before the end of data
    assert h.actions[-1] == CloseUpstream()  # the MTA drops its partial copy at once
    h.client(b"more\r\n.\r\n")
    bare = b"554 5.5.2 Bare CR or LF not allowed: lines must end with CRLF\r\n"
    assert h.writes[-1] == bare and h.done and h.outcome == "protocol-error"
    assert h.to_mta == EHLO + ENVELOPE and h.mta.messages == []


def test_bare_lf_in_message_normalized_by_default() -> None:
    h = harness()
    h.start(banner=False)
    h.client(EHLO + ENVELOPE)
    h.banner()
    h.client(b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@x>\r\n.\r\n")
    assert h.writes[-1] == QUEUED
    assert h.mta.messages == [b"Subject: x\r\n\r\nhello\r\n..\r\nMAIL FROM:<evil@x>\r\n"]


def test_bdat_relayed_by_length() -> None:
    body = b"Subject: b\r\n\r\n.\r\nnot an end\r\n"
    bdat = b"BDAT %d LAST\r\n" % len(body)
    h = harness()
    h.start(banner=False)
    h.client(EHLO + MAIL + RCPT + bdat + body)
    h.banner()
    assert h.writes == [BANNER + EHLO_OUT + MAIL_OK + RCPT_OK + QUEUED]
    assert h.sent == [EHLO, MAIL + RCPT + bdat, body]
    assert h.mta.messages == [body] and h.machine.log.messages == 1


def test_bdat_chunks_without_pipelining() -> None:
    h = harness(MtaModel(pipelining=False))
    h.start()
    lockstep(h, EHLO, MAIL, RCPT)
    h.client(b"BDAT 5\r\nhelloBDAT 3 LAST\r\nxyz")
    assert h.sent[3:] == [b"BDAT 5\r\n", b"hello", b"BDAT 3 LAST\r\n", b"xyz"]
    assert h.writes[-1] == b"250 2.0.0 chunk ok\r\n" + QUEUED
    assert h.mta.messages == [b"helloxyz"] and h.mta.violations == []


def test_bdat_without_chunking_refused_late() -> None:
    h = harness(MtaModel(chunking=False))
    h.start()
    lockstep(h, EHLO, MAIL, RCPT)
    h.client(b"BDAT 5 LAST\r\nhello" + QUIT)
    assert h.writes[-2:] == [b"502 5.5.1 BDAT not supported\r\n", BYE]
    assert h.sent == [EHLO, MAIL, RCPT, QUIT] and b"hello" not in h.mta.received


def test_bdat_without_chunking_deferred_when_sent_early() -> None:
    h = harness(MtaModel(chunking=False))
    h.start(banner=False)
    h.client(EHLO + MAIL + RCPT + b"BDAT 5 LAST\r\nhello")
    h.banner()
    assert h.replies[-1].to_bytes() == b"451 4.3.0 CHUNKING is no longer offered, try again\r\n"
    assert h.sent == [EHLO, MAIL + RCPT] and b"hello" not in h.mta.received


def test_message_reply_not_held_behind_a_slow_quit() -> None:
    h = harness(MtaModel(replies={"QUIT": STALL}))
    h.start(banner=False)
    h.client(EHLO + ENVELOPE)
    h.banner()
    h.client(MESSAGE + b".\r\n" + QUIT)
    assert h.writes[-1] == QUEUED and h.machine.wants_upstream and not h.done
    assert h.mta.messages == [MESSAGE]


def test_quit_closes_at_once_without_waiting_for_the_client() -> None:
    h = harness(timeouts={"early_drain": 30})
    h.start(banner=False)
    h.client(EHLO + QUIT)
    h.banner()
    assert h.codes == [220, 250, 221]
    assert h.client_closes == [CloseClient(linger=False)] and h.done and h.outcome == "quit"
    assert h.machine.handle(Shutdown(), h.now) == []  # finished: nothing more


# ---------------------------------------------------------------- shutdown


def test_shutdown_of_an_idle_session() -> None:
    h = harness()
    h.start()
    lockstep(h, EHLO, MAIL)
    assert h.shutdown() == [CloseUpstream(), SendClient(SHUTTING_DOWN), CloseClient()]
    assert h.outcome == "shutdown" and h.mta.messages == []


def test_shutdown_with_a_cut_write_sends_nothing_more() -> None:
    h = harness()
    h.start()
    assert h.feed(Shutdown(send_cut=True)) == [CloseUpstream()]
    assert h.writes == [BANNER] and h.outcome == "shutdown"


def test_defer_shutdown_relays_the_verdict_first() -> None:
    h = harness(MtaModel(eod=STALL))
    h.start()
    lockstep(h, EHLO, ENVELOPE)
    h.client(MESSAGE + b".\r\n")
    assert h.machine.verdict_pending
    assert h.shutdown() == [] and h.stopping and not h.done
    actions = h.upstream(QUEUED)  # the MTA's verdict after all
    assert actions == [
        SendClient(QUEUED, verdict=True),
        CloseUpstream(),
        SendClient(SHUTTING_DOWN),
        CloseClient(),
    ]
    assert h.writes[-2:] == [QUEUED, SHUTTING_DOWN] and h.verdict_writes[-2:] == [True, False]
    assert h.outcome == "shutdown" and h.machine.log.messages == 1


def test_shutdown_event_while_a_verdict_is_awaited_waits_for_it() -> None:
    h = harness(MtaModel(eod=STALL))
    h.start()
    lockstep(h, EHLO, ENVELOPE)
    h.client(MESSAGE + b".\r\n")
    assert h.feed(Shutdown()) == [] and not h.done
    assert h.upstream(b"451 4.3.0 try later\r\n")[:1] == [
        SendClient(b"451 4.3.0 try later\r\n", verdict=True)
    ]
    assert h.writes[-1] == SHUTTING_DOWN and h.done


def test_defer_shutdown_with_the_verdict_queued_behind_a_pipelined_command() -> None:
    """The next MAIL pipelined behind the end of data: the verdict waits in the queue for
    the MAIL's reply, leaves with it, and the 421 follows that write."""
    slow = b"MAIL FROM:<c@d.test>\r\n"
    h = harness(MtaModel(responder=lambda line: STALL if line == slow else None))
    h.start()
    lockstep(h, EHLO, ENVELOPE)
    h.client(MESSAGE + b".\r\n" + slow)
    assert h.sent[-2:] == [MESSAGE + b".\r\n", slow] and h.writes[-1].endswith(GO_AHEAD)
    assert h.machine.verdict_pending and h.shutdown() == [] and not h.done
    h.upstream(MAIL_OK)  # the MTA answers the MAIL after all
    assert h.writes[-2:] == [QUEUED + MAIL_OK, SHUTTING_DOWN]
    assert h.verdict_writes[-2:] == [True, False]
    assert h.done and h.outcome == "shutdown"


def test_defer_shutdown_after_bdat_last() -> None:
    h = harness(MtaModel(eod=STALL))
    h.start()
    lockstep(h, EHLO, MAIL, RCPT)
    h.client(b"BDAT 3 LAST\r\nxyz")
    assert h.machine.verdict_pending and h.machine.defer_shutdown()


def test_no_deferred_shutdown_without_a_verdict_pending() -> None:
    h = harness()
    h.start()
    lockstep(h, EHLO, ENVELOPE)
    h.client(MESSAGE)  # the end of data has not gone yet
    assert not h.machine.verdict_pending and not h.machine.defer_shutdown()


# ---------------------------------------------------------------- the machine stands alone


def test_the_machine_imports_without_trio_or_sockets() -> None:
    # ("time" is not among them: the interpreter itself imports it at start-up.)
    code = (
        "import sys, proxy.machine, proxy.machine.session\n"
        "absent = [m for m in ('trio', 'socket', 'select', 'selectors', 'asyncio', 'ssl',"
        " 'OpenSSL', 'threading', 'logging', 'prometheus_client') if m in sys.modules]\n"
        "assert not absent, absent\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('proxy.'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.split()
    assert "proxy.machine.session" in loaded and "proxy.session" not in loaded
    # ... nor does any module it loads read a clock
    root = Path(__file__).resolve().parents[2]
    for name in loaded:
        path = root / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = path.with_suffix("") / "__init__.py"
        source = path.read_text()
        assert not re.search(r"^\s*(import time|from time import)", source, re.M), name


def test_the_import_check_can_fail() -> None:
    code = "import sys, proxy.session\nassert 'trio' not in sys.modules\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and "AssertionError" in result.stderr


def test_every_action_list_ends_with_the_awaited_one() -> None:
    """Actions the driver answers with an event come last (it drops the rest)."""
    h = Harness(MtaModel(), config=make_config(upstream={"client_identity": "xclient"}))
    h.start()
    kinds = [type(a) for a in h.actions]
    assert kinds == [ConnectUpstream, ResolveClientName, SendUpstream, SendClient]


def test_the_machine_fuzz_target_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """fuzz/targets.py's ``machine`` reports a machine that pipelines into an MTA without
    PIPELINING (its seed: early EHLO, MAIL, RCPT, DATA into such an MTA)."""
    from fuzz.seeds import SEEDS
    from fuzz.targets import machine
    from proxy.machine.mta import MtaConversation

    seed = b"\x81\x0c\x01" + EHLO.replace(b"me.test", b"c.test")
    seed += b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n" + DATA
    assert seed in SEEDS["machine"]
    machine(seed)
    monkeypatch.setattr(MtaConversation, "pipelining", property(lambda self: True))
    with pytest.raises(AssertionError, match="pipelined without PIPELINING"):
        machine(seed)
