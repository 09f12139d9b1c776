"""The session as a pure machine: events in, actions out, no sockets, no clocks.

``SessionMachine`` decides everything a session does (docs/machine.md is its theory of
operation): what it holds before the MTA's banner and how it replays it, which replies go
to the client and when (banner and every reply to early commands in one write), what
reaches the MTA, when a timeout, an error or a shutdown ends the session and how. The
driver (``proxy.session``) feeds it what happened -- ``handle(event, now)`` -- performs
the actions it returns, in order, and then waits for what ``wants_client`` /
``wants_upstream`` say, until ``deadline``. ``now`` is the only clock the machine sees.

The machine is in one ``phase`` at a time. In the relay phases the driver waits for one
side only: the MTA while a command is unanswered, the client otherwise, so at most one
unit of client input and one pipelined group are in flight, and nothing is buffered
without bound.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from enum import Enum, auto
from typing import Protocol

from ..addresses import Endpoint, unmap
from ..config import Config
from ..outcomes import Outcome
from ..proxyproto import identity_header, tls_tlv, xclient_command
from ..sessionlog import SessionLog
from ..smtp import (
    NEED_DATA,
    PROXY_ONLY_VERBS,
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
    ehlo_keywords,
    ends_group,
    rewrite_ehlo,
    strict_command,
)
from .events import (
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
    TlsFailed,
    UpstreamBroken,
    UpstreamConnected,
    UpstreamConnectFailed,
    UpstreamData,
    UpstreamEof,
)
from .mta import MtaConversation

SYNC_ERROR = "SMTP synchronization error"
REFUSE_REPLIES = {
    "defer": Reply.make(421, f"4.5.0 {SYNC_ERROR}: input before the greeting, try again later"),
    "reject": Reply.make(554, SYNC_ERROR),
}
SHUTTING_DOWN = Reply.make(421, "4.3.2 Service shutting down, closing transmission channel")
CLIENT_TIMEOUT = Reply.make(421, "4.4.2 Timeout, closing connection")
# Protocol errors the proxy answers itself (over-long lines, bare CR/LF, ...) before it
# closes the session, as Exim's smtp_max_synprot_errors and Postfix's smtpd_hard_error_limit.
MAX_LOCAL_ERRORS = 10
TOO_MANY_ERRORS = Reply.make(421, "4.7.0 Too many protocol errors, closing connection")
STARTTLS_READY = Reply.make(220, "2.0.0 Ready to start TLS")
# Early input passed on as is (``forward``) must hold no command the relay would not send
# as is, in order (it skips the forwarded bytes by count): none it refuses or answers
# itself -- over-long lines too -- and BDAT, whose chunk is not lines.
_NOT_FORWARDED = PROXY_ONLY_VERBS | {"STARTTLS", "PROXY", "BDAT"}
# Commands after which a client must wait for the reply (RFC 2920 section 3.1): what Postfix
# 3.7 with smtpd_forbid_unauth_pipelining answers with a sync error when input follows them
# (measured: tests/integration/test_review_attacks.py). The proxy replays group by group, so
# the MTA could not see such a violation: the proxy judges it. EHLO may be followed by a
# group where early pipelining was advertised.
SYNC_POINTS = frozenset({"HELO", "EHLO", "DATA", "NOOP", "VRFY"})
READ_SIZE = 65536


def upstream_unavailable(detail: str) -> Reply:
    """What the client hears when the MTA fails: a 421, so its mail is deferred, not lost."""
    return Reply.make(421, f"4.4.2 Upstream MTA unavailable ({detail}), try again later")


def forwardable(lines: bytes, max_line: int, after: str) -> str | None:
    """The verb of the last of complete early ``lines`` if they may go to the MTA as the
    client sent them (``after`` the last verb already forwarded), else None. Nothing may
    follow a sync point but EHLO's group: the relay would end the session there, after the
    MTA had it all."""
    for line in lines.splitlines(keepends=True):
        if after in SYNC_POINTS - {"EHLO"} or len(line) > max_line:
            return None
        try:
            cmd = strict_command(line)
        except ProtocolError:
            return None
        if cmd.verb in _NOT_FORWARDED:
            return None
        after = cmd.verb
    return after


def _name_or_none(host: str) -> str | None:
    """A host name to send as SNI and verify; an IP address is neither."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


class Counters(Protocol):
    """Live counters the machine moves as things happen (the driver's metrics)."""

    def advertised(self) -> None: ...
    def early_refused(self, action: str) -> None: ...
    def sync_violation(self, verb: str) -> None: ...
    def message(self) -> None: ...
    def message_bytes(self, n: int) -> None: ...


class NoCounters:
    def advertised(self) -> None:
        pass

    def early_refused(self, action: str) -> None:
        pass

    def sync_violation(self, verb: str) -> None:
        pass

    def message(self) -> None:
        pass

    def message_bytes(self, n: int) -> None:
        pass


class Phase(Enum):
    TLS_ON_CONNECT = auto()  # the client's handshake, before anything else
    EARLY = auto()  # MTA: connect, banner, setup; client: held, not answered
    COMMANDS = auto()  # commands relayed group by group, replies tracked
    DATA = auto()  # message lines after a 354
    BDAT = auto()  # a BDAT chunk being relayed
    BDAT_DISCARD = auto()  # a BDAT chunk refused locally, read and dropped
    AUTH = auto()  # an AUTH exchange: the client's next line is a response
    STARTTLS = auto()  # the client's handshake after our 220 to STARTTLS
    DONE = auto()


class Step(Enum):
    """What a reply the proxy itself asked for answers (client commands are their own tag)."""

    BANNER = ("banner", "banner")
    TLS_EHLO = ("EHLO reply", "reply")
    TLS_STARTTLS = ("STARTTLS reply", "reply")
    XCLIENT = ("XCLIENT reply", "reply")
    RSET = ("RSET reply", "reply")
    AUTH_LINE = ("AUTH reply", "reply")
    AUTH_CANCEL = ("AUTH cancel reply", "reply")
    END_OF_DATA = ("end of data reply", "data_term")

    def __init__(self, what: str, timeout: str) -> None:
        self.what = what
        self.timeout = timeout


Tag = Command | Step


class Waiting(Enum):
    """What the current ``deadline`` is for (so DeadlinePassed is judged rightly)."""

    NOTHING = auto()
    CONNECT = auto()
    REPLY = auto()
    CLIENT = auto()
    CLIENT_TLS = auto()
    UPSTREAM_TLS = auto()


class _Refusal:
    """Early input from a host that was not offered early pipelining, found after EHLO."""

    def __init__(self, action: str) -> None:
        self.action = action


class _SyncViolation:
    def __init__(self, verb: str) -> None:
        self.verb = verb


class _LocalReply:
    def __init__(self, cmd: Command, reply: Reply) -> None:
        self.cmd = cmd
        self.reply = reply


class _StartTls:
    pass


# What stopped the collection of a group; handled once the group's replies are in.
_Held = ProtocolError | Closed | _Refusal | _SyncViolation | _LocalReply | _StartTls


class SessionMachine:
    def __init__(
        self,
        config: Config,
        *,
        client: Endpoint,
        local: Endpoint,
        listener: str,
        offer_starttls: bool = False,
        implicit_tls: bool = False,
        upstream_tls: bool = False,
        hostname: str = "localhost",
        counters: Counters | None = None,
    ) -> None:
        self.cfg = config
        self.client = (str(unmap(client[0])), client[1])
        self.local = local
        self.counters: Counters = counters or NoCounters()
        self.offer_starttls = offer_starttls
        self.implicit_tls = implicit_tls
        self.upstream_tls = upstream_tls
        self.hostname = hostname  # our EHLO towards an MTA we speak TLS to
        pc = config.pipe_connect
        self.allowed = pc.advertise_hosts.matches(self.client[0])
        self.keywords: tuple[str, ...] = tuple(pc.keywords) if self.allowed else ()
        policy = pc.unadvertised_early_input
        if self.allowed:
            policy = "accept"
        elif policy == "forward" and (config.upstream.client_identity == "xclient" or upstream_tls):
            # Forwarded bytes go right behind the connect: before XCLIENT or our own EHLO and
            # STARTTLS, which must come first. Refuse instead.
            policy = "defer"
        self.policy = policy
        lim = config.limits
        self.reader = CommandReader(lim.max_command_line, lim.bare_newline)
        self.mta: MtaConversation[Tag] = MtaConversation(lim.max_reply_line)
        self.log = SessionLog(listener, self.client, str(config.upstream.address))
        self.phase = Phase.EARLY
        # -- what the driver waits for
        self.wants_client = False
        self.wants_upstream = False
        self.deadline: float | None = None
        self.read_size = READ_SIZE
        self._waiting = Waiting.NOTHING
        self._wait_timeout = 0.0
        # -- state
        self._now = 0.0
        self._actions: list[Action] = []
        self._out = bytearray()  # replies queued for the client's next write
        self._early = bytearray()
        self._forwarded = 0  # early bytes passed on (forward): whole, checked lines
        self._forward_unsent = bytearray()  # ... before the MTA connection was up
        self._last_forwarded = ""
        self._skip = 0  # forwarded bytes the relay must not send again
        self._up_open = False  # connected to the MTA and not closed since
        self.client_eof = False
        self.client_tls = False
        self._after_starttls = False
        self._ehlos = 0  # EHLO commands since connect or since the TLS handshake
        self.in_transaction = False
        self._replaying = False  # commands held before the banner are being replayed
        self._local_errors = 0
        self._batch: deque[Command] = deque()  # a group sent one command per reply
        self._held: _Held | None = None
        self._chunk_done = False  # the BDAT chunk at the head is relayed, its reply due
        self._message = bytearray()  # message bytes parsed, not yet sent
        self._refused: Reply | None = None  # message refused: the reply after its end
        self._unit_mark = -1  # CommandReader.units when the client deadline was set
        self._reply_mark = -1  # replies seen when the MTA deadline was set
        self._replies_seen = 0
        # An end of data (or BDAT LAST) went to the MTA and its verdict has not yet left
        # in a write: a shutdown waits for it, or the client's retry would duplicate it.
        self._verdict_awaited = False
        self._verdict_queued = False
        self._stop_after_verdict = False
        self._stop_now = False  # the verdict has left: end with the 421 now
        self._banner = Reply.make(0)
        t = config.timeouts
        self._reply_timeouts = {"MAIL": t.mail, "RCPT": t.rcpt, "DATA": t.data_init}
        self._auth_error: ProtocolError | None = None  # the client's bad AUTH line
        self._discard_reply: Reply | None = None  # for a BDAT chunk refused locally

    # ------------------------------------------------------------ interface

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    @property
    def early_input_urgent(self) -> bool:
        """Whether early input must be acted on as it arrives (refused, or forwarded before
        the banner). Otherwise it is only held, and a driver may read it once the MTA is
        ready: whatever the client sent before it saw the banner is early all the same."""
        return self.policy != "accept"

    @property
    def verdict_pending(self) -> bool:
        return self._verdict_awaited or self._verdict_queued

    def start(self, now: float) -> list[Action]:
        self._now = now
        if self.implicit_tls:
            self.phase = Phase.TLS_ON_CONNECT
            self._act(StartTls(Side.CLIENT))
            self._wait(Waiting.CLIENT_TLS, self.cfg.timeouts.command)
        else:
            self._connect()
            self.wants_client = True
        return self._take()

    def defer_shutdown(self) -> bool:
        """Called when the proxy stops: True if the session must first relay the verdict
        on a message the MTA has in full (it then ends right after that write)."""
        if self.verdict_pending and not self.done:
            self._stop_after_verdict = True
            return True
        return False

    def handle(self, event: Event, now: float) -> list[Action]:
        if self.phase is Phase.DONE:
            return []
        self._now = now
        kind = type(event)
        if kind is ClientData:
            assert isinstance(event, ClientData)
            self._on_client_data(event.data)
        elif kind is UpstreamData:
            assert isinstance(event, UpstreamData)
            self.mta.feed(event.data)
            self._pump()
        elif kind is ClientEof:
            self._on_client_eof()
        elif kind is DeadlinePassed:
            self._on_deadline()
        else:
            self._on_other(event)
        if self._stop_now and not self.done:
            self._on_shutdown(False)
        if self.phase is Phase.EARLY:  # early input is read whatever else is awaited
            self.wants_client = not self.client_eof and self.read_size > 0
        return self._take()

    # ------------------------------------------------------------ plumbing

    def _take(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions

    def _act(self, action: Action) -> None:
        self._actions.append(action)

    def _wait(self, waiting: Waiting, timeout: float | None) -> None:
        """Wait for nothing but the end of an action (a handshake, a lookup, a connect;
        in the early phase client input is read meanwhile)."""
        self.wants_client = False
        self.wants_upstream = False
        self._waiting = waiting
        self._wait_timeout = timeout or 0.0
        self.deadline = None if timeout is None else self._now + timeout

    def _wait_client(self, timeout: float) -> None:
        """Flush the replies, then wait for the next unit of client input. ``timeout``
        bounds the whole unit (a command line, a message line or 64 KiB of one, 64 KiB of
        a BDAT chunk), not each read: a client trickling bytes cannot stretch it."""
        self._replaying = False
        self._flush()
        if self.reader.units != self._unit_mark:
            self._unit_mark = self.reader.units
            self.deadline = self._now + timeout
        self.wants_client = True
        self.wants_upstream = False
        self._waiting = Waiting.CLIENT
        self._wait_timeout = timeout
        self.read_size = READ_SIZE

    def _wait_reply(self) -> None:
        """Wait for the MTA's reply to the oldest command it has not answered, whole
        within that command's timeout."""
        if self._replies_seen != self._reply_mark:
            self._reply_mark = self._replies_seen
            tag = self.mta.next_tag
            if isinstance(tag, Step):
                timeout = getattr(self.cfg.timeouts, tag.timeout)
            elif tag.verb == "BDAT" and ends_group(tag):
                timeout = self.cfg.timeouts.data_term
            else:
                timeout = self._timeout(tag)
            self._wait_timeout = timeout
            self.deadline = self._now + timeout
        self.wants_client = False
        self.wants_upstream = True
        self._waiting = Waiting.REPLY

    def _timeout(self, cmd: Command) -> float:
        return self._reply_timeouts.get(cmd.verb, self.cfg.timeouts.reply)

    def _what(self) -> str:
        """The reply awaited, as the log names it."""
        if not self.mta.pending:
            return "reply"
        tag = self.mta.next_tag
        if isinstance(tag, Step):
            return tag.what
        return "BDAT reply" if tag.verb == "BDAT" else tag.verb

    def _queue(self, reply: Reply) -> None:
        self._out += reply.to_bytes()

    def _flush(self) -> None:
        if self._out:
            verdict = self._verdict_queued
            self._act(SendClient(bytes(self._out), verdict=verdict))
            self._out.clear()
            self._verdict_queued = False
            if verdict and self._stop_after_verdict:
                self._stop_now = True  # the 421 right behind this write (handle, _pump)

    def _send(self, tag: Tag, line: bytes) -> None:
        command = tag is not Step.AUTH_LINE and tag is not Step.AUTH_CANCEL
        self._to_mta(self.mta.send(tag, line, command=command))

    def _to_mta(self, data: bytes) -> None:
        if self._skip:  # forwarded before the banner already: the MTA has these
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        if data:
            self._act(SendUpstream(data))

    def _finish(self, outcome: Outcome) -> None:
        self.log.outcome = outcome
        self.phase = Phase.DONE
        self.wants_client = self.wants_upstream = False
        self.deadline = None

    def _close_client(self, reply: Reply | None, outcome: Outcome, *, linger: bool = True) -> None:
        """Reply once, then close towards the client (the driver drains its input briefly,
        see CloseClient)."""
        if reply is not None:
            self._queue(reply)
        self._flush()
        self._act(CloseClient(linger=linger))
        self._finish(outcome)

    def _upstream_failed(self, outcome: Outcome, detail: str) -> None:
        self.log.detail = f"{outcome}: {detail}"
        if self._up_open:
            self._act(CloseUpstream())
            self._up_open = False
        self._close_client(upstream_unavailable(detail), outcome)

    # ------------------------------------------------------------ events

    def _on_client_data(self, data: bytes) -> None:
        if self.phase is Phase.EARLY:
            self._on_early_data(data)
            return
        self.reader.feed(data)
        self._pump()

    def _on_client_eof(self) -> None:
        self.client_eof = True
        if self.phase is Phase.EARLY:
            if not self._early:
                # Gone before the banner: nothing to do.
                if self._up_open:
                    self._act(CloseUpstream())
                self._finish(Outcome.CLIENT_GONE)
            return
        self.reader.feed_eof()
        self._pump()

    def _on_deadline(self) -> None:
        waiting, timeout = self._waiting, self._wait_timeout
        if waiting is Waiting.CLIENT:
            self.log.detail = f"client timeout after {timeout:g}s"
            self._close_client(CLIENT_TIMEOUT, Outcome.CLIENT_TIMEOUT)
        elif waiting is Waiting.CONNECT:
            self._upstream_failed(Outcome.UPSTREAM_DOWN, f"connect timed out after {timeout:g}s")
        elif waiting is Waiting.REPLY:
            self._upstream_failed(
                Outcome.UPSTREAM_TIMEOUT, f"no {self._what()} within {timeout:g}s"
            )
        elif waiting is Waiting.UPSTREAM_TLS:
            self._upstream_failed(
                Outcome.UPSTREAM_TLS, f"TLS handshake timed out after {timeout:g}s"
            )
        elif waiting is Waiting.CLIENT_TLS:
            # No SMTP reply fits inside a handshake.
            self.log.detail = f"TLS handshake timed out after {timeout:g}s"
            self._finish(Outcome.TLS_TIMEOUT)
        else:  # pragma: no cover - every deadline is set with what it is for
            raise RuntimeError(f"deadline passed while waiting for {waiting}")

    def _on_other(self, event: Event) -> None:
        if isinstance(event, UpstreamConnected):
            self._on_connected()
        elif isinstance(event, UpstreamEof):
            self._upstream_failed(
                Outcome.UPSTREAM_LOST, f"connection closed awaiting {self._what()}"
            )
        elif isinstance(event, UpstreamBroken):
            if event.sending:
                self._upstream_failed(Outcome.UPSTREAM_LOST, "connection lost while sending")
            else:
                self._upstream_failed(
                    Outcome.UPSTREAM_LOST, f"connection lost awaiting {self._what()}"
                )
        elif isinstance(event, UpstreamConnectFailed):
            self._upstream_failed(Outcome.UPSTREAM_DOWN, f"connect failed: {event.reason}")
        elif isinstance(event, ClientBroken):
            self._finish(Outcome.CLIENT_GONE)
        elif isinstance(event, SendTimedOut):
            if event.side is Side.CLIENT:
                # It reads nothing: no further byte could reach it either.
                self.log.detail = f"client read nothing for {self.cfg.timeouts.command:g}s"
                self._finish(Outcome.CLIENT_TIMEOUT)
            else:
                stalled = f"MTA took no data for {self.cfg.timeouts.data_block:g}s"
                self._upstream_failed(Outcome.UPSTREAM_TIMEOUT, stalled)
        elif isinstance(event, TlsEstablished):
            self._on_tls(event)
        elif isinstance(event, TlsFailed):
            if event.side is Side.CLIENT:
                self.log.detail = f"TLS handshake failed: {event.reason}"
                self._finish(Outcome.TLS_FAILED)
            else:
                self._upstream_failed(Outcome.UPSTREAM_TLS, f"TLS handshake: {event.reason}")
        elif isinstance(event, ClientNameResolved):
            self._send(
                Step.XCLIENT, xclient_command(self.client[0], self.client[1], name=event.name)
            )
            self._wait_reply()
        elif isinstance(event, Shutdown):
            self._on_shutdown(event.send_cut)
        else:  # pragma: no cover
            raise TypeError(f"not an event: {event!r}")

    def _on_shutdown(self, send_cut: bool) -> None:
        if self.verdict_pending and not send_cut:
            self._stop_after_verdict = True  # the verdict first (defer_shutdown)
            return
        if self._up_open:
            self._act(CloseUpstream())
        if send_cut:  # the next byte would corrupt a reply (or a handshake)
            self._finish(Outcome.SHUTDOWN)
        else:
            self._close_client(SHUTTING_DOWN, Outcome.SHUTDOWN)

    def _on_tls(self, event: TlsEstablished) -> None:
        if event.side is Side.UPSTREAM:
            self.log.upstream_tls = event.version
            self.mta.capabilities = {}  # RFC 3207: forget what was said in cleartext
            self._after_setup_step()
            self._pump()
            return
        self.client_tls = True
        self._ehlos = 0
        self.log.tls = event.version
        if self.phase is Phase.TLS_ON_CONNECT:
            self._connect(tls=event)
            return
        self._after_starttls = True
        self.phase = Phase.COMMANDS
        self._pump()

    # ------------------------------------------------------------ phase: early

    def _connect(self, tls: TlsEstablished | None = None) -> None:
        self.phase = Phase.EARLY
        up = self.cfg.upstream
        tlvs = [tls_tlv(tls.version, tls.cipher)] if tls is not None and tls.version else []
        header = identity_header(up.client_identity, self.client, self.local, tlvs)
        self._act(ConnectUpstream((up.address.host, up.address.port), header))
        self._wait(Waiting.CONNECT, up.connect_timeout)
        self.read_size = self.cfg.pipe_connect.max_early_bytes

    def _on_early_data(self, data: bytes) -> None:
        early = self._early
        early.extend(data)
        self.log.early_bytes = len(early)  # logged even if the MTA fails first
        if self.policy in ("defer", "reject"):
            self._refuse(self.policy)
            return
        if self.policy == "forward":
            # Pass the early talk on right behind the PROXY header so the MTA's own
            # early-talker checks judge it; the relay later skips these bytes. Only whole
            # lines the proxy would pass as commands: never one only the proxy may send,
            # nor one the MTA could read as another command.
            lines = bytes(early[self._forwarded : early.rfind(b"\n") + 1])
            verb = forwardable(lines, self.cfg.limits.max_command_line, self._last_forwarded)
            if verb is None:
                self._refuse("defer")
                return
            if lines:
                self._forwarded += len(lines)
                self._last_forwarded = verb
                self._skip += len(lines)
                if self._up_open:
                    self._act(SendUpstream(lines))
                else:
                    self._forward_unsent += lines
        self.read_size = self.cfg.pipe_connect.max_early_bytes - len(early)

    def _refuse(self, action: str) -> None:
        self.log.detail = f"early input refused ({action})"
        self.counters.early_refused(action)
        if self._up_open:
            self._act(CloseUpstream())
            self._up_open = False
        self._close_client(REFUSE_REPLIES[action], Outcome.SYNC_ERROR)

    def _on_connected(self) -> None:
        self._up_open = True
        self.mta.expect(Step.BANNER, banner=True)
        if self._forward_unsent:
            self._act(SendUpstream(bytes(self._forward_unsent)))
            self._forward_unsent.clear()
        self._wait_reply()

    def _on_setup_reply(self, step: Step, reply: Reply) -> None:
        """A reply in the early phase: the banner, then our own EHLO/STARTTLS, XCLIENT."""
        if step is Step.BANNER:
            self._banner = reply
            if reply.code == 220 and self.upstream_tls:
                self._send(Step.TLS_EHLO, f"EHLO {self.hostname}\r\n".encode())
                self._wait_reply()
                return
            if reply.code == 220 and self.cfg.upstream.client_identity == "xclient":
                self._resolve()
                return
            self._begin_relay()
        elif step is Step.TLS_EHLO:
            if reply.code != 250 or "STARTTLS" not in ehlo_keywords(reply):
                self._upstream_failed(
                    Outcome.UPSTREAM_TLS, f"MTA does not offer STARTTLS ({reply.code})"
                )
                return
            self._send(Step.TLS_STARTTLS, b"STARTTLS\r\n")
            self._wait_reply()
        elif step is Step.TLS_STARTTLS:
            if reply.code != 220:
                refused = f"STARTTLS refused: {reply.code} {reply.text}"
                self._upstream_failed(Outcome.UPSTREAM_TLS, refused)
            elif self.mta.buffered:
                # Bytes behind the 220 would be read as if they came over TLS.
                self._upstream_failed(
                    Outcome.UPSTREAM_TLS, "MTA sent data after its STARTTLS reply"
                )
            else:
                up = self.cfg.upstream
                name = up.tls_server_name or _name_or_none(up.address.host)
                self._act(StartTls(Side.UPSTREAM, server_name=name))
                self._wait(Waiting.UPSTREAM_TLS, self.cfg.timeouts.reply)
        elif step is Step.XCLIENT:
            if reply.code != 220:
                refused = f"XCLIENT refused: {reply.code} {reply.text}"
                self._upstream_failed(Outcome.UPSTREAM_XCLIENT, refused)
                return
            self._begin_relay()

    def _after_setup_step(self) -> None:
        if self.cfg.upstream.client_identity == "xclient":
            self._resolve()
        else:
            self._begin_relay()

    def _resolve(self) -> None:
        self._act(ResolveClientName(self.client[0]))
        # The lookup bounds itself (upstream.client_name).
        self._wait(Waiting.NOTHING, None)

    def _begin_relay(self) -> None:
        """The MTA is ready: replay what the client sent early under its rules."""
        banner = self._banner
        if self._forwarded:
            # Forwarded early bytes: the client stream is relayed as is from here on.
            self.log.detail = "early input forwarded"
        elif self._early:
            self.log.early_used = True
            self.log.round_trips_saved = 1  # the wait for the banner
            self._replaying = True
        self.phase = Phase.COMMANDS
        self.reader.feed(bytes(self._early))
        self._early.clear()
        if self.client_eof:
            self.reader.feed_eof()
        if banner.code != 220:
            self.log.detail = f"banner {banner.code}"
        self._mta_reply(banner)

    # ------------------------------------------------------------ the relay

    def _pump(self) -> None:
        """Make progress until the machine must wait for one side."""
        while not self._stop_now:
            phase = self.phase
            if phase is Phase.COMMANDS:
                progressed = self._step_commands()
            elif phase is Phase.DATA:
                progressed = self._step_data()
            elif phase is Phase.BDAT:
                progressed = self._step_bdat()
            elif phase is Phase.BDAT_DISCARD:
                progressed = self._step_bdat_discard()
            elif phase is Phase.AUTH:
                progressed = self._step_auth()
            elif phase is Phase.EARLY:
                progressed = self._step_early()
            else:
                return  # STARTTLS, DONE: waiting for an event
            if not progressed:
                return

    def _next_reply(self) -> tuple[Tag, Reply] | None:
        try:
            got = self.mta.next_reply()
        except ProtocolError as exc:
            self._upstream_failed(Outcome.UPSTREAM_PROTOCOL, exc.reply.text)
            return None
        if got is None:
            self._wait_reply()
        else:
            self._replies_seen += 1
        return got

    def _step_early(self) -> bool:
        if not self.mta.pending:
            return False
        got = self._next_reply()
        if got is None:
            return False
        tag, reply = got
        assert isinstance(tag, Step), tag
        self._on_setup_reply(tag, reply)
        return True

    def _step_commands(self) -> bool:
        """Commands and replies, until the machine waits (False) or changes phase."""
        mta = self.mta
        while self.phase is Phase.COMMANDS:
            if mta.pending:
                tag = mta.next_tag
                if type(tag) is Command and tag.verb == "BDAT" and not self._chunk_done:
                    self.phase = Phase.BDAT
                    break
                got = self._next_reply()
                if got is None:
                    return False
                tag, reply = got
                if isinstance(tag, Step):
                    self._on_step_reply(tag, reply)
                elif tag.verb == "BDAT":
                    self._on_bdat_reply(tag, reply)
                else:
                    self._on_reply(tag, reply)
            elif self._batch:
                cmd = self._batch.popleft()
                self._send(cmd, cmd.raw)
                if cmd.verb == "BDAT":
                    self._chunk_done = False
                elif not mta.buffered:  # the usual case: its reply cannot be here yet
                    self._wait_reply()
                    return False
            elif self._held is not None:
                held, self._held = self._held, None
                self._on_held(held)
            elif not self._collect():
                return False
        return True

    def _collect(self) -> bool:
        """Read commands up to the end of a group (or of what the client sent), then send
        them. Whatever stops the group is held until its replies are in."""
        reader = self.reader
        batch: list[Command] = []
        max_batch = self.cfg.limits.max_pipelined_commands
        while True:
            try:
                event = reader.next_event()
            except ProtocolError as exc:
                self._held = exc
                break
            if event is NEED_DATA:
                if batch:
                    break  # answer what we have before waiting for more
                self._wait_client(self.cfg.timeouts.command)
                return False
            if isinstance(event, Closed):
                self._held = event
                break
            assert isinstance(event, Command), event
            self.log.commands += 1
            verb = event.verb
            if verb == "EHLO":
                self._ehlos += 1
                if self._ehlos == 1 and reader.buffered:
                    self._pipelined_behind_first_ehlo()
            if reader.buffered and verb == "EHLO" and not self.keywords:
                refusal = self.policy if self.policy in ("defer", "reject") else None
                if refusal is not None:
                    # A client with a stale cache whose early input came just after the
                    # banner: the early-input policy, not a 554 that bounces.
                    self._held = _Refusal(refusal)
                    break
            elif reader.buffered and self._sync_point(event):
                self._held = _SyncViolation(verb)
                break
            if verb == "STARTTLS" and self.offer_starttls and not self.client_tls:
                self._held = _StartTls()
                break
            local = self._local_reply(event)
            if local is not None:
                self._held = _LocalReply(event, local)
                break
            batch.append(event)
            if ends_group(event) or verb == "BDAT" or len(batch) >= max_batch:
                break
        if batch:
            self._run_batch(batch)
        return True

    def _run_batch(self, batch: list[Command]) -> None:
        """Send commands the client pipelined the way the MTA tolerates: one write for the
        group when it offered PIPELINING, otherwise one command per reply."""
        if self._replaying:
            self.log.replayed += len(batch)
        if batch[-1].verb == "QUIT":
            # QUIT pipelined behind the message: its 250 must not wait for the MTA's QUIT
            # reply (native Exim takes 200 ms over it).
            self._flush()
        if batch[-1].verb == "BDAT":
            self._chunk_done = False
        if self.mta.pipelining and len(batch) > 1:
            for cmd in batch:
                self.mta.send(cmd, cmd.raw)
            self._to_mta(b"".join(cmd.raw for cmd in batch))
        else:
            self._batch.extend(batch)

    def _sync_point(self, cmd: Command) -> bool:
        """Whether the client had to wait for the reply to ``cmd`` before sending more (an
        EHLO where early pipelining was advertised may carry a group)."""
        return cmd.verb in SYNC_POINTS and not (cmd.verb == "EHLO" and self.keywords)

    def _pipelined_behind_first_ehlo(self) -> None:
        """Commands already behind the first EHLO mean the client did not wait for the EHLO
        reply, let alone the banner: early pipelining, even when its bytes happened to
        arrive just after our banner left (a fast MTA on loopback answers within the
        client's round trip). After STARTTLS it saves the wait for the new EHLO reply."""
        if not self.keywords:
            return
        self.log.early_used = True
        if self._after_starttls:
            self.log.round_trips_saved += 1
        else:
            self.log.round_trips_saved = 2  # the banner and the EHLO reply
            self._replaying = True

    def _local_reply(self, cmd: Command) -> Reply | None:
        if cmd.verb in PROXY_ONLY_VERBS:
            return Reply.make(550, f"5.7.1 {cmd.verb} not permitted: only the proxy speaks for you")
        if cmd.verb == "STARTTLS":
            return Reply.make(454, "4.7.0 TLS not available")
        if cmd.verb == "BDAT" and not self.mta.chunking:
            if self.log.early_used:
                # Sent on a cached EHLO reply with CHUNKING that the MTA has since dropped:
                # a 4xx makes the client defer and re-learn; a 5xx would bounce the message.
                return Reply.make(451, "4.3.0 CHUNKING is no longer offered, try again")
            return Reply.make(502, "5.5.1 BDAT not supported")
        return None

    def _on_held(self, held: _Held) -> None:
        if isinstance(held, ProtocolError):
            self._queue(held.reply)
            if held.fatal:
                self._close_client(None, Outcome.PROTOCOL_ERROR)
                return
            self._local_errors += 1
            if self._local_errors >= MAX_LOCAL_ERRORS:
                # A client streaming junk would otherwise keep the relay answering it line
                # by line at full speed (bench/attack.py). Exim stops at 3, Postfix at 20.
                self.log.detail = f"{self._local_errors} protocol errors"
                self._close_client(TOO_MANY_ERRORS, Outcome.TOO_MANY_ERRORS)
        elif isinstance(held, Closed):
            if self._up_open and not self.reader.in_data:
                self._to_mta(b"QUIT\r\n")  # its reply does not matter
            self._flush()
            self._finish(Outcome.CLIENT_CLOSED)
        elif isinstance(held, _Refusal):
            self._refuse(held.action)
        elif isinstance(held, _SyncViolation):
            # As Postfix and Exim: the commands before it were answered; this one and
            # whatever the client sent behind it are not executed.
            verb = held.verb
            self.log.detail = f"input pipelined after {verb}"
            self.counters.sync_violation(verb)
            reply = f"5.5.0 {SYNC_ERROR}: input sent before the reply to {verb}"
            self._close_client(Reply.make(554, reply), Outcome.SYNC_VIOLATION)
        elif isinstance(held, _StartTls):
            if self.in_transaction:
                # STARTTLS resets the SMTP state (RFC 3207); make the MTA forget it too.
                self._send(Step.RSET, b"RSET\r\n")
                self._held = held  # again, once the RSET is answered
                return
            self._starttls()
        elif held.cmd.verb == "BDAT":
            self._discard_reply = held.reply  # after the chunk, read and dropped
            self.phase = Phase.BDAT_DISCARD
        else:
            self._queue(held.reply)

    def _starttls(self) -> None:
        """Answer STARTTLS ourselves and terminate TLS; the MTA stays in cleartext."""
        self._queue(STARTTLS_READY)
        self._flush()
        dropped = self.reader.discard_buffered()
        if dropped:
            # Plaintext behind STARTTLS must never be executed (CVE-2011-0411 class).
            self.log.detail = f"{dropped} plaintext bytes after STARTTLS discarded"
        self._replaying = False
        self.phase = Phase.STARTTLS
        self._act(StartTls(Side.CLIENT))
        self._wait(Waiting.CLIENT_TLS, self.cfg.timeouts.command)

    def _on_step_reply(self, step: Step, reply: Reply) -> None:
        if step is Step.END_OF_DATA:
            self._message_done(reply)
        elif step is Step.RSET:
            self.in_transaction = False  # the held STARTTLS goes on
        elif step is Step.AUTH_LINE:
            self._mta_reply(reply, "AUTH")
            if reply.code == 334 and not self.done:
                self.reader.expect_line()
                self.phase = Phase.AUTH
        elif step is Step.AUTH_CANCEL:
            # The MTA's answer to "*" is not the client's: it hears about its own line.
            assert isinstance(self._auth_error, ProtocolError)
            self._queue(self._auth_error.reply)
        else:  # pragma: no cover - setup steps come before the relay
            raise RuntimeError(f"unexpected {step} in the relay")

    def _on_reply(self, cmd: Command, reply: Reply) -> None:
        verb = cmd.verb
        if verb == "EHLO":
            self.log.helo = cmd.args.strip()
            if reply.code == 250:
                reply = rewrite_ehlo(
                    reply,
                    keywords=self.keywords,
                    starttls=self.offer_starttls and not self.client_tls,
                )
                if self.keywords and not self.log.advertised:
                    self.log.advertised = True
                    self.counters.advertised()
        elif verb == "HELO":
            self.log.helo = cmd.args.strip()
        elif verb == "RCPT" and reply.positive:
            self.log.rcpts += 1
        elif verb == "MAIL":
            self.in_transaction = reply.positive
        elif verb == "RSET":
            self.in_transaction = False
        self._mta_reply(reply, verb)
        if self.done:
            return
        if verb == "DATA" and reply.code == 354:
            self.reader.start_data()
            self._flush()  # the client waits for the 354 before it sends the message
            self.phase = Phase.DATA
        elif verb == "AUTH" and reply.code == 334:
            self.reader.expect_line()
            self.phase = Phase.AUTH
        elif verb == "QUIT":
            self._close_client(None, Outcome.QUIT, linger=False)

    def _mta_reply(self, reply: Reply, verb: str = "") -> None:
        """Queue a reply from the MTA. A 421, or a 221 to anything but QUIT, means it is
        closing the channel (RFC 5321 3.8; Postfix says 221 to "GET /"): end the session
        there, not with a 421 of ours after relaying more commands into a dead connection
        (nothing may follow a 221), and say so in the log."""
        self._queue(reply)
        if reply.code == 421 or (reply.code == 221 and verb != "QUIT"):
            self.log.detail = f"MTA: {reply.code} {reply.text}"
            outcome = Outcome.UPSTREAM_421 if reply.code == 421 else Outcome.UPSTREAM_221
            self._close_client(None, outcome, linger=reply.code == 421)

    # ------------------------------------------------------------ message data

    def _step_data(self) -> bool:
        reader = self.reader
        while True:
            try:
                event = reader.next_event()
            except ProtocolError as exc:
                self._close_client(exc.reply, Outcome.PROTOCOL_ERROR)
                return False
            kind = type(event)
            if kind is DataChunk:
                assert isinstance(event, DataChunk)
                n = len(event.data)
                self.log.bytes_in += n
                self.counters.message_bytes(n)
                self._message += event.data
            elif event is NEED_DATA:
                if self._message:  # what this read held, in one write
                    self._to_mta(bytes(self._message))
                    self._message.clear()
                refused = self._refused
                size = self.mta.size
                if refused is not None and size and reader.discarded > size:
                    # Longer than the MTA would take: answer now rather than read on.
                    self._close_client(refused, Outcome.PROTOCOL_ERROR)
                    return False
                self._wait_client(self.cfg.timeouts.data_block)
                return False
            elif kind is EndOfData:
                assert isinstance(event, EndOfData)
                if self._refused is not None:
                    self._close_client(self._refused, Outcome.PROTOCOL_ERROR)
                    return False
                # The last piece and the terminator in one write (one segment, one syscall).
                self._verdict_awaited = True
                self.mta.expect(Step.END_OF_DATA)
                self._to_mta(bytes(self._message + event.raw))
                self._message.clear()
                self.phase = Phase.COMMANDS
                return True
            elif kind is DataRefused:
                assert isinstance(event, DataRefused)
                # Dropping the connection is the only way to make the MTA discard a message
                # it has part of. The client hears why once it has sent its end of data.
                self._refused = event.reply
                self._message.clear()
                self._act(CloseUpstream())
                self._up_open = False
                self.log.detail = event.reply.text
            else:
                assert isinstance(event, Closed), event
                self._finish(Outcome.CLIENT_GONE_IN_DATA)
                return False

    def _step_bdat(self) -> bool:
        event = self.reader.next_event()
        if event is NEED_DATA:
            self._wait_client(self.cfg.timeouts.data_block)
            return False
        if isinstance(event, BdatChunk):
            n = len(event.data)
            self.log.bytes_in += n
            self.counters.message_bytes(n)
            head = self.mta.next_tag
            assert isinstance(head, Command)
            if ends_group(head) and not self.reader.bdat_left:
                self._verdict_awaited = True  # these octets complete the message
            self._to_mta(event.data)
            return True
        if isinstance(event, BdatEnd):
            if event.last:
                self._verdict_awaited = True
            self._chunk_done = True
            self.phase = Phase.COMMANDS
            return True
        assert isinstance(event, Closed), event
        self._finish(Outcome.CLIENT_GONE_IN_DATA)
        return False

    def _on_bdat_reply(self, cmd: Command, reply: Reply) -> None:
        if ends_group(cmd):
            self._message_done(reply)
        else:
            self._mta_reply(reply, "BDAT")

    def _step_bdat_discard(self) -> bool:
        event = self.reader.next_event()
        if event is NEED_DATA:
            self._wait_client(self.cfg.timeouts.data_block)
            return False
        if isinstance(event, BdatEnd):
            self.phase = Phase.COMMANDS
            assert self._discard_reply is not None
            self._queue(self._discard_reply)
            return True
        if isinstance(event, Closed):
            self._finish(Outcome.CLIENT_GONE_IN_DATA)
            return False
        return True  # a chunk piece: dropped

    def _message_done(self, reply: Reply) -> None:
        self.in_transaction = False
        self._verdict_awaited = False
        if reply.code == 250:
            self.log.messages += 1
            self.counters.message()
        self._verdict_queued = True
        self._mta_reply(reply, "end of data")
        if self.done:
            return
        if self._stop_after_verdict:
            self._flush()  # draining: the verdict now, then the 421 (_stop_now)

    # ------------------------------------------------------------ AUTH

    def _step_auth(self) -> bool:
        try:
            event = self.reader.next_event()
        except ProtocolError as exc:
            # The line never reaches the MTA: cancel the exchange there (RFC 4954 "*") and
            # answer the client ourselves, so both stay in step.
            if exc.fatal:
                self._close_client(exc.reply, Outcome.PROTOCOL_ERROR)
                return False
            self._auth_error = exc
            self._send(Step.AUTH_CANCEL, b"*\r\n")
            self.phase = Phase.COMMANDS
            return True
        if event is NEED_DATA:
            self._wait_client(self.cfg.timeouts.command)
            return False
        if isinstance(event, Closed):
            self._finish(Outcome.CLIENT_GONE)
            return False
        assert isinstance(event, RawLine), event
        self._send(Step.AUTH_LINE, event.raw)
        self.phase = Phase.COMMANDS
        return True
