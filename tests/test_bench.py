"""The benchmark harness runs (never: that something is fast).

- The delay relay keeps order, delays connect and data, and emulates its RTT setting closely
  (a generous bound here: the machines are noisy; `python -m bench` prints the exact figures).
- `python -m bench --quick` produces its P1 result file (needs the real MTAs and HAProxy:
  skipped without them, except under CI=true); `--quick --only p6` its P6 file (outbound mode
  in a network namespace: root, iproute2 and iptables too).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from bench.delay import MAX_SEND_LAG, DelayRelay, calibrate
from bench.floors import _Tracker
from bench.peers import Floor, missing_peers
from proxy.proxyproto import parse_header
from tests.conftest import require_mtas
from tests.netns import require_netns


async def test_delay_relay_emulates_its_rtt() -> None:
    for rtt in (0.01, 0.05):
        cal = await calibrate(rtt, rounds=5)
        # Relay-added round trip (echo) and connect -> banner, against the setting.
        assert abs(cal.echo_error) < 0.10, cal
        assert abs(cal.banner_error) < 0.20, cal
        assert cal.banner >= rtt and cal.echo >= rtt, cal


async def test_delay_relay_keeps_order_and_records_end_of_data() -> None:
    got = bytearray()

    async def server(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"220 ready\r\n")
            for _ in range(1000):  # bounded
                data = await stream.receive_some(65536)
                if not data:
                    return
                got.extend(data)
                if got.endswith(b"\r\n.\r\n"):
                    await stream.send_all(b"250 ok\r\n")

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, server, listeners)
        relay = DelayRelay(upstream=("127.0.0.1", listeners[0].socket.getsockname()[1]), rtt=0.02)
        port = await nursery.start(relay.serve)
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                # Sent before the banner: must arrive in order, after the delayed connect.
                chunks = [f"line {i}\r\n".encode() for i in range(200)]
                for chunk in chunks:
                    await stream.send_all(chunk)
                received = await stream.receive_some(1000)
                await stream.send_all(b".\r\n")  # after the banner, as SMTP does
                while b"250 ok\r\n" not in received:
                    data = await stream.receive_some(1000)
                    assert data
                    received += data
        nursery.cancel_scope.cancel()

    assert bytes(got) == b"".join(chunks) + b".\r\n"
    assert received == b"220 ready\r\n250 ok\r\n"
    (rec,) = relay.records
    assert rec.final_code == b"250"
    # Each hop may start up to MAX_SEND_LAG early, by the lag the relay learnt its own sends
    # take: the banner crosses one hop, the final reply three.
    assert rec.to_banner is not None and rec.to_banner >= 0.02 - MAX_SEND_LAG
    assert rec.to_final is not None and rec.to_final >= 0.04 - 3 * MAX_SEND_LAG


async def test_delay_relay_emulates_the_handshake() -> None:
    """`handshake=True`: the server accepts 1.5 RTT after the relay did (the client's final
    ACK), the client's early bytes reach it no sooner, and its banner reaches the client two
    RTTs after the client's connect, as over a real path counted from the SYN."""
    rtt = 0.02
    seen: list[float] = []

    async def server(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"220 ready\r\n")
            data = await stream.receive_some(100)
            seen.append(trio.current_time())
            if data:
                await stream.send_all(b"250 " + data)

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, server, listeners)
        upstream = ("127.0.0.1", listeners[0].socket.getsockname()[1])
        relay = DelayRelay(upstream=upstream, rtt=rtt, handshake=True, trace=True, quickack=True)
        port = await nursery.start(relay.serve)
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"EHLO early\r\n")  # before the banner
                got = b""
                while b"250 EHLO early" not in got:
                    data = await stream.receive_some(100)
                    assert data
                    got += data
        nursery.cancel_scope.cancel()
    (rec,) = relay.records
    assert rec.upstream_connected is not None and rec.to_banner is not None
    assert rec.upstream_connected - rec.accepted >= 1.5 * rtt - 0.001
    assert seen and seen[0] - rec.accepted >= 1.5 * rtt - MAX_SEND_LAG
    assert rec.to_banner >= 2 * rtt - 2 * MAX_SEND_LAG
    assert not rec.syn_data  # no TCP Fast Open here
    assert [n for _, _, n in rec.requests] == [len(b"EHLO early\r\n")]
    assert len(rec.replies) >= 1 and rec.upstream_port > 0


def run_quick(tmp_path: Path, *args: str, timeout: float) -> Path:
    """`python -m bench --quick ARGS`, which must succeed; returns its results folder. Needs
    the real MTAs and HAProxy: skipped without them, except under CI=true."""
    require_mtas()
    if missing_peers():
        reason = f"benchmark peers missing: {', '.join(missing_peers())} (apt-get install haproxy)"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true, so not skipping: {reason}", pytrace=False)
        pytest.skip(reason)
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", *args, "--out", str(out)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_bench_quick_writes_p1_results(tmp_path: Path) -> None:
    """`python -m bench --quick` runs P1 end to end (real Postfix, Exim, HAProxy, the proxy)
    and writes its CSV. Checks shape and that early pipelining was used where it should be;
    never timing."""
    out = run_quick(tmp_path, "--sessions", "2", timeout=120)
    with (out / "p1.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and set(rows[0]) == {
        "rtt_ms",
        "client",
        "path",
        "session",
        "early",
        "seconds",
        "banner_seconds",
        "final_code",
    }
    cells = {(r["client"], r["path"]) for r in rows}
    paths = {"postfix-direct", "haproxy-postfix", "proxy-postfix", "exim-native"}
    assert cells == {(c, p) for c in ("own", "exim") for p in paths}
    assert all(r["final_code"] == "250" and float(r["seconds"]) > 0 for r in rows)
    # Early pipelining through the proxy and to native Exim, never to plain Postfix/HAProxy.
    for r in rows:
        assert (r["early"] == "True") == (r["path"] in ("proxy-postfix", "exim-native")), r
    assert "## P1" in (out / "summary.md").read_text()


def test_bench_quick_attack_and_mixed_run(tmp_path: Path) -> None:
    """`--quick --only attack,mixed`: the attack and load benchmarks run tiny and write their
    files. Checks correctness the load run proves (every message answered 250 reached the
    sink, no smuggled message did, attackers were held or refused), never timing."""
    out = run_quick(tmp_path, "--only", "attack,mixed", timeout=180)
    attack = json.loads((out / "attack.json").read_text())
    assert set(attack["phases"]) == {"alone", "attack", "after"}
    assert attack["p50_ratio"] > 0 and attack["p99_ratio"] > 0
    # Every slowloris connection was still held when the attack ended; the flooders were
    # answered (a banner for the allowed host, 421 for the other), never left hanging.
    assert attack["attackers"]["slowloris:held"] == 20, attack
    assert attack["attackers"].get("flood:code-421", 0) > 0, attack
    assert not any(k.startswith("flood:held") for k in attack["attackers"]), attack
    mixed = json.loads((out / "mixed.json").read_text())
    assert mixed["delivered_250"] > 0 and mixed["missing_count"] == 0, mixed
    assert mixed["in_sink_complete"] == mixed["delivered_250"], mixed
    assert mixed["smuggled_reaching_sink"] == [], mixed
    assert mixed["results"].get("smuggle:refused", 0) > 0, mixed
    assert mixed["results"].get("slow:delivered", 0) > 0, mixed
    summary = (out / "summary.md").read_text()
    assert "## Attack" in summary and "## Load" in summary


def test_bench_quick_p2_runs(tmp_path: Path) -> None:
    """`--quick --only p2`: every path (HAProxy, the floors, the proxy three ways) relays
    smtp-source's messages into smtp-sink in every round, without an error; never timing."""
    out = run_quick(tmp_path, "--only", "p2", "--p2-rounds", "2", timeout=180)
    paths = ["direct", "haproxy", "epoll-floor", "epoll-smtp-floor", "trio-floor"]
    paths += ["proxy-trio-io", "proxy", "proxy-2w"]
    with (out / "p2.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == paths * 2  # 1 KiB, then the large messages
    assert all(r["errors"] == "0" and float(r["msgs_per_s"]) > 0 for r in rows), rows
    with (out / "p2-rounds.csv").open() as f:
        rounds = list(csv.DictReader(f))
    assert len(rounds) == 2 * len(rows)
    # --quick: 500 small messages, then 2 large ones, each split over the 2 rounds
    assert sum(int(r["messages"]) for r in rounds if r["path"] == "proxy") == 500 + 2
    assert "## P2" in (out / "summary.md").read_text()


def test_bench_quick_p5_runs(tmp_path: Path) -> None:
    """`--quick --only p5`: every path (direct, HAProxy send-proxy-v2, the trio floor with its
    PROXY v2 header, the proxy with 1 and 2 workers) delivers smtp-source's messages into one
    real Postfix without an error, and Postfix discarded every one; never timing."""
    out = run_quick(tmp_path, "--only", "p5", timeout=60)
    paths = ["direct", "haproxy", "trio-floor", "proxy", "proxy-2w"]
    with (out / "p5.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == paths
    assert all(r["errors"] == "0" and float(r["msgs_per_s"]) > 0 for r in rows), rows
    with (out / "p5-rounds.csv").open() as f:
        rounds = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rounds) == sorted(paths)  # --quick: 1 round of each
    assert all(r["messages"] == "200" for r in rounds), rounds
    result = json.loads((out / "p5.json").read_text())
    assert result["warmup_errors"] == 0, result
    # Nothing lost on any path: Postfix's discard agent logged every message sent.
    assert result["postfix_discarded"] == result["sent"] > 0, result
    assert "## P5" in (out / "summary.md").read_text()


@pytest.mark.parametrize("kind", ["trio", "epoll", "epoll-smtp"])
async def test_floor_relays_pass_bytes_both_ways(kind: str) -> None:
    """P2's floors (bench/floors.py) relay a banner, 2 MiB each way and the half-close."""
    payload = bytes(range(256)) * 8192

    async def server(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"220 floor\r\n")
            got = bytearray()
            while data := await stream.receive_some(65536):
                got.extend(data)
            assert bytes(got) == payload  # all of it, then the client's EOF passed on
            await stream.send_all(payload)

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, server, listeners)
        upstream = listeners[0].socket.getsockname()[1]
        floor = await trio.to_thread.run_sync(lambda: Floor(kind, upstream).start())
        try:
            with trio.fail_after(20):
                stream = await trio.open_tcp_stream("127.0.0.1", floor.port)
                async with stream:
                    await stream.send_all(payload)
                    await stream.send_eof()
                    got = bytearray()
                    while data := await stream.receive_some(65536):
                        got.extend(data)
            assert bytes(got) == b"220 floor\r\n" + payload
        finally:
            await trio.to_thread.run_sync(floor.stop)
        nursery.cancel_scope.cancel()


async def test_trio_v2_floor_sends_a_proxy_v2_header() -> None:
    """P5's trio floor (`trio-v2`) starts each upstream connection with a PROXY v2 header
    naming the client's address, then relays the client's bytes."""
    got = bytearray()

    async def server(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                got.extend(data)

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, server, listeners)
        upstream = listeners[0].socket.getsockname()[1]
        floor = await trio.to_thread.run_sync(lambda: Floor("trio-v2", upstream).start())
        try:
            with trio.fail_after(20):
                stream = await trio.open_tcp_stream("127.0.0.1", floor.port)
                async with stream:
                    client = stream.socket.getsockname()[:2]
                    await stream.send_all(b"EHLO a.test\r\n")
                    await stream.send_eof()
                    assert await stream.receive_some(100) == b""
        finally:
            await trio.to_thread.run_sync(floor.stop)
        nursery.cancel_scope.cancel()
    header = parse_header(bytes(got))
    assert header is not None and header.version == 2, bytes(got)
    assert header.src == client and header.dst == ("127.0.0.1", floor.port)
    assert bytes(got[header.length :]) == b"EHLO a.test\r\n"


def test_smtp_floor_pairs_commands_and_replies() -> None:
    """The epoll-smtp floor's tracking (bench/floors.py): what it parses is a real session."""
    t = _Tracker()
    t.mta(b"220 sink.test ESMTP\r\n")
    t.client(b"EHLO a.test\r\nMAIL FROM:<a@a.test>\r\nRCPT TO:<b@b.test>\r\nDATA\r\n")
    assert list(t.pending) == ["EHLO", "MAIL", "RCPT", "DATA"]
    t.mta(b"250-sink.test\r\n250 PIPELINING\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
    assert not t.pending and t.commands.in_data
    t.client(b"Subject: x\r\n\r\nMAIL FROM:<not@a.command>\r\n.\r\nQUIT\r\n")
    assert list(t.pending) == [".", "QUIT"] and not t.commands.in_data
    t.mta(b"250 2.0.0 queued\r\n221 bye\r\n")
    assert not t.pending


def test_bench_quick_p6_runs(tmp_path: Path) -> None:
    """`--quick --only p6 --p6-tls cleartext`: P6 (bench/outbound.py: a real Postfix sending
    directly and through the proxy's outbound mode to native Exim behind the delay relay, in a
    network namespace) runs at one RTT with 2 messages per path and writes its CSV: every
    message sent and received by Exim (its `<=` line found), timed by the relay; never
    timing. Early pipelining is the benchmark's figure to report (`L*` counts), not asserted."""
    require_netns()
    out = run_quick(tmp_path, "--only", "p6", "--p6-tls", "cleartext", timeout=120)
    with (out / "p6.csv").open() as f:
        rows = list(csv.DictReader(f))
    paths = ["direct", "direct-noquit", "proxy", "proxy-tfo"]
    assert sorted(r["path"] for r in rows) == sorted(paths * 2), rows
    assert all(r["rtt_ms"] == "10.0" and r["tls"] == "cleartext" for r in rows), rows
    assert all(float(r["seconds"]) > 0 and r["exim_flag"].startswith("L") for r in rows), rows
    # The proxies' first sessions were their cache misses: relayed, PIPECONNECT unused.
    with (out / "p6-warmup.csv").open() as f:
        warmup = list(csv.DictReader(f))
    assert {r["exim_flag"] for r in warmup if r["path"] == "direct"} == {"L."}, warmup
    result = json.loads((out / "p6.json").read_text())
    assert set(result["tfo_counters"]) >= {"TCPFastOpenActive", "TCPFastOpenPassive"}
    assert result["proxy_sessions"]["proxy"] >= 4, result  # 2 warm-up + 2 measured
    assert "## P6" in (out / "summary.md").read_text()
