"""The command line as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from tests.proxyproc import run_cli

MINIMUM = """\
[listen]
plain = ["127.0.0.1:2587"]
[upstream]
address = "127.0.0.1:2525"
client_identity = "proxy-v2"
[pipe_connect]
advertise_hosts = ["*"]
"""


# Eight errors in five tables; what check-config says of each, in file order.
BAD = """\
[listen]
plain = ["0.0.0.0:25", "[::]:99999"]
tcp_fastopen = "yes"
[upstream]
adress = "127.0.0.1:2525"
client_identity = "haproxy"
[pipe_connect]
advertise_hosts = ["10.0.0.1/8", "*"]
[limits]
bare_newline = "strip"
[tls]
certificate = "/etc/pipeconnect/cert.pem"
"""
BAD_ERRORS = [
    ("listen.plain[1]", "'[::]:99999': port must be in 0..65535"),
    ("listen.tcp_fastopen", "must be true or false, not string"),
    ("upstream.adress", "unknown key (did you mean 'address'?)"),
    ("upstream.client_identity", "must be one of proxy-v1, proxy-v2, xclient, none"),
    ("upstream.address", "is required"),
    (
        "pipe_connect.advertise_hosts[0]",
        "'10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)",
    ),
    ("limits.bare_newline", "must be one of reject, normalize"),
    ("tls.key", "is required when tls.certificate is set"),
]


def test_demo_learns_then_uses_early_pipelining() -> None:
    result = run_cli("demo")
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
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_check_config_says_which_ipv6_listener_takes_ipv4(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(MINIMUM.replace('"127.0.0.1:2587"', '"[::]:2587", "[::]:2588", "0.0.0.0:2588"'))
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "plain: [::]:2587 (IPv6 and IPv4), [::]:2588, 0.0.0.0:2588;" in result.stdout


def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(MINIMUM.replace('"proxy-v2"', '"proxy-v9"'))
    result = run_cli("check-config", str(path))
    assert result.returncode == 1
    assert "upstream.client_identity" in result.stderr


def test_version_is_the_package_metadata() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"pipeconnect-proxy {version('pipeconnect-proxy')}\n"


def test_check_config_reports_every_error(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(BAD)
    result = run_cli("check-config", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}: {key}: {message}" for key, message in BAD_ERRORS
    ]


def test_check_config_json_errors(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(BAD)
    result = run_cli("check-config", "--json", str(path))
    assert result.returncode == 1
    errors = [{"key": key, "message": message} for key, message in BAD_ERRORS]
    assert json.loads(result.stdout) == {"ok": False, "file": str(path), "errors": errors}


def test_check_config_json_file_level_error(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text("[listen\n")
    result = run_cli("check-config", "--json", str(path))
    assert result.returncode == 1
    [error] = json.loads(result.stdout)["errors"]
    assert error["key"] == str(path)
    assert error["message"].startswith("TOML syntax error: ")
    text = run_cli("check-config", str(path))
    assert text.stderr.startswith(f"{path}: TOML syntax error: ")  # the file named once


def test_check_config_json_ok(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(MINIMUM.replace('"127.0.0.1:2587"', '"[::]:2587"'))
    result = run_cli("check-config", "--json", str(path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "ok": True,
        "file": str(path),
        "plain": ["[::]:2587"],
        "tls_on_connect": [],
        "dual_stack": ["[::]:2587"],
        "upstream": "127.0.0.1:2525",
        "client_identity": "proxy-v2",
        "metrics": "127.0.0.1:9464",
        "workers": 1,
        "outbound": None,
    }


OUTBOUND = """
[upstream]
address = "127.0.0.1:2525"
[outbound]
enabled = true
listen = ["127.0.0.1:10025", "[::1]:10025"]
cache = "{cache}"
"""


def test_check_config_shows_the_outbound_listeners(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(OUTBOUND.format(cache=tmp_path / "c.sqlite"))
    result = run_cli("check-config", "--json", str(path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outbound"] == ["127.0.0.1:10025", "[::1]:10025"]
    text = run_cli("check-config", str(path))
    assert "outbound: 127.0.0.1:10025, [::1]:10025" in text.stdout


def test_cache_list_and_flush(tmp_path: Path) -> None:
    from proxy.ehlocache import EhloCache
    from proxy.smtp import Reply

    db = tmp_path / "c.sqlite"
    path = tmp_path / "proxy.toml"
    path.write_text(OUTBOUND.format(cache=db))
    cache = EhloCache(str(db))
    banner = Reply.make(220, "mx.example ESMTP")
    ehlo = Reply.make(250, "mx.example", "PIPELINING", "PIPECONNECT")
    for dest in ("192.0.2.1", "192.0.2.2"):
        assert cache.learn("10.0.0.1", dest, 25, banner, ehlo, 1.7e9, b"EHLO mta.test\r\n")
    listed = run_cli("cache", "list", "--json", "--config", str(path))
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert [e["dest"] for e in entries] == ["192.0.2.1:25", "192.0.2.2:25"]
    assert entries[0]["client_ehlo"] == "EHLO mta.test"
    assert entries[0]["ehlo"].startswith("250-mx.example\r\n")
    one = run_cli("cache", "list", "192.0.2.2", "--file", str(db))
    assert "dest=192.0.2.2:25" in one.stdout and "192.0.2.1" not in one.stdout
    flushed = run_cli("cache", "flush", "192.0.2.1", "--config", str(path))
    assert flushed.stdout.startswith("1 entries flushed"), flushed
    assert [e.dest for e in EhloCache(str(db)).entries()] == ["192.0.2.2"]
    assert run_cli("cache", "flush", "--file", str(db)).stdout.startswith("1 entries")
    assert EhloCache(str(db)).entries() == []


def test_cache_on_an_unusable_file_says_so(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-db"
    bad.write_bytes(b"garbage, not SQLite" * 100)
    result = run_cli("cache", "list", "--file", str(bad))
    assert result.returncode == 1
    assert str(bad) in result.stderr


def test_serve_reports_every_error(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(BAD)
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    expected = [f"pipeconnect-proxy: {path}: {key}: {message}" for key, message in BAD_ERRORS]
    assert result.stderr.splitlines() == expected


def test_serve_with_an_unreadable_key_exits_cleanly(tmp_path: Path) -> None:
    """A key file the service cannot read: one clear line and exit 2, not a traceback."""
    path = tmp_path / "proxy.toml"
    missing = tmp_path / "missing.pem"
    tls = f'[tls]\ncertificate = "{missing}"\nkey = "{missing}"\n'
    path.write_text(MINIMUM.replace("2587", "0") + tls + '[metrics]\nlisten = ""\n')
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{path}: tls: " in result.stderr and "cannot read" in result.stderr


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
    assert f"pipeconnect-proxy {version('pipeconnect-proxy')}, configuration {path}" in err
