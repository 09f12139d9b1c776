"""MtaConversation: the MTA side in the client role (proxy/machine/mta.py)."""

from __future__ import annotations

import pytest

from proxy.machine.mta import MtaConversation
from proxy.smtp import ProtocolError, Reply

EHLO_REPLY = b"250-mta.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 CHUNKING\r\n"


def conversation() -> MtaConversation[str]:
    mta: MtaConversation[str] = MtaConversation()
    mta.expect("banner", banner=True)
    mta.feed(b"220 mta.test ESMTP\r\n")
    assert mta.next_reply() == ("banner", Reply(220, (b"mta.test ESMTP",)))
    return mta


def test_banner_is_a_reply_nobody_asked_for() -> None:
    mta: MtaConversation[str] = MtaConversation()
    assert mta.next_reply() is None  # nothing expected: bytes stay buffered
    mta.feed(b"220 mta.test ESMTP\r\n")
    assert mta.next_reply() is None and mta.buffered == 20
    mta.expect("banner", banner=True)
    assert mta.pending == 1 and mta.next_tag == "banner"
    assert mta.next_reply() == ("banner", Reply(220, (b"mta.test ESMTP",)))
    assert mta.banner == Reply(220, (b"mta.test ESMTP",)) and mta.pending == 0
    assert mta.buffered == 0


def test_send_returns_the_line_and_tags_its_reply() -> None:
    mta = conversation()
    assert mta.send("m", b"MAIL FROM:<a@b>\r\n") == b"MAIL FROM:<a@b>\r\n"
    assert mta.next_reply() is None  # not answered yet
    mta.feed(b"250 2.1.0 Ok\r\n")
    assert mta.next_reply() == ("m", Reply(250, (b"2.1.0 Ok",)))


def test_pipelined_group_replies_matched_in_order_across_any_cut() -> None:
    wire = b"250 ok\r\n550-no\r\n550 such user\r\n354 go\r\n"
    for cut in range(len(wire) + 1):
        mta = conversation()
        for tag, line in [("mail", b"MAIL\r\n"), ("rcpt", b"RCPT\r\n"), ("data", b"DATA\r\n")]:
            mta.send(tag, line)
        assert mta.next_tag == "mail" and mta.pending == 3
        got = []
        for piece in (wire[:cut], wire[cut:]):
            mta.feed(piece)
            while (r := mta.next_reply()) is not None:
                got.append(r)
        assert got == [
            ("mail", Reply(250, (b"ok",))),
            ("rcpt", Reply(550, (b"no", b"such user"))),
            ("data", Reply(354, (b"go",))),
        ]
        assert mta.pending == 0


def test_capabilities_from_ehlo() -> None:
    mta = conversation()
    assert not mta.pipelining and not mta.chunking and mta.size == 0
    mta.send("e", b"EHLO me\r\n")
    mta.feed(EHLO_REPLY)
    assert mta.next_reply() is not None
    assert mta.capabilities == {"PIPELINING": "", "SIZE": "1000", "CHUNKING": ""}
    assert mta.pipelining and mta.chunking and mta.size == 1000


def test_lower_case_ehlo_counts_too() -> None:
    mta = conversation()
    mta.send("e", b"ehlo me\r\n")
    mta.feed(EHLO_REPLY)
    mta.next_reply()
    assert mta.pipelining


def test_helo_clears_capabilities() -> None:
    mta = conversation()
    mta.send("e", b"EHLO me\r\n")
    mta.feed(EHLO_REPLY)
    mta.next_reply()
    mta.send("h", b"HELO me\r\n")
    mta.feed(b"250 mta.test\r\n")
    assert mta.next_reply() == ("h", Reply(250, (b"mta.test",)))
    assert mta.capabilities == {} and not mta.pipelining


def test_a_refused_ehlo_keeps_them() -> None:
    mta = conversation()
    mta.send("e", b"EHLO me\r\n")
    mta.feed(EHLO_REPLY)
    mta.next_reply()
    mta.send("e2", b"EHLO again\r\n")
    mta.feed(b"550 5.7.1 no\r\n")
    assert mta.next_reply() == ("e2", Reply(550, (b"5.7.1 no",)))
    assert mta.pipelining and mta.size == 1000


def test_the_banner_is_not_an_ehlo_reply() -> None:
    mta: MtaConversation[str] = MtaConversation()
    mta.expect("banner", banner=True)
    mta.feed(b"250-mta.test\r\n250 PIPELINING\r\n")
    mta.next_reply()
    assert mta.capabilities == {} and mta.banner is not None


def test_only_the_first_banner_is_kept() -> None:
    mta = conversation()
    mta.expect("xclient", banner=True)  # XCLIENT's 220 is a banner too
    mta.feed(b"220 again\r\n")
    assert mta.next_reply() == ("xclient", Reply(220, (b"again",)))
    assert mta.banner == Reply(220, (b"mta.test ESMTP",))


def test_expected_verdict_is_no_command() -> None:
    mta = conversation()
    mta.expect("end of data")
    mta.feed(EHLO_REPLY)  # even a reply that looks like EHLO's
    assert mta.next_reply() is not None and mta.capabilities == {}


@pytest.mark.parametrize(
    "junk",
    [b"hello\r\n", b"25\r\n", b"250x\r\n", b"250 ok\n", b"250-a\r\n251 b\r\n", b"x" * 5000],
    ids=["text", "short", "no-separator", "bare-lf", "code-changed", "too-long"],
)
def test_protocol_error_on_junk(junk: bytes) -> None:
    mta = conversation()
    mta.send("m", b"MAIL\r\n")
    mta.feed(junk)
    with pytest.raises(ProtocolError) as info:
        mta.next_reply()
    assert info.value.fatal and info.value.reply.code == 421


def test_max_reply_line_is_the_limit() -> None:
    mta: MtaConversation[str] = MtaConversation(max_reply_line=100)
    mta.expect("banner", banner=True)
    mta.feed(b"220 " + b"a" * 90 + b"\r\n")
    assert mta.next_reply() is not None
    mta.send("m", b"MAIL\r\n")
    mta.feed(b"250 " + b"a" * 120 + b"\r\n")
    with pytest.raises(ProtocolError):
        mta.next_reply()


def test_auth_lines_sent_as_answers_are_never_parsed_as_ehlo() -> None:
    """An AUTH response that happens to start with "EHLO" (or "HELO") is no command: its
    reply neither sets nor clears the capabilities."""
    mta = conversation()
    mta.send("e", b"EHLO me\r\n")
    mta.feed(EHLO_REPLY)
    mta.next_reply()
    mta.send("a", b"HELOdGVzdA==\r\n", command=False)
    mta.feed(b"334 go on\r\n")
    assert mta.next_reply() == ("a", Reply(334, (b"go on",)))
    assert mta.pipelining  # not cleared as a HELO would
    mta.send("a2", b"EHLOdGVzdA==\r\n", command=False)
    mta.feed(b"250-x\r\n250 SIZE 5\r\n")
    assert mta.next_reply() is not None
    assert mta.size == 1000  # not taken as an EHLO reply


def test_the_same_line_as_a_command_would_be() -> None:
    """Control for the test above: sent as a command, "HELO..." clears them."""
    mta = conversation()
    mta.send("e", b"EHLO me\r\n")
    mta.feed(EHLO_REPLY)
    mta.next_reply()
    mta.send("h", b"HELOdGVzdA==\r\n")
    mta.feed(b"334 go on\r\n")
    mta.next_reply()
    assert not mta.pipelining


def test_bytes_nobody_waits_for_stay_buffered() -> None:
    mta = conversation()
    mta.feed(b"250 unsolicited\r\n")
    assert mta.next_reply() is None and mta.buffered == 17
    mta.send("n", b"NOOP\r\n")
    assert mta.next_reply() == ("n", Reply(250, (b"unsolicited",)))  # the caller's to judge


def test_size_without_a_number() -> None:
    mta = conversation()
    mta.send("e", b"EHLO me\r\n")
    mta.feed(b"250-mta.test\r\n250 SIZE\r\n")
    mta.next_reply()
    assert mta.size == 0 and "SIZE" in mta.capabilities
