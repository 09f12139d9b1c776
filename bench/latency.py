"""P1 (latency vs RTT) and P4 (overhead at RTT 0).

P1: every session goes through a `DelayRelay` in front of the path under test, and the relay
times it: from the client's connect to the moment the server's reply to the end of the message
data reaches the client ("connect to final 250"). Two clients: the project's
`EarlyPipeliningClient` and a real Exim 4.96 (`hosts_pipe_connect = *`). Each learns the path's
EHLO reply in one unmeasured session first, as a real sender's hints database would have.

P4: no relay; the project's client times whole sessions (connect to the reply to QUIT) against
each path at RTT 0; the proxy's cost is its path minus the direct path.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from bench.delay import ConnRecord, DelayRelay
from proxy.client import EarlyPipeliningClient
from tests.mta import EximClient, deliveries

SENDER = "bench@example.org"
RCPT = "box@dest.test"
BODY = b"Subject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * 13  # about 1 KiB
EXIM_TIMEOUT = 60.0
SESSION_TIMEOUT = 60.0

__all__ = ["P1Row", "P4Row", "percentile", "run_p1", "run_p4"]


@dataclass(frozen=True)
class P1Row:
    rtt_ms: float
    client: str  # "own" | "exim"
    path: str
    session: int
    early: bool  # the client used early pipelining (own: Delivery.early; exim: L* in its log)
    seconds: float  # connect -> final reply at the client (measured by the relay)
    banner_seconds: float
    final_code: str


@dataclass(frozen=True)
class P4Row:
    path: str
    session: int
    early: bool
    seconds: float  # connect -> reply to QUIT, at the client
    turns: int


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def _row(rtt: float, client: str, path: str, i: int, early: bool, rec: ConnRecord) -> P1Row:
    return P1Row(
        rtt_ms=round(rtt * 1000, 3),
        client=client,
        path=path,
        session=i,
        early=early,
        seconds=rec.to_final if rec.to_final is not None else float("nan"),
        banner_seconds=rec.to_banner if rec.to_banner is not None else float("nan"),
        final_code=rec.final_code.decode("ascii", "replace"),
    )


async def _own_sessions(
    relay: DelayRelay, rtt: float, path: str, sessions: int, rows: list[P1Row]
) -> None:
    client = EarlyPipeliningClient(helo="bench.example.org")
    server = ("127.0.0.1", relay.listen_port)
    with trio.fail_after(SESSION_TIMEOUT):
        await client.send(server, SENDER, [RCPT], BODY)  # learn the EHLO reply
    for i in range(sessions):
        before = len(relay.records)
        with trio.fail_after(SESSION_TIMEOUT):
            delivery = await client.send(server, SENDER, [RCPT], BODY)
        if len(relay.records) != before + 1:
            raise RuntimeError(f"{path}: expected one relayed connection per session")
        rows.append(_row(rtt, "own", path, i, delivery.early, relay.records[-1]))


async def _exim_sessions(
    relay: DelayRelay, rtt: float, path: str, sessions: int, workdir: Path, rows: list[P1Row]
) -> None:
    # A fresh hints database per path and RTT: Exim keys its EHLO cache by server address.
    exim = EximClient(
        workdir / f"exim-{path}-{round(rtt * 1000)}ms",
        relay.listen_port,
        extra_transport="connection_max_messages = 1\nhosts_try_chunking = :",
    )

    def send() -> str:
        return exim.send(SENDER, RCPT, BODY.replace(b"\r\n", b"\n"), timeout=EXIM_TIMEOUT)

    await trio.to_thread.run_sync(send)  # learn the EHLO reply
    for i in range(sessions):
        before = len(relay.records)
        log = await trio.to_thread.run_sync(send)
        found = deliveries(log)
        if not found or len(relay.records) != before + 1:
            raise RuntimeError(f"{path}: exim did not deliver through the relay once:\n{log}")
        rows.append(_row(rtt, "exim", path, i, found[-1].early_pipelined, relay.records[-1]))


async def run_p1(
    paths: Mapping[str, int],
    rtts: Sequence[float],
    sessions: int,
    workdir: Path,
    clients: Sequence[str] = ("own", "exim"),
) -> list[P1Row]:
    """Sessions per (RTT, client, path); `paths` maps a path name to its loopback port."""
    rows: list[P1Row] = []
    for rtt in rtts:
        for path, port in paths.items():
            relay = DelayRelay(upstream=("127.0.0.1", port), rtt=rtt)
            async with trio.open_nursery() as nursery:
                await nursery.start(relay.serve)
                if "own" in clients:
                    await _own_sessions(relay, rtt, path, sessions, rows)
                if "exim" in clients:
                    await _exim_sessions(relay, rtt, path, sessions, workdir, rows)
                nursery.cancel_scope.cancel()
            for client in clients:
                mine = [
                    r
                    for r in rows
                    if r.rtt_ms == round(rtt * 1000, 3) and r.path == path and r.client == client
                ]
                median = statistics.median(r.seconds * 1000 for r in mine)
                early = sum(r.early for r in mine)
                print(
                    f"  P1 rtt={rtt * 1000:g}ms {client:4} {path:16} "
                    f"median {median:8.2f} ms  early {early}/{len(mine)}",
                    flush=True,
                )
    return rows


async def run_p4(paths: Mapping[str, int], sessions: int) -> list[P4Row]:
    """`paths` names ending in ":early" use a client that learned the keyword first; the
    others a fresh client per session (no cached EHLO reply: no early pipelining). The paths
    take turns session by session, so that load from elsewhere on the machine hits all alike."""
    rows: list[P4Row] = []
    learned: dict[str, EarlyPipeliningClient] = {}
    for name, port in paths.items():
        learned[name] = EarlyPipeliningClient(helo="bench.example.org")
        if name.endswith(":early"):
            with trio.fail_after(SESSION_TIMEOUT):
                await learned[name].send(("127.0.0.1", port), SENDER, [RCPT], BODY)
    for i in range(sessions):
        for name, port in paths.items():
            early = name.endswith(":early")
            client = learned[name] if early else EarlyPipeliningClient(helo="bench.example.org")
            with trio.fail_after(SESSION_TIMEOUT):
                d = await client.send(("127.0.0.1", port), SENDER, [RCPT], BODY)
            rows.append(P4Row(name, i, d.early, d.seconds, d.turns))
    for name in paths:
        got = [r.seconds * 1000 for r in rows if r.path == name]
        print(
            f"  P4 {name:28} p50 {percentile(got, 50):.3f} ms  p99 {percentile(got, 99):.3f} ms",
            flush=True,
        )
    return rows
