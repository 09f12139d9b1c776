"""`python -m bench`: the benchmarks of issue 3, side by side in one run.

Starts on loopback: Postfix 3.7 with the PROXY protocol (behind HAProxy and the proxy), a plain
Postfix (direct), native Exim 4.96 with `pipelining_connect_advertise_hosts = *`, HAProxy
(`send-proxy-v2`), the proxy (`python -m proxy serve`), and for the load tests smtp-sink.
Writes raw CSVs and `summary.md` to `--out` (default bench/results/), plus PNG plots when
matplotlib is importable. Needs root and `.ci/install` + `apt-get install haproxy`.

    python -m bench                 # everything (P1 at 0/10/50/100 ms, P4, P2, P3, P5, ...)
    python -m bench --quick         # CI: P1 at one RTT, a few sessions
    python -m bench --only p5       # real Postfix behind each relay (bench/postfix_load.py)
    python -m bench --only p1 --rtts 50 --sessions 30
    python -m bench --only attack,mixed   # issue 6: good sessions under attack; 10k-slot load
    python -m bench --only p6       # issue 13: outbound mode, real Postfix -> proxy -> Exim
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import trio

from bench import report
from bench.delay import calibrate
from bench.latency import run_p1, run_p4
from bench.peers import Floor, HAProxy, bench_proxy, missing_peers, raise_nofile
from tests.mta import EximServer, Postfix, free_port, missing_software

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
PHASES = ("p1", "p4", "p2", "p3", "p5", "attack", "mixed", "p6")


def write_csv(path: Path, rows: Sequence[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        if not rows:
            return
        first = rows[0]
        names = (
            [f.name for f in dataclasses.fields(first)] if dataclasses.is_dataclass(first) else []
        )
        writer = csv.DictWriter(f, fieldnames=names or list(first))
        writer.writeheader()
        for row in rows:
            writer.writerow(dataclasses.asdict(row) if dataclasses.is_dataclass(row) else row)


@contextlib.contextmanager
def latency_setup(workdir: Path, trio_io: bool = False) -> Iterator[dict[str, int]]:
    """The four P1 paths, started; yields {path name: loopback port}. ``trio_io``: also
    `proxy-trio-io-postfix`, the proxy without its non-blocking fast paths (P4 before/after),
    and the two byte relays without SMTP of bench/floors.py in front of the direct Postfix."""
    with contextlib.ExitStack() as stack:
        pf_proxied = Postfix(workdir / "postfix-pp", free_port(), proxy_protocol=True)
        stack.callback(pf_proxied.stop)
        pf_proxied.start()
        pf_direct = Postfix(workdir / "postfix-direct", free_port(), proxy_protocol=False)
        stack.callback(pf_direct.stop)
        pf_direct.start()
        exim = EximServer(workdir / "exim-native", free_port(), pipe_connect_advertise=True)
        stack.callback(exim.stop)
        exim.start()
        haproxy = HAProxy(workdir / "haproxy", pf_proxied.port, send_proxy=True)
        stack.callback(haproxy.stop)
        haproxy.start()
        proxy = bench_proxy(workdir / "proxy", pf_proxied.port, client_identity="proxy-v2")
        stack.callback(proxy.stop)
        paths = {
            "postfix-direct": pf_direct.port,
            "haproxy-postfix": haproxy.port,
            "proxy-postfix": proxy.port,
            "exim-native": exim.port,
        }
        if trio_io:
            slow = bench_proxy(
                workdir / "proxy-trio-io", pf_proxied.port, client_identity="proxy-v2", fastio=False
            )
            stack.callback(slow.stop)
            paths["proxy-trio-io-postfix"] = slow.port
            # byte relays without SMTP (bench/floors.py) into the Postfix without PROXY
            for kind in ("epoll", "epoll-smtp", "trio"):
                floor = Floor(kind, pf_direct.port).start()
                stack.callback(floor.stop)
                paths[f"{kind}-floor-postfix"] = floor.port
        yield paths


def phase_p1(args: argparse.Namespace, workdir: Path, out: Path, summary: list[str]) -> None:
    rtts = [float(r) / 1000 for r in args.rtts]
    calibrations = []
    for rtt in rtts:
        if rtt > 0:
            calibrations.append(trio.run(calibrate, rtt, 10))
    write_csv(
        out / "calibration.csv",
        [
            {
                "rtt_ms": c.rtt * 1000,
                "echo_ms": c.echo * 1000,
                "echo_direct_ms": c.echo_direct * 1000,
                "echo_error_pct": c.echo_error * 100,
                "banner_ms": c.banner * 1000,
                "banner_direct_ms": c.banner_direct * 1000,
                "banner_error_pct": c.banner_error * 100,
            }
            for c in calibrations
        ],
    )
    with latency_setup(workdir) as paths:
        rows = trio.run(run_p1, paths, rtts, args.sessions, workdir, tuple(args.clients))
    write_csv(out / "p1.csv", rows)
    summary += report.calibration_table(calibrations)
    summary += report.p1_tables(rows)
    report.p1_plots(rows, out)


def phase_p4(args: argparse.Namespace, workdir: Path, out: Path, summary: list[str]) -> None:
    with latency_setup(workdir, trio_io=True) as paths:
        p4_paths = {
            "postfix-direct": paths["postfix-direct"],
            "haproxy-postfix": paths["haproxy-postfix"],
            "proxy-postfix": paths["proxy-postfix"],
            "proxy-postfix:early": paths["proxy-postfix"],
            "proxy-trio-io-postfix": paths["proxy-trio-io-postfix"],
            "proxy-trio-io-postfix:early": paths["proxy-trio-io-postfix"],
            "epoll-floor-postfix": paths["epoll-floor-postfix"],
            "epoll-smtp-floor-postfix": paths["epoll-smtp-floor-postfix"],
            "trio-floor-postfix": paths["trio-floor-postfix"],
        }
        rows = trio.run(run_p4, p4_paths, args.p4_sessions)
    write_csv(out / "p4.csv", rows)
    summary += report.p4_table(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI: P1 only, one RTT, few sessions")
    ap.add_argument("--only", default=",".join(PHASES), help="comma list of " + ",".join(PHASES))
    ap.add_argument("--rtts", nargs="+", default=["0", "10", "50", "100"], help="P1 RTTs, ms")
    ap.add_argument("--sessions", type=int, default=20, help="P1 sessions per point (>= 20)")
    ap.add_argument("--clients", nargs="+", default=["own", "exim"], choices=["own", "exim"])
    ap.add_argument("--p4-sessions", type=int, default=500)
    ap.add_argument("--p2-messages", type=int, default=10000)
    ap.add_argument("--p2-rounds", type=int, default=5, help="P2: paths take turns this often")
    ap.add_argument("--p3-sessions", nargs="+", type=int, default=[1000, 5000, 9900])
    ap.add_argument("--p5-messages", type=int, default=3000, help="P5: per path and round")
    ap.add_argument("--p5-rounds", type=int, default=5, help="P5: every path once per round")
    ap.add_argument("--attack-sessions", type=int, default=200, help="good sessions per phase")
    ap.add_argument("--slowloris", type=int, default=500, help="attack: slowloris connections")
    ap.add_argument("--flooders", type=int, default=20, help="attack: pre-banner flood loops")
    ap.add_argument("--mixed-sessions", type=int, default=10000, help="mixed: concurrent slots")
    ap.add_argument("--mixed-seconds", type=float, default=60, help="mixed: duration")
    ap.add_argument("--p6-rtts", nargs="+", default=["10", "50", "100"], help="P6 RTTs, ms")
    ap.add_argument("--p6-messages", type=int, default=20, help="P6: per RTT, TLS and path")
    ap.add_argument(
        "--p6-tls", nargs="+", default=["cleartext", "starttls"], choices=["cleartext", "starttls"]
    )
    ap.add_argument(
        "--p6-paths",
        nargs="+",
        default=["direct", "direct-noquit", "proxy", "proxy-tfo"],
        choices=["direct", "direct-noquit", "proxy", "proxy-tfo"],
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--workdir", type=Path, help="for MTA spools and logs (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.quick:
        args.only = "p1" if args.only == ",".join(PHASES) else args.only
        args.rtts, args.sessions = ["10"], min(args.sessions, 3)
        args.p4_sessions, args.p2_messages, args.p3_sessions = 20, 500, [200]
        args.p5_messages, args.p5_rounds = 200, 1
        args.attack_sessions, args.slowloris, args.flooders = 10, 20, 2
        args.mixed_sessions, args.mixed_seconds = 60, 8
        args.p6_rtts, args.p6_messages = ["10"], min(args.p6_messages, 2)
    phases = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        ap.error(f"--only: unknown phase(s) {', '.join(sorted(unknown))}")
    missing = missing_software() + missing_peers()
    if missing:
        print(f"bench: missing {', '.join(missing)} (bash .ci/install; apt-get install haproxy)")
        return 2
    raise_nofile()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    summary = [
        "# Benchmark results",
        "",
        f"`python -m bench {' '.join(argv if argv is not None else sys.argv[1:])}` — "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs",
        "",
    ]
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pcp-bench-")))
        else:
            workdir = args.workdir.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        for phase in phases:
            print(f"== {phase}", flush=True)
            t0 = time.monotonic()
            if phase == "p1":
                phase_p1(args, workdir, out, summary)
            elif phase == "p4":
                phase_p4(args, workdir, out, summary)
            elif phase == "p2":
                from bench.load import phase_p2

                summary += phase_p2(args, workdir, out, write_csv)
            elif phase == "p3":
                from bench.load import phase_p3

                summary += phase_p3(args, workdir, out, write_csv)
            elif phase == "p5":
                from bench.postfix_load import phase_p5

                summary += phase_p5(args, workdir, out, write_csv)
            elif phase == "attack":
                from bench.attack import phase_attack

                summary += phase_attack(args, workdir, out, write_csv)
            elif phase == "mixed":
                from bench.mixed import phase_mixed

                summary += phase_mixed(args, workdir, out, write_csv)
            elif phase == "p6":
                from bench.outbound import phase_p6

                summary += phase_p6(args, workdir, out, write_csv)
            print(f"== {phase} done in {time.monotonic() - t0:.1f}s", flush=True)
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
