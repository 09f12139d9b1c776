"""A throw-away network namespace for tests that redirect an MTA's own connections.

`Namespace` (a context manager) makes a namespace with a unique name, brings `lo` up (so
127.0.0.0/8 and ::1 are usable in it), enables TCP Fast Open for listeners in it, and on
exit kills every process still in it (`ip netns pids`) and deletes it -- also when the test
failed. Commands run in it with `ns.run(cmd)` / `ns.popen(cmd)` or any command line prefixed
with `ns.exec_prefix` (`ip netns exec NAME`); everything they start stays in it.

`ns.redirect(...)` installs the NAT rule of outbound mode: the connections of one uid to
one destination port are redirected to a local port (iptables, or ip6tables for IPv6). A
listener reads the original destination with `SO_ORIGINAL_DST` (`original_dst()`).

Root, iproute2's `ip` and iptables (with ip6tables) are needed: `netns_missing()` says
what is not there, `needs_netns` skips a test without it -- except under CI=true, where the
test runs and fails with the list (tests/needs.py: CI never passes by skipping).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tests.needs import in_ci, skip_or_fail

IP = "ip"
IPTABLES = "iptables"
IP6TABLES = "ip6tables"

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value

_PREFIX = "pcp-"  # pcp-<pid>-<n>: the pid lets a later run delete what a killed run left
_counter = itertools.count()


def netns_missing() -> list[str]:
    """What network-namespace tests need but this machine lacks (empty list: all there)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root privileges")
    for tool, package in ((IP, "iproute2"), (IPTABLES, "iptables"), (IP6TABLES, "iptables")):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (Debian package {package})")
    if not Path("/proc/self/ns/net").exists():
        missing.append("network namespaces (/proc/self/ns/net)")
    return missing


def require_netns() -> None:
    """Skip the current test without namespace support (fail under CI=true)."""
    missing = netns_missing()
    if missing:
        skip_or_fail(
            f"network namespace tests need {', '.join(missing)}; run as root after "
            "`bash .ci/install`"
        )


# Evaluated at import. Under CI the test is not skipped: Namespace() then fails with the list.
needs_netns = pytest.mark.skipif(
    not in_ci() and bool(netns_missing()),
    reason=f"network namespaces unavailable (missing: {', '.join(netns_missing())})",
)


IP_TIMEOUT = 30.0  # seconds for one `ip` command


def run_command(cmd: list[str], *, timeout: float = 60, check: bool = True) -> str:
    """Run a command, return stdout+stderr; raise with the output on failure."""
    proc = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
    )
    out = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{out}")
    return out


def _pids(name: str) -> list[int]:
    out = run_command([IP, "netns", "pids", name], timeout=IP_TIMEOUT, check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def _list() -> list[str]:
    out = run_command([IP, "netns", "list"], timeout=IP_TIMEOUT, check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _destroy(name: str, timeout: float = 5) -> None:
    """Kill everything in namespace `name` (SIGKILL, until none is left: a dying daemon may
    fork), then delete it."""
    deadline = time.monotonic() + timeout
    while (pids := _pids(name)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    run_command([IP, "netns", "del", name], timeout=IP_TIMEOUT, check=False)


def _sweep_stale() -> None:
    """Delete namespaces a killed earlier run left (their creator's pid is gone)."""
    for name in _list():
        m = re.fullmatch(rf"{_PREFIX}(\d+)-\d+", name)
        if m and int(m[1]) != os.getpid() and not Path(f"/proc/{m[1]}").exists():
            _destroy(name)


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination a REDIRECTed connection was made to (`SO_ORIGINAL_DST`)."""
    if sock.family == socket.AF_INET6:
        try:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        except OSError:
            # An IPv4 client on a dual-stack socket: only the IPv4 option answers.
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        else:
            # struct sockaddr_in6: family, port (network order), flowinfo, address, scope
            port = struct.unpack("!H", raw[2:4])[0]
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    else:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack("!2xH4s", raw[:8])
    return socket.inet_ntoa(packed), port


class Namespace:
    """A fresh network namespace, deleted (with all its processes) on exit.

    `exec_prefix`: the command prefix that runs a program in it. `proc_net`: a /proc/PID/net
    directory that shows the namespace's sockets (of a `sleep` kept in it for that), so a
    test can see that a daemon listens without connecting to it.
    """

    def __init__(self, name: str | None = None, *, tcp_fastopen: bool = True) -> None:
        self.name = name or f"{_PREFIX}{os.getpid()}-{next(_counter)}"
        self.tcp_fastopen = tcp_fastopen
        self.exec_prefix = [IP, "netns", "exec", self.name]
        self._anchor: subprocess.Popen[bytes] | None = None
        self.created = False

    def __repr__(self) -> str:
        return f"<Namespace {self.name}>"

    # -- life cycle

    def create(self) -> Namespace:
        require_netns()
        missing = netns_missing()
        if missing:  # CI=true: require_netns did not skip
            raise RuntimeError(f"cannot make a network namespace: missing {', '.join(missing)}")
        _sweep_stale()
        run_command([IP, "netns", "add", self.name], timeout=IP_TIMEOUT)
        self.created = True
        try:
            self.run([IP, "link", "set", "lo", "up"])
            if self.tcp_fastopen:
                self.sysctl("net.ipv4.tcp_fastopen", "3")  # TFO for listeners too
            self._anchor = self.popen(["sleep", "infinity"], stdout=subprocess.DEVNULL)
            addrs = self.run([IP, "-6", "addr", "show", "dev", "lo"])
            if "::1/128" not in addrs:
                raise RuntimeError(f"{self!r}: no ::1 on lo after `ip link set lo up`:\n{addrs}")
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        """Kill every process in the namespace and delete it (idempotent)."""
        if self.created:
            _destroy(self.name)
            self.created = False
        if self._anchor is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._anchor.wait(2)
            self._anchor = None

    def __enter__(self) -> Namespace:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    # -- running things in it

    def command(self, cmd: list[str]) -> list[str]:
        return [*self.exec_prefix, *cmd]

    def run(self, cmd: list[str], *, timeout: float = 30, check: bool = True) -> str:
        """Run `cmd` in the namespace; its stdout+stderr (raise with it on failure)."""
        return run_command(self.command(cmd), timeout=timeout, check=check)

    def popen(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start `cmd` in the namespace (`ip netns exec` execs it: the pid is the program's).
        stdin is /dev/null unless given."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.command(cmd), **kwargs)

    def sysctl(self, name: str, value: str) -> None:
        """Set a per-namespace sysctl (`sysctl -w` without needing procps: /proc/sys is
        the namespace's own for a process in it)."""
        path = "/proc/sys/" + name.replace(".", "/")
        self.run(["sh", "-c", f'echo "$1" > {path}', "sh", value])

    def allow_unprivileged_low_ports(self) -> None:
        """`net.ipv4.ip_unprivileged_port_start = 0` in the namespace (IPv6 too): any user
        may bind port 25 there. An Exim daemon run with `-C` (an untrusted config) drops
        root when it re-executes itself on SIGHUP, and could not listen on 25 again."""
        self.sysctl("net.ipv4.ip_unprivileged_port_start", "0")

    def pids(self) -> list[int]:
        return _pids(self.name)

    @property
    def proc_net(self) -> Path:
        """/proc/PID/net of a process in the namespace: its tcp, tcp6... tables."""
        if self._anchor is None:
            raise RuntimeError(f"{self!r} is not created")
        return Path(f"/proc/{self._anchor.pid}/net")

    # -- interception

    def redirect(
        self,
        *,
        uid_owner: str | int = "postfix",
        dest: str = "127.0.0.3",
        dport: int = 25,
        to_port: int,
        ipv6: bool = False,
    ) -> list[str]:
        """Redirect `uid_owner`'s TCP connections to dest:dport to local port `to_port`
        (nat OUTPUT REDIRECT: 127.0.0.1, or ::1 with ipv6=True). Returns the rule, as
        `iptables -t nat -A` took it. Connections from other users are left alone."""
        rule = [
            "OUTPUT", "-p", "tcp", "-d", dest, "--dport", str(dport),
            "-m", "owner", "--uid-owner", str(uid_owner),
            "-j", "REDIRECT", "--to-ports", str(to_port),
        ]  # fmt: skip
        self.run([IP6TABLES if ipv6 else IPTABLES, "-w", "-t", "nat", "-A", *rule])
        return rule

    def nat_rules(self, *, ipv6: bool = False) -> str:
        """The nat OUTPUT chain with packet counters (`iptables -L -n -v`), for diagnostics."""
        tool = IP6TABLES if ipv6 else IPTABLES
        return self.run([tool, "-w", "-t", "nat", "-L", "OUTPUT", "-n", "-v"], check=False)


__all__ = [
    "SO_ORIGINAL_DST",
    "Namespace",
    "needs_netns",
    "netns_missing",
    "original_dst",
    "require_netns",
    "run_command",
]
