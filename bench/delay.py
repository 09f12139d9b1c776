"""A userland delay relay: emulates a WAN round-trip time on loopback (netem is unavailable).

Every chunk read from one side is written to the other side ``rtt / 2`` after it was read, in
order, in each direction. The onward (upstream) connect is itself delayed by ``rtt / 2``: on
loopback the client's ``connect()`` returns at once, which in the real world happens one RTT
after the SYN; the server then accepts half an RTT later and its banner reaches the client one
RTT after ``connect()`` returned. Early client bytes (sent right after connect) reach the server
together with the accept, as they would over a real network:

    client connect() returns     t = 0
    server accepts, banner sent  t = rtt/2   (client bytes sent at 0 arrive now too)
    banner at the client         t = rtt

So a session timed from ``connect()`` misses only the SYN/SYN-ACK round trip: add one RTT to
compare with "from SYN" figures.

``handshake=True`` (``--handshake``) puts that round trip in: the relay's accept stands for the
client's SYN, the server accepts 1.5 RTT later (when the client's final ACK would reach it) and
the client's bytes reach the server no earlier than that (a real client can send only once its
``connect()`` has returned, one RTT after the SYN). A connection whose SYN carried data (TCP Fast
Open: ``TCP_INFO`` says ``TCPI_OPT_SYN_DATA``; the listener needs ``fastopen=True``) is accepted
with its SYN, as the real server would, half an RTT after it, the SYN's data with it; the
client's further bytes still wait for the handshake (its kernel sends them once the SYN-ACK is
in, one RTT after the SYN), so they reach the server 1.5 RTT after the SYN at the earliest. The
SYN's data are the bytes received when the relay accepts (``tcpi_bytes_received``) if they came
in one segment (``tcpi_data_segs_in``); if more came before the relay got to accept (on
loopback the handshake takes microseconds), the SYN's share is taken to be the first line
(an SMTP client's first write: its EHLO), and the record says so (``syn_guessed``):

    relay accepts (the SYN)            t = 0
    server accepts, banner sent        t = 1.5 rtt   (TFO: 0.5 rtt, the SYN's data with it)
    banner at the client               t = 2 rtt     (TFO: rtt)
    the client's (other) bytes, at the server no earlier than 1.5 rtt

Timed from the accept, a session then counts the round trips as "from SYN" figures do.

``quickack=True`` (``--quickack``) ACKs every read at once (``TCP_QUICKACK``). The relay's
kernel, not the far end's, ACKs what the client sends; when a client writes two small segments
in a row (Postfix: its TLS Finished, then EHLO) Nagle holds the second until that ACK, and a
delayed ACK on loopback (up to 40 ms, depending on the traffic's rhythm) can then stretch a
10 ms path's round trip fivefold. With it no write waits for an ACK: what a real path adds for
Nagle (an ACK takes a round trip there) is not emulated either way.

``upstream_fastopen=True`` (``--upstream-fastopen``): the client's bytes due when the server
accepts (early talk) go in the SYN of the relay's own connection to the server (TCP Fast Open,
once the kernel holds the server's cookie), so the server finds them when it accepts instead of
a few hundred microseconds later, after the relay's next write.

The relay also measures what the benchmarks need, per connection (``ConnRecord``): when the
client connected, when the first server bytes (banner) reached it, and when the server's reply
to the first end of message data (``CRLF.CRLF``) reached it — "connect to final 250" for any
client, Exim included, without trusting the client's own clock.

``python -m bench.delay --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT --rtt-ms 50`` runs
it standalone (``--handshake``, ``--fastopen``, ``--quickack``, ``--upstream-fastopen``: the
``DelayRelay`` fields; ``--records FILE`` appends each connection's ``ConnRecord`` to FILE as a
JSON line when it closes, ``--trace`` with every chunk's times). Binds loopback addresses only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

import trio

__all__ = ["Calibration", "ConnRecord", "DelayRelay", "calibrate", "main"]

END_OF_DATA = b"\r\n.\r\n"
CHUNK = 65536
QUEUE_CHUNKS = 256  # per direction; beyond it the reader stops (TCP backpressure)
CONNECT_TIMEOUT = 10.0
MAX_RECORDS = 100_000
SPIN = 0.0015
MAX_SEND_LAG = 0.0005
TCPI_OPT_SYN_DATA = 0x20  # linux/tcp.h: tcpi_options, the SYN carried data (TCP Fast Open)
_TCPI_OPTIONS = 5  # struct tcp_info: the sixth u8
_TCPI_BYTES_RECEIVED = struct.Struct("=Q")  # the u64 at offset 128 (Linux 4.1+)
_TCPI_BYTES_RECEIVED_OFFSET = 128
_TCPI_DATA_SEGS_IN = struct.Struct("=I")  # the u32 at offset 152 (Linux 4.6+)
_TCPI_DATA_SEGS_IN_OFFSET = 152
_TCP_INFO_LENGTH = 160
FASTOPEN_QUEUE = 1024  # TCP_FASTOPEN on the listener: pending TFO requests it may hold
TCP_FASTOPEN_CONNECT = getattr(socket, "TCP_FASTOPEN_CONNECT", 30)  # linux/tcp.h
# upstream_fastopen: client bytes due this soon after the server's accept count as due at it.
IN_SYN_SLACK = 0.0002


@dataclass
class ConnRecord:
    """Timestamps (trio.current_time(), seconds) of one relayed connection."""

    accepted: float
    upstream_connected: float | None = None
    first_reply: float | None = None  # first server bytes delivered to the client
    end_of_data_sent: float | None = None  # CRLF.CRLF delivered to the server
    final_reply: float | None = None  # server's reply to it delivered to the client
    final_code: bytes = b""
    bytes_up: int = 0
    bytes_down: int = 0
    closed: float | None = None
    error: str = ""
    syn_data: bool = False  # the client's SYN carried data (TCP Fast Open)
    syn_bytes: int = 0  # how many (what the relay had received when it accepted)
    syn_guessed: bool = False  # more had come by then: syn_bytes is the first line's length
    upstream_syn_data: bool = False  # the relay's SYN to the server carried data (TFO)
    client_port: int = 0  # the client's port (its side of the accepted connection)
    upstream_port: int = 0  # the relay's local port towards the server (the server's peer)
    wall_offset: float = 0.0  # time.time() - trio.current_time() at the accept
    # With `trace`: (read from the server, delivered to the client) of every server chunk:
    # what finds the final reply where the relay cannot see the end of data (inside TLS).
    replies: list[tuple[float, float]] = field(default_factory=list)
    # ... and (due less rtt/2, delivered to the server, bytes) of every client chunk.
    requests: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def to_final(self) -> float | None:
        """Seconds from the client's connect to the final reply (None if none came)."""
        return None if self.final_reply is None else self.final_reply - self.accepted

    @property
    def to_banner(self) -> float | None:
        return None if self.first_reply is None else self.first_reply - self.accepted


_EOF = b""


@dataclass
class _Pipe:
    """One direction: (deliver_at, chunk) items, in order; b"" is EOF."""

    send: trio.MemorySendChannel[tuple[float, bytes]]
    recv: trio.MemoryReceiveChannel[tuple[float, bytes]]

    @classmethod
    def new(cls) -> _Pipe:
        s, r = trio.open_memory_channel[tuple[float, bytes]](QUEUE_CHUNKS)
        return cls(s, r)


@dataclass
class DelayRelay:
    """Relay 127.0.0.1:listen_port -> upstream, delaying by rtt/2 each way."""

    upstream: tuple[str, int]
    rtt: float
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    records: list[ConnRecord] = field(default_factory=list)
    handshake: bool = False  # emulate the TCP handshake's round trip too (module docstring)
    fastopen: bool = False  # accept TCP Fast Open (TCP_FASTOPEN on the listener)
    on_close: Callable[[ConnRecord], None] | None = None  # called with each finished record
    trace: bool = False  # keep every chunk's times in ConnRecord.replies and .requests
    # ACK what was read at once (TCP_QUICKACK after every read): the relay's own kernel must
    # not hold a sender's next small write back (Nagle waits for the ACK; a delayed ACK on
    # loopback can take 40 ms where the path's round trip is 10). (Module docstring.)
    quickack: bool = False
    # Bytes due when the server accepts (a client's early talk) go in the SYN of the relay's
    # connection to it (TCP Fast Open; plain connects otherwise): the server finds them waiting
    # when it accepts, as it would over a real path where they come with the final ACK, not a
    # few hundred microseconds after its accept (Exim decides `L*` against `L.` by whether the
    # client's bytes wait when it is about to send its banner).
    upstream_fastopen: bool = False
    _connect_cost: float = field(default=0.0003, init=False, repr=False)
    # From a delivery's due time to its send_all returning (waking the writer, the send
    # itself): about 70 us per hop here, 2 % of a 10 ms RTT. Writers start that much early.
    _send_lag: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (0 <= self.rtt < 10) or math.isnan(self.rtt):
            raise ValueError(f"rtt must be in [0, 10) seconds, not {self.rtt}")
        if not self.listen_host.startswith("127."):
            raise ValueError("the delay relay binds loopback addresses only")

    @property
    def half(self) -> float:
        return self.rtt / 2

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and relay until cancelled; task_status.started(port)."""
        listeners = await trio.open_tcp_listeners(
            self.listen_port, host=self.listen_host, backlog=1024
        )
        port: int = listeners[0].socket.getsockname()[1]
        self.listen_port = port
        if self.fastopen:
            for listener in listeners:
                listener.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, FASTOPEN_QUEUE)
        task_status.started(port)
        await trio.serve_listeners(self._handle, listeners)

    def _server_accepts(self, rec: ConnRecord) -> float:
        """When the server accepts (with `handshake`: the client's final ACK, or its SYN
        if that carried data, reaches it)."""
        if self.handshake and not rec.syn_data:
            return rec.accepted + self.rtt + self.half
        return rec.accepted + self.half

    def _after_handshake(self, rec: ConnRecord) -> float:
        """The earliest the client's bytes (but the SYN's own) reach the server."""
        return rec.accepted + (self.rtt + self.half if self.handshake else self.half)

    async def _handle(self, client: trio.SocketStream) -> None:
        rec = ConnRecord(accepted=trio.current_time())
        rec.wall_offset = time.time() - rec.accepted
        with contextlib.suppress(OSError):
            rec.client_port = client.socket.getpeername()[1]
            info = client.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LENGTH)
            rec.syn_data = bool(info[_TCPI_OPTIONS] & TCPI_OPT_SYN_DATA)
            if rec.syn_data:
                rec.syn_bytes, rec.syn_guessed = _syn_payload(info)
        if len(self.records) < MAX_RECORDS:
            self.records.append(rec)
        up_pipe, down_pipe = _Pipe.new(), _Pipe.new()
        upstream_ready = trio.Event()
        holder: list[trio.SocketStream] = []
        async with client:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read, client, up_pipe, rec, True)
                    nursery.start_soon(
                        self._connect_and_pump, holder, upstream_ready, up_pipe, down_pipe, rec
                    )
                    nursery.start_soon(self._write_down, client, down_pipe, rec)
            except* Exception as group:  # one broken session must not stop the relay
                first = group.exceptions[0]
                rec.error = f"{type(first).__name__}: {first}"
            finally:
                rec.closed = trio.current_time()
                for s in holder:
                    with contextlib.suppress(OSError):
                        info = s.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
                        rec.upstream_syn_data = bool(info[_TCPI_OPTIONS] & TCPI_OPT_SYN_DATA)
                    await trio.aclose_forcefully(s)
                if self.on_close is not None:
                    self.on_close(rec)

    async def _connect_and_pump(
        self,
        holder: list[trio.SocketStream],
        ready: trio.Event,
        up_pipe: _Pipe,
        down_pipe: _Pipe,
        rec: ConnRecord,
    ) -> None:
        # The SYN takes half an RTT to reach the server. Our own connect costs a few hundred
        # microseconds of Python: start that much early so the server accepts on time.
        accepts = self._server_accepts(rec)
        await sleep_until_precise(max(rec.accepted, accepts - self._connect_cost))
        held: list[tuple[float, bytes]] = []  # taken from the pipe: the SYN's and what follows
        if self.upstream_fastopen:
            while not held or (held[-1][1] and held[-1][0] <= accepts + IN_SYN_SLACK):
                try:
                    held.append(up_pipe.recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
        in_syn = [(due, data) for due, data in held if data and due <= accepts + IN_SYN_SLACK]
        started = trio.current_time()
        with trio.fail_after(CONNECT_TIMEOUT):
            upstream = await _connect(self.upstream, fastopen=bool(in_syn))
        holder.append(upstream)
        with contextlib.suppress(OSError):
            rec.upstream_port = upstream.socket.getsockname()[1]
        rec.upstream_connected = now = trio.current_time()
        self._connect_cost = 0.8 * self._connect_cost + 0.2 * min(now - started, 0.002)
        tail = [b""]  # the last bytes written up (the end-of-data marker may straddle writes)
        if in_syn:  # in the SYN if the kernel holds the server's TFO cookie
            await upstream.send_all(b"".join(data for _, data in in_syn))
            self._delivered_up(rec, in_syn, tail)
        ready.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_up, upstream, up_pipe, rec, held[len(in_syn) :], tail)
            nursery.start_soon(self._read, upstream, down_pipe, rec, False)

    async def _read(
        self, source: trio.SocketStream, pipe: _Pipe, rec: ConnRecord, upward: bool
    ) -> None:
        # With `handshake`, the client's bytes wait for the handshake (but its SYN's own).
        floor = self._after_handshake(rec) if upward else 0.0
        in_syn = rec.syn_bytes if upward and self.handshake and rec.syn_data else 0
        async with pipe.send:
            while True:  # bounded by the peer: ends at EOF or error
                try:
                    data = await source.receive_some(CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = _EOF
                now = trio.current_time()
                if self.quickack and data:
                    with contextlib.suppress(OSError):
                        source.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                if upward:
                    rec.bytes_up += len(data)
                else:
                    rec.bytes_down += len(data)
                if upward and rec.syn_bytes < 0 and data:  # syn_guessed: the first line
                    rec.syn_bytes = data.find(b"\n") + 1 or len(data)
                    in_syn = rec.syn_bytes if self.handshake else 0
                if in_syn and data:  # they came with the SYN, however late read
                    head, data = data[:in_syn], data[in_syn:]
                    in_syn -= len(head)
                    await pipe.send.send((rec.accepted + self.half, head))
                    if not data:
                        continue
                await pipe.send.send((max(now + self.half, floor), data))
                if not data:
                    return

    async def _write_up(
        self,
        upstream: trio.SocketStream,
        pipe: _Pipe,
        rec: ConnRecord,
        held: list[tuple[float, bytes]],
        tail: list[bytes],
    ) -> None:
        async with pipe.recv:
            while True:  # bounded by the client: ends at its EOF (or the pipe's end)
                if held:
                    deliver_at, data = held.pop(0)
                else:
                    try:
                        deliver_at, data = await pipe.recv.receive()
                    except trio.EndOfChannel:
                        return
                await sleep_until_precise(deliver_at - self._send_lag)
                if not data:
                    await _send_eof(upstream)
                    return
                await upstream.send_all(data)
                self._sent(deliver_at)
                self._delivered_up(rec, [(deliver_at, data)], tail)

    def _delivered_up(
        self, rec: ConnRecord, items: list[tuple[float, bytes]], tail: list[bytes]
    ) -> None:
        """Bookkeeping for client bytes just written to the server: the trace, and whether
        they ended the first message's data."""
        now = trio.current_time()
        for deliver_at, data in items:
            if self.trace:
                rec.requests.append((deliver_at - self.half, now, len(data)))
            if rec.end_of_data_sent is None:
                window = tail[0] + data
                if END_OF_DATA in window or window.startswith(b".\r\n"):
                    # ".\r\n" right after "DATA\r\n" (an empty body) also ends data.
                    rec.end_of_data_sent = now
                tail[0] = window[-(len(END_OF_DATA) - 1) :]

    async def _write_down(self, client: trio.SocketStream, pipe: _Pipe, rec: ConnRecord) -> None:
        async with pipe.recv:
            async for deliver_at, data in pipe.recv:
                # A reply read from the server after the end of data went up answers it.
                answers_eod = (
                    rec.end_of_data_sent is not None
                    and rec.final_reply is None
                    and deliver_at - self.half >= rec.end_of_data_sent
                )
                await sleep_until_precise(deliver_at - self._send_lag)
                if not data:
                    await _send_eof(client)
                    return
                await client.send_all(data)
                now = self._sent(deliver_at)
                if rec.first_reply is None:
                    rec.first_reply = now
                if answers_eod:
                    rec.final_reply = now
                    rec.final_code = data[:3]
                if self.trace:
                    rec.replies.append((deliver_at - self.half, now))

    def _sent(self, due: float) -> float:
        """Learn the send lag from how late a delivery went out against its due time (an
        integrating controller: the lag converges to the writers' own latency), clamped so
        a stall cannot make later deliveries leave far early. Returns the current time."""
        now = trio.current_time()
        lag = self._send_lag + 0.3 * (now - due)
        self._send_lag = min(max(lag, 0.0), MAX_SEND_LAG)
        return now


def _syn_payload(info: bytes) -> tuple[int, bool]:
    """(bytes the SYN carried, guessed) from an accepted TFO connection's TCP_INFO: exact when
    all bytes received so far came in one segment; otherwise (-1, True): the first line."""
    if len(info) < _TCPI_DATA_SEGS_IN_OFFSET + 4:
        return -1, True
    (received,) = _TCPI_BYTES_RECEIVED.unpack_from(info, _TCPI_BYTES_RECEIVED_OFFSET)
    (segments,) = _TCPI_DATA_SEGS_IN.unpack_from(info, _TCPI_DATA_SEGS_IN_OFFSET)
    return (int(received), False) if segments <= 1 else (-1, True)


async def _connect(address: tuple[str, int], *, fastopen: bool = False) -> trio.SocketStream:
    """A plain connect to a numeric address: trio.open_tcp_stream's resolver and happy-eyeballs
    machinery cost about a millisecond, which would show up as extra banner latency.
    ``fastopen``: TCP_FASTOPEN_CONNECT, the first write goes in the SYN (once the kernel holds
    the server's cookie; the connect then returns at once, the SYN waits for that write)."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        if fastopen:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
        await sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)  # sets TCP_NODELAY


async def sleep_until_precise(deadline: float) -> None:
    """trio.sleep_until, to within microseconds rather than a millisecond.

    The event loop waits in epoll, whose timeout CPython rounds *up* to whole milliseconds, so
    a plain sleep overshoots by up to 1 ms (each relay hop sleeps twice per round trip). Sleep
    to just short of the deadline, then yield in a loop until it passes (at most SPIN seconds
    of busy waiting per delivery; other tasks keep running)."""
    if deadline - trio.current_time() > SPIN:
        await trio.sleep_until(deadline - SPIN)
    while trio.current_time() < deadline:  # bounded by SPIN seconds
        await trio.lowlevel.checkpoint()


async def _send_eof(stream: trio.SocketStream) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await stream.send_eof()


@dataclass(frozen=True)
class Calibration:
    """The relay measured against its own setting (seconds, medians).

    `banner`: connect -> first server byte; `echo`: one byte there and back on an open
    connection; `*_direct`: the same without the relay (loopback plus the Python endpoints'
    own cost, which a real network path has too). The relay's emulated RTT is the difference.
    """

    rtt: float
    banner: float
    echo: float
    banner_direct: float
    echo_direct: float

    @property
    def banner_added(self) -> float:
        return self.banner - self.banner_direct

    @property
    def echo_added(self) -> float:
        return self.echo - self.echo_direct

    @property
    def banner_error(self) -> float:
        """Relative error of the relay's added banner delay against the RTT setting."""
        return _rel_error(self.banner_added, self.rtt)

    @property
    def echo_error(self) -> float:
        return _rel_error(self.echo_added, self.rtt)


def _rel_error(measured: float, setting: float) -> float:
    return (measured - setting) / setting if setting else measured


async def calibrate(rtt: float, rounds: int = 10) -> Calibration:
    """Measure the relay at `rtt` against a loopback server that greets on accept and echoes,
    and the same server directly."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")

    async def greet_and_echo(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await stream.send_all(b"220 hi\r\n")
                for _ in range(rounds + 1):  # bounded: the client sends `rounds` bytes
                    data = await stream.receive_some(CHUNK)
                    if not data:
                        return
                    await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def measure(port: int) -> tuple[float, float]:
        banners: list[float] = []
        echoes: list[float] = []
        for _ in range(rounds):
            t0 = trio.current_time()
            stream = await _connect(("127.0.0.1", port))
            async with stream:
                await _receive_exactly(stream, 8)
                banners.append(trio.current_time() - t0)
                for _ in range(rounds):
                    t1 = trio.current_time()
                    await stream.send_all(b"x")
                    await _receive_exactly(stream, 1)
                    echoes.append(trio.current_time() - t1)
        return _median(banners), _median(echoes)

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        server_port: int = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, greet_and_echo, listeners)
        relay = DelayRelay(upstream=("127.0.0.1", server_port), rtt=rtt)
        port = await nursery.start(relay.serve)
        with trio.fail_after(30 + 4 * rtt * rounds * (rounds + 1)):
            banner_direct, echo_direct = await measure(server_port)
            banner, echo = await measure(port)
        nursery.cancel_scope.cancel()
    return Calibration(rtt, banner, echo, banner_direct, echo_direct)


async def _receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    got = b""
    while len(got) < n:  # bounded by n and by the caller's deadline
        data = await stream.receive_some(n - len(got))
        if not data:
            raise EOFError("connection closed early")
        got += data
    return got


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host.startswith("127."):
        raise argparse.ArgumentTypeError(f"{text}: loopback addresses only (127.x.y.z:port)")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.delay", description=(__doc__ or "").split("\n")[0]
    )
    ap.add_argument("--listen", type=_hostport, required=True, help="127.0.0.1:PORT")
    ap.add_argument("--upstream", type=_hostport, required=True, help="127.0.0.1:PORT")
    ap.add_argument("--rtt-ms", type=float, required=True)
    ap.add_argument("--handshake", action="store_true", help="emulate the SYN round trip too")
    ap.add_argument("--fastopen", action="store_true", help="accept TCP Fast Open")
    ap.add_argument("--records", help="append each connection's record to FILE (JSON lines)")
    ap.add_argument("--trace", action="store_true", help="records: every chunk's times")
    ap.add_argument("--quickack", action="store_true", help="ACK every read at once")
    ap.add_argument(
        "--upstream-fastopen", action="store_true", help="early client bytes in the server's SYN"
    )
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        records = stack.enter_context(open(args.records, "a")) if args.records else None
        return _serve(args, records)


def _serve(args: argparse.Namespace, records: TextIO | None) -> int:
    relay = DelayRelay(
        upstream=args.upstream,
        rtt=args.rtt_ms / 1000,
        listen_host=args.listen[0],
        listen_port=args.listen[1],
        handshake=args.handshake,
        fastopen=args.fastopen,
        trace=args.trace,
        quickack=args.quickack,
        upstream_fastopen=args.upstream_fastopen,
        on_close=(lambda rec: _dump(records, rec)) if records is not None else None,
    )

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(relay.serve)
            print(
                f"delay relay {args.listen[0]}:{port} -> {args.upstream[0]}:{args.upstream[1]} "
                f"rtt={args.rtt_ms} ms",
                flush=True,
            )

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)
    return 0


def _dump(out: TextIO, rec: ConnRecord) -> None:
    """One JSON line per record (the final code as text); a record keeps the relay's own
    clock (trio.current_time()): compare its times with each other only."""
    fields = dataclasses.asdict(rec)
    fields["final_code"] = rec.final_code.decode("ascii", "replace")
    print(json.dumps(fields), file=out, flush=True)


if __name__ == "__main__":
    sys.exit(main())
