"""PROXY protocol v1/v2 (HAProxy's proxy-protocol.txt) and Postfix XCLIENT, for TCP over IPv4/IPv6.

Pure functions, no I/O. The encoders are what the proxy sends upstream; the decoder is for the
receiving side (the demo MTA, and tests that play an MTA).

Addresses are ``(host, port)`` tuples. An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, what a
dual-stack listener reports for an IPv4 client) is sent as plain IPv4, so the MTA sees the client's
real IPv4 address; if source and destination families still differ, the IPv4 one is mapped into
IPv6, because a header carries a single address family.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .addresses import Endpoint as Endpoint  # re-exported: a header's src and dst
from .addresses import IPAddress, unmap

V1_MAX_LENGTH = 107  # "PROXY TCP6 <39> <39> 65535 65535\r\n"
V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LENGTH = 16  # signature, ver/cmd, fam, 16-bit length

V2_LOCAL = 0x20
V2_PROXY = 0x21
V2_UNSPEC = 0x00
V2_TCP4 = 0x11
V2_TCP6 = 0x21

# TLV types (section 2.2)
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30

_ADDR_BLOCK = {V2_TCP4: (4, 12), V2_TCP6: (16, 36)}  # fam -> (address size, block size)
_SKIP_BLOCK = {0x12: 12, 0x22: 36, 0x31: 216, 0x32: 216} | {
    f: b for f, (_, b) in _ADDR_BLOCK.items()
}
_V1_PORT = re.compile(r"0|[1-9][0-9]{0,4}")


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY protocol header; the receiver must drop the connection."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A decoded header. ``src``/``dst`` are None for v2 LOCAL, v1 UNKNOWN and v2 UNSPEC: the
    receiver then uses the connection's real endpoints. ``length`` is the bytes consumed."""

    version: int
    src: Endpoint | None
    dst: Endpoint | None
    length: int
    tlvs: tuple[tuple[int, bytes], ...] = ()

    @property
    def is_local(self) -> bool:
        return self.src is None


# ---------------------------------------------------------------------------------- encoding


def _port(port: int) -> int:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    return port


def _map6(addr: IPAddress) -> ipaddress.IPv6Address:
    if isinstance(addr, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + addr.packed)
    return addr


def _text(addr: IPAddress) -> str:
    """Canonical text; IPv4-mapped as ``::ffff:192.0.2.1`` on every Python version (the
    inverse of ``unmap``: only a pair of mixed families, mapped by ``_map6``, has one)."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return f"::ffff:{addr.ipv4_mapped}"
    return str(addr)


def _pair(src: Endpoint, dst: Endpoint) -> tuple[IPAddress, IPAddress]:
    s, d = unmap(src[0]), unmap(dst[0])
    _port(src[1])
    _port(dst[1])
    if s.version != d.version:
        return _map6(s), _map6(d)
    return s, d


def encode_v1(src: Endpoint, dst: Endpoint) -> bytes:
    """``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n``."""
    s, d = _pair(src, dst)
    fam = "TCP4" if s.version == 4 else "TCP6"
    return f"PROXY {fam} {_text(s)} {_text(d)} {src[1]} {dst[1]}\r\n".encode("ascii")


def encode_v2(src: Endpoint, dst: Endpoint, tlvs: Sequence[tuple[int, bytes]] = ()) -> bytes:
    """Binary header, command PROXY, TCP over IPv4 or IPv6, followed by ``tlvs``."""
    s, d = _pair(src, dst)
    fam = V2_TCP4 if s.version == 4 else V2_TCP6
    body = s.packed + d.packed + struct.pack("!HH", src[1], dst[1]) + _encode_tlvs(tlvs)
    return _v2(V2_PROXY, fam, body)


def encode_v2_local(tlvs: Sequence[tuple[int, bytes]] = ()) -> bytes:
    """Binary header, command LOCAL (health checks): the receiver uses the real endpoints."""
    return _v2(V2_LOCAL, V2_UNSPEC, _encode_tlvs(tlvs))


def _v2(ver_cmd: int, fam: int, body: bytes) -> bytes:
    if len(body) > 0xFFFF:
        raise ValueError("PROXY v2 header too long")
    return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam, len(body)) + body


def _encode_tlvs(tlvs: Sequence[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    for typ, value in tlvs:
        if not 0 <= typ <= 0xFF or len(value) > 0xFFFF:
            raise ValueError(f"bad TLV type {typ} or length {len(value)}")
        out += struct.pack("!BH", typ, len(value)) + value
    return bytes(out)


# ---------------------------------------------------------------------------------- XCLIENT


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
    """Bytes sent before anything else, so the MTA judges the real client address
    (XCLIENT, which follows the banner, is not a header: b"")."""
    if method == "proxy-v2":
        return encode_v2(client, local, tlvs)
    if method == "proxy-v1":
        return encode_v1(client, local)
    return b""


def xtext(value: str) -> str:
    """RFC 3461 xtext as Postfix XCLIENT expects: bytes outside 33..126, ``+`` and ``=`` as +XX."""
    return "".join(
        chr(b) if 33 <= b <= 126 and b not in (0x2B, 0x3D) else f"+{b:02X}"
        for b in value.encode("utf-8")
    )


def xclient_command(addr: str, port: int, *, name: str | None = None) -> bytes:
    """``XCLIENT ADDR=... PORT=... [NAME=...]\\r\\n`` (Postfix syntax; an IPv6 address is
    written ``IPV6:...``, an IPv4-mapped one as plain IPv4). The client's HELO comes from the
    client itself, after the MTA's new 220, so the proxy never sends ``HELO=``/``PROTO=``."""
    ip = unmap(addr)
    attrs = [("ADDR", str(ip) if ip.version == 4 else f"IPV6:{ip}"), ("PORT", str(_port(port)))]
    if name is not None:
        attrs.append(("NAME", name))
    return ("XCLIENT " + " ".join(f"{k}={xtext(v)}" for k, v in attrs) + "\r\n").encode("ascii")


# ---------------------------------------------------------------------------------- decoding


def parse_header(buf: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """Decode a header at the start of ``buf``: None if more bytes are needed, ProxyProtocolError
    if it is not a valid v1 or v2 header. Bytes after ``length`` belong to the application."""
    data = bytes(buf[: V2_HEADER_LENGTH + 0xFFFF])
    n = min(len(data), len(V2_SIGNATURE))
    if data[:n] == V2_SIGNATURE[:n]:
        return _parse_v2(data) if n == len(V2_SIGNATURE) else None
    n = min(len(data), len(V1_PREFIX))
    if data[:n] == V1_PREFIX[:n]:
        return _parse_v1(data[:V1_MAX_LENGTH])
    raise ProxyProtocolError("no PROXY protocol signature")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n")
    # Printable ASCII only; a CR only as the start of the CRLF. A CR at the end of an
    # incomplete line may be that CRLF on its way, but "\r\r\n" is a bare CR: refused
    # whether it arrives in one read or two.
    head = data[:end] if end >= 0 else data.removesuffix(b"\r")
    if re.search(rb"[^\x20-\x7e]", head):
        raise ProxyProtocolError("PROXY v1: invalid character")
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyProtocolError("PROXY v1: no CRLF within 107 bytes")
        return None
    fields = data[:end].decode("ascii").split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyHeader(1, None, None, end + 2)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"PROXY v1: malformed line {data[:end]!r}")
    version = 4 if fields[1] == "TCP4" else 6
    try:
        if "%" in fields[2] + fields[3]:
            raise ValueError("scoped address")
        s, d = (ipaddress.ip_address(f) for f in fields[2:4])
    except ValueError:
        raise ProxyProtocolError("PROXY v1: bad address") from None
    if s.version != version or d.version != version:
        raise ProxyProtocolError("PROXY v1: address does not match the family")
    if not all(_V1_PORT.fullmatch(p) and int(p) <= 0xFFFF for p in fields[4:6]):
        raise ProxyProtocolError("PROXY v1: bad port")
    return ProxyHeader(1, (_text(s), int(fields[4])), (_text(d), int(fields[5])), end + 2)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < V2_HEADER_LENGTH:
        return None
    ver_cmd, fam, length = struct.unpack_from("!BBH", data, len(V2_SIGNATURE))
    if ver_cmd not in (V2_PROXY, V2_LOCAL):
        raise ProxyProtocolError(f"PROXY v2: bad version/command byte {ver_cmd:#04x}")
    total = V2_HEADER_LENGTH + length
    if len(data) < total:
        return None
    body = data[V2_HEADER_LENGTH:total]
    src = dst = None
    if ver_cmd == V2_LOCAL or fam == V2_UNSPEC:
        skip = _SKIP_BLOCK.get(fam, 0)  # LOCAL: any family, addresses ignored
    elif fam in _ADDR_BLOCK:
        size, skip = _ADDR_BLOCK[fam]
        if length < skip:
            raise ProxyProtocolError("PROXY v2: address block truncated")
        cls = ipaddress.IPv4Address if size == 4 else ipaddress.IPv6Address
        sport, dport = struct.unpack_from("!HH", body, 2 * size)
        src = (_text(cls(body[:size])), sport)
        dst = (_text(cls(body[size : 2 * size])), dport)
    else:
        raise ProxyProtocolError(f"PROXY v2: unsupported family/protocol {fam:#04x}")
    return ProxyHeader(2, src, dst, total, _parse_tlvs(body[skip:]) if skip <= length else ())


def _parse_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs = []
    pos = 0
    while pos < len(data):
        if pos + 3 > len(data):
            raise ProxyProtocolError("PROXY v2: truncated TLV")
        typ, size = struct.unpack_from("!BH", data, pos)
        if pos + 3 + size > len(data):
            raise ProxyProtocolError("PROXY v2: TLV overruns the header")
        tlvs.append((typ, data[pos + 3 : pos + 3 + size]))
        pos += 3 + size
    return tuple(tlvs)
