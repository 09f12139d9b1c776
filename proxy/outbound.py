"""Outbound mode's driver: the MTA's intercepted port-25 connections, to the real MX.

A NAT rule (docs/outbound.md) redirects the MTA's outgoing connections to the outbound
listener; ``original_destination`` reads where they were going (SO_ORIGINAL_DST), and the
session connects there itself, from the MTA's own source address, with a socket that the
rule lets through (another uid, or SO_MARK). What is said is decided by the sans-I/O
``OutboundMachine``; this module moves bytes, keeps time and talks to the cache.

Two reader tasks (the MTA's, the MX's) and a timer feed the machine under one lock, so its
actions run in order and every write to a stream comes from one task at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import struct
import time
from dataclasses import dataclass, field

import trio

from .addresses import Endpoint, endpoint, unmap
from .config import Config, OutboundConfig
from .ehlocache import EhloCache, Entry, cacheable
from .listen import refuse
from .machine.events import (
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
from .machine.outbound import (
    ConnectMx,
    Forget,
    Greeting,
    Learn,
    OutboundAction,
    OutboundLog,
    OutboundMachine,
    Splice,
    Verified,
)
from .metrics import Metrics
from .sessionlog import quoted
from .smtp import Reply
from .tcpinfo import syn_data_acked, tcp_rtt

log = logging.getLogger("pipeconnect.outbound")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST is the same number
_SO_MARK = getattr(socket, "SO_MARK", 36)
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_TCP_FASTOPEN_CONNECT = getattr(socket, "TCP_FASTOPEN_CONNECT", 30)
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)
_SOCKADDR_IN = struct.Struct("!2xH4s8x")
_SOCKADDR_IN6 = struct.Struct("!2xH4x16s4x")
READ_SIZE = 65536
CACHE_WRITE_TIMEOUT = 5.0

NOT_INTERCEPTED = Reply.make(
    421, "4.3.0 This port takes only connections redirected to it (outbound mode)"
)
LOOPED = Reply.make(
    421, "4.4.6 The proxy's own connection came back to it: check the NAT rule's uid or mark"
)


def original_destination(sock: socket.socket | trio.socket.SocketType) -> Endpoint | None:
    """Where a redirected connection was going, or None (not redirected, or no NAT)."""
    peer = sock.getpeername()
    v4 = sock.family == socket.AF_INET or unmap(peer[0]).version == 4
    try:
        if v4:
            port, raw = _SOCKADDR_IN.unpack(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16))
            return socket.inet_ntop(socket.AF_INET, raw), port
        data = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port, raw = _SOCKADDR_IN6.unpack(data)
        return socket.inet_ntop(socket.AF_INET6, raw), port
    except (OSError, struct.error):
        return None


class Cache:
    """The EHLO cache as sessions use it: a broken cache file (corrupt, unwritable, a
    full disk, locked) never stops mail. The session relays without caching and the proxy
    says so once, then once more if the file recovers and breaks again.

    Lookups are synchronous (one indexed read; WAL readers never wait for a writer). A
    session's writes are made when it ends, in a thread (``write``): a slow or locked file
    never holds up the event loop, and no reply waits for one."""

    def __init__(self, path: str, ttl: float, metrics: Metrics) -> None:
        self.path = path
        self.ttl = ttl
        self.metrics = metrics
        self._cache: EhloCache | None = None
        self._broken = False

    def _open(self) -> EhloCache:
        if self._cache is None:
            self._cache = EhloCache(self.path, ttl=self.ttl)
        return self._cache

    def _failed(self, exc: BaseException) -> None:
        self.metrics.outbound_cache_errors.inc()
        if not self._broken:
            self._broken = True
            log.error(
                "outbound cache %s unusable (%s): relaying without early pipelining or "
                "learning until it works again",
                self.path,
                exc,
            )
        self._cache = None

    def _ok(self) -> None:
        if self._broken:
            self._broken = False
            log.warning("outbound cache %s works again", self.path)

    def lookup(self, key: tuple[str, str, int], now: float) -> Entry | None:
        try:
            entry = self._open().lookup(*key, now)
        except Exception as exc:  # sqlite3.Error, OSError: any of them means "no cache"
            self._failed(exc)
            return None
        self._ok()
        return entry

    async def write(self, key: tuple[str, str, int], actions: list[OutboundAction]) -> None:
        """A session's Learn, Forget and Verified, in order, in a thread."""
        try:
            await trio.to_thread.run_sync(self._apply, self._open(), key, actions)
        except Exception as exc:
            self._failed(exc)
        else:
            self._ok()

    @staticmethod
    def _apply(cache: EhloCache, key: tuple[str, str, int], actions: list[OutboundAction]) -> None:
        now = time.time()
        for action in actions:
            if isinstance(action, Learn):
                cache.learn(*key, action.banner, action.ehlo, now, action.client_ehlo)
            elif isinstance(action, Forget):
                cache.strike(*key, now, block=action.block)
            elif isinstance(action, Verified):
                cache.verified(*key, now, client_ehlo=action.client_ehlo)


@dataclass
class OutboundRecord:
    """The session's log line and metrics, with what needs a socket or a clock."""

    mta: Endpoint
    dest: Endpoint
    mx_rtt: float | None = None
    syn_data: bool = False  # TCP Fast Open: the early commands rode in the SYN
    elapsed: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    notes: list[str] = field(default_factory=list)

    def render(self, m: OutboundLog, saved: float, fmt: str) -> str:
        """The session's one log line, as ``log.format`` says (the inbound line's twin:
        ``sessionlog.SessionLog.render``)."""
        if fmt == "json":
            return json.dumps(
                {
                    "event": "outbound",
                    "source": f"{self.mta[0]}:{self.mta[1]}",
                    "dest": f"{self.dest[0]}:{self.dest[1]}",
                    "L": "L*" if m.early_used else "L",
                    "path": m.path,
                    "cache": m.cache,
                    "learned": m.learned,
                    "invalidated": m.invalidated,
                    "round_trips_saved": m.round_trips_saved,
                    "time_saved": round(saved, 6),
                    "bytes_up": self.bytes_up,
                    "bytes_down": self.bytes_down,
                    "duration": round(self.elapsed, 3),
                    "outcome": m.outcome,
                    "deferred": m.failure,
                    "detail": "; ".join(self.notes),
                    "last_reply": m.last_reply,
                }
            )
        parts = [
            f"outbound S=[{self.mta[0]}]:{self.mta[1]}",
            f"H=[{self.dest[0]}]:{self.dest[1]}",
            "L*" if m.early_used else "L",
            f"P={m.path}",
            f"cache={m.cache}" + ("+learned" if m.learned else ""),
            f"invalidated={m.invalidated}" if m.invalidated else "",
            f"RT={m.round_trips_saved}" if m.round_trips_saved else "",
            f"TS={saved * 1000:.3f}ms" if m.round_trips_saved else "",
            f"U={self.bytes_up}",
            f"D={self.bytes_down}",
            f"DT={self.elapsed:.3f}s",
            f"outcome={m.outcome}",
            f'deferred="{quoted(m.failure)}"' if m.failure else "",
            f'detail="{quoted("; ".join(self.notes))}"' if self.notes else "",
            f'C="{quoted(m.last_reply)}"' if m.last_reply else "",
        ]
        return " ".join(p for p in parts if p)


class OutboundSession:
    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        mta: Endpoint,
        dest: Endpoint,
        config: Config,
        cache: Cache,
        metrics: Metrics,
        own: set[Endpoint],
    ) -> None:
        self.mta = stream
        self.mta_address = mta
        self.dest = dest
        self.config = config
        self.out: OutboundConfig = config.outbound
        self.cache = cache
        self.metrics = metrics
        self.own = own  # local ends of this process's connections to MXes (loop check)
        self.key = (mta[0], dest[0], dest[1])
        self.mx: trio.SocketStream | None = None
        self.record = OutboundRecord(mta, dest)
        self._lock = trio.Lock()
        self._cache_writes: list[OutboundAction] = []
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        t = config.timeouts
        allowed = self.out.hosts.matches(dest[0])
        # The cache keeps wall-clock times: they must survive restarts (the TTL is days).
        entry = self.cache.lookup(self.key, time.time()) if allowed else None
        self.machine = OutboundMachine(
            greeting=(
                Greeting(entry.banner, entry.ehlo, entry.client_ehlo) if entry is not None else None
            ),
            learn=allowed,
            fast_open=self.out.tcp_fastopen,
            command_timeout=t.command,
            reply_timeout=t.reply,
            data_term_timeout=t.data_term,
            max_reply_line=config.limits.max_reply_line,
        )
        if not allowed:
            self.machine.log.cache = "bypass"

    def shutdown(self) -> None:
        """The grace is over (the server is stopping)."""
        if self._nursery is not None:
            self._nursery.start_soon(self._feed, Shutdown())

    async def run(self) -> None:
        started = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                async with self._lock:
                    await self._perform(self.machine.start(trio.current_time()))
                if not self.machine.done:
                    nursery.start_soon(self._read_mta)
                    nursery.start_soon(self._timer)
        finally:
            self._nursery = None
            await self._close_all()
            self.record.elapsed = trio.current_time() - started
            self._report()
            await self._write_cache()

    async def _write_cache(self) -> None:
        writes, self._cache_writes = self._cache_writes, []
        if writes:
            # Shielded (a shutdown must not lose them) and bounded (a locked file).
            with trio.CancelScope(shield=True), trio.move_on_after(CACHE_WRITE_TIMEOUT):
                await self.cache.write(self.key, writes)

    # ------------------------------------------------------------ tasks

    async def _read_mta(self) -> None:
        while not self.machine.done:
            try:
                data = await self.mta.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self._feed(ClientBroken())
                return
            self.record.bytes_up += len(data)
            if self.machine.spliced:
                # TLS between the MTA and the MX: the MTA writes its Finished and its EHLO
                # as two small segments, and Nagle holds the second until this side ACKs the
                # first; a delayed ACK would cost up to 40 ms per handshake.
                with contextlib.suppress(OSError):
                    self.mta.socket.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            await self._feed(ClientData(data) if data else ClientEof())
            if not data:
                return

    async def _read_mx(self, mx: trio.SocketStream) -> None:
        while not self.machine.done and mx is self.mx:
            try:
                data = await mx.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                if mx is self.mx:
                    await self._feed(UpstreamBroken(sending=False))
                return
            if mx is not self.mx:
                return  # a connection given up (a retry): what it says is nobody's
            self.record.bytes_down += len(data)
            await self._feed(UpstreamData(data) if data else UpstreamEof())
            if not data:
                return

    async def _timer(self) -> None:
        while not self.machine.done:
            deadline = self.machine.deadline
            self._wake = trio.Event()
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                await self._wake.wait()
                continue
            if self.machine.deadline == deadline:
                await self._feed(DeadlinePassed())

    async def _feed(self, event: Event) -> None:
        async with self._lock:
            if self.machine.done:
                return
            await self._perform(self.machine.handle(event, trio.current_time()))

    # ------------------------------------------------------------ actions

    async def _perform(self, actions: list[OutboundAction]) -> None:
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            follow: Event | None = None
            if isinstance(action, SendClient):
                follow = await self._send(self.mta, action.data, ClientBroken())
            elif isinstance(action, SendUpstream):
                if self.mx is not None:
                    follow = await self._send(self.mx, action.data, UpstreamBroken(sending=True))
            elif isinstance(action, ConnectMx):
                follow = await self._connect(action.early, fast_open=action.fast_open)
            elif isinstance(action, CloseUpstream):
                await self._close_mx()
            elif isinstance(action, CloseClient):
                await self._write_cache()  # before the MTA sees the end: its next try knows
                await self._close_all()
            elif isinstance(action, Learn | Forget | Verified):
                self._cache_writes.append(action)  # made when the session ends
                if isinstance(action, Learn):  # what the cache will keep
                    self.machine.log.learned = cacheable(action.banner, action.ehlo)
            elif isinstance(action, Splice):
                pass  # the machine forwards from now on
            if follow is not None and not self.machine.done:
                queue = self.machine.handle(follow, trio.current_time()) + queue
        self._wake.set()
        if self.machine.done and self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _send(self, stream: trio.SocketStream, data: bytes, broken: Event) -> Event | None:
        with trio.move_on_after(self.config.timeouts.command) as scope:
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return broken
        return broken if scope.cancelled_caught else None

    async def _connect(self, early: bytes, *, fast_open: bool) -> Event:
        host, port = self.dest
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            if self.out.socket_mark:
                sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, self.out.socket_mark)
            if self.out.bind_source:
                sock.setsockopt(socket.SOL_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
                await sock.bind((self.mta_address[0], 0))
            if fast_open:
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_FASTOPEN_CONNECT, 1)
            with trio.fail_after(self.config.upstream.connect_timeout):
                await sock.connect((host, port))
        except (OSError, trio.TooSlowError) as exc:
            sock.close()
            reason = "timeout" if isinstance(exc, trio.TooSlowError) else str(exc)
            self.record.notes.append(f"connect: {reason}")
            return UpstreamConnectFailed(reason)
        stream = trio.SocketStream(sock)
        self.mx = stream
        # Known as ours before anything can yield: were the rule to send it back to us,
        # the listener must recognise it at its very first accept.
        self.own.add(endpoint(sock.getsockname()))
        if early:  # then at once: the MX must find it waiting when it is about to greet
            broken = await self._send(stream, early, UpstreamBroken(sending=True))
            if broken is not None:
                return broken
        assert self._nursery is not None
        self._nursery.start_soon(self._read_mx, stream)
        return UpstreamConnected()

    async def _close_mx(self) -> None:
        mx, self.mx = self.mx, None
        if mx is not None:
            if self.record.mx_rtt is None:
                self.record.mx_rtt = tcp_rtt(mx.socket)
                self.record.syn_data = syn_data_acked(mx.socket)
            self._forget_own(mx)
            await trio.aclose_forcefully(mx)

    def _forget_own(self, mx: trio.SocketStream) -> None:
        try:
            self.own.discard(endpoint(mx.socket.getsockname()))
        except OSError:
            return

    async def _close_all(self) -> None:
        await self._close_mx()
        await trio.aclose_forcefully(self.mta)

    # ------------------------------------------------------------ the record

    def _report(self) -> None:
        m = self.machine.log
        r = self.record
        if m.early_used and r.syn_data:
            m.round_trips_saved += 1  # the handshake's round trip carried the commands too
        saved = (r.mx_rtt or 0.0) * m.round_trips_saved
        self.metrics.record_outbound(m, saved)
        log.info("%s", r.render(m, saved, self.config.log.format))


async def handle_outbound(
    stream: trio.SocketStream,
    *,
    config: Config,
    cache: Cache,
    metrics: Metrics,
    own: set[Endpoint],
    sessions: set[OutboundSession],
) -> None:
    """One accepted connection on an outbound listener."""
    try:
        sock = stream.socket
        mta = endpoint(sock.getpeername())
        here = endpoint(sock.getsockname())
    except OSError:
        await trio.aclose_forcefully(stream)
        return
    original = original_destination(sock)
    dest = endpoint(original) if original is not None else None
    refusal = None
    if mta in own:
        refusal = LOOPED
    elif dest is None or dest == here:
        refusal = NOT_INTERCEPTED
    if refusal is not None:
        metrics.outbound_refused.labels("loop" if refusal is LOOPED else "not-intercepted").inc()
        log.warning("outbound: %s from %s:%d", refusal.text, *mta)
        await refuse(stream, refusal)
        return
    assert dest is not None
    session = OutboundSession(
        stream,
        mta=mta,
        dest=dest,
        config=config,
        cache=cache,
        metrics=metrics,
        own=own,
    )
    sessions.add(session)
    metrics.outbound_active.inc()
    try:
        await session.run()
    finally:
        metrics.outbound_active.dec()
        sessions.discard(session)
