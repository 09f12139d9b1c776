"""Outbound mode end to end, with real parts only: a Postfix 3.7 SENDER whose smtp(8)
client's port-25 connections are redirected by an iptables nat OUTPUT rule (uid postfix) to
the proxy's outbound listener, and a native Exim 4.96 MX that offers PIPECONNECT.

Everything runs in a network namespace made per test (tests/netns.py): Exim listens on
127.0.0.3:25 (or [::1]:25), Postfix relays everything to `[127.0.0.3]:25`, the REDIRECT rule
sends Postfix's connections to 127.0.0.1:10025 (or [::1]:10025), where `python -m proxy serve`
(started as root in the namespace, so its own connections to the MX are not redirected)
reads SO_ORIGINAL_DST and connects to the MX itself.

What is judged, from the outside only:
- Exim's mainlog `<=` lines (log_selector +pipelining): `L.` = PIPECONNECT advertised and
  not used (the proxy relayed and learned), `L*` = early pipelining used (a cache hit), `L`
  = pipelining without PIPECONNECT on offer; a trailing `-` (`L.-`) = the client's
  commands reached Exim one at a time (tests/mta.py `EximReception`);
- Postfix's maillog `status=` lines: `sent`, `deferred` (fine when the MX changed), never
  `bounced` for a message the MX did not refuse;
- the bodies Exim stored (a Maildir), byte for byte, exactly once per submission.

The first tests prove the harness without the proxy (direct delivery; a trivial Python
forwarder behind the same REDIRECT rule); the rest test the product's outbound mode.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.certs import write_tls_files
from tests.mta import EximReception, EximServer, Postfix, PostfixStatus, _is_listening
from tests.netns import Namespace, needs_netns
from tests.proxyproc import run_cli, to_toml

pytestmark = needs_netns

ROOT = Path(__file__).resolve().parents[2]
MX4, MX6 = "127.0.0.3", "::1"
PROXY_PORT = 10025
POSTFIX_SMTPD_PORT = 2526  # the sender's own smtpd (the address-verification test uses it)
WAIT = 20  # every wait on a delivery is bounded by this (seconds)

# The sender Postfix. Timers: a deferred message is not retried within a test (a retry would
# meet a changed MX without the cache and could then rightly bounce, as it does directly);
# the smtp client's timeouts are short so that a stuck proxy shows as a deferral in time.
SENDER_DEFAULTS = {
    "smtp_connection_cache_on_demand": "no",  # one connection per message unless asked
    "queue_run_delay": "1s",
    "minimal_backoff_time": "120s",
    "maximal_backoff_time": "120s",
    "maximal_queue_lifetime": "1d",
    "bounce_queue_lifetime": "1d",
    "smtp_connect_timeout": "5s",
    "smtp_helo_timeout": "10s",
    "smtp_mail_timeout": "10s",
    "smtp_rcpt_timeout": "10s",
    "smtp_data_init_timeout": "10s",
    "smtp_data_xfer_timeout": "10s",
    "smtp_data_done_timeout": "10s",
    "smtp_quit_timeout": "5s",
    "smtp_starttls_timeout": "10s",
}

# A body that a byte-mangling relay would damage: dot-stuffing (a lone "." and leading dots),
# trailing white space, a tab, an empty line, a long line.
BODY_TEMPLATE = (
    "marker: {marker}\n"
    "Line one.\n.\n..two dots\n.leading dot\ntrailing spaces   \n\ttab\n\n"
    + "x" * 900
    + "\nlast line of {marker}\n"
)

_PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b")


# --------------------------------------------------------------------------- the proxy


class OutboundProxy:
    """`python -m proxy serve --config FILE` in outbound mode, in the namespace, as root."""

    def __init__(
        self,
        ns: Namespace,
        directory: Path,
        *,
        listen: list[str],
        cache: Path,
        workers: int = 1,
        sections: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.ns = ns
        self.dir = directory
        self.listen = listen
        self.cache = cache
        self.workers = workers
        self.sections = sections or {}
        self.config_path = directory / "outbound.toml"
        self.log_path = directory / "proxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, dict[str, Any]]:
        base: dict[str, dict[str, Any]] = {
            "listen": {"plain": []},
            "upstream": {"address": "127.0.0.1:2525"},  # required, unused in outbound mode
            "metrics": {"listen": ""},
            "outbound": {
                "enabled": True,
                "listen": self.listen,
                "cache": str(self.cache),
                "hosts": ["*"],
            },
            "server": {"workers": self.workers},
        }
        for name, values in self.sections.items():
            base.setdefault(name, {}).update(values)
        return base

    def start(self, timeout: float = WAIT) -> OutboundProxy:
        self.config_path.write_text(to_toml(self.config()))
        checked = run_cli("check-config", str(self.config_path))
        assert checked.returncode == 0, (
            f"`python -m proxy check-config` refuses the outbound test configuration:\n"
            f"{checked.stdout}{checked.stderr}\n--- config:\n{self.config_path.read_text()}"
        )
        with self.log_path.open("ab") as log:
            self.proc = self.ns.popen(
                [sys.executable, "-m", "proxy", "serve", "--config", str(self.config_path)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not all(self._listening(a) for a in self.listen):
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the proxy exited {self.proc.returncode} instead of serving outbound mode "
                    f"on {self.listen}\n--- its output:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the proxy did not listen on its outbound address(es) {self.listen} within "
                    f"{timeout}s (is outbound mode implemented?)\n--- its output:\n{self.log()}"
                )
            time.sleep(0.05)
        return self

    def _listening(self, address: str) -> bool:
        host, _, port = address.rpartition(":")
        return _is_listening(int(port), host.strip("[]"), self.ns.proc_net)

    def stop(self, timeout: float = 10) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def problems(self) -> list[str]:
        """The WARNING/ERROR lines of its output."""
        return [ln for ln in self.log().splitlines() if _PROBLEM.search(ln)]

    def cache_entries(self) -> list[dict[str, Any]]:
        """`python -m proxy cache list --config FILE --json`."""
        done = run_cli("cache", "list", "--config", str(self.config_path), "--json")
        assert done.returncode == 0, f"cache list failed:\n{done.stdout}{done.stderr}"
        entries: list[dict[str, Any]] = json.loads(done.stdout)
        return entries

    def usable_entries(self, dest: str) -> list[dict[str, Any]]:
        """Entries for `dest` that hold replies to serve (a struck entry keeps none)."""
        return [e for e in self.cache_entries() if e["dest"] == dest and e.get("ehlo")]

    def wait_learned(self, dest: str, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not (found := self.usable_entries(dest)):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the proxy did not learn {dest} within {timeout}s after a delivery through "
                    f"it; cache list: {self.cache_entries()}\n--- proxy output:\n{self.log()}"
                )
            time.sleep(0.2)
        return found[0]


# --------------------------------------------------------------------------- one test's world


@dataclass
class Sent:
    """One submission: what went in, and how to find it again."""

    message_id: str
    marker: str
    body: bytes = field(repr=False)
    queue_id: str = ""


@dataclass
class World:
    dir: Path
    ns: Namespace
    exim: EximServer
    postfix: Postfix
    mx: str
    proxy: OutboundProxy | None = None
    sent: list[Sent] = field(default_factory=list)

    @property
    def dest(self) -> str:
        """The MX as the proxy's cache names it."""
        return f"[{self.mx}]:25" if ":" in self.mx else f"{self.mx}:25"

    def submit(self, *, pad: int = 0, rcpt: str = "rcpt@dest.test") -> Sent:
        """Queue one message (unique Message-ID and marker; `pad` extra body bytes)."""
        marker = uuid.uuid4().hex
        body = BODY_TEMPLATE.format(marker=marker)
        if pad:
            body += ("p" * 70 + "\n") * (pad // 71 + 1)
        msgid = f"{marker}@mta.test"
        head = (
            f"From: <sender@mta.test>\nTo: <{rcpt}>\nSubject: outbound {len(self.sent) + 1}\n"
            f"Message-ID: <{msgid}>\n\n"
        )
        sub = Sent(msgid, marker, body.encode())
        mark = self.postfix.log_mark()
        self.postfix.submit("sender@mta.test", [rcpt], head.encode() + sub.body)
        sub.queue_id = self.postfix.queue_id(msgid, since=mark, timeout=WAIT)
        self.sent.append(sub)
        return sub

    def submit_held(self, n: int) -> list[Sent]:
        """With `defer_transports = smtp`: queue `n` messages and wait until each sits in
        the deferred queue ("deferred transport"), so that one `flush()` sends them all
        (a flush before that finds nothing to do, and the backoff keeps it there)."""
        subs = [self.submit() for _ in range(n)]
        deadline = time.monotonic() + WAIT
        while True:
            held = {
                s.queue_id
                for s in self.postfix.statuses(kinds="deferred")
                if "deferred transport" in s.reason
            }
            if all(sub.queue_id in held for sub in subs):
                return subs
            if time.monotonic() > deadline:
                raise AssertionError(f"messages not held by defer_transports\n{self}")
            time.sleep(0.05)

    def outcome(self, sub: Sent, timeout: float = WAIT) -> PostfixStatus:
        """The first delivery attempt's status line for `sub` (sent, deferred, bounced)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [
                s
                for s in self.postfix.statuses()
                if s.queue_id == sub.queue_id
                and s.agent not in ("virtual", "local")
                # "deferred transport" (defer_transports) is not an attempt
                and "deferred transport" not in s.reason
            ]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no delivery attempt for {sub} within {timeout}s\n{self}")
            time.sleep(0.05)

    def deliver(self, *, pad: int = 0) -> tuple[Sent, PostfixStatus]:
        sub = self.submit(pad=pad)
        return sub, self.outcome(sub)

    def send_ok(self) -> tuple[Sent, EximReception]:
        """Submit one message; assert Postfix sent it and Exim received it; return both."""
        sub, status = self.deliver()
        assert status.status == "sent", f"{status.line}\n{self}"
        return sub, self.reception(sub)

    def reception(self, sub: Sent, timeout: float = WAIT) -> EximReception:
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.exim.receptions() if r.header_id == sub.message_id]
            if found:
                assert len(found) == 1, f"Exim received {sub.message_id} {len(found)} times"
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"Exim logged no '<=' for {sub.message_id}\n{self}")
            time.sleep(0.05)

    def received_ids(self) -> list[str]:
        return [r.header_id for r in self.exim.receptions()]

    def assert_stored_once(self, subs: list[Sent]) -> None:
        """Each of `subs` is in Exim's Maildir exactly once, its body byte for byte."""
        stored: list[bytes] = []
        deadline = time.monotonic() + WAIT
        while True:
            stored = self.exim.stored_messages()
            if all(sum(s.marker.encode() in m for m in stored) >= 1 for s in subs):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for sub in subs:
            copies = [m for m in stored if sub.marker.encode() in m]
            assert len(copies) == 1, f"{sub.message_id} stored {len(copies)} times\n{self}"
            _, sep, body = copies[0].partition(b"\n\n")
            assert sep, copies[0]
            assert body == sub.body, f"body of {sub.message_id} changed:\n{body!r}\n{sub.body!r}"

    def assert_never_bounced(self) -> None:
        bounced = self.postfix.statuses(kinds="bounced")
        assert not bounced, "Postfix bounced:\n" + "\n".join(b.line for b in bounced) + str(self)
        # No non-delivery notice came back to the sender either.
        assert not self.postfix.messages(), f"a notice reached sender@mta.test\n{self}"

    def __str__(self) -> str:
        out = [
            f"\n--- Postfix maillog:\n{self.postfix.maillog()}",
            f"--- Exim:\n{self.exim._diag()}",
        ]
        if self.proxy is not None:
            out.append(f"--- proxy output:\n{self.proxy.log()}")
            with contextlib.suppress(Exception):
                out.append(f"--- cache list:\n{self.proxy.cache_entries()}")
        out.append(f"--- nat OUTPUT:\n{self.ns.nat_rules(ipv6=':' in self.mx)}")
        return "\n".join(out)


WorldFactory = Callable[..., World]


@pytest.fixture
def make_world() -> Iterator[WorldFactory]:
    """`make(*, ipv6=False, redirect_to=PROXY_PORT or None, proxy=True, workers=1,
    cache=None, tls=False, exim={...EximServer kwargs}, postfix={...main.cf}) -> World`: a
    namespace with an Exim MX, a sender Postfix, the REDIRECT rule and the proxy (each
    optional). `cache(dir) -> path` may prepare the proxy's cache file. `tls`: Exim gets a
    certificate for mx.test and the MX address from a fresh CA; Postfix insists on TLS
    (`encrypt`), trusts that CA and logs its TLS sessions.

    The files live in a private temporary directory, not pytest's tmp_path: a pytest run
    started meanwhile (another developer's) prunes old pytest-of-root/pytest-N trees and
    resets their modes, which pulled Exim's log directory away under a running daemon
    ("451 Unexpected log failure, please try later", then the daemon died)."""
    worlds: list[World] = []

    def make(
        *,
        ipv6: bool = False,
        redirect_to: int | None = PROXY_PORT,
        proxy: bool = True,
        workers: int = 1,
        cache: Callable[[Path], Path] | None = None,
        tls: bool = False,
        exim: dict[str, Any] | None = None,
        postfix: dict[str, str] | None = None,
    ) -> World:
        base = Path(tempfile.mkdtemp(prefix="pcp-outbound-"))
        base.chmod(0o755)
        ns = Namespace().create()
        mx = MX6 if ipv6 else MX4
        exim_kwargs = dict(exim or {})
        # Exim decides "early" when it is about to greet: is input already waiting? Over any
        # network path the proxy's early bytes arrive with the accept (sent the moment the
        # handshake completes), a millisecond or more before Exim greets. On loopback, on a
        # loaded 2-core machine, Exim's forked child can greet within the microseconds
        # before the proxy's event loop writes: a race no network has. A short greeting
        # delay restores the network's order (as bench/delay.py does for the benchmarks);
        # Exim's ACL times count whole seconds.
        exim_kwargs.setdefault("connect_acl", "accept delay = 1s")
        pf_extra = {**SENDER_DEFAULTS, **(postfix or {})}
        try:
            if tls:
                files = write_tls_files(base, "mx.test", mx, prefix="mx-")
                exim_kwargs["tls"] = files
                pf_extra.update(
                    {
                        "smtp_tls_security_level": "encrypt",
                        "smtp_tls_CAfile": files["ca"],
                        "smtp_tls_loglevel": "1",
                    }
                )
            mx_server = EximServer(
                base / "exim", 25, address=mx, netns=ns, store=True, **exim_kwargs
            )
            pf = Postfix(
                base / "postfix",
                POSTFIX_SMTPD_PORT,
                proxy_protocol=False,
                forbid_unauth_pipelining=False,
                relayhost=f"[{mx}]:25",
                netns=ns,
                extra=pf_extra,
            )
        except BaseException:
            ns.destroy()
            shutil.rmtree(base, ignore_errors=True)
            raise
        world = World(base, ns, mx_server, pf, mx)
        worlds.append(world)  # from here on the teardown cleans up
        mx_server.start()
        if redirect_to is not None:
            ns.redirect(dest=mx, dport=25, to_port=redirect_to, ipv6=ipv6)
        if proxy:
            listen = f"[{MX6}]:{PROXY_PORT}" if ipv6 else f"127.0.0.1:{PROXY_PORT}"
            world.proxy = OutboundProxy(
                ns,
                base,
                listen=[listen],
                cache=cache(base) if cache else base / "outbound.sqlite",
                workers=workers,
            ).start()
        pf.start()
        return world

    yield make
    for world in worlds:
        for stop in (
            world.proxy.stop if world.proxy else None,
            world.postfix.stop,
            world.exim.stop,
        ):
            if stop is not None:
                with contextlib.suppress(Exception):
                    stop()
        world.ns.destroy()
        shutil.rmtree(world.dir, ignore_errors=True)


# --------------------------------------------------------------------------- the harness alone

# A trivial transparent forwarder (fault-injection style): it reads SO_ORIGINAL_DST, prints
# it, connects there itself (as root: not redirected) and copies bytes both ways.
FORWARDER = r"""
import socket, sys, threading
from tests.netns import original_dst

host, port = sys.argv[1], int(sys.argv[2])
ls = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((host, port))
ls.listen(16)
print("listening", flush=True)

def pump(src, dst):
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

def handle(client):
    host, dport = original_dst(client)
    print(f"ORIGINAL_DST {host} {dport} from {client.getpeername()[0]}", flush=True)
    upstream = socket.create_connection((host, dport), timeout=10)
    upstream.settimeout(None)
    back = threading.Thread(target=pump, args=(upstream, client))
    back.start()
    pump(client, upstream)
    back.join()
    client.close()
    upstream.close()

while True:
    conn, _ = ls.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
"""


def test_harness_postfix_delivers_to_exim_directly(make_world: WorldFactory) -> None:
    """No rule, no proxy: Postfix in the namespace relays to Exim on 127.0.0.3:25; Exim
    advertises PIPECONNECT, Postfix pipelines without it: `L.`."""
    world = make_world(redirect_to=None, proxy=False)
    sub, got = world.send_ok()
    assert "L." in got.flags, got.line
    assert got.fields["H"] == "(mta.test)", got.line
    world.assert_stored_once([sub])
    world.assert_never_bounced()


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_harness_redirect_rule_and_original_dst(make_world: WorldFactory, ipv6: bool) -> None:
    """The REDIRECT rule takes Postfix's connection to a Python forwarder on 127.0.0.1:10025
    (ip6tables: [::1]:10025), which learns 127.0.0.3:25 ([::1]:25) from SO_ORIGINAL_DST and
    delivers there (byte for byte)."""
    world = make_world(proxy=False, ipv6=ipv6)
    out_path = world.dir / "forwarder.out"
    listen = MX6 if ipv6 else "127.0.0.1"
    with out_path.open("wb") as out:
        fwd = world.ns.popen(
            [sys.executable, "-c", FORWARDER, listen, str(PROXY_PORT)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 10
        while "listening" not in out_path.read_text():
            assert fwd.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, "the forwarder did not start"
            time.sleep(0.05)
        sub, got = world.send_ok()
        assert "L." in got.flags, got.line
        assert f"ORIGINAL_DST {world.mx} 25 from {listen}" in out_path.read_text()
        # The rule matched once (Postfix); the forwarder's own connection (root) did not.
        rules = world.ns.nat_rules(ipv6=ipv6)
        assert re.search(r"^\s*1\s+\d+\s+REDIRECT", rules, re.M), rules
        world.assert_stored_once([sub])
        world.assert_never_bounced()
    finally:
        fwd.kill()
        fwd.wait()


def test_harness_postfix_loop_detection_directly(make_world: WorldFactory) -> None:
    """The reference for the loop test: an MX whose name is Postfix's own myhostname
    (mta.test). Postfix warns "greeted me with my own hostname mta.test" and "replied to
    HELO/EHLO with my own hostname mta.test", then BOUNCES: dsn=5.4.6, "mail for
    [127.0.0.3]:25 loops back to myself" (the relay host counts as the best MX)."""
    world = make_world(redirect_to=None, proxy=False, exim={"primary_hostname": "mta.test"})
    _, status = world.deliver()
    assert status.status == "bounced" and status.dsn == "5.4.6", status.line
    assert "loops back to myself" in status.reason, status.line
    world.postfix.wait_log("greeted me with my own hostname mta.test")


# --------------------------------------------------------------------------- outbound mode


def _learn(world: World) -> Sent:
    """The first message: a cache miss, relayed (Exim: PIPECONNECT offered, not used), and
    learned."""
    assert world.proxy is not None
    sub, got = world.send_ok()
    assert got.pipe_connect_offered and not got.early_pipelined, (
        f"the first contact should be relayed, not early (L.):\n{got.line}\n{world}"
    )
    world.proxy.wait_learned(world.dest)
    return sub


def _assert_early(got: EximReception, world: World) -> None:
    assert got.early_pipelined, (
        f"expected early pipelining (L*) on a cache hit, Exim logged:\n{got.line}\n{world}"
    )


def test_learn_then_use(make_world: WorldFactory) -> None:
    world = make_world()
    assert world.proxy is not None
    first = _learn(world)
    # Relayed byte for byte, Postfix's pipelined MAIL/RCPT/DATA reach Exim together: `L.`
    # exactly, as directly and through the plain forwarder. `L.-` would mean Exim saw them
    # one at a time (the relay re-timed Postfix's commands).
    relayed = world.reception(first)
    assert relayed.pipelining_flag == "L.", f"first contact:\n{relayed.line}\n{world}"
    [entry] = world.proxy.usable_entries(world.dest)
    assert "PIPECONNECT" in entry["ehlo"] and "PIPELINING" in entry["ehlo"], entry
    assert entry["banner"].startswith("220 server.test"), entry
    later = []
    for _ in range(2):
        sub, got = world.send_ok()
        _assert_early(got, world)
        later.append(sub)
    world.assert_stored_once([first, *later])
    world.assert_never_bounced()
    assert len(world.proxy.cache_entries()) == 1, world.proxy.cache_entries()


def test_starttls_passthrough(make_world: WorldFactory) -> None:
    """STARTTLS goes through: Postfix (smtp_tls_security_level = encrypt, the test CA in
    smtp_tls_CAfile) does TLS end to end with Exim -- its own log says "Trusted TLS
    connection established to 127.0.0.3[127.0.0.3]:25" (the chain verified; "Verified"
    would need the verify/secure levels) -- and Exim logs X= and, on a cache hit, L*."""
    world = make_world(tls=True)
    first = _learn(world)
    sub, got = world.send_ok()
    _assert_early(got, world)
    assert got.tls, got.line
    assert got.fields["P"] == "esmtps", got.line
    # Postfix's own TLS session with the MX, certificate chain verified by the test CA: the
    # proxy neither terminated TLS nor showed a certificate of its own.
    established = re.findall(
        rf"(\w+) TLS connection established to {re.escape(MX4)}\[{re.escape(MX4)}\]:25",
        world.postfix.maillog(),
    )
    assert established == ["Trusted", "Trusted"], f"{established}\n{world}"
    world.assert_stored_once([first, sub])
    world.assert_never_bounced()


def test_feature_withdrawn_is_retried_in_session(make_world: WorldFactory) -> None:
    """After learning, Exim stops offering PIPECONNECT. The proxy's early talk meets
    `554 SMTP synchronization error` (Exim logs "SMTP protocol synchronization error (input
    sent without waiting for greeting): rejected connection from H=[127.0.0.1]:PORT
    input=..."); the proxy must retry without early talk in the same Postfix session (the
    message is sent on the first attempt), and drop the entry."""
    world = make_world()
    assert world.proxy is not None
    first = _learn(world)
    world.exim.pipe_connect_advertise = False
    world.exim.reload()
    mark = world.exim.log_mark()
    sub, status = world.deliver()
    assert status.status == "sent", f"not delivered on the first attempt:\n{status.line}\n{world}"
    got = world.reception(sub)
    assert got.pipelining_flag in ("L", "L-"), got.line  # PIPECONNECT no longer offered
    world.exim.wait_log(
        r"SMTP protocol synchronization error \(input sent without waiting for greeting\)",
        since=mark,
    )
    assert world.proxy.usable_entries(world.dest) == [], world.proxy.cache_entries()
    world.assert_stored_once([first, sub])
    world.assert_never_bounced()


def test_size_lowered_defers_never_bounces(make_world: WorldFactory) -> None:
    """After learning, Exim's message_size_limit drops below the next message. Postfix sized
    the message against the cached `SIZE 52428800`; the real MX answers `552 Message size
    exceeds maximum permitted` to the early MAIL. That is not Postfix's refusal to make: a
    deferral is right (next time Postfix sees the real SIZE and decides itself)."""
    world = make_world()
    assert world.proxy is not None
    _learn(world)
    world.exim.message_size_limit = "4K"
    world.exim.reload()
    sub, status = world.deliver(pad=8000)
    assert status.status == "deferred", f"{status.line}\n{world}"
    assert status.dsn.startswith("4."), status.line
    assert sub.message_id not in world.received_ids()
    world.postfix.hold_queue()  # a retry would (rightly, as directly) bounce it
    world.assert_never_bounced()


def test_size_unchanged_the_mxs_own_552_is_its_verdict(make_world: WorldFactory) -> None:
    """The other side of the row: Exim's limit was already 4K when the proxy learned it
    (`SIZE 4096` cached, served as bare `SIZE`). An 8K message is early-pipelined, Exim
    refuses it (552), the features match the cache, so the 552 is the MX's own verdict and
    reaches Postfix verbatim: Postfix bounces, as it would directly (where it would not even
    try: it would see `SIZE 4096`)."""
    world = make_world(exim={"message_size_limit": "4K"})
    assert world.proxy is not None
    _learn(world)
    mark = world.exim.log_mark()
    sub, status = world.deliver(pad=8000)
    assert status.status == "bounced", f"{status.line}\n{world}"
    assert status.dsn.startswith("5.3.4") or "552" in status.line, status.line
    assert "Message size exceeds maximum permitted" in status.line, status.line
    world.exim.wait_log(r"message too big", since=mark)
    assert sub.message_id not in world.received_ids()


def test_connect_refused_with_4xx_after_learning(make_world: WorldFactory) -> None:
    """After learning, Exim refuses connections at connect time (acl_smtp_connect = defer):
    it answers `451 Temporary local problem - please try later` instead of a banner (and,
    with the early commands unread, closes with a reset); its log says `H=[127.0.0.1]:PORT
    temporarily rejected connection in "connect" ACL`. Directly, Postfix defers ("host
    127.0.0.3[127.0.0.3] refused to talk to me: 451 ..."). Through the proxy: a deferral."""
    world = make_world()
    assert world.proxy is not None
    _learn(world)
    world.exim.connect_acl = "defer"
    world.exim.reload()
    mark = world.exim.log_mark()
    sub, status = world.deliver()
    assert status.status == "deferred", f"{status.line}\n{world}"
    assert status.dsn.startswith("4."), status.line
    world.exim.wait_log(r'temporarily rejected connection in "connect" ACL', since=mark)
    assert sub.message_id not in world.received_ids()
    world.postfix.hold_queue()
    world.assert_never_bounced()


def test_loop_on_cache_hit_defers(make_world: WorldFactory) -> None:
    """Learned while the MX was server.test; then the MX's name becomes Postfix's own
    (mta.test). On the cache hit Postfix saw the cached greeting, so it cannot detect the loop
    itself (directly it would bounce 5.4.6, see the harness test): the proxy sees the real
    greeting and must defer with 451 4.4.6 -- never a bounce, and no delivery into the loop."""
    world = make_world()
    assert world.proxy is not None
    _learn(world)
    world.exim.primary_hostname = "mta.test"
    world.exim.reload()
    sub, status = world.deliver()
    assert status.status == "deferred", f"{status.line}\n{world}"
    assert status.dsn == "4.4.6", f"expected a 451 4.4.6 deferral:\n{status.line}\n{world}"
    assert sub.message_id not in world.received_ids()
    world.postfix.hold_queue()  # the retry meets the real greeting: Postfix bounces, as directly
    world.assert_never_bounced()


def test_loop_on_first_contact_is_postfixs_own_verdict(make_world: WorldFactory) -> None:
    """The MX is called mta.test from the start. The first contact is relayed byte for byte,
    so Postfix sees the real greeting and decides as it does directly (bounce 5.4.6, its own
    loop detection). If the proxy learned that greeting anyway, the next message is a cache
    hit and must then be a 4.4.6 deferral, never a bounce."""
    world = make_world(exim={"primary_hostname": "mta.test"})
    assert world.proxy is not None
    _, status = world.deliver()
    assert status.status == "bounced" and status.dsn == "5.4.6", f"{status.line}\n{world}"
    assert "loops back to myself" in status.reason, status.line
    learned = world.proxy.usable_entries(world.dest)
    _, second = world.deliver()
    if learned:
        assert second.status == "deferred" and second.dsn == "4.4.6", (
            f"a cache hit on a looping MX must defer 4.4.6:\n{second.line}\n{world}"
        )
    else:
        assert second.status == "bounced" and second.dsn == "5.4.6", second.line
    world.postfix.hold_queue()


def _client_port(got: EximReception) -> str:
    """The client's address:port of the session a `<=` line belongs to."""
    m = re.search(r"H=\S* ?(\[[^\]]+\]:\d+)", got.line)
    assert m, got.line
    return m[1]


def test_connection_reuse(make_world: WorldFactory) -> None:
    """Postfix's connection cache after learning: 5 messages queued at once go down reused
    connections (conn_use=2..) -- several transactions in one cache-hit session -- each
    delivered exactly once, and every session ends as it does directly: a session the
    smtp client closes says QUIT; one parked in Postfix's scache(8) is dropped without QUIT
    when idle for smtp_connection_cache_time_limit (Exim: "SMTP connection from (mta.test)
    [127.0.0.1]:PORT lost D=1.042s", checked without the proxy). (Whether each session was
    early is test_back_to_back_sessions_are_all_early's question.)"""
    world = make_world(
        postfix={
            "smtp_connection_cache_on_demand": "yes",
            "smtp_connection_cache_destinations": f"[{MX4}]:25",
            "smtp_connection_cache_time_limit": "1s",
            "smtp_destination_concurrency_limit": "1",
            "defer_transports": "smtp",  # queue now, deliver on `postqueue -f`
        }
    )
    assert world.proxy is not None
    [first] = world.submit_held(1)
    world.postfix.flush()
    status = world.outcome(first)
    assert status.status == "sent", f"{status.line}\n{world}"
    world.proxy.wait_learned(world.dest)
    # The learning session must be over (Postfix caches it for up to 1 s), or the next
    # message would reuse that relayed connection.
    world.exim.wait_log(r"closed by QUIT", timeout=10)
    learned_session = _client_port(world.reception(first))
    subs = world.submit_held(5)
    world.postfix.flush()
    outcomes = [world.outcome(s) for s in subs]
    assert [o.status for o in outcomes] == ["sent"] * 5, "\n".join(o.line for o in outcomes)
    assert re.search(r"conn_use=[2-5]", "\n".join(o.line for o in outcomes)), (
        f"Postfix did not reuse a connection:\n{world}"
    )
    sessions = {_client_port(world.reception(s)) for s in subs}
    assert learned_session not in sessions, f"reused the learning session\n{world}"
    assert len(sessions) < 5, f"no session carried two messages\n{world}"
    _wait_sessions_end(world, sessions)
    log = world.exim.mainlog()
    assert "synchronization error" not in log and "protocol error" not in log, world
    world.assert_stored_once([first, *subs])
    world.assert_never_bounced()


def _wait_sessions_end(world: World, sessions: set[str], timeout: float = 10) -> None:
    """Wait until Exim logged the end ("closed by QUIT" or "lost") of each client
    address:port in `sessions`."""
    deadline = time.monotonic() + timeout
    while True:
        log = world.exim.mainlog()
        missing = [
            port
            for port in sessions
            if not re.search(
                rf"SMTP connection from \S+ {re.escape(port)} (closed by QUIT|lost)", log
            )
        ]
        if not missing:
            return
        assert time.monotonic() < deadline, f"sessions {missing} did not end\n{world}"
        time.sleep(0.1)


def test_back_to_back_sessions_are_all_early(make_world: WorldFactory) -> None:
    """After learning, 5 queued messages flushed at once go out one connection after the
    other (concurrency 1, no connection cache). Every one is a cache hit, so Exim must log
    L* for every one. Exim decides that at banner time: if the client's bytes are already
    waiting when it is about to send its banner (smtp_in.c: check_sync() before the banner),
    it is early pipelining; bytes that arrive a moment later are ordinary pipelining (L.).
    A bare client that connects and sends at once gets L* every time, back to back too
    (checked: 80 of 80 sessions, with and without TCP Fast Open)."""
    world = make_world(
        postfix={
            "smtp_destination_concurrency_limit": "1",
            "defer_transports": "smtp",
        }
    )
    assert world.proxy is not None
    [first] = world.submit_held(1)
    world.postfix.flush()
    assert world.outcome(first).status == "sent", world
    world.proxy.wait_learned(world.dest)
    subs = world.submit_held(5)
    world.postfix.flush()
    outcomes = [world.outcome(s) for s in subs]
    assert [o.status for o in outcomes] == ["sent"] * 5, "\n".join(o.line for o in outcomes)
    got = [world.reception(s) for s in subs]
    late = [g.line for g in got if not g.early_pipelined]
    assert not late, (
        f"{len(late)} of 5 cache-hit sessions were not early for Exim (the proxy's early "
        f"commands reached Exim after its banner):\n" + "\n".join(late) + str(world)
    )
    world.assert_stored_once([first, *subs])
    world.assert_never_bounced()


def test_address_verification_probe(make_world: WorldFactory) -> None:
    """A real verify(8) probe: the sender Postfix's smtpd has `reject_unverified_recipient`;
    a RCPT there makes Postfix send a probe (MAIL FROM:<double-bounce@mta.test>, RCPT, QUIT;
    no DATA) through its smtp client to the MX -- through the proxy, on a cache hit. Exim
    logs no `<=`, the session ends with QUIT, Postfix records the address as deliverable
    and the smtpd then accepts the RCPT."""
    world = make_world(
        postfix={
            "smtpd_recipient_restrictions": "reject_unverified_recipient",
            "address_verify_poll_delay": "1s",
            "address_verify_poll_count": "15",
        }
    )
    assert world.proxy is not None
    _learn(world)
    before = len(world.exim.receptions())
    mark, emark = world.postfix.log_mark(), world.exim.log_mark()
    swaks = [
        "swaks", "--server", f"127.0.0.1:{POSTFIX_SMTPD_PORT}", "--from", "someone@mta.test",
        "--to", "probe@dest.test", "--quit-after", "RCPT", "--timeout", "20",
    ]  # fmt: skip
    out = world.ns.run(swaks, timeout=40, check=False)
    [probe] = world.postfix.wait_status("deliverable undeliverable", since=mark)
    assert probe.status == "deliverable" and probe.to == "probe@dest.test", probe.line
    assert re.search(r"<-\s+250 2\.1\.5", out), f"smtpd did not accept the verified RCPT:\n{out}"
    world.exim.wait_log(r"closed by QUIT", since=emark)
    session = world.exim.mainlog_since(emark)
    assert "synchronization error" not in session and " lost" not in session, session
    assert len(world.exim.receptions()) == before, world.exim.mainlog()
    world.assert_never_bounced()


def test_ipv6(make_world: WorldFactory) -> None:
    """Exim on [::1]:25, Postfix relaying to [::1]:25 (inet_protocols = all), ip6tables
    REDIRECT to the proxy on [::1]:10025: learned, then early."""
    world = make_world(ipv6=True)
    assert world.proxy is not None
    first = _learn(world)
    sub, got = world.send_ok()
    _assert_early(got, world)
    assert "[::1]" in got.line, got.line
    world.assert_stored_once([first, sub])
    world.assert_never_bounced()


def test_cache_shared_by_two_workers(make_world: WorldFactory) -> None:
    """server.workers = 2: whichever worker learned the MX, every later session (spread over
    both workers by the kernel) is a cache hit."""
    world = make_world(workers=2)
    first = _learn(world)
    later = []
    for _ in range(5):
        sub, got = world.send_ok()
        _assert_early(got, world)
        later.append(sub)
    world.assert_stored_once([first, *later])
    world.assert_never_bounced()


def _garbage_cache(directory: Path) -> Path:
    path = directory / "outbound.sqlite"
    path.write_bytes(b"this is not an SQLite database\x00\xff" * 200)
    return path


def _uncreatable_cache(directory: Path) -> Path:
    (directory / "not-a-dir").write_text("a regular file\n")
    return directory / "not-a-dir" / "outbound.sqlite"  # ENOTDIR, even for root


@pytest.mark.parametrize(
    "prepare", [_garbage_cache, _uncreatable_cache], ids=["corrupt", "unwritable"]
)
def test_broken_cache_file_mail_still_flows(
    make_world: WorldFactory, prepare: Callable[[Path], Path]
) -> None:
    """A cache file of garbage, or a cache path that cannot be created (its parent is a
    regular file: not even root can make it; a read-only directory would not stop root):
    every session is relayed (no early talk), all mail is sent, nothing bounces, and the
    proxy says so once -- not once per session."""
    world = make_world(cache=prepare)
    assert world.proxy is not None
    subs = []
    for _ in range(3):
        sub, got = world.send_ok()
        assert not got.early_pipelined, got.line
        subs.append(sub)
    world.assert_stored_once(subs)
    world.assert_never_bounced()
    about_cache = [ln for ln in world.proxy.problems() if "cache" in ln.lower()]
    assert len(about_cache) == 1, (
        f"expected the broken cache to be reported exactly once in 3 sessions, got "
        f"{len(about_cache)}:\n" + "\n".join(about_cache) + f"\n--- proxy output:\n"
        f"{world.proxy.log()}"
    )
