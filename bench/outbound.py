"""P6 (issue 13): outbound mode with real parts -- a Postfix 3.7 sender delivering to a native
Exim 4.96 MX behind the delay relay, directly and through the proxy's outbound mode.

Everything runs in one network namespace (tests/netns.py), as tests/integration/test_outbound.py
does it:

    Postfix --[127.0.0.5]:25-----------------------------------> relay "direct"    --> Exim
    Postfix --[127.0.0.4]:25 -REDIRECT-> proxy 127.0.0.1:10025 --> relay "proxy"     --> Exim
    Postfix --[127.0.0.6]:25 -REDIRECT-> proxy 127.0.0.1:10026 --> relay "proxy-tfo" --> Exim
                                         (outbound.tcp_fastopen = true)

Exim listens on 127.0.0.3:25 (`pipelining_connect_advertise_hosts = *`, `log_selector
+pipelining`, a certificate from a fresh CA: STARTTLS offered). Each relay is `python -m
bench.delay --handshake --fastopen --quickack --upstream-fastopen --trace --records FILE` in
the namespace, all three at the same RTT (`--upstream-fastopen`: a client's early bytes reach
Exim in the SYN of the relay's own connection, so Exim finds them when it accepts). The
REDIRECT rules (uid postfix) send Postfix's connections to .4 and .6 to the two proxies (root:
their own connections are not redirected), which read SO_ORIGINAL_DST and connect to that
relay themselves; the direct path is the relay alone. Postfix picks path and TLS by the
recipient's domain (`transport_maps`): transport `smtp` is cleartext, `smtp-tls` has
`smtp_tls_security_level = encrypt` with the test CA. One connection per message
(`smtp_connection_cache_on_demand = no`).

Paths: `direct`, `proxy`, `proxy-tfo` and, cleartext only, `direct-noquit`: the direct relay,
but Postfix's `smtp-keep` transport parks each connection in its connection cache
(`smtp_connection_cache_destinations`, 1 s, then closed without QUIT; never reused here: the
next message waits for the close) instead of pipelining QUIT behind the end of data. Exim 4.96
answers a dot with QUIT pipelined behind it about 200 ms late (cleartext; not inside TLS), and
Postfix pipelines QUIT whenever it will not reuse the connection: `direct` is what a lone
message costs, `direct-noquit` the round trips alone. The proxy holds a pipelined QUIT until the
verdict is relayed (docs/outbound.md), so it never meets that stall. `mx_dot_seconds`
(cleartext): how long the MX took to answer the end of data, as the relay saw it.

Per RTT: one unmeasured delivery per (TLS, path) first, two per proxy path at the first RTT
(the first through each proxy is its cache miss, Exim logs `L.`; the second a hit, which for
proxy-tfo fetches the relay's TFO cookie); then `--p6-messages` measured messages per (TLS,
path), taking turns message by message (the order rotated each time), one at a time, so that
load from elsewhere hits every path alike.

Timing. The relays emulate the TCP handshake (bench/delay.py `handshake`): a relay's accept
stands for the SYN, the server accepts 1.5 RTT later (0.5 RTT when the SYN carried data), so
the figures count round trips as the issue does (cleartext 5 direct, 3 early; STARTTLS 8 and
6). `seconds` is the relay's record (microseconds): from its accept to the delivery of the MX's
reply to the end of data to its client -- Postfix on the direct paths, the proxy on the others
(the proxy's local legs, Postfix <-> proxy on loopback, are outside it). That reply is the first
server chunk the relay read after Exim logged the message's `<=` line (`final_reply`): inside
TLS the relay cannot see the end of data; on cleartext the relay's own CRLF.CRLF tracking must
find the same chunk (`eod_seconds`, checked for every message). `postfix_seconds` is Postfix's
own view, `delays=a/b/c/d` on its status=sent line: c (connection setup: connect, greeting,
EHLO, STARTTLS) + d (transmission, up to the final reply); even with
`delay_logging_resolution_limit = 6` Postfix prints two significant digits (0.0027, 0.031,
0.15), a rounding of up to 1.7-5 % per value: a cross-check that includes the proxy's local
legs, too coarse to be the figure. `exim_flag`: the pipelining flag of Exim's `<=` line (the
session found by the relay's upstream port): `L*` early pipelining used, `L.` offered and not
used. `syn_data`: the relay saw data in the SYN (TCP Fast Open really used).

`--quickack`: the relays ACK every read at once. The relay's kernel, not the far end's, ACKs
what its client sends, and on loopback it may delay that ACK by 40 ms; Postfix writes its TLS
Finished and its EHLO as two small segments, and Nagle holds the EHLO until that ACK: a 40 ms
stall at 10 ms RTT (none at 50 or 100: it depends on the traffic's rhythm) on any path through
a relay. A real path would make Postfix wait one RTT for it instead; neither is emulated. The
proxy's own loopback socket to Postfix is the product's and keeps its kernel's behaviour.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.peers import stop_process
from tests.certs import write_tls_files
from tests.mta import (
    _MASTER_CF,
    EximReception,
    EximServer,
    Postfix,
    PostfixStatus,
    _backdate,
    _is_listening,
    _replace_file,
)
from tests.netns import Namespace, netns_missing
from tests.proxyproc import run_cli, to_toml

__all__ = [
    "PATHS",
    "TLS_MODES",
    "P6Row",
    "P6World",
    "cells",
    "median_ms",
    "p6_lines",
    "phase_p6",
    "run_p6",
]

WriteCsv = Callable[[Path, Sequence[Any]], None]
ROOT = Path(__file__).resolve().parents[1]

MX = "127.0.0.3"
PATHS = ("direct", "direct-noquit", "proxy", "proxy-tfo")
TLS_MODES = ("cleartext", "starttls")
RELAY_ADDRESS = {"direct": "127.0.0.5", "proxy": "127.0.0.4", "proxy-tfo": "127.0.0.6"}
RELAY_OF = {
    "direct": "direct",
    "direct-noquit": "direct",
    "proxy": "proxy",
    "proxy-tfo": "proxy-tfo",
}
PROXY_PORT = {"proxy": 10025, "proxy-tfo": 10026}
SMTPD_PORT = 2526  # the sender's own smtpd (unused; Postfix must listen somewhere)
WAIT = 30.0  # every wait on one delivery is bounded by this (seconds)
POLL = 0.01
# Exim logs `<=` (millisecond stamps, truncated) just before it sends the 250; allow for the
# truncation and a clock step between the processes. Far below the RTTs measured (>= 10 ms).
EXIM_SLACK = 0.002

SENDER = "sender@mta.test"
BODY = "Subject: p6\n\n" + ("x" * 76 + "\n") * 13  # about 1 KiB, as P1's

# The sender Postfix, as tests/integration/test_outbound.py's: one connection per message, no
# retry within the run, short timeouts; delays logged with every digit Postfix gives.
SENDER_SETTINGS = {
    "smtp_connection_cache_on_demand": "no",
    "queue_run_delay": "1s",
    "minimal_backoff_time": "120s",
    "maximal_backoff_time": "120s",
    "maximal_queue_lifetime": "1d",
    "bounce_queue_lifetime": "1d",
    "smtp_connect_timeout": "10s",
    "delay_logging_resolution_limit": "6",
}

# The STARTTLS transport: Postfix insists on TLS and verifies the chain against the test CA
# (it logs "Trusted TLS connection established to ...").
_TLS_SERVICE = """\
smtp-tls   unix  - - n -    - smtp
  -o smtp_tls_security_level=encrypt
  -o smtp_tls_CAfile={ca}
  -o smtp_tls_loglevel=1
smtp-keep  unix  - - n -    - smtp
  -o smtp_connection_cache_destinations={direct}
  -o smtp_connection_cache_time_limit=1s
"""

_DELAYS = re.compile(r"delays=([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+)")
_SESSION_PORT = re.compile(r"H=\S* ?\[[^\]]+\]:(\d+)")
_TFO_COUNTERS = (
    "TCPFastOpenActive",
    "TCPFastOpenActiveFail",
    "TCPFastOpenPassive",
    "TCPFastOpenPassiveFail",
    "TCPFastOpenCookieReqd",
)


def domain(path: str, tls: str) -> str:
    """The recipient domain that routes a message over `path` with `tls`."""
    return f"{path}.{tls}.p6.test"


def transport(path: str, tls: str) -> str:
    if tls == "starttls":
        return "smtp-tls"
    return "smtp-keep" if path == "direct-noquit" else "smtp"


def cells(tls_modes: Sequence[str], paths: Sequence[str]) -> list[tuple[str, str]]:
    """The (TLS, path) pairs measured: `direct-noquit` is cleartext only (inside TLS Exim
    does not stall on a pipelined QUIT)."""
    return [
        (t, p)
        for t in TLS_MODES
        if t in tls_modes
        for p in PATHS
        if p in paths and not (p == "direct-noquit" and t == "starttls")
    ]


@dataclass(frozen=True)
class P6Row:
    rtt_ms: float
    tls: str  # cleartext | starttls
    path: str  # direct | proxy | proxy-tfo
    message: int
    seconds: float  # relay: accept (the SYN) -> the MX's reply to the end of data delivered
    eod_seconds: float  # the same found by the relay's own CRLF.CRLF (cleartext only)
    mx_dot_seconds: float  # relay: end of data delivered to the MX -> its reply read (cleartext)
    postfix_seconds: float  # Postfix's delays c + d (two significant digits each)
    postfix_c: float
    postfix_d: float
    banner_seconds: float  # relay: accept -> the MX's banner delivered (to Postfix or proxy)
    exim_flag: str  # L*, L., L...
    exim_tls: bool  # Exim's <= line has X= (the message came over TLS)
    syn_data: bool  # the relay saw data in the SYN (TCP Fast Open used)
    syn_bytes: int
    syn_guessed: bool  # more than the SYN had come when the relay accepted (bench/delay.py)
    mx_syn_data: bool  # the relay's own SYN to Exim carried the early bytes (--upstream-fastopen)
    queue_id: str


# --------------------------------------------------------------------------- the parts


class _Process:
    """A long-running command in the namespace, its output in a log file."""

    def __init__(self, ns: Namespace, log_path: Path) -> None:
        self.ns = ns
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def _start(self, cmd: list[str], ready: Callable[[], bool], what: str) -> None:
        with self.log_path.open("ab") as log:
            self.proc = self.ns.popen(
                cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + WAIT
        while not ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{what} exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not listen within {WAIT}s:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc, timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class NsRelay(_Process):
    """`python -m bench.delay --handshake --fastopen --records FILE` in the namespace:
    LISTEN:25 -> the MX."""

    def __init__(
        self, ns: Namespace, directory: Path, path: str, rtt_ms: float, *, quickack: bool = True
    ) -> None:
        tag = f"relay-{path}-{rtt_ms:g}ms"  # path: a key of RELAY_ADDRESS
        super().__init__(ns, directory / f"{tag}.log")
        self.path = path
        self.quickack = quickack
        self.address = RELAY_ADDRESS[path]
        self.rtt_ms = rtt_ms
        self.records_path = directory / f"{tag}.jsonl"

    def start(self) -> NsRelay:
        cmd = [
            sys.executable, "-m", "bench.delay",
            "--listen", f"{self.address}:25", "--upstream", f"{MX}:25",
            "--rtt-ms", f"{self.rtt_ms:g}", "--handshake", "--fastopen",
            "--records", str(self.records_path), "--trace", "--upstream-fastopen",
        ]  # fmt: skip
        if self.quickack:
            cmd.append("--quickack")
        self._start(
            cmd,
            lambda: _is_listening(25, self.address, self.ns.proc_net),
            f"the {self.path} delay relay",
        )
        return self

    def records(self) -> list[dict[str, Any]]:
        if not self.records_path.exists():
            return []
        lines = self.records_path.read_text().splitlines()
        return [json.loads(ln) for ln in lines if ln.endswith("}")]

    def record_for(self, upstream_port: int, since: int, timeout: float = WAIT) -> dict[str, Any]:
        """The record of the relayed connection whose upstream end is `upstream_port` (the
        port Exim logged) among those after the first `since` (ports are reused), once the
        connection has closed."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.records()[since:] if r["upstream_port"] == upstream_port]
            if found:
                return found[-1]
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the {self.path} relay recorded no connection to the MX from port "
                    f"{upstream_port} within {timeout}s:\n{self.log()}"
                )
            time.sleep(POLL)


class NsOutboundProxy(_Process):
    """`python -m proxy serve` in outbound mode, in the namespace, as root."""

    def __init__(self, ns: Namespace, directory: Path, path: str) -> None:
        super().__init__(ns, directory / f"{path}.log")
        self.path = path
        self.port = PROXY_PORT[path]
        self.config_path = directory / f"{path}.toml"
        self.cache = directory / f"{path}.sqlite"

    def config(self) -> dict[str, dict[str, Any]]:
        return {
            "listen": {"plain": []},
            "upstream": {"address": "127.0.0.1:2525"},  # required, unused in outbound mode
            "metrics": {"listen": ""},
            "outbound": {
                "enabled": True,
                "listen": [f"127.0.0.1:{self.port}"],
                "cache": str(self.cache),
                "hosts": ["*"],
                "tcp_fastopen": self.path == "proxy-tfo",
            },
        }

    def start(self) -> NsOutboundProxy:
        self.config_path.write_text(to_toml(self.config()))
        checked = run_cli("check-config", str(self.config_path))
        if checked.returncode != 0:
            raise RuntimeError(f"check-config refuses {self.config_path}:\n{checked.stdout}")
        cmd = [sys.executable, "-m", "proxy", "serve", "--config", str(self.config_path)]
        self._start(
            cmd,
            lambda: _is_listening(self.port, "127.0.0.1", self.ns.proc_net),
            f"the {self.path} proxy",
        )
        return self

    def claims(self) -> list[str]:
        """The proxy's per-session log lines (`outbound S=... L* P=early ... RT=2 ...`)."""
        return [ln for ln in self.log().splitlines() if "pipeconnect.outbound outbound " in ln]


class SenderPostfix(Postfix):
    """tests/mta.py's sending Postfix (relayhost: the direct relay) with the P6 routes: a
    transport per (path, TLS), picked by the recipient's domain."""

    def __init__(self, directory: Path, ns: Namespace, ca: str) -> None:
        routes = ", ".join(
            f"{domain(p, t)}={transport(p, t)}:[{RELAY_ADDRESS[RELAY_OF[p]]}]:25"
            for t, p in cells(TLS_MODES, PATHS)
        )
        super().__init__(
            directory,
            SMTPD_PORT,
            proxy_protocol=False,
            forbid_unauth_pipelining=False,
            relayhost=f"[{RELAY_ADDRESS['direct']}]:25",
            netns=ns,
            extra={**SENDER_SETTINGS, "transport_maps": f"inline:{{ {routes} }}"},
        )
        self.ca = ca

    def write_config(self) -> None:
        super().write_config()
        services = _TLS_SERVICE.format(ca=self.ca, direct=RELAY_ADDRESS["direct"])
        master = _MASTER_CF.format(port=self.port) + services
        _replace_file(self.config_dir / "master.cf", master)
        _backdate(self.config_dir / "master.cf")


def tfo_counters(ns: Namespace) -> dict[str, int]:
    """The namespace's TcpExt TCPFastOpen* counters (/proc/net/netstat, as `nstat -az`)."""
    lines = (ns.proc_net / "netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], (int(v) for v in values.split()[1:]), strict=True))
            return {k: table.get(k, 0) for k in _TFO_COUNTERS}
    return dict.fromkeys(_TFO_COUNTERS, 0)


# --------------------------------------------------------------------------- the world


class P6World:
    """The namespace, Exim, the sender Postfix, the two proxies and the REDIRECT rules; the
    relays come and go per RTT (`relays(rtt_ms)`)."""

    def __init__(self, directory: Path, *, quickack: bool = True) -> None:
        self.dir = directory
        self.quickack = quickack
        self.ns = Namespace()
        self.exim: EximServer | None = None
        self.postfix: SenderPostfix | None = None
        self.proxies: dict[str, NsOutboundProxy] = {}
        self.relays: dict[str, NsRelay] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> P6World:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        self.ns.create()
        self._stack.callback(self.ns.destroy)
        files = write_tls_files(self.dir, "mx.test", MX, *RELAY_ADDRESS.values(), prefix="mx-")
        self.exim = EximServer(self.dir / "exim", 25, address=MX, netns=self.ns, tls=files)
        self._stack.callback(self.exim.stop)
        self.exim.start()
        for path, port in PROXY_PORT.items():
            self.ns.redirect(dest=RELAY_ADDRESS[path], dport=25, to_port=port)
            proxy = NsOutboundProxy(self.ns, self.dir, path)
            self._stack.callback(proxy.stop)
            self.proxies[path] = proxy.start()
        self.postfix = SenderPostfix(self.dir / "postfix", self.ns, files["ca"])
        self._stack.callback(self.postfix.stop)
        self.postfix.start()

    @contextlib.contextmanager
    def at_rtt(self, rtt_ms: float) -> Iterator[None]:
        """The three relays at `rtt_ms`, for the duration."""
        with contextlib.ExitStack() as stack:
            for path in RELAY_ADDRESS:
                relay = NsRelay(self.ns, self.dir, path, rtt_ms, quickack=self.quickack)
                stack.callback(relay.stop)
                self.relays[path] = relay.start()
            try:
                yield
            finally:
                self.relays = {}

    def deliver(self, path: str, tls: str) -> tuple[PostfixStatus, EximReception, dict[str, Any]]:
        """One message over `path` with `tls`: submitted, sent (else RuntimeError with the
        logs), received by Exim, and its relayed connection closed. Returns Postfix's status
        line, Exim's `<=` line and the relay's record."""
        assert self.postfix is not None and self.exim is not None
        marker = uuid.uuid4().hex
        msgid = f"{marker}@mta.test"
        rcpt = f"box@{domain(path, tls)}"
        head = f"From: <{SENDER}>\nTo: <{rcpt}>\nMessage-ID: <{msgid}>\n"
        mark, emark = self.postfix.log_mark(), self.exim.log_mark()
        relay = self.relays[RELAY_OF[path]]
        since = len(relay.records())  # the last message's connection has closed
        self.postfix.submit(SENDER, [rcpt], (head + BODY).encode())
        queue_id = self.postfix.queue_id(msgid, since=mark, timeout=WAIT)
        status = self._status(queue_id, mark)
        if status.status != "sent":
            raise RuntimeError(f"{path}/{tls}: not sent:\n{status.line}\n{self.diagnostics()}")
        got = self._reception(msgid, emark)
        port = _SESSION_PORT.search(got.line)
        if port is None:
            raise RuntimeError(f"no client port in Exim's line:\n{got.line}")
        record = relay.record_for(int(port[1]), since)
        return status, got, record

    def _status(self, queue_id: str, since: int) -> PostfixStatus:
        assert self.postfix is not None
        deadline = time.monotonic() + WAIT
        while True:
            found = [
                s
                for s in self.postfix.statuses(since)
                if s.queue_id == queue_id and s.agent.startswith("smtp")
            ]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise RuntimeError(f"no delivery attempt of {queue_id}\n{self.diagnostics()}")
            time.sleep(POLL)

    def _reception(self, msgid: str, since: int) -> EximReception:
        assert self.exim is not None
        deadline = time.monotonic() + WAIT
        while True:
            found = [r for r in self.exim.receptions(since) if r.header_id == msgid]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise RuntimeError(f"Exim logged no '<=' for {msgid}\n{self.diagnostics()}")
            time.sleep(POLL)

    def diagnostics(self) -> str:
        out = []
        if self.postfix is not None:
            out.append(f"--- Postfix maillog (tail):\n{self.postfix.maillog()[-6000:]}")
        if self.exim is not None:
            out.append(f"--- Exim mainlog (tail):\n{self.exim.mainlog()[-6000:]}")
        for name, proxy in self.proxies.items():
            out.append(f"--- proxy {name} (tail):\n{proxy.log()[-3000:]}")
        for name, relay in self.relays.items():
            out.append(f"--- relay {name}:\n{relay.log()[-2000:]}")
        out.append(f"--- nat OUTPUT:\n{self.ns.nat_rules()}")
        return "\n".join(out)


# --------------------------------------------------------------------------- the run


def _row(
    rtt_ms: float,
    tls: str,
    path: str,
    i: int,
    status: PostfixStatus,
    got: EximReception,
    rec: dict[str, Any],
) -> P6Row:
    m = _DELAYS.search(status.line)
    c, d = (float(m[3]), float(m[4])) if m else (float("nan"), float("nan"))

    def since_accept(key: str) -> float:
        value = rec.get(key)
        return float(value) - float(rec["accepted"]) if value is not None else float("nan")

    return P6Row(
        rtt_ms=rtt_ms,
        tls=tls,
        path=path,
        message=i,
        seconds=final_reply(rec, got),
        eod_seconds=since_accept("final_reply"),
        mx_dot_seconds=mx_dot(rec),
        postfix_seconds=c + d,
        postfix_c=c,
        postfix_d=d,
        banner_seconds=since_accept("first_reply"),
        exim_flag=got.pipelining_flag,
        exim_tls=got.tls,
        syn_data=bool(rec.get("syn_data")),
        syn_bytes=int(rec.get("syn_bytes", 0)),
        syn_guessed=bool(rec.get("syn_guessed")),
        mx_syn_data=bool(rec.get("upstream_syn_data")),
        queue_id=status.queue_id,
    )


def exim_time(line: str) -> float:
    """The time stamp of an Exim log line (log_selector +millisec, local time) as time.time()."""
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()


def final_reply(rec: dict[str, Any], got: EximReception) -> float:
    """Seconds from the relay's accept to the delivery of the MX's reply to the message: the
    first server chunk the relay read after Exim logged the message's `<=` line (less
    EXIM_SLACK; the previous server chunk, the 354, was read a round trip earlier). Works
    inside TLS too, where the relay cannot see the end of data; on cleartext it must find the
    chunk the relay's own CRLF.CRLF tracking found (`eod_seconds`)."""
    logged = exim_time(got.line) - float(rec["wall_offset"]) - EXIM_SLACK
    for read, delivered in rec["replies"]:
        if read >= logged:
            return float(delivered) - float(rec["accepted"])
    return float("nan")


def mx_dot(rec: dict[str, Any]) -> float:
    """Seconds from the end of data delivered to the MX to the relay reading its reply."""
    sent, final = rec.get("end_of_data_sent"), rec.get("final_reply")
    if sent is None or final is None:
        return float("nan")
    read = [r for r, delivered in rec["replies"] if delivered == final]
    return float(read[0]) - float(sent) if read else float("nan")


def _check(row: P6Row, got: EximReception) -> None:
    if row.exim_tls != (row.tls == "starttls"):
        raise RuntimeError(f"{row.path}/{row.tls}: Exim's TLS does not match:\n{got.line}")
    if math.isnan(row.seconds):
        raise RuntimeError(f"{row.path}/{row.tls}: no server chunk after Exim's <=: {row}")
    if row.tls == "cleartext" and abs(row.seconds - row.eod_seconds) > 1e-6:
        raise RuntimeError(
            f"{row.path}/{row.tls}: the reply after Exim's <= is not the reply to the end of "
            f"data the relay saw: {row}\n{got.line}"
        )


def run_p6(
    world: P6World,
    rtts_ms: Sequence[float],
    messages: int,
    tls_modes: Sequence[str] = TLS_MODES,
    paths: Sequence[str] = PATHS,
) -> tuple[list[P6Row], list[P6Row]]:
    """Returns (measured rows, warm-up rows)."""
    rows: list[P6Row] = []
    warmup: list[P6Row] = []
    todo = cells(tls_modes, paths)
    for rtt in rtts_ms:
        with world.at_rtt(rtt):
            for tls, path in todo:
                # A proxy's first session is its cache miss, its first hit fetches the
                # relay's TFO cookie: two unmeasured messages on the first RTT.
                first = rtt == rtts_ms[0] and path.startswith("proxy")
                for _ in range(2 if first else 1):
                    status, got, rec = world.deliver(path, tls)
                    warmup.append(_row(rtt, tls, path, -1, status, got, rec))
            for i in range(messages):
                k = i % len(todo)
                for tls, path in todo[k:] + todo[:k]:
                    status, got, rec = world.deliver(path, tls)
                    row = _row(rtt, tls, path, i, status, got, rec)
                    _check(row, got)
                    rows.append(row)
        for line in p6_lines([r for r in rows if r.rtt_ms == rtt]):
            print(f"  {line}", flush=True)
    return rows, warmup


def median_ms(rows: Sequence[P6Row], attr: str = "seconds") -> float:
    values = [getattr(r, attr) * 1000 for r in rows]
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def p6_lines(rows: Sequence[P6Row]) -> list[str]:
    """One line per (RTT, TLS, path but direct): "P6 rtt=50ms cleartext proxy/direct = 0.60x
    (median a ms vs b ms) L* 20/20 ...", against `direct` and (cleartext) `direct-noquit`."""
    out = []
    for rtt in sorted({r.rtt_ms for r in rows}):
        for tls in TLS_MODES:
            cell = [r for r in rows if r.rtt_ms == rtt and r.tls == tls]
            by_path = {p: [r for r in cell if r.path == p] for p in PATHS}
            if not by_path["direct"]:
                continue
            base = median_ms(by_path["direct"])
            pf_base = median_ms(by_path["direct"], "postfix_seconds")
            noquit = by_path["direct-noquit"]
            for path in PATHS[1:]:
                mine = by_path[path]
                if not mine:
                    continue
                med, pf = median_ms(mine), median_ms(mine, "postfix_seconds")
                line = (
                    f"P6 rtt={rtt:g}ms {tls} {path}/direct = {med / base:.2f}x "
                    f"(median {med:.1f} ms vs {base:.1f} ms)"
                )
                if path == "direct-noquit":
                    dots = (
                        median_ms(by_path["direct"], "mx_dot_seconds"),
                        median_ms(mine, "mx_dot_seconds"),
                    )
                    line += f"; the MX answered the dot in {dots[0]:.1f} vs {dots[1]:.1f} ms"
                else:
                    early = sum(r.exim_flag.startswith("L*") for r in mine)
                    line += f" L* {early}/{len(mine)}"
                    if path == "proxy-tfo":
                        line += f" TFO {sum(r.syn_data for r in mine)}/{len(mine)}"
                    if noquit:
                        nq = median_ms(noquit)
                        line += f"; /direct-noquit = {med / nq:.2f}x ({nq:.1f} ms)"
                line += f"; Postfix c+d {pf / pf_base:.2f}x ({pf:.0f} vs {pf_base:.0f} ms)"
                out.append(line)
    return out


def phase_p6(args: argparse.Namespace, workdir: Path, out: Path, write_csv: WriteCsv) -> list[str]:
    from bench import report

    missing = netns_missing()
    if missing:
        raise RuntimeError(f"P6 needs network namespaces: missing {', '.join(missing)}")
    rtts = [float(r) for r in args.p6_rtts]
    base = workdir / "p6"
    if base.exists():
        shutil.rmtree(base)
    with P6World(base) as world:
        before = tfo_counters(world.ns)
        rows, warmup = run_p6(world, rtts, args.p6_messages, args.p6_tls, args.p6_paths)
        after = tfo_counters(world.ns)
        claims = {path: proxy.claims() for path, proxy in world.proxies.items()}
    write_csv(out / "p6.csv", rows)
    write_csv(out / "p6-warmup.csv", warmup)
    tfo = {k: after[k] - before[k] for k in after}
    (out / "p6.json").write_text(
        json.dumps(
            {
                "tfo_counters": tfo,
                "warmup_flags": [(r.rtt_ms, r.tls, r.path, r.exim_flag) for r in warmup],
                "proxy_sessions": {p: len(c) for p, c in claims.items()},
                "proxy_round_trips_claimed": {
                    p: sorted({m for ln in c for m in re.findall(r" RT=(\d+)", ln)})
                    for p, c in claims.items()
                },
            },
            indent=2,
        )
        + "\n"
    )
    lines = report.p6_table(rows, warmup, tfo)
    report.p6_plot(rows, out)
    return lines
