"""`upstream.tls = "starttls"`: the proxy speaks TLS to an MTA that must see it (real Postfix)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.certs import write_tls_files
from tests.mta import EximClient, Postfix, deliveries, swaks
from tests.proxyproc import ProxyProcess

PostfixFactory = Callable[..., Postfix]


@pytest.fixture
def mta_tls(tmp_path: Path) -> dict[str, str]:
    return write_tls_files(tmp_path, "mx.test", prefix="mta-")


@pytest.fixture
def tls_postfix(postfix_factory: PostfixFactory, mta_tls: dict[str, str]) -> Postfix:
    return postfix_factory(
        extra={
            "smtpd_tls_cert_file": mta_tls["certificate"],
            "smtpd_tls_key_file": mta_tls["key"],
            "smtpd_tls_security_level": "may",
            "smtpd_tls_loglevel": "1",
        }
    )


def start_proxy(tmp_path: Path, postfix: Postfix, **upstream: Any) -> ProxyProcess:
    proxy = ProxyProcess(tmp_path, postfix.port, upstream={"tls": "starttls", **upstream})
    proxy.start()
    return proxy


def test_exim_early_pipelining_with_tls_to_postfix(
    tmp_path: Path,
    tls_postfix: Postfix,
    mta_tls: dict[str, str],
    exim_client_factory: Callable[..., EximClient],
) -> None:
    proxy = start_proxy(tmp_path, tls_postfix, tls_ca=mta_tls["ca"], tls_server_name="mx.test")
    try:
        exim = exim_client_factory(proxy.port)
        bodies = [f"over TLS upstream {n}\n".encode() for n in (1, 2)]
        lines = [deliveries(exim.send("alice@client.test", "box@dest.test", b))[-1] for b in bodies]
        assert [d.kind for d in lines] == ["=>", "=>"], lines
        assert lines[1].early_pipelined, lines[1].line
        messages = tls_postfix.wait_messages(2)
        assert sorted(m.split(b"\n\n", 1)[1] for m in messages) == sorted(bodies)
        # Postfix saw TLS, and the real client's address (PROXY v2), not the proxy's.
        tls_postfix.wait_log(r"TLS connection established from unknown\[127\.0\.0\.2\]")
        sessions = proxy.session_lines(2)
        assert all(" UX=TLSv1.3 " in s for s in sessions), sessions
        assert " L* " in sessions[1], sessions
        print(lines[1].line)
        print(sessions[1])
    finally:
        proxy.stop()


def test_wrong_mta_certificate_name_defers(
    tmp_path: Path, tls_postfix: Postfix, mta_tls: dict[str, str]
) -> None:
    proxy = start_proxy(tmp_path, tls_postfix, tls_ca=mta_tls["ca"], tls_server_name="other.test")
    try:
        result = swaks(proxy.port, "--body", "never delivered", to="box@dest.test")
        assert result.returncode != 0
        assert "421 4.4.2 Upstream MTA unavailable" in result.stdout, result.stdout
        [session] = proxy.session_lines()
        assert "outcome=upstream-tls" in session, session
        assert not tls_postfix.messages()
    finally:
        proxy.stop()


def test_mta_without_starttls_defers(tmp_path: Path, postfix: Postfix) -> None:
    proxy = start_proxy(tmp_path, postfix, tls_verify=False)
    try:
        result = swaks(proxy.port, "--body", "never delivered", to="box@dest.test")
        assert "421 4.4.2" in result.stdout, result.stdout
        [session] = proxy.session_lines()
        assert "does not offer STARTTLS" in session, session
    finally:
        proxy.stop()
