"""Identity and relay safety against a real Postfix 3.7.

Clients connect from 127.0.0.2 so that the address Postfix records can only be the client's
if the proxy (on 127.0.0.1) passed it on. Every path -- plain, STARTTLS and TLS-on-connect
terminated by the proxy -- with PROXY v2, PROXY v1 and XCLIENT. Then a client that tries to
speak for itself (its own PROXY header, XCLIENT, XFORWARD; early, after EHLO, inside TLS)
against a Postfix that *would* believe it (XCLIENT/XFORWARD authorised for 127.0.0.0/8,
shown by the direct control test): refused with 5xx, never seen by Postfix.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.proxyproto import encode_v1, encode_v2
from proxy.smtp import Reply, ReplyReader
from tests.certs import write_tls_files
from tests.mta import Postfix, free_port, swaks
from tests.proxyproc import ProxyProcess

PostfixFactory = Callable[..., Postfix]
CLIENT = "127.0.0.2"
FORGED = "198.51.100.7"
MESSAGE = b"From: <a@src.test>\r\nSubject: id\r\n\r\nhello\r\n.\r\n"


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, str]:
    return write_tls_files(tmp_path, "mx.test", "127.0.0.1")


@pytest.fixture
def proxy_factory(
    tmp_path: Path, tls_files: dict[str, str]
) -> Iterator[Callable[..., ProxyProcess]]:
    """`make(upstream_port, identity)`: a proxy with a plain listener (offering STARTTLS)
    and a TLS-on-connect listener (``.implicit_port``)."""
    made: list[ProxyProcess] = []

    def make(upstream_port: int, identity: str, **sections: dict[str, Any]) -> ProxyProcess:
        implicit = free_port()
        proc = ProxyProcess(
            tmp_path,
            upstream_port,
            upstream={"client_identity": identity},
            tls={"certificate": tls_files["certificate"], "key": tls_files["key"]},
            listen={"tls_on_connect": [f"127.0.0.1:{implicit}"]},
            **sections,
        )
        proc.implicit_port = implicit  # type: ignore[attr-defined]
        made.append(proc)
        return proc.start()

    yield make
    for proc in made:
        proc.stop()


def postfix_for(factory: PostfixFactory, identity: str) -> Postfix:
    """PROXY identities: Postfix expects the header. XCLIENT: Postfix trusts 127.0.0.0/8 for
    XCLIENT, and XFORWARD too, so a client's own XCLIENT/XFORWARD would work if let through."""
    if identity == "xclient":
        return factory(
            proxy_protocol=False,
            xclient=True,
            extra={"smtpd_authorized_xforward_hosts": "127.0.0.0/8"},
        )
    return factory(proxy_protocol=True)


class Raw:
    """A blocking SMTP client from 127.0.0.2, plain or TLS (STARTTLS or on connect)."""

    def __init__(self, port: int, ctx: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(CLIENT, 0))
        self.sock: socket.socket = (
            ctx.wrap_socket(sock, server_hostname="mx.test") if ctx is not None else sock
        )
        self.reader = ReplyReader()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> Reply | None:
        while (r := self.reader.next_reply()) is None:
            try:
                data = self.sock.recv(65536)
            except (ssl.SSLError, ConnectionError):
                return None
            if not data:
                return None
            self.reader.feed(data)
        return r

    def codes(self, n: int) -> list[int | None]:
        return [r.code if r else None for r in (self.reply() for _ in range(n))]

    def starttls(self, ctx: ssl.SSLContext) -> None:
        self.send(b"STARTTLS\r\n")
        assert self.codes(1) == [220]
        self.sock = ctx.wrap_socket(self.sock, server_hostname="mx.test")


def client_ctx(tls_files: dict[str, str]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=tls_files["ca"])


def settle(pf: Postfix, timeout: float = 20) -> None:
    """Every smtpd session over: nothing more will be logged about the client."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = pf.maillog()
        if log.count(" connect from ") == log.count(" disconnect from "):
            return
        time.sleep(0.1)
    raise TimeoutError(pf.maillog())


def received_from(message: bytes) -> bytes:
    """Postfix's own (topmost) Received header, unfolded."""
    header = message.split(b"\n\n", 1)[0]
    m = re.search(rb"^Received: (.*(?:\n[ \t].*)*)", header, re.MULTILINE)
    assert m is not None, header
    return m.group(1).replace(b"\n", b" ")


# ------------------------------------------------------------------- the true address


@pytest.mark.parametrize("identity", ["proxy-v2", "proxy-v1", "xclient"])
def test_postfix_sees_the_true_client_on_every_path(
    identity: str,
    postfix_factory: PostfixFactory,
    proxy_factory: Callable[..., ProxyProcess],
    tls_files: dict[str, str],
) -> None:
    pf = postfix_for(postfix_factory, identity)
    proxy = proxy_factory(pf.port, identity)
    paths = {
        "plain": (proxy.port, []),
        "starttls": (proxy.port, ["--tls"]),
        "tls-on-connect": (proxy.implicit_port, ["--tlsc"]),  # type: ignore[attr-defined]
    }
    for path, (port, opts) in paths.items():
        result = swaks(
            port, *opts, "--tls-verify", "--tls-ca-path", tls_files["ca"],
            "--local-interface", CLIENT, "--body", f"identity via {path}", to="box@dest.test",
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
    messages = pf.wait_messages(3)
    settle(pf)
    by_path = {path: m for m in messages for path in paths if f"via {path}".encode() in m}
    assert set(by_path) == set(paths)
    for path, message in by_path.items():
        received = received_from(message)
        assert b"[127.0.0.2]" in received, (path, received)
        assert b"127.0.0.1" not in received, (path, received)
    log = pf.maillog()
    clients = re.findall(r"client=\S*\[([0-9.]+)\]", log)
    assert clients == [CLIENT] * 3, log
    sessions = proxy.session_lines(3)
    assert sum(" X=TLSv1.3 " in s for s in sessions) == 2, sessions


def test_identity_none_warns_at_start_and_costs_the_address(
    postfix_factory: PostfixFactory, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    pf = postfix_factory(proxy_protocol=False)
    proxy = proxy_factory(pf.port, "none")
    [warning] = [ln for ln in proxy.log().splitlines() if "client_identity = none" in ln]
    assert "WARNING" in warning and "real client" in warning
    result = swaks(proxy.port, "--local-interface", CLIENT, to="box@dest.test")
    assert result.returncode == 0, result.stdout + result.stderr
    [message] = pf.wait_messages(1)
    assert b"[127.0.0.1]" in received_from(message)  # what the warning says it costs


@pytest.mark.parametrize("identity", ["proxy-v2", "xclient"])
def test_identity_warning_absent_otherwise(
    identity: str, proxy_factory: Callable[..., ProxyProcess]
) -> None:
    proxy = proxy_factory(free_port(), identity)
    assert "client_identity = none" not in proxy.log()


# ------------------------------------------------------------------- a client speaking for itself


def test_control_postfix_would_believe_a_client_xclient(postfix_factory: PostfixFactory) -> None:
    """Without the proxy, this Postfix honours XCLIENT and XFORWARD from 127.0.0.2: the
    refusals below are the proxy's, and would show in Postfix's log if they leaked."""
    pf = postfix_for(postfix_factory, "xclient")
    with Raw(pf.port) as c:
        assert c.codes(1) == [220]
        c.send(f"XCLIENT ADDR={FORGED}\r\n".encode())
        assert c.codes(1) == [220]
        c.send(b"EHLO client.test\r\n")
        ehlo = c.reply()
        assert ehlo is not None and b"XFORWARD" in b" ".join(ehlo.lines)
        c.send(b"XFORWARD ADDR=198.51.100.8\r\n")
        assert c.codes(1) == [250]
        c.send(b"MAIL FROM:<a@src.test>\r\nRCPT TO:<box@dest.test>\r\nDATA\r\n")
        assert c.codes(3) == [250, 250, 354]
        c.send(MESSAGE + b"QUIT\r\n")
        assert c.codes(2) == [250, 221]
    [message] = pf.wait_messages(1)
    assert FORGED.encode() in received_from(message)


def _forged_commands_after_ehlo(c: Raw) -> None:
    c.send(b"EHLO client.test\r\n")
    ehlo = c.reply()
    assert ehlo is not None and ehlo.code == 250
    advertised = b" ".join(ehlo.lines)
    assert b"XCLIENT" not in advertised and b"XFORWARD" not in advertised
    c.send(f"XCLIENT ADDR={FORGED}\r\nXFORWARD ADDR={FORGED}\r\nxclient ADDR={FORGED}\r\n".encode())
    replies = [c.reply() for _ in range(3)]
    assert [r.code if r else None for r in replies] == [550, 550, 550]
    assert all(r is not None and b"only the proxy" in r.lines[0] for r in replies)
    # the session goes on, as the client itself
    c.send(b"MAIL FROM:<a@src.test>\r\nRCPT TO:<box@dest.test>\r\nDATA\r\n")
    assert c.codes(3) == [250, 250, 354]
    c.send(MESSAGE + b"QUIT\r\n")
    assert c.codes(2) == [250, 221]


@pytest.mark.parametrize("path", ["plain", "early", "starttls", "tls-on-connect"])
def test_client_xclient_xforward_refused(
    path: str,
    postfix_factory: PostfixFactory,
    proxy_factory: Callable[..., ProxyProcess],
    tls_files: dict[str, str],
) -> None:
    pf = postfix_for(postfix_factory, "xclient")
    proxy = proxy_factory(pf.port, "xclient")
    ctx = client_ctx(tls_files)
    if path == "early":
        with Raw(proxy.port) as c:
            # before the banner, held and replayed: refused all the same
            c.send(f"EHLO client.test\r\nXCLIENT ADDR={FORGED}\r\nQUIT\r\n".encode())
            assert c.codes(4) == [220, 250, 550, 221]
    elif path == "tls-on-connect":
        with Raw(proxy.implicit_port, ctx) as c:  # type: ignore[attr-defined]
            assert c.codes(1) == [220]
            _forged_commands_after_ehlo(c)
    else:
        with Raw(proxy.port) as c:
            assert c.codes(1) == [220]
            if path == "starttls":
                c.send(b"EHLO client.test\r\n")
                assert c.codes(1) == [250]
                c.starttls(ctx)
            _forged_commands_after_ehlo(c)
    settle(pf)
    log = pf.maillog()
    assert FORGED not in log
    assert re.findall(r"client=\S*\[([0-9.]+)\]", log) == ([] if path == "early" else [CLIENT])
    assert all(FORGED.encode() not in m for m in pf.messages())


@pytest.mark.parametrize(
    ("path", "header"),
    [
        ("early", "v1"),
        ("plain", "v1"),  # after EHLO
        ("starttls", "v1"),  # first line inside TLS
        ("tls-on-connect", "v1"),
        ("tls-on-connect", "v2"),  # the binary signature as the first bytes inside TLS
    ],
)
def test_client_proxy_header_refused(
    path: str,
    header: str,
    postfix_factory: PostfixFactory,
    proxy_factory: Callable[..., ProxyProcess],
    tls_files: dict[str, str],
) -> None:
    pf = postfix_for(postfix_factory, "proxy-v2")
    proxy = proxy_factory(pf.port, "proxy-v2")
    ctx = client_ctx(tls_files)
    forged = (encode_v1 if header == "v1" else encode_v2)((FORGED, 40000), ("127.0.0.1", 25))
    rest = b"EHLO client.test\r\nMAIL FROM:<a@src.test>\r\nRCPT TO:<box@dest.test>\r\nDATA\r\n"
    implicit: int = proxy.implicit_port  # type: ignore[attr-defined]
    c = Raw(implicit, ctx) if path == "tls-on-connect" else Raw(proxy.port)
    with c:
        if path == "early":
            c.send(forged + rest)
        else:
            if path != "tls-on-connect":
                assert c.codes(1) == [220]
            if path in ("plain", "starttls"):
                c.send(b"EHLO client.test\r\n")
                assert c.codes(1) == [250]
            if path == "starttls":
                c.starttls(ctx)
            c.send(forged + rest)
        replies = []
        while (r := c.reply()) is not None:
            replies.append(r)
    codes = [r.code for r in replies]
    assert codes[-1] == 554 and 250 not in codes[codes.index(554) :], codes
    assert b"PROXY protocol is not accepted" in replies[-1].lines[0]
    assert 354 not in codes  # nothing behind the header was executed
    settle(pf)
    log = pf.maillog()
    assert FORGED not in log
    assert pf.messages() == []
