"""Processes the benchmarks start on loopback besides the MTAs of tests/mta.py: HAProxy, Postfix's
smtp-sink and smtp-source, and the proxy itself (tests/proxyproc.py). Plain subprocess, no trio.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.mta import _is_listening, free_port
from tests.proxyproc import ProxyProcess

HAPROXY = "/usr/sbin/haproxy"
SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
HAPROXY_MAXCONN = 9000  # it asks for about twice this many descriptors; the hard limit is 20000
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

__all__ = [
    "HAPROXY",
    "SMTP_SINK",
    "SMTP_SOURCE",
    "HAProxy",
    "SmtpSink",
    "bench_proxy",
    "cpu_seconds",
    "missing_peers",
    "raise_nofile",
    "rss_bytes",
    "stop_process",
    "wait_listening",
]


def missing_peers() -> list[str]:
    return [p for p in (HAPROXY, SMTP_SINK, SMTP_SOURCE) if not os.access(p, os.X_OK)]


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by every process we start)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def wait_listening(
    port: int, proc: subprocess.Popen[bytes] | None, what: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not _is_listening(port):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not listening on 127.0.0.1:{port} after {timeout}s")
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; nothing if it is gone already."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _Child:
    """What the peers below share: the process they started, its pid, stopping it."""

    proc: subprocess.Popen[bytes] | None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


@dataclass
class HAProxy(_Child):
    """HAProxy 2.6 in TCP mode on 127.0.0.1, one backend, optionally send-proxy-v2."""

    dir: Path
    upstream_port: int
    send_proxy: bool = True
    threads: int = 2
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        proxy = " send-proxy-v2" if self.send_proxy else ""
        return f"""\
global
    maxconn {HAPROXY_MAXCONN}
    nbthread {self.threads}
defaults
    mode tcp
    maxconn {HAPROXY_MAXCONN}
    timeout connect 10s
    timeout client 600s
    timeout server 600s
frontend smtp
    bind 127.0.0.1:{self.port}
    default_backend mta
backend mta
    server mta 127.0.0.1:{self.upstream_port}{proxy} maxconn {HAPROXY_MAXCONN}
"""

    def start(self) -> HAProxy:
        self.port = self.port or free_port()
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg = self.dir / f"haproxy-{self.port}.cfg"
        cfg.write_text(self.config())
        log = (self.dir / f"haproxy-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(
            [HAPROXY, "-f", str(cfg), "-db"], stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        log.close()
        wait_listening(self.port, self.proc, "haproxy", 10)
        return self


@dataclass
class SmtpSink(_Child):
    """Postfix's smtp-sink on 127.0.0.1: answers everything, stores nothing. No PROXY protocol."""

    dir: Path
    max_sessions: int = 256
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    options: tuple[str, ...] = ()  # more smtp-sink options, e.g. ("-d", dump template)

    def start(self) -> SmtpSink:
        self.port = self.port or free_port()
        self.dir.mkdir(parents=True, exist_ok=True)
        log = (self.dir / f"smtp-sink-{self.port}.log").open("ab")
        cmd = [SMTP_SINK, "-u", "postfix", "-m", str(self.max_sessions), "-h", "sink.test"]
        cmd += self.options
        cmd += [f"127.0.0.1:{self.port}", "4096"]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        wait_listening(self.port, self.proc, "smtp-sink", 10)
        return self


@dataclass
class Floor(_Child):
    """A relay that makes no SMTP decisions (bench/floors.py): ``trio``, ``epoll`` or
    ``epoll-smtp``."""

    kind: str
    upstream_port: int
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Floor:
        self.port = self.port or free_port()
        cmd = [sys.executable, "-m", "bench.floors", self.kind, str(self.port)]
        self.proc = subprocess.Popen([*cmd, str(self.upstream_port)], stdin=subprocess.DEVNULL)
        wait_listening(self.port, self.proc, f"{self.kind} floor relay", 10)
        return self


def bench_proxy(
    workdir: Path,
    upstream_port: int,
    *,
    client_identity: str,
    max_sessions: int = 20000,
    workers: int = 1,
    fastio: bool = True,
    limits: dict[str, object] | None = None,
    **sections: dict[str, object],
) -> ProxyProcess:
    """The proxy as users run it (`python -m proxy serve`), limits raised for load tests.
    ``fastio=False``: trio's own socket calls only (PIPECONNECT_FASTIO=0), for comparison."""
    workdir.mkdir(parents=True, exist_ok=True)
    proc = ProxyProcess(
        workdir,
        upstream_port,
        upstream={"client_identity": client_identity},
        limits={
            "max_sessions": max_sessions,
            "max_sessions_per_client": max_sessions,
            **(limits or {}),
        },
        server={"workers": workers},
        **sections,
    )
    saved = os.environ.get("PIPECONNECT_FASTIO")
    os.environ["PIPECONNECT_FASTIO"] = "1" if fastio else "0"  # inherited by the process
    try:
        return proc.start()
    finally:
        if saved is None:
            del os.environ["PIPECONNECT_FASTIO"]
        else:
            os.environ["PIPECONNECT_FASTIO"] = saved
