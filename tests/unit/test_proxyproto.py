"""PROXY protocol v1/v2 and XCLIENT: known vectors written by hand from the specs, round trips."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.proxyproto import (
    PP2_TYPE_ALPN,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    ProxyHeader,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    encode_v2_local,
    parse_header,
    xclient_command,
    xtext,
)

SIG = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])
V4_SRC, V4_DST = ("192.0.2.1", 56324), ("198.51.100.7", 25)
V6_SRC, V6_DST = ("2001:db8::1", 56324), ("2001:db8::2", 25)
# 192.0.2.1 = c0 00 02 01, 198.51.100.7 = c6 33 64 07, 56324 = 0xdc04, 25 = 0x0019
V4_BLOCK = bytes.fromhex("c0000201 c6336407 dc04 0019")
V6_BLOCK = bytes.fromhex(
    "20010db8000000000000000000000001 20010db8000000000000000000000002 dc04 0019"
)
MAPPED_SRC = ("::ffff:192.0.2.1", 56324)


# ----------------------------------------------------------------------------- known vectors


def test_v1_vectors() -> None:
    assert encode_v1(V4_SRC, V4_DST) == b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 25\r\n"
    assert encode_v1(V6_SRC, V6_DST) == b"PROXY TCP6 2001:db8::1 2001:db8::2 56324 25\r\n"
    # IPv4-mapped client on a dual-stack listener: sent as plain IPv4
    assert encode_v1(MAPPED_SRC, ("::ffff:198.51.100.7", 25)) == encode_v1(V4_SRC, V4_DST)
    # families still differ after unmapping: the IPv4 side is mapped into IPv6
    assert encode_v1(MAPPED_SRC, V6_DST) == (
        b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 56324 25\r\n"
    )
    assert encode_v1(V6_SRC, ("198.51.100.7", 25)) == (
        b"PROXY TCP6 2001:db8::1 ::ffff:198.51.100.7 56324 25\r\n"
    )


def test_v2_vectors() -> None:
    assert encode_v2(V4_SRC, V4_DST) == SIG + b"\x21\x11\x00\x0c" + V4_BLOCK
    assert encode_v2(V6_SRC, V6_DST) == SIG + b"\x21\x21\x00\x24" + V6_BLOCK
    assert encode_v2(MAPPED_SRC, ("::ffff:198.51.100.7", 25)) == encode_v2(V4_SRC, V4_DST)
    mixed = bytes.fromhex(
        "00000000000000000000ffffc0000201 20010db8000000000000000000000002 dc04 0019"
    )
    assert encode_v2(V4_SRC, V6_DST) == SIG + b"\x21\x21\x00\x24" + mixed
    assert encode_v2(MAPPED_SRC, V6_DST) == SIG + b"\x21\x21\x00\x24" + mixed


def test_v2_tlvs_and_local_vectors() -> None:
    tlvs = [(PP2_TYPE_NOOP, b""), (PP2_TYPE_ALPN, b"smtp")]
    assert encode_v2(V4_SRC, V4_DST, tlvs) == (
        SIG + b"\x21\x11\x00\x16" + V4_BLOCK + b"\x04\x00\x00" + b"\x01\x00\x04smtp"
    )
    assert encode_v2_local() == SIG + b"\x20\x00\x00\x00"
    assert encode_v2_local([(PP2_TYPE_NOOP, b"xy")]) == SIG + b"\x20\x00\x00\x05\x04\x00\x02xy"


def test_encoders_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        encode_v1(("mail.example", 25), V4_DST)
    with pytest.raises(ValueError):
        encode_v2(V4_SRC, ("198.51.100.7", 65536))
    with pytest.raises(ValueError):
        encode_v2(V4_SRC, V4_DST, [(256, b"")])
    with pytest.raises(ValueError):
        encode_v2(V4_SRC, V4_DST, [(PP2_TYPE_SSL, b"x" * 0x10000)])
    with pytest.raises(ValueError):
        encode_v2(V4_SRC, V4_DST, [(PP2_TYPE_SSL, b"x" * 0xFFF0)] * 2)


def test_scope_id_is_dropped() -> None:
    assert encode_v1(("fe80::1%eth0", 1), ("fe80::2", 2)) == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"


# ----------------------------------------------------------------------------- decoding

HEADERS = [
    encode_v1(V4_SRC, V4_DST),
    encode_v1(V6_SRC, V6_DST),
    encode_v1(MAPPED_SRC, V6_DST),
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
    encode_v2(V4_SRC, V4_DST),
    encode_v2(V6_SRC, V6_DST, [(PP2_TYPE_ALPN, b"smtp")]),
    encode_v2_local(),
    encode_v2_local([(PP2_TYPE_NOOP, b"")]),
]


@pytest.mark.parametrize("header", HEADERS)
def test_every_prefix_needs_more(header: bytes) -> None:
    for i in range(len(header)):
        assert parse_header(header[:i]) is None, i
    parsed = parse_header(header + b"EHLO client.test\r\n")
    assert parsed is not None
    assert parsed.length == len(header)


def test_decode_values() -> None:
    assert parse_header(encode_v1(V4_SRC, V4_DST)) == ProxyHeader(1, V4_SRC, V4_DST, 44)
    assert parse_header(encode_v2(V6_SRC, V6_DST, [(PP2_TYPE_ALPN, b"smtp")])) == ProxyHeader(
        2, V6_SRC, V6_DST, 16 + 36 + 7, ((PP2_TYPE_ALPN, b"smtp"),)
    )
    mixed = parse_header(encode_v2(MAPPED_SRC, V6_DST))
    assert mixed is not None
    assert mixed.src == ("::ffff:192.0.2.1", 56324)
    local = parse_header(encode_v2_local())
    assert local == ProxyHeader(2, None, None, 16)
    assert local.is_local
    unknown = parse_header(b"PROXY UNKNOWN\r\n")
    assert unknown is not None
    assert unknown.is_local
    # LOCAL with an address block: the addresses are skipped, TLVs after them still read
    local4 = SIG + b"\x20\x11\x00\x0f" + V4_BLOCK + b"\x04\x00\x00"
    assert parse_header(local4) == ProxyHeader(2, None, None, 31, ((PP2_TYPE_NOOP, b""),))
    # PROXY with AF_UNSPEC: the receiver uses the real endpoints
    assert parse_header(SIG + b"\x21\x00\x00\x00") == ProxyHeader(2, None, None, 16)
    # 107 bytes is the longest valid v1 line
    six = b"ffff:" * 7 + b"ffff"
    longest = b"PROXY UNKNOWN " + six + b" " + six + b" 65535 65535\r\n"
    assert len(longest) == 107
    assert parse_header(longest) == ProxyHeader(1, None, None, 107)
    with pytest.raises(ProxyProtocolError):
        parse_header(longest[:-2] + b" \r\n")


GARBAGE = [
    b"EHLO client.test\r\n",
    b"GET / HTTP/1.0\r\n",
    b"PROXY\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.7 56324\r\n",
    b"PROXY TCP5 192.0.2.1 198.51.100.7 56324 25\r\n",
    b"PROXY TCP4 192.0.2.1  198.51.100.7 56324 25\r\n",
    b"PROXY TCP4 2001:db8::1 2001:db8::2 56324 25\r\n",
    b"PROXY TCP6 192.0.2.1 198.51.100.7 56324 25\r\n",
    b"PROXY TCP4 192.0.2.001 198.51.100.7 56324 25\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.7 65536 25\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.7 056324 25\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.7 -1 25\r\n",
    b"PROXY TCP6 fe80::1%eth0 fe80::2 1 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 25\n",
    b"PROXY TCP4 192.0.2.1\r198.51.100.7 56324 25\r\n",
    b"PROXY TCP4 \xc0\x00\x02\x01",
    b"PROXY UNKNOWN " + b"x" * 100,
    b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c",
    SIG + b"\x22\x11\x00\x0c" + V4_BLOCK,  # command 2
    SIG + b"\x11\x11\x00\x0c" + V4_BLOCK,  # version 1 in binary form
    SIG + b"\x21\x31\x00\x00",  # AF_UNIX is not TCP
    SIG + b"\x21\x12\x00\x0c" + V4_BLOCK,  # UDP
    SIG + b"\x21\x11\x00\x08" + V4_BLOCK[:8],  # address block cut short
    SIG + b"\x21\x11\x00\x0e" + V4_BLOCK + b"\x04\x00",  # truncated TLV header
    SIG + b"\x21\x11\x00\x10" + V4_BLOCK + b"\x04\x00\x05x",  # TLV overruns the header
]


@pytest.mark.parametrize("data", GARBAGE)
def test_garbage_raises(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse_header(data)


# ----------------------------------------------------------------------------- XCLIENT


def test_xclient() -> None:
    assert xclient_command("192.0.2.1", 56324) == b"XCLIENT ADDR=192.0.2.1 PORT=56324\r\n"
    assert xclient_command("2001:DB8::1", 25) == b"XCLIENT ADDR=IPV6:2001:db8::1 PORT=25\r\n"
    assert xclient_command("::ffff:192.0.2.1", 25) == b"XCLIENT ADDR=192.0.2.1 PORT=25\r\n"
    assert xclient_command("fe80::1%eth0", 25) == b"XCLIENT ADDR=IPV6:fe80::1 PORT=25\r\n"
    assert xclient_command("192.0.2.1", 25, name="mx.example") == (
        b"XCLIENT ADDR=192.0.2.1 PORT=25 NAME=mx.example\r\n"
    )
    assert xclient_command("192.0.2.1", 25, name="a b+c=d") == (
        b"XCLIENT ADDR=192.0.2.1 PORT=25 NAME=a+20b+2Bc+3Dd\r\n"
    )
    with pytest.raises(ValueError):
        xclient_command("not-an-ip", 25)
    with pytest.raises(ValueError):
        xclient_command("192.0.2.1", -1)


def test_xtext() -> None:
    assert xtext("plain!~") == "plain!~"
    assert xtext("+=") == "+2B+3D"
    assert xtext("\r\n\x00\x7f ") == "+0D+0A+00+7F+20"
    assert xtext("é") == "+C3+A9"


# ----------------------------------------------------------------------------- properties


def _unmapped(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(host)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)
ports = st.integers(0, 0xFFFF)
tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=5)


@given(addresses, ports, addresses, ports, tlv_lists, st.booleans(), st.binary(max_size=20))
def test_round_trip(
    s: str,
    sport: int,
    d: str,
    dport: int,
    tlvs: list[tuple[int, bytes]],
    v2: bool,
    rest: bytes,
) -> None:
    header = encode_v2((s, sport), (d, dport), tlvs) if v2 else encode_v1((s, sport), (d, dport))
    parsed = parse_header(header + rest)
    assert parsed is not None
    assert parsed.version == (2 if v2 else 1)
    assert parsed.length == len(header)
    assert parsed.tlvs == (tuple(tlvs) if v2 else ())
    assert parsed.src is not None
    assert parsed.dst is not None
    assert _unmapped(parsed.src[0]) == _unmapped(s)
    assert _unmapped(parsed.dst[0]) == _unmapped(d)
    assert (parsed.src[1], parsed.dst[1]) == (sport, dport)
    assert parse_header(header[: len(header) // 2]) is None


@given(st.binary(max_size=200))
def test_decoder_total(data: bytes) -> None:
    """Arbitrary input: a header, "need more", or ProxyProtocolError; never anything else."""
    try:
        parsed = parse_header(data)
    except ProxyProtocolError:
        return
    assert parsed is None or parsed.length <= len(data)


@given(st.binary(max_size=60))
def test_decoder_total_after_signature(tail: bytes) -> None:
    for prefix in (SIG, b"PROXY "):
        with contextlib.suppress(ProxyProtocolError):
            parse_header(prefix + tail)
