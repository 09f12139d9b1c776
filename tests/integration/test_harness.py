"""The harness itself, with real software and no proxy: if these fail, no integration
test that builds on tests/mta.py can be trusted."""

from __future__ import annotations

import socket

from tests.conftest import EximClientFactory, EximServerFactory, PostfixFactory
from tests.mta import Postfix, deliveries, exim_flags, swaks

# Dots at line starts (a lone "." too), trailing white space, an empty line and the
# longest text line RFC 5321 allows (998 octets + CRLF).
BODY = (
    b"Line one.\n.\n..two dots\n.leading dot\ntrailing spaces   \n\ttab\n\n"
    + b"x" * 998
    + b"\nlast line\n"
)


def _recv_all(sock: socket.socket, timeout: float = 5) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_swaks_proxy_v2_delivers_into_postfix_maildir(postfix: Postfix) -> None:
    result = swaks(
        postfix.port,
        "--body",
        "hello through PROXY v2",
        to="someone@dest.test",
        proxy_source="198.51.100.7",
        proxy_version=2,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [msg] = postfix.wait_messages(1)
    assert b"hello through PROXY v2" in msg
    assert b"Delivered-To: someone@dest.test" in msg
    postfix.wait_log(r"client=unknown\[198\.51\.100\.7\]")


def test_swaks_proxy_v1_delivers_too(postfix: Postfix) -> None:
    result = swaks(postfix.port, to="v1@dest.test", proxy_source="203.0.113.9", proxy_version=1)
    assert result.returncode == 0, result.stdout + result.stderr
    postfix.wait_messages(1)
    postfix.wait_log(r"client=unknown\[203\.0\.113\.9\]")


def test_postfix_refuses_early_talk(postfix: Postfix) -> None:
    """smtpd_forbid_unauth_pipelining is really in force: a command in the same segment
    as the PROXY header (before the greeting) is refused. Proxy tests rely on this."""
    with socket.create_connection(("127.0.0.1", postfix.port)) as sock:
        sock.sendall(b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 25\r\nEHLO early.test\r\n")
        reply = _recv_all(sock)
    assert reply.startswith(b"554 5.5.0"), reply
    postfix.wait_log(r"improper command pipelining after CONNECT")
    assert postfix.messages() == []


def test_postfix_smtpd_kill(postfix_factory: PostfixFactory) -> None:
    pf = postfix_factory(proxy_protocol=False)
    with socket.create_connection(("127.0.0.1", pf.port)) as sock:
        sock.settimeout(5)
        assert sock.recv(100).startswith(b"220 ")
        assert pf.smtpd_kill() != []
        assert _recv_all(sock) == b""


def test_exim_learns_pipe_connect_from_exim_server(
    exim_server_factory: EximServerFactory, exim_client_factory: EximClientFactory
) -> None:
    server = exim_server_factory(pipe_connect_advertise=True)
    client = exim_client_factory(server.port)

    first = client.send("alice@client.test", "bob@dest.test", b"first\n")
    flags = exim_flags(first)
    assert "L" in flags and "L*" not in flags, first
    assert "K" in flags  # Exim offers CHUNKING, so the client used BDAT

    # The EHLO reply with PIPECONNECT is now in the client's hints DB: early pipelining.
    second = client.send("alice@client.test", "bob@dest.test", b"second\n")
    assert "L*" in exim_flags(second), second

    [d] = deliveries(second)
    assert d.early_pipelined and d.fields["H"] == "127.0.0.1"
    server.wait_log(r"<= alice@client\.test H=\(client\.test\) \[127\.0\.0\.2\]:\d+ P=esmtp L\* ")
    assert server.mainlog().count(" <= ") == 2


def test_exim_server_behind_proxy_header(exim_server_factory: EximServerFactory) -> None:
    server = exim_server_factory(proxy_hosts="127.0.0.1")
    result = swaks(server.port, to="x@dest.test", proxy_source="198.51.100.7")
    assert result.returncode == 0, result.stdout + result.stderr
    server.wait_log(r"<= sender@example\.org .*\[198\.51\.100\.7\].* PRX=\[?127\.0\.0\.1")


def test_exim_client_to_postfix_body_intact(
    postfix_factory: PostfixFactory, exim_client_factory: EximClientFactory
) -> None:
    pf = postfix_factory(proxy_protocol=False, forbid_unauth_pipelining=True)
    client = exim_client_factory(pf.port)

    log = client.send("alice@client.test", "carol@dest.test", BODY)
    flags = exim_flags(log)
    # Postfix offers PIPELINING and CHUNKING but not PIPECONNECT.
    assert "L" in flags and "L*" not in flags and "K" in flags, log

    [msg] = pf.wait_messages(1)
    headers, _, body = msg.partition(b"\n\n")
    assert body == BODY
    assert b"\nMessage-ID: <pcp-1." in headers
    assert b"Subject: pipeconnect-proxy test" in headers
    pf.wait_log(r"client=unknown\[127\.0\.0\.2\]")

    # Nothing cached makes the client talk early to Postfix on the next delivery.
    again = client.send("alice@client.test", "carol@dest.test", b"again\n")
    assert "L*" not in exim_flags(again), again
    assert len(pf.wait_messages(2)) == 2
    assert "improper command pipelining" not in pf.maillog()
