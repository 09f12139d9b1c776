"""Host lists in the spirit of Exim's: ``*``, addresses, CIDRs, ``!`` negation, first match wins.

IPv4-mapped IPv6 (``::ffff:a.b.c.d``) is treated as the IPv4 address it carries, on both sides:

- a client address ``::ffff:192.0.2.1`` (what a dual-stack listener reports for an IPv4 peer)
  is matched as ``192.0.2.1``, so IPv4 entries apply to it;
- an entry that lies wholly inside ``::ffff:0:0/96`` is converted to its IPv4 equivalent when
  parsed (``::ffff:192.0.2.0/120`` becomes ``192.0.2.0/24``, ``::ffff:0:0/96`` becomes
  ``0.0.0.0/0``), so it matches IPv4 clients however they arrive.

Any other IPv6 entry, even one that contains the mapped range (``::/0``), means IPv6 space only
and never matches an IPv4 client: ``["!::/0", "*"]`` is "IPv4 clients only", as it reads.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from .addresses import IPAddress, unmap
from .errors import ConfigError

__all__ = ["ConfigError", "HostEntry", "HostList", "IPAddress", "IPNetwork"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _unmap_network(net: IPNetwork) -> IPNetwork:
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        v4 = ipaddress.IPv4Address(int(net.network_address) & 0xFFFFFFFF)
        return ipaddress.IPv4Network((v4, net.prefixlen - 96))
    return net


@dataclass(frozen=True, slots=True)
class HostEntry:
    """One list item. ``network`` is None for ``*``."""

    network: IPNetwork | None
    negated: bool = False

    def matches(self, addr: IPAddress) -> bool:
        """Whether this entry applies to ``addr`` (ignoring negation); ``addr`` is unmapped."""
        if self.network is None:
            return True
        # Mixed versions never match; ``in`` would say False anyway, but be explicit.
        return addr.version == self.network.version and addr in self.network

    def __str__(self) -> str:
        if self.network is None:
            body = "*"
        elif self.network.prefixlen == self.network.max_prefixlen:
            body = str(self.network.network_address)
        else:
            body = str(self.network)
        return f"!{body}" if self.negated else body


@dataclass(frozen=True, slots=True)
class HostList:
    """An ordered host list. The first entry that applies decides; no entry applies: False."""

    entries: tuple[HostEntry, ...] = ()

    @classmethod
    def parse(cls, items: Sequence[str], key: str) -> HostList:
        """Parse config items; errors name ``key[index]``, e.g. ``pipe_connect.hosts[2]``."""
        # A bare string is a Sequence[str] too: iterating it would parse characters.
        if isinstance(items, str) or not isinstance(items, Sequence):
            raise ConfigError(key, "must be a list of strings")
        return cls(tuple(_parse_entry(item, f"{key}[{i}]") for i, item in enumerate(items)))

    def matches(self, addr: str | IPAddress) -> bool:
        """Whether ``addr`` is in the list (IPv4-mapped as IPv4, a zone ignored). A string that
        is not an IP address: ValueError."""
        ip = unmap(addr)
        for entry in self.entries:
            if entry.matches(ip):
                return not entry.negated
        return False

    def __str__(self) -> str:
        return ", ".join(str(e) for e in self.entries) or "(empty)"


def _parse_entry(item: object, key: str) -> HostEntry:
    if not isinstance(item, str):
        raise ConfigError(key, f"must be a string, not {type(item).__name__}")
    negated = item.startswith("!")
    body = item[1:] if negated else item
    if body == "*":
        return HostEntry(None, negated)
    if not body:
        raise ConfigError(key, f"{item!r} is empty")
    if "%" in body:
        # ipaddress accepts zone ids but ignores them when testing membership, so an entry
        # like fe80::1%eth0 would silently match that address on every interface.
        raise ConfigError(key, f"{item!r}: zone ids (%...) are not supported")
    try:
        net = ipaddress.ip_network(body, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            loose = ipaddress.ip_network(body, strict=False)
            hint = f"{'!' if negated else ''}{loose}"
            raise ConfigError(key, f"{item!r} has host bits set (did you mean {hint}?)") from None
        raise ConfigError(key, f"{item!r} is not an address or CIDR") from None
    return HostEntry(_unmap_network(net), negated)
