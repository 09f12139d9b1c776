"""Host lists: parsing, first-match-wins, negation, IPv4-mapped IPv6, errors naming the key."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import config
from proxy.errors import ConfigError
from proxy.hosts import HostEntry, HostList

KEY = "pipe_connect.advertise_hosts"


def hl(*items: str) -> HostList:
    return HostList.parse(list(items), KEY)


# --- matching --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "addr", "expected"),
    [
        (["*"], "192.0.2.1", True),
        (["*"], "2001:db8::1", True),
        (["*"], "::ffff:192.0.2.1", True),
        (["192.0.2.1"], "192.0.2.1", True),
        (["192.0.2.1"], "192.0.2.2", False),
        (["2001:db8::1"], "2001:db8::1", True),
        (["2001:db8::1"], "2001:db8:0:0::1", True),  # same address, other spelling
        (["2001:db8::1"], "2001:db8::2", False),
        (["192.0.2.0/24"], "192.0.2.0", True),
        (["192.0.2.0/24"], "192.0.2.255", True),
        (["192.0.2.0/24"], "192.0.3.0", False),
        (["192.0.2.0/24"], "192.0.1.255", False),
        (["10.0.0.0/8"], "10.255.255.255", True),
        (["0.0.0.0/0"], "203.0.113.9", True),
        (["2001:db8::/32"], "2001:db8:ffff::1", True),
        (["2001:db8::/32"], "2001:db9::1", False),
        (["2001:db8:1::/48"], "2001:db8:1:ffff:ffff:ffff:ffff:ffff", True),
        (["2001:db8:1::/48"], "2001:db8:2::", False),
        (["::/0"], "2001:db8::1", True),
        (["192.0.2.1/32"], "192.0.2.1", True),
        (["2001:db8::1/128"], "2001:db8::1", True),
        # versions never cross, except through IPv4-mapped addresses
        (["0.0.0.0/0"], "2001:db8::1", False),
        (["::/0"], "192.0.2.1", False),
        (["::/0"], "::ffff:192.0.2.1", False),  # it is IPv4, see the module docstring
        # link-local client with a zone id still matches its network
        (["fe80::/10"], "fe80::1%eth0", True),
        (["fe80::1"], "fe80::1%eth0", True),
    ],
)
def test_matches(items: list[str], addr: str, expected: bool) -> None:
    assert hl(*items).matches(addr) is expected


def test_empty_list_matches_nothing() -> None:
    assert HostList.parse([], KEY).matches("192.0.2.1") is False
    assert HostList().matches("2001:db8::1") is False


def test_no_match_is_false() -> None:
    assert hl("192.0.2.0/24", "2001:db8::/32").matches("198.51.100.1") is False


def test_first_match_wins() -> None:
    deny_one = hl("!10.0.0.1", "10.0.0.0/8")
    assert deny_one.matches("10.0.0.1") is False
    assert deny_one.matches("10.0.0.2") is True
    # Same entries, other order: the broad positive entry now decides first.
    allow_all = hl("10.0.0.0/8", "!10.0.0.1")
    assert allow_all.matches("10.0.0.1") is True


def test_negation_alone_matches_nothing() -> None:
    only_negative = hl("!192.0.2.1")
    assert only_negative.matches("192.0.2.1") is False
    assert only_negative.matches("192.0.2.2") is False  # nothing matched at all


def test_negated_star_stops_the_list() -> None:
    assert hl("!*", "*").matches("192.0.2.1") is False
    assert hl("192.0.2.1", "!*", "*").matches("192.0.2.1") is True


def test_negated_network_then_star() -> None:
    hosts = hl("!192.0.2.0/24", "!2001:db8::/32", "*")
    assert hosts.matches("192.0.2.77") is False
    assert hosts.matches("2001:db8::5") is False
    assert hosts.matches("198.51.100.1") is True
    assert hosts.matches("2001:db9::1") is True


def test_later_entries_are_not_consulted_after_a_match() -> None:
    hosts = hl("192.0.2.0/25", "!192.0.2.0/24")
    assert hosts.matches("192.0.2.1") is True
    assert hosts.matches("192.0.2.200") is False


def test_ipv6_only_negation_leaves_ipv4_alone() -> None:
    v4_only = hl("!::/0", "*")
    assert v4_only.matches("192.0.2.1") is True
    assert v4_only.matches("::ffff:192.0.2.1") is True
    assert v4_only.matches("2001:db8::1") is False


# --- IPv4-mapped IPv6 ------------------------------------------------------------------------


def test_v4_mapped_client_matches_v4_entries() -> None:
    assert hl("192.0.2.0/24").matches("::ffff:192.0.2.1") is True
    assert hl("192.0.2.1").matches("::ffff:c000:201") is True  # hex spelling of the same
    assert hl("192.0.2.0/24").matches("::ffff:198.51.100.1") is False


def test_v4_mapped_client_hits_v4_negation() -> None:
    hosts = hl("!192.0.2.1", "*")
    assert hosts.matches("::ffff:192.0.2.1") is False
    assert hosts.matches("::ffff:192.0.2.2") is True


def test_v4_mapped_entries_match_v4_clients() -> None:
    assert hl("::ffff:192.0.2.1").matches("192.0.2.1") is True
    assert hl("::ffff:192.0.2.0/120").matches("192.0.2.99") is True
    assert hl("::ffff:192.0.2.0/120").matches("192.0.3.1") is False
    assert hl("::ffff:0:0/96").matches("203.0.113.5") is True
    assert hl("::ffff:0:0/96").matches("::ffff:203.0.113.5") is True
    assert hl("::ffff:0:0/96").matches("2001:db8::1") is False


def test_v4_mapped_entries_are_stored_as_ipv4() -> None:
    assert hl("::ffff:192.0.2.0/120").entries[0].network == ipaddress.ip_network("192.0.2.0/24")
    assert hl("::ffff:0:0/96").entries[0].network == ipaddress.ip_network("0.0.0.0/0")
    # Wider than the mapped range: stays IPv6.
    assert hl("::/64").entries[0].network == ipaddress.ip_network("::/64")


def test_v4_compatible_and_other_v6_are_not_unmapped() -> None:
    # ::192.0.2.1 (deprecated IPv4-compatible) and 64:ff9b::/96 (NAT64) are IPv6 addresses.
    assert hl("192.0.2.1").matches("::192.0.2.1") is False
    assert hl("192.0.2.1").matches("64:ff9b::192.0.2.1") is False


def test_matches_accepts_ipaddress_objects() -> None:
    hosts = hl("192.0.2.0/24", "2001:db8::/32")
    assert hosts.matches(ipaddress.IPv4Address("192.0.2.9")) is True
    assert hosts.matches(ipaddress.IPv6Address("2001:db8::9")) is True
    assert hosts.matches(ipaddress.IPv6Address("::ffff:192.0.2.9")) is True
    assert hosts.matches(ipaddress.IPv6Address("2001:db9::9")) is False


@pytest.mark.parametrize("addr", ["", "localhost", "192.0.2.300", "192.0.2.0/24"])
def test_matches_rejects_non_addresses(addr: str) -> None:
    with pytest.raises(ValueError, match="does not appear to be"):
        hl("*").matches(addr)


# --- parsing errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("10.0.0.300", "'10.0.0.300' is not an address or CIDR"),
        ("1.2.3.4/33", "'1.2.3.4/33' is not an address or CIDR"),
        ("2001:db8::/129", "'2001:db8::/129' is not an address or CIDR"),
        ("example.com", "'example.com' is not an address or CIDR"),
        ("*.example.com", "'*.example.com' is not an address or CIDR"),
        ("**", "'**' is not an address or CIDR"),
        (" 192.0.2.1", "' 192.0.2.1' is not an address or CIDR"),
        ("192.0.2.1 ", "'192.0.2.1 ' is not an address or CIDR"),
        ("! 192.0.2.1", "'! 192.0.2.1' is not an address or CIDR"),
        ("!!192.0.2.1", "'!!192.0.2.1' is not an address or CIDR"),
        ("192.0.2.1/", "'192.0.2.1/' is not an address or CIDR"),
        ("192.0.2.0/255.255.255.0x", "'192.0.2.0/255.255.255.0x' is not an address or CIDR"),
        ("", "'' is empty"),
        ("!", "'!' is empty"),
        ("10.0.0.1/8", "'10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)"),
        ("!10.0.0.1/8", "'!10.0.0.1/8' has host bits set (did you mean !10.0.0.0/8?)"),
        ("2001:db8::1/32", "'2001:db8::1/32' has host bits set (did you mean 2001:db8::/32?)"),
        ("fe80::1%eth0", "'fe80::1%eth0': zone ids (%...) are not supported"),
    ],
)
def test_invalid_entry_names_key_and_index(item: str, message: str) -> None:
    items = ["*", "192.0.2.0/24", item]
    with pytest.raises(ConfigError) as info:
        HostList.parse(items, KEY)
    assert str(info.value) == f"{KEY}[2]: {message}"
    assert info.value.key == f"{KEY}[2]"


def test_brief_example_message() -> None:
    with pytest.raises(ConfigError) as info:
        HostList.parse(["*", "!192.0.2.0/24", "10.0.0.300"], KEY)
    assert str(info.value) == f"{KEY}[2]: '10.0.0.300' is not an address or CIDR"


def test_first_invalid_entry_is_reported() -> None:
    with pytest.raises(ConfigError, match=r"\[0\]: 'bad1'"):
        HostList.parse(["bad1", "bad2"], KEY)


def test_non_string_entry() -> None:
    with pytest.raises(ConfigError) as info:
        HostList.parse(["*", 5], KEY)  # type: ignore[list-item]
    assert str(info.value) == f"{KEY}[1]: must be a string, not int"


def test_bare_string_is_not_a_list() -> None:
    # A str is a Sequence[str]; parsing "192.0.2.1" character by character would be wrong.
    with pytest.raises(ConfigError) as info:
        HostList.parse("192.0.2.1", KEY)
    assert str(info.value) == f"{KEY}: must be a list of strings"


def test_config_error_is_shared_and_a_value_error() -> None:
    assert config.ConfigError is ConfigError
    assert issubclass(ConfigError, ValueError)


# --- representation --------------------------------------------------------------------------


def test_str_round_trips() -> None:
    items = ["!192.0.2.1", "192.0.2.0/24", "!2001:db8::/32", "2001:db8::1", "*", "!*"]
    hosts = hl(*items)
    assert str(hosts) == ", ".join(items)
    assert HostList.parse(str(hosts).split(", "), KEY) == hosts
    assert str(HostList()) == "(empty)"


def test_frozen_and_hashable() -> None:
    hosts = hl("*")
    assert hosts == HostList((HostEntry(None),))
    assert hash(hosts) == hash(hl("*"))
    with pytest.raises(AttributeError):
        hosts.entries = ()  # type: ignore[misc]


# --- properties ------------------------------------------------------------------------------

v4 = st.ip_addresses(v=4)
v6 = st.ip_addresses(v=6)
any_ip = st.ip_addresses()


def _mapped(addr: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(f"::ffff:{addr}")


@given(any_ip)
def test_star_matches_everything(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    assert hl("*").matches(addr) is True
    assert hl("*").matches(str(addr)) is True


@given(any_ip, any_ip)
def test_all_but_one(
    a: ipaddress.IPv4Address | ipaddress.IPv6Address,
    b: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    hosts = hl(f"!{a}", "*")
    assert hosts.matches(a) is False
    assert hosts.matches(b) is (not _same(a, b))


def _same(
    a: ipaddress.IPv4Address | ipaddress.IPv6Address,
    b: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> bool:
    """Same host, counting ::ffff:a.b.c.d as a.b.c.d."""

    def norm(x: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[int, int]:
        if isinstance(x, ipaddress.IPv6Address) and x.ipv4_mapped is not None:
            x = x.ipv4_mapped
        return (x.version, int(x))

    return norm(a) == norm(b)


@given(v4, st.integers(min_value=0, max_value=32), v4)
def test_v4_network_is_membership(
    base: ipaddress.IPv4Address, prefix: int, addr: ipaddress.IPv4Address
) -> None:
    net = ipaddress.IPv4Network((base, prefix), strict=False)
    hosts = hl(str(net))
    assert hosts.matches(addr) is (addr in net)
    assert hosts.matches(_mapped(addr)) is (addr in net)
    assert hl(f"!{net}", "*").matches(addr) is (addr not in net)


@given(v6, st.integers(min_value=0, max_value=128), v6)
def test_v6_network_is_membership(
    base: ipaddress.IPv6Address, prefix: int, addr: ipaddress.IPv6Address
) -> None:
    net = ipaddress.IPv6Network((base, prefix), strict=False)
    hosts = hl(str(net))
    if addr.ipv4_mapped is None and not net.subnet_of(ipaddress.IPv6Network("::ffff:0:0/96")):
        assert hosts.matches(addr) is (addr in net)


@given(st.lists(st.tuples(st.booleans(), v4, st.integers(0, 32)), max_size=8), v4)
def test_mapped_and_plain_v4_agree(
    entries: list[tuple[bool, ipaddress.IPv4Address, int]], addr: ipaddress.IPv4Address
) -> None:
    items = []
    for negated, base, prefix in entries:
        net = ipaddress.IPv4Network((base, prefix), strict=False)
        items.append(f"{'!' if negated else ''}{net}")
    hosts = hl(*items)
    # Reference: first entry containing the address decides.
    expected = False
    for item in items:
        if addr in ipaddress.IPv4Network(item.lstrip("!")):
            expected = not item.startswith("!")
            break
    assert hosts.matches(addr) is expected
    assert hosts.matches(_mapped(addr)) is expected


@given(v4, v4)
def test_mapped_negation_covers_plain_v4(
    a: ipaddress.IPv4Address, b: ipaddress.IPv4Address
) -> None:
    hosts = hl(f"!{_mapped(a)}", "*")
    assert hosts.matches(a) is False
    assert hosts.matches(b) is (a != b)
