"""Sans-I/O SMTP framing: client commands, message data, BDAT chunks and MTA replies.

Nothing here touches a socket. Bytes go in with ``feed``; events come out of
``next_event``/``next_reply``. Framing is strict (CRLF only, bounded lines) so that
the proxy and the MTA can never disagree about where a command or a message ends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

CRLF: Final = b"\r\n"
PROXY_V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
# AUTH continuation lines carry base64 blobs; RFC 4954 section 4 allows 12288 octets.
MAX_AUTH_LINE: Final = 12288


class NeedData(Enum):
    NEED_DATA = auto()


NEED_DATA: Final = NeedData.NEED_DATA


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Command:
    """One command line. ``raw`` is exactly what the client sent, CRLF included."""

    verb: str
    args: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class DataChunk:
    """Message bytes after DATA, verbatim (dot-stuffing kept), ending on a line end.
    With ``bare_newline="normalize"`` bare CR/LF line ends come out as CRLF (see
    ``CommandReader``); otherwise the bytes are exactly the client's."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfData:
    """The terminating ``.`` line; the CRLF before it ended the last DataChunk."""

    raw: bytes = b".\r\n"


@dataclass(frozen=True, slots=True)
class BdatChunk:
    data: bytes


@dataclass(frozen=True, slots=True)
class BdatEnd:
    """All octets announced by the BDAT command have been read."""

    last: bool


@dataclass(frozen=True, slots=True)
class RawLine:
    """A line read in answer to a 334 (AUTH exchange), not a command."""

    raw: bytes


@dataclass(frozen=True, slots=True)
class DataRefused:
    """Message data the proxy will not pass on (a bare CR or LF under ``"reject"``). The
    reader now discards the rest of the message; the session stops the MTA's copy at once
    and sends ``reply`` after the client's end of data (``EndOfData``), where the client
    reads replies again (RFC 5321 4.1.1.4)."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class Closed:
    """The client closed its side. Bytes it left unframed (an unfinished line, message or
    chunk) are dropped: nothing acts on a part of a command."""


ClientEvent = Command | DataChunk | EndOfData | DataRefused | BdatChunk | BdatEnd | RawLine | Closed


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    lines: tuple[bytes, ...]

    @classmethod
    def make(cls, code: int, *lines: str) -> Reply:
        return cls(code, tuple(line.encode() for line in lines) or (b"",))

    def to_bytes(self) -> bytes:
        if len(self.lines) == 1:  # most replies
            return b"%03d %s\r\n" % (self.code, self.lines[0])
        code = b"%03d" % self.code
        out = [code + b"-" + text + CRLF for text in self.lines[:-1]]
        out.append(code + b" " + self.lines[-1] + CRLF)
        return b"".join(out)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def text(self) -> str:
        return " / ".join(line.decode("utf-8", "replace") for line in self.lines)


class ProtocolError(Exception):
    """Input that breaks SMTP framing. ``reply`` goes to the peer; ``fatal`` ends the session."""

    def __init__(self, reply: Reply, *, fatal: bool) -> None:
        super().__init__(reply.text)
        self.reply = reply
        self.fatal = fatal


def _bare_newline() -> ProtocolError:
    return ProtocolError(
        Reply.make(554, "5.5.2 Bare CR or LF not allowed: lines must end with CRLF"), fatal=True
    )


# ---------------------------------------------------------------- buffer


class _Buffer:
    """A receive buffer with a read offset, compacted lazily so consuming stays linear."""

    __slots__ = ("_data", "_start")

    def __init__(self) -> None:
        self._data = bytearray()
        self._start = 0

    def __len__(self) -> int:
        return len(self._data) - self._start

    def append(self, data: bytes) -> None:
        self._data += data

    def find(self, needle: bytes, offset: int = 0) -> int:
        pos = self._data.find(needle, self._start + offset)
        return -1 if pos < 0 else pos - self._start

    def rfind(self, needle: bytes, end: int | None = None) -> int:
        stop = len(self._data) if end is None else self._start + end
        pos = self._data.rfind(needle, self._start, stop)
        return -1 if pos < 0 else pos - self._start

    def startswith(self, prefix: bytes) -> bool:
        return self._data.startswith(prefix, self._start)

    def peek(self, n: int) -> bytes:
        return bytes(self._data[self._start : self._start + n])

    def take(self, n: int) -> bytes:
        out = bytes(self._data[self._start : self._start + n])
        self._start += len(out)
        if self._start > 65536 and self._start * 2 > len(self._data):
            del self._data[: self._start]
            self._start = 0
        return out

    def clear(self) -> int:
        n = len(self)
        self._data.clear()
        self._start = 0
        return n


# ---------------------------------------------------------------- client side


class _Mode(Enum):
    COMMAND = auto()
    LINE = auto()
    DATA = auto()
    DISCARD = auto()  # the rest of a refused message, up to its end of data
    BDAT = auto()


# Message bytes without a line end leave the buffer in pieces of this size: the MTA judges
# line length (Postfix wraps at line_length_limit), the proxy's memory stays bounded. It is
# also the unit a data timeout bounds (``CommandReader.units``).
DATA_PIECE: Final = 65536


# re.ASCII: with Unicode case folding "LA\u017fT" (long s) would match LAST, which no MTA
# agrees with.
_BDAT_ARGS = re.compile(r"([0-9]{1,18})(?: +(LAST))? *", re.IGNORECASE | re.ASCII)


# What a command line may hold besides its CRLF: a verb of letters, digits, "-" or "_",
# then nothing or SP and arguments of printable ASCII, SP and 8-bit bytes (SMTPUTF8). MTAs
# tokenize more loosely (Postfix skips leading blanks, splits the verb on HT, VT and FF too,
# cuts the line at NUL), so a line they could read as another verb than ours -- "DATA<TAB>",
# " XCLIENT ...", "DATA<NUL>x" -- never reaches them.
_COMMAND_SYNTAX = re.compile(rb"[A-Za-z0-9_-]+(?: [\x20-\x7e\x80-\xff]*)?")
# An AUTH response (base64 or "*"): no blanks or control characters either.
_RESPONSE_SYNTAX = re.compile(rb"[\x21-\x7e\x80-\xff]*")


def _bad_syntax() -> ProtocolError:
    return ProtocolError(
        Reply.make(500, "5.5.2 Syntax error: blank, control character or NUL in command line"),
        fatal=False,
    )


def strict_command(line: bytes) -> Command:
    """``line`` (ending in LF) as a command, or the ProtocolError the proxy answers it with:
    bare CR or LF (fatal), or a line an MTA could tokenize differently (500)."""
    _check_line(line)
    if not _COMMAND_SYNTAX.fullmatch(line, 0, len(line) - 2):
        raise _bad_syntax()
    return parse_command(line)


def parse_command(raw: bytes) -> Command:
    verb, _, args = raw[:-2].partition(b" ")
    # bytes.upper() folds ASCII only, as MTAs do: str.upper() would turn "ma\u0131l"
    # (dotless i) into MAIL, a verb the MTA does not see.
    return Command(
        verb.upper().decode("utf-8", "surrogateescape"),
        args.decode("utf-8", "surrogateescape"),
        raw,
    )


def _check_line(line: bytes) -> None:
    """``line`` ends with LF; refuse a bare LF or a CR anywhere but before that LF."""
    if len(line) < 2 or line[-2] != 0x0D or line.find(b"\r", 0, len(line) - 2) >= 0:
        raise _bare_newline()


class CommandReader:
    """Frames what a client sends. The session drives mode changes it learns from replies:
    ``start_data`` after a 354, ``expect_line`` after a 334. BDAT chunks are framed by
    length right after their command, since the client sends them without waiting.

    ``bare_newline`` decides what a bare CR or LF in message data does: ``"reject"`` (a
    fatal 554) or ``"normalize"``: each bare CR, bare LF (and so each CR LF pair that is
    not adjacent, e.g. ``\r\r\n`` is two line ends) becomes CRLF before it leaves, so the
    MTA never sees one. End of data stays exactly CRLF "." CRLF in the client's own bytes,
    as in Postfix 3.9's ``smtpd_forbid_bare_newline = normalize``: a line holding only "."
    that normalisation produced (``\n.\n``, ``\r\n.\r``, ...) is message text, and is
    sent dot-stuffed (``..``) so the MTA cannot end the message there either. Whatever
    follows it (a smuggled MAIL FROM...) stays inside the same message. Commands are
    always strict CRLF."""

    def __init__(self, max_command_line: int = 512, bare_newline: str = "reject") -> None:
        if bare_newline not in ("reject", "normalize"):
            raise ValueError(f"bare_newline must be reject or normalize, not {bare_newline!r}")
        self.max_command_line = max_command_line
        self.normalize = bare_newline == "normalize"
        # Completed units of input: a command or AUTH line, a message line (or DATA_PIECE
        # bytes of one), DATA_PIECE bytes of a BDAT chunk, an end. A timeout bounds the
        # wait for the next unit, not each read, so a trickling client cannot stretch it.
        self.units = 0
        self._piece = 0  # BDAT or discarded bytes since the last unit (_advance)
        self.discarded = 0  # bytes of a refused message dropped so far
        # In DATA: the last line end was a real CRLF (the DATA line's own CRLF at first), so
        # a "." line starting here would be the client's real end of data.
        self._clean_line_start = True
        self._mid_line = False  # the last DataChunk was a piece of a line without its end
        self._buf = _Buffer()
        self._mode = _Mode.COMMAND
        self._bdat_left = 0
        self._bdat_last = False
        self._discarding = False  # inside an over-long command line
        self._eof = False
        self._started = False  # first bytes checked for a PROXY header

    # -- input

    def feed(self, data: bytes) -> None:
        if self._eof:
            raise RuntimeError("feed after EOF")
        self._buf.append(data)

    def feed_eof(self) -> None:
        self._eof = True

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def in_data(self) -> bool:
        return self._mode in (_Mode.DATA, _Mode.DISCARD)

    @property
    def bdat_left(self) -> int:
        """Octets of the current BDAT chunk not yet read."""
        return self._bdat_left if self._mode is _Mode.BDAT else 0

    def start_data(self) -> None:
        assert self._mode is _Mode.COMMAND
        self._mode = _Mode.DATA
        self._clean_line_start = True
        self._mid_line = False

    def expect_line(self) -> None:
        assert self._mode is _Mode.COMMAND
        self._mode = _Mode.LINE

    def discard_buffered(self) -> int:
        """Drop unread input (after STARTTLS: plaintext must not survive the handshake)."""
        return self._buf.clear()

    # -- output

    def next_event(self) -> ClientEvent | NeedData:
        if not self._started:
            sig = PROXY_V2_SIGNATURE
            if len(self._buf) < len(sig) and not self._eof and sig.startswith(self._buf.peek(12)):
                return NEED_DATA
            self._started = True
            if self._buf.startswith(PROXY_V2_SIGNATURE):
                raise _proxy_header_refused()
        event: ClientEvent | NeedData
        try:
            if self._mode is _Mode.DATA:
                event = self._next_data()
            elif self._mode is _Mode.DISCARD:
                event = self._next_discard()
            elif self._mode is _Mode.BDAT:
                event = self._next_bdat()
            else:
                event = self._next_line()
        except ProtocolError:
            self.units += 1
            raise
        if event is NEED_DATA:
            if not self._eof:
                return event
            event = Closed()
        if not isinstance(event, BdatChunk):
            self.units += 1
        return event

    def _next_line(self) -> Command | RawLine | NeedData:
        limit = MAX_AUTH_LINE if self._mode is _Mode.LINE else self.max_command_line
        end = self._buf.find(b"\n")
        if end < 0:
            if len(self._buf) > limit:
                # Drop what we have and keep dropping until the line ends, so memory stays
                # bounded; the error is reported in order once the line is complete.
                self._discarding = True
                self._buf.clear()
            return NEED_DATA
        line = self._buf.take(end + 1)
        if self._discarding or len(line) > limit:
            self._discarding = False
            self._mode = _Mode.COMMAND  # an AUTH response too is over with its line
            raise ProtocolError(Reply.make(500, "5.5.2 Line too long"), fatal=False)
        if self._mode is _Mode.LINE:
            self._mode = _Mode.COMMAND
            _check_line(line)
            if not _RESPONSE_SYNTAX.fullmatch(line, 0, len(line) - 2):
                raise _bad_syntax()
            return RawLine(line)
        cmd = strict_command(line)
        if cmd.verb == "PROXY":
            raise _proxy_header_refused()
        if cmd.verb == "BDAT":
            m = _BDAT_ARGS.fullmatch(cmd.args)
            if m is None:
                # Without a valid size the chunk cannot be framed: stop here.
                raise ProtocolError(Reply.make(501, "5.5.4 Syntax: BDAT size [LAST]"), fatal=True)
            self._mode = _Mode.BDAT
            self._bdat_left = int(m.group(1))
            self._bdat_last = m.group(2) is not None
        return cmd

    def _next_bdat(self) -> BdatChunk | BdatEnd | NeedData:
        if self._bdat_left == 0:
            self._mode = _Mode.COMMAND
            return BdatEnd(self._bdat_last)
        if not len(self._buf):
            return NEED_DATA
        data = self._buf.take(self._bdat_left)
        self._bdat_left -= len(data)
        self._advance(len(data))
        return BdatChunk(data)

    def _advance(self, n: int, lines: int = 0) -> None:
        """Count ``n`` octets passed or dropped in bulk, holding ``lines`` line ends: a unit
        per line, or per DATA_PIECE octets where there are none."""
        self._piece += n
        if lines or self._piece >= DATA_PIECE:
            self.units += max(lines, 1)
            self._piece = 0

    def _end_at_start(self) -> EndOfData | None:
        """The client's end of data, if the buffer starts with it after a real CRLF."""
        if self._clean_line_start and self._buf.startswith(b".\r\n"):
            self._buf.take(3)
            self._mode = _Mode.COMMAND
            return EndOfData()
        return None

    def _next_data(self) -> DataChunk | EndOfData | DataRefused | NeedData:
        buf = self._buf
        if end_of_data := self._end_at_start():
            return end_of_data
        # Whole lines leave the buffer (or DATA_PIECE bytes of a line without an end), so
        # the terminator is either at the buffer's start after a real CRLF, or after a CRLF
        # inside it.
        stop = buf.find(b"\r\n.\r\n")
        if stop >= 0:
            end = stop + 2
        else:
            end = buf.rfind(b"\n") + 1
            if self.normalize and len(buf):
                # A bare CR ends a line too, but only once the next byte shows it is not
                # the CR of a CRLF: never cut after a CR that is the last byte we have.
                end = max(end, buf.rfind(b"\r", len(buf) - 1) + 1)
        if end <= 0:
            if len(buf) < max(DATA_PIECE, 3):  # 3: it could still become ".\r\n"
                return NEED_DATA
            # A long line: pass a piece on, keeping a last CR that may start a CRLF. In
            # reject mode any other CR is bare; in normalize mode there is none (it would
            # have ended a line above).
            end = len(buf) - 1 if buf.find(b"\r", len(buf) - 1) >= 0 else len(buf)
            if not end:
                return NEED_DATA  # only that CR (with a piece size of 1, as tests use)
            piece = buf.take(end)
            self._clean_line_start = False
            self._mid_line = True
            if not self.normalize and b"\r" in piece:
                return self._refuse_data(clean=False)
            return DataChunk(piece)
        chunk = buf.take(end)
        mid_line, self._mid_line = self._mid_line, False
        if self.normalize:
            return DataChunk(self._normalized(chunk, mid_line))
        self._clean_line_start = True
        if not _only_crlf(chunk):
            return self._refuse_data(clean=chunk.endswith(b"\r\n"))
        return DataChunk(chunk)

    def _refuse_data(self, *, clean: bool) -> DataRefused:
        """Stop passing the message on; read on to the client's end of data, silently."""
        self._mode = _Mode.DISCARD
        self._clean_line_start = clean
        return DataRefused(_bare_newline().reply)

    def _next_discard(self) -> EndOfData | NeedData:
        buf = self._buf
        if end_of_data := self._end_at_start():
            return end_of_data
        stop = buf.find(b"\r\n.\r\n")
        if stop >= 0:
            self.discarded += stop
            buf.take(stop + 5)
            self._mode = _Mode.COMMAND
            return EndOfData()
        # Keep what could be the start of the terminator. Dropped lines (or DATA_PIECE
        # bytes of one) are units as in DATA: a long refused message on a slow link must
        # reach its end, and the 554, within the data timeouts.
        drop = max(0, len(buf) - 4)
        if drop:
            dropped = buf.take(drop)
            self.discarded += drop
            self._clean_line_start = False
            self._advance(drop, dropped.count(b"\n"))
        return NEED_DATA

    def _normalized(self, chunk: bytes, mid_line: bool) -> bytes:
        """``chunk`` (whole lines, any line ends) with CRLF line ends and every "." line
        stuffed: the first CRLF "." CRLF is never inside a chunk, so any "." line here is
        one the client did not send as an end of data. After a piece of a long line
        (``mid_line``) the first line is that line's rest, not a line of its own."""
        clean = self._clean_line_start
        self._clean_line_start = chunk.endswith(b"\r\n")
        if clean and _only_crlf(chunk):
            return chunk  # the common case: already CRLF only
        lines = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        lines.pop()  # the chunk ends with a line end
        first = int(mid_line)
        lines[first:] = [b".." if line == b"." else line for line in lines[first:]]
        return b"\r\n".join(lines) + b"\r\n"


def _proxy_header_refused() -> ProtocolError:
    return ProtocolError(
        Reply.make(554, "5.7.1 PROXY protocol is not accepted from clients"), fatal=True
    )


def _only_crlf(chunk: bytes) -> bool:
    """No bare CR or LF in ``chunk``. Counting in C keeps this fast for large messages."""
    lf = chunk.count(b"\n")
    return chunk.count(b"\r\n") == lf == chunk.count(b"\r")


# ---------------------------------------------------------------- MTA side


class ReplyReader:
    """Frames the MTA's replies: ``ddd-text`` continuation lines, then ``ddd text``."""

    def __init__(self, max_line: int = 4096, max_lines: int = 200) -> None:
        self.max_line = max_line
        self.max_lines = max_lines
        self._buf = _Buffer()
        self._lines: list[bytes] = []
        self._code = 0

    def feed(self, data: bytes) -> None:
        self._buf.append(data)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_reply(self) -> Reply | None:
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > self.max_line:
                    raise _bad_reply("reply line too long")
                return None
            line = self._buf.take(end + 1)
            if len(line) > self.max_line:
                raise _bad_reply("reply line too long")
            if not line.endswith(CRLF):
                raise _bad_reply("reply line without CRLF")
            body = line[:-2]
            if len(body) < 3 or not body[:3].isdigit() or body[3:4] not in (b"", b" ", b"-"):
                raise _bad_reply("malformed reply line")
            code = int(body[:3])
            if self._lines and code != self._code:
                raise _bad_reply("reply code changed inside a multi-line reply")
            self._code = code
            self._lines.append(body[4:])
            if body[3:4] != b"-":
                lines, self._lines = tuple(self._lines), []
                return Reply(code, lines)
            if len(self._lines) >= self.max_lines:
                raise _bad_reply("too many reply lines")


def _bad_reply(why: str) -> ProtocolError:
    return ProtocolError(Reply.make(421, f"4.4.2 Upstream MTA protocol error: {why}"), fatal=True)


# ---------------------------------------------------------------- pipelining (RFC 2920)

# Commands a client may send without waiting for the previous reply. Everything else ends
# a group: EHLO/HELO, DATA, BDAT LAST, QUIT, NOOP, VRFY, EXPN, STARTTLS, AUTH, unknown verbs.
PIPELINABLE: Final = frozenset({"MAIL", "RCPT", "RSET", "SEND", "SOML", "SAML"})


def ends_group(cmd: Command) -> bool:
    if cmd.verb == "BDAT":
        m = _BDAT_ARGS.fullmatch(cmd.args)
        return m is None or m.group(2) is not None
    return cmd.verb not in PIPELINABLE


# ---------------------------------------------------------------- EHLO replies

# One keyword per Exim generation (EARLY_PIPE_FEATURE_NAME in its src/src/macros.h): 4.96+
# PIPECONNECT, 4.94.1-4.95 PIPE_CONNECT, 4.92-4.94 X_PIPE_CONNECT. Each matches only its own.
EARLY_PIPELINING_KEYWORDS: Final = ("PIPECONNECT", "PIPE_CONNECT", "X_PIPE_CONNECT")
# Commands only the proxy may send to the MTA: they tell it who the client is, so a client's
# own is refused (550), never relayed. A PROXY header is not among them: it is not an SMTP
# command but the connection's first bytes in another protocol, refused by CommandReader
# (554, fatal) wherever it appears, and the MTA takes it only as the very first bytes.
PROXY_ONLY_VERBS: Final = frozenset({"XCLIENT", "XFORWARD"})
# EHLO keywords the proxy removes from the MTA's reply: the extensions of those commands,
# and STARTTLS, which the MTA offers on its own (cleartext) leg; the proxy offers its own
# STARTTLS when it terminates TLS (rewrite_ehlo).
PROXY_ONLY_KEYWORDS: Final = PROXY_ONLY_VERBS | {"STARTTLS"}


def ehlo_keywords(reply: Reply) -> dict[str, str]:
    """Keyword (upper case) -> parameters, from a 250 EHLO reply (first line is the greeting)."""
    out: dict[str, str] = {}
    for line in reply.lines[1:]:
        kw, _, params = line.decode("ascii", "replace").strip().partition(" ")
        if kw:
            out[kw.upper()] = params
    return out


def rewrite_ehlo(
    reply: Reply,
    *,
    keywords: tuple[str, ...],
    starttls: bool = False,
) -> Reply:
    """The EHLO reply as the client should see it.

    The proxy always offers PIPELINING (it pipelines the client side itself), puts the
    early-pipelining ``keywords`` right after it, offers STARTTLS only when it terminates TLS,
    and removes what only the proxy may use. Every other line stays as the MTA wrote it, in
    order, so the reply a client caches is stable from one session to the next.
    """
    if reply.code != 250:
        return reply
    drop = set(EARLY_PIPELINING_KEYWORDS) | PROXY_ONLY_KEYWORDS | {k.upper() for k in keywords}
    lines: list[bytes] = [reply.lines[0]]
    inserted = False

    def insert_ours() -> None:
        lines.append(b"PIPELINING")
        lines.extend(k.encode("ascii") for k in keywords)

    for line in reply.lines[1:]:
        # Split as ehlo_keywords does (leading blanks stripped), so " XCLIENT ..." cannot
        # survive here and still be read as XCLIENT there.
        kw = line.strip().split(b" ", 1)[0].decode("ascii", "replace").upper()
        if kw in drop:
            continue
        if kw == "PIPELINING":
            if not inserted:
                insert_ours()
                inserted = True
            continue
        lines.append(line)
    if not inserted:
        # No PIPELINING from the MTA: ours goes first, where a reader looks for it.
        head, rest = lines[:1], lines[1:]
        lines = head
        insert_ours()
        lines.extend(rest)
    if starttls:
        lines.append(b"STARTTLS")
    return Reply(250, tuple(lines))
