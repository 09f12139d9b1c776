"""A pure driver for ``proxy.machine.SessionMachine``: no sockets, no trio, no sleeps.

``Harness`` builds a machine from a configuration (as ``tests/test_session.py``'s
``make_config``), keeps a fake clock, feeds events and records every action the way the trio
driver (``proxy/session.py``) performs them: each ``SendClient`` is one client write, each
``SendUpstream`` one write to the MTA, the identity header travels with ``ConnectUpstream``.
An action that the driver answers with an event of its own (a connect, a TLS handshake, a
name lookup) must come last in its list: the driver drops what follows it.

``MtaModel`` is a scripted MTA that answers what the machine sent upstream: banner, EHLO
capabilities, a reply per verb (or per line, from a callable), 354 and the message, BDAT by
length, a verdict after the end of data, and 421 / EOF / silence where the script says. It
records what it received and flags what a strict MTA would call a violation: input before
its banner, a command sent before the reply to the previous one was delivered while it did
not offer PIPELINING (or behind EHLO/HELO at all), message data before the 354.

``Harness.check`` (on by default) asserts after every event what must always hold: the
machine waits for something with a finite deadline unless an action it returned is pending;
its buffers stay bounded; nothing reaches the MTA before its banner has been delivered
(except the identity header, and forwarded early lines under ``forward``); nothing goes to
a side after it was closed; a finished machine does nothing more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.config import Config, parse_config
from proxy.machine import SessionMachine
from proxy.machine.events import (
    Action,
    ClientBroken,
    ClientData,
    ClientEof,
    ClientNameResolved,
    CloseClient,
    CloseUpstream,
    ConnectUpstream,
    DeadlinePassed,
    Event,
    ResolveClientName,
    SendClient,
    SendTimedOut,
    SendUpstream,
    Shutdown,
    Side,
    StartTls,
    TlsEstablished,
    UpstreamConnected,
    UpstreamData,
    UpstreamEof,
)
from proxy.machine.session import Phase
from proxy.smtp import (
    DATA_PIECE,
    MAX_AUTH_LINE,
    PROXY_ONLY_VERBS,
    PROXY_V2_SIGNATURE,
    ProtocolError,
    Reply,
    ReplyReader,
)
from tests import fakemta

CLIENT = ("192.0.2.7", 40000)
LOCAL = ("127.0.0.1", 25)
MTA_ADDRESS = "127.0.0.1:2525"

# What a script returns for a command line: reply bytes, or one of these.
CLOSE = "close"  # the MTA closes the connection instead of answering
STALL = "stall"  # it never answers (nor reads on)
Script = bytes | str


def make_config(**sections: dict[str, Any]) -> Config:
    """As tests/test_session.py's: proxy-v2 towards the MTA, early pipelining for all."""
    data: dict[str, Any] = {
        "listen": {"plain": ["127.0.0.1:0"]},
        "upstream": {"address": MTA_ADDRESS, "client_identity": "proxy-v2"},
        "pipe_connect": {"advertise_hosts": ["*"]},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data)


def ehlo_reply(
    pipelining: bool = True, chunking: bool = True, extra: tuple[str, ...] = ()
) -> bytes:
    """The EHLO reply of tests/fakemta.py (STARTTLS and XCLIENT included: the proxy drops
    them)."""
    lines = ["fake.test", "SIZE 1000000", "8BITMIME"]
    if pipelining:
        lines.insert(1, "PIPELINING")
    if chunking:
        lines.append("CHUNKING")
    lines += ["STARTTLS", "XCLIENT NAME ADDR", "ENHANCEDSTATUSCODES", *extra]
    return b"".join(
        b"250" + (b" " if i == len(lines) - 1 else b"-") + ln.encode() + b"\r\n"
        for i, ln in enumerate(lines)
    )


def verdict_text(n: int) -> bytes:
    """The model's default 250 for its ``n``-th message: unique, so a client-visible 250
    can be traced to the one MTA verdict it relays."""
    return b"250 2.0.0 queued as Q%d\r\n" % n


# The socket fake's answers, and those the model needs beyond them.
DEFAULT_REPLIES: dict[str, bytes] = {
    **fakemta.DEFAULT_REPLIES,
    "VRFY": b"252 2.0.0 maybe\r\n",
    "AUTH": b"334 \r\n",
    "STARTTLS": b"220 2.0.0 Ready to start TLS\r\n",
    "XCLIENT": b"220 fake.test ESMTP\r\n",
}
AUTH_OK = b"235 2.7.0 Authentication successful\r\n"
AUTH_CANCELLED = b"501 5.7.0 Authentication cancelled\r\n"


@dataclass
class MtaModel:
    """A scripted, pure MTA. ``receive`` takes what the machine wrote; ``take`` hands out
    what it answered; ``at_eof`` once all of that is out and it has closed."""

    banner: bytes = b"220 fake.test ESMTP\r\n"
    pipelining: bool = True
    chunking: bool = True
    ehlo: bytes | None = None  # the whole EHLO reply; default from pipelining/chunking
    replies: dict[str, Script] = field(default_factory=dict)  # verb -> script
    eod: Script | None = None  # the verdict after end of data / BDAT LAST; default 250 Qn
    # answers to AUTH response lines, in order (then AUTH_OK); a 334 asks for another line
    auth: list[Script] = field(default_factory=list)
    # line -> script (or None: the defaults); consulted first
    responder: Callable[[bytes], Script | None] | None = None
    # n (the message's number, from 1) -> its verdict (or None: eod, else 250 "queued as Qn")
    verdict_responder: Callable[[int], Script | None] | None = None
    close_after_bad_banner: bool = True  # as FakeMTA: a non-220 greeting, then EOF
    # -- what it saw
    header: bytes | None = None
    received: bytearray = field(default_factory=bytearray)
    early_input: bytearray = field(default_factory=bytearray)  # before the banner arrived
    commands: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)  # completed (end of data / LAST)
    verdicts: list[bytes] = field(default_factory=list)  # its replies to completed messages
    violations: list[str] = field(default_factory=list)
    auth_lines: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.connected = False
        self.banner_sent = False
        self.closed = False  # it hung up (CLOSE, QUIT, bad banner) or stalls
        self.stalled = False
        self._buf = bytearray()
        self._out = bytearray()  # everything it ever wrote, in order
        self._delivered = 0  # of _out, handed to the machine
        self._eof_at: int | None = None
        self._last_reply_end = 0  # where the reply to the last command ends in _out
        self._banner_end: int | None = None
        self._exempt_end = 0  # received bytes from before the banner (forwarded): not judged
        self._mode = "command"  # command, data, bdat, auth
        self._data_since = 0  # _out offset of the 354 (data must not precede its delivery)
        self._message = bytearray()
        self._bdat_left = 0
        self._bdat_last = False
        self._pending_bdat: Script = b""  # the reply to the BDAT whose chunk is being read
        self._helo_pending = False  # EHLO/HELO answered but its reply not yet delivered
        self._pipelining_now = False  # what its last EHLO reply offered
        self._chunking_now = False

    # -- the connection

    def connect(self, header: bytes) -> None:
        self.connected = True
        self.header = header

    def send_banner(self) -> None:
        assert self.connected and not self.banner_sent
        self.banner_sent = True
        self._write(self.banner)
        self._banner_end = len(self._out)
        if not self.banner.startswith(b"220") and self.close_after_bad_banner:
            self._hang_up()
            return
        self._process()

    def receive(self, data: bytes) -> None:
        assert self.connected
        self.received += data
        if self._banner_end is None or self._delivered < self._banner_end:
            self.early_input += data  # judged as such (forward), not as pipelining
            self._exempt_end = len(self.received)
        if self.closed:
            return
        self._buf += data
        if self.banner_sent:
            self._process()

    # -- what it wrote

    @property
    def available(self) -> int:
        return len(self._out) - self._delivered

    @property
    def at_eof(self) -> bool:
        """Everything it wrote is delivered and it has closed: the next read is EOF."""
        return self._eof_at is not None and self._delivered >= self._eof_at

    @property
    def banner_delivered(self) -> bool:
        return self._banner_end is not None and self._delivered >= self._banner_end

    @property
    def accepted(self) -> list[bytes]:
        return [v for v in self.verdicts if v.startswith(b"250")]

    def take(self, n: int | None = None) -> bytes:
        end = len(self._out) if n is None else min(len(self._out), self._delivered + n)
        data = bytes(self._out[self._delivered : end])
        self._delivered = end
        return data

    # -- inside

    def _write(self, data: bytes) -> None:
        self._out += data

    def _hang_up(self) -> None:
        self.closed = True
        self._eof_at = len(self._out)

    def _answer(self, script: Script) -> bool:
        """Write ``script``'s reply; False if the MTA is gone now."""
        if script == CLOSE:
            self._hang_up()
            return False
        if script == STALL:
            self.closed = self.stalled = True
            return False
        assert isinstance(script, bytes)
        start = len(self._out)
        self._write(script)
        # The reply ends with its first line that is no continuation ("ddd-"); bytes behind
        # it (a scripted reply with junk after it) are the MTA's mistake, not unread reply.
        self._last_reply_end = len(self._out)
        at = 0
        while (nl := script.find(b"\n", at)) >= 0:
            if script[at + 3 : at + 4] != b"-":
                self._last_reply_end = start + nl + 1
                break
            at = nl + 1
        if script.startswith(b"421"):
            self._hang_up()
            return False
        return True

    def _judge(self, line: bytes) -> None:
        """A command arrived: was it invited?"""
        consumed = len(self.received) - len(self._buf)  # where this line starts
        if consumed < self._exempt_end:
            return
        unanswered = self._delivered < self._last_reply_end
        if unanswered and self._helo_pending:
            self.violations.append(f"{line!r} before the EHLO/HELO reply was delivered")
        elif unanswered and not self._pipelining_now:
            self.violations.append(f"{line!r} pipelined without PIPELINING")

    def _script(self, verb: str, line: bytes) -> Script:
        if self.responder is not None:
            got = self.responder(line)
            if got is not None:
                return got
        if verb in self.replies:
            return self.replies[verb]
        if verb == "EHLO":
            return (
                self.ehlo if self.ehlo is not None else ehlo_reply(self.pipelining, self.chunking)
            )
        return DEFAULT_REPLIES.get(verb, fakemta.UNKNOWN_COMMAND)

    def _verdict(self) -> bool:
        n = len(self.messages) + 1
        script = self.verdict_responder(n) if self.verdict_responder is not None else None
        if script is None:
            script = self.eod if self.eod is not None else verdict_text(n)
        self.messages.append(bytes(self._message))
        self._message.clear()
        self.verdicts.append(script if isinstance(script, bytes) else b"")
        return self._answer(script)

    def _process(self) -> None:
        while not self.closed:
            buf = self._buf
            if self._mode == "bdat":
                if not buf:
                    return
                take = bytes(buf[: self._bdat_left])
                del buf[: len(take)]
                self._message += take
                self._bdat_left -= len(take)
                if self._bdat_left:
                    return
                self._mode = "command"
                if self._bdat_last:
                    self._verdict()
                else:
                    self._answer(self._pending_bdat)
                continue
            nl = buf.find(b"\n")
            if nl < 0:
                return
            self._judge_data_timing()
            line = bytes(buf[: nl + 1])
            if self._mode == "data":
                del buf[: nl + 1]
                if line == b".\r\n":
                    self._mode = "command"
                    self._verdict()
                else:
                    self._message += line
                continue
            self._judge(line)
            del buf[: nl + 1]
            if self._mode == "auth":
                self.auth_lines.append(line)
                self._mode = "command"
                if line == b"*\r\n":
                    script: Script = AUTH_CANCELLED
                else:
                    script = self.auth.pop(0) if self.auth else AUTH_OK
                if self._answer(script) and isinstance(script, bytes) and script[:3] == b"334":
                    self._mode = "auth"
                continue
            self.commands.append(line)
            verb = line.split(b" ", 1)[0].strip().upper().decode("ascii", "replace")
            script = self._script(verb, line)
            if verb == "BDAT":
                parts = line.split()
                self._bdat_left = int(parts[1])
                self._bdat_last = len(parts) > 2
                self._pending_bdat = script
                self._mode = "bdat"
                if not self._bdat_left:
                    self._mode = "command"
                    if self._bdat_last:
                        self._verdict()
                    else:
                        self._answer(script)
                continue
            if not self._answer(script):
                continue
            assert isinstance(script, bytes)
            if verb in ("EHLO", "HELO"):
                self._helo_pending = True
                if verb == "HELO" and script.startswith(b"250"):
                    self._pipelining_now = self._chunking_now = False
                elif verb == "EHLO" and script.startswith(b"250"):
                    self._pipelining_now = b"PIPELINING" in script
                    self._chunking_now = b"CHUNKING" in script
            else:
                self._helo_pending = False
            if verb == "DATA" and script.startswith(b"354"):
                self._mode = "data"
                self._data_since = len(self._out)
            elif verb == "AUTH" and script.startswith(b"334"):
                self._mode = "auth"
            elif verb == "QUIT":
                self._hang_up()

    def _judge_data_timing(self) -> None:
        if self._mode == "data" and self._delivered < self._data_since:
            consumed = len(self.received) - len(self._buf)
            if consumed >= self._exempt_end:
                self.violations.append("message data before the 354 was delivered")
                self._data_since = 0  # once


@dataclass
class RecordingCounters:
    """The machine's live counters (the driver's metrics), as a list of calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def advertised(self) -> None:
        self.calls.append(("advertised", None))

    def early_refused(self, action: str) -> None:
        self.calls.append(("early_refused", action))

    def sync_violation(self, verb: str) -> None:
        self.calls.append(("sync_violation", verb))

    def message(self) -> None:
        self.calls.append(("message", None))

    def message_bytes(self, n: int) -> None:
        self.calls.append(("message_bytes", n))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls if name != "message_bytes"]


@dataclass
class Harness:
    """Drives one ``SessionMachine``; see the module docstring."""

    mta: MtaModel = field(default_factory=MtaModel)
    config: Config | None = None
    client_address: tuple[str, int] = CLIENT
    offer_starttls: bool = False
    implicit_tls: bool = False
    upstream_tls: bool = False
    now: float = 1000.0
    check: bool = True
    client_name: str = "client.test"  # what a name lookup answers (xclient)
    tls_version: str = "TLSv1.3"

    def __post_init__(self) -> None:
        if self.config is None:
            self.config = make_config()
        self.counters = RecordingCounters()
        self.machine = SessionMachine(
            self.config,
            client=self.client_address,
            local=LOCAL,
            listener="plain",
            offer_starttls=self.offer_starttls,
            implicit_tls=self.implicit_tls,
            upstream_tls=self.upstream_tls,
            hostname="proxy.test",
            counters=self.counters,
        )
        self.actions: list[Action] = []  # every action, in order
        self.writes: list[bytes] = []  # each SendClient, one element per write
        self.verdict_writes: list[bool] = []  # SendClient.verdict, per write
        self.sent: list[bytes] = []  # each SendUpstream
        self.header: bytes | None = None  # ConnectUpstream.header
        self.tls_starts: list[StartTls] = []
        self.client_closes: list[CloseClient] = []
        self.upstream_closes = 0
        self.pending: ConnectUpstream | StartTls | ResolveClientName | None = None
        self.stopping = False  # shutdown() was deferred: the machine ends after the verdict
        self.events: list[Event] = []
        self._client_closed = False
        self._upstream_closed = False
        self._upstream_fed = ReplyReader()
        self._mta_replies_fed = 0
        self._mta_activity = self.now  # the last write to the MTA or whole reply from it

    # ------------------------------------------------------------ what it did

    @property
    def to_client(self) -> bytes:
        return b"".join(self.writes)

    @property
    def to_mta(self) -> bytes:
        """Every byte written to the MTA after the identity header."""
        return b"".join(self.sent)

    @property
    def replies(self) -> list[Reply]:
        """What the client read, as replies (every write must parse)."""
        reader = ReplyReader(max_lines=1000)
        reader.feed(self.to_client)
        out = []
        while (reply := reader.next_reply()) is not None:
            out.append(reply)
        assert not reader.buffered, f"a partial reply to the client: {self.to_client!r}"
        return out

    @property
    def codes(self) -> list[int]:
        return [r.code for r in self.replies]

    @property
    def done(self) -> bool:
        return self.machine.done

    @property
    def outcome(self) -> str:
        return str(self.machine.log.outcome)

    # ------------------------------------------------------------ driving

    def start(self, *, connect: bool = True, banner: bool = True) -> list[Action]:
        """Start the machine, let the connect complete unless ``connect`` is False, and let
        the MTA greet it unless ``banner`` is False."""
        actions = self._record(self.machine.start(self.now))
        self.pump(connect=connect)
        if banner and self.mta.connected and not self.mta.banner_sent:
            self.banner()
        return actions

    def feed(self, event: Event) -> list[Action]:
        self.events.append(event)
        if isinstance(event, UpstreamData):
            self._upstream_fed.feed(event.data)
            try:
                while self._upstream_fed.next_reply() is not None:
                    self._mta_replies_fed += 1
                    self._mta_activity = self.now
            except ProtocolError:
                self._mta_replies_fed = 10**9  # junk: no longer counted
        return self._record(self.machine.handle(event, self.now))

    def _record(self, actions: list[Action]) -> list[Action]:
        machine = self.machine
        for i, action in enumerate(actions):
            self.actions.append(action)
            if isinstance(action, SendClient):
                assert not self._client_closed, f"a write to the client after its close: {action}"
                assert action.data, "an empty client write"
                self.writes.append(action.data)
                self.verdict_writes.append(action.verdict)
            elif isinstance(action, SendUpstream):
                assert not self._upstream_closed, f"a write to the MTA after its close: {action}"
                assert self.pending is None or not isinstance(self.pending, ConnectUpstream)
                assert action.data, "an empty MTA write"
                self.sent.append(action.data)
                self._mta_activity = self.now
                if self.check and machine.policy != "forward":
                    assert self._mta_replies_fed >= 1, (
                        f"bytes to the MTA before its banner: {action.data!r}"
                    )
                self.mta.receive(action.data)
            elif isinstance(action, CloseClient):
                self.client_closes.append(action)
                self._client_closed = True
            elif isinstance(action, CloseUpstream):
                self.upstream_closes += 1
                self._upstream_closed = True
            elif isinstance(action, ConnectUpstream | StartTls | ResolveClientName):
                # The driver answers these with an event and drops what follows them.
                assert i == len(actions) - 1, f"{action} is not last in {actions}"
                assert self.pending is None, (self.pending, action)
                self.pending = action
                if isinstance(action, ConnectUpstream):
                    self.header = action.header
                elif isinstance(action, StartTls):
                    self.tls_starts.append(action)
        if self.stopping and any(isinstance(a, SendClient) and a.verdict for a in actions):
            # shutdown() was deferred for this verdict: nothing may follow it but the end
            assert machine.done, f"the session goes on after the deferred verdict: {actions}"
        if self.check:
            self.check_invariants()
        return actions

    def check_invariants(self) -> None:
        m = self.machine
        if m.done:
            assert not m.wants_client and not m.wants_upstream and m.deadline is None
            return
        if self.pending is None:
            assert m.wants_client or m.wants_upstream, f"waits for nothing in {m.phase}"
            assert m.deadline is not None, f"waits without a deadline in {m.phase}"
        if m.phase is Phase.EARLY:
            limit = self.config_.pipe_connect.max_early_bytes
            assert len(m._early) <= limit, len(m._early)
        if m.wants_client:
            assert m.read_size > 0
            assert not m._out, f"replies held while waiting for the client: {bytes(m._out)!r}"
            assert not m._message, "message bytes held while waiting for the client"
            bound = max(DATA_PIECE, MAX_AUTH_LINE, self.config_.limits.max_command_line) + 1
            assert m.reader.buffered <= bound, m.reader.buffered
        if m.wants_upstream and m.phase is not Phase.EARLY:
            assert m.mta.pending, "waits for the MTA with nothing asked"
            # Each reply gets its whole timeout from its command (or the reply before it):
            # never a deadline left over from an earlier wait.
            t = self.config_.timeouts
            least = min(t.mail, t.rcpt, t.data_init, t.data_term, t.reply, t.banner)
            assert m.deadline is not None and m.deadline >= self._mta_activity + least, (
                m.deadline,
                self._mta_activity,
                least,
            )
        assert m.mta.buffered <= self.config_.limits.max_reply_line + 65536

    @property
    def config_(self) -> Config:
        assert self.config is not None
        return self.config

    # ------------------------------------------------------------ steps

    def pump(self, *, connect: bool = True, chunk: int | None = None) -> None:
        """Complete pending actions (connect if ``connect``) and deliver what the MTA has
        written while the machine reads from it (``chunk`` bytes per read), until the
        machine waits for the client, for a silent MTA, or is done."""
        for _ in range(100000):
            m = self.machine
            if m.done:
                return
            pending = self.pending
            if pending is not None:
                if isinstance(pending, ConnectUpstream) and not connect:
                    return
                self.complete()
                continue
            if m.wants_upstream and self.mta.available:
                self.upstream(self.mta.take(chunk))
                continue
            if m.wants_upstream and self.mta.at_eof:
                self.feed(UpstreamEof())
                continue
            return
        raise AssertionError("the machine does not settle")

    def complete(self) -> list[Action]:
        """The driver finished the pending action."""
        pending, self.pending = self.pending, None
        assert pending is not None
        if isinstance(pending, ConnectUpstream):
            self.mta.connect(pending.header)
            return self.feed(UpstreamConnected())
        if isinstance(pending, StartTls):
            return self.feed(
                TlsEstablished(pending.side, self.tls_version, "TLS_AES_128_GCM_SHA256")
            )
        return self.feed(ClientNameResolved(self.client_name))

    def banner(self) -> None:
        self.mta.send_banner()
        self.pump()

    def client(self, data: bytes, *, pump: bool = True) -> list[Action]:
        """The client's bytes, in one read (the machine must want them)."""
        m = self.machine
        assert m.wants_client, f"the machine does not read the client in {m.phase}"
        assert len(data) <= m.read_size, (len(data), m.read_size)
        actions = self.feed(ClientData(data))
        if pump:
            self.pump()
        return actions

    def client_eof(self) -> list[Action]:
        actions = self.feed(ClientEof())
        self.pump()
        return actions

    def client_broken(self) -> list[Action]:
        return self.feed(ClientBroken())

    def upstream(self, data: bytes) -> list[Action]:
        return self.feed(UpstreamData(data))

    def timeout(self) -> list[Action]:
        """The machine's deadline comes."""
        deadline = self.machine.deadline
        assert deadline is not None
        self.now = max(self.now, deadline)
        actions = self.feed(DeadlinePassed())
        self.pump()
        return actions

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def timeout_now(self) -> list[Action]:
        """The deadline comes (without pumping: for ``run_session``)."""
        deadline = self.machine.deadline
        assert deadline is not None
        self.now = max(self.now, deadline)
        return self.feed(DeadlinePassed())

    def send_timed_out(self, side: Side) -> list[Action]:
        return self.feed(SendTimedOut(side))

    def shutdown(self) -> list[Action]:
        """The grace is over (the driver's Session.shutdown)."""
        if self.machine.defer_shutdown():
            self.stopping = True
            return []
        return self.feed(Shutdown())


# ---------------------------------------------------------------- whole sessions


@dataclass
class Step:
    """One unit of what a client sends; every unit gets exactly one reply."""

    data: bytes
    kind: str = "command"  # command | message (after DATA's 354) | bdat | bdat_last
    eager: bool = False  # sent without waiting for the replies to what came before
    body: bytes = b""  # message / BDAT LAST: the whole message the MTA must receive


class ScriptedClient:
    """A client that sends its steps in order, each once the replies to everything before it
    are in (or at once, when ``eager``); a message only after its DATA got 354 (else it
    skips it). It stops at a 421 or 221. ``raw``: its bytes are not commands to pair with
    replies (the fuzz target's random client)."""

    def __init__(self, steps: list[Step], *, end: str = "eof", raw: bool = False) -> None:
        self.steps = list(steps)
        self.end = end  # what it does when it has nothing more to say: "eof" or "silent"
        self.raw = raw
        self.units: list[Step] = []  # sent, in order
        self.replies: list[Reply] = []
        self.stream = bytearray()  # everything it sent
        self.pipe = bytearray()  # sent, not yet read by the machine
        self.eof_sent = False
        self.gone = False  # it got a 421 or 221 or a reply it cannot read
        self._reader = ReplyReader(max_lines=1000)
        self._writes_seen = 0

    @property
    def waiting(self) -> bool:
        return not self.raw and len(self.replies) < 1 + len(self.units)

    @property
    def finished(self) -> bool:
        return not self.steps

    def read(self, writes: list[bytes]) -> None:
        for data in writes[self._writes_seen :]:
            self._reader.feed(data)
        self._writes_seen = len(writes)
        while (reply := self._reader.next_reply()) is not None:
            self.replies.append(reply)
            if reply.code in (421, 221):
                self.gone = True

    def advance(self) -> None:
        while self.steps and not self.gone:
            step = self.steps[0]
            answered = len(self.replies) >= 1 + len(self.units)
            if step.kind == "message":
                if not answered:
                    return
                if self.replies[len(self.units)].code != 354:
                    self.steps.pop(0)  # its DATA was refused: no message
                    continue
            elif not (step.eager or answered):
                return
            self.steps.pop(0)
            self.units.append(step)
            self.stream += step.data
            self.pipe += step.data


SIZES = (1, 2, 3, 7, 64, 1 << 20)


def run_session(
    h: Harness,
    client: ScriptedClient,
    choose: Callable[[int], int],
    *,
    timeouts: bool = False,
    shutdown: bool = False,
    max_steps: int = 20000,
) -> None:
    """Run a whole session: at each point ``choose(n)`` picks one of the n things that can
    happen next (the connect or a handshake completes, the MTA's next bytes arrive in a
    piece of a chosen size, the MTA greets, the client's next bytes arrive, and with
    ``timeouts`` / ``shutdown`` the deadline or the proxy's stop). When nothing can happen,
    the client ends (EOF or silence) and then the machine's deadline comes."""
    h.start(connect=False, banner=False)
    timeout_at = choose(200) if timeouts else -1
    shutdown_at = choose(200) if shutdown else -1
    for step in range(max_steps):
        m = h.machine
        if m.done:
            client.read(h.writes)
            return
        client.read(h.writes)
        client.advance()
        options: list[str] = []
        if h.pending is not None:
            options.append("complete")
        if m.wants_upstream and (h.mta.available or h.mta.at_eof):
            options.append("upstream")
        if h.mta.connected and not h.mta.banner_sent and h.mta.banner:
            options.append("banner")
        if m.wants_client and client.pipe:
            options.append("client")
        # (once each, at a chosen point: most sessions should get somewhere first)
        if step == timeout_at and m.deadline is not None and options:
            options = ["timeout"]
        if step == shutdown_at and options:
            options = ["shutdown"]
        if not options:
            if m.wants_client and not m.wants_upstream and h.pending is None:
                # (A stream that could still be a PROXY v2 signature, b"\r\n" say, is held
                # by the reader: test_machine.py::test_an_empty_first_line_is_answered.)
                held = PROXY_V2_SIGNATURE.startswith(bytes(client.stream))
                assert held or not (client.waiting and not client.gone), (
                    "deadlock: the machine waits for the client, the client for a reply; "
                    f"sent {bytes(client.stream)!r}, got {h.to_client!r}"
                )
                if client.end == "eof" and not client.eof_sent:
                    client.eof_sent = True
                    h.feed(ClientEof())
                    continue
            assert m.deadline is not None, f"stuck in {m.phase} without a deadline"
            h.timeout_now()
            continue
        pick = options[choose(len(options))]
        # Time passes between events, never past the deadline (that is the timeout's).
        wait = (0.0, 0.0, 1.0, 60.0, 250.0)[choose(5)]
        if m.deadline is not None:
            wait = min(wait, (m.deadline - h.now) / 2)
        h.now += wait
        if pick == "complete":
            h.complete()
        elif pick == "upstream":
            if h.mta.available:
                h.upstream(h.mta.take(SIZES[choose(len(SIZES))]))
            else:
                h.feed(UpstreamEof())
        elif pick == "banner":
            h.mta.send_banner()
        elif pick == "client":
            n = min(SIZES[choose(len(SIZES))], m.read_size)
            data = bytes(client.pipe[:n])
            del client.pipe[:n]
            h.feed(ClientData(data))
        elif pick == "timeout":
            h.timeout_now()
        else:
            h.shutdown()
    raise AssertionError("the session does not end")


def check_session(h: Harness, client: ScriptedClient) -> None:
    """What must hold once a session is over (see tests/unit/test_machine_properties.py)."""
    mta = h.mta
    assert h.done
    assert mta.violations == [], mta.violations
    stream = bytes(client.stream)
    if h.machine.policy == "forward":
        assert stream.startswith(bytes(mta.early_input)), (mta.early_input, stream)
    else:
        assert mta.early_input == b"", mta.early_input
    # Every command the MTA got is one the client sent, in order (QUIT: the proxy's own
    # when the client closed; XCLIENT: the identity, first).
    commands = list(mta.commands)
    if h.config_.upstream.client_identity == "xclient" and commands:
        assert commands.pop(0).startswith(b"XCLIENT ADDR="), mta.commands
    for line in commands:
        verb = line.split(b" ", 1)[0].strip().upper().decode("ascii", "replace")
        assert verb not in PROXY_ONLY_VERBS and verb != "PROXY", line
    if client.raw:  # in order, each somewhere in what it sent (BDAT chunks are no lines)
        at = 0
        for i, line in enumerate(commands):
            found = stream.find(line, at)
            assert found >= 0 or (line == b"QUIT\r\n" and i == len(commands) - 1), line
            at = found + len(line) if found >= 0 else at
    else:
        sent = [u.data.split(b"\n", 1)[0] + b"\n" for u in client.units if u.kind != "message"]
        pos = 0
        for i, line in enumerate(commands):
            try:
                pos = sent.index(line, pos) + 1
            except ValueError:
                assert line == b"QUIT\r\n" and i == len(commands) - 1, (line, mta.commands, sent)
    # Each 250 the client got for a message is the MTA's verdict on that very message (its
    # bytes as the client sent them), relayed once.
    used: set[int] = set()
    accepted = [i + 1 for i, v in enumerate(mta.verdicts) if v == verdict_text(i + 1)]
    visible = 0
    for line in h.to_client.split(b"\r\n"):
        if line.startswith(b"250 2.0.0 queued as Q"):
            n = int(line[len(b"250 2.0.0 queued as Q") :])
            assert n in accepted and n not in used, (n, accepted, used)
            used.add(n)
            visible += 1
    assert visible <= len(accepted) <= len(mta.messages)
    if client.raw:
        return
    bodies = [u.body for u in client.units if u.kind in ("message", "bdat_last")]
    pos = 0
    for message in mta.messages:  # each message the MTA completed, exactly as sent
        assert message in bodies[pos:], (message, bodies)
        pos = bodies.index(message, pos) + 1
    replies = client.replies
    assert len(replies) <= 2 + len(client.units), (replies, client.units)
    if len(replies) == 2 + len(client.units):  # one the client did not ask for: the end
        assert replies[-1].code == 421 and h.done, replies[-1]
    for unit, reply in zip(client.units, replies[1:], strict=False):
        if unit.kind in ("message", "bdat_last") and 200 <= reply.code < 300:
            got = reply.to_bytes()
            assert got.startswith(b"250 2.0.0 queued as Q"), (unit, got)
            n = int(got[len(b"250 2.0.0 queued as Q") : -2])
            assert mta.messages[n - 1] == unit.body, (mta.messages[n - 1], unit.body)
