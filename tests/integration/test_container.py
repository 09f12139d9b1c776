"""The product's container image, built and run for real with podman.

There is no Docker engine here and no registry to pull a base from, so the image is built
from a local Debian base made by debootstrap (`.ci/install.d/container.sh`) and run with
runc on the host network in front of the test Postfix (PROXY protocol on,
`smtpd_forbid_unauth_pipelining = yes`). A real Exim client delivers through it, learning
the keyword the first time and pipelining early the second.

Skipped (with the reason) when podman or the base image is missing, except with CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mta import EximClient, Postfix, deliveries, free_port
from tests.proxyproc import to_toml

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("PIPECONNECT_BASE_IMAGE", "localhost/python-base:3.11")
IMAGE = "localhost/pipeconnect-proxy:test"
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


@pytest.fixture(scope="module")
def image() -> str:
    """Build the image (layers cached between runs: dependencies before the source)."""
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
            IMAGE,
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    print(f"image {IMAGE} built in {time.monotonic() - started:.1f}s, {size / 1e6:.0f} MB")
    return IMAGE


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
    assert set(config["ExposedPorts"]) == {"25/tcp", "465/tcp", "9464/tcp"}
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
    ok.wait_log("listening on 0.0.0.0:25")
    top = podman("top", ok.name, "user", "args").stdout
    assert str(UID) in top or "pipeconnect" in top, top
    podman("kill", "--signal", "TERM", ok.name)
    assert ok.wait_exit(GRACE + 20) == 0, ok.logs()
