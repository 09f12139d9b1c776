"""P5: throughput into a real Postfix 3.7, each relay in front of the same instance.

One Postfix (tests/mta.py's, `virtual_transport = discard:` so nothing is stored, and
`smtpd_forbid_unauth_pipelining = yes` as everywhere) with two smtpd services: the plain one
(`direct`) and one with `smtpd_upstream_proxy_protocol = haproxy` that the relays use:
HAProxy (`send-proxy-v2`, 2 threads), the proxy (`proxy-v2`; one process and
`server.workers = 2`) and the trio floor of bench/floors.py (`trio-v2`: it sends the same
PROXY v2 header). One instance, so every path shares one queue manager, cleanup and disk.

Load: `smtp-source -s 20 -m N -l 1024` (one message per session) toward each path, in rounds;
every round runs every path, the order rotated by one each round, and Postfix's queue is
empty before each run. Figures: median msgs/s per path over the rounds, its ratio to
direct's median, and the range of the rounds' own ratios; CPU per 1000 messages of the relay
process (all threads and workers) and of Postfix (every process under its master).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.load import _smtp_source, tree_cpu_seconds
from bench.peers import CLK_TCK, Floor, HAProxy, bench_proxy, wait_listening
from tests.mta import _MASTER_CF, Postfix, _backdate, _descendants, _replace_file, free_port

__all__ = ["PATHS", "DiscardingPostfix", "P5Row", "phase_p5"]

WriteCsv = Callable[[Path, Sequence[Any]], None]
PATHS = ("direct", "haproxy", "trio-floor", "proxy", "proxy-2w")
SESSIONS = 20
LENGTH = 1024
WARMUP = 40  # messages per path before the first round (spawns smtpd processes)


@dataclass(frozen=True)
class P5Row:
    round: int
    order: int  # position of the path in this round
    path: str
    sessions: int
    messages: int
    message_bytes: int
    seconds: float
    msgs_per_s: float
    relay_cpu_s: float
    relay_cpu_s_per_1000: float
    postfix_cpu_s: float
    postfix_cpu_s_per_1000: float
    source_cpu_s: float
    errors: int


class DiscardingPostfix(Postfix):
    """tests/mta.py's Postfix, discarding every message, plus a second smtpd on
    `proxy_port` that reads a PROXY header (the plain one on `port` reads none)."""

    def __init__(self, tmpdir: Path, port: int, proxy_port: int) -> None:
        super().__init__(
            tmpdir, port, proxy_protocol=False, extra={"virtual_transport": "discard:"}
        )
        self.proxy_port = proxy_port

    def write_config(self) -> None:
        super().write_config()
        master = _MASTER_CF.format(port=self.port) + (
            f"127.0.0.1:{self.proxy_port} inet n - n - - smtpd\n"
            "  -o smtpd_upstream_proxy_protocol=haproxy\n"
        )
        _replace_file(self.config_dir / "master.cf", master)
        _backdate(self.config_dir / "master.cf")

    def start(self, timeout: float = 20) -> DiscardingPostfix:
        super().start(timeout)
        wait_listening(self.proxy_port, None, f"{self!r} (PROXY smtpd)", timeout)
        return self

    def queued(self) -> int:
        """Messages still in the queue (incoming, active, deferred, maildrop)."""
        dirs = ("incoming", "active", "deferred", "maildrop")
        return sum(1 for d in dirs for p in (self.queue_dir / d).rglob("*") if p.is_file())

    def wait_empty(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while (n := self.queued()) > 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self!r}: {n} messages still queued after {timeout}s")
            time.sleep(0.05)

    def discarded(self) -> int:
        """Messages the discard agent has logged as delivered."""
        return sum(
            1
            for line in self.maillog().splitlines()
            if "/discard[" in line and "status=sent" in line
        )

    def cpu_seconds(self) -> float:
        """CPU seconds of every Postfix process: the master with its reaped children, and
        the live ones under it with theirs."""
        pid = self.master_pid()
        if pid is None:
            return 0.0
        total = 0.0
        for p in [pid, *_descendants(pid)]:
            try:
                fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue  # exited meanwhile: its CPU moves to its parent's reaped share
            total += sum(int(f) for f in fields[11:15])
        return total / CLK_TCK


def _run(
    postfix: DiscardingPostfix, port: int, pid: int | None, messages: int
) -> tuple[float, float, float, float, int]:
    """One smtp-source run from an empty queue: (seconds, relay CPU, Postfix CPU, source CPU,
    error lines). Postfix's CPU includes delivering (discarding) what this run queued."""
    postfix.wait_empty()
    relay0 = tree_cpu_seconds(pid) if pid else 0.0
    mta0 = postfix.cpu_seconds()
    seconds, source_cpu, errors = _smtp_source(port, SESSIONS, messages, LENGTH)
    relay_cpu = tree_cpu_seconds(pid) - relay0 if pid else 0.0
    postfix.wait_empty()
    return seconds, relay_cpu, postfix.cpu_seconds() - mta0, source_cpu, errors


def phase_p5(args: argparse.Namespace, workdir: Path, out: Path, write_csv: WriteCsv) -> list[str]:
    from bench.report import p5_table

    messages: int = args.p5_messages
    rounds = max(1, args.p5_rounds)
    rows: list[P5Row] = []
    postfix = DiscardingPostfix(workdir / "p5-postfix", free_port(), free_port())
    started: list[Callable[[], None]] = [postfix.stop]
    try:
        postfix.start()
        haproxy = HAProxy(workdir / "p5-haproxy", postfix.proxy_port, send_proxy=True).start()
        started.append(haproxy.stop)
        floor = Floor("trio-v2", postfix.proxy_port).start()
        started.append(floor.stop)
        proxy = bench_proxy(workdir / "p5-proxy", postfix.proxy_port, client_identity="proxy-v2")
        started.append(proxy.stop)
        proxy2 = bench_proxy(
            workdir / "p5-proxy2", postfix.proxy_port, client_identity="proxy-v2", workers=2
        )
        started.append(proxy2.stop)
        assert proxy.proc is not None and proxy2.proc is not None
        ports: dict[str, tuple[int, int | None]] = {
            "direct": (postfix.port, None),
            "haproxy": (haproxy.port, haproxy.pid),
            "trio-floor": (floor.port, floor.pid),
            "proxy": (proxy.port, proxy.proc.pid),
            "proxy-2w": (proxy2.port, proxy2.proc.pid),
        }
        warmup_errors = 0
        for name in PATHS:  # unmeasured: smtpd processes spawned, every path proven to work
            warmup_errors += _run(postfix, ports[name][0], None, WARMUP)[4]
        for rnd in range(rounds):
            order = PATHS[rnd % len(PATHS) :] + PATHS[: rnd % len(PATHS)]
            for pos, name in enumerate(order):
                port, pid = ports[name]
                seconds, relay_cpu, mta_cpu, source_cpu, errors = _run(postfix, port, pid, messages)
                row = P5Row(
                    round=rnd,
                    order=pos,
                    path=name,
                    sessions=SESSIONS,
                    messages=messages,
                    message_bytes=LENGTH,
                    seconds=seconds,
                    msgs_per_s=messages / seconds,
                    relay_cpu_s=relay_cpu,
                    relay_cpu_s_per_1000=relay_cpu / messages * 1000,
                    postfix_cpu_s=mta_cpu,
                    postfix_cpu_s_per_1000=mta_cpu / messages * 1000,
                    source_cpu_s=source_cpu,
                    errors=errors,
                )
                rows.append(row)
                print(
                    f"  P5 round {rnd + 1}/{rounds} {name:10} {row.msgs_per_s:8.1f} msgs/s "
                    f"relay CPU {row.relay_cpu_s_per_1000:.2f} s/1000 Postfix CPU "
                    f"{row.postfix_cpu_s_per_1000:.2f} s/1000 errors {errors}",
                    flush=True,
                )
        sent = WARMUP * len(PATHS) + messages * len(rows)
        deadline = time.monotonic() + 10  # the log is written by postlogd, a little later
        while (discarded := postfix.discarded()) < sent and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for stop in reversed(started):
            stop()
    write_csv(out / "p5-rounds.csv", rows)
    medians = p5_medians(rows)
    write_csv(out / "p5.csv", medians)
    (out / "p5.json").write_text(
        json.dumps(
            {
                "rounds": rounds,
                "messages_per_run": messages,
                "sessions": SESSIONS,
                "message_bytes": LENGTH,
                "sent": sent,
                "postfix_discarded": discarded,
                "warmup_errors": warmup_errors,
                "paths": medians,
            },
            indent=2,
        )
        + "\n"
    )
    return p5_table(rows, medians)


def p5_medians(rows: Sequence[P5Row]) -> list[dict[str, Any]]:
    """Per path: median msgs/s and CPU over the rounds, the ratio of the medians to direct's,
    and the range of the rounds' own ratios to direct (same round)."""
    direct = {r.round: r.msgs_per_s for r in rows if r.path == "direct"}
    direct_median = statistics.median(direct.values()) if direct else None
    out: list[dict[str, Any]] = []
    for name in PATHS:
        mine = [r for r in rows if r.path == name]
        if not mine:
            continue
        rate = statistics.median(r.msgs_per_s for r in mine)
        ratios = [r.msgs_per_s / direct[r.round] for r in mine if r.round in direct]
        out.append(
            {
                "path": name,
                "rounds": len(mine),
                "messages": sum(r.messages for r in mine),
                "msgs_per_s": round(rate, 1),
                "vs_direct": round(rate / direct_median, 3) if direct_median else None,
                "round_ratio_min": round(min(ratios), 3) if ratios else None,
                "round_ratio_max": round(max(ratios), 3) if ratios else None,
                "relay_cpu_s_per_1000": round(
                    statistics.median(r.relay_cpu_s_per_1000 for r in mine), 3
                ),
                "postfix_cpu_s_per_1000": round(
                    statistics.median(r.postfix_cpu_s_per_1000 for r in mine), 3
                ),
                "errors": sum(r.errors for r in mine),
            }
        )
    return out
