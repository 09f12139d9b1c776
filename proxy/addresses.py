"""Endpoints and IP addresses as every module sees them. Pure, standard library only.

A dual-stack ``[::]`` listener reports an IPv4 peer as IPv4-mapped IPv6 (``::ffff:192.0.2.7``),
and a link-local IPv6 peer may carry a zone (``fe80::1%eth0``). The proxy treats the first as
the IPv4 address it carries -- in host lists, in the PROXY header and XCLIENT it sends, in its
log -- and drops the zone, which means nothing to the MTA or to a host list. ``unmap`` is the
one place that does both.
"""

from __future__ import annotations

import functools
import ipaddress

__all__ = ["Endpoint", "IPAddress", "endpoint", "unmap"]

Endpoint = tuple[str, int]
"""``(host, port)``: a socket address without IPv6 flow info and scope id."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def endpoint(sockaddr: tuple[str, int] | tuple[str, int, int, int]) -> Endpoint:
    """A socket address as ``(host, port)``, the host unmapped: an IPv4 peer of a
    dual-stack ``[::]`` socket (``::ffff:a.b.c.d``) is IPv4 on both ends, so a PROXY header
    never mixes families and a host list or the EHLO cache sees one form."""
    return (str(unmap(sockaddr[0])), sockaddr[1])


def unmap(host: str | IPAddress) -> IPAddress:
    """``host`` as an address: IPv4-mapped IPv6 as the IPv4 address it carries, without a
    ``%zone`` suffix. A string that is not an IP address (a name, an IPv4 address with a
    zone): ``ValueError`` naming it (ipaddress's own: ``'x' does not appear to be ...``)."""
    if isinstance(host, str):
        return _unmap_text(host)
    return _unmap(host)


@functools.lru_cache(maxsize=4096)
def _unmap_text(host: str) -> IPAddress:
    # Each session asks several times about the same few addresses (its client, the
    # listener, the MTA); parsing one costs more than a cache lookup. Errors are not cached.
    return _unmap(ipaddress.ip_address(host))


def _unmap(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr.scope_id is not None:
            return ipaddress.IPv6Address(addr.packed)
    return addr
