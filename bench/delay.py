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

The relay also measures what the benchmarks need, per connection (``ConnRecord``): when the
client connected, when the first server bytes (banner) reached it, and when the server's reply
to the first end of message data (``CRLF.CRLF``) reached it — "connect to final 250" for any
client, Exim included, without trusting the client's own clock.

``python -m bench.delay --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT --rtt-ms 50`` runs
it standalone. Binds loopback addresses only.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from dataclasses import dataclass, field

import trio

__all__ = ["Calibration", "ConnRecord", "DelayRelay", "calibrate", "main"]

END_OF_DATA = b"\r\n.\r\n"
CHUNK = 65536
QUEUE_CHUNKS = 256  # per direction; beyond it the reader stops (TCP backpressure)
CONNECT_TIMEOUT = 10.0
MAX_RECORDS = 100_000
SPIN = 0.0015
MAX_SEND_LAG = 0.0005


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
        task_status.started(port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        rec = ConnRecord(accepted=trio.current_time())
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
                    await trio.aclose_forcefully(s)

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
        await sleep_until_precise(rec.accepted + max(0.0, self.half - self._connect_cost))
        started = trio.current_time()
        with trio.fail_after(CONNECT_TIMEOUT):
            upstream = await _connect(self.upstream)
        holder.append(upstream)
        rec.upstream_connected = now = trio.current_time()
        self._connect_cost = 0.8 * self._connect_cost + 0.2 * min(now - started, 0.002)
        ready.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_up, upstream, up_pipe, rec)
            nursery.start_soon(self._read, upstream, down_pipe, rec, False)

    async def _read(
        self, source: trio.SocketStream, pipe: _Pipe, rec: ConnRecord, upward: bool
    ) -> None:
        async with pipe.send:
            while True:  # bounded by the peer: ends at EOF or error
                try:
                    data = await source.receive_some(CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = _EOF
                now = trio.current_time()
                if upward:
                    rec.bytes_up += len(data)
                else:
                    rec.bytes_down += len(data)
                await pipe.send.send((now + self.half, data))
                if not data:
                    return

    async def _write_up(self, upstream: trio.SocketStream, pipe: _Pipe, rec: ConnRecord) -> None:
        tail = b""
        async with pipe.recv:
            async for deliver_at, data in pipe.recv:
                await sleep_until_precise(deliver_at - self._send_lag)
                if not data:
                    await _send_eof(upstream)
                    return
                await upstream.send_all(data)
                self._sent(deliver_at)
                if rec.end_of_data_sent is None:
                    window = tail + data
                    if END_OF_DATA in window or window.startswith(b".\r\n"):
                        # ".\r\n" right after "DATA\r\n" (an empty body) also ends data.
                        rec.end_of_data_sent = trio.current_time()
                    tail = window[-(len(END_OF_DATA) - 1) :]

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

    def _sent(self, due: float) -> float:
        """Learn the send lag from how late a delivery went out against its due time (an
        integrating controller: the lag converges to the writers' own latency), clamped so
        a stall cannot make later deliveries leave far early. Returns the current time."""
        now = trio.current_time()
        lag = self._send_lag + 0.3 * (now - due)
        self._send_lag = min(max(lag, 0.0), MAX_SEND_LAG)
        return now


async def _connect(address: tuple[str, int]) -> trio.SocketStream:
    """A plain connect to a numeric address: trio.open_tcp_stream's resolver and happy-eyeballs
    machinery cost about a millisecond, which would show up as extra banner latency."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
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
    args = ap.parse_args(argv)
    relay = DelayRelay(
        upstream=args.upstream,
        rtt=args.rtt_ms / 1000,
        listen_host=args.listen[0],
        listen_port=args.listen[1],
    )

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(relay.serve)
            print(
                f"delay relay 127.0.0.1:{port} -> {args.upstream} rtt={args.rtt_ms} ms", flush=True
            )

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
