"""Outbound machine: what a hostile or broken MX cannot do (pure; the MX is the Internet).

- bytes nobody asked for make the proxy step aside (relayed as they came, then spliced),
  never grow a buffer without bound or get read as the answer to a later command;
- a reply trickled a byte at a time gains no time: the reply timeout bounds the reply;
- a line past its bound (the MTA's, the MX's) is never held: relayed, then spliced.
"""

from __future__ import annotations

from proxy.machine.events import (
    ClientData,
    DeadlinePassed,
    SendClient,
    SendUpstream,
    UpstreamConnected,
    UpstreamData,
)
from proxy.machine.outbound import (
    MAX_LINE,
    MX_CLOSED,
    OutboundAction,
    OutboundMachine,
    Splice,
)

BANNER = b"220 mx.example ESMTP\r\n"
EHLO = b"EHLO mta.test\r\n"
EHLO_REPLY = b"250-mx.example Hello\r\n250-PIPELINING\r\n250 PIPECONNECT\r\n"


def relayed_session(reply_timeout: float = 10.0) -> OutboundMachine:
    """A miss, greeted and past EHLO, waiting for the MTA."""
    m = OutboundMachine(greeting=None, learn=False, reply_timeout=reply_timeout)
    m.start(0.0)
    m.handle(UpstreamConnected(), 0.0)
    assert m.handle(UpstreamData(BANNER), 0.0) == [SendClient(BANNER)]
    assert m.handle(ClientData(EHLO), 0.0) == [SendUpstream(EHLO)]
    assert m.handle(UpstreamData(EHLO_REPLY), 0.0) == [SendClient(EHLO_REPLY)]
    return m


def test_unsolicited_bytes_are_relayed_and_the_proxy_steps_aside() -> None:
    m = relayed_session()
    noise = b"250 you did not ask\r\n"
    actions = m.handle(UpstreamData(noise), 1.0)
    assert actions == [SendClient(noise), Splice()]
    assert m.spliced
    # From now on: bytes both ways, as they come, nothing kept.
    assert m.handle(UpstreamData(b"x" * 100_000), 2.0) == [SendClient(b"x" * 100_000)]
    assert m.handle(ClientData(b"MAIL FROM:<a@b>\r\n"), 2.0) == [
        SendUpstream(b"MAIL FROM:<a@b>\r\n")
    ]


def test_an_unsolicited_421_reaches_the_mta_as_it_came() -> None:
    m = relayed_session()
    bye = b"421 mx.example shutting down\r\n"
    assert m.handle(UpstreamData(bye), 1.0) == [SendClient(bye), Splice()]


def test_a_trickled_reply_gains_no_time() -> None:
    m = relayed_session(reply_timeout=10.0)
    m.handle(ClientData(b"MAIL FROM:<a@mta.test>\r\n"), 100.0)
    assert m.deadline == 110.0
    for i, byte in enumerate(b"250 2.1.0 Ok"):
        now = 100.5 + i * 0.5
        assert m.handle(UpstreamData(bytes([byte])), now) == []
        assert m.deadline == 110.0, "each byte would re-arm the wait"
    actions: list[OutboundAction] = m.handle(DeadlinePassed(), 110.0)
    assert actions[0] == SendClient(MX_CLOSED.to_bytes())
    assert m.done


def test_a_whole_reply_rearms_the_wait_for_the_next() -> None:
    m = relayed_session(reply_timeout=10.0)
    m.handle(ClientData(b"MAIL FROM:<a@mta.test>\r\nRCPT TO:<b@dest.test>\r\n"), 100.0)
    assert m.handle(UpstreamData(b"250 ok\r\n"), 108.0) == [SendClient(b"250 ok\r\n")]
    assert m.deadline == 118.0


def test_an_mta_line_past_the_bound_is_not_kept_but_spliced() -> None:
    # Per-session memory is bounded (DESIGN.md 3): a line the proxy would have to hold
    # whole goes on as it came, and the proxy only copies from then on.
    m = relayed_session()
    endless = b"X" * (MAX_LINE + 1)
    assert m.handle(ClientData(endless), 1.0) == [Splice(), SendUpstream(endless)]
    assert m.spliced


def test_an_mx_reply_line_past_the_bound_is_not_kept() -> None:
    m = relayed_session()
    m.handle(ClientData(b"MAIL FROM:<a@mta.test>\r\n"), 1.0)
    endless = b"250" + b"-" * 5000  # no line end, past max_reply_line (4096)
    assert m.handle(UpstreamData(endless), 2.0) == [SendClient(endless), Splice()]
    assert m.spliced
