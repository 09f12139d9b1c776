"""Real peers over TLS terminated by the proxy: an Exim 4.96 client with STARTTLS, swaks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.certs import write_tls_files
from tests.mta import EximClient, Postfix, deliveries, swaks
from tests.proxyproc import ProxyProcess

ProxyFactory = Callable[..., ProxyProcess]


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, str]:
    return write_tls_files(tmp_path, "mx.test", "127.0.0.1")


@pytest.fixture
def tls_proxy(
    tmp_path: Path, postfix: Postfix, tls_files: dict[str, str]
) -> Iterator[ProxyProcess]:
    from tests.mta import free_port

    implicit = free_port()
    proc = ProxyProcess(
        tmp_path,
        postfix.port,
        tls={"certificate": tls_files["certificate"], "key": tls_files["key"]},
        listen={"tls_on_connect": [f"127.0.0.1:{implicit}"]},
    )
    proc.implicit_port = implicit  # type: ignore[attr-defined]
    proc.start()
    yield proc
    proc.stop()


def test_exim_starttls_early_pipelining(
    postfix: Postfix,
    tls_proxy: ProxyProcess,
    tls_files: dict[str, str],
    exim_client_factory: Callable[..., EximClient],
) -> None:
    exim = exim_client_factory(
        tls_proxy.port,
        avoid_tls=False,
        extra_transport=f"tls_verify_certificates = {tls_files['ca']}\n"
        "tls_verify_cert_hostnames = :\ntls_resumption_hosts = *",
    )
    bodies = [f"TLS message {n}\n".encode() for n in (1, 2, 3)]
    logs = [exim.send("alice@client.test", "box@dest.test", b) for b in bodies]
    lines = [deliveries(log)[-1] for log in logs]
    assert [d.kind for d in lines] == ["=>"] * 3, logs
    assert all(d.tls and d.fields["X"].startswith("TLS1.3") for d in lines), logs
    assert not lines[0].early_pipelined
    assert lines[1].early_pipelined and lines[2].early_pipelined, logs
    # Session tickets: Exim (+tls_resumption) marks a resumed session with "*" after X=.
    assert not lines[0].fields["X"].endswith("*")
    assert lines[1].fields["X"].endswith("*") and lines[2].fields["X"].endswith("*"), logs
    messages = postfix.wait_messages(3)
    assert sorted(m.split(b"\n\n", 1)[1] for m in messages) == sorted(bodies)
    sessions = tls_proxy.session_lines(3)
    assert all(" X=TLSv1.3 " in s for s in sessions), sessions
    assert " L* " in sessions[1] and " L* " in sessions[2]
    print("\n".join(d.line for d in lines))
    print("\n".join(sessions))


@pytest.mark.parametrize("mode", ["--tls", "--tlsc"])
def test_swaks_tls(
    mode: str, postfix: Postfix, tls_proxy: ProxyProcess, tls_files: dict[str, str]
) -> None:
    port = tls_proxy.port if mode == "--tls" else tls_proxy.implicit_port  # type: ignore[attr-defined]
    result = swaks(
        port, mode, "--tls-verify", "--tls-ca-path", tls_files["ca"], "--body", f"swaks {mode}",
        to="box@dest.test",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    [message] = postfix.wait_messages(1)
    assert f"swaks {mode}".encode() in message
