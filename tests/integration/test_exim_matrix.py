"""The interop matrix (issue 8): the real Exim 4.96 client through the proxy, one row per
early-pipelining variant it sends, each asserting the flags of Exim's `=>` line and that
the MTA stored the message byte for byte.

Every row uses a fresh client (its own hints database): the first message teaches it the
EHLO reply (`L`), the second goes early (`L*`). One Postfix (PROXY v2, strict about
pipelining) and one proxy in front of it serve most rows. Exim 4.96 tries TCP Fast Open
by default, so rows that are not about TFO say `hosts_try_fastopen = :` and their flags
are exact. Each row prints its `=>` line (run with `-s` to see them).

Rows needing a kernel feature the machine lacks (TFO's server side) skip with the reason.
The stale-cache row with a restart instead of a reload, and without the toggle back on,
is `test_core_e2e.py::test_stale_cache_defers_then_delivers_nothing_lost`.
"""

from __future__ import annotations

import itertools
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.certs import write_tls_files
from tests.conftest import require_mtas
from tests.mta import (
    EximClient,
    EximDelivery,
    EximServer,
    Postfix,
    _make_traversable,
    deliveries,
    exim_flags,
    free_port,
)
from tests.proxyproc import ProxyProcess, to_toml

TFO_SYSCTL = Path("/proc/sys/net/ipv4/tcp_fastopen")
NO_TFO = "hosts_try_fastopen = :"
TFO = "hosts_try_fastopen = *"
NO_CHUNKING = "hosts_try_chunking = :"
USER, PASSWORD = "matrix", "s3cret"


# --------------------------------------------------------------------------- helpers


def body(row: str, n: int) -> bytes:
    """A body unique to the row and message, with what must survive untouched: leading
    dots, a long line."""
    return (
        f"matrix row {row} message {n} {uuid.uuid4()}\n"
        ".a line starting with a dot\n"
        "..two dots\n" + "y" * 950 + "\n"
        "last line\n"
    ).encode()


def _stored_body(message: bytes) -> bytes:
    return message.split(b"\n\n", 1)[1]


def wait_body(postfix: Postfix, sent: bytes, timeout: float = 20) -> bytes:
    """The stored body of the message whose first line is `sent`'s (each is unique)."""
    marker = sent.split(b"\n", 1)[0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in postfix.messages():
            if marker in message:
                return _stored_body(message)
        time.sleep(0.05)
    raise AssertionError(f"{marker!r} never reached the Maildir\n{postfix.maillog()}")


def exim_spool_body(server: EximServer, sent: bytes, timeout: float = 10) -> bytes:
    """The body of a message a `queue_only` Exim server holds (its `-D` spool file, whose
    first line is the file's own name)."""
    marker = sent.split(b"\n", 1)[0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in (server.spool / "input").glob("*-D"):
            data = path.read_bytes()
            if marker in data:
                return data.split(b"\n", 1)[1]
        time.sleep(0.05)
    raise AssertionError(f"{marker!r} not in {server!r}'s spool\n{server.mainlog()}")


def last(log: str, kinds: str = "=> == **") -> EximDelivery:
    # not the bounce message's own delivery (`=> :blackhole:`)
    found = [d for d in deliveries(log, kinds) if d.address != ":blackhole:"]
    assert found, f"no delivery line in:\n{log}"
    return found[-1]


def report(row: str, delivery: EximDelivery) -> None:
    """The `=>` line of a row, for the closing note of the issue."""
    print(f"\n[matrix] {row}: {delivery.line}")


def learn_then_early(
    exim: EximClient, row: str, *, flags: set[str], check: Callable[[bytes], bytes]
) -> EximDelivery:
    """Message 1 teaches the client the EHLO reply, message 2 must go early with exactly
    `flags` (as `exim_flags` names them); both must arrive intact."""
    sent = [body(row, 1), body(row, 2)]
    first = exim.send("alice@client.test", "box@dest.test", sent[0])
    assert last(first).kind == "=>" and "L*" not in exim_flags(first), first
    second = exim.send("alice@client.test", "box@dest.test", sent[1])
    assert last(second).kind == "=>", second
    assert set(exim_flags(second)) == flags, last(second).line
    for message in sent:
        assert check(message) == message
    report(row, last(second))
    return last(second)


def tfo_passive() -> int:
    """TcpExtTCPFastOpenPassive: connections this network namespace accepted with data
    in the SYN."""
    lines = [ln.split() for ln in Path("/proc/net/netstat").read_text().splitlines()]
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names[0] == "TcpExt:":
            return int(values[names.index("TCPFastOpenPassive")])
    raise AssertionError("no TcpExt counters")


def reload_proxy(proxy: ProxyProcess, **sections: dict[str, object]) -> None:
    """Rewrite the proxy's configuration file and SIGHUP it (an operator's toggle without a
    restart); return once it logged the reload."""
    assert proxy.proc is not None
    for name, values in sections.items():
        proxy.sections.setdefault(name, {}).update(values)
    path = proxy.dir / f"proxy-{proxy.port}.toml"
    path.write_text(to_toml(proxy.config()))
    before = proxy.log().count("reloaded ")
    proxy.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while proxy.log().count("reloaded ") == before:
        assert time.monotonic() < deadline, f"no reload logged:\n{proxy.log()}"
        time.sleep(0.05)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tfo_server() -> Iterator[str | None]:
    """Turn on the server side of TCP Fast Open (net.ipv4.tcp_fastopen |= 2) for this
    network namespace while the module runs, restoring the old value afterwards. Yields
    None when it is on, else why not (the TFO rows then skip with that reason)."""
    try:
        old = int(TFO_SYSCTL.read_text())
    except (OSError, ValueError) as exc:
        yield f"TCP Fast Open unavailable: cannot read {TFO_SYSCTL}: {exc}"
        return
    if old & 2:
        yield None
        return
    try:
        TFO_SYSCTL.write_text(str(old | 3))
    except OSError as exc:
        yield f"net.ipv4.tcp_fastopen = {old} lacks the server bit and cannot be set: {exc}"
        return
    try:
        yield None
    finally:
        TFO_SYSCTL.write_text(str(old))


def need_tfo(reason: str | None) -> None:
    if reason is not None:
        print(f"\n[matrix] skipped: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("tls")
    _make_traversable(d)  # Exim reads the CA as Debian-exim
    return write_tls_files(d, "mx.test", "127.0.0.1")


@pytest.fixture(scope="module")
def postfix(tmp_path_factory: pytest.TempPathFactory, tfo_server: str | None) -> Iterator[Postfix]:
    require_mtas()
    pf = Postfix(tmp_path_factory.mktemp("postfix"), free_port())
    pf.start()
    yield pf
    pf.stop()


def _tls_proxy(tmp: Path, upstream: int, tls_files: dict[str, str]) -> ProxyProcess:
    proc = ProxyProcess(
        tmp,
        upstream,
        tls={"certificate": tls_files["certificate"], "key": tls_files["key"]},
        listen={"tls_on_connect": [f"127.0.0.1:{free_port()}"]},
    )
    return proc.start()


def implicit_port(proxy: ProxyProcess) -> int:
    return int(proxy.sections["listen"]["tls_on_connect"][0].rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, postfix: Postfix, tls_files: dict[str, str]
) -> Iterator[ProxyProcess]:
    """In front of the module's Postfix: plain (STARTTLS offered) and TLS-on-connect."""
    proc = _tls_proxy(tmp_path_factory.mktemp("proxy"), postfix.port, tls_files)
    yield proc
    proc.stop()


AUTH_SERVER = f"""
queue_only = true
begin authenticators
server_plain:
  driver = plaintext
  public_name = PLAIN
  server_prompts = :
  server_condition = ${{if and {{{{eq{{$auth2}}{{{USER}}}}}{{eq{{$auth3}}{{{PASSWORD}}}}}}}}}
  server_set_id = $auth2
"""
AUTH_CLIENT = f"""
begin authenticators
client_plain:
  driver = plaintext
  public_name = PLAIN
  client_send = ^{USER}^{PASSWORD}
"""


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EximServer]:
    """Native Exim: PLAIN authentication, no PIPELINING (pipelined input gets 554), the
    client's address from a PROXY header; keeps what it receives in its queue."""
    require_mtas()
    server = EximServer(
        tmp_path_factory.mktemp("exim-auth"),
        free_port(),
        pipe_connect_advertise=False,
        pipelining=False,
        proxy_hosts="127.0.0.1",
        extra_main=AUTH_SERVER,
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def auth_proxy(
    tmp_path_factory: pytest.TempPathFactory, auth_server: EximServer, tls_files: dict[str, str]
) -> Iterator[ProxyProcess]:
    proc = _tls_proxy(tmp_path_factory.mktemp("proxy-auth"), auth_server.port, tls_files)
    yield proc
    proc.stop()


def tls_transport(tls_files: dict[str, str]) -> str:
    return f"tls_verify_certificates = {tls_files['ca']}\ntls_verify_cert_hostnames = :"


# --------------------------------------------------------------------------- rows


def test_cleartext_data(postfix: Postfix, proxy: ProxyProcess, tmp_path: Path) -> None:
    exim = EximClient(tmp_path / "c", proxy.port, extra_transport=f"{NO_TFO}\n{NO_CHUNKING}")
    learn_then_early(exim, "cleartext DATA", flags={"L*"}, check=lambda m: wait_body(postfix, m))


def test_cleartext_bdat(postfix: Postfix, proxy: ProxyProcess, tmp_path: Path) -> None:
    exim = EximClient(tmp_path / "c", proxy.port, extra_transport=NO_TFO)
    learn_then_early(
        exim, "cleartext BDAT", flags={"L*", "K"}, check=lambda m: wait_body(postfix, m)
    )


def test_tcp_fast_open(
    postfix: Postfix, proxy: ProxyProcess, tmp_path: Path, tfo_server: str | None
) -> None:
    need_tfo(tfo_server)
    exim = EximClient(tmp_path / "c", proxy.port, extra_transport=f"{TFO}\n{NO_CHUNKING}")
    before, seen = tfo_passive(), len(proxy.session_lines(0))
    learn_then_early(exim, "TFO", flags={"TFO*", "L*"}, check=lambda m: wait_body(postfix, m))
    # the kernel's own count of SYNs whose data a listener accepted
    assert tfo_passive() > before
    # the SYN's data was the early input: the proxy saw it before the banner
    early = proxy.session_lines(seen + 2)[-1]
    assert " L* " in early and " E=" in early, early


def test_starttls(
    postfix: Postfix, proxy: ProxyProcess, tls_files: dict[str, str], tmp_path: Path
) -> None:
    exim = EximClient(
        tmp_path / "c",
        proxy.port,
        avoid_tls=False,
        extra_transport=f"{NO_TFO}\n{tls_transport(tls_files)}",
    )
    row = learn_then_early(
        exim, "STARTTLS", flags={"L*", "K", "X"}, check=lambda m: wait_body(postfix, m)
    )
    assert row.fields["X"].startswith("TLS1.3"), row.line


def test_tls_on_connect(
    postfix: Postfix, proxy: ProxyProcess, tls_files: dict[str, str], tmp_path: Path
) -> None:
    exim = EximClient(
        tmp_path / "c",
        implicit_port(proxy),
        avoid_tls=False,
        extra_transport=f"protocol = smtps\n{NO_TFO}\n{tls_transport(tls_files)}",
    )
    seen = len(proxy.session_lines(0))
    row = learn_then_early(
        exim, "TLS-on-connect", flags={"L*", "K", "X"}, check=lambda m: wait_body(postfix, m)
    )
    assert row.fields["X"].startswith("TLS1.3"), row.line
    assert "I=tls_on_connect" in proxy.session_lines(seen + 2)[-1]


def test_tfo_with_starttls(
    postfix: Postfix,
    proxy: ProxyProcess,
    tls_files: dict[str, str],
    tmp_path: Path,
    tfo_server: str | None,
) -> None:
    need_tfo(tfo_server)
    exim = EximClient(
        tmp_path / "c",
        proxy.port,
        avoid_tls=False,
        extra_transport=f"{TFO}\n{tls_transport(tls_files)}",
    )
    row = learn_then_early(
        exim,
        "TFO + STARTTLS",
        flags={"TFO*", "L*", "K", "X"},
        check=lambda m: wait_body(postfix, m),
    )
    assert row.fields["X"].startswith("TLS1.3"), row.line


class TLSOnConnectExim(EximServer):
    """Native Exim with TLS on connect on its port: the reference for what the client does
    there. (The harness writes `tls_advertise_hosts =`, and Exim refuses a second setting.)"""

    def __init__(self, tmpdir: Path, port: int, tls_files: dict[str, str]) -> None:
        super().__init__(
            tmpdir,
            port,
            extra_main=f"tls_certificate = {tls_files['certificate']}\n"
            f"tls_privatekey = {tls_files['key']}\ntls_on_connect_ports = {port}\n",
        )

    def write_config(self) -> None:
        super().write_config()
        text = self.conf.read_text().replace("tls_advertise_hosts =\n", "tls_advertise_hosts = *\n")
        self.conf.write_text(text)


def test_tfo_with_tls_on_connect(
    postfix: Postfix,
    proxy: ProxyProcess,
    tls_files: dict[str, str],
    tmp_path: Path,
    tfo_server: str | None,
) -> None:
    """Exim 4.96 puts no data in the SYN on a TLS-on-connect port (the ClientHello follows
    the handshake), so no `TFO*` is possible here: the row asserts the flags through the
    proxy are those the same client logs talking to a native Exim (TFO on its listener)."""
    need_tfo(tfo_server)
    extra = f"protocol = smtps\n{TFO}\n{tls_transport(tls_files)}"
    native = TLSOnConnectExim(tmp_path / "native", free_port(), tls_files)
    with native:
        direct = EximClient(tmp_path / "d", native.port, avoid_tls=False, extra_transport=extra)
        for n in (1, 2):
            reference = direct.send("alice@client.test", "box@dest.test", body("native", n))
    expected = set(exim_flags(reference))
    assert {"L*", "X"} <= expected, reference
    report("TFO + TLS-on-connect, direct to native Exim", last(reference))
    exim = EximClient(tmp_path / "c", implicit_port(proxy), avoid_tls=False, extra_transport=extra)
    learn_then_early(
        exim, "TFO + TLS-on-connect", flags=expected, check=lambda m: wait_body(postfix, m)
    )


@pytest.mark.parametrize("tls", [False, True], ids=["cleartext", "TLS"])
def test_auth(
    tls: bool,
    auth_server: EximServer,
    auth_proxy: ProxyProcess,
    tls_files: dict[str, str],
    tmp_path: Path,
) -> None:
    extra = f"{NO_TFO}\nhosts_require_auth = *" + (f"\n{tls_transport(tls_files)}" if tls else "")
    exim = EximClient(
        tmp_path / "c", auth_proxy.port, avoid_tls=not tls, extra_transport=extra,
        extra_main=AUTH_CLIENT,
    )  # fmt: skip
    flags = {"L*", "K", "X"} if tls else {"L*", "K"}
    row = learn_then_early(
        exim,
        "TLS + AUTH" if tls else "AUTH",
        flags=flags,
        check=lambda m: exim_spool_body(auth_server, m),
    )
    assert row.fields.get("A", "").startswith("client_plain"), row.line
    mainlog = auth_server.mainlog()
    assert "synchronization error" not in mainlog
    # the server authenticated the real client (PROXY header), not the proxy
    assert re.search(rf"<= .*\[127\.0\.0\.2\].* A=server_plain:{USER}", mainlog), mainlog


def test_stale_cache_host_toggled_off_and_on(
    postfix: Postfix, tmp_path: Path, tls_files: dict[str, str]
) -> None:
    """Reload (SIGHUP) instead of restart, and the toggle back on; the restart variant is
    test_core_e2e.py::test_stale_cache_defers_then_delivers_nothing_lost."""
    proxy = ProxyProcess(tmp_path, postfix.port).start()
    try:
        exim = EximClient(
            tmp_path / "c", proxy.port, extra_transport=f"{NO_TFO}\nconnection_max_messages = 1"
        )
        sent = [body("stale cache", n) for n in (1, 2, 3)]
        assert last(exim.send("a@client.test", "box@dest.test", sent[0])).kind == "=>"
        reload_proxy(proxy, pipe_connect={"advertise_hosts": ["!127.0.0.2", "*"]})
        deferred = exim.send("a@client.test", "box@dest.test", sent[1])
        assert last(deferred).kind == "==", deferred  # our 421, never a bounce
        report("stale cache (host toggled off)", last(deferred))
        reload_proxy(proxy, pipe_connect={"advertise_hosts": ["*"]})
        retried = exim.retry()
        assert [d.kind for d in deliveries(retried, "=> == **")] == ["=>"], retried
        report("stale cache (retry, host toggled on)", last(retried))
        # the retry re-learnt the keyword: the next message goes early again
        again = exim.send("a@client.test", "box@dest.test", sent[2])
        assert "L*" in exim_flags(again), again
        for message in sent:
            assert wait_body(postfix, message) == message
        assert " ** " not in exim.mainlog()
        assert "sync-error" in proxy.log()
    finally:
        proxy.stop()


BANNER_ACL = """
acl_smtp_connect = acl_connect
begin acl
acl_connect:
  deny    condition = ${{if exists{{{flags}/deny}}}}
          message = matrix says no
  defer   condition = ${{if exists{{{flags}/defer}}}}
          message = matrix says later
  accept
"""


@pytest.mark.parametrize("verdict", ["defer", "deny"], ids=["4xx banner", "5xx banner"])
def test_banner_refusal_same_as_direct(
    verdict: str, tmp_path: Path, tls_files: dict[str, str]
) -> None:
    """A native Exim whose connect ACL defers or denies (toggled by a file, no restart).
    The same client configuration talks to it directly and through the proxy, first with a
    cached EHLO reply (early input held by the proxy when the refusal comes), then fresh:
    the outcomes must be the same."""
    flags = tmp_path / "flags"
    flags.mkdir()
    _make_traversable(flags)
    server = EximServer(
        tmp_path / "server",
        free_port(),
        proxy_hosts="127.0.0.1",  # the proxy's connections; the direct client is 127.0.0.2
        extra_main=BANNER_ACL.format(flags=flags),
    )
    with server:
        proxy = ProxyProcess(tmp_path, server.port).start()
        try:
            ports = {"direct": server.port, "proxy": proxy.port}
            extra = f"{NO_TFO}\n{NO_CHUNKING}\nconnection_max_messages = 1"
            cached = {
                k: EximClient(tmp_path / k, p, extra_transport=extra) for k, p in ports.items()
            }
            for name, exim in cached.items():
                learnt = exim.send("a@client.test", "box@dest.test", body(name, 1))
                assert last(learnt).kind == "=>", learnt
            (flags / verdict).touch()
            outcome: dict[str, list[EximDelivery]] = {}
            for name, exim in cached.items():
                early = last(exim.send("a@client.test", "box@dest.test", body(name, 2)))
                fresh_client = EximClient(
                    tmp_path / f"{name}-fresh", ports[name], extra_transport=extra
                )
                fresh = last(fresh_client.send("a@client.test", "box@dest.test", body(name, 3)))
                outcome[name] = [early, fresh]
        finally:
            proxy.stop()
    expected = "==" if verdict == "defer" else "**"
    for name, (early, fresh) in outcome.items():
        report(f"{verdict} banner, cached, {name}", early)
        report(f"{verdict} banner, fresh, {name}", fresh)
    lines = "\n".join(d.line for d in itertools.chain(*outcome.values()))
    assert [d.kind for d in outcome["proxy"]] == [expected] * 2, lines
    assert outcome["direct"][1].kind == expected, lines
    # Direct, the client's early input meets a socket the MTA closed unread: a reset that
    # can turn the 5xx into a connection error (defer). The proxy drains instead, so the
    # client always reads the MTA's reply, as a client without a cache does.
    direct_early = outcome["direct"][0]
    assert direct_early.kind == expected or re.search(r"defer \((32|104)\)", direct_early.line), (
        lines
    )
    # the refusal the client saw is the MTA's own text, relayed
    assert all("matrix says" in d.line for d in outcome["proxy"]), outcome


def _postfix_reload(postfix: Postfix, **settings: str) -> None:
    postfix.extra.update(settings)
    postfix.reload()


def test_feature_change_chunking_toggled(
    postfix: Postfix, proxy: ProxyProcess, tmp_path: Path
) -> None:
    """The MTA stops offering CHUNKING while the client has an EHLO reply with it cached:
    its early group already holds BDAT. The proxy answers that BDAT with a 4xx (a 5xx
    bounced the message: a bug this row found), the client defers, re-learns, and the
    retry goes by DATA. Then CHUNKING comes back. Nothing lost, nothing bounced."""
    exim = EximClient(
        tmp_path / "c", proxy.port, extra_transport=f"{NO_TFO}\nconnection_max_messages = 1"
    )
    sent = [body("feature change", n) for n in range(5)]
    lines: list[EximDelivery] = []
    try:
        for message in sent[:2]:
            lines.append(last(exim.send("a@client.test", "box@dest.test", message)))
        _postfix_reload(postfix, smtpd_discard_ehlo_keywords="chunking")
        deferred = last(exim.send("a@client.test", "box@dest.test", sent[2]))
        assert deferred.kind == "==" and "451 4.3.0" in deferred.line, deferred.line
        lines.append(last(exim.retry()))
        _postfix_reload(postfix, smtpd_discard_ehlo_keywords="")
        for message in sent[3:]:
            lines.append(last(exim.send("a@client.test", "box@dest.test", message)))
    finally:
        _postfix_reload(postfix, smtpd_discard_ehlo_keywords="")
    assert [d.kind for d in lines] == ["=>"] * 5, "\n".join(d.line for d in lines)
    # learn, early BDAT; (defer) retry early by DATA; back on: early DATA, early BDAT again
    assert [d.early_pipelined for d in lines] == [False, True, True, True, True]
    assert [d.chunking for d in lines] == [True, True, False, False, True]
    for message in sent:
        assert wait_body(postfix, message) == message
    assert " ** " not in exim.mainlog()
    report("feature change, CHUNKING dropped (deferred)", deferred)
    report("feature change, retry by DATA", lines[2])
