"""Fuzz targets over the sans-I/O parsers. Each takes raw bytes and raises AssertionError (or
lets an unexpected exception escape) when an invariant breaks; the documented error types
(``ProtocolError``, ``ProxyProtocolError``) are part of normal behaviour and are caught.

The first bytes of an input choose parameters (limits, modes, how the stream is cut into
reads), so every input is a complete, deterministic reproducer: ``python -m fuzz TARGET FILE``.
The same functions run under atheris (``fuzz/__main__.py``) and in CI (``tests/test_fuzz.py``).
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from unittest import mock

from proxy import proxyproto
from proxy.smtp import (
    EARLY_PIPELINING_KEYWORDS,
    NEED_DATA,
    PROXY_ONLY_KEYWORDS,
    BdatChunk,
    BdatEnd,
    Closed,
    Command,
    CommandReader,
    DataChunk,
    DataRefused,
    EndOfData,
    ProtocolError,
    RawLine,
    Reply,
    ReplyReader,
    ehlo_keywords,
    rewrite_ehlo,
)


class _Input:
    """Parameters from the head of the input; the rest is the stream."""

    def __init__(self, data: bytes, head: int) -> None:
        self.head = data[:head].ljust(head, b"\0")
        self.body = data[head:]

    def byte(self, i: int) -> int:
        return self.head[i]


def _cuts(body: bytes, seed: int) -> list[bytes]:
    """The stream cut into reads: one read (seed 0), one byte at a time (seed 1), or random
    sizes from a PRNG seeded by the input, so the cut is reproducible."""
    if seed == 0 or not body:
        return [body]
    if seed == 1:
        return [body[i : i + 1] for i in range(len(body))]
    rng = random.Random(seed)
    out, pos = [], 0
    while pos < len(body):
        n = rng.choice((1, 1, 2, 3, 5, 8, 13, 64, 512))
        out.append(body[pos : pos + n])
        pos += n
    return out


# ---------------------------------------------------------------- client commands


@dataclass(frozen=True)
class Err:
    code: int
    fatal: bool
    # A line both too long and with a bare CR is refused for whichever the read shows first.
    text: str = field(compare=False)


def _drive_commands(
    pieces: list[bytes], max_cmd: int, data_after: bool, line_after: bool
) -> tuple[list[object], bytes, bool]:
    """Feed ``pieces`` then EOF, taking every event. Returns the events with consecutive
    DataChunk/BdatChunk payloads merged (their boundaries depend on the reads), the bytes the
    events carried, and whether any error happened (bytes were then dropped by design)."""
    reader = CommandReader(max_command_line=max_cmd)
    events: list[object] = []
    carried = bytearray()
    errored = False
    total = sum(map(len, pieces))
    budget = 4 * total + 16  # more events than this means a reader that does not progress
    bdat_announced = bdat_seen = 0

    def add(ev: object) -> None:
        if events and type(ev) is type(events[-1]) and isinstance(ev, DataChunk | BdatChunk):
            events[-1] = type(ev)(events[-1].data + ev.data)  # type: ignore[attr-defined]
        else:
            events.append(ev)

    def pull() -> bool:
        nonlocal budget, errored, bdat_announced, bdat_seen
        while True:
            budget -= 1
            assert budget > 0, "CommandReader does not make progress"
            try:
                ev = reader.next_event()
            except ProtocolError as exc:
                errored = True
                assert 500 <= exc.reply.code < 600, exc.reply
                add(Err(exc.reply.code, exc.fatal, exc.reply.text))
                if exc.fatal:
                    return False
                continue
            if ev is NEED_DATA:
                return True
            add(ev)
            if isinstance(ev, Closed):
                return False
            if isinstance(ev, Command):
                assert ev.raw.endswith(b"\r\n") and b"\n" not in ev.raw[:-1], ev
                assert b"\r" not in ev.raw[:-2], ev
                assert len(ev.raw) <= max_cmd, ev
                verb = ev.verb.encode("utf-8", "surrogateescape")
                assert verb == verb.upper() and b" " not in verb, ev  # ASCII case folding
                carried.extend(ev.raw)
                if ev.verb == "BDAT":
                    assert not reader.in_data
                    bdat_announced, bdat_seen = int(ev.args.split()[0]), 0
                elif ev.verb == "DATA" and data_after:
                    reader.start_data()
                elif ev.verb == "AUTH" and line_after:
                    reader.expect_line()
            elif isinstance(ev, DataChunk):
                d = ev.data
                assert d and b"\r\n.\r\n" not in d, d
                assert d.count(b"\n") == d.count(b"\r\n") == d.count(b"\r"), d
                carried.extend(d)
            elif isinstance(ev, DataRefused):
                errored = True  # the rest of that message is dropped by design
            elif isinstance(ev, EndOfData):
                assert ev.raw == b".\r\n"
                carried.extend(ev.raw)
            elif isinstance(ev, BdatChunk):
                assert ev.data
                bdat_seen += len(ev.data)
                assert bdat_seen <= bdat_announced
                carried.extend(ev.data)
            elif isinstance(ev, BdatEnd):
                assert bdat_seen == bdat_announced, (bdat_seen, bdat_announced)
            elif isinstance(ev, RawLine):
                assert ev.raw.endswith(b"\r\n") and b"\r" not in ev.raw[:-2], ev
                carried.extend(ev.raw)

    go = True
    for piece in pieces:
        reader.feed(piece)
        go = pull()
        if not go:
            break
    if go:
        reader.feed_eof()
        assert not pull(), "no Closed after EOF"
        assert isinstance(events[-1], Closed)
        if not errored:
            # The events carried the input as it came, up to where framing stopped; what is
            # left was unframed: still buffered, or the start of an over-long line (dropped
            # as it came, refused once its end arrives, which it never did).
            stream = b"".join(pieces)
            assert stream.startswith(carried), (bytes(carried), stream)
            rest = stream[len(carried) :]
            assert reader.buffered == len(rest) or (b"\n" not in rest and len(rest) > max_cmd), (
                rest,
                reader.buffered,
            )
    # A bad message line is found in the first read that holds it: lines before it in the
    # same read are not passed on, lines in earlier reads were. Either way the message is
    # refused, so compare without the payload before the refusal.
    for i in range(len(events) - 1, 0, -1):
        if isinstance(events[i], DataRefused) and isinstance(events[i - 1], DataChunk):
            del events[i - 1]
    # A message the client left unfinished at EOF is lost whatever was framed of it (the
    # session aborts it), and how much of an unfinished line went on in pieces, or was
    # found to hold a bare CR, depends on the reads too: compare up to its DATA.
    if events and isinstance(events[-1], Closed):
        i = len(events) - 1
        while i > 0 and isinstance(events[i - 1], DataChunk | DataRefused):
            i -= 1
        events[i:-1] = []
    return events, bytes(carried), errored


def commands(data: bytes) -> None:
    """CommandReader: command lines, DATA, BDAT, AUTH lines; one read == any cut."""
    inp = _Input(data, 4)
    flags = inp.byte(0)
    max_cmd = 8 + inp.byte(1) * 2  # small limits reach the over-long paths
    piece = 1 + inp.byte(2) * 4  # so do small pieces of long message lines
    data_after, line_after = bool(flags & 1), bool(flags & 2)
    body = inp.body
    with mock.patch("proxy.smtp.DATA_PIECE", piece):
        whole, carried, errored = _drive_commands([body], max_cmd, data_after, line_after)
        if not errored:  # nothing lost, nothing duplicated, nothing reordered
            assert body.startswith(carried), "events do not reproduce the input"
        split, _, _ = _drive_commands(_cuts(body, inp.byte(3) | 1), max_cmd, data_after, line_after)
    assert whole == split, f"framing depends on the reads:\n{whole}\n{split}"


# ---------------------------------------------------------------- MTA replies


def _drive_replies(pieces: list[bytes], max_line: int, max_lines: int) -> list[object]:
    reader = ReplyReader(max_line=max_line, max_lines=max_lines)
    out: list[object] = []
    for piece in pieces:
        reader.feed(piece)
        for _ in range(len(piece) + 1):
            try:
                reply = reader.next_reply()
            except ProtocolError as exc:
                assert exc.fatal and exc.reply.code == 421, exc.reply
                out.append(Err(exc.reply.code, exc.fatal, exc.reply.text))
                return out
            if reply is None:
                break
            assert 0 <= reply.code <= 999 and 1 <= len(reply.lines) <= max_lines, reply
            assert all(len(ln) + 6 <= max_line for ln in reply.lines), reply
            assert all(b"\n" not in ln for ln in reply.lines), reply
            out.append(reply)
        else:
            raise AssertionError("ReplyReader does not make progress")
    return out


def replies(data: bytes) -> None:
    """ReplyReader: one read == any cut; a reply re-encoded parses back to itself."""
    inp = _Input(data, 3)
    max_line = 6 + inp.byte(0) * 2
    max_lines = 1 + inp.byte(1) % 16
    whole = _drive_replies([inp.body], max_line, max_lines)
    split = _drive_replies(_cuts(inp.body, inp.byte(2) | 1), max_line, max_lines)
    assert whole == split, f"framing depends on the reads:\n{whole}\n{split}"
    for reply in whole:
        if isinstance(reply, Reply) and all(len(ln) + 6 <= 4096 for ln in reply.lines):
            again = ReplyReader(max_lines=len(reply.lines))
            again.feed(reply.to_bytes())
            assert again.next_reply() == reply and not again.buffered, reply


# ---------------------------------------------------------------- PROXY protocol


def _unmap(ep: proxyproto.Endpoint | None) -> tuple[str, int] | None:
    """The encoders send an IPv4-mapped IPv6 address as IPv4, by design."""
    if ep is None:
        return None
    addr = ipaddress.ip_address(ep[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr), ep[1]


def proxy_header(data: bytes) -> None:
    """parse_header: only ProxyProtocolError; a prefix never contradicts the whole; the
    decoded addresses encode back to the same header."""
    try:
        hdr = proxyproto.parse_header(data)
    except proxyproto.ProxyProtocolError:
        hdr = None
        failed = True
    else:
        failed = False
    if hdr is not None:
        assert hdr.version in (1, 2) and 0 < hdr.length <= len(data), hdr
        assert (hdr.src is None) == (hdr.dst is None), hdr
        # exactly the header's bytes decode to the same header; more bytes change nothing
        assert proxyproto.parse_header(data[: hdr.length]) == hdr
        assert proxyproto.parse_header(data + b"\r\nEHLO x\r\n") == hdr
        if hdr.src is not None and hdr.dst is not None:
            enc = proxyproto.encode_v1 if hdr.version == 1 else proxyproto.encode_v2
            again = proxyproto.parse_header(enc(hdr.src, hdr.dst))
            assert again is not None
            assert (_unmap(again.src), _unmap(again.dst)) == (_unmap(hdr.src), _unmap(hdr.dst))
    # Prefixes: "need more" or the same outcome, never a different header.
    for cut in sorted({len(data) // 2, len(data) - 1, 1, 13, 16}):
        if not 0 <= cut < len(data):
            continue
        try:
            p = proxyproto.parse_header(data[:cut])
        except proxyproto.ProxyProtocolError:
            assert failed or hdr is None, f"prefix {cut} fails but the whole parses"
            continue
        assert p is None or p == hdr, (cut, p, hdr)


# ---------------------------------------------------------------- EHLO rewriting

_KEYWORDS = (*EARLY_PIPELINING_KEYWORDS, "XPIPE")  # and one of a site's own


def ehlo(data: bytes) -> None:
    """rewrite_ehlo on any 250 reply ReplyReader accepts: PIPELINING and our keywords exactly
    once, nothing only the proxy may use, other lines kept in order, stable when repeated."""
    inp = _Input(data, 2)
    flags = inp.byte(0)
    keywords = tuple(k for i, k in enumerate(_KEYWORDS) if inp.byte(1) >> i & 1)
    starttls = bool(flags & 1)
    reader = ReplyReader()
    lines = b"".join(b"250-" + ln + b"\r\n" for ln in inp.body.split(b"\n") if ln)
    reader.feed(b"250-mta.test\r\n" + lines + b"250 X-END\r\n")
    try:
        reply = reader.next_reply()
    except ProtocolError:
        return
    if reply is None or reply.code != 250:
        return
    out = rewrite_ehlo(reply, keywords=keywords, starttls=starttls)
    assert out.code == 250 and out.lines[0] == reply.lines[0]

    # first space-separated token after any leading blanks, case-folded: how rewrite_ehlo,
    # ehlo_keywords and MTAs name a keyword (" XCLIENT" is XCLIENT)
    def kw(line: bytes) -> bytes:
        return line.strip().split(b" ", 1)[0].upper()

    kws = [kw(ln) for ln in out.lines[1:]]
    assert kws.count(b"PIPELINING") == 1, out
    for k in keywords:
        assert kws.count(k.encode()) == 1, (k, out)
    assert kws.count(b"STARTTLS") == int(starttls), out
    assert b"XCLIENT" not in kws and b"XFORWARD" not in kws, out
    ours = {b"PIPELINING", b"STARTTLS", *(k.encode() for k in keywords)}
    dropped = {b"XCLIENT", b"XFORWARD", *(k.encode() for k in EARLY_PIPELINING_KEYWORDS), *ours}
    kept = [ln for ln in reply.lines[1:] if kw(ln) not in dropped]
    assert [ln for ln in out.lines[1:] if kw(ln) not in ours] == kept
    again = rewrite_ehlo(out, keywords=keywords, starttls=starttls)
    assert again == out, "rewriting is not stable"
    parsed = ehlo_keywords(out)
    assert "PIPELINING" in parsed and all(k in parsed for k in keywords)
    wire = ReplyReader(max_lines=len(out.lines))  # we add up to 4 lines to the MTA's
    wire.feed(out.to_bytes())
    assert wire.next_reply() == out
    assert not ({k.decode("latin-1") for k in kws} & (PROXY_ONLY_KEYWORDS - {"STARTTLS"}))


# ---------------------------------------------------------------- the session machine

_POLICIES = ("defer", "reject", "forward", "accept")
_IDENTITIES = ("proxy-v2", "xclient", "none", "proxy-v1")


def machine(data: bytes) -> None:
    """SessionMachine through the pure harness (tests/machine_harness.py): random client
    bytes and random MTA replies, any interleaving and cut. Nothing may escape but an
    AssertionError for a broken invariant: after every event the machine waits for
    something with a deadline (or an action is pending), its buffers stay bounded, nothing
    reaches the MTA before its banner (``forward``: only early lines), nothing is written
    to a closed side; at the end no group without PIPELINING, nothing the client did not
    send (never XCLIENT/XFORWARD/PROXY), no 250 for a message the MTA did not give, none
    twice."""
    from tests.machine_harness import (
        CLOSE,
        STALL,
        Harness,
        MtaModel,
        Script,
        ScriptedClient,
        Step,
        check_session,
        ehlo_reply,
        make_config,
        run_session,
    )

    inp = _Input(data, 3)
    flags, identity = inp.byte(0), inp.byte(1)
    # what the client sends || what the MTA answers
    client_bytes, _, mta_bytes = inp.body.partition(b"||")
    rng = random.Random(inp.byte(2))  # the interleaving, the cuts, the verdicts
    # The MTA's answers, one per command in order: "|"-separated; "C" closes, "S" stalls,
    # an empty one is the default. Its verdicts' texts stay its own ("queued as Qn").
    scripts: list[Script] = []
    for part in mta_bytes.replace(b"queued", b"queueD").split(b"|") if mta_bytes else []:
        scripts.append({b"C": CLOSE, b"S": STALL}.get(part, part.replace(b"\n", b"\r\n")))

    def responder(line: bytes) -> Script | None:
        if not scripts:
            return None
        script = scripts.pop(0)
        return script or None

    def verdict(n: int) -> Script | None:
        return rng.choice([None, None, b"451 4.3.0 later\r\n", CLOSE, STALL])

    mta = MtaModel(
        ehlo=ehlo_reply(pipelining=bool(flags & 8), chunking=bool(flags & 16)),
        responder=responder,
        verdict_responder=verdict,
    )
    config = make_config(
        pipe_connect={
            "advertise_hosts": ["*"] if flags & 1 else [],
            "unadvertised_early_input": _POLICIES[flags >> 1 & 3],
            "max_early_bytes": 64 + identity * 4,
        },
        upstream={"client_identity": _IDENTITIES[identity & 3]},
        limits={"max_pipelined_commands": 1 + (identity >> 2) % 4},
    )
    h = Harness(mta, config=config)
    client = ScriptedClient(
        [Step(client_bytes, eager=True)] if client_bytes else [],
        end="eof" if flags & 128 else "silent",
        raw=True,
    )
    run_session(h, client, rng.randrange, timeouts=bool(flags & 32), shutdown=bool(flags & 64))
    check_session(h, client)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "commands": commands,
    "replies": replies,
    "proxy_header": proxy_header,
    "ehlo": ehlo,
    "machine": machine,
}
