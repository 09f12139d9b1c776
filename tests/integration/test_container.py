"""The product's container image, built and run for real with podman.

There is no Docker engine here and no registry to pull a base from, so the image is built
from a local Debian base made by debootstrap (`.ci/install.d/container.sh`) and run with
runc on the host network in front of the test Postfix (PROXY protocol on,
`smtpd_forbid_unauth_pipelining = yes`). A real Exim client delivers through it, learning
the keyword the first time and pipelining early the second.

Outbound mode: the rule image (deploy/outbound/) installs the NAT rule in a network namespace
with NET_ADMIN only, the proxy image with its own [outbound] settings joins that namespace,
and an MTA-like client (any uid but the proxy's) delivers twice to an MX in it: relayed and
learned the first time, early the second, the cache on a mounted directory.

Skipped (with the reason) when podman or the base image is missing, except with CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mta import EximClient, Postfix, deliveries, free_port
from tests.needs import skip_or_fail
from tests.netns import Namespace, netns_missing
from tests.proxyproc import to_toml

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("PIPECONNECT_BASE_IMAGE", "localhost/python-base:3.11")
IMAGE = "localhost/pipeconnect-proxy:test"
RULE_IMAGE = "localhost/pipeconnect-outbound-rule:test"
# crun fails on this kernel's hybrid cgroups; default ulimits exceed the hard limits.
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
RUN = [*PODMAN, "run", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]
GRACE = 5.0  # [server] shutdown_grace in the test configuration
UID = 10025  # the image's user


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def _unavailable() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed"
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        return f"the base image {BASE_IMAGE} does not exist"
    return None


def _build(tag: str, context: Path) -> None:
    """podman build of `context` on the local base image (layers cached between runs)."""
    reason = _unavailable()
    if reason is not None:
        reason += "; run `bash .ci/install.d/container.sh` as root"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true, so not skipping: {reason}", pytrace=False)
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    started = time.monotonic()
    build = subprocess.run(
        [
            *PODMAN,
            "build",
            "--isolation=chroot",
            "--network=host",
            "--format=docker",  # the OCI format has no HEALTHCHECK
            "--build-arg",
            f"BASE={BASE_IMAGE}",
            # pip inside the build reaches PyPI through a TLS proxy whose CA is in this bundle
            "-v",
            "/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro",
            "-t",
            tag,
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    size = int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout)
    print(f"image {tag} built in {time.monotonic() - started:.1f}s, {size / 1e6:.0f} MB")


@pytest.fixture(scope="module")
def image() -> str:
    """Build the image (layers cached between runs: dependencies before the source)."""
    _build(IMAGE, ROOT)
    return IMAGE


@pytest.fixture(scope="module")
def rule_image() -> str:
    """outbound mode's init step, deploy/outbound/Dockerfile (nftables from Debian)."""
    _build(RULE_IMAGE, ROOT / "deploy" / "outbound")
    return RULE_IMAGE


class Container:
    """One `podman run -d`, removed at the end whatever happened."""

    def __init__(self, name: str, args: list[str]) -> None:
        self.name = name
        self.args = args

    def start(self) -> Container:
        proc = subprocess.run(
            [*RUN, "-d", "--name", self.name, *self.args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        return self

    def logs(self) -> str:
        proc = podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def wait_log(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.logs():
                return
            if self.state()["Status"] == "exited":
                break
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not in the container log:\n{self.logs()}")

    def state(self) -> dict[str, Any]:
        out = podman("inspect", "--format", "{{json .State}}", self.name).stdout
        state: dict[str, Any] = json.loads(out)
        return state

    def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state()
            if state["Status"] == "exited":
                return int(state["ExitCode"])
            time.sleep(0.05)
        raise AssertionError(f"still running after {timeout}s:\n{self.logs()}")

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False)


@pytest.fixture
def container() -> Iterator[Callable[..., Container]]:
    made: list[Container] = []

    def make(*args: str) -> Container:
        c = Container(f"pipeconnect-test-{os.getpid()}-{len(made)}", list(args))
        made.append(c)
        return c.start()

    yield make
    for c in made:
        c.remove()


def test_image_metadata(image: str) -> None:
    inspect = json.loads(podman("image", "inspect", image).stdout)[0]
    config = inspect["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["pipeconnect-proxy"]
    assert config["Cmd"] == ["serve", "--config", "/etc/pipeconnect/proxy.toml"]
    assert set(config["ExposedPorts"]) == {"25/tcp", "465/tcp", "9464/tcp", "10025/tcp"}
    assert config["StopSignal"] in ("SIGTERM", "15")
    assert config["Labels"]["org.opencontainers.image.title"] == "pipeconnect-proxy"
    health = inspect["Healthcheck"]["Test"]
    assert health[:2] == ["CMD", "python3"], health
    # pip went with the build stage: nothing installs at run time
    proc = subprocess.run(
        [*RUN, "--rm", "--network=none", "--entrypoint", "python3", image, "-c",
         "import importlib.util as u, proxy; print(u.find_spec('pip') is None, proxy.__file__)"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "True", proc.stdout
    # outbound mode's cache directory: the user's own, for a volume to take over
    proc = subprocess.run(
        [*RUN, "--rm", "--network=none", "--entrypoint", "stat", image,
         "-c", "%u:%g %a", "/var/lib/pipeconnect-proxy"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.stdout.split() == [f"{UID}:{UID}", "700"], proc.stdout + proc.stderr


def test_sidecar_delivers_early_pipelining_then_stops_on_sigterm(
    image: str,
    postfix: Postfix,
    exim_client_factory: Callable[..., EximClient],
    container: Callable[..., Container],
    tmp_path: Path,
) -> None:
    port, metrics_port = free_port(), free_port()
    config = tmp_path / "proxy.toml"
    config.write_text(
        to_toml(
            {
                "listen": {"plain": [f"127.0.0.1:{port}"]},
                "upstream": {"address": f"127.0.0.1:{postfix.port}", "client_identity": "proxy-v2"},
                "pipe_connect": {"advertise_hosts": ["*"]},
                "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
                "server": {"shutdown_grace": GRACE},
            }
        )
    )
    config.chmod(0o644)  # read by the image's non-root user
    healthz = f"http://127.0.0.1:{metrics_port}/healthz"
    proxy = container(
        "--network=host",
        # the hardening compose.yaml and deployment.yaml ask for
        "--read-only",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        "-v",
        f"{config}:/etc/pipeconnect/proxy.toml:ro",
        "-e",
        f"PIPECONNECT_HEALTHZ={healthz}",
        image,
    )
    proxy.wait_log("listening on")

    exim = exim_client_factory(port)
    logs = [
        exim.send("alice@client.test", "box@dest.test", f"message {n}\n".encode()) for n in (1, 2)
    ]
    lines = [deliveries(log)[-1] for log in logs]
    assert [d.kind for d in lines] == ["=>", "=>"], logs
    assert lines[1].early_pipelined, lines[1].line  # L* in Exim's log
    assert len(postfix.wait_messages(2)) == 2
    maillog = postfix.maillog()
    assert "protocol synchronization" not in maillog  # the proxy never talked early
    assert "client=unknown[127.0.0.2]" in maillog  # PROXY header from inside the container

    sessions = [ln for ln in proxy.logs().splitlines() if "pipeconnect.session" in ln]
    assert len(sessions) == 2, proxy.logs()
    assert " L. " in sessions[0] and " L* " in sessions[1], sessions

    with urllib.request.urlopen(healthz, timeout=5) as resp:
        assert resp.status == 200
    # the image's own HEALTHCHECK command, run inside the container
    check = podman("healthcheck", "run", proxy.name, check=False)
    assert check.returncode == 0, check.stdout + check.stderr

    started = time.monotonic()
    podman("kill", "--signal", "TERM", proxy.name)
    code = proxy.wait_exit(GRACE + 5)
    elapsed = time.monotonic() - started
    assert code == 0, proxy.logs()
    assert "SIGTERM" in proxy.logs()
    print("\n".join(d.line for d in lines))
    print("\n".join(sessions))
    print(f"SIGTERM -> exit {code} after {elapsed:.2f}s (grace {GRACE:g}s)")


def test_default_config_binds_port_25_as_non_root(
    image: str, container: Callable[..., Container]
) -> None:
    """The image's own config listens on 0.0.0.0:25 as uid 10025: that works in a network
    namespace with net.ipv4.ip_unprivileged_port_start=0 (Docker's default, a safe sysctl in
    Kubernetes) and fails loudly without it. --network=none: a private namespace with only
    loopback, so nothing outside is touched."""
    # the kernel's default, stated: a podman whose containers.conf lowers it would pass anyway
    refused = container(
        "--network=none", "--sysctl", "net.ipv4.ip_unprivileged_port_start=1024", image
    )
    assert refused.wait_exit(20) != 0
    assert "Permission denied" in refused.logs(), refused.logs()

    ok = container("--network=none", "--sysctl", "net.ipv4.ip_unprivileged_port_start=0", image)
    ok.wait_log("listening on 0.0.0.0:25 (outbound: 127.0.0.1:10025)")
    top = podman("top", ok.name, "user", "args").stdout
    assert str(UID) in top or "pipeconnect" in top, top
    podman("kill", "--signal", "TERM", ok.name)
    assert ok.wait_exit(GRACE + 20) == 0, ok.logs()


# An MX in the namespace (root, on 127.0.0.3:25) that offers early pipelining. It holds its
# banner back for a moment and records whether the client's first bytes came before it
# (what Exim logs as L*), the client's address and what it said.
_MX = r"""
import json, select, socket, sys, threading
log = open(sys.argv[1], "a", buffering=1)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.3", 25))
srv.listen(8)
print("ready", flush=True)
EHLO = (b"250-mx.test Hello\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n250-PIPELINING\r\n"
        b"250 PIPECONNECT\r\n")
def serve(conn, peer):
    early = bool(select.select([conn], [], [], 0.3)[0])
    conn.sendall(b"220 mx.test ESMTP\r\n")
    f = conn.makefile("rb")
    lines, body = [], b""
    while True:
        line = f.readline()
        if not line:
            break
        lines.append(line.decode().strip())
        verb = line[:4].upper()
        if verb == b"EHLO":
            conn.sendall(EHLO)
        elif verb == b"DATA":
            conn.sendall(b"354 go ahead\r\n")
            while (part := f.readline()) not in (b".\r\n", b""):
                body += part
            conn.sendall(b"250 OK id=1\r\n")
        elif verb == b"QUIT":
            conn.sendall(b"221 mx.test bye\r\n")
            break
        else:
            conn.sendall(b"250 OK\r\n")
    record = {"peer": peer[0], "early": early, "lines": lines, "body": body.decode()}
    log.write(json.dumps(record) + "\n")
    conn.close()
while True:
    conn, peer = srv.accept()
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
"""

# The MTA's side: a plain RFC 2920 client as uid UID (the socket made after setuid, so that
# the NAT rule sees that uid), to the MX's own address; it knows nothing of the proxy.
_CLIENT = r"""
import encodings.idna, json, os, socket, sys  # idna: imported while /root is readable
uid = int(sys.argv[1])
os.setgroups([]); os.setgid(uid); os.setuid(uid)
s = socket.create_connection(("127.0.0.3", 25), timeout=10)
f = s.makefile("rwb")
def reply():
    lines = []
    while True:
        line = f.readline().decode()
        lines.append(line.strip())
        if line[3:4] != "-":
            return lines
out = {"banner": reply()}
f.write(b"EHLO mta.test\r\n"); f.flush()
out["ehlo"] = reply()
f.write(b"MAIL FROM:<a@mta.test>\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n"); f.flush()
out["group"] = [reply()[0] for _ in range(3)]
f.write(b"Subject: hi\r\n\r\nmessage " + sys.argv[2].encode() + b"\r\n.\r\nQUIT\r\n"); f.flush()
out["end"] = [reply()[0] for _ in range(2)]
print(json.dumps(out))
"""


def test_outbound_mode_with_the_rule_image(
    image: str, rule_image: str, container: Callable[..., Container], tmp_path: Path
) -> None:
    """The sidecar layout of deploy/kubernetes and deploy/compose, for real: the rule image
    (NET_ADMIN only, read-only, default command) installs the rule in a namespace, the proxy
    image joins it with the shipped [outbound] section and a mounted cache directory, and a
    client that is not the proxy's uid delivers twice to an MX there: relayed and learned,
    then early (the MX sees the EHLO before its banner). The proxy's own uid is not
    redirected; SIGTERM ends the proxy with 0."""
    missing = netns_missing()
    if missing:
        skip_or_fail(f"needs {', '.join(missing)} (run as root after `bash .ci/install`)")
    # the image's own configuration, with the plain listener on one address (0.0.0.0:25
    # would take the MX's port) and no upstream in this namespace
    shipped = (ROOT / "deploy" / "container" / "proxy.toml").read_text()
    assert 'plain = ["0.0.0.0:25"]' in shipped
    config = tmp_path / "proxy.toml"
    config.write_text(shipped.replace('plain = ["0.0.0.0:25"]', 'plain = ["127.0.0.1:25"]'))
    config.chmod(0o644)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    os.chown(cache, UID, UID)
    mx_log = tmp_path / "mx.jsonl"
    with Namespace(tcp_fastopen=False) as ns:
        ns.allow_unprivileged_low_ports()
        netns = f"ns:/run/netns/{ns.name}"
        mx = ns.popen([sys.executable, "-c", _MX, str(mx_log)], stdout=subprocess.PIPE)
        try:
            assert mx.stdout is not None and mx.stdout.readline() == b"ready\n"
            proxy = container(
                f"--network={netns}",
                "--read-only",
                "--cap-drop=ALL",
                "--security-opt=no-new-privileges",
                "-v",
                f"{config}:/etc/pipeconnect/proxy.toml:ro",
                "-v",
                f"{cache}:/var/lib/pipeconnect-proxy",
                image,
            )
            proxy.wait_log("(outbound: 127.0.0.1:10025)")
            rule = subprocess.run(
                [*RUN, "--rm", f"--network={netns}", "--read-only", "--cap-drop=ALL",
                 "--cap-add=NET_ADMIN", "--security-opt=no-new-privileges", rule_image],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert rule.returncode == 0, rule.stdout + rule.stderr
            shown = subprocess.run(
                [*RUN, "--rm", f"--network={netns}", "--read-only", "--cap-drop=ALL",
                 "--cap-add=NET_ADMIN", rule_image, "show", "--except-user", str(UID)],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert "meta skuid != 10025 tcp dport 25 redirect to :10025" in shown.stdout, shown

            def deliver(n: int, uid: int = 65534) -> dict[str, Any]:
                out = ns.run([sys.executable, "-c", _CLIENT, str(uid), str(n)])
                result: dict[str, Any] = json.loads(out.splitlines()[-1])
                return result

            first, second = deliver(1), deliver(2)
            for got in (first, second):
                assert got["banner"] == ["220 mx.test ESMTP"], got
                assert got["group"] == ["250 OK", "250 OK", "354 go ahead"], got
                assert got["end"] == ["250 OK id=1", "221 mx.test bye"], got
            assert first["ehlo"][-1] == "250 PIPECONNECT"  # relayed: the MX's own reply
            # served from the cache: the keyword hidden, SIZE without its number
            assert not any("PIPECONNECT" in line for line in second["ehlo"]), second
            assert "250-SIZE" in second["ehlo"], second
            deliver(3, uid=UID)  # the proxy's uid: straight to the MX
            sessions = [ln for ln in proxy.logs().splitlines() if "pipeconnect.outbound" in ln]
            assert len(sessions) == 2, proxy.logs()
            assert " P=relay cache=miss+learned " in sessions[0], sessions
            assert " L* P=early cache=hit " in sessions[1] and " RT=2 " in sessions[1], sessions
            assert "H=[127.0.0.3]:25" in sessions[1] and "outcome=quit" in sessions[1], sessions
            seen = [json.loads(line) for line in mx_log.read_text().splitlines()]
            assert [m["early"] for m in seen] == [False, True, False], seen
            assert all(m["peer"] == "127.0.0.1" for m in seen), seen  # bind_source
            assert [m["body"] for m in seen[:2]] == [
                f"Subject: hi\r\n\r\nmessage {n}\r\n" for n in (1, 2)
            ]
            assert seen[1]["lines"][:4] == [
                "EHLO mta.test", "MAIL FROM:<a@mta.test>", "RCPT TO:<b@mx.test>", "DATA"
            ]  # fmt: skip
            listed = subprocess.run(
                [sys.executable, "-m", "proxy", "cache", "list", "--json",
                 "--file", str(cache / "outbound.sqlite")],
                capture_output=True, text=True, timeout=30, check=False, cwd=ROOT,
            )  # fmt: skip
            assert listed.returncode == 0, listed.stderr
            (entry,) = json.loads(listed.stdout)
            assert entry["dest"] == "127.0.0.3:25" and entry["source"] == "127.0.0.1", entry
            podman("kill", "--signal", "TERM", proxy.name)
            assert proxy.wait_exit(GRACE + 20) == 0, proxy.logs()
            print("\n".join(sessions))
        finally:
            mx.kill()
            mx.wait(10)
            assert mx.stdout is not None
            mx.stdout.close()
