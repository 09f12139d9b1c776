"""SIGHUP reload: new sessions get the new settings, open sessions keep theirs."""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio

from proxy.config import load_config
from proxy.metrics import Metrics
from proxy.server import Runtime, serve
from tests.proxyproc import to_toml

from .fakemta import FakeMTA
from .samples import sample
from .test_session import ENVELOPE, MESSAGE, Client


def write(path: Path, mta_port: int, advertise: list[str]) -> None:
    path.write_text(
        to_toml(
            {
                "listen": {"plain": ["127.0.0.1:0"]},
                "upstream": {"address": f"127.0.0.1:{mta_port}"},
                "pipe_connect": {"advertise_hosts": advertise},
                "metrics": {"listen": ""},
            }
        )
    )


async def test_reload_applies_to_new_sessions_only(tmp_path: Path) -> None:
    mta = FakeMTA()
    path = tmp_path / "proxy.toml"
    async with trio.open_nursery() as nursery:
        mta_port = await nursery.start(mta.serve)
        write(path, mta_port, ["*"])
        metrics = Metrics()
        runtime = Runtime(load_config(path))
        start = functools.partial(serve, runtime.current.config, metrics, runtime=runtime)
        port = (await nursery.start(start))[0][1]

        old = Client(await trio.open_tcp_stream("127.0.0.1", port))
        await old.reply()
        write(path, mta_port, [])  # the operator toggles early pipelining off
        assert await runtime.reload(str(path), metrics)
        path.write_text("[listen]\nplain = 'not a list'\n")
        assert not await runtime.reload(str(path), metrics)  # refused, settings kept

        new = Client(await trio.open_tcp_stream("127.0.0.1", port))
        await new.reply()
        for client in (old, new):
            await client.stream.send_all(b"EHLO me.test\r\n")
        old_ehlo, new_ehlo = await old.reply(), await new.reply()
        assert old_ehlo is not None and new_ehlo is not None
        assert b"PIPECONNECT" in b"".join(old_ehlo.lines)  # kept its snapshot
        assert b"PIPECONNECT" not in b"".join(new_ehlo.lines)
        # the open session was not dropped: it still delivers
        await old.stream.send_all(ENVELOPE)
        assert [r.code for r in await old.replies_n(3)] == [250, 250, 354]
        await old.stream.send_all(MESSAGE + b".\r\n")
        assert [r.code for r in await old.replies_n(1)] == [250]
        for client in (old, new):
            await client.stream.aclose()
        nursery.cancel_scope.cancel()
    assert mta.messages == [MESSAGE]
    assert sample(metrics, "config_reloads_total") == 2


def test_sighup_reloads_and_refuses_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    write(path, 2525, ["*"])
    log_path = tmp_path / "stderr.log"
    with log_path.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(path)], stderr=err
        )

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + 20
        while text not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.05)

    try:
        wait_for("listening on")
        path.write_text("[listen]\nplain = 'broken'\n")
        proc.send_signal(signal.SIGHUP)
        wait_for("previous configuration kept")
        write(path, 2525, [])
        proc.send_signal(signal.SIGHUP)
        wait_for("new sessions use it")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
