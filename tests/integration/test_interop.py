"""Other real peers: swaks as a client, aiosmtpd as an MTA, Postfix judging forwarded input."""

from __future__ import annotations

import gc
import socket
import time
import warnings
from typing import Any

import trio
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from proxy.client import EarlyPipeliningClient
from tests.conftest import ProxyFactory
from tests.mta import Postfix, free_port, swaks


def test_swaks_pipelining_through_proxy(postfix: Postfix, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(postfix.port)
    result = swaks(proxy.port, "--pipeline", "--body", "hello from swaks", to="box@dest.test")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PIPECONNECT" in result.stdout  # swaks prints the EHLO reply it got
    [message] = postfix.wait_messages(1)
    assert b"hello from swaks" in message
    assert "protocol synchronization" not in postfix.maillog()


def test_client_sent_proxy_header_refused(postfix: Postfix, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(postfix.port)
    result = swaks(proxy.port, proxy_source="198.51.100.7", to="box@dest.test")
    assert result.returncode != 0
    assert "554 5.7.1 PROXY protocol is not accepted" in result.stdout
    time.sleep(0.5)
    assert postfix.messages() == []
    assert "198.51.100.7" not in postfix.maillog()


def test_forwarded_early_input_judged_by_postfix(
    postfix: Postfix, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(
        postfix.port,
        pipe_connect={"advertise_hosts": [], "unadvertised_early_input": "forward"},
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"EHLO early.test\r\nMAIL FROM:<a@early.test>\r\n")
        received = b""
        while chunk := s.recv(65536):
            received += chunk
            if b"554" in received:
                break
    assert b"554 5.5.0 Error: SMTP protocol synchronization" in received, received
    postfix.wait_log(r"improper command pipelining")


class Collect:
    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.proxy_sources: list[str] = []

    async def handle_PROXY(
        self, server: SMTP, session: Session, envelope: Envelope, proxy_data: Any
    ) -> bool:
        self.proxy_sources.append(str(proxy_data.src_addr))
        return True

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.messages.append((str(session.peer[0]), envelope.content))
        return "250 2.0.0 Ok: queued"


def test_aiosmtpd_upstream_without_pipelining(proxy_factory: ProxyFactory) -> None:
    handler = Collect()
    port = free_port()
    controller = Controller(
        handler, hostname="127.0.0.1", port=port, proxy_protocol_timeout=5, ready_timeout=10
    )
    controller.start()
    try:
        proxy = proxy_factory(port)
        client = EarlyPipeliningClient()
        body = b"Subject: aiosmtpd\r\n\r\nvia the proxy\r\n"

        async def deliver_twice() -> list[bool]:
            out = []
            for _ in range(2):
                d = await client.send(
                    ("127.0.0.1", proxy.port), "a@src.test", ["b@dest.test"], body
                )
                out.append(d.early)
            return out

        assert trio.run(deliver_twice) == [False, True]
    finally:
        controller.stop()
        # aiosmtpd leaves its asyncio transports to the garbage collector when its loop
        # stops; collect them here so the warning is not blamed on a later test.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
    assert [content for _, content in handler.messages] == [body, body]
    assert handler.proxy_sources == ["127.0.0.1", "127.0.0.1"]
    sessions = proxy.session_lines(2)
    assert " L. " in sessions[0] and " L* " in sessions[1], proxy.log()
