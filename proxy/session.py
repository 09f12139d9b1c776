"""One client session: early buffer, banner, replay under the MTA's rules, relay.

The trio code here only moves bytes and keeps time; framing lives in ``smtp``.
Replies to the client are queued and written in one send just before the session
would block reading the client, so the banner and the replies to everything a client
sent early leave in one segment.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import re
import socket
import time
from dataclasses import dataclass, field

import trio
from OpenSSL import SSL

from . import fastio
from .config import Config
from .metrics import Metrics, tcp_rtt
from .outcomes import Outcome
from .smtp import (
    NEED_DATA,
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
from .tls import OpenSSLStream
from .upstream import (
    Endpoint,
    Upstream,
    UpstreamError,
    connect,
    starttls,
    tls_tlv,
    xclient,
)

log = logging.getLogger("pipeconnect.session")

SYNC_ERROR = "SMTP synchronization error"
_HOSTNAME = socket.gethostname()  # the proxy's EHLO name towards an MTA it speaks TLS to
REFUSE_REPLIES = {
    "defer": Reply.make(421, f"4.5.0 {SYNC_ERROR}: input before the greeting, try again later"),
    "reject": Reply.make(554, SYNC_ERROR),
}
SHUTTING_DOWN = Reply.make(421, "4.3.2 Service shutting down, closing transmission channel")
# Protocol errors the proxy answers itself (over-long lines, bare CR/LF, ...) before it
# closes the session, as Exim's smtp_max_synprot_errors and Postfix's smtpd_hard_error_limit.
MAX_LOCAL_ERRORS = 10
DRAIN_LIMIT = 256 * 1024  # bytes read (and dropped) after a final reply before closing
TOO_MANY_ERRORS = Reply.make(421, "4.7.0 Too many protocol errors, closing connection")
# Only the proxy speaks for the client to the MTA.
FORBIDDEN = {"XCLIENT", "XFORWARD"}
# Early input passed on as is (``forward``) must hold no command the relay would not send
# as is, in order (it skips the forwarded bytes by count): none it refuses or answers
# itself -- over-long lines too -- and BDAT, whose chunk is not lines.
_NOT_FORWARDED = FORBIDDEN | {"STARTTLS", "PROXY", "BDAT"}
# Commands after which a client must wait for the reply (RFC 2920 section 3.1): what Postfix
# 3.7 with smtpd_forbid_unauth_pipelining answers with a sync error when input follows them
# (measured: tests/integration/test_review_attacks.py). The proxy replays group by group, so
# the MTA could not see such a violation: the proxy judges it. EHLO may be followed by a
# group where early pipelining was advertised.
SYNC_POINTS = frozenset({"HELO", "EHLO", "DATA", "NOOP", "VRFY"})
# Characters written as \xHH in the text log: in the HELO name (between parentheses) blanks
# and parentheses too, so no HELO can make the line read as if another client had connected;
# in the quoted detail quotes, backslashes and control characters.
_HELO_UNSAFE = re.compile(r'[^\x21-\x7e]|[()"\\]')
_QUOTED_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')


def _log_text(unsafe: re.Pattern[str], text: str) -> str:
    return unsafe.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _forwardable(lines: bytes, max_line: int, after: str) -> str | None:
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


class _ClientGone(Exception):
    pass


class _End(Exception):
    """Leave the relay loop; ``outcome`` names why in the log line."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome)
        self.outcome = outcome


@dataclass
class SessionLog:
    listener: str
    client: Endpoint
    upstream: str
    start: float = field(default_factory=time.monotonic)
    helo: str = ""
    outcome: Outcome = Outcome.OPEN
    advertised: bool = False
    early_bytes: int = 0
    early_used: bool = False
    replayed: int = 0
    round_trips_saved: int = 0
    client_rtt: float | None = None  # smoothed RTT from TCP_INFO, seconds
    tls: str = ""  # negotiated TLS version towards the client
    upstream_tls: str = ""  # towards the MTA (upstream.tls = "starttls")
    commands: int = 0
    messages: int = 0
    rcpts: int = 0
    bytes_in: int = 0
    detail: str = ""

    @property
    def time_saved(self) -> float:
        """Seconds early pipelining saved this client: its smoothed RTT per skipped wait."""
        if self.client_rtt is None:
            return 0.0
        return self.client_rtt * self.round_trips_saved

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def l_field(self) -> str:
        return "L*" if self.early_used else "L." if self.advertised else ""

    def render(self, fmt: str) -> str:
        duration = self.elapsed
        if fmt == "json":
            return json.dumps(
                {
                    "event": "session",
                    "listener": self.listener,
                    "tls": self.tls,
                    "upstream_tls": self.upstream_tls,
                    "client": f"{self.client[0]}:{self.client[1]}",
                    "helo": self.helo,
                    "upstream": self.upstream,
                    "outcome": self.outcome,
                    "L": self.l_field,
                    "advertised": self.advertised,
                    "early_bytes": self.early_bytes,
                    "early_used": self.early_used,
                    "replayed": self.replayed,
                    "round_trips_saved": self.round_trips_saved,
                    "client_rtt": self.client_rtt,
                    "time_saved": round(self.time_saved, 6),
                    "commands": self.commands,
                    "messages": self.messages,
                    "rcpts": self.rcpts,
                    "bytes": self.bytes_in,
                    "duration": round(duration, 3),
                    "detail": self.detail,
                }
            )
        parts = [
            f"H=({_log_text(_HELO_UNSAFE, self.helo)}) [{self.client[0]}]:{self.client[1]}",
            f"I={self.listener}",
            f"X={self.tls}" if self.tls else "",
            f"U={self.upstream}",
            f"UX={self.upstream_tls}" if self.upstream_tls else "",
            self.l_field,
            f"C={self.commands}",
            f"M={self.messages}",
            f"R={self.rcpts}",
            f"S={self.bytes_in}",
            f"E={self.early_bytes}" if self.early_bytes else "",
            f"RT={self.round_trips_saved}" if self.round_trips_saved else "",
            f"TS={self.time_saved * 1000:.3f}ms" if self.round_trips_saved else "",
            f"DT={duration:.3f}s",
            f"outcome={self.outcome}",
            f'detail="{_log_text(_QUOTED_UNSAFE, self.detail)}"' if self.detail else "",
        ]
        return " ".join(p for p in parts if p)


def _client_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _name_or_none(host: str) -> str | None:
    """A host name to send as SNI and verify; an IP address is neither."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one real error out of a nursery (the other task was merely cancelled)."""
    errors = group.exceptions
    return errors[0] if len(errors) == 1 else group


class Session:
    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        client: Endpoint,
        local: Endpoint,
        listener: str,
        config: Config,
        metrics: Metrics,
        tls_context: SSL.Context | None = None,
        implicit_tls: bool = False,
        upstream_tls_context: SSL.Context | None = None,
    ) -> None:
        self.raw_stream = stream
        self.socket = stream.socket
        self.client_stream: trio.abc.Stream = stream
        self.tls_context = tls_context
        self.upstream_tls_context = upstream_tls_context
        self.implicit_tls = implicit_tls
        self.tls_active = False
        self._after_starttls = False
        self._ehlos = 0  # EHLO commands since connect or since the TLS handshake
        self.in_transaction = False
        self.client = (str(_client_ip(client[0])), client[1])
        self.local = local
        self.cfg = config
        self.metrics = metrics
        pc = config.pipe_connect
        self.allowed = pc.advertise_hosts.matches(self.client[0])
        self.keywords: tuple[str, ...] = tuple(pc.keywords) if self.allowed else ()
        lim = config.limits
        self.reader = CommandReader(lim.max_command_line, lim.bare_newline)
        self.out = bytearray()
        self.up: Upstream | None = None
        self.up_pipelining = False
        self.up_chunking = False
        self.up_size = 0  # the MTA's SIZE limit (0: none advertised)
        self.client_eof = False
        self._local_errors = 0  # non-fatal ProtocolErrors answered so far
        self._replaying = False  # commands held before the banner are being replayed
        self._stop = trio.CancelScope()  # cancelled by shutdown() when the drain grace ends
        # An end of data (or BDAT LAST) has gone to the MTA and its verdict is not yet with
        # the client ("awaited" from the MTA, then "queued" until a send has carried it):
        # shutdown() waits for it, or the client's retry would duplicate the message.
        self._verdict = ""
        self._stop_after_verdict = False
        self._client_send_cut = False  # a cancelled send left a partial reply on the wire
        # The wait for the next unit of client input (CommandReader.units) ends here.
        self._unit_mark = -1
        self._unit_deadline = 0.0
        self.log = SessionLog(listener, self.client, str(config.upstream.address))

    # ------------------------------------------------------------ entry point

    async def run(self) -> None:
        listener = self.log.listener
        self.metrics.active.labels(listener).inc()
        try:
            await self._run()
        except Exception:
            self.log.outcome = Outcome.INTERNAL_ERROR
            raise
        finally:
            self.metrics.active.labels(listener).dec()
            self.metrics.record_session(self.log)
            log.info(self.log.render(self.cfg.log.format))

    def shutdown(self) -> None:
        """End the session with a 421 (the proxy is stopping and the grace is over): now,
        or right after relaying the verdict on a message the MTA already has in full."""
        if self._verdict:
            self._stop_after_verdict = True
        else:
            self._stop.cancel()

    async def _run(self) -> None:
        try:
            with self._stop:
                await self._run_phases()
            if self._stop.cancelled_caught:
                self.log.outcome = Outcome.SHUTDOWN
                if not self._client_send_cut:  # else the next byte would corrupt a reply
                    with trio.move_on_after(self.cfg.timeouts.early_drain):
                        await self._close_client(SHUTTING_DOWN)
        finally:
            self.log.client_rtt = tcp_rtt(self.socket)
            # Shielded from the drain, but bounded: a TLS close_notify to a client that
            # reads nothing must not wait for ever (a cancelled close is forceful).
            with trio.CancelScope(shield=True) as closing:
                closing.deadline = trio.current_time() + self.cfg.timeouts.early_drain
                if self.up is not None:
                    await self.up.aclose()
                await self.client_stream.aclose()

    async def _run_phases(self) -> None:
        try:
            early = await self._early_phase()
            if early is not None:
                await self._refuse(early)
                return
            await self._relay()
        except UpstreamError as exc:
            self.log.outcome = exc.outcome
            self.log.detail = str(exc)
            await self._close_client(exc.reply)
        except _ClientGone:
            self.log.outcome = Outcome.CLIENT_GONE
        except _End as end:
            self.log.outcome = end.outcome

    # ------------------------------------------------------------ phase 1: before the banner

    async def _early_phase(self) -> str | None:
        """Connect upstream and read the banner while holding what the client sends.

        Returns the refusal action when a host that was not advertised talked early."""
        policy = self.cfg.pipe_connect.unadvertised_early_input
        if self.allowed:
            policy = "accept"
        elif policy == "forward" and self.cfg.upstream.client_identity == "xclient":
            # XCLIENT follows the banner, so early bytes could not precede it: refuse instead.
            policy = "defer"
        refused: list[str] = []
        header_sent = trio.Event()
        handshake_done = trio.Event()  # TLS-on-connect: early bytes count after it
        banner: list[Reply] = []
        early = bytearray()
        limit = self.cfg.pipe_connect.max_early_bytes

        forwarded = 0  # early bytes passed on (forward): whole, checked lines
        last_verb = ""

        async def read_early(scope: trio.CancelScope) -> None:
            nonlocal forwarded, last_verb
            if self.implicit_tls:
                await self._start_tls()
            handshake_done.set()
            while len(early) < limit:
                data = await self._receive(limit - len(early), None, 0.0)
                if not data:
                    self.client_eof = True
                    if not early:
                        scope.cancel()  # gone before the banner: nothing to do
                    return
                early.extend(data)
                self.log.early_bytes = len(early)  # logged even if the MTA fails first
                if policy in ("defer", "reject"):
                    refused.append(policy)
                    scope.cancel()
                    return
                if policy == "forward":
                    # Pass the early talk on right behind the PROXY header so the MTA's own
                    # early-talker checks judge it; the relay later skips these bytes. Only
                    # whole lines the proxy would pass as commands: never one only the proxy
                    # may send, nor one the MTA could read as another command.
                    lines = bytes(early[forwarded : early.rfind(b"\n") + 1])
                    max_line = self.cfg.limits.max_command_line
                    verb = _forwardable(lines, max_line, last_verb)
                    if verb is None:
                        refused.append("defer")
                        scope.cancel()
                        return
                    if lines:
                        await header_sent.wait()
                        assert self.up is not None
                        await self.up.forward_early(lines)
                        forwarded += len(lines)
                        last_verb = verb

        async def open_upstream(scope: trio.CancelScope) -> None:
            up = self.cfg.upstream
            tlvs: list[tuple[int, bytes]] = []
            if self.implicit_tls:
                # TLS-on-connect: the header can say so (PROXY v2 SSL TLV). The MTA waits
                # for the header anyway, and we need the banner only after the handshake.
                await handshake_done.wait()
                stream = self.client_stream
                if isinstance(stream, OpenSSLStream) and stream.negotiated_version:
                    tlvs.append(tls_tlv(stream.negotiated_version, stream.cipher))
            t0 = time.monotonic()
            self.up = await connect(
                up.address,
                identity=up.client_identity,
                client=self.client,
                local=self.local,
                connect_timeout=up.connect_timeout,
                max_reply_line=self.cfg.limits.max_reply_line,
                send_timeout=self.cfg.timeouts.data_block,
                tlvs=tlvs,
            )
            t1 = time.monotonic()
            self.metrics.upstream_connect.observe(t1 - t0)
            header_sent.set()
            reply = await self.up.read_reply(self.cfg.timeouts.banner, "banner")
            self.metrics.upstream_banner.observe(time.monotonic() - t1)
            if reply.code == 220 and self.upstream_tls_context is not None:
                await starttls(
                    self.up,
                    self.upstream_tls_context,
                    ehlo=up.ehlo_name or _HOSTNAME,
                    server_name=up.tls_server_name or _name_or_none(up.address.host),
                    timeout=self.cfg.timeouts.reply,
                )
                self.log.upstream_tls = self.up.tls
            if reply.code == 220 and up.client_identity == "xclient":
                await xclient(self.up, self.client, self.cfg.timeouts.reply)
            banner.append(reply)
            await handshake_done.wait()  # never cancel a handshake half way
            scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_early, nursery.cancel_scope)
                nursery.start_soon(open_upstream, nursery.cancel_scope)
        except BaseExceptionGroup as group:
            raise _single(group) from None

        self.log.early_bytes = len(early)
        if refused:
            return refused[0]
        if not banner:
            raise _ClientGone()
        if self.up is not None and self.up.skip:
            # Forwarded early bytes: the client stream is relayed as is from here on.
            self.log.detail = "early input forwarded"
        elif early:
            self.log.early_used = True
            self.log.round_trips_saved = 1  # the wait for the banner
            self._replaying = True
        self.reader.feed(bytes(early))
        if self.client_eof:
            self.reader.feed_eof()
        if banner[0].code != 220:
            self.log.detail = f"banner {banner[0].code}"
        await self._mta_reply(banner[0])
        return None

    async def _refuse(self, action: str) -> None:
        self.log.outcome = Outcome.SYNC_ERROR
        self.log.detail = f"early input refused ({action})"
        self.metrics.early_refused.labels(action).inc()
        await self._close_client(REFUSE_REPLIES[action])

    # ------------------------------------------------------------ phase 2: relay

    async def _relay(self) -> None:
        max_batch = self.cfg.limits.max_pipelined_commands
        while True:
            batch: list[Command] = []
            while True:
                try:
                    event = self.reader.next_event()
                except ProtocolError as exc:
                    await self._run_batch(batch)
                    batch = []
                    self._queue(exc.reply)
                    if exc.fatal:
                        await self._close_client(None)
                        raise _End(Outcome.PROTOCOL_ERROR) from None
                    self._local_errors += 1
                    if self._local_errors >= MAX_LOCAL_ERRORS:
                        # A client streaming junk would otherwise keep this loop answering
                        # it line by line at full speed (bench/attack.py: good sessions' p50
                        # x200 under 20 such flooders). Exim stops at 3, Postfix at 20.
                        self.log.detail = f"{self._local_errors} protocol errors"
                        await self._close_client(TOO_MANY_ERRORS)
                        raise _End(Outcome.TOO_MANY_ERRORS) from None
                    continue
                if event is NEED_DATA:
                    if batch:
                        break  # answer what we have before waiting for more
                    await self._fill(self.cfg.timeouts.command)
                    continue
                if isinstance(event, Closed):
                    await self._run_batch(batch)
                    await self._goodbye_upstream()
                    await self._flush()
                    raise _End(Outcome.CLIENT_CLOSED)
                assert isinstance(event, Command), event
                self.log.commands += 1
                if event.verb == "EHLO":
                    self._ehlos += 1
                    if self._ehlos == 1 and self.reader.buffered:
                        self._pipelined_behind_first_ehlo()
                if self.reader.buffered and event.verb == "EHLO" and not self.keywords:
                    refusal = self._unadvertised_group()
                    if refusal is not None:
                        # A client with a stale cache whose early input came just after
                        # the banner: the early-input policy, not a 554 that bounces.
                        await self._run_batch(batch)
                        await self._refuse(refusal)
                        raise _End(Outcome.SYNC_ERROR)
                elif self.reader.buffered and self._sync_point(event):
                    # As Postfix and Exim: the commands before it were answered; this one
                    # and whatever the client sent behind it are not executed.
                    await self._run_batch(batch)
                    self.log.detail = f"input pipelined after {event.verb}"
                    self.metrics.sync_violations.labels(event.verb).inc()
                    reply = f"5.5.0 {SYNC_ERROR}: input sent before the reply to {event.verb}"
                    await self._close_client(Reply.make(554, reply))
                    raise _End(Outcome.SYNC_VIOLATION)
                if event.verb == "STARTTLS" and self.tls_context and not self.tls_active:
                    await self._run_batch(batch)
                    batch = []
                    await self._starttls()
                    continue
                local = self._local_reply(event)
                if local is not None:
                    await self._run_batch(batch)
                    batch = []
                    if event.verb == "BDAT":
                        await self._discard_bdat()
                    self._queue(local)
                    continue
                batch.append(event)
                if ends_group(event) or event.verb == "BDAT" or len(batch) >= max_batch:
                    break
            await self._run_batch(batch)

    def _sync_point(self, cmd: Command) -> bool:
        """Whether the client had to wait for the reply to ``cmd`` before sending more (an
        EHLO where early pipelining was advertised may carry a group)."""
        return cmd.verb in SYNC_POINTS and not (cmd.verb == "EHLO" and self.keywords)

    def _unadvertised_group(self) -> str | None:
        """A host that was not offered early pipelining pipelined behind EHLO: the refusal
        its early input would get (``defer``, ``reject``), or None where that input is let
        through (``accept``, ``forward``: already judged or passed on before the banner)."""
        policy = self.cfg.pipe_connect.unadvertised_early_input
        return policy if policy in ("defer", "reject") else None

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

    async def _starttls(self) -> None:
        """Answer STARTTLS ourselves and terminate TLS; the MTA stays in cleartext."""
        if self.in_transaction:
            # STARTTLS resets the SMTP state (RFC 3207); make the MTA forget it too.
            up = self._upstream()
            await up.send(b"RSET\r\n")
            await up.read_reply(self.cfg.timeouts.reply, "RSET reply")
            self.in_transaction = False
        self._queue(Reply.make(220, "2.0.0 Ready to start TLS"))
        await self._flush()
        dropped = self.reader.discard_buffered()
        if dropped:
            # Plaintext behind STARTTLS must never be executed (CVE-2011-0411 class).
            self.log.detail = f"{dropped} plaintext bytes after STARTTLS discarded"
        self._replaying = False
        await self._start_tls()
        self._after_starttls = True

    async def _start_tls(self) -> None:
        assert self.tls_context is not None
        stream = OpenSSLStream(self.client_stream, self.tls_context, server_side=True)
        timeout = self.cfg.timeouts.command
        with trio.move_on_after(timeout) as scope:
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                self.log.detail = f"TLS handshake failed: {exc.__cause__ or exc}"
                raise _End(Outcome.TLS_FAILED) from None
            except trio.Cancelled:
                self._client_send_cut = True  # no SMTP reply fits inside a handshake
                raise
        if scope.cancelled_caught:
            self.log.detail = f"TLS handshake timed out after {timeout:g}s"
            raise _End(Outcome.TLS_TIMEOUT)
        self.client_stream = stream
        self.tls_active = True
        self._ehlos = 0
        self.log.tls = stream.negotiated_version or "TLS"

    def _local_reply(self, cmd: Command) -> Reply | None:
        if cmd.verb in FORBIDDEN:
            return Reply.make(550, f"5.7.1 {cmd.verb} not permitted: only the proxy speaks for you")
        if cmd.verb == "STARTTLS":
            return Reply.make(454, "4.7.0 TLS not available")
        if cmd.verb == "BDAT" and not self.up_chunking:
            if self.log.early_used:
                # Sent on a cached EHLO reply with CHUNKING that the MTA has since dropped:
                # a 4xx makes the client defer and re-learn; a 5xx would bounce the message.
                return Reply.make(451, "4.3.0 CHUNKING is no longer offered, try again")
            return Reply.make(502, "5.5.1 BDAT not supported")
        return None

    async def _run_batch(self, batch: list[Command]) -> None:
        """Send commands the client pipelined the way the MTA tolerates: one write for the
        group when it offered PIPELINING, otherwise one command per reply."""
        if not batch:
            return
        up = self._upstream()
        if self._replaying:
            self.log.replayed += len(batch)
        if batch[-1].verb == "QUIT":
            # The client pipelined QUIT behind the message: its 250 must not wait for the
            # MTA's QUIT reply (native Exim takes 200 ms over it).
            await self._flush()
        grouped = self.up_pipelining and len(batch) > 1
        if grouped:
            await up.send(b"".join(cmd.raw for cmd in batch))
        for i, cmd in enumerate(batch):
            if not grouped:
                await up.send(cmd.raw)
            if cmd.verb == "BDAT" and i == len(batch) - 1:
                await self._relay_bdat(cmd)
                continue
            reply = await up.read_reply(self._timeout(cmd), cmd.verb)
            await self._on_reply(cmd, reply)

    async def _on_reply(self, cmd: Command, reply: Reply) -> None:
        verb = cmd.verb
        if verb == "EHLO":
            self.log.helo = cmd.args.strip()
            if reply.code == 250:
                caps = ehlo_keywords(reply)
                self.up_pipelining = "PIPELINING" in caps
                self.up_chunking = "CHUNKING" in caps
                size = caps.get("SIZE", "").split(" ", 1)[0]
                self.up_size = int(size) if size.isdigit() else 0
                reply = rewrite_ehlo(
                    reply,
                    keywords=self.keywords,
                    starttls=self.tls_context is not None and not self.tls_active,
                )
                if self.keywords and not self.log.advertised:
                    self.log.advertised = True
                    self.metrics.advertised.inc()
        elif verb == "HELO":
            self.log.helo = cmd.args.strip()
            self.up_pipelining = self.up_chunking = False
            self.up_size = 0
        elif verb == "RCPT" and reply.positive:
            self.log.rcpts += 1
        elif verb == "MAIL":
            self.in_transaction = reply.positive
        elif verb == "RSET":
            self.in_transaction = False
        await self._mta_reply(reply, verb)
        if verb == "DATA" and reply.code == 354:
            await self._relay_data()
        elif verb == "AUTH" and reply.code == 334:
            await self._relay_auth()
        elif verb == "QUIT":
            await self._close_client(None, linger=False)
            raise _End(Outcome.QUIT)

    # ------------------------------------------------------------ message data

    async def _relay_data(self) -> None:
        up = self._upstream()
        self.reader.start_data()
        await self._flush()  # the client waits for the 354 before it sends the message
        pending = bytearray()  # message bytes parsed from the current receive, not yet sent
        refused: Reply | None = None  # the reply the client gets after its end of data
        while True:
            event = self.reader.next_event()
            if event is NEED_DATA:
                if pending:  # what this receive held, in one write
                    await up.send(bytes(pending))
                    pending.clear()
                if refused is not None and self.up_size and self.reader.discarded > self.up_size:
                    # Longer than the MTA would take: answer now rather than read on.
                    await self._close_client(refused)
                    raise _End(Outcome.PROTOCOL_ERROR)
                await self._fill(self.cfg.timeouts.data_block)
            elif isinstance(event, DataChunk):
                self.log.bytes_in += len(event.data)
                self.metrics.message_bytes.inc(len(event.data))
                pending += event.data
            elif isinstance(event, DataRefused):
                # Dropping the connection is the only way to make the MTA discard a message
                # it has part of. The client hears why once it has sent its end of data.
                refused = event.reply
                pending.clear()
                await up.aclose()
                self.up = None
                self.log.detail = refused.text
            elif isinstance(event, EndOfData):
                if refused is not None:
                    await self._close_client(refused)
                    raise _End(Outcome.PROTOCOL_ERROR)
                # The last chunk and the terminator in one write (one segment, one syscall).
                self._verdict = "awaited"
                await up.send(bytes(pending + event.raw))
                reply = await up.read_reply(self.cfg.timeouts.data_term, "end of data reply")
                await self._message_done(reply)
                return
            else:
                assert isinstance(event, Closed), event
                raise _End(Outcome.CLIENT_GONE_IN_DATA)

    async def _relay_bdat(self, cmd: Command) -> None:
        up = self._upstream()
        last = ends_group(cmd)  # BDAT ... LAST (the reader has checked the syntax)
        while True:
            event = self.reader.next_event()
            if event is NEED_DATA:
                await self._fill(self.cfg.timeouts.data_block)
            elif isinstance(event, BdatChunk):
                self.log.bytes_in += len(event.data)
                self.metrics.message_bytes.inc(len(event.data))
                if last and not self.reader.bdat_left:
                    self._verdict = "awaited"  # these octets complete the message
                await up.send(event.data)
            elif isinstance(event, BdatEnd):
                timeout = self.cfg.timeouts.data_term if event.last else self._timeout(cmd)
                if event.last:
                    self._verdict = "awaited"
                reply = await up.read_reply(timeout, "BDAT reply")
                if event.last:
                    await self._message_done(reply)
                else:
                    await self._mta_reply(reply, "BDAT")
                return
            else:
                assert isinstance(event, Closed), event
                raise _End(Outcome.CLIENT_GONE_IN_DATA)

    async def _message_done(self, reply: Reply) -> None:
        self.in_transaction = False
        if reply.code == 250:
            self.log.messages += 1
            self.metrics.messages.inc()
        self._verdict = "queued"
        await self._mta_reply(reply, "end of data")
        if self._stop_after_verdict:
            # Draining: the verdict reaches the client before the 421 does (_flush then
            # lets the drain's cancellation in).
            await self._flush()
            await trio.lowlevel.checkpoint()

    async def _mta_reply(self, reply: Reply, verb: str = "") -> None:
        """Queue a reply from the MTA. A 421, or a 221 to anything but QUIT, means it is
        closing the channel (RFC 5321 3.8; Postfix says 221 to "GET /"): end the session
        there, not with a 421 of ours after relaying more commands into a dead connection
        (nothing may follow a 221), and say so in the log."""
        self._queue(reply)
        if reply.code == 421 or (reply.code == 221 and verb != "QUIT"):
            self.log.detail = f"MTA: {reply.code} {reply.text}"
            await self._close_client(None, linger=reply.code == 421)
            raise _End(Outcome.UPSTREAM_421 if reply.code == 421 else Outcome.UPSTREAM_221)

    async def _discard_bdat(self) -> None:
        while True:
            event = self.reader.next_event()
            if event is NEED_DATA:
                await self._fill(self.cfg.timeouts.data_block)
            elif isinstance(event, BdatEnd):
                return
            elif isinstance(event, Closed):
                raise _End(Outcome.CLIENT_GONE_IN_DATA)

    async def _relay_auth(self) -> None:
        up = self._upstream()
        while True:
            self.reader.expect_line()
            try:
                while (event := self.reader.next_event()) is NEED_DATA:
                    await self._fill(self.cfg.timeouts.command)
            except ProtocolError as exc:
                # The line never reaches the MTA: cancel the exchange there (RFC 4954 "*")
                # and answer the client ourselves, so both stay in step.
                if exc.fatal:
                    await self._close_client(exc.reply)
                    raise _End(Outcome.PROTOCOL_ERROR) from None
                await up.send(b"*\r\n")
                await up.read_reply(self.cfg.timeouts.reply, "AUTH cancel reply")
                self._queue(exc.reply)
                return
            if isinstance(event, Closed):
                raise _End(Outcome.CLIENT_GONE)
            assert isinstance(event, RawLine), event
            await up.send(event.raw)
            reply = await up.read_reply(self.cfg.timeouts.reply, "AUTH reply")
            self._queue(reply)
            if reply.code != 334:
                return

    # ------------------------------------------------------------ plumbing

    def _upstream(self) -> Upstream:
        if self.up is None:
            raise UpstreamError(Outcome.UPSTREAM_LOST, "connection closed")
        return self.up

    def _timeout(self, cmd: Command) -> float:
        t = self.cfg.timeouts
        return {"MAIL": t.mail, "RCPT": t.rcpt, "DATA": t.data_init}.get(cmd.verb, t.reply)

    def _queue(self, reply: Reply) -> None:
        self.out += reply.to_bytes()

    async def _flush(self) -> None:
        """Send the queued replies. Bounded by ``timeouts.command``: a client that reads
        nothing must not hold its session once the socket buffers are full."""
        if not self.out:
            return
        data, self.out = bytes(self.out), bytearray()
        sent = fastio.try_send(self.client_stream, data)
        if sent < len(data):
            await self._send_rest(data[sent:])
        if self._verdict == "queued":  # carried: the drain may cut in again
            self._verdict = ""
            if self._stop_after_verdict:
                self._stop.cancel()

    async def _send_rest(self, data: bytes) -> None:
        timeout = self.cfg.timeouts.command
        with trio.move_on_after(timeout) as scope:
            try:
                await fastio.send_all(self.client_stream, data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _ClientGone() from exc
            except trio.Cancelled:
                self._client_send_cut = True
                raise
        if scope.cancelled_caught:
            self.log.detail = f"client read nothing for {timeout:g}s"
            raise _End(Outcome.CLIENT_TIMEOUT)

    async def _receive(self, max_bytes: int, deadline: float | None, timeout: float) -> bytes:
        """Client bytes (``b""`` at EOF) before ``deadline`` (None: no limit of its own)."""
        if deadline is not None and trio.current_time() >= deadline:
            ready = None  # a trickler's byte that happens to be waiting does not count
        else:
            ready = fastio.try_receive(self.client_stream, max_bytes)
        if ready is not None:
            return ready
        try:
            if deadline is None:
                return await fastio.receive_some(self.client_stream, max_bytes)
            with trio.move_on_at(deadline):
                return await fastio.receive_some(self.client_stream, max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ClientGone() from exc
        self.log.detail = f"client timeout after {timeout:g}s"
        await self._close_client(Reply.make(421, "4.4.2 Timeout, closing connection"))
        raise _End(Outcome.CLIENT_TIMEOUT)

    async def _fill(self, timeout: float) -> None:
        """Flush queued replies, then block for more client input. ``timeout`` bounds the
        whole unit being read (a command line, a message line or 64 KiB of one, 64 KiB of a
        BDAT chunk), not each read: a client trickling a byte at a time cannot stretch it."""
        self._replaying = False
        await self._flush()
        if self.client_eof:
            raise RuntimeError("reader asked for data after EOF")  # pragma: no cover
        if self.reader.units != self._unit_mark:
            self._unit_mark = self.reader.units
            self._unit_deadline = trio.current_time() + timeout
        data = await self._receive(65536, self._unit_deadline, timeout)
        if data:
            self.reader.feed(data)
        else:
            self.client_eof = True
            self.reader.feed_eof()

    async def _goodbye_upstream(self) -> None:
        if self.up is not None and not self.reader.in_data:
            with contextlib.suppress(UpstreamError):
                await self.up.send(b"QUIT\r\n")

    async def _close_client(self, reply: Reply | None, *, linger: bool = True) -> None:
        """Reply once, shut down our side, and drain briefly: closing a socket with unread
        input sends an RST that can destroy the reply in the client's buffer. Without
        ``linger`` (after QUIT, when the client has nothing more to say) the drain happens
        only if input is already waiting."""
        if reply is not None:
            self._queue(reply)
        try:
            await self._flush()
            if self.tls_active:
                return  # TLS has no half-close; aclose sends close_notify
            await self.raw_stream.send_eof()
        except (_ClientGone, _End, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return  # gone, or reads nothing (_flush timed out): nothing more to say
        if self.client_eof or not (linger or fastio.input_pending(self.raw_stream)):
            return
        # Bounded in bytes too: a flooder would keep us copying its junk for the whole
        # drain time (bench/attack.py); one that sent this much more has had its reply.
        drained = 0
        with trio.move_on_after(self.cfg.timeouts.early_drain):
            try:
                while drained < DRAIN_LIMIT:
                    data = await fastio.receive_some(self.client_stream, 65536)
                    if not data:
                        break
                    drained += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
