"""Outbound mode's session, sans-I/O: the MTA behind the proxy sends mail to a remote MX.

The client is the MTA (trusted: our own), the upstream the MX (the Internet). The driver
(``proxy/outbound.py``) feeds the same events as inbound (``ClientData`` is the MTA's,
``UpstreamData`` the MX's) and performs the actions below plus ``SendClient`` /
``SendUpstream`` / ``CloseUpstream`` / ``CloseClient``.

Two paths, chosen at the start from the EHLO cache (``proxy/ehlocache.py``):

* **miss**: relay byte for byte and learn the MX's banner and EHLO reply (``Learn``);
* **hit**: serve the cached banner and EHLO reply at once, take the group the MTA pipelines
  behind them (MAIL, RCPT..., DATA, or STARTTLS), send the MTA's EHLO and that group to
  the MX as soon as the connection is up — before its banner — then check the MX's real
  banner and EHLO reply against the cache and relay its replies to the group. From then
  on every command and reply is tracked, so the proxy knows what the MTA waits for.

Once the proxy served a cached greeting it speaks for the MX, so it never turns what the
MX did not judge into a permanent failure (docs/outbound.md has the table): a sync error
to the early talk is retried in the same session without it; other surprises become 4xx.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

from ..smtp import (
    EARLY_PIPELINING_KEYWORDS,
    PIPELINABLE,
    ProtocolError,
    Reply,
    ReplyReader,
    ehlo_keywords,
)
from .events import (
    ClientBroken,
    ClientData,
    ClientEof,
    CloseClient,
    CloseUpstream,
    DeadlinePassed,
    Event,
    SendClient,
    SendUpstream,
    Shutdown,
    UpstreamBroken,
    UpstreamConnected,
    UpstreamConnectFailed,
    UpstreamData,
    UpstreamEof,
)
from .session import SHUTTING_DOWN

# EHLO keywords whose change makes the MX judge the MTA's commands differently from what
# the cached reply promised: its 5xx may then be the cache's fault, so it becomes a 4xx.
FEATURES = frozenset(
    {"SIZE", "SMTPUTF8", "8BITMIME", "DSN", "AUTH", "PIPELINING", "STARTTLS", "CHUNKING"}
)
GROUP_WAIT = 0.05  # seconds without MTA input that end a pipelined group short of DATA
MAX_GROUP_BYTES = 65536
MAX_LINE = 65536  # an MTA line longer than this is not tracked: the session is spliced

NO_TLS = Reply.make(454, "4.7.0 TLS not available: the remote server no longer offers STARTTLS")
CONNECT_FAILED = Reply.make(451, "4.4.1 Connection to the remote server failed")
MX_CLOSED = Reply.make(421, "4.4.2 Remote server closed the connection or timed out")


def _fail_reply(code: str, why: str) -> Reply:
    return Reply.make(451, f"{code} {why}")


# ---------------------------------------------------------------- actions (beyond inbound's)


@dataclass(frozen=True, slots=True)
class ConnectMx:
    """Connect to the original destination. ``early``: bytes to write the moment the
    connection is up, before anything else happens (in the SYN with ``fast_open``)."""

    early: bytes = b""
    fast_open: bool = False


@dataclass(frozen=True, slots=True)
class Splice:
    """Nothing more to track: copy bytes both ways (TLS passthrough, an untracked relay)."""


@dataclass(frozen=True, slots=True)
class Learn:
    """Store the MX's greeting, and the MTA's EHLO line that it answered (sent on the
    MTA's behalf at the next connect, before the MX's banner)."""

    banner: Reply
    ehlo: Reply
    client_ehlo: bytes = b""


@dataclass(frozen=True, slots=True)
class Forget:
    """The cache was wrong about this MX: drop the entry (a strike). ``block``: never
    cache this destination again for a while (a loop)."""

    reason: str
    block: bool = False


@dataclass(frozen=True, slots=True)
class Verified:
    """The MX's real greeting matched the cache. ``client_ehlo``: the MTA's EHLO line, if
    the entry does not hold it yet (or held another)."""

    client_ehlo: bytes = b""


OutboundAction = (
    SendClient
    | SendUpstream
    | CloseUpstream
    | CloseClient
    | ConnectMx
    | Splice
    | Learn
    | Forget
    | Verified
)


def _coalesced(actions: list[OutboundAction]) -> list[OutboundAction]:
    """Adjacent writes to the same side as one: a pipelined group leaves in one segment,
    and the replies to it reach the MTA in one (verdict if any part is one)."""
    out: list[OutboundAction] = []
    for action in actions:
        last = out[-1] if out else None
        if isinstance(action, SendUpstream) and isinstance(last, SendUpstream):
            out[-1] = SendUpstream(last.data + action.data)
        elif isinstance(action, SendClient) and isinstance(last, SendClient):
            out[-1] = SendClient(last.data + action.data, last.verdict or action.verdict)
        else:
            out.append(action)
    return out


class Mode(Enum):
    CONNECTING = "connecting"  # waiting for the MX's connection (miss, or hit without TFO)
    SERVE = "serve"  # hit: cached banner served; waiting for the MTA's first command
    GATHER = "gather"  # hit: cached EHLO reply served; taking the pipelined group
    TRACK = "track"  # commands and replies tracked, towards the MX
    SPLICE = "splice"  # bytes copied both ways
    DONE = "done"


class _Kind(Enum):
    BANNER = "banner"
    EHLO = "ehlo"  # the MTA's EHLO, already answered from the cache
    RELAY = "relay"  # a reply the MTA waits for
    SWALLOW = "swallow"  # answers an EHLO sent for the MTA that the MTA did not send


@dataclass(slots=True)
class _Pending:
    kind: _Kind
    verb: str = ""
    line: bytes = b""
    sent: bool = False


def _verb(line: bytes) -> str:
    return line.split(b" ", 1)[0].strip().upper().decode("ascii", "replace")


def _asks_smtputf8(mail: bytes) -> bool:
    """Whether a MAIL line carries the SMTPUTF8 parameter (not merely the word, in an
    address): the parameters follow the path's closing ``>``."""
    params = mail.rpartition(b">")[2].upper().split()
    return any(p == b"SMTPUTF8" or p.startswith(b"SMTPUTF8=") for p in params)


def _greeting_name(reply: Reply) -> bytes:
    return reply.lines[0].split(b" ", 1)[0].lower()


def _ehlo_name(line: bytes) -> bytes:
    return line[5:].strip().lower()


def features(ehlo: Reply) -> dict[str, str]:
    """What of an EHLO reply decides how the MX judges the MTA's commands."""
    return {k: v for k, v in ehlo_keywords(ehlo).items() if k in FEATURES}


def early_keywords(ehlo: Reply) -> tuple[str, ...]:
    keywords = ehlo_keywords(ehlo)
    return tuple(k for k in EARLY_PIPELINING_KEYWORDS if k in keywords)


def served_ehlo(ehlo: Reply) -> Reply:
    """The cached EHLO reply as the MTA gets it: no early-pipelining keyword (the MTA is not
    to cache us), no CHUNKING (the group is taken up to DATA), SIZE without its number and
    SMTPUTF8 offered, so the MTA never refuses a message locally on a stale limit or
    feature: the MX judges it, and a 5xx caused by a changed feature becomes a 4xx."""
    lines = [ehlo.lines[0]]
    utf8 = False
    hidden = {k.encode() for k in EARLY_PIPELINING_KEYWORDS} | {b"CHUNKING"}
    for line in ehlo.lines[1:]:
        keyword = line.strip().split(b" ", 1)[0].upper()
        if keyword in hidden:
            continue
        if keyword == b"SIZE":
            line = b"SIZE"
        utf8 = utf8 or keyword == b"SMTPUTF8"
        lines.append(line)
    if not utf8:
        lines.append(b"SMTPUTF8")
    return Reply(250, tuple(lines))


@dataclass(frozen=True, slots=True)
class Greeting:
    """A cached banner and EHLO reply, and the EHLO line the MTA sent for them."""

    banner: Reply
    ehlo: Reply
    client_ehlo: bytes = b""


@dataclass(slots=True)
class OutboundLog:
    """What the session's log line and metrics say."""

    path: str = "relay"  # relay (a miss) | early | retried | in-step (a hit, not early)
    early_used: bool = False
    cache: str = "miss"  # miss | hit | bypass (the destination is not in outbound.hosts)
    learned: bool = False
    invalidated: str = ""  # why the entry was dropped or rewritten
    failure: str = ""  # the 4xx the proxy gave in the MX's place, if any
    outcome: str = "open"
    last_reply: str = ""
    round_trips_saved: int = 0


class OutboundMachine:
    """One outbound session. ``greeting``: the cache entry (a hit) or None (a miss);
    ``learn``: whether a miss may store what it sees; ``fast_open``: connect only once the
    group is taken, and put it in the SYN."""

    def __init__(
        self,
        *,
        greeting: Greeting | None,
        learn: bool,
        fast_open: bool = False,
        command_timeout: float = 300.0,
        reply_timeout: float = 300.0,
        data_term_timeout: float = 600.0,
        max_reply_line: int = 4096,
    ) -> None:
        self.greeting = greeting
        self.learn = learn
        self.fast_open = fast_open and greeting is not None
        self._command_timeout = command_timeout
        self._reply_timeout = reply_timeout
        self._data_term = data_term_timeout
        self._max_reply_line = max_reply_line
        self.mode = Mode.CONNECTING
        self.deadline: float | None = None
        self.log = OutboundLog(cache="hit" if greeting is not None else "miss")
        self._mx = ReplyReader(max_line=max_reply_line)
        self._mta = bytearray()  # MTA bytes not yet framed
        self._pending: deque[_Pending] = deque()  # what the MX will answer, in order
        self._connected = False
        # The MTA's EHLO went out before the MX's banner came; never after a retry (set only
        # while not retried, cleared by it), so it also says that one is still allowed.
        self._early = False
        self._retried = False
        self._relayed = False  # a reply of the MX's reached the MTA
        self._checked = False  # the MX's real EHLO reply was accepted
        self._changed = False  # ... and its features differ from the cache's
        self._real_banner: Reply | None = None
        self._real_ehlo: Reply | None = None
        self._ehlo_line = b""
        self._group_bytes = 0
        self._body = False  # the MTA is sending message data
        self._tail = b""  # last bytes of message data (the end marker may straddle reads)
        self._held_quit = b""
        self._stop_after_verdict = False
        self._failed: Reply | None = None  # the proxy answers in the MX's place from now on
        # A miss: every byte relayed as it came (commands and replies still tracked, so
        # timeouts, QUIT and a shutdown behave as on a hit); the first EHLO reply learned.
        self._observe = greeting is None
        self._mx_raw = bytearray()  # the MX's bytes, as they came, not yet relayed
        self._raw = b""  # the reply being handled, as the MX wrote it
        self._mta_closed = False  # the MTA half-closed: what it waits for, then the end

    # ------------------------------------------------------------ what the driver asks

    @property
    def done(self) -> bool:
        return self.mode is Mode.DONE

    @property
    def spliced(self) -> bool:
        return self.mode is Mode.SPLICE

    # ------------------------------------------------------------ entry points

    def start(self, now: float) -> list[OutboundAction]:
        if self.greeting is None:
            return [ConnectMx()]  # the driver bounds the connect itself
        line = self.greeting.client_ehlo
        if self.fast_open:
            # The cached greeting at once; the connect waits for the MTA's EHLO and group
            # (a loopback moment), which all ride in the SYN: one round trip more saved
            # than with the EHLO alone in it (the group would wait for the handshake).
            self.mode = Mode.SERVE
            self._idle(now)
            return [SendClient(self.greeting.banner.to_bytes())]
        if line:  # written the moment the connection is up: the MX sees it before it greets
            self._pending.append(_Pending(_Kind.BANNER))
            self._pre_ehlo(line)
            return [ConnectMx(early=line)]
        return [ConnectMx()]

    def _pre_ehlo(self, line: bytes) -> None:
        """The EHLO the MTA sent last time goes before the MX's banner, as an early-pipelining
        client's does: the MX sees it waiting when it is about to greet (Exim then logs
        ``L*``), and the MTA's own EHLO, when it comes, has nothing left to wait for."""
        self._ehlo_line = line
        self._pending.append(_Pending(_Kind.EHLO, "EHLO", line, sent=True))
        self._early = True
        self.log.path = "early"

    def handle(self, event: Event, now: float) -> list[OutboundAction]:
        return _coalesced(self._handle(event, now))

    def _handle(self, event: Event, now: float) -> list[OutboundAction]:
        if self.mode is Mode.DONE:
            return []
        if isinstance(event, ClientData):
            return self._from_mta(event.data, now)
        if isinstance(event, UpstreamData):
            return self._from_mx(event.data, now)
        if isinstance(event, UpstreamConnected):
            return self._mx_connected(now)
        if isinstance(event, UpstreamConnectFailed):
            return self._connect_failed(event.reason)
        if isinstance(event, UpstreamEof | UpstreamBroken):
            return self._mx_gone(now)
        if isinstance(event, ClientEof):
            return self._mta_done()
        if isinstance(event, ClientBroken):
            # Spliced (TLS), a reset is how many MTAs end: unread close_notify in its buffer.
            self.log.outcome = "mta-closed" if self.mode is Mode.SPLICE else "mta-gone"
            return self._end()
        if isinstance(event, DeadlinePassed):
            if self.deadline is None or now < self.deadline:
                return []  # it moved while the event was on its way
            return self._deadline(now)
        if isinstance(event, Shutdown):
            return self._shutdown()
        return []

    # ------------------------------------------------------------ connection and end

    def _mx_connected(self, now: float) -> list[OutboundAction]:
        self._connected = True
        if self.greeting is None:
            self.mode = Mode.TRACK
            self._pending.append(_Pending(_Kind.BANNER))
            self._reply_deadline(now)
            return self._frame_mta(now)
        if self._retried or self.fast_open:
            if self._retried:
                self._pending.appendleft(_Pending(_Kind.BANNER))
                self._reply_deadline(now)
            return self._send_unsent()
        self.mode = Mode.SERVE
        if not self._pending:  # no EHLO went with the connect
            self._pending.append(_Pending(_Kind.BANNER))
        self._idle(now)
        return [SendClient(self.greeting.banner.to_bytes()), *self._frame_mta(now)]

    def _connect_failed(self, reason: str) -> list[OutboundAction]:
        self.log.outcome = "connect-failed"
        if self.mode is Mode.CONNECTING:
            # No greeting was served: the MTA sees a plain connection failure.
            return self._end()
        # Fast open, or a retry: the MTA has our greeting and waits for replies.
        self._connected = False
        return self._fail(CONNECT_FAILED)

    def _mx_gone(self, now: float) -> list[OutboundAction]:
        if self.mode in (Mode.SPLICE, Mode.CONNECTING):
            self.log.outcome = "mx-closed"
            return self._end()
        if self._early and not self._relayed:
            return self._retry("closed", now)
        return self._mx_lost("mx-closed")

    def _mx_lost(self, outcome: str) -> list[OutboundAction]:
        """The MX went away or went silent: the MTA gets a 421 (a deferral), unless it had
        said QUIT and misses only the 221."""
        self.log.outcome = outcome
        waiting = self._body or any(
            p.kind is _Kind.RELAY and p.verb != "QUIT" for p in self._pending
        )
        if self._failed is None and waiting:
            self.log.failure = self.log.failure or MX_CLOSED.text
            return [SendClient(MX_CLOSED.to_bytes()), *self._end()]
        return self._end()  # the MTA waits for nothing: the close says it all

    def _end(self) -> list[OutboundAction]:
        self.mode = Mode.DONE
        self.deadline = None
        if self.log.outcome == "open":
            self.log.outcome = "closed"
        return [CloseUpstream(), CloseClient()]

    def _mta_done(self) -> list[OutboundAction]:
        """The MTA closed its side. An MTA that half-closes behind a pipelined QUIT (Exim
        does) still reads: its message's verdict and the rest of the replies go to it."""
        self._mta_closed = True
        if self._waiting_mx and self._failed is None and not self._body:
            return self._send_unsent()
        self.log.outcome = "mta-closed"
        return self._end()

    @property
    def _waiting_mx(self) -> bool:
        return bool(self._held_quit) or any(p.kind is _Kind.RELAY for p in self._pending)

    def _shutdown(self) -> list[OutboundAction]:
        if any(p.verb == "." for p in self._pending):
            # The message is with the MX: its verdict first, or the MTA sends it again.
            self._stop_after_verdict = True
            return []
        self.log.outcome = "shutdown"
        greeted = self.mode in (Mode.SERVE, Mode.GATHER, Mode.TRACK) and self._failed is None
        if greeted and not (self._observe and self._real_banner is None):
            # The MX, closed before any end of data, drops what it has of a message.
            return [SendClient(SHUTTING_DOWN.to_bytes()), *self._end()]
        return self._end()

    # ------------------------------------------------------------ time

    def _idle(self, now: float) -> None:
        self.deadline = now + max(self._command_timeout, self._data_term)

    def _reply_deadline(self, now: float) -> None:
        verdict = any(p.verb == "." for p in self._pending)
        self.deadline = now + (self._data_term if verdict else self._reply_timeout)

    def _deadline(self, now: float) -> list[OutboundAction]:
        if self.mode is Mode.GATHER:
            return self._group_done(now)
        if self.mode is Mode.TRACK and self._pending and self._failed is None:
            return self._mx_lost("mx-timeout")
        self.log.outcome = "timeout"
        return self._end()

    # ------------------------------------------------------------ the MTA's bytes

    def _from_mta(self, data: bytes, now: float) -> list[OutboundAction]:
        if self.mode is Mode.SPLICE:
            self._idle(now)
            return [SendUpstream(data)]
        self._mta += data
        if self.mode is Mode.CONNECTING:
            return []  # nothing served yet: held until the MX's connection is up
        return self._frame_mta(now)

    def _frame_mta(self, now: float) -> list[OutboundAction]:
        actions: list[OutboundAction] = []
        while self._mta and self.mode not in (Mode.DONE, Mode.SPLICE):
            if self._body:
                actions += self._body_bytes(now)
                continue
            end = self._mta.find(b"\n")
            if end < 0:
                if len(self._mta) > MAX_LINE:
                    actions += self._splice_now()
                break
            line = bytes(self._mta[: end + 1])
            del self._mta[: end + 1]
            actions += self._mta_line(line, now)
        return actions

    def _mta_line(self, line: bytes, now: float) -> list[OutboundAction]:
        verb = _verb(line)
        if self._failed is not None:
            return self._answer_locally(verb)
        if self.mode is Mode.SERVE:
            return self._first_command(line, verb, now)
        if verb == "STARTTLS" and self._real_ehlo is not None and not self._offers_tls:
            return [SendClient(NO_TLS.to_bytes())]
        pending = _Pending(_Kind.RELAY, verb, line)
        if self.mode is Mode.GATHER:
            self._pending.append(pending)
            self._group_bytes += len(line)
            if verb in PIPELINABLE and self._group_bytes < MAX_GROUP_BYTES:
                self.deadline = now + GROUP_WAIT
                return []
            return self._group_done(now)
        if verb == "QUIT" and any(p.verb == "." for p in self._pending):
            # Exim up to 4.98 delays its 250 by ~200 ms when QUIT is pipelined behind the
            # dot: QUIT waits until the verdict is relayed.
            self._held_quit = line
            return []
        self._pending.append(pending)
        self._reply_deadline(now)
        if verb == "BDAT":
            # Chunks are framed by their length, not by lines: no more tracking.
            return self._send_unsent() + self._splice_now()
        return self._send_unsent()

    @property
    def _offers_tls(self) -> bool:
        """On a hit, once the real EHLO reply is in: whether it offers STARTTLS."""
        return self._real_ehlo is None or "STARTTLS" in ehlo_keywords(self._real_ehlo)

    def _first_command(self, line: bytes, verb: str, now: float) -> list[OutboundAction]:
        assert self.greeting is not None
        if self._ehlo_line and line != self._ehlo_line:
            # Not the EHLO sent for it: the reply to that one is nobody's.
            for p in self._pending:
                if p.kind is _Kind.EHLO:
                    p.kind = _Kind.SWALLOW
            self._ehlo_line = b""
        if verb != "EHLO":
            # Not what the cache can answer: talk to the MX in step from here.
            self.log.path = "in-step"
            self.mode = Mode.TRACK
            self._pending.append(_Pending(_Kind.RELAY, verb, line))
            self._reply_deadline(now)
            if not self._connected:  # fast open: nothing went out yet
                self._pending.appendleft(_Pending(_Kind.BANNER))
                return [ConnectMx()]
            return self._send_unsent()
        self.mode = Mode.GATHER
        self._idle(now)  # the group's first line starts the short wait
        actions: list[OutboundAction] = [SendClient(served_ehlo(self.greeting.ehlo).to_bytes())]
        if self._ehlo_line:
            return actions  # sent at connect
        self._ehlo_line = line
        ehlo = _Pending(_Kind.EHLO, "EHLO", line)
        self._pending.append(ehlo)
        if self._connected and self._real_banner is None and not self._retried:
            # The MX has not spoken: the EHLO goes now, the group behind it when complete.
            ehlo.sent = self._early = True
            self.log.path = "early"
            actions.append(SendUpstream(line))
        elif not self.fast_open:
            self.log.path = "in-step"  # the MX spoke first: as any client would
        return actions + self._send_unsent()

    def _group_done(self, now: float) -> list[OutboundAction]:
        """The MTA's pipelined group is complete."""
        self.mode = Mode.TRACK
        self._reply_deadline(now)
        if self.fast_open and not self._connected and not self._retried:
            # Everything in the SYN.
            for p in self._pending:
                p.sent = True
            self._early = True
            self.log.path = "early"
            self._pending.appendleft(_Pending(_Kind.BANNER))
            early = b"".join(p.line for p in self._pending)
            return [ConnectMx(early=early, fast_open=True)]
        if self._early and not self._checked and self._connected:
            # Behind the early EHLO, before the MX's banner: as Exim's client does.
            group = [p for p in self._pending if not p.sent and p.kind is _Kind.RELAY]
            for p in group:
                p.sent = True
            return [SendUpstream(b"".join(p.line for p in group))] if group else []
        return self._send_unsent()

    def _answer_locally(self, verb: str) -> list[OutboundAction]:
        """The proxy gave up on the MX and answered in its place: a 4xx, then goodbye."""
        assert self._failed is not None
        if verb == "QUIT":
            return [SendClient(Reply.make(221, "2.0.0 Bye").to_bytes()), *self._end()]
        reply = Reply(421, self._failed.lines)
        return [SendClient(reply.to_bytes()), *self._end()]

    def _send_unsent(self) -> list[OutboundAction]:
        """Lines the MX may take now: the EHLO once its banner is in, the rest once the EHLO
        reply was checked; all of them while it offers PIPELINING, else one per reply."""
        if not self._connected or self._failed is not None:
            return []
        if self._observe:  # as the MTA sent them, when it sent them
            lines = [p.line for p in self._pending if not p.sent and p.kind is _Kind.RELAY]
            for p in self._pending:
                p.sent = True
            return [SendUpstream(b"".join(lines))] if lines else []
        if self._real_banner is None:
            return []
        lockstep = self._real_ehlo is None or "PIPELINING" not in ehlo_keywords(self._real_ehlo)
        out: list[bytes] = []
        for p in self._pending:
            if p.sent or p.kind is _Kind.BANNER:
                continue
            if lockstep and any(q.sent for q in self._pending if q.kind is not _Kind.BANNER):
                break
            if p.kind is _Kind.RELAY and self._ehlo_line and not self._checked:
                break
            p.sent = True
            out.append(p.line)
            if lockstep or p.kind is _Kind.EHLO:
                break
        return [SendUpstream(b"".join(out))] if out else []

    def _body_bytes(self, now: float) -> list[OutboundAction]:
        self._idle(now)  # a message that keeps flowing is never cut
        window = self._tail + bytes(self._mta)
        end = window.find(b"\r\n.\r\n")
        if end < 0:
            data = bytes(self._mta)
            self._mta.clear()
            self._tail = window[-4:]
            return [SendUpstream(data)]
        cut = end + 5 - len(self._tail)
        data = bytes(self._mta[:cut])
        del self._mta[:cut]
        self._body = False
        self._tail = b""
        self._pending.append(_Pending(_Kind.RELAY, ".", b".\r\n", sent=True))
        self._reply_deadline(now)
        return [SendUpstream(data)]

    def _splice_now(self) -> list[OutboundAction]:
        self.mode = Mode.SPLICE
        self.deadline = None
        actions: list[OutboundAction] = [Splice()]
        if self._held_quit:
            actions.append(SendUpstream(self._held_quit))
            self._held_quit = b""
        if self._mta:
            actions.append(SendUpstream(bytes(self._mta)))
            self._mta.clear()
        return actions

    # ------------------------------------------------------------ the MX's bytes

    def _from_mx(self, data: bytes, now: float) -> list[OutboundAction]:
        if self.mode is Mode.SPLICE:
            self._idle(now)
            return [SendClient(data)]
        self._mx.feed(data)
        self._mx_raw += data
        actions: list[OutboundAction] = []
        answered = False
        while self._pending and self.mode not in (Mode.DONE, Mode.SPLICE):
            try:
                reply = self._mx.next_reply()
            except ProtocolError as exc:
                if self._observe or self._checked:
                    # Not ours to judge (the MTA may well read it, an acceptance included):
                    # the rest as it comes. On a hit the entry goes: a hit would meet it
                    # again where a miss, relaying, lets the MTA decide.
                    forget: list[OutboundAction] = [] if self._observe else [Forget("protocol")]
                    if forget:
                        self.log.invalidated = "protocol"
                    raw = SendClient(bytes(self._mx_raw))
                    return [*actions, *forget, raw, *self._splice_now()]
                self.log.outcome = "mx-protocol"
                why = exc.reply.text.split(": ", 1)[-1]
                fail = _fail_reply("4.4.2", f"Remote server protocol error: {why}")
                return [*actions, *self._give_up("protocol", fail)]
            if reply is None:
                break
            # Lines of a reply leave the reader's buffer as they come: what is left in it
            # follows this reply.
            size = len(self._mx_raw) - self._mx.buffered
            self._raw = bytes(self._mx_raw[:size])
            del self._mx_raw[:size]
            answered = True
            actions += self._mx_reply(self._pending.popleft(), reply, now)
        if self.mode is not Mode.TRACK:
            return actions
        if not self._pending and self._mx_raw and self._failed is None:
            # Words nobody asked for (a 421 before closing, or an end of data the MX saw
            # where the proxy did not): the two no longer agree on where the session is.
            # The MTA gets them as they came and judges; the proxy only copies from now on.
            return [*actions, SendClient(bytes(self._mx_raw)), *self._splice_now()]
        if answered:  # a reply in: the next one has its own time (a trickle gains none)
            if self._pending:
                self._reply_deadline(now)
            else:
                self._idle(now)
        return actions

    def _mx_reply(self, pending: _Pending, reply: Reply, now: float) -> list[OutboundAction]:
        if pending.kind is _Kind.BANNER:
            return self._check_banner(reply, now)
        if pending.kind is _Kind.EHLO:
            return self._check_ehlo(reply, now)
        if pending.kind is _Kind.SWALLOW:
            return self._send_unsent()
        return self._relay(pending, reply, now)

    def _check_banner(self, reply: Reply, now: float) -> list[OutboundAction]:
        self._real_banner = reply
        if self._observe:
            self._relayed = True
            if reply.code == 421 or reply.code >= 500:
                self.log.outcome = "mx-421" if reply.code == 421 else self.log.outcome
            return [SendClient(self._raw)]
        if reply.code == 220:
            return self._send_unsent()
        if self._early and reply.code >= 500:
            return self._retry("sync-error", now)
        return self._give_up("banner", _fail_reply("4.4.2", f"Remote server said {reply.text}"))

    def _check_ehlo(self, reply: Reply, now: float) -> list[OutboundAction]:
        assert self.greeting is not None
        self._real_ehlo = reply
        if reply.code != 250:
            synchronization = b"synchroni" in b" ".join(reply.lines).lower()
            if self._early and synchronization:
                return self._retry("sync-error", now)
            return self._give_up("ehlo", _fail_reply("4.4.2", f"Remote server said {reply.text}"))
        name = _ehlo_name(self._ehlo_line)
        if name and _greeting_name(reply) == name:
            return self._give_up(
                "loop",
                _fail_reply("4.4.6", "Mail for the remote server loops back to myself"),
                block=True,
            )
        self._checked = True
        actions: list[OutboundAction] = []
        self._changed = features(reply) != features(self.greeting.ehlo)
        if self._retried:
            pass  # the entry was dropped (a strike): the next miss learns, if it may
        elif self._changed or early_keywords(reply) != early_keywords(self.greeting.ehlo):
            # Rewritten (or, without the keyword any more, dropped by the cache).
            self.log.invalidated = self.log.invalidated or "features"
            banner = self._real_banner or self.greeting.banner
            actions.append(Learn(banner, reply, self._ehlo_line))
        elif self._ehlo_line != self.greeting.client_ehlo:
            actions.append(Verified(self._ehlo_line))
        else:
            actions.append(Verified())
        if self._early:
            self.log.early_used = True
            self.log.round_trips_saved = 2
        if not self._offers_tls:
            for p in list(self._pending):
                if p.verb == "STARTTLS" and not p.sent:
                    self._pending.remove(p)
                    actions.append(SendClient(NO_TLS.to_bytes()))
        return actions + self._send_unsent()

    def _relay(self, pending: _Pending, reply: Reply, now: float) -> list[OutboundAction]:
        if pending.verb == "STARTTLS" and pending.kind is _Kind.RELAY and not self._offers_tls:
            # Sent early, before the MX said it no longer offers TLS: the MTA gets 454.
            if reply.code == 220:  # and yet it starts TLS: the two ends cannot agree now
                return self._give_up("features", NO_TLS, answered=pending)
            self._relayed = True
            return [SendClient(NO_TLS.to_bytes()), *self._send_unsent()]
        self._relayed = True
        self.log.last_reply = reply.text[:200]
        real = ehlo_keywords(self._real_ehlo) if self._real_ehlo is not None else {}
        if (
            pending.verb == "MAIL"
            and _asks_smtputf8(pending.line)
            and self._checked
            and "SMTPUTF8" not in real
        ):
            # The MTA used the SMTPUTF8 the served EHLO offered, which this MX lacks: stop
            # before the data, whatever the MX said (its 5xx is the cache's doing), and
            # drop the entry, so the retry meets the real EHLO and the MTA decides.
            return self._give_up(
                "smtputf8",
                _fail_reply("4.3.0", "Remote server does not offer SMTPUTF8"),
                answered=pending,
            )
        if self._observe and pending.verb == "EHLO" and self.learn:
            self.learn = False
            actions: list[OutboundAction] = [SendClient(self._raw), *self._learn(pending, reply)]
            return actions + self._send_unsent()
        if self._changed and 500 <= reply.code < 600:
            out = _fail_reply("4.3.0", f"Remote server's features changed; it said {reply.text}")
            self.log.failure = out.text
            actions = [SendClient(out.to_bytes(), verdict=pending.verb == ".")]
        else:
            actions = [SendClient(self._raw, verdict=pending.verb == ".")]
        if pending.verb == "DATA" and reply.code == 354:
            self._body = True
            self._tail = b"\r\n"
            if self._mta:  # message data the MTA sent with (or right behind) DATA
                actions += self._frame_mta(now)
        elif pending.verb == "STARTTLS" and reply.code == 220:
            return actions + self._splice_now()
        elif pending.verb == ".":
            if self._stop_after_verdict:
                self.log.outcome = "shutdown"
                return [*actions, SendClient(SHUTTING_DOWN.to_bytes()), *self._end()]
            if self._held_quit:
                self._pending.append(_Pending(_Kind.RELAY, "QUIT", self._held_quit))
                self._held_quit = b""
        elif pending.verb == "QUIT":
            self.log.outcome = "quit"
            return actions + self._end()
        if reply.code == 421 and pending.verb != "QUIT":
            self.log.outcome = "mx-421"
            return actions + self._end()
        actions += self._send_unsent()
        if self._mta_closed and not self._waiting_mx and self.mode is not Mode.DONE:
            self.log.outcome = "mta-closed"
            actions += self._end()
        return actions

    # ------------------------------------------------------------ when the cache was wrong

    def _retry(self, reason: str, now: float) -> list[OutboundAction]:
        """The MX refused the early talk before anything of its reached the MTA: forget the
        entry and do it again, in step, on a new connection."""
        self._retried = True
        self._early = False
        self.log.early_used = False
        self.log.round_trips_saved = 0
        self.log.path = "retried"
        self.log.invalidated = reason
        self._connected = False
        self._real_banner = None
        self._real_ehlo = None
        self._mx = ReplyReader(max_line=self._max_reply_line)
        kept = [p for p in self._pending if p.kind is _Kind.RELAY]
        if self._ehlo_line:  # answered or not, the new connection needs it first
            kept.insert(0, _Pending(_Kind.EHLO, "EHLO", self._ehlo_line))
        for p in kept:
            p.sent = False
        self._pending = deque(kept)
        self.deadline = None
        return [Forget(reason), CloseUpstream(), ConnectMx()]

    def _give_up(
        self, reason: str, reply: Reply, *, block: bool = False, answered: _Pending | None = None
    ) -> list[OutboundAction]:
        """Answer every command the MTA waits on with ``reply`` (a 4xx: a deferral) and
        close the MX (before any end of data: it discards what it has)."""
        self.log.invalidated = self.log.invalidated or reason
        actions: list[OutboundAction] = (
            [Forget(reason, block=block)] if reason != "features" else []
        )
        return actions + self._fail(reply, answered)

    def _fail(self, reply: Reply, answered: _Pending | None = None) -> list[OutboundAction]:
        self._failed = reply
        self.log.failure = reply.text
        if self.log.outcome == "open":
            self.log.outcome = "deferred"
        waiting = [p for p in self._pending if p.kind is _Kind.RELAY]
        if answered is not None:
            waiting.insert(0, answered)
        self._pending.clear()
        self._connected = False
        actions: list[OutboundAction] = [CloseUpstream()]
        for p in waiting:
            if p.verb == "QUIT":
                return actions + self._answer_locally("QUIT")
            actions.append(SendClient(reply.to_bytes()))
        if self._held_quit or self._mta_closed:
            self._held_quit = b""
            return actions + self._answer_locally("QUIT")
        return actions

    # ------------------------------------------------------------ learning on a miss

    def _learn(self, pending: _Pending, reply: Reply) -> list[OutboundAction]:
        """The reply to the MTA's first EHLO on a miss: what a later hit serves."""
        if self._real_banner is None or reply.code != 250:
            return []
        name = _ehlo_name(pending.line)
        if name and _greeting_name(reply) == name:
            return [Forget("loop", block=True)]  # never talk early to ourselves
        self.log.learned = True
        return [Learn(self._real_banner, reply, pending.line)]


__all__ = [
    "CONNECT_FAILED",
    "FEATURES",
    "GROUP_WAIT",
    "MX_CLOSED",
    "NO_TLS",
    "ConnectMx",
    "Forget",
    "Greeting",
    "Learn",
    "Mode",
    "OutboundAction",
    "OutboundLog",
    "OutboundMachine",
    "Splice",
    "Verified",
    "early_keywords",
    "features",
    "served_ehlo",
]
