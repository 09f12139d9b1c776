"""The connection to the MTA: connect, say who the client is, read replies under timeouts."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Sequence

import trio
from OpenSSL import SSL

from . import fastio
from .outcomes import Outcome
from .proxyproto import (
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_SSL,
    encode_v1,
    encode_v2,
    xclient_command,
)
from .smtp import ProtocolError, Reply, ReplyReader, ehlo_keywords
from .tls import OpenSSLStream

Endpoint = tuple[str, int]
CLOSE_TIMEOUT = 2.0  # seconds for a close (TLS close_notify is one small write)


class UpstreamError(Exception):
    """The MTA failed us. ``reply`` is what the client gets; ``outcome`` names it in logs."""

    def __init__(self, outcome: Outcome, detail: str) -> None:
        super().__init__(f"{outcome}: {detail}")
        self.outcome = outcome
        self.reply = Reply.make(421, f"4.4.2 Upstream MTA unavailable ({detail}), try again later")


def tls_tlv(version: str, cipher: str | None) -> tuple[int, bytes]:
    """PP2_TYPE_SSL: the client connected over TLS (no client certificate asked for)."""
    sub = [(PP2_SUBTYPE_SSL_VERSION, version.encode())]
    if cipher:
        sub.append((PP2_SUBTYPE_SSL_CIPHER, cipher.encode()))
    body = b"".join(struct.pack("!BH", t, len(v)) + v for t, v in sub)
    # client: PP2_CLIENT_SSL; verify: 0 (nothing to verify, no client certificate)
    return PP2_TYPE_SSL, struct.pack("!BI", 0x01, 0) + body


def identity_header(
    method: str, client: Endpoint, local: Endpoint, tlvs: Sequence[tuple[int, bytes]] = ()
) -> bytes:
    """Bytes sent before anything else, so the MTA judges the real client address."""
    if method == "proxy-v2":
        return encode_v2(client, local, tlvs)
    if method == "proxy-v1":
        return encode_v1(client, local)
    return b""


class Upstream:
    def __init__(self, stream: trio.SocketStream, max_reply_line: int, send_timeout: float) -> None:
        self.stream: trio.abc.Stream = stream
        self.tls = ""  # negotiated version once upstream STARTTLS is done
        self.replies = ReplyReader(max_line=max_reply_line)
        self.bytes_sent = 0
        # Bound on one blocked send (the session's data-block timeout): an MTA that stops
        # reading mid-message must not hold the session forever.
        self.send_timeout = send_timeout
        # Bytes the client sent early that were already passed on (forward mode): when the
        # session relays them again they are skipped, so the MTA sees each byte once.
        self.skip = 0

    async def forward_early(self, data: bytes) -> None:
        """Send bytes the client sent before the banner, and skip them when relayed later."""
        await self._write(data)
        self.skip += len(data)

    async def send(self, data: bytes) -> None:
        if self.skip:
            n = min(self.skip, len(data))
            self.skip -= n
            data = data[n:]
        if data:
            await self._write(data)

    async def _write(self, data: bytes) -> None:
        sent = fastio.try_send(self.stream, data)
        try:
            if sent < len(data):
                with trio.move_on_after(self.send_timeout) as scope:
                    await fastio.send_all(self.stream, data[sent:])
                if scope.cancelled_caught:
                    stalled = f"MTA took no data for {self.send_timeout:g}s"
                    raise UpstreamError(Outcome.UPSTREAM_TIMEOUT, stalled)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise UpstreamError(Outcome.UPSTREAM_LOST, "connection lost while sending") from exc
        self.bytes_sent += len(data)

    async def read_reply(self, timeout: float, what: str = "reply") -> Reply:
        """The next reply, whole within ``timeout`` (not per read: an MTA trickling its
        reply cannot stretch the wait)."""
        deadline = trio.current_time() + timeout
        while True:
            try:
                reply = self.replies.next_reply()
            except ProtocolError as exc:
                raise UpstreamError(Outcome.UPSTREAM_PROTOCOL, exc.reply.text) from exc
            if reply is not None:
                return reply
            data = fastio.try_receive(self.stream, 65536)
            if data is None:
                data = b""
                with trio.move_on_at(deadline) as scope:
                    try:
                        data = await fastio.receive_some(self.stream, 65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        lost = f"connection lost awaiting {what}"
                        raise UpstreamError(Outcome.UPSTREAM_LOST, lost) from exc
                if scope.cancelled_caught:
                    raise UpstreamError(Outcome.UPSTREAM_TIMEOUT, f"no {what} within {timeout:g}s")
            if not data:
                raise UpstreamError(Outcome.UPSTREAM_LOST, f"connection closed awaiting {what}")
            self.replies.feed(data)

    async def aclose(self) -> None:
        # Shielded (it also runs while being cancelled) but bounded: a TLS close_notify to
        # an MTA that reads nothing must not hang; cancelled, the close is forceful.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT):
            await self.stream.aclose()


async def _open(address: Endpoint) -> trio.SocketStream:
    """A numeric address (the usual sidecar case) skips open_tcp_stream's resolver and
    happy-eyeballs machinery, which costs as much again as the connect on loopback."""
    host, port = address
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def connect(
    address: Endpoint,
    *,
    identity: str,
    client: Endpoint,
    local: Endpoint,
    connect_timeout: float,
    max_reply_line: int,
    send_timeout: float,
    tlvs: Sequence[tuple[int, bytes]] = (),
) -> Upstream:
    """Open the MTA connection and write the PROXY header, alone in its own segment:
    Postfix peeks at the header and counts anything behind it as talking too early."""
    with trio.move_on_after(connect_timeout) as scope:
        try:
            stream = await _open(address)
        except OSError as exc:
            raise UpstreamError(
                Outcome.UPSTREAM_DOWN, f"connect failed: {exc.strerror or exc}"
            ) from exc
    if scope.cancelled_caught:
        raise UpstreamError(Outcome.UPSTREAM_DOWN, f"connect timed out after {connect_timeout:g}s")
    up = Upstream(stream, max_reply_line, send_timeout)
    header = identity_header(identity, client, local, tlvs)
    if header:
        try:
            await up.send(header)
        except BaseException:
            # Cancelled by a refusal in the early phase: nobody else holds the socket.
            await up.aclose()
            raise
    return up


async def client_name(addr: str, timeout: float = 5.0) -> str:
    """The client's verified host name, as Postfix would find it itself: the PTR name only if
    it resolves back to the address. Without NAME, Postfix would keep the proxy's own name."""
    with trio.move_on_after(timeout):
        try:
            name, _ = await trio.socket.getnameinfo((addr, 0), socket.NI_NAMEREQD)
            infos = await trio.socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            return "[TEMPUNAVAIL]" if exc.errno == socket.EAI_AGAIN else "[UNAVAILABLE]"
        if any(info[4][0] == addr for info in infos):
            return str(name)
        return "[UNAVAILABLE]"
    return "[TEMPUNAVAIL]"


async def xclient(up: Upstream, client: Endpoint, timeout: float) -> None:
    """Postfix XCLIENT after the banner: it resets the session and answers 220."""
    name = await client_name(client[0])
    await up.send(xclient_command(client[0], client[1], name=name))
    reply = await up.read_reply(timeout, "XCLIENT reply")
    if reply.code != 220:
        raise UpstreamError(Outcome.UPSTREAM_XCLIENT, f"XCLIENT refused: {reply.code} {reply.text}")


async def starttls(
    up: Upstream,
    context: SSL.Context,
    *,
    ehlo: str,
    server_name: str | None,
    timeout: float,
) -> None:
    """Upgrade the MTA connection before any client command reaches it (``upstream.tls =
    "starttls"``): EHLO, STARTTLS, handshake. The client's own EHLO is replayed after it, so
    the MTA sees the client's greeting over TLS, as it would directly."""
    await up.send(f"EHLO {ehlo}\r\n".encode())
    reply = await up.read_reply(timeout, "EHLO reply")
    if reply.code != 250 or "STARTTLS" not in ehlo_keywords(reply):
        raise UpstreamError(Outcome.UPSTREAM_TLS, f"MTA does not offer STARTTLS ({reply.code})")
    await up.send(b"STARTTLS\r\n")
    reply = await up.read_reply(timeout, "STARTTLS reply")
    if reply.code != 220:
        raise UpstreamError(Outcome.UPSTREAM_TLS, f"STARTTLS refused: {reply.code} {reply.text}")
    if up.replies.buffered:
        # Bytes behind the 220 would be read as if they came over TLS (CVE-2011-0411 class).
        raise UpstreamError(Outcome.UPSTREAM_TLS, "MTA sent data after its STARTTLS reply")
    stream = OpenSSLStream(up.stream, context, server_side=False, server_hostname=server_name)
    with trio.move_on_after(timeout) as scope:
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            raise UpstreamError(
                Outcome.UPSTREAM_TLS, f"TLS handshake: {exc.__cause__ or exc}"
            ) from exc
    if scope.cancelled_caught:
        raise UpstreamError(Outcome.UPSTREAM_TLS, f"TLS handshake timed out after {timeout:g}s")
    up.stream = stream
    up.tls = stream.negotiated_version or "TLS"
