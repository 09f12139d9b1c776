"""Attack: good sessions' delivery time alone vs while slowloris clients and pre-banner
flooders hammer the same proxy (issue 6, "Limits").

Setup: smtp-sink behind the proxy (one process, `client_identity = "none"`,
`advertise_hosts = ["127.0.0.1"]`). Good sessions: the project's client, one after the other
(early pipelining once it learned the EHLO reply), from 127.0.0.1, timed connect → reply to
QUIT. Attackers run in a separate process (their CPU load is part of the attack, but they
do not share an event loop with the timed client):

- slowloris: N connections that read the banner and then send one byte per second of a
  command line that never ends (held until the end: the command timeout is 5 minutes);
- flooders: M loops that connect and send megabytes before the banner, half from
  127.0.0.1 (allowed early pipelining: the proxy holds 64 KiB, then stops reading), half
  from 127.0.0.2 (not allowed: 421 and a short drain), again and again.

Phases: `alone` (before), `attack`, `after` (attackers gone). The ratio attack/alone of
p50 and p99 is printed, written to `attack.json`, and per-session times to `attack.csv`.

    python -m bench --only attack [--attack-sessions 200 --slowloris 500 --flooders 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bench.hostile import Outcome, flood, slowloris
from bench.latency import BODY, RCPT, SENDER, percentile
from bench.peers import SmtpSink, bench_proxy
from proxy.client import EarlyPipeliningClient

__all__ = ["AttackRow", "phase_attack"]

WriteCsv = Callable[[Path, Sequence[Any]], None]
FLOOD_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class AttackRow:
    phase: str  # alone | attack | after
    session: int
    seconds: float
    early: bool
    final_code: int


async def _good_sessions(port: int, n: int, phase: str) -> list[AttackRow]:
    client = EarlyPipeliningClient(helo="good.example")
    server = ("127.0.0.1", port)
    with trio.fail_after(60):
        await client.send(server, SENDER, [RCPT], BODY)  # learn the EHLO reply
    rows = []
    for i in range(n):
        with trio.fail_after(60):
            d = await client.send(server, SENDER, [RCPT], BODY)
        rows.append(AttackRow(phase, i, d.seconds, d.early, d.final.code))
    return rows


async def _attack(port: int, slow: int, flooders: int) -> dict[str, Any]:
    """The attacker process: prints `ready` once the slowloris connections are up, attacks
    until its stdin is closed, then returns what it saw."""
    stopped = trio.Event()
    results: list[Outcome] = []

    async def loris() -> None:
        results.append(await slowloris(port, stopped.is_set))

    async def flooder(i: int) -> None:
        source = "127.0.0.1" if i % 2 == 0 else "127.0.0.2"
        while not stopped.is_set():
            results.append(await flood(port, FLOOD_BYTES, source))
            await trio.sleep(0.05)

    async def watch_stdin(scope: trio.CancelScope) -> None:
        stdin = trio.lowlevel.FdStream(0)
        while await stdin.receive_some(1024):
            pass
        stopped.set()
        await trio.sleep(1.5)  # slowloris loops notice within a second and report
        scope.cancel()  # floods in progress are not counted

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_stdin, nursery.cancel_scope)
        for _ in range(slow):
            nursery.start_soon(loris)
            await trio.sleep(0.002)  # a ramp, not a SYN flood
        await trio.sleep(1)
        print("ready", flush=True)
        for i in range(flooders):
            nursery.start_soon(flooder, i)
    counts = Counter(f"{o.kind}:{o.result}" for o in results)
    return dict(sorted(counts.items()))


def _table(rows: Sequence[AttackRow], attackers: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    stats = _stats(rows)
    out = [
        "## Attack — good sessions under slowloris and pre-banner floods",
        "",
        f"{cfg['slowloris']} slowloris connections (1 byte/s after the banner) and "
        f"{cfg['flooders']} flooders ({FLOOD_BYTES // 2**20} MiB before the banner, again and "
        "again; half from a host allowed early pipelining, half refused) against one proxy "
        "process into smtp-sink. Good sessions: project client, sequential, connect → reply "
        "to QUIT; the attackers run in their own process on the same 2 CPUs.",
        "",
        "| phase | sessions | early | p50 ms | p99 ms | p50 vs alone | p99 vs alone |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    alone = stats["alone"]
    for phase, st in stats.items():
        out.append(
            f"| {phase} | {st['n']} | {st['early']} | {st['p50_ms']:.3f} | {st['p99_ms']:.3f} "
            f"| {st['p50_ms'] / alone['p50_ms']:.2f}x | {st['p99_ms'] / alone['p99_ms']:.2f}x |"
        )
    out += ["", "Attacker outcomes: " + ", ".join(f"{k} {v}" for k, v in attackers.items()), ""]
    return out


def _stats(rows: Sequence[AttackRow]) -> dict[str, dict[str, float]]:
    stats: dict[str, dict[str, float]] = {}
    for phase in ("alone", "attack", "after"):
        ms = [r.seconds * 1000 for r in rows if r.phase == phase]
        if ms:
            early = sum(r.early for r in rows if r.phase == phase)
            stats[phase] = {
                "n": len(ms),
                "early": early,
                "p50_ms": percentile(ms, 50),
                "p99_ms": percentile(ms, 99),
            }
    return stats


def phase_attack(
    args: argparse.Namespace, workdir: Path, out: Path, write_csv: WriteCsv
) -> list[str]:
    n: int = args.attack_sessions
    cfg = {"slowloris": args.slowloris, "flooders": args.flooders}
    sink = SmtpSink(workdir / "attack-sink", max_sessions=4 * args.slowloris + 1000).start()
    proxy = bench_proxy(
        workdir / "attack-proxy",
        sink.port,
        client_identity="none",
        pipe_connect={"advertise_hosts": ["127.0.0.1"]},
    )
    attacker: subprocess.Popen[str] | None = None
    try:
        rows = trio.run(_good_sessions, proxy.port, n, "alone")
        cmd = [sys.executable, "-m", "bench.attack", "--port", str(proxy.port)]
        cmd += ["--slowloris", str(args.slowloris), "--flooders", str(args.flooders)]
        attacker = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert attacker.stdin is not None and attacker.stdout is not None
        line = attacker.stdout.readline()  # "ready" (bounded by the attacker's own ramp)
        if line.strip() != "ready":
            raise RuntimeError(f"attacker did not start: {line!r}")
        time.sleep(1)  # the flooders get going
        rows += trio.run(_good_sessions, proxy.port, n, "attack")
        attacker.stdin.close()  # stop: it reports what it saw and exits
        report = attacker.stdout.read()
        attacker.wait(timeout=60)
        attackers = json.loads(report.strip().splitlines()[-1])
        time.sleep(2)  # refused flooders drain, slowloris sockets close
        rows += trio.run(_good_sessions, proxy.port, n, "after")
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
            attacker.wait()
        proxy.stop()
        sink.stop()
    write_csv(out / "attack.csv", rows)
    stats = _stats(rows)
    summary = {
        **cfg,
        "flood_bytes": FLOOD_BYTES,
        "phases": stats,
        "p50_ratio": stats["attack"]["p50_ms"] / stats["alone"]["p50_ms"],
        "p99_ratio": stats["attack"]["p99_ms"] / stats["alone"]["p99_ms"],
        "attackers": attackers,
    }
    (out / "attack.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"  attack: p50 {stats['alone']['p50_ms']:.3f} -> {stats['attack']['p50_ms']:.3f} ms "
        f"({summary['p50_ratio']:.2f}x), p99 {stats['alone']['p99_ms']:.3f} -> "
        f"{stats['attack']['p99_ms']:.3f} ms ({summary['p99_ratio']:.2f}x); {attackers}",
        flush=True,
    )
    return _table(rows, attackers, cfg)


def main() -> None:
    """The attacker process (started by phase_attack); stops when its stdin closes."""
    ap = argparse.ArgumentParser(prog="python -m bench.attack")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--slowloris", type=int, default=500)
    ap.add_argument("--flooders", type=int, default=20)
    args = ap.parse_args()
    counts = trio.run(_attack, args.port, args.slowloris, args.flooders)
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
