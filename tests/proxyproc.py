"""Run the proxy as users do: ``python -m proxy serve --config FILE`` in a subprocess."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.mta import free_port

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m proxy ARGS`` as an operator runs it, output captured, exit code kept."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


def to_toml(sections: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        out += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(out) + "\n"


class ProxyProcess:
    def __init__(self, tmpdir: Path, upstream_port: int, **sections: dict[str, Any]) -> None:
        self.dir = tmpdir
        self.port = free_port()
        self.upstream_port = upstream_port
        self.sections = sections
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = tmpdir / f"proxy-{self.port}.log"

    def config(self) -> dict[str, dict[str, Any]]:
        base: dict[str, dict[str, Any]] = {
            "listen": {"plain": [f"127.0.0.1:{self.port}"]},
            "upstream": {
                "address": f"127.0.0.1:{self.upstream_port}",
                "client_identity": "proxy-v2",
            },
            "pipe_connect": {"advertise_hosts": ["*"]},
            "metrics": {"listen": ""},
        }
        for name, values in self.sections.items():
            base.setdefault(name, {}).update(values)
        return base

    def start(self) -> ProxyProcess:
        path = self.dir / f"proxy-{self.port}.toml"
        path.write_text(to_toml(self.config()))
        seen = len(self.log())  # a restart appends to the same log
        with self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--config", str(path)], stderr=err
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited {self.proc.returncode}:\n{self.log()}")
            if "listening on" in self.log()[seen:]:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"proxy did not start:\n{self.log()}")

    def restart(self, **sections: dict[str, Any]) -> ProxyProcess:
        """New settings, same port (an operator's toggle)."""
        self.stop()
        for name, values in sections.items():
            self.sections.setdefault(name, {}).update(values)
        return self.start()

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        # the port must be free again before a restart binds it
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    break
            time.sleep(0.05)

    def log(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def session_lines(self, at_least: int = 1, timeout: float = 10) -> list[str]:
        """The per-session log lines, once `at_least` are there (or the timeout passed).

        The proxy writes a session's line after the client has gone, so a test
        that has just seen its client finish must wait for it.
        """
        deadline = time.monotonic() + timeout
        while True:
            lines = [ln for ln in self.log().splitlines() if "pipeconnect.session" in ln]
            if len(lines) >= at_least or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)
