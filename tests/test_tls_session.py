"""STARTTLS and TLS-on-connect terminated by the proxy, against the fake MTA."""

from __future__ import annotations

import datetime
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from OpenSSL import SSL

from proxy.config import load_config
from proxy.metrics import Metrics
from proxy.server import Runtime, serve
from proxy.smtp import Reply, ReplyReader
from proxy.tls import OpenSSLStream, client_context
from tests.proxyproc import to_toml

from .fakemta import FakeMTA
from .samples import sample
from .test_session import ENVELOPE, MESSAGE, make_config


@asynccontextmanager
async def running_tls(
    mta: FakeMTA, files: dict[str, str], **sections: dict[str, Any]
) -> AsyncIterator[tuple[int, int, Metrics]]:
    tls = {"certificate": files["certificate"], "key": files["key"]}
    async with trio.open_nursery() as nursery:
        port = await nursery.start(mta.serve)
        cfg = make_config(port, tls=tls, listen={"tls_on_connect": ["127.0.0.1:0"]}, **sections)
        metrics = Metrics()
        bound = await nursery.start(serve, cfg, metrics)
        try:
            yield bound[0][1], bound.tls_on_connect[0][1], metrics
        finally:
            nursery.cancel_scope.cancel()


class Conversation:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.replies = ReplyReader()
        self.reads = 0

    async def replies_n(self, n: int) -> list[Reply]:
        out: list[Reply] = []
        with trio.fail_after(5):
            while len(out) < n:
                reply = self.replies.next_reply()
                if reply is not None:
                    out.append(reply)
                    continue
                data = await self.stream.receive_some(65536)
                assert data, f"closed after {out}"
                self.reads += 1
                self.replies.feed(data)
        return out

    async def start_tls(self, ca_file: str, *, verify: bool = True) -> None:
        assert self.replies.buffered == 0
        ctx = client_context(ca_file, verify=verify)
        tls = OpenSSLStream(self.stream, ctx, server_hostname="mx.test")
        await tls.do_handshake()
        self.stream = tls


def keywords(ehlo: Reply) -> list[bytes]:
    return [line.split(b" ")[0] for line in ehlo.lines[1:]]


async def test_starttls_then_pipelined_group(tls_files: dict[str, str]) -> None:
    mta = FakeMTA()
    async with running_tls(mta, tls_files) as (port, _, _m):
        c = Conversation(await trio.open_tcp_stream("127.0.0.1", port))
        async with c.stream:
            await c.replies_n(1)
            await c.stream.send_all(b"EHLO me.test\r\nSTARTTLS\r\n")
            ehlo, go = await c.replies_n(2)
            assert b"STARTTLS" in keywords(ehlo) and go.code == 220
            await c.start_tls(tls_files["ca"])
            await c.stream.send_all(b"EHLO me.test\r\n" + ENVELOPE)
            ehlo2, mail, rcpt, data = await c.replies_n(4)
            assert b"STARTTLS" not in keywords(ehlo2) and b"PIPECONNECT" in keywords(ehlo2)
            assert (mail.code, rcpt.code, data.code) == (250, 250, 354)
            await c.stream.send_all(MESSAGE + b".\r\nQUIT\r\n")
            assert [r.code for r in await c.replies_n(2)] == [250, 221]
    assert mta.messages == [MESSAGE]
    assert not any(b"STARTTLS" in cmd for cmd in mta.commands)
    assert mta.violations == []


async def test_plaintext_after_starttls_is_discarded(tls_files: dict[str, str]) -> None:
    mta = FakeMTA()
    async with running_tls(mta, tls_files) as (port, _, _m):
        c = Conversation(await trio.open_tcp_stream("127.0.0.1", port))
        async with c.stream:
            await c.replies_n(1)
            await c.stream.send_all(b"EHLO me.test\r\n")
            await c.replies_n(1)
            # the injection: a command behind STARTTLS in the same cleartext segment
            await c.stream.send_all(b"STARTTLS\r\nMAIL FROM:<evil@inject.test>\r\n")
            [go] = await c.replies_n(1)
            assert go.code == 220
            await c.start_tls(tls_files["ca"])
            await c.stream.send_all(b"EHLO me.test\r\nQUIT\r\n")
            ehlo, bye = await c.replies_n(2)
            assert (ehlo.code, bye.code) == (250, 221)
    assert not any(b"evil" in cmd for cmd in mta.commands), mta.commands


async def test_early_ehlo_starttls_answered_in_one_write(tls_files: dict[str, str]) -> None:
    mta = FakeMTA(banner_delay=0.2)
    async with running_tls(mta, tls_files) as (port, _, metrics):
        c = Conversation(await trio.open_tcp_stream("127.0.0.1", port))
        async with c.stream:
            await c.stream.send_all(b"EHLO me.test\r\nSTARTTLS\r\n")
            banner, ehlo, go = await c.replies_n(3)
            assert (banner.code, ehlo.code, go.code) == (220, 250, 220)
            assert c.reads == 1
            await c.start_tls(tls_files["ca"])
            await c.stream.send_all(b"EHLO me.test\r\n" + ENVELOPE)
            assert [r.code for r in await c.replies_n(4)] == [250, 250, 250, 354]
            await c.stream.send_all(MESSAGE + b".\r\nQUIT\r\n")
            assert [r.code for r in await c.replies_n(2)] == [250, 221]
    assert mta.messages == [MESSAGE] and mta.violations == []
    assert sample(metrics, "early_pipelining_used_total") == 1
    # banner + pre-TLS EHLO reply + post-TLS EHLO reply
    assert sample(metrics, "round_trips_saved_total") == 3


async def test_tls_on_connect_early_pipelining(tls_files: dict[str, str]) -> None:
    mta = FakeMTA(banner_delay=0.3)
    async with running_tls(mta, tls_files) as (_, tls_port, _m):
        c = Conversation(await trio.open_tcp_stream("127.0.0.1", tls_port))
        async with c.stream:
            await c.start_tls(tls_files["ca"])
            await c.stream.send_all(b"EHLO me.test\r\n" + ENVELOPE)
            replies = await c.replies_n(5)
            assert [r.code for r in replies] == [220, 250, 250, 250, 354]
            assert b"STARTTLS" not in keywords(replies[1])
            await c.stream.send_all(MESSAGE + b".\r\nQUIT\r\n")
            assert [r.code for r in await c.replies_n(2)] == [250, 221]
    assert mta.messages == [MESSAGE] and mta.violations == []
    # the PROXY v2 header said the client used TLS (PP2_TYPE_SSL, version sub-TLV)
    [(ssl_tlv,)] = [t for t in mta.proxy_tlvs if t]
    assert ssl_tlv[0] == 0x20 and ssl_tlv[1][0] == 0x01
    assert b"\x21\x00\x07TLSv1.3" in ssl_tlv[1]


async def test_garbage_handshake_does_not_hurt_others(tls_files: dict[str, str]) -> None:
    mta = FakeMTA()
    async with running_tls(mta, tls_files) as (port, tls_port, metrics):
        bad = await trio.open_tcp_stream("127.0.0.1", tls_port)
        async with bad:
            await bad.send_all(b"EHLO not-tls.test\r\n" * 20)
            with trio.fail_after(5):
                while await bad.receive_some(4096):
                    pass  # the proxy closes it
            good = Conversation(await trio.open_tcp_stream("127.0.0.1", port))
            async with good.stream:
                await good.replies_n(1)
                await good.stream.send_all(b"QUIT\r\n")
                assert [r.code for r in await good.replies_n(1)] == [221]
    assert sample(metrics, "sessions_total", listener="tls_on_connect", outcome="tls-failed") == 1


async def test_stalled_handshake_times_out(tls_files: dict[str, str]) -> None:
    mta = FakeMTA()
    async with running_tls(mta, tls_files, timeouts={"command": 0.3}) as (_, tls_port, metrics):
        stalled = await trio.open_tcp_stream("127.0.0.1", tls_port)
        async with stalled:
            with trio.fail_after(5):
                assert await stalled.receive_some(4096) == b""  # closed by the proxy
        await trio.sleep(0.1)
    assert sample(metrics, "sessions_total", listener="tls_on_connect", outcome="tls-timeout") == 1


async def starttls_session(port: int, ca: str, *, verify: bool) -> Conversation:
    c = Conversation(await trio.open_tcp_stream("127.0.0.1", port))
    try:
        await c.replies_n(1)
        await c.stream.send_all(b"EHLO me.test\r\nSTARTTLS\r\n")
        assert [r.code for r in await c.replies_n(2)] == [250, 220]
        await c.start_tls(ca, verify=verify)
    except BaseException:
        await trio.aclose_forcefully(c.stream)
        raise
    return c


async def test_reload_expired_to_fresh_certificate_keeps_open_session(
    ca: trustme.CA, tmp_path: Path
) -> None:
    """The certificate expired; the operator installs a fresh one and sends SIGHUP. New
    sessions get it, and a session that started with the old one finishes its message."""
    files = {"certificate": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")}
    ca_file = str(tmp_path / "ca.pem")
    ca.cert_pem.write_to_path(ca_file)

    def install(not_after: datetime.datetime) -> None:
        cert = ca.issue_cert(
            "mx.test", not_before=not_after - datetime.timedelta(days=90), not_after=not_after
        )
        cert.private_key_and_cert_chain_pem.write_to_path(files["certificate"])
        cert.private_key_pem.write_to_path(files["key"])

    now = datetime.datetime.now(datetime.UTC)
    install(now - datetime.timedelta(days=1))
    mta = FakeMTA()
    path = tmp_path / "proxy.toml"
    async with trio.open_nursery() as nursery:
        mta_port = await nursery.start(mta.serve)
        sections = {
            "listen": {"plain": ["127.0.0.1:0"]},
            "upstream": {"address": f"127.0.0.1:{mta_port}"},
            "tls": files,
            "metrics": {"listen": ""},
        }
        path.write_text(to_toml(sections))
        runtime = Runtime(load_config(path))
        metrics = Metrics()
        start = functools.partial(serve, runtime.current.config, metrics, runtime=runtime)
        port = (await nursery.start(start))[0][1]

        with pytest.raises(trio.BrokenResourceError):  # a verifying client refuses it
            await starttls_session(port, ca_file, verify=True)
        old = await starttls_session(port, ca_file, verify=False)  # one that does not care

        install(now + datetime.timedelta(days=90))
        assert await runtime.reload(str(path), metrics)

        new = await starttls_session(port, ca_file, verify=True)  # fresh certificate
        for c in (old, new):
            await c.stream.send_all(b"EHLO me.test\r\n" + ENVELOPE)
            assert [r.code for r in await c.replies_n(4)] == [250, 250, 250, 354]
            await c.stream.send_all(MESSAGE + b".\r\nQUIT\r\n")
            assert [r.code for r in await c.replies_n(2)] == [250, 221]
            await c.stream.aclose()
        nursery.cancel_scope.cancel()
    assert mta.messages == [MESSAGE, MESSAGE]


async def test_client_vanishing_mid_handshake_is_counted(tls_files: dict[str, str]) -> None:
    hello = SSL.Connection(client_context(tls_files["ca"]), None)
    hello.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        hello.do_handshake()
    client_hello = hello.bio_read(65536)
    mta = FakeMTA()
    async with running_tls(mta, tls_files) as (port, tls_port, metrics):
        gone = await trio.open_tcp_stream("127.0.0.1", tls_port)
        await gone.send_all(client_hello[: len(client_hello) // 2])
        await gone.aclose()
        good = Conversation(await trio.open_tcp_stream("127.0.0.1", port))
        async with good.stream:
            await good.replies_n(1)
            await good.stream.send_all(b"QUIT\r\n")
            assert [r.code for r in await good.replies_n(1)] == [221]
        with trio.fail_after(5):
            # the session ends on its own when it reads the EOF; a counter has no event
            failed = {"listener": "tls_on_connect", "outcome": "tls-failed"}
            while sample(metrics, "sessions_total", **failed) < 1:  # noqa: ASYNC110
                await trio.sleep(0.01)
    assert mta.messages == []
