"""The command line as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

MINIMUM = """\
[listen]
plain = ["127.0.0.1:2587"]
[upstream]
address = "127.0.0.1:2525"
client_identity = "proxy-v2"
[pipe_connect]
advertise_hosts = ["*"]
"""


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60
    )


def test_demo_learns_then_uses_early_pipelining() -> None:
    result = run("demo")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "session 1: classic" in out
    assert "session 2: early pipelining" in out
    assert "round trips saved by early pipelining: 2 (5 -> 3)" in out
    assert out.count("demo MTA <= alice@demo.test") == 2
    # one log line per session; the second used the early input
    session_lines = [ln for ln in result.stderr.splitlines() if "pipeconnect.session" in ln]
    assert [" L. " in session_lines[0], " L* " in session_lines[1]] == [True, True]


def test_check_config_minimum_ok(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(MINIMUM)
    result = run("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_check_config_says_which_ipv6_listener_takes_ipv4(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(MINIMUM.replace('"127.0.0.1:2587"', '"[::]:2587", "[::]:2588", "0.0.0.0:2588"'))
    result = run("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "plain: [::]:2587 (IPv6 and IPv4), [::]:2588, 0.0.0.0:2588;" in result.stdout


def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(MINIMUM.replace('"proxy-v2"', '"proxy-v9"'))
    result = run("check-config", str(path))
    assert result.returncode == 1
    assert "upstream.client_identity" in result.stderr


def test_serve_runs_until_sigterm(tmp_path: Path) -> None:
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "proxy.toml"
    path.write_text(MINIMUM.replace("2587", str(port)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(path)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "SIGTERM: stopping" in err
