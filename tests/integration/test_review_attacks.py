"""Attacks from an outside review, each against a real Postfix 3.7 behind the proxy.

Every Postfix here *would* fall for the attack if the bytes reached it (XCLIENT/XFORWARD
authorised for 127.0.0.0/8, bare newlines and unauthorised pipelining allowed, ...); the
controls talk to Postfix directly and show it. The clients are raw sockets (the attacker),
connecting from 127.0.0.2; every read is bounded by a socket timeout.

- address spoofing: XCLIENT/XFORWARD lines the proxy's tokenizer reads differently from
  Postfix's (leading blanks, HT as separator) must be refused by the proxy; a loose EHLO must
  never show the client the MTA's XCLIENT/XFORWARD keywords;
- verb tokenization: ``DATA<HT>``, ``<SP>DATA``, ``DATA<NUL>`` ... are DATA to Postfix; the
  proxy must refuse them itself, or it relays a BDAT chunk into Postfix's DATA mode, which
  reads it as a message plus a second, smuggled transaction;
- sync points: commands behind DATA in one write are a synchronization error (554), not
  replayed to the MTA behind the refused DATA;
- nothing may follow the MTA's 221 (QUIT, or Postfix's answer to an HTTP request);
- the HELO text cannot forge the client address in the session log line.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.proxyproto import encode_v1
from proxy.smtp import Reply
from tests.certs import write_tls_files
from tests.integration.test_identity import CLIENT, Raw, client_ctx, received_from
from tests.integration.test_smuggling import permissive, settle
from tests.mta import Postfix
from tests.proxyproc import ProxyProcess
from tests.unit.test_smtp import LOOSE_DATA  # DATA to Postfix 3.7 (the control below)

PostfixFactory = Callable[..., Postfix]
ProxyFactory = Callable[..., ProxyProcess]

SPOOF_ADDR = "10.66.66.66"
SPOOF_NAME = "spoofed.example"
_XC = f"ADDR={SPOOF_ADDR} NAME={SPOOF_NAME}".encode()
SPOOF_LINES = [
    b"XCLIENT\t" + _XC,
    b" XCLIENT " + _XC,
    b"\tXCLIENT " + _XC,
    b"xclient " + _XC,
    f"XFORWARD\tADDR={SPOOF_ADDR}".encode(),
    f" XFORWARD ADDR={SPOOF_ADDR}".encode(),
]

HELLO = b"EHLO client.test\r\n"
MAIL = b"MAIL FROM:<a@src.test>\r\n"
RCPT = b"RCPT TO:<box@dest.test>\r\n"
# Behind a refused RCPT: DATA, then a whole second transaction, in one write.
BEHIND_DATA = (
    b"DATA\r\nMAIL FROM:<evil@elsewhere.test>\r\nRCPT TO:<box@dest.test>\r\nDATA\r\n"
    b"Subject: HIDDEN\r\n\r\nhidden\r\n.\r\nQUIT\r\n"
)
NO_RELAY = {"smtpd_relay_restrictions": "reject_unauth_destination"}  # 127/8 may not relay
SESSION_H = re.compile(r"H=\((.*?)\) \[([^\]]+)\]:(\d+)")


def refused_recipient(c: Raw) -> None:
    """Banner, EHLO, MAIL, then a RCPT the server refuses (relay denied), step by step."""
    assert c.codes(1) == [220]
    for cmd, code in ((HELLO, 250), (MAIL, 250), (b"RCPT TO:<nobody@elsewhere.test>\r\n", 554)):
        c.send(cmd)
        assert c.codes(1) == [code], cmd


def rest(c: Raw, quiet: float = 2.0) -> tuple[list[Reply], bool]:
    """Every further reply until EOF (True) or ``quiet`` seconds of silence (False)."""
    c.sock.settimeout(quiet)
    replies: list[Reply] = []
    try:
        while (r := c.reply()) is not None:
            replies.append(r)
    except TimeoutError:
        return replies, False
    return replies, True


def step(c: Raw, data: bytes) -> Reply | None:
    """Send one command (or command plus chunk) and read its one reply."""
    c.send(data)
    try:
        return c.reply()
    except TimeoutError:
        return None


def show(r: Reply | None) -> str:
    return "EOF/timeout" if r is None else f"{r.code} {r.text}"


def is_local_refusal(r: Reply | None) -> bool:
    """The proxy's own refusal: 500 5.5.2 (line it will not read) or 550 5.7.1 (XCLIENT)."""
    if r is None:
        return False
    first = r.lines[0]
    return (r.code == 500 and first.startswith(b"5.5.2")) or (
        r.code == 550 and first.startswith(b"5.7.1")
    )


def header_block(message: bytes) -> bytes:
    return message.split(b"\n\n", 1)[0]


def shows_proxy_only(r: Reply | None) -> bool:
    """An EHLO reply line the client must never see (only the proxy may use these)."""
    return r is not None and any(
        line.strip().upper().startswith((b"XCLIENT", b"XFORWARD")) for line in r.lines
    )


# ------------------------------------------------------------------- (1) address spoofing


def spoofable_postfix(factory: PostfixFactory, identity: str) -> Postfix:
    """A Postfix that honours XCLIENT and XFORWARD from 127.0.0.0/8 -- the proxy, and with
    PROXY v2 the client address the header carries -- so a leaked line would work."""
    return factory(
        proxy_protocol=identity != "xclient",
        xclient=True,
        extra={"smtpd_authorized_xforward_hosts": "127.0.0.0/8"},
    )


@pytest.mark.parametrize("identity", ["xclient", "proxy-v2"])
def test_loose_xclient_xforward_cannot_spoof_the_client(
    identity: str, postfix_factory: PostfixFactory, proxy_factory: ProxyFactory
) -> None:
    """Each XCLIENT/XFORWARD spelling Postfix would honour gets the proxy's 5xx; the
    transaction behind it still works, and neither Postfix's log nor any stored Received
    header ever shows the forged address or name."""
    pf = spoofable_postfix(postfix_factory, identity)
    proxy = proxy_factory(pf.port, upstream={"client_identity": identity})
    problems: list[str] = []
    for i, line in enumerate(SPOOF_LINES):
        with Raw(proxy.port) as c:
            assert c.codes(1) == [220]
            ehlo = step(c, HELLO)
            assert ehlo is not None and ehlo.code == 250 and not shows_proxy_only(ehlo), ehlo
            r = step(c, line + b"\r\n")
            if not is_local_refusal(r):
                problems.append(f"{line!r} -> {show(r)}")
            codes = [
                step(c, cmd)
                for cmd in (
                    MAIL,
                    RCPT,
                    b"DATA\r\n",
                    b"Subject: spoof-%d\r\n\r\nhello\r\n.\r\n" % i,
                    b"QUIT\r\n",
                )
            ]
            got = [x.code if x else None for x in codes]
            if got != [250, 250, 354, 250, 221]:
                problems.append(f"{line!r}: transaction behind it {got}")
    messages = settle(pf)
    log = pf.maillog()
    for forged in (SPOOF_ADDR, SPOOF_NAME):
        if forged in log:
            clients = sorted(set(re.findall(r"client=\S*?\[[0-9.]+\]", log)))
            problems.append(f"maillog shows {forged}: {clients}")
    for m in messages:
        received = received_from(m)
        if SPOOF_ADDR.encode() in received or SPOOF_NAME.encode() in received:
            problems.append(f"stored Received: {received!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("identity", ["xclient", "proxy-v2"])
def test_loose_ehlo_never_shows_xclient(
    identity: str, postfix_factory: PostfixFactory, proxy_factory: ProxyFactory
) -> None:
    """`` EHLO x`` (Postfix skips the blank) is refused by the proxy with a 5xx; no EHLO
    spelling, loose or normal, lets the client see the MTA's XCLIENT/XFORWARD keywords."""
    pf = spoofable_postfix(postfix_factory, identity)
    proxy = proxy_factory(pf.port, upstream={"client_identity": identity})
    problems: list[str] = []
    for line in (b" EHLO x", b"\tEHLO x", b"EHLO\tx", b"EHLO x"):
        with Raw(proxy.port) as c:
            assert c.codes(1) == [220]
            r = step(c, line + b"\r\n")
            if shows_proxy_only(r):
                problems.append(f"{line!r} -> the MTA's keywords: {show(r)}")
            if line.startswith(b" ") and (r is None or r.code // 100 != 5):
                problems.append(f"{line!r} -> {r.code if r else None}, not a 5xx")
            if line == b"EHLO x" and (r is None or r.code != 250):
                problems.append(f"{line!r} -> {show(r)}")
            c.send(b"QUIT\r\n")
            rest(c)
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------- (2) verb tokenization


def test_control_postfix_reads_each_loose_data_line_as_data(
    postfix_factory: PostfixFactory,
) -> None:
    """The control: straight to the permissive Postfix, every LOOSE_DATA line gets 354, so
    the proxy test below would see a 354 (and a smuggled message) if one leaked."""
    pf = permissive(postfix_factory, proxy_protocol=False)
    got = {}
    for line in LOOSE_DATA:
        with Raw(pf.port) as c:
            assert c.codes(1) == [220]
            for cmd in (HELLO, MAIL, RCPT):
                c.send(cmd)
                assert c.codes(1) == [250], cmd
            r = step(c, line + b"\r\n")
            got[line] = r.code if r else None
    assert got == dict.fromkeys(LOOSE_DATA, 354), got


def bdat_attack(tag: str) -> tuple[bytes, bytes]:
    """A BDAT chunk that a Postfix in DATA mode would read as the end of a carrier message
    (behind a bare LF line) plus a second transaction, a message from ceo@dest.test sent
    with BDAT LAST; and the BDAT LAST that ends the client's real message."""
    second = b"From: ceo@dest.test\r\nSubject: ceo-%s\r\n\r\npay now\r\n" % tag.encode()
    chunk = (
        b"From: a@src.test\r\nSubject: carrier-%s\r\n\r\nbare\nLF\r\n.\r\n" % tag.encode()
        + MAIL.replace(b"a@src.test", b"ceo@dest.test")
        + RCPT
        + b"BDAT %d LAST\r\n" % len(second)
        + second
    )
    return b"BDAT %d\r\n" % len(chunk) + chunk, b"BDAT 0 LAST\r\n"


@pytest.mark.parametrize("phase", ["plain", "early", "starttls"])
def test_loose_data_verb_is_refused_by_the_proxy(
    phase: str,
    tmp_path: Path,
    postfix_factory: PostfixFactory,
    proxy_factory: ProxyFactory,
) -> None:
    """In every phase (after the banner; early, replayed behind EHLO; inside STARTTLS) each
    LOOSE_DATA line is answered 500 5.5.2 by the proxy; the BDAT chunk that follows is a
    chunk for Postfix too, so no message from ceo@dest.test is stored, Postfix stores
    exactly the messages the client saw a 250 to BDAT LAST for, and every command gets
    exactly one reply, in order."""
    pf = permissive(postfix_factory, proxy_protocol=True)
    tls_files = write_tls_files(tmp_path, "mx.test", "127.0.0.1")
    proxy = proxy_factory(
        pf.port, tls={"certificate": tls_files["certificate"], "key": tls_files["key"]}
    )
    ctx = client_ctx(tls_files)
    problems: list[str] = []
    told = 0
    for i, line in enumerate(LOOSE_DATA):
        tag = f"{phase}-{i}"
        with Raw(proxy.port) as c:
            if phase == "early":
                c.send(HELLO + MAIL + RCPT)  # before the banner, answered after it
                assert c.codes(4) == [220, 250, 250, 250]
            else:
                assert c.codes(1) == [220]
                if phase == "starttls":
                    c.send(HELLO)
                    assert c.codes(1) == [250]
                    c.starttls(ctx)
                for cmd in (HELLO, MAIL, RCPT):
                    c.send(cmd)
                    assert c.codes(1) == [250], (tag, cmd)
            first = step(c, line + b"\r\n")
            if first is None or first.code != 500 or not is_local_refusal(first):
                problems.append(f"{tag} {line!r} -> {show(first)}")
            chunk, last = bdat_attack(tag)
            replies = [step(c, chunk), step(c, last), step(c, b"QUIT\r\n")]
            extra, _ = rest(c, quiet=1.0)
            codes = [r.code if r else None for r in replies]
            told += codes[1] == 250
            if codes != [250, 250, 221] or extra:
                trail = [show(r) for r in extra]
                problems.append(f"{tag}: BDAT, BDAT LAST, QUIT -> {codes}, then {trail}")
    messages = settle(pf)
    ceo = [m for m in messages if re.search(rb"(?im)^From:.*ceo@dest\.test", header_block(m))]
    if ceo:
        problems.append(f"{len(ceo)} message(s) from ceo@dest.test stored")
    if len(messages) != told:
        problems.append(f"stored {len(messages)} messages, the client saw {told} accepted")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------- (7) sync points


def test_control_postfix_flags_commands_behind_data(postfix_factory: PostfixFactory) -> None:
    """The control: the same bytes straight to Postfix (forbid_unauth_pipelining = yes) get
    its ``554 5.5.0 ... synchronization`` and nothing is stored."""
    pf = postfix_factory(proxy_protocol=False, forbid_unauth_pipelining=True, extra=NO_RELAY)
    with Raw(pf.port) as c:
        refused_recipient(c)
        c.send(BEHIND_DATA)
        replies, eof = rest(c)
    assert [r.code for r in replies] == [554] and eof, replies
    assert replies[0].lines[0].startswith(b"5.5.0") and b"synchronization" in replies[0].lines[0]
    time.sleep(2)
    assert not any(b"HIDDEN" in m for m in settle(pf))


def test_commands_behind_data_are_a_sync_error(
    postfix_factory: PostfixFactory, proxy_factory: ProxyFactory
) -> None:
    """After a refused RCPT, DATA with a whole transaction behind it in one write gets the
    proxy's 554 synchronization error and the connection closes: Postfix never sees the
    hidden transaction (the proxy must not replay it group by group behind DATA's 554)."""
    pf = postfix_factory(proxy_protocol=True, forbid_unauth_pipelining=True, extra=NO_RELAY)
    proxy = proxy_factory(pf.port)
    with Raw(proxy.port) as c:
        refused_recipient(c)
        c.send(BEHIND_DATA)
        replies, eof = rest(c, quiet=3.0)
    time.sleep(2)
    hidden = [m for m in settle(pf) if b"HIDDEN" in m]
    [session] = proxy.session_lines(1)
    outcome = re.search(r"outcome=(\S+)", session)
    print("session line:", session)
    shown = [show(r) for r in replies]
    assert not hidden, f"the hidden message was stored; the client got {shown}"
    sync = [r for r in replies if r.code == 554 and b"synchroniz" in b" ".join(r.lines).lower()]
    assert sync and replies[-1] is sync[0] and eof, shown
    assert 354 not in [r.code for r in replies], shown
    assert outcome is not None and outcome.group(1) != "quit", session


SYNC_PROBES: dict[str, tuple[list[bytes], bytes]] = {
    "HELO": ([], b"HELO x"),
    "EHLO": ([], b"EHLO x"),
    "NOOP": ([], b"NOOP"),
    "VRFY": ([], b"VRFY box@dest.test"),
    "EXPN": ([], b"EXPN box@dest.test"),
    "RSET": ([], b"RSET"),
    "MAIL (out of a transaction)": ([], MAIL.rstrip()),
    "MAIL (in a transaction)": ([MAIL], b"MAIL FROM:<b@src.test>"),
    "RCPT": ([MAIL], RCPT.rstrip()),
    "DATA (valid rcpt)": ([MAIL, RCPT], b"DATA"),
    "ETRN": ([], b"ETRN dest.test"),
    "HELP": ([], b"HELP"),
    "AUTH (not offered)": ([], b"AUTH PLAIN AGJveABzZWNyZXQ="),
    "STARTTLS (not offered)": ([], b"STARTTLS"),
    "QUIT": ([], b"QUIT"),
    "unknown verb": ([], b"FROB x"),
}


def test_measure_postfix_sync_points(postfix_factory: PostfixFactory) -> None:
    """A measurement (printed as a table): which verbs Postfix 3.7 with
    smtpd_forbid_unauth_pipelining = yes treats as sync points after the greeting and the
    EHLO reply -- ``VERB args`` and ``NOOP`` in one write, flagged if it answers 554 5.5.0.
    Asserted only for those it flags (the proxy must enforce at least these)."""
    pf = postfix_factory(proxy_protocol=False, forbid_unauth_pipelining=True)
    flagged = set()
    rows = []
    for name, (before, cmd) in SYNC_PROBES.items():
        with Raw(pf.port) as c:
            assert c.codes(1) == [220]
            for pre in (HELLO, *before):
                c.send(pre)
                assert c.codes(1) == [250], (name, pre)
            c.send(cmd + b"\r\nNOOP\r\n")
            replies, _ = rest(c, quiet=0.5)
        sync = any(r.code == 554 and r.lines[0].startswith(b"5.5.0") for r in replies)
        if sync:
            flagged.add(name.split()[0])
        rows.append(f"{name:28} {'554 5.5.0' if sync else '-':10} {[show(r) for r in replies]}")
    print("\n".join(["verb, then NOOP in one write  sync?      replies", *rows]))
    assert {"HELO", "EHLO", "NOOP", "VRFY", "DATA"} <= flagged, rows


# ------------------------------------------------------------------- (12) after the 221


def test_quit_gets_exactly_221_then_eof(postfix: Postfix, proxy_factory: ProxyFactory) -> None:
    """QUIT: the client receives the MTA's 221 and then EOF, nothing else."""
    proxy = proxy_factory(postfix.port)
    with Raw(proxy.port) as c:
        assert c.codes(1) == [220]
        c.send(HELLO)
        assert c.codes(1) == [250]
        c.send(b"QUIT\r\n")
        replies, eof = rest(c)
    assert [r.code for r in replies] == [221] and eof, [show(r) for r in replies]


HTTP_CASES: list[tuple[bytes, bytes]] = [
    (b"GET / HTTP/1.0\r\n\r\n", b""),  # a browser's request: the empty line in the same write
    (b"GET / HTTP/1.0\r\n", b"\r\n"),  # the empty line after the 221
    (b"POST / HTTP/1.1\r\n", b"NOOP\r\n"),  # another command after the 221
    (HELLO + b"POST / HTTP/1.1\r\nNOOP\r\n", b""),
]


def test_mta_goodbye_to_http_ends_the_session(
    postfix: Postfix, proxy_factory: ProxyFactory
) -> None:
    """Postfix answers an HTTP request line with its own 221 and closes (checked directly
    first); through the proxy the client then gets exactly that 221 and EOF, whatever it
    sends next -- no 421 of the proxy's behind it."""
    proxy = proxy_factory(postfix.port)
    header = encode_v1((CLIENT, 40000), ("127.0.0.1", postfix.port))
    with Raw(postfix.port) as c:
        c.send(header)
        assert c.codes(1) == [220]
        c.send(b"GET / HTTP/1.0\r\n\r\n")
        direct, eof = rest(c)
    assert [r.code for r in direct] == [221] and eof, direct
    assert b"2.7.0" in direct[0].lines[0] and b"break rules" in direct[0].lines[0], direct
    problems = []
    for first, then in HTTP_CASES:
        with Raw(proxy.port) as c:
            assert c.codes(1) == [220]
            c.send(first)
            expected = [250, 221] if first.startswith(HELLO) else [221]
            got = [c.reply() for _ in expected]
            if then:
                with contextlib.suppress(OSError):  # already closed: as it should be
                    c.send(then)
            replies, eof = rest(c)
        shown = [show(r) for r in [*got, *replies]]
        if [r.code if r else None for r in got] != expected or replies or not eof:
            problems.append(f"{first!r} then {then!r} -> {shown}, EOF={eof}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------- (11) HELO text in the log


FORGING_HELOS = [b"x) [10.9.9.9]:1 I=plain", b'x" \\") [10.9.9.9]:1 I=plain']


def _helo_sessions(port: int) -> list[int]:
    """One session per FORGING_HELOS entry; the client ports, in order."""
    ports = []
    for helo in FORGING_HELOS:
        with Raw(port) as c:
            ports.append(c.sock.getsockname()[1])
            assert c.codes(1) == [220]
            c.send(b"EHLO " + helo + b"\r\n")
            assert c.codes(1) == [250]
            c.send(b"QUIT\r\n")
            rest(c)
    return ports


def test_helo_text_cannot_forge_the_logged_client(
    postfix: Postfix, proxy_factory: ProxyFactory
) -> None:
    """A HELO name holding ``) [10.9.9.9]:1`` cannot make the text session line read as
    coming from 10.9.9.9 (a non-greedy parse yields the real client address and port), and
    the JSON log carries the HELO name exactly."""
    text = proxy_factory(postfix.port)
    ports = _helo_sessions(text.port)
    lines = text.session_lines(len(FORGING_HELOS))
    problems = []
    for line, port in zip(lines, ports, strict=True):
        m = SESSION_H.search(line)
        if m is None or (m.group(2), int(m.group(3))) != (CLIENT, port):
            parsed = m.groups() if m else None
            problems.append(f"text line parses as {parsed}, client is {CLIENT}:{port}: {line}")
    js = proxy_factory(postfix.port, log={"format": "json"})
    ports = _helo_sessions(js.port)
    for line, port, helo in zip(
        js.session_lines(len(FORGING_HELOS)), ports, FORGING_HELOS, strict=True
    ):
        record = json.loads(line[line.index("{") :])
        if record["helo"] != helo.decode() or record["client"] != f"{CLIENT}:{port}":
            problems.append(f"json helo={record['helo']!r} client={record['client']}")
    assert not problems, "\n".join(problems)
