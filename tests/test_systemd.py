"""systemd: sd_notify (proxy/notify.py) against a real datagram socket and from the real
process, and deploy/systemd/pipeconnect-proxy.service checked by `systemd-analyze verify` and
scored by `systemd-analyze security --offline=yes` (both work without systemd as PID 1).

Without systemd-analyze the unit checks are skipped with the reason, except under CI=true
(`.ci/install` installs the systemd package).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import notify
from proxy.config import ServerConfig
from tests.needs import skip_or_fail
from tests.proxyproc import run_cli, to_toml

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "systemd" / "pipeconnect-proxy.service"
EXAMPLE = ROOT / "deploy" / "systemd" / "proxy.toml"
INSTALLED = "/usr/local/bin/pipeconnect-proxy"  # ExecStart's path, as the README installs it
MAX_EXPOSURE = 2.0  # issue 14 (a unit with only ExecStart= scores 9.6 on systemd 252)


# --------------------------------------------------------------------------- sd_notify


class Manager:
    """The receiving end systemd holds: an AF_UNIX datagram socket, with the sender's pid
    (SCM_CREDENTIALS), by which ``NotifyAccess=main`` tells the main process from others."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)

    def receive(self, timeout: float = 20) -> tuple[dict[str, str], int]:
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = -1
        for level, kind, cdata in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", cdata[:12])[0]
        fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
        return fields, pid

    def pending(self) -> list[dict[str, str]]:
        out = []
        while True:
            try:
                out.append(self.receive(timeout=0.01)[0])
            except TimeoutError:
                return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Manager]:
    path = str(tmp_path / "notify")
    assert len(path) < 100, path  # sun_path is 108 bytes
    m = Manager(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield m
    m.close()


def test_notify_without_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify.ready("x")
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # a transport we do not speak
    assert not notify.stopping()


def test_notify_states_reach_a_path_socket(manager: Manager) -> None:
    assert notify.ready("listening on\n127.0.0.1:25")
    assert manager.receive() == ({"READY": "1", "STATUS": "listening on 127.0.0.1:25"}, os.getpid())
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields, _ = manager.receive()
    assert fields["RELOADING"] == "1" and before <= int(fields["MONOTONIC_USEC"]) <= after
    assert notify.stopping("SIGTERM: draining")
    assert manager.receive()[0] == {"STOPPING": "1", "STATUS": "SIGTERM: draining"}


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"pipeconnect-test-{os.getpid()}-{time.monotonic_ns()}"
    m = Manager("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.notify("READY=1")
        assert m.receive()[0] == {"READY": "1"}
    finally:
        m.close()


def test_notify_to_a_missing_socket_fails_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert not notify.ready()


def _serve(
    tmp_path: Path, manager: Manager, metrics: str, **server: object
) -> subprocess.Popen[bytes]:
    config = tmp_path / "proxy.toml"
    sections: dict[str, dict[str, object]] = {
        "listen": {"plain": ["127.0.0.1:0"]},
        "upstream": {"address": "127.0.0.1:9"},  # no session is opened
        "metrics": {"listen": metrics},
        "server": {"shutdown_grace": 1, **server},
    }
    config.write_text(to_toml(sections))
    with (tmp_path / "stderr.log").open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
            stderr=err,
            cwd=ROOT,
            env={**os.environ, "NOTIFY_SOCKET": manager.sock.getsockname()},
        )


# Workers without metrics: the parent's READY comes soonest, so the SIGHUP right behind it
# reaches workers still starting up.
@pytest.mark.parametrize(("workers", "metrics"), [(1, "127.0.0.1:0"), (2, "")])
def test_serve_tells_systemd_ready_reloading_stopping(
    tmp_path: Path, manager: Manager, workers: int, metrics: str
) -> None:
    """The real process: READY=1 once listening, RELOADING=1 then READY=1 around SIGHUP (sent
    at once: a `systemctl reload` right after start must not kill a worker still starting),
    STOPPING=1 on SIGTERM, then exit 0. Every message from the main pid, none from a worker."""
    proc = _serve(tmp_path, manager, metrics, workers=workers)
    try:
        ready, pid = manager.receive()
        assert pid == proc.pid and ready["READY"] == "1", ready
        expected = f"{workers} workers" if workers > 1 else "listening on 127.0.0.1:"
        assert ready["STATUS"].startswith(expected), ready
        proc.send_signal(signal.SIGHUP)
        reloading, pid = manager.receive()
        assert pid == proc.pid and reloading["RELOADING"] == "1", reloading
        assert int(reloading["MONOTONIC_USEC"]) > 0
        ready, pid = manager.receive()
        assert pid == proc.pid and ready["READY"] == "1", ready
        if workers == 1:
            assert ready["STATUS"].startswith("reloaded "), ready
        proc.send_signal(signal.SIGTERM)
        stopping, pid = manager.receive()
        assert pid == proc.pid and stopping["STOPPING"] == "1", stopping
        assert proc.wait(timeout=30) == 0, (tmp_path / "stderr.log").read_text()
    finally:
        proc.kill()
        proc.wait()
    assert manager.pending() == []  # workers said nothing
    if workers > 1:
        assert (tmp_path / "stderr.log").read_text().count(" reloaded ") == workers


# --------------------------------------------------------------------------- the unit


def _unit_lines(text: str) -> list[tuple[str, str]]:
    """(key, value) of every assignment; systemd allows a key more than once."""
    out = []
    for line in text.splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def _settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for key, value in _unit_lines(UNIT.read_text()):
        settings.setdefault(key, []).append(value)
    return settings


def test_unit_settings_issue_14_asks_for() -> None:
    s = _settings()
    one = {key: values[-1] for key, values in s.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["ExecStart"] == f"{INSTALLED} serve --config /etc/pipeconnect/proxy.toml"
    assert s["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert one["KillSignal"] == "SIGTERM"
    assert one["KillMode"] == "mixed"  # control-group: each worker gets SIGTERM twice, no drain
    stop = float(one["TimeoutStopSec"].removesuffix("s"))
    grace = tomllib.loads(EXAMPLE.read_text())["server"]["shutdown_grace"]
    assert grace == ServerConfig().shutdown_grace
    assert stop >= grace + 30  # room for verdicts still with the MTA when the grace ends
    assert one["DynamicUser"] == "yes"
    assert one["AmbientCapabilities"] == one["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert "PrivateUsers" not in s  # the capability would not count for the host's netns
    assert one["RestrictAddressFamilies"].split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert s["SystemCallFilter"][0] == "@system-service"
    assert one["ConfigurationDirectory"] == one["StateDirectory"] == "pipeconnect"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "MemoryDenyWriteExecute"):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict"


def test_example_config_passes_check_config() -> None:
    proc = run_cli("check-config", str(EXAMPLE), timeout=30)
    assert proc.returncode == 0, proc.stderr


def _analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        skip_or_fail("systemd-analyze is not installed (Debian: the systemd package)")
    assert found is not None
    return found


def _unit_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart/ExecReload pointing at this venv's console script: verify
    insists that the executable exists, and /usr/local/bin has none on a test machine."""
    script = Path(sys.executable).parent / "pipeconnect-proxy"
    assert script.exists(), script
    text = (text if text is not None else UNIT.read_text()).replace(INSTALLED, str(script))
    path = tmp_path / UNIT.name
    path.write_text(text)
    return path


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_analyze(), "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    proc = _verify(_unit_copy(tmp_path))
    # Warnings (an unknown or misspelt key, a bad value) do not change the exit status.
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stderr


@pytest.mark.parametrize(
    ("line", "broken"),
    [
        ("ProtectSystem=strict", "ProtectSytem=strict"),  # misspelt key: a warning, exit 0
        ("KillMode=mixed", "KillMode=some"),  # bad value: a warning, exit 0
        ("DynamicUser=yes", "DynamicUser=perhaps"),  # a fatal error
        (f"ExecStart={INSTALLED} serve", "ExecStart=/nonexistent/pipeconnect-proxy serve"),
        (f"ExecStart={INSTALLED} serve", "#"),  # no ExecStart at all
    ],
)
def test_verify_catches_a_broken_unit(tmp_path: Path, line: str, broken: str) -> None:
    text, n = re.subn(f"^{re.escape(line)}", broken, UNIT.read_text(), count=1, flags=re.M)
    assert n == 1, line
    proc = _verify(_unit_copy(tmp_path, text))
    assert proc.returncode != 0 or (proc.stdout + proc.stderr).strip()


def test_unit_exposure_is_at_most_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [_analyze(), "security", "--offline=yes", str(_unit_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    assert float(found[1]) <= MAX_EXPOSURE, proc.stdout


# --------------------------------------------------------------------- MemoryDenyWriteExecute

_PR_SET_MDWE, _PR_MDWE_REFUSE_EXEC_GAIN = 65, 1  # linux/prctl.h, Linux 6.3+

_MDWE_LAUNCHER = f"""
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl({_PR_SET_MDWE}, {_PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0):
    sys.exit(77)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def test_tls_works_under_memory_deny_write_execute() -> None:
    """MemoryDenyWriteExecute=yes is safe only while nothing maps writable code: the kernel's
    own form of it (PR_SET_MDWE, kept across exec) around the TLS and metrics tests. A
    pyOpenSSL callback (cffi's ffi.callback) would raise MemoryError here."""
    probe = subprocess.run([sys.executable, "-c", _MDWE_LAUNCHER, "-c", "pass"], check=False)
    if probe.returncode == 77:
        pytest.skip(f"the kernel has no PR_SET_MDWE (Linux 6.3+): {os.uname().release}")
    tests = ["tests/test_tls_session.py", "tests/test_metrics.py"]
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _MDWE_LAUNCHER,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *tests,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
