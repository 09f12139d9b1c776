"""One client session: the trio driver of ``proxy.machine.SessionMachine``.

The machine decides; this module only moves bytes and keeps time (docs/machine.md). It
feeds the machine what happened, performs the actions it returns, in order, and waits
for what the machine wants until the machine's deadline. The whole session runs in one
cancel scope whose deadline moves (set before every wait that can block: the non-blocking
fast paths of ``fastio`` go first and usually succeed); when the scope fires, what the
driver was doing tells the machine why (its deadline, a write that did not finish, a
shutdown). Only the early phase, where the client may talk while the MTA is still being
reached, runs two tasks.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from enum import Enum, auto

import trio
from OpenSSL import SSL

from . import fastio
from .addresses import Endpoint
from .config import Config
from .machine.events import (
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
from .machine.session import Phase, SessionMachine
from .metrics import Metrics
from .outcomes import Outcome
from .sessionlog import SessionLog
from .tcpinfo import tcp_rtt
from .tls import OpenSSLStream
from .upstream import client_name, open_stream

__all__ = ["DRAIN_LIMIT", "Session", "SessionLog"]

log = logging.getLogger("pipeconnect.session")

_HOSTNAME = socket.gethostname()  # the proxy's EHLO name towards an MTA it speaks TLS to
DRAIN_LIMIT = 256 * 1024  # bytes read (and dropped) after a final reply before closing
CLOSE_TIMEOUT = 2.0  # seconds for a close (TLS close_notify is one small write)
# How long the early phase waits for the MTA in one task before the reader task joins it.
EARLY_ALONE = 0.05
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)


class _Doing(Enum):
    """What the driver is blocked in, for when the session's scope fires."""

    WAIT = auto()  # for what the machine wants, until its deadline
    CLIENT_SEND = auto()
    UPSTREAM_SEND = auto()
    CLIENT_TLS = auto()
    DRAIN = auto()
    EARLY_ALONE = auto()  # for the MTA in the one-task early phase (EARLY_ALONE seconds)


class _LiveCounters:
    """The machine's counters, as the process's metrics."""

    __slots__ = ("_m",)

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def advertised(self) -> None:
        self._m.advertised.inc()

    def early_refused(self, action: str) -> None:
        self._m.early_refused.labels(action).inc()

    def sync_violation(self, verb: str) -> None:
        self._m.sync_violations.labels(verb).inc()

    def message(self) -> None:
        self._m.messages.inc()

    def message_bytes(self, n: int) -> None:
        self._m.message_bytes.inc(n)


async def _close(stream: trio.abc.Stream, timeout: float) -> None:
    """Close ``stream``. A plain socket closes at once (no checkpoint, no scope: there is
    nothing to wait for); TLS sends close_notify, shielded (this also runs while being
    cancelled) but bounded: a peer that reads nothing must not hold it (cancelled, the
    close is forceful)."""
    if type(stream) is trio.SocketStream:
        stream.socket.close()
        return
    with trio.CancelScope(shield=True, deadline=trio.current_time() + timeout):
        await stream.aclose()


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
        self.up_stream: trio.abc.Stream | None = None
        self.tls_context = tls_context
        self.upstream_tls_context = upstream_tls_context
        self.cfg = config
        self.metrics = metrics
        self.machine = SessionMachine(
            config,
            client=client,
            local=local,
            listener=listener,
            offer_starttls=tls_context is not None,
            implicit_tls=implicit_tls,
            upstream_tls=upstream_tls_context is not None,
            hostname=config.upstream.ehlo_name or _HOSTNAME,
            counters=_LiveCounters(metrics),
        )
        self.log: SessionLog = self.machine.log
        self._started = time.monotonic()
        self._scope = trio.CancelScope()
        self._doing = _Doing.WAIT
        self._early = False  # two tasks: no per-write bounds, upstream writes locked
        self._early_nursery: trio.Nursery | None = None
        self._reader_task: trio.lowlevel.Task | None = None  # the early phase's reader
        self._reader_scope = trio.CancelScope()
        self._reader_done = trio.Event()
        self._up_lock = trio.Lock()
        self._stopping = False
        self._stop_cancelled = False  # shutdown() cancelled the scope
        self._stop_after_send = False  # shutdown() came during a verdict's write
        self._verdict_send = False  # a write carrying a message's verdict is under way
        self._client_eof = False
        self._connected_at: float | None = None
        self._unfed: tuple[bytes | None] | None = None  # the early reader's last read
        self._rearm = False  # the scope's deadline was set short: set it exactly next
        # Early input only held: one task reads it when the MTA has answered (plain TCP).
        self._poll_early = not self.machine.early_input_urgent and not implicit_tls

    # ------------------------------------------------------------ entry points

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
            self.log.elapsed = time.monotonic() - self._started
            self.metrics.record_session(self.log)
            log.info(self.log.render(self.cfg.log.format))

    def shutdown(self) -> None:
        """End the session with a 421 (the proxy is stopping and the grace is over): now,
        or right after relaying the verdict on a message the MTA already has in full."""
        self._stopping = True
        if self.machine.defer_shutdown():
            return  # the machine ends the session right after the verdict
        if self._verdict_send:
            self._stop_after_send = True  # _send_client: once the verdict is out
            return
        self._stop_cancelled = True
        self._scope.cancel()

    # ------------------------------------------------------------ the loop

    async def _run(self) -> None:
        try:
            actions = self.machine.start(trio.current_time())
            while True:
                with self._scope:
                    await self._drive(actions)
                if not self._scope.cancelled_caught:
                    return
                event = self._interruption()
                self._scope = trio.CancelScope()
                if event is None:
                    actions = []  # back to the wait, with the machine's deadline
                    continue
                actions = self._feed(event)
                if self.machine.done and not actions:
                    return
        finally:
            self.log.client_rtt = tcp_rtt(self.socket)
            await self._close_upstream()
            await _close(self.client_stream, self.cfg.timeouts.early_drain)

    def _interruption(self) -> Event | None:
        """Why the session's scope fired (None: early, for a read the machine still lets
        run; see _arm)."""
        doing, self._doing = self._doing, _Doing.WAIT
        if self._stop_cancelled:
            self._stop_cancelled = False
            return Shutdown(send_cut=doing in (_Doing.CLIENT_SEND, _Doing.CLIENT_TLS))
        if doing is _Doing.CLIENT_SEND:
            return SendTimedOut(Side.CLIENT)
        if doing is _Doing.UPSTREAM_SEND:
            return SendTimedOut(Side.UPSTREAM)
        deadline = self.machine.deadline
        if doing is _Doing.EARLY_ALONE and (deadline is None or trio.current_time() < deadline):
            self._poll_early = False  # a slow banner: the reader task joins
            return None
        if doing is _Doing.WAIT and (deadline is None or trio.current_time() < deadline):
            return None
        return DeadlinePassed()

    def _feed(self, event: Event) -> list[Action]:
        machine = self.machine
        if self._poll_early and machine.phase is Phase.EARLY:
            # One task for the early phase: what the client sent so far goes in before
            # whatever the MTA did (its banner has not reached the client yet).
            early = self._poll_client()
            if early or machine.done:
                return early + self._feed(event)
        actions = machine.handle(event, trio.current_time())
        if self._connected_at is not None and machine.mta.banner is not None:
            self.metrics.upstream_banner.observe(time.monotonic() - self._connected_at)
            self._connected_at = None
        if self._early:
            self._track()
        return actions

    def _poll_client(self) -> list[Action]:
        machine = self.machine
        actions: list[Action] = []
        while machine.phase is Phase.EARLY and machine.wants_client:
            now = trio.current_time()
            try:
                data = fastio.poll_receive(self.raw_stream, machine.read_size)
            except _BROKEN:
                return actions + machine.handle(ClientBroken(), now)
            if data is None:
                break
            actions += machine.handle(self._client_event(data), now)
        return actions

    def _client_event(self, data: bytes | None) -> Event:
        """What a read from the client was: bytes, its EOF, or (None) a broken stream."""
        if data is None:
            return ClientBroken()
        if not data:
            self._client_eof = True
            return ClientEof()
        return ClientData(data)

    async def _drive(self, actions: list[Action]) -> None:
        machine = self.machine
        while True:
            if machine.phase is Phase.EARLY and not self._poll_early:
                await self._early_phase(actions)
            else:
                left = await self._perform(actions)
                if left is not None:
                    actions = left  # the early phase begins: two tasks from here
                    continue
            if machine.done:
                return
            actions = await self._next()

    async def _next(self) -> list[Action]:
        """Wait for what the machine wants (one side: the relay never waits for both)."""
        machine = self.machine
        if self._unfed is not None:  # read by the early reader as the phase ended
            (data,), self._unfed = self._unfed, None
            return self._feed(self._client_event(data))
        deadline = machine.deadline
        if machine.phase is Phase.EARLY:  # one task (_poll_early): the MTA, for a while
            return self._feed(await self._receive_upstream(alone=True))
        if machine.wants_client:
            stream = self.client_stream
            if deadline is not None and trio.current_time() >= deadline:
                data = None  # a trickler's byte that happens to be waiting does not count
            else:
                data = fastio.try_receive(stream, machine.read_size)
            if data is None:
                self._arm(exact=stream is not self.raw_stream)
                try:
                    data = await fastio.receive_some(stream, machine.read_size)
                except _BROKEN:
                    data = None
            return self._feed(self._client_event(data))
        if machine.wants_upstream:
            return self._feed(await self._receive_upstream())
        raise RuntimeError(f"the machine waits for nothing in {machine.phase}")

    async def _receive_upstream(self, *, alone: bool = False) -> Event:
        stream = self.up_stream
        if stream is None:
            return UpstreamBroken(sending=False)
        data = fastio.try_receive(stream, 65536)
        if data is None:
            if alone:
                # The early phase in one task only while the MTA answers quickly: a client
                # that leaves (or talks) before a slow banner is seen by the reader task.
                limit = trio.current_time() + EARLY_ALONE
                deadline = self.machine.deadline
                self._scope.deadline = limit if deadline is None else min(limit, deadline)
                self._doing = _Doing.EARLY_ALONE
                self._rearm = True
            elif not self._early:
                self._arm(exact=type(stream) is not trio.SocketStream)
            try:
                data = await fastio.receive_some(stream, 65536)
            except _BROKEN:
                return UpstreamBroken(sending=False)
        return UpstreamData(data) if data else UpstreamEof()

    # ------------------------------------------------------------ the early phase

    async def _early_phase(self, actions: list[Action]) -> None:
        """Until the MTA is ready: reach it (this task) while reading what the client sends
        early (the reader task). Whichever makes the machine leave the phase ends both;
        the reader is stopped before anything else touches the client."""
        machine = self.machine
        self._early = True
        self._track()
        try:
            async with trio.open_nursery() as nursery:
                self._early_nursery = nursery
                if machine.wants_client:
                    self._reader_scope = trio.CancelScope()
                    self._reader_done = trio.Event()
                    nursery.start_soon(self._early_reader)
                await self._perform(actions)
                while machine.phase is Phase.EARLY:
                    if not machine.wants_upstream:
                        await trio.sleep_forever()  # the reader ends the phase
                    event = await self._receive_upstream()
                    await self._perform(self._feed(event))
                await self._stop_reader()
        except BaseExceptionGroup as group:
            raise _single(group) from None
        finally:
            self._early = False
            self._early_nursery = None
            self._reader_task = None

    async def _early_reader(self) -> None:
        machine = self.machine
        self._reader_task = trio.lowlevel.current_task()
        try:
            with self._reader_scope:
                while machine.phase is Phase.EARLY and machine.wants_client:
                    data: bytes | None
                    try:
                        data = await fastio.receive_some(self.client_stream, machine.read_size)
                    except _BROKEN:
                        data = None
                    if machine.phase is not Phase.EARLY or self._reader_scope.cancel_called:
                        # Read as the phase ended (woken before the cancel): the main task
                        # feeds it, after what it is doing (the banner goes first).
                        self._unfed = (data,)
                        return
                    event = self._client_event(data)
                    # What the machine decided on these bytes is carried out whole, even if
                    # the other task ends the phase meanwhile (forwarded bytes it counted).
                    with trio.CancelScope(shield=True) as shield:
                        t = self.cfg.timeouts
                        shield.deadline = trio.current_time() + t.data_block + t.early_drain
                        await self._perform(self._feed(event))
                    if machine.phase is not Phase.EARLY and self._early_nursery is not None:
                        self._early_nursery.cancel_scope.cancel()
        finally:
            self._reader_task = None
            self._reader_done.set()

    async def _stop_reader(self) -> None:
        if self._reader_task is not None:
            self._reader_scope.cancel()
            await self._reader_done.wait()

    # ------------------------------------------------------------ actions

    async def _perform(self, actions: list[Action]) -> list[Action] | None:
        """Carry out ``actions`` in order. Returns what is left for the early phase's two
        tasks when an action's result starts that phase (TLS on connect: the handshake
        done, the connect follows while early input must be read meanwhile)."""
        if (
            self._reader_task is not None
            and self.machine.phase is not Phase.EARLY
            and trio.lowlevel.current_task() is not self._reader_task
        ):
            await self._stop_reader()  # the client stream is this task's now
        for action in actions:
            kind = type(action)
            follow: Event | None = None
            if kind is SendClient:
                assert isinstance(action, SendClient)
                follow = await self._send_client(action)
            elif kind is SendUpstream:
                assert isinstance(action, SendUpstream)
                follow = await self._send_upstream(action.data)
            elif kind is CloseClient:
                assert isinstance(action, CloseClient)
                await self._close_client(action.linger)
            elif kind is CloseUpstream:
                await self._close_upstream()
            elif kind is ConnectUpstream:
                assert isinstance(action, ConnectUpstream)
                follow = await self._connect(action)
            elif kind is StartTls:
                assert isinstance(action, StartTls)
                follow = await self._start_tls(action)
            elif kind is ResolveClientName:
                assert isinstance(action, ResolveClientName)
                if not self._early:  # the lookup bounds itself; no earlier deadline cuts it
                    self._scope.deadline = math.inf
                follow = ClientNameResolved(await client_name(action.address))
            else:  # pragma: no cover
                raise TypeError(f"not an action: {action!r}")
            if follow is not None:
                # What follows from this action supersedes the rest of the list: a failure
                # ends the session; a handshake, connect or lookup is last in its list.
                more = self._feed(follow)
                if self.machine.phase is Phase.EARLY and not self._poll_early and not self._early:
                    return more
                return await self._perform(more)
        return None

    def _track(self) -> None:
        """The scope fires exactly at the machine's deadline (never, without one)."""
        deadline = self.machine.deadline
        self._scope.deadline = math.inf if deadline is None else deadline

    def _arm(self, *, exact: bool) -> None:
        """Before a read: make the scope fire no later than the machine's deadline. Moving it
        costs (trio re-registers it), and the machine's deadlines mostly move later, so an
        earlier one is left in place: if it fires before the machine's is due, the read
        simply starts again (_interruption) -- on a plain socket, where a cut read loses
        nothing. A TLS read may have to write (a cut write breaks the stream): ``exact``."""
        self._doing = _Doing.WAIT
        if exact or self._rearm:
            self._rearm = False  # (the one-task early phase's short deadline goes)
            self._track()
        else:
            deadline = self.machine.deadline
            if deadline is not None and deadline < self._scope.deadline:
                self._scope.deadline = deadline

    def _bound(self, timeout: float, doing: _Doing) -> None:
        if not self._early:  # in the early phase the machine's deadline bounds everything
            self._scope.deadline = trio.current_time() + timeout
            self._doing = doing

    async def _send_client(self, action: SendClient) -> Event | None:
        stream, data = self.client_stream, action.data
        sent = fastio.try_send(stream, data)
        if sent < len(data):
            self._bound(self.cfg.timeouts.command, _Doing.CLIENT_SEND)
            self._verdict_send = action.verdict
            try:
                await fastio.send_all(stream, data[sent:])
            except _BROKEN:
                return ClientBroken()
            finally:
                self._verdict_send = False
            self._doing = _Doing.WAIT
        if self._stop_after_send:
            self._stop_after_send = False
            return Shutdown()  # deferred by shutdown() until this write was done
        return None

    async def _send_upstream(self, data: bytes) -> Event | None:
        stream = self.up_stream
        if stream is None:
            return UpstreamBroken(sending=True)
        try:
            if self._early:
                async with self._up_lock:  # the two early tasks may both write to the MTA
                    await fastio.send_all(stream, data)
                return None
            sent = fastio.try_send(stream, data)
            if sent < len(data):
                self._bound(self.cfg.timeouts.data_block, _Doing.UPSTREAM_SEND)
                await fastio.send_all(stream, data[sent:])
                self._doing = _Doing.WAIT
        except _BROKEN:
            return UpstreamBroken(sending=True)
        return None

    async def _connect(self, action: ConnectUpstream) -> Event:
        if not self._early:
            self._track()
            self._doing = _Doing.WAIT
        t0 = time.monotonic()
        try:
            stream = await open_stream(action.address)
        except OSError as exc:
            return UpstreamConnectFailed(exc.strerror or str(exc))
        self.up_stream = stream
        if action.header:  # alone in its segment: nothing else is written before it
            try:
                await fastio.send_all(stream, action.header)
            except _BROKEN:
                return UpstreamBroken(sending=True)
        self._connected_at = time.monotonic()
        self.metrics.upstream_connect.observe(self._connected_at - t0)
        return UpstreamConnected()

    async def _start_tls(self, action: StartTls) -> Event:
        self._track()
        if action.side is Side.CLIENT:
            assert self.tls_context is not None
            stream = OpenSSLStream(self.client_stream, self.tls_context, server_side=True)
            self._doing = _Doing.CLIENT_TLS
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                return TlsFailed(Side.CLIENT, str(exc.__cause__ or exc))
            self._doing = _Doing.WAIT
            self.client_stream = stream
            return TlsEstablished(Side.CLIENT, stream.negotiated_version or "TLS", stream.cipher)
        assert self.upstream_tls_context is not None and self.up_stream is not None
        up = OpenSSLStream(
            self.up_stream,
            self.upstream_tls_context,
            server_side=False,
            server_hostname=action.server_name,
        )
        try:
            await up.do_handshake()
        except trio.BrokenResourceError as exc:
            return TlsFailed(Side.UPSTREAM, str(exc.__cause__ or exc))
        self.up_stream = up
        return TlsEstablished(Side.UPSTREAM, up.negotiated_version or "TLS", up.cipher)

    async def _close_upstream(self) -> None:
        stream, self.up_stream = self.up_stream, None
        if stream is not None:
            await _close(stream, CLOSE_TIMEOUT)

    async def _close_client(self, linger: bool) -> None:
        """Shut down our side and drain briefly: closing a socket with unread input sends
        an RST that can destroy the reply in the client's buffer. Without ``linger``
        (after QUIT, when the client has nothing more to say) the drain happens only if
        input is already waiting."""
        if self.client_stream is not self.raw_stream:
            return  # TLS has no half-close; aclose sends close_notify
        try:
            await self.raw_stream.send_eof()
        except (*_BROKEN, OSError):
            return
        if self._client_eof or not (linger or fastio.input_pending(self.raw_stream)):
            return
        # Bounded in bytes too: a flooder would keep us copying its junk for the whole
        # drain time (bench/attack.py); one that sent this much more has had its reply.
        if self._early:  # in the reader's shield: a scope of its own
            with trio.move_on_after(self.cfg.timeouts.early_drain):
                await self._drain()
        else:
            self._bound(self.cfg.timeouts.early_drain, _Doing.DRAIN)
            await self._drain()

    async def _drain(self) -> None:
        drained = 0
        try:
            while drained < DRAIN_LIMIT:
                data = await fastio.receive_some(self.client_stream, 65536)
                if not data:
                    break
                drained += len(data)
        except _BROKEN:
            pass
