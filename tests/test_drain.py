"""Stopping: SIGTERM stops accepting, open sessions finish within the grace, the rest get 421."""

from __future__ import annotations

import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from proxy.metrics import Metrics
from proxy.server import Bound, Runtime, serve
from tests.proxyproc import to_toml

from .fakemta import FakeMTA
from .samples import sample
from .test_session import ENVELOPE, MESSAGE, Client, make_config


@asynccontextmanager
async def stoppable(
    mta: FakeMTA, grace: float
) -> AsyncIterator[tuple[Bound, Runtime, Metrics, trio.Event]]:
    """The proxy in front of ``mta``; the event is set once ``serve`` has returned."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(mta.serve)
        runtime = Runtime(make_config(port, server={"shutdown_grace": grace}))
        metrics = Metrics()
        returned = trio.Event()

        async def run(*, task_status: trio.TaskStatus[Bound]) -> None:
            await serve(runtime.current.config, metrics, runtime=runtime, task_status=task_status)
            returned.set()

        bound = await nursery.start(run)
        yield bound, runtime, metrics, returned
        nursery.cancel_scope.cancel()


async def open_client(port: int) -> Client:
    client = Client(await trio.open_tcp_stream("127.0.0.1", port))
    assert (banner := await client.reply()) is not None and banner.code == 220
    await client.stream.send_all(b"EHLO me.test\r\n")
    assert (ehlo := await client.reply()) is not None and ehlo.code == 250
    return client


async def test_open_session_finishes_its_message_within_the_grace() -> None:
    mta = FakeMTA()
    async with stoppable(mta, grace=30) as (bound, runtime, metrics, returned):
        port = bound[0][1]
        client = await open_client(port)
        await client.stream.send_all(ENVELOPE)
        assert [r.code for r in await client.replies_n(3)] == [250, 250, 354]

        runtime.stopping.set()
        await trio.sleep(0.1)  # let serve close its listeners
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)
        assert not bound.health.listening  # /healthz answers 503 while draining
        assert not returned.is_set()  # still waiting for the open session

        await client.stream.send_all(MESSAGE + b".\r\nQUIT\r\n")
        assert [r.code for r in await client.replies_n(2)] == [250, 221]
        with trio.fail_after(5):
            await returned.wait()
        await client.stream.aclose()
    assert mta.messages == [MESSAGE]
    assert sample(metrics, "sessions_total", listener="plain", outcome="quit") == 1


async def test_grace_over_ends_idle_session_with_421() -> None:
    mta = FakeMTA()
    async with stoppable(mta, grace=0.3) as (bound, runtime, metrics, returned):
        client = await open_client(bound[0][1])
        await client.stream.send_all(b"MAIL FROM:<a@src.test>\r\n")
        assert [r.code for r in await client.replies_n(1)] == [250]
        runtime.stopping.set()
        reply = await client.reply()
        assert reply is not None and reply.code == 421
        assert b"shutting down" in reply.lines[0]
        assert await client.reply() is None  # and the connection is closed
        with trio.fail_after(5):
            await returned.wait()
        await client.stream.aclose()
    assert mta.messages == []  # the open transaction was not completed upstream
    assert sample(metrics, "sessions_total", listener="plain", outcome="shutdown") == 1


async def test_stop_with_no_sessions_returns_at_once() -> None:
    async with stoppable(FakeMTA(), grace=60) as (_bound, runtime, _metrics, returned):
        runtime.stopping.set()
        with trio.fail_after(5):
            await returned.wait()


async def test_sigterm_drains_then_exits_zero(tmp_path: Path) -> None:
    """The real process: SIGTERM with a session open mid-transaction; the session gets its
    421 when the grace ends and the process exits 0 (what a container runtime waits for)."""
    mta = FakeMTA()
    log_path = trio.Path(tmp_path / "stderr.log")
    async with trio.open_nursery() as nursery:
        mta_port = await nursery.start(mta.serve)
        config = {
            "listen": {"plain": ["127.0.0.1:0"]},
            "upstream": {"address": f"127.0.0.1:{mta_port}"},
            "metrics": {"listen": ""},
            "server": {"shutdown_grace": 0.5},
        }
        path = trio.Path(tmp_path / "proxy.toml")
        await path.write_text(to_toml(config))
        with open(str(log_path), "wb") as err:  # noqa: ASYNC230 - opening is instant
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "proxy", "serve", "--config", str(path)], stderr=err
            )
        try:
            with trio.fail_after(20):
                while not (
                    found := re.search(r"listening on [\d.]+:(\d+)", await log_path.read_text())
                ):
                    assert proc.poll() is None, await log_path.read_text()
                    await trio.sleep(0.05)
            stream = await trio.open_tcp_stream("127.0.0.1", int(found[1]))
            client = Client(stream)
            assert (banner := await client.reply()) is not None and banner.code == 220
            await stream.send_all(b"EHLO me.test\r\nMAIL FROM:<a@src.test>\r\n")
            assert [r.code for r in await client.replies_n(2)] == [250, 250]
            proc.send_signal(signal.SIGTERM)
            reply = await client.reply(timeout=10)
            await stream.aclose()
            with trio.fail_after(10):
                code = await proc.wait()
        finally:
            proc.kill()
        nursery.cancel_scope.cancel()
    text = await log_path.read_text()
    assert code == 0, text
    assert reply is not None and reply.code == 421, text
    assert b"4.3.2 Service shutting down" in reply.lines[0]
    assert "SIGTERM: stopping" in text
    assert "ending 1 sessions with 421" in text
    assert "outcome=shutdown" in text
