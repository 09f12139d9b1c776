"""Load: N concurrent client slots mixing good, slow and hostile clients for a bounded time
(issue 6, "Load"), through the proxy (`server.workers = 2`) into smtp-sink.

Every slot runs one kind of client in a loop until the deadline (the slots start over a
ramp of a few seconds, so all N are connected at once for most of the run):

- good (15 %): the project's client, one message per session, early pipelining once its
  generator process learned the EHLO reply; 1 s pause between sessions;
- slow (45 %): a legitimate client that waits 2 s before every command and 0.5 s between
  message lines (about 15 s per message);
- slowloris (25 %): reads the banner, then one byte per second of a line that never ends;
- flood (10 %): 1 MiB of junk before the banner, half from a host allowed early pipelining
  (held to 64 KiB, then backpressure), half from 127.0.0.2 (refused with 421);
- smuggle (5 %): a message ending in a bare-LF `\\n.\\n` with a second message hidden
  behind it: must be refused, and neither message may reach the sink.

The clients run in two generator processes (`python -m bench.mixed --gen`, half the slots
each). smtp-sink dumps every transaction to a file (`-d`); afterwards every Message-ID that got
a 250 from the proxy must be in a complete dump (the sink got the whole message), and no
smuggled Message-ID may be in one. The merged /metrics of the two workers is sampled every
second for the peak of concurrent sessions.

    python -m bench --only mixed [--mixed-sessions 10000 --mixed-seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import trio

from bench.hostile import Outcome, connect_seconds, flood, good, slow, slowloris, smuggle
from bench.latency import percentile
from bench.peers import SmtpSink, bench_proxy
from proxy.client import EarlyPipeliningClient
from tests.mta import free_port

__all__ = ["phase_mixed"]

WriteCsv = Callable[[Path, Sequence[Any]], None]
# Slow and slowloris clients stay connected: they make the bulk of the concurrent sessions.
MIX = (("good", 15), ("slow", 45), ("slowloris", 25), ("flood", 10), ("smuggle", 5))
SLOW_PAUSE = 2.0  # seconds before each command of a slow client (a message takes ~15 s)
GENERATORS = 2
FLOOD_BYTES = 1024 * 1024
SESSION_TIMEOUT = 120.0  # one client session, however slow
GRACE = 60.0  # after the deadline, sessions in progress get this long to finish
_MSGID = re.compile(rb"^Message-ID: <([^>]+)>", re.MULTILINE | re.IGNORECASE)


def _kinds(n: int) -> list[str]:
    """Slot kinds in MIX proportions, interleaved so every ramp step has each kind."""
    kinds = [kind for kind, weight in MIX for _ in range(round(n * weight / 100))]
    kinds = (kinds + ["good"] * n)[:n]
    random.Random(1).shuffle(kinds)
    return kinds


async def _generate(
    port: int, gen: int, kinds: list[str], seconds: float, ramp: float
) -> list[Outcome]:
    """One generator process: its slots, each looping its kind until the deadline."""
    results: list[Outcome] = []
    start = trio.current_time()
    deadline = start + seconds
    client = EarlyPipeliningClient(helo=f"gen{gen}.example")
    with trio.fail_after(60):
        await client.send(("127.0.0.1", port), "learn@example.org", ["box@dest.test"], b"x\r\n")

    def over() -> bool:
        return trio.current_time() >= deadline

    async def slot(i: int, kind: str) -> None:
        await trio.sleep(ramp * i / max(1, len(kinds)))
        seq = 0
        while not over():
            seq += 1
            mid = f"g{gen}-s{i}-{seq}@bench"
            with trio.move_on_after(SESSION_TIMEOUT) as scope:
                if kind == "good":
                    outcome = await good(client, port, mid)
                elif kind == "slow":
                    outcome = await slow(port, mid, SLOW_PAUSE)
                elif kind == "slowloris":
                    outcome = await slowloris(port, over)
                elif kind == "flood":
                    src = "127.0.0.1" if i % 2 else "127.0.0.2"
                    outcome = await flood(port, FLOOD_BYTES, src)
                else:
                    outcome = await smuggle(port, mid)
            if scope.cancelled_caught:
                outcome = Outcome(kind, "error:session-timeout", SESSION_TIMEOUT, mid)
            outcome.connect_seconds = connect_seconds()
            results.append(outcome)
            if kind != "slow":
                await trio.sleep(1)

    with trio.move_on_after(seconds + ramp + GRACE) as cut:
        async with trio.open_nursery() as nursery:
            for i, kind in enumerate(kinds):
                nursery.start_soon(slot, i, kind)
    if cut.cancelled_caught:
        results.append(Outcome("all", "cut-after-grace"))
    return results


def _dumped(dump_dir: Path) -> tuple[set[str], set[str]]:
    """Message-IDs in smtp-sink's dump files: (complete messages, any mention)."""
    complete: set[str] = set()
    seen: set[str] = set()
    for path in dump_dir.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        ids = {m.decode("ascii", "replace") for m in _MSGID.findall(data)}
        seen |= ids
        if data.endswith(b"\n\n"):  # the dump format ends every message with an empty line
            complete |= ids
    return complete, seen


def _active_sessions(metrics_port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("pipeconnect_active_sessions{")
    )


def phase_mixed(
    args: argparse.Namespace, workdir: Path, out: Path, write_csv: WriteCsv
) -> list[str]:
    n: int = args.mixed_sessions
    seconds: float = args.mixed_seconds
    ramp = min(20.0, max(1.0, n / 1000))
    # smtp-sink writes its dumps as user postfix: a directory it can reach and write.
    dump_dir = Path(tempfile.mkdtemp(prefix="pcp-mixed-dump-"))
    dump_dir.chmod(0o1777)
    sink = SmtpSink(
        workdir / "mixed-sink", max_sessions=n + 1000, options=("-d", f"{dump_dir}/%H%M/")
    ).start()
    metrics_port = free_port()
    proxy = bench_proxy(
        workdir / "mixed-proxy",
        sink.port,
        client_identity="none",
        max_sessions=n + 1000,
        workers=2,
        pipe_connect={"advertise_hosts": ["127.0.0.1"]},
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
        # The smuggle clients must be refused, which "reject" does; under the default
        # "normalize" their hidden message stays text inside the first (no smuggling
        # either, tests/unit/test_bare_newline.py), which this count would not tell apart.
        limits={"bare_newline": "reject"},
    )
    kinds = _kinds(n)
    files = [out / f"mixed-gen{g}.json" for g in range(GENERATORS)]
    gens: list[subprocess.Popen[bytes]] = []
    peak = 0.0
    scrape_failures = 0
    t0 = time.monotonic()
    try:
        for g in range(GENERATORS):
            cmd = [sys.executable, "-m", "bench.mixed", "--gen", str(g), "--port", str(proxy.port)]
            cmd += ["--kinds", ",".join(kinds[g::GENERATORS]), "--seconds", str(seconds)]
            cmd += ["--ramp", str(ramp), "--out", str(files[g])]
            gens.append(subprocess.Popen(cmd))
        limit = time.monotonic() + seconds + ramp + GRACE + 120
        while any(p.poll() is None for p in gens):
            if time.monotonic() > limit:
                raise TimeoutError("mixed: generators did not finish")
            active = _active_sessions(metrics_port)
            if active is None:
                scrape_failures += 1
            else:
                peak = max(peak, active)
            time.sleep(1)
        elapsed = time.monotonic() - t0
        failed = [p.returncode for p in gens if p.returncode != 0]
        if failed:
            raise RuntimeError(f"mixed: generator exit status {failed}")
    finally:
        for p in gens:
            if p.poll() is None:
                p.kill()
                p.wait()
        proxy.stop()
        sink.stop()
    try:
        complete, seen = _dumped(dump_dir)
    finally:
        shutil.rmtree(dump_dir, ignore_errors=True)
    outcomes = [Outcome(**o) for f in files for o in json.loads(f.read_text())]
    write_csv(out / "mixed.csv", outcomes)
    delivered = {o.message_id for o in outcomes if o.result == "delivered" and o.code == 250}
    missing = sorted(delivered - complete)
    smuggled_ids = {o.message_id for o in outcomes if o.kind == "smuggle"}
    leaked = sorted(
        i
        for i in smuggled_ids
        if i in complete or f"{i}.hidden" in seen or f"{i}.hidden" in complete
    )
    connects = [o.connect_seconds for o in outcomes if o.connect_seconds is not None]
    by_kind = Counter(o.kind for o in outcomes)
    results = Counter((o.kind, o.result) for o in outcomes)
    summary = {
        "slots": n,
        "seconds": seconds,
        "elapsed": elapsed,
        "peak_active_sessions": peak,
        "metrics_scrape_failures": scrape_failures,
        "connects": len(connects),
        "connect_p50_ms": percentile(connects, 50) * 1000,
        "connect_p99_ms": percentile(connects, 99) * 1000,
        "connect_max_ms": max(connects, default=0.0) * 1000,
        "connects_over_1s": sum(c > 1 for c in connects),
        "sessions": len(outcomes),
        "by_kind": dict(by_kind),
        "results": {f"{k}:{r}": c for (k, r), c in sorted(results.items())},
        "delivered_250": len(delivered),
        "in_sink_complete": len(delivered & complete),
        "missing_from_sink": missing[:20],
        "missing_count": len(missing),
        "smuggled_reaching_sink": leaked[:20],
        "sink_messages_total": len(complete),
    }
    (out / "mixed.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"  mixed: {n} slots {seconds:g}s, peak {peak:.0f} concurrent, {len(outcomes)} sessions, "
        f"{len(delivered)} delivered with 250, {len(missing)} missing from the sink, "
        f"{len(leaked)} smuggled in the sink",
        flush=True,
    )
    return _table(summary, results)


def _table(summary: dict[str, Any], results: Counter[tuple[str, str]]) -> list[str]:
    out = [
        "## Load — good, slow and hostile clients at once",
        "",
        f"{summary['slots']} client slots for {summary['seconds']:g} s (two generator "
        "processes; slots loop their kind until the deadline) through the proxy with "
        "`server.workers = 2` into smtp-sink (`-d`: every transaction dumped). "
        f"Peak concurrent sessions (merged `pipeconnect_active_sessions`): "
        f"{summary['peak_active_sessions']:.0f} ({summary['metrics_scrape_failures']} scrapes "
        f"failed); run took {summary['elapsed']:.0f} s. Raw client connects: "
        f"{summary['connects']}, connect() p50 {summary['connect_p50_ms']:.1f} ms, p99 "
        f"{summary['connect_p99_ms']:.1f} ms, max {summary['connect_max_ms']:.0f} ms, "
        f"{summary['connects_over_1s']} over 1 s (a SYN retransmitted: listen backlog full).",
        "",
        "| kind | result | sessions |",
        "| --- | --- | ---: |",
    ]
    for (kind, result), count in sorted(results.items()):
        out.append(f"| {kind} | {result} | {count} |")
    out += [
        "",
        f"Messages answered 250 by the proxy: {summary['delivered_250']}; found complete in the "
        f"sink: {summary['in_sink_complete']}; missing: {summary['missing_count']}. Smuggled "
        f"messages in the sink: {len(summary['smuggled_reaching_sink'])}.",
        "",
    ]
    return out


def main() -> None:
    """A generator process (started by phase_mixed)."""
    ap = argparse.ArgumentParser(prog="python -m bench.mixed")
    ap.add_argument("--gen", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--kinds", required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--ramp", type=float, default=10)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    results = trio.run(_generate, args.port, args.gen, kinds, args.seconds, args.ramp)
    args.out.write_text(json.dumps([asdict(o) for o in results]))
    os._exit(0)  # 5,000 sockets are already closed; skip slow interpreter teardown


if __name__ == "__main__":
    main()
