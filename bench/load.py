"""P2 (throughput through a relay into smtp-sink) and P3 (memory per idle session).

P2: `smtp-source -s 100 -m N -l 1024` (one message per session, 100 in parallel) straight into
smtp-sink, through HAProxy (2 threads), and through the proxy (`client_identity = "none"`:
smtp-sink speaks no PROXY protocol); then one large-message run (10 MiB) for MB/s. CPU seconds
of the relay process come from /proc (all threads). Client, sink and relay share the cores.

P3: N client connections held open at the banner (mid-session) through a fresh relay process
into smtp-sink; resident memory of the relay before and after, per session.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bench.peers import (
    HAPROXY_MAXCONN,
    SMTP_SOURCE,
    Floor,
    HAProxy,
    SmtpSink,
    bench_proxy,
    cpu_seconds,
    rss_bytes,
)

__all__ = ["P2Row", "P3Row", "phase_p2", "phase_p3"]

WriteCsv = Callable[[Path, Sequence[Any]], None]
LARGE = 10 * 1024 * 1024


@dataclass(frozen=True)
class P2Row:
    path: str
    sessions: int
    messages: int
    message_bytes: int
    seconds: float
    msgs_per_s: float
    mb_per_s: float
    relay_cpu_s: float
    relay_cpu_s_per_1000: float
    sink_cpu_s: float
    source_cpu_s: float
    errors: int


@dataclass(frozen=True)
class P3Row:
    relay: str
    sessions: int
    rss_before: int
    rss_after: int
    bytes_per_session: float


def _smtp_source(port: int, sessions: int, messages: int, length: int) -> tuple[float, float, int]:
    """Run smtp-source; (wall seconds, its CPU seconds, error lines)."""
    cmd = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(length)]
    cmd += ["-f", "bench@example.org", "-t", "box@dest.test", f"127.0.0.1:{port}"]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    output = proc.stdout.read()  # until it exits (its output is small)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - t0
    text = output.decode("utf-8", "replace")
    errors = sum(1 for line in text.splitlines() if line.strip())
    if proc.returncode != 0:
        raise RuntimeError(f"smtp-source exited {proc.returncode}:\n{text[-2000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, errors


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its live children (the proxy's workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = [int(p) for p in children.read_text().split()] if children.exists() else []
    return cpu_seconds(pid) + sum(cpu_seconds(k) for k in kids)


def phase_p2(args: argparse.Namespace, workdir: Path, out: Path, write_csv: WriteCsv) -> list[str]:
    messages: int = args.p2_messages
    rows: list[P2Row] = []
    round_rows: list[P2Row] = []
    sink = SmtpSink(workdir / "p2-sink", max_sessions=1000).start()
    haproxy = HAProxy(workdir / "p2-haproxy", sink.port, send_proxy=False).start()
    proxy = bench_proxy(workdir / "p2-proxy", sink.port, client_identity="none")
    proxy2 = bench_proxy(workdir / "p2-proxy2", sink.port, client_identity="none", workers=2)
    slow = bench_proxy(workdir / "p2-trio-io", sink.port, client_identity="none", fastio=False)
    floors = [Floor(kind, sink.port).start() for kind in ("epoll", "epoll-smtp", "trio")]
    try:
        assert proxy.proc is not None and proxy2.proc is not None and slow.proc is not None
        paths = [
            ("direct", sink.port, None),
            ("haproxy", haproxy.port, haproxy.pid),
            *((f"{f.kind}-floor", f.port, f.pid) for f in floors),
            ("proxy-trio-io", slow.port, slow.proc.pid),
            ("proxy", proxy.port, proxy.proc.pid),
            ("proxy-2w", proxy2.port, proxy2.proc.pid),
        ]
        # The machine's speed drifts by tens of percent within minutes: each run is split
        # into rounds, and every round runs every path, so drift hits all paths alike.
        rounds = max(1, args.p2_rounds)
        runs = [(100, messages, 1024), (1, max(2, messages // 2000), LARGE)]
        for sessions, count, length in runs:
            per_round = max(1, count // rounds)
            parts: dict[str, list[P2Row]] = {name: [] for name, _, _ in paths}
            for _ in range(rounds):
                for name, port, pid in paths:
                    relay0 = tree_cpu_seconds(pid) if pid else 0.0
                    sink0 = cpu_seconds(sink.pid)
                    seconds, source_cpu, errors = _smtp_source(port, sessions, per_round, length)
                    relay_cpu = (tree_cpu_seconds(pid) - relay0) if pid else 0.0
                    parts[name].append(
                        _p2_row(
                            name,
                            sessions,
                            length,
                            messages=per_round,
                            seconds=seconds,
                            relay_cpu_s=relay_cpu,
                            sink_cpu_s=cpu_seconds(sink.pid) - sink0,
                            source_cpu_s=source_cpu,
                            errors=errors,
                        )
                    )
            round_rows += [r for name in parts for r in parts[name]]
            for name, done in parts.items():
                row = _p2_total(done)
                rows.append(row)
                print(
                    f"  P2 {name:8} -s {sessions} -l {length}: {row.msgs_per_s:8.1f} msgs/s "
                    f"{row.mb_per_s:7.2f} MB/s relay CPU {row.relay_cpu_s_per_1000:.2f} s/1000 "
                    f"errors {row.errors}",
                    flush=True,
                )
    finally:
        for floor in floors:
            floor.stop()
        slow.stop()
        proxy2.stop()
        proxy.stop()
        haproxy.stop()
        sink.stop()
    write_csv(out / "p2.csv", rows)
    write_csv(out / "p2-rounds.csv", round_rows)
    return p2_table(rows, round_rows)


def _p2_row(
    path: str,
    sessions: int,
    message_bytes: int,
    *,
    messages: int,
    seconds: float,
    relay_cpu_s: float,
    sink_cpu_s: float,
    source_cpu_s: float,
    errors: int,
) -> P2Row:
    """A row from what was measured; the rates are derived here."""
    return P2Row(
        path=path,
        sessions=sessions,
        messages=messages,
        message_bytes=message_bytes,
        seconds=seconds,
        msgs_per_s=messages / seconds,
        mb_per_s=messages * message_bytes / seconds / 1e6,
        relay_cpu_s=relay_cpu_s,
        relay_cpu_s_per_1000=relay_cpu_s / messages * 1000,
        sink_cpu_s=sink_cpu_s,
        source_cpu_s=source_cpu_s,
        errors=errors,
    )


def _p2_total(parts: Sequence[P2Row]) -> P2Row:
    """One path's rounds as one run: messages, seconds, CPU and errors added up."""
    first = parts[0]
    return _p2_row(
        first.path,
        first.sessions,
        first.message_bytes,
        messages=sum(p.messages for p in parts),
        seconds=sum(p.seconds for p in parts),
        relay_cpu_s=sum(p.relay_cpu_s for p in parts),
        sink_cpu_s=sum(p.sink_cpu_s for p in parts),
        source_cpu_s=sum(p.source_cpu_s for p in parts),
        errors=sum(p.errors for p in parts),
    )


def p2_table(rows: Sequence[P2Row], round_rows: Sequence[P2Row] = ()) -> list[str]:
    rounds = sum(1 for r in round_rows if r.path == "haproxy" and r.message_bytes == 1024)
    out = [
        "## P2 — throughput into smtp-sink",
        "",
        "smtp-source, one message per session; relay CPU from /proc (all threads, and the "
        "workers of `proxy-2w`). HAProxy runs 2 threads, `proxy` one process, `proxy-2w` "
        "`server.workers = 2`, `proxy-trio-io` one process without the non-blocking fast "
        "paths (`PIPECONNECT_FASTIO=0`, as before). `epoll-floor` and `trio-floor` are byte "
        "relays with no SMTP decisions in them (bench/floors.py): plain Python on epoll, the "
        "same parsing both directions with the proxy's sans-I/O framing (`epoll-smtp-floor`), "
        "and the least any trio relay does (one task per direction). smtp-source, smtp-sink "
        f"and the relay share the 2 CPUs. Each run is split into {max(rounds, 1)} rounds, every "
        "round running every path in turn (the machine's speed drifts); the figures add the "
        "rounds up, *per round* is the range of the rounds' own ratios to HAProxy.",
        "",
        "| path | -s | messages | size | msgs/s | MB/s | relay CPU s / 1000 msgs "
        "| vs HAProxy | per round |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ha = next(
            (h for h in rows if h.path == "haproxy" and h.message_bytes == r.message_bytes), None
        )
        vs = f"{r.msgs_per_s / ha.msgs_per_s:.2f}x" if ha else "—"
        size = f"{r.message_bytes // 1024} KiB" if r.message_bytes < LARGE else "10 MiB"
        out.append(
            f"| {r.path} | {r.sessions} | {r.messages} | {size} | {r.msgs_per_s:.1f} "
            f"| {r.mb_per_s:.2f} | {r.relay_cpu_s_per_1000:.2f} | {vs} "
            f"| {_round_range(r, round_rows)} |"
        )
    return [*out, ""]


def _round_range(row: P2Row, round_rows: Sequence[P2Row]) -> str:
    """min to max over the rounds of this path's msgs/s against HAProxy's in the same round."""
    mine = [r for r in round_rows if r.path == row.path and r.message_bytes == row.message_bytes]
    ha = [r for r in round_rows if r.path == "haproxy" and r.message_bytes == row.message_bytes]
    ratios = [m.msgs_per_s / h.msgs_per_s for m, h in zip(mine, ha, strict=False)]
    if len(ratios) < 2:
        return "—"
    return f"{min(ratios):.2f}-{max(ratios):.2f}x"


async def _hold_sessions(port: int, n: int) -> list[trio.SocketStream]:
    """Open n connections and read each one's banner (a complete `220 ` line)."""
    streams: list[trio.SocketStream] = []
    limit = trio.Semaphore(200)

    async def one() -> None:
        async with limit:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            streams.append(stream)
            got = b""
            while not (got.startswith(b"220 ") or b"\r\n220 " in got) or not got.endswith(b"\r\n"):
                data = await stream.receive_some(4096)  # bounded by the caller's deadline
                if not data:
                    raise EOFError(f"connection {len(streams)} closed before the banner")
                got += data

    with trio.fail_after(60 + n / 50):
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
    return streams


async def _measure_rss(port: int, pid: int, n: int) -> tuple[int, int]:
    warm = await _hold_sessions(port, 10)  # first-use allocations are not per-session cost
    for s in warm:
        await trio.aclose_forcefully(s)
    await trio.sleep(0.5)
    before = rss_bytes(pid)
    streams = await _hold_sessions(port, n)
    await trio.sleep(1)
    after = rss_bytes(pid)
    for s in streams:
        await trio.aclose_forcefully(s)
    return before, after


def phase_p3(args: argparse.Namespace, workdir: Path, out: Path, write_csv: WriteCsv) -> list[str]:
    rows: list[P3Row] = []
    levels: list[int] = args.p3_sessions
    sink = SmtpSink(workdir / "p3-sink", max_sessions=20000).start()
    try:
        for n in levels:
            for relay in ("proxy", "haproxy"):
                if relay == "haproxy" and n > HAPROXY_MAXCONN - 100:
                    continue
                if relay == "proxy":
                    proc = bench_proxy(workdir / f"p3-proxy-{n}", sink.port, client_identity="none")
                    assert proc.proc is not None
                    port, pid, stop = proc.port, proc.proc.pid, proc.stop
                else:
                    ha = HAProxy(workdir / f"p3-haproxy-{n}", sink.port, send_proxy=False).start()
                    port, pid, stop = ha.port, ha.pid, ha.stop
                try:
                    before, after = trio.run(_measure_rss, port, pid, n)
                finally:
                    stop()
                row = P3Row(relay, n, before, after, (after - before) / n)
                rows.append(row)
                print(
                    f"  P3 {relay:8} {n:6} sessions: RSS {before / 2**20:.1f} -> "
                    f"{after / 2**20:.1f} MiB, {row.bytes_per_session / 1024:.1f} KiB/session",
                    flush=True,
                )
    finally:
        sink.stop()
    write_csv(out / "p3.csv", rows)
    return p3_table(rows)


def p3_table(rows: Sequence[P3Row]) -> list[str]:
    out = [
        "## P3 — memory per idle session",
        "",
        "Sessions held open after the banner, through a freshly started relay into smtp-sink; "
        "RSS of the relay process after 10 warm-up sessions and with N open.",
        "",
        "| relay | sessions | RSS before MiB | RSS with N MiB | KiB per session |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        out.append(
            f"| {r.relay} | {r.sessions} | {r.rss_before / 2**20:.1f} | {r.rss_after / 2**20:.1f} "
            f"| {r.bytes_per_session / 1024:.1f} |"
        )
    return [*out, ""]
