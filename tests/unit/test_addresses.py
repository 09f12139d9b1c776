"""proxy.addresses: the one unmapping of IPv4-mapped IPv6 and of zones, and its users."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.addresses import endpoint, unmap
from proxy.hosts import HostList
from proxy.proxyproto import encode_v1, xclient_command

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("192.0.2.7", V4("192.0.2.7")),
        ("::ffff:192.0.2.7", V4("192.0.2.7")),
        ("::FFFF:c000:207", V4("192.0.2.7")),  # the same address, written in hex
        ("::ffff:0.0.0.0", V4("0.0.0.0")),
        ("2001:db8::1", V6("2001:db8::1")),
        ("::1", V6("::1")),
        ("::192.0.2.7", V6("::192.0.2.7")),  # IPv4-compatible (deprecated): not mapped
        ("64:ff9b::192.0.2.7", V6("64:ff9b::c000:207")),  # NAT64: not mapped either
        ("fe80::1%eth0", V6("fe80::1")),
        ("fe80::1%2", V6("fe80::1")),
        ("::ffff:192.0.2.7%eth0", V4("192.0.2.7")),
    ],
)
def test_unmap(host: str, expected: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    got = unmap(host)
    assert got == expected and type(got) is type(expected)
    assert str(got) == str(expected)  # no zone left in the text either
    assert unmap(ipaddress.ip_address(host)) == expected  # an address object alike


def test_unmap_drops_the_zone_of_an_address_object() -> None:
    got = unmap(V6("fe80::1%eth0"))
    assert isinstance(got, V6) and got.scope_id is None and str(got) == "fe80::1"


def test_unmap_returns_an_unzoned_address_object_itself() -> None:
    addr = V6("2001:db8::1")
    assert unmap(addr) is addr


@pytest.mark.parametrize(
    "host", ["", "localhost", "mx.example", "192.0.2.300", "192.0.2.0/24", "192.0.2.7%eth0", "["]
)
def test_unmap_refuses_what_is_not_an_address(host: str) -> None:
    with pytest.raises(ValueError, match="does not appear to be"):
        unmap(host)


@given(st.ip_addresses(v=4))
def test_every_mapped_address_is_its_ipv4(v4: ipaddress.IPv4Address) -> None:
    mapped = V6(b"\0" * 10 + b"\xff\xff" + v4.packed)
    assert unmap(mapped) == v4 and unmap(str(mapped)) == v4
    assert unmap(v4) is v4


@given(st.ip_addresses(v=6))
def test_other_ipv6_addresses_stay(v6: ipaddress.IPv6Address) -> None:
    if v6.ipv4_mapped is None:
        assert unmap(v6) == v6 and unmap(str(v6)) == v6


def test_every_user_unmaps_alike() -> None:
    """Host lists, the PROXY header, XCLIENT and the server's endpoints see the same
    address for an IPv4 client of a dual-stack listener (and for a zoned one)."""
    assert HostList.parse(["192.0.2.0/24"], "k").matches("::ffff:192.0.2.7")
    assert HostList.parse(["fe80::1"], "k").matches("fe80::1%eth0")
    assert encode_v1(("::ffff:192.0.2.7", 1), ("192.0.2.1", 25)).startswith(
        b"PROXY TCP4 192.0.2.7 192.0.2.1 "
    )
    assert encode_v1(("fe80::1%eth0", 1), ("fe80::2", 25)).startswith(
        b"PROXY TCP6 fe80::1 fe80::2 "
    )
    assert xclient_command("::ffff:192.0.2.7", 1).startswith(b"XCLIENT ADDR=192.0.2.7 ")
    assert endpoint(("::ffff:192.0.2.7", 1, 0, 0)) == ("192.0.2.7", 1)
    assert endpoint(("fe80::1%eth0", 1, 0, 2)) == ("fe80::1", 1)
