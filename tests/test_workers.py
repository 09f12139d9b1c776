"""``server.workers = N``: worker processes sharing the listening port (proxy/workers.py).

The proxy runs as users run it (``python -m proxy serve``) with two workers in front of the
scriptable fake MTA; sessions must spread over both workers (their log lines carry the
pid), the parent's merged /metrics must count exactly the sessions run, and SIGTERM to the
parent must end every worker. A worker that dies on its own stops the whole proxy.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from proxy.client import EarlyPipeliningClient
from proxy.config import ConfigError, parse_config
from proxy.workers import _http_get, merge_metrics
from tests.fakemta import FakeMTA
from tests.mta import free_port
from tests.proxyproc import ProxyProcess, to_toml

SESSIONS = 40
BODY = b"Subject: workers\r\n\r\nhello\r\n"
_PID = re.compile(r"pipeconnect\.session\[(\d+)\]")


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_workers_setting_is_validated() -> None:
    base = {"listen": {"plain": ["127.0.0.1:25"]}, "upstream": {"address": "127.0.0.1:2525"}}
    assert parse_config(base).server.workers == 1
    assert parse_config({**base, "server": {"workers": 4}}).server.workers == 4
    for bad in (0, -1, True, "2"):
        with pytest.raises(ConfigError, match=r"^server\.workers"):
            parse_config({**base, "server": {"workers": bad}})


def test_merge_sums_counters_and_histograms_and_picks_gauges() -> None:
    def worker(sessions: int, active: int, up: int, reload_ok: int, le1: int) -> str:
        return f"""\
# HELP pipeconnect_sessions_total Client sessions ended
# TYPE pipeconnect_sessions_total counter
pipeconnect_sessions_total{{listener="plain",outcome="quit"}} {sessions}
# HELP pipeconnect_active_sessions Client sessions in progress
# TYPE pipeconnect_active_sessions gauge
pipeconnect_active_sessions{{listener="plain"}} {active}
# HELP pipeconnect_upstream_up MTA reachable
# TYPE pipeconnect_upstream_up gauge
pipeconnect_upstream_up {up}
# HELP pipeconnect_config_last_reload_successful last reload ok
# TYPE pipeconnect_config_last_reload_successful gauge
pipeconnect_config_last_reload_successful {reload_ok}
# HELP pipeconnect_upstream_connect_seconds connect time
# TYPE pipeconnect_upstream_connect_seconds histogram
pipeconnect_upstream_connect_seconds_bucket{{le="1.0"}} {le1}
pipeconnect_upstream_connect_seconds_bucket{{le="+Inf"}} {le1 + 1}
pipeconnect_upstream_connect_seconds_count {le1 + 1}
pipeconnect_upstream_connect_seconds_sum 0.5
"""

    merged = merge_metrics([worker(3, 2, 0, 1, 4), worker(5, 1, 1, 0, 6)])
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in merged for s in f.samples}
    plain = (("listener", "plain"),)
    assert got[("pipeconnect_sessions_total", (*plain, ("outcome", "quit")))] == 8
    assert got[("pipeconnect_active_sessions", plain)] == 3
    assert got[("pipeconnect_upstream_up", ())] == 1  # any worker reached the MTA
    assert got[("pipeconnect_config_last_reload_successful", ())] == 0  # one refused
    assert got[("pipeconnect_upstream_connect_seconds_bucket", (("le", "1.0"),))] == 10
    assert got[("pipeconnect_upstream_connect_seconds_count", ())] == 12
    assert got[("pipeconnect_upstream_connect_seconds_sum", ())] == 1.0


def _exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


async def _until(condition: Callable[[], bool], timeout: float) -> None:
    """Poll ``condition`` (it reads files) in a thread until true, or fail after timeout."""

    def poll() -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    assert await trio.to_thread.run_sync(poll), f"not within {timeout}s"


def _worker_pids(proxy: ProxyProcess) -> set[int]:
    return {int(m.group(1)) for ln in proxy.session_lines(0) if (m := _PID.search(ln))}


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


async def _sessions(port: int, count: int) -> list[int]:
    codes: list[int] = []

    async def one() -> None:
        client = EarlyPipeliningClient(helo="workers.test")
        d = await client.send(("127.0.0.1", port), "a@example.org", ["b@dest.test"], BODY)
        codes.append(d.final.code)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
    return codes


async def test_two_workers_share_the_port_merge_metrics_and_stop_on_sigterm(
    tmp_path: Path,
) -> None:
    mta = FakeMTA(proxy_protocol=True)
    metrics_port = free_port()
    async with trio.open_nursery() as nursery:
        mta_port = await nursery.start(mta.serve)
        proxy = ProxyProcess(
            tmp_path,
            mta_port,
            server={"workers": 2},
            metrics={"listen": f"127.0.0.1:{metrics_port}"},
        )
        await trio.to_thread.run_sync(proxy.start)
        assert proxy.proc is not None
        parent = proxy.proc.pid
        try:
            # both workers up (each logs its listeners)
            await _until(lambda: proxy.log().count("listening on") >= 2, 20)
            workers = _children(parent)
            assert len(workers) == 2, proxy.log()

            codes = await _sessions(proxy.port, SESSIONS)
            assert codes == [250] * SESSIONS
            assert len(mta.messages) == SESSIONS
            # the session lines are written as the sessions end
            await _until(lambda: len(proxy.session_lines(0)) >= SESSIONS, 10)
            served = _worker_pids(proxy)
            assert served == workers, (served, workers)  # both workers served sessions

            status, text = await _http_get(metrics_port, "/metrics")
            assert status == 200, text
            got = _samples(text)
            quit_ = ("pipeconnect_sessions_total", (("listener", "plain"), ("outcome", "quit")))
            assert got[quit_] == SESSIONS
            assert got[("pipeconnect_relayed_messages_total", ())] == SESSIONS
            assert got[("pipeconnect_active_sessions", (("listener", "plain"),))] == 0
            assert got[("pipeconnect_build_info", (("version", _version(text)),))] == 1
            status, text = await _http_get(metrics_port, "/healthz")
            assert status == 200 and text.count("worker") == 2, text

            proxy.proc.send_signal(signal.SIGTERM)
            code = await trio.to_thread.run_sync(lambda: proxy.proc.wait(timeout=20))  # type: ignore[union-attr]
            assert code == 0, proxy.log()
            for pid in workers:  # reaped by the parent: gone, not zombies
                assert not _exists(pid)
            assert "SIGTERM: passing it to 2 workers" in proxy.log()
        finally:
            await trio.to_thread.run_sync(proxy.stop)  # SIGTERM and wait (no-op if it ended)
        nursery.cancel_scope.cancel()


def _version(text: str) -> str:
    m = re.search(r'pipeconnect_build_info\{version="([^"]*)"\}', text)
    assert m, text
    return m.group(1)


@asynccontextmanager
async def two_workers(tmp_path: Path) -> AsyncIterator[ProxyProcess]:
    """``serve`` with ``workers = 2`` in front of the fake MTA, once both workers listen;
    stopped afterwards (SIGTERM and wait: a no-op if it already ended)."""
    mta = FakeMTA(proxy_protocol=True)
    async with trio.open_nursery() as nursery:
        mta_port = await nursery.start(mta.serve)
        proxy = ProxyProcess(tmp_path, mta_port, server={"workers": 2})
        await trio.to_thread.run_sync(proxy.start)
        assert proxy.proc is not None
        try:
            await _until(lambda: proxy.log().count("listening on") >= 2, 20)
            yield proxy
        finally:
            await trio.to_thread.run_sync(proxy.stop)
        nursery.cancel_scope.cancel()


async def test_a_worker_that_dies_stops_the_proxy(tmp_path: Path) -> None:
    async with two_workers(tmp_path) as proxy:
        assert proxy.proc is not None
        try:
            victim, other = sorted(_children(proxy.proc.pid))
            os.kill(victim, signal.SIGKILL)
            proc = proxy.proc
            code = await trio.to_thread.run_sync(lambda: proc.wait(timeout=30))
            assert code == 1, proxy.log()
            assert not _exists(other)
            log = proxy.log()
            assert f"(pid {victim}) exited with status -9: stopping the others" in log
        except subprocess.TimeoutExpired:
            pytest.fail(f"the parent did not exit:\n{proxy.log()}")


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for whoever adopted it counts as exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


async def test_workers_stop_when_the_parent_is_killed(tmp_path: Path) -> None:
    async with two_workers(tmp_path) as proxy:
        assert proxy.proc is not None
        workers = _children(proxy.proc.pid)
        assert len(workers) == 2
        proxy.proc.kill()  # SIGKILL: nothing is passed on; the kernel tells the workers
        proxy.proc.wait()
        await _until(lambda: all(_gone(pid) for pid in workers), 20)


async def test_sighup_to_the_parent_reloads_every_worker(tmp_path: Path) -> None:
    """The parent passes SIGHUP on; each worker reloads the file, and new sessions in both
    use it (here: early pipelining is no longer advertised to 127.0.0.1)."""
    async with two_workers(tmp_path) as proxy:
        assert proxy.proc is not None
        before = await _sessions(proxy.port, 4)
        assert before == [250] * 4
        proxy.sections["pipe_connect"] = {"advertise_hosts": ["192.0.2.0/24"]}
        path = tmp_path / f"proxy-{proxy.port}.toml"
        path.write_text(to_toml(proxy.config()))
        proxy.proc.send_signal(signal.SIGHUP)
        await _until(lambda: proxy.log().count("reloaded ") >= 2, 20)
        reloaded = {
            int(m.group(1)) for m in re.finditer(r"server\[(\d+)\] w\d reloaded", proxy.log())
        }
        assert reloaded == _children(proxy.proc.pid)
        assert "SIGHUP: passing it to 2 workers" in proxy.log()
        keywords = await _keywords_seen(proxy.port, 20)
        assert not any("PIPECONNECT" in k for k in keywords), keywords


async def _keywords_seen(port: int, count: int) -> set[str]:
    """EHLO keywords over ``count`` sessions (spread over both workers by the kernel)."""
    seen: set[str] = set()
    with trio.fail_after(60):
        for _ in range(count):
            client = EarlyPipeliningClient(helo="workers.test")
            d = await client.send(("127.0.0.1", port), "a@example.org", ["b@dest.test"], BODY)
            seen |= set(d.keywords)
    return seen
