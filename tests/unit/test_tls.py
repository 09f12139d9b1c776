"""proxy.tls: OpenSSLStream conformance (trio's own stream checks), interop with the stdlib
`trio.SSLStream`, failure modes, resumption, and the context builders' errors."""

from __future__ import annotations

import re
import ssl
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from OpenSSL import SSL

from proxy.config import parse_config
from proxy.server import Snapshot
from proxy.tls import (
    MOZILLA_INTERMEDIATE_CIPHERS,
    OpenSSLStream,
    TLSConfigError,
    client_context,
    server_context,
)

TIMEOUT = 10
HOSTNAME = "mx.example.test"
VERSIONS = ["TLSv1.2", "TLSv1.3"]
STDLIB_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class Certs:
    ca: trustme.CA
    cert: str  # leaf + chain, PEM
    key: str
    cafile: str
    other_key: str  # a key that belongs to another certificate


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    leaf = ca.issue_cert(HOSTNAME, "127.0.0.1")
    other = ca.issue_cert("other.example.test")
    for i, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(d / "chain.pem"), append=i > 0)
    leaf.private_key_pem.write_to_path(str(d / "key.pem"))
    other.private_key_pem.write_to_path(str(d / "other-key.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return Certs(
        ca=ca,
        cert=str(d / "chain.pem"),
        key=str(d / "key.pem"),
        cafile=str(d / "ca.pem"),
        other_key=str(d / "other-key.pem"),
    )


@pytest.fixture(scope="module")
def server_ctx(certs: Certs) -> SSL.Context:
    return server_context(certs.cert, certs.key)


Pair = tuple[OpenSSLStream, OpenSSLStream]


def wrap_pair(
    server_ctx: SSL.Context,
    cafile: str,
    transports: tuple[trio.abc.Stream, trio.abc.Stream],
    *,
    version: str,
    ragged_eof_ok: bool = False,
    session: SSL.Session | None = None,
    client_ctx: SSL.Context | None = None,
) -> Pair:
    """(client, server) OpenSSLStreams over a transport pair; `version` caps the client."""
    client_t, server_t = transports
    client = OpenSSLStream(
        client_t,
        client_ctx or client_context(cafile, max_version=version),
        server_hostname=HOSTNAME,
        ragged_eof_ok=ragged_eof_ok,
        session=session,
    )
    server = OpenSSLStream(server_t, server_ctx, server_side=True, ragged_eof_ok=ragged_eof_ok)
    return client, server


async def handshake_both(a: OpenSSLStream, b: OpenSSLStream) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.do_handshake)
        nursery.start_soon(b.do_handshake)


# ---- trio's stream conformance suite ----------------------------------------------------


@pytest.mark.parametrize("ragged_eof_ok", [False, True])
@pytest.mark.parametrize("version", VERSIONS)
async def test_check_two_way_stream(
    server_ctx: SSL.Context, certs: Certs, version: str, ragged_eof_ok: bool
) -> None:
    async def stream_maker() -> Pair:
        return wrap_pair(
            server_ctx,
            certs.cafile,
            trio.testing.memory_stream_pair(),
            version=version,
            ragged_eof_ok=ragged_eof_ok,
        )

    async def clogged_stream_maker() -> Pair:
        client, server = wrap_pair(
            server_ctx,
            certs.cafile,
            trio.testing.lockstep_stream_pair(),
            version=version,
            ragged_eof_ok=ragged_eof_ok,
        )
        # As in trio's own SSLStream test: handshake first, else a receive_some meant to
        # unclog the other side would itself start a handshake and get stuck sending.
        await handshake_both(client, server)
        return client, server

    with trio.fail_after(TIMEOUT):
        await trio.testing.check_two_way_stream(stream_maker, clogged_stream_maker)


# ---- basics ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
async def test_handshake_properties_and_large_send(
    server_ctx: SSL.Context, certs: Certs, version: str
) -> None:
    client, server = wrap_pair(
        server_ctx, certs.cafile, trio.testing.memory_stream_pair(), version=version
    )
    assert server.server_side and not client.server_side
    assert client.negotiated_version is None and client.cipher is None
    assert not client.session_reused
    payload = bytes(range(256)) * 5000  # 1.28 MB in one send_all: 16 KiB records, in rounds

    async def receive_all(stream: OpenSSLStream, n: int) -> bytes:
        got = bytearray()
        while len(got) < n:
            chunk = await stream.receive_some()
            assert chunk
            got += chunk
        return bytes(got)

    with trio.fail_after(TIMEOUT):
        await handshake_both(client, server)
        assert client.negotiated_version == server.negotiated_version == version
        assert client.cipher is not None and client.cipher == server.cipher
        assert not client.session_reused and not server.session_reused
        assert server.connection.get_servername() == HOSTNAME.encode()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, payload)
            assert await receive_all(server, len(payload)) == payload
        await server.send_all(b"250 ok\r\n")
        assert await client.receive_some(3) == b"250"
        assert await client.receive_some() == b" ok\r\n"
        with pytest.raises(NotImplementedError):
            await client.send_eof()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.aclose)
            assert await server.receive_some() == b""
            assert await server.receive_some() == b""
        await server.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await client.send_eof()


async def test_socket_transport_and_concurrent_send_receive(
    server_ctx: SSL.Context, certs: Certs
) -> None:
    a, b = trio.socket.socketpair()
    client, server = wrap_pair(
        server_ctx,
        certs.cafile,
        (trio.SocketStream(a), trio.SocketStream(b)),
        version="TLSv1.3",
    )
    assert isinstance(server.transport_stream, trio.SocketStream)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def server_side() -> None:
                # A receive blocked in one task does not stop a send in another.
                async with trio.open_nursery() as inner:
                    inner.start_soon(server.send_all, b"220 ready\r\n")
                    assert await server.receive_some() == b"EHLO x\r\n"
                await server.send_all(b"250 hi\r\n")

            nursery.start_soon(server_side)
            assert await client.receive_some() == b"220 ready\r\n"
            await client.send_all(b"EHLO x\r\n")
            assert await client.receive_some() == b"250 hi\r\n"
        await client.aclose()
        await server.aclose()


# ---- interop with the stdlib-based trio.SSLStream -----------------------------------------


def stdlib_client_ctx(certs: Certs, version: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    certs.ca.configure_trust(ctx)
    ctx.maximum_version = STDLIB_VERSIONS[version]
    return ctx


@pytest.mark.parametrize("version", VERSIONS)
async def test_our_server_stdlib_client(
    server_ctx: SSL.Context, certs: Certs, version: str
) -> None:
    client_t, server_t = trio.testing.memory_stream_pair()
    server = OpenSSLStream(server_t, server_ctx, server_side=True)
    client = trio.SSLStream(client_t, stdlib_client_ctx(certs, version), server_hostname=HOSTNAME)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, b"EHLO client.example\r\n")
            assert await server.receive_some() == b"EHLO client.example\r\n"
        assert server.negotiated_version == client.version() == version
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, b"250 hello\r\n")
            assert await client.receive_some() == b"250 hello\r\n"
        # Our close_notify is a clean EOF for the stdlib side, and the other way round.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.aclose)
            assert await client.receive_some() == b""
        await client.aclose()


@pytest.mark.parametrize("version", VERSIONS)
async def test_our_client_stdlib_server(certs: Certs, version: str) -> None:
    server_ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certs.ca.issue_cert(HOSTNAME).configure_cert(server_ssl_ctx)
    client_t, server_t = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_t, server_ssl_ctx, server_side=True)
    client = OpenSSLStream(
        client_t, client_context(certs.cafile, max_version=version), server_hostname=HOSTNAME
    )
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, b"220 ready\r\n")
            assert await client.receive_some() == b"220 ready\r\n"
        assert client.negotiated_version == version
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.aclose)
            assert await server.receive_some() == b""
        await server.aclose()


async def test_client_accepts_an_ip_address_in_the_certificate(
    server_ctx: SSL.Context, certs: Certs
) -> None:
    client_t, server_t = trio.testing.memory_stream_pair()
    client = OpenSSLStream(client_t, client_context(certs.cafile), server_hostname="127.0.0.1")
    server = OpenSSLStream(server_t, server_ctx, server_side=True)
    with trio.fail_after(TIMEOUT):
        await handshake_both(client, server)
    assert server.connection.get_servername() is None  # no SNI for an address
    client_t, server_t = trio.testing.memory_stream_pair()
    client = OpenSSLStream(client_t, client_context(certs.cafile), server_hostname="127.0.0.2")
    server = OpenSSLStream(server_t, server_ctx, server_side=True)
    with (
        trio.fail_after(TIMEOUT),
        pytest.RaisesGroup(trio.BrokenResourceError, trio.BrokenResourceError),
    ):
        await handshake_both(client, server)


async def test_client_checks_the_server_name(server_ctx: SSL.Context, certs: Certs) -> None:
    client_t, server_t = trio.testing.memory_stream_pair()
    client = OpenSSLStream(
        client_t, client_context(certs.cafile), server_hostname="wrong.example.test"
    )
    server = OpenSSLStream(server_t, server_ctx, server_side=True)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def server_fails() -> None:
                with pytest.raises(trio.BrokenResourceError):
                    await server.do_handshake()

            nursery.start_soon(server_fails)
            with pytest.raises(trio.BrokenResourceError) as excinfo:
                await client.do_handshake()
            assert isinstance(excinfo.value.__cause__, SSL.Error)


# ---- failures -------------------------------------------------------------------------------


async def test_garbage_instead_of_client_hello(server_ctx: SSL.Context) -> None:
    client_t, server_t = trio.testing.memory_stream_pair()
    server = OpenSSLStream(server_t, server_ctx, server_side=True)
    with trio.fail_after(TIMEOUT):
        # e.g. a client that pipelined plaintext after STARTTLS (CVE-2011-0411 class)
        await client_t.send_all(b"MAIL FROM:<evil@example.test>\r\nRCPT TO:<x@y>\r\n")
        with pytest.raises(trio.BrokenResourceError) as excinfo:
            await server.receive_some()
        assert isinstance(excinfo.value.__cause__, SSL.Error)
        with pytest.raises(trio.BrokenResourceError):
            await server.do_handshake()
        with pytest.raises(trio.BrokenResourceError):
            await server.send_all(b"x")
        await server.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await server.receive_some()


@pytest.mark.parametrize("ragged_eof_ok", [False, True])
async def test_eof_mid_handshake(server_ctx: SSL.Context, ragged_eof_ok: bool) -> None:
    client_t, server_t = trio.testing.memory_stream_pair()
    server = OpenSSLStream(server_t, server_ctx, server_side=True, ragged_eof_ok=ragged_eof_ok)
    with trio.fail_after(TIMEOUT):
        await client_t.aclose()
        with pytest.raises(trio.BrokenResourceError):
            await server.do_handshake()
    client_t, server_t = trio.testing.memory_stream_pair()
    server = OpenSSLStream(server_t, server_ctx, server_side=True, ragged_eof_ok=ragged_eof_ok)
    with trio.fail_after(TIMEOUT):
        await client_t.aclose()
        if ragged_eof_ok:  # as trio's https_compatible: an early EOF reads as the end
            assert await server.receive_some() == b""
        else:
            with pytest.raises(trio.BrokenResourceError):
                await server.receive_some()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("ragged_eof_ok", [False, True])
async def test_ragged_eof_after_handshake(
    server_ctx: SSL.Context, certs: Certs, version: str, ragged_eof_ok: bool
) -> None:
    client, server = wrap_pair(
        server_ctx,
        certs.cafile,
        trio.testing.memory_stream_pair(),
        version=version,
        ragged_eof_ok=ragged_eof_ok,
    )
    with trio.fail_after(TIMEOUT):
        await handshake_both(client, server)
        await client.send_all(b"QUIT\r\n")
        await trio.aclose_forcefully(client.transport_stream)  # TCP FIN, no close_notify
        assert await server.receive_some() == b"QUIT\r\n"
        if ragged_eof_ok:
            assert await server.receive_some() == b""
            assert await server.receive_some() == b""
        else:
            with pytest.raises(trio.BrokenResourceError) as excinfo:
                await server.receive_some()
            assert isinstance(excinfo.value.__cause__, SSL.SysCallError)
        with pytest.raises(trio.BrokenResourceError):
            await server.send_all(b"221 bye\r\n")
        await server.aclose()


async def test_cancel_mid_handshake_leaves_it_broken(server_ctx: SSL.Context) -> None:
    client_t, server_t = trio.testing.memory_stream_pair()
    server = OpenSSLStream(server_t, server_ctx, server_side=True)
    closed: list[str] = []
    server_t.send_stream.close_hook = lambda: closed.append("send")
    with trio.fail_after(TIMEOUT):
        with trio.move_on_after(0.05) as scope:
            await server.do_handshake()  # nobody sends a ClientHello
        assert scope.cancelled_caught
        for op in (server.do_handshake, server.receive_some, partial_send(server)):
            with pytest.raises(trio.BrokenResourceError):
                await op()
        await server.aclose()
        assert closed == ["send"]
        with pytest.raises(trio.ClosedResourceError):
            await server.do_handshake()
    del client_t


async def test_cancel_mid_send_leaves_it_broken(server_ctx: SSL.Context, certs: Certs) -> None:
    client, server = wrap_pair(
        server_ctx, certs.cafile, trio.testing.lockstep_stream_pair(), version="TLSv1.3"
    )
    with trio.fail_after(TIMEOUT):
        await handshake_both(client, server)
        with trio.move_on_after(0.05) as scope:
            await client.send_all(b"x" * 100_000)  # the server never reads
        assert scope.cancelled_caught
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"y")
        with pytest.raises(trio.BrokenResourceError):
            await client.receive_some()
        await client.aclose()
        await server.aclose()


def partial_send(stream: OpenSSLStream) -> Callable[[], Awaitable[None]]:
    async def send() -> None:
        await stream.send_all(b"x")

    return send


async def test_waiters_for_a_failed_handshake_see_it_broken(server_ctx: SSL.Context) -> None:
    client_t, server_t = trio.testing.memory_stream_pair()
    server = OpenSSLStream(server_t, server_ctx, server_side=True)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def waiter() -> None:
                with pytest.raises(trio.BrokenResourceError):
                    await server.do_handshake()

            async def runner() -> None:
                with pytest.raises(trio.BrokenResourceError):
                    await server.receive_some()

            nursery.start_soon(runner)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            await client_t.send_all(b"\x00" * 64)


async def test_concurrent_use_is_detected(server_ctx: SSL.Context, certs: Certs) -> None:
    client, server = wrap_pair(
        server_ctx, certs.cafile, trio.testing.lockstep_stream_pair(), version="TLSv1.3"
    )
    with trio.fail_after(TIMEOUT):
        await handshake_both(client, server)
        with pytest.RaisesGroup(trio.BusyResourceError):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, b"a")
                nursery.start_soon(client.send_all, b"b")
        with pytest.RaisesGroup(trio.BusyResourceError):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.receive_some, 1)
                nursery.start_soon(server.receive_some, 1)


async def test_aclose_before_handshake_does_not_handshake(server_ctx: SSL.Context) -> None:
    client_t, server_t = trio.testing.memory_stream_pair()
    server = OpenSSLStream(server_t, server_ctx, server_side=True)
    with trio.fail_after(TIMEOUT):
        await server.aclose()
        assert await client_t.receive_some() == b""  # no TLS bytes at all, just the close


# ---- session resumption ---------------------------------------------------------------------


async def one_session(
    server_ctx: SSL.Context,
    certs: Certs,
    client_ctx: SSL.Context,
    session: SSL.Session | None,
) -> tuple[bool, bool, SSL.Session | None]:
    """A connection; (client reused, server reused, the client's session afterwards)."""
    client, server = wrap_pair(
        server_ctx,
        certs.cafile,
        trio.testing.memory_stream_pair(),
        version="",
        session=session,
        client_ctx=client_ctx,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_all, b"220 ready\r\n")
        # TLS 1.3 tickets come after the handshake, with the server's first data.
        assert await client.receive_some() == b"220 ready\r\n"
    reused = (client.session_reused, server.session_reused)
    new_session = client.session
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.aclose)
        nursery.start_soon(server.aclose)
    return (*reused, new_session)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("tickets", [True, False])
async def test_session_resumption(certs: Certs, version: str, tickets: bool) -> None:
    ctx = server_context(certs.cert, certs.key, session_tickets=tickets)
    # pyOpenSSL only resumes a session made with the same client Context object.
    client_ctx = client_context(certs.cafile, max_version=version)
    with trio.fail_after(TIMEOUT):
        c_reused, s_reused, session = await one_session(ctx, certs, client_ctx, None)
        assert (c_reused, s_reused) == (False, False)
        assert session is not None
        c_reused, s_reused, _ = await one_session(ctx, certs, client_ctx, session)
        # Without tickets the server-side session cache resumes (TLS 1.2 session id,
        # TLS 1.3 stateful ticket).
        assert (c_reused, s_reused) == (True, True)
        # Another server context (other ticket keys, other cache) cannot resume it.
        other = server_context(certs.cert, certs.key, session_tickets=tickets)
        c_reused, s_reused, _ = await one_session(other, certs, client_ctx, session)
        assert (c_reused, s_reused) == (False, False)


@pytest.mark.parametrize("version", VERSIONS)
async def test_stdlib_client_resumes_with_our_server(certs: Certs, version: str) -> None:
    ctx = server_context(certs.cert, certs.key)
    client_ctx = stdlib_client_ctx(certs, version)
    session: ssl.SSLSession | None = None
    with trio.fail_after(TIMEOUT):
        for attempt in range(2):
            client_t, server_t = trio.testing.memory_stream_pair()
            server = OpenSSLStream(server_t, ctx, server_side=True)
            client = trio.SSLStream(client_t, client_ctx, server_hostname=HOSTNAME)
            if session is not None:
                client.session = session
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.send_all, b"220 ready\r\n")
                assert await client.receive_some() == b"220 ready\r\n"
            assert server.session_reused == client.session_reused == (attempt == 1)
            session = client.session
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.aclose)
                nursery.start_soon(server.aclose)


# ---- context builders -------------------------------------------------------------------------


def test_server_context_options(certs: Certs) -> None:
    ctx = server_context(certs.cert, certs.key, min_version="TLSv1.3")
    assert isinstance(ctx, SSL.Context)
    assert "ECDHE-RSA-AES128-GCM-SHA256" in MOZILLA_INTERMEDIATE_CIPHERS


async def test_min_version_is_enforced(certs: Certs) -> None:
    ctx = server_context(certs.cert, certs.key, min_version="TLSv1.3")
    client, server = wrap_pair(
        ctx, certs.cafile, trio.testing.memory_stream_pair(), version="TLSv1.2"
    )
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def server_fails() -> None:
                with pytest.raises(trio.BrokenResourceError):
                    await server.do_handshake()

            nursery.start_soon(server_fails)
            with pytest.raises(trio.BrokenResourceError):
                await client.do_handshake()


# ---- the [tls] section reaches the context that serves clients -------------------------------


def configured_context(certs: Certs, **tls: object) -> SSL.Context:
    """The server context a session gets (``Snapshot``) from a file with ``[tls]`` ``tls``."""
    config = parse_config(
        {
            "listen": {"plain": ["127.0.0.1:0"]},
            "upstream": {"address": "127.0.0.1:2525"},
            "tls": {"certificate": certs.cert, "key": certs.key, **tls},
        }
    )
    ctx = Snapshot(config).tls_context
    assert ctx is not None
    return ctx


async def handshake(
    ctx: SSL.Context, certs: Certs, version: str, client_ctx: SSL.Context | None = None
) -> tuple[str | None, str | None] | None:
    """(version, cipher) the server negotiated with a client capped at ``version``; None if
    the handshake failed on both ends."""
    client, server = wrap_pair(
        ctx, certs.cafile, trio.testing.memory_stream_pair(), version=version, client_ctx=client_ctx
    )
    failed: list[str] = []

    async def shake(side: str, stream: OpenSSLStream) -> None:
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError:
            failed.append(side)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(shake, "server", server)
            nursery.start_soon(shake, "client", client)
    if failed:
        assert sorted(failed) == ["client", "server"], failed
        return None
    return server.negotiated_version, server.cipher


async def test_tls_section_defaults(certs: Certs) -> None:
    """TLS 1.2 and 1.3, the Mozilla intermediate ciphers, tickets on."""
    ctx = configured_context(certs)
    assert not ctx.set_options(0) & SSL.OP_NO_TICKET  # set_options(0) only reads them
    assert await handshake(ctx, certs, "TLSv1.3") is not None
    negotiated = await handshake(ctx, certs, "TLSv1.2")
    assert negotiated is not None
    version, cipher = negotiated
    assert version == "TLSv1.2" and cipher in MOZILLA_INTERMEDIATE_CIPHERS.split(":")


async def test_tls_min_version_refuses_an_older_client(certs: Certs) -> None:
    ctx = configured_context(certs, min_version="TLSv1.3")
    assert await handshake(ctx, certs, "TLSv1.2") is None
    negotiated = await handshake(ctx, certs, "TLSv1.3")
    assert negotiated is not None and negotiated[0] == "TLSv1.3"


async def test_tls_ciphers_are_the_only_ones_offered(certs: Certs) -> None:
    ctx = configured_context(certs, ciphers="AES256")
    negotiated = await handshake(ctx, certs, "TLSv1.2")
    assert negotiated is not None
    version, cipher = negotiated
    assert version == "TLSv1.2" and cipher is not None and "AES256" in cipher
    aes128_only = client_context(certs.cafile, max_version="TLSv1.2")
    aes128_only.set_cipher_list(b"AES128")
    assert await handshake(ctx, certs, "TLSv1.2", aes128_only) is None
    # the defaults take that client
    assert await handshake(configured_context(certs), certs, "TLSv1.2", aes128_only) is not None


def test_tls_session_tickets_off(certs: Certs) -> None:
    assert configured_context(certs, session_tickets=False).set_options(0) & SSL.OP_NO_TICKET


def raises_config(*parts: str) -> AbstractContextManager[pytest.ExceptionInfo[TLSConfigError]]:
    """pytest.raises(TLSConfigError) whose message contains `parts` in order, literally."""
    return pytest.raises(TLSConfigError, match=".*".join(re.escape(p) for p in parts))


def test_server_context_errors_name_the_file(certs: Certs, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    with raises_config(f"certificate file {missing}: cannot read"):
        server_context(missing, certs.key)
    with raises_config(f"key file {missing}: cannot read"):
        server_context(certs.cert, missing)

    garbage = str(tmp_path / "garbage.pem")
    Path(garbage).write_bytes(b"not a certificate\n")
    with raises_config(f"certificate file {garbage}: no PEM certificate"):
        server_context(garbage, certs.key)
    with raises_config(f"key file {garbage}: no PEM private key"):
        server_context(certs.cert, garbage)
    # a certificate where the key should be
    with raises_config(f"key file {certs.cert}: no PEM private key"):
        server_context(certs.cert, certs.cert)
    with raises_config(f"key file {certs.other_key}: ", "does not match the certificate in"):
        server_context(certs.cert, certs.other_key)
    with raises_config("min_version 'TLSv1.1' is not one of"):
        server_context(certs.cert, certs.key, min_version="TLSv1.1")
    with raises_config("ciphers 'NOPE': no usable cipher"):
        server_context(certs.cert, certs.key, ciphers="NOPE")


def test_client_context_errors_name_the_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing-ca.pem")
    with raises_config(f"CA file {missing}: cannot read"):
        client_context(missing)
    garbage = str(tmp_path / "garbage.pem")
    Path(garbage).write_bytes(b"junk\n")
    with raises_config(f"CA file {garbage}: unusable"):
        client_context(garbage)
    assert isinstance(client_context(None), SSL.Context)
    assert isinstance(client_context(None, verify=False), SSL.Context)


def test_server_side_rejects_client_options(server_ctx: SSL.Context) -> None:
    a, _b = trio.testing.memory_stream_pair()
    with pytest.raises(ValueError, match="client side only"):
        OpenSSLStream(a, server_ctx, server_side=True, server_hostname=HOSTNAME)
