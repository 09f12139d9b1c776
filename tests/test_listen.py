"""Listeners (proxy/listen.py): ``[::]`` takes IPv4 clients too, and accept() failing for
lack of file descriptors is logged once per period and counted, not once per retry."""

from __future__ import annotations

import errno
import logging
import os
import re
import resource
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from proxy.addresses import endpoint
from proxy.config import Address
from proxy.listen import ACCEPT_LOG_PERIOD, ACCEPT_RETRY, bind, dual_stack
from proxy.metrics import Metrics
from proxy.server import Bound, serve

from .fakemta import FakeMTA
from .test_session import Client, make_config

Endpoint = tuple[str, int]


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 here: cannot bind ::1")


@asynccontextmanager
async def proxy(mta: FakeMTA, **sections: dict[str, Any]) -> AsyncIterator[tuple[Bound, Metrics]]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(mta.serve)
        metrics = Metrics(process=False)
        config = make_config(port, metrics={"listen": ""}, **sections)
        bound: Bound = await nursery.start(serve, config, metrics)
        try:
            yield bound, metrics
        finally:
            nursery.cancel_scope.cancel()


async def quit_session(host: str, port: int) -> Endpoint:
    """One session from ``host``: banner, QUIT; returns the client's own address."""
    client = Client(await trio.open_tcp_stream(host, port))
    async with client.stream:
        sockname = client.stream.socket.getsockname()
        assert (banner := await client.reply()) is not None and banner.code == 220
        await client.stream.send_all(b"QUIT\r\n")
        assert (bye := await client.reply()) is not None and bye.code == 221
    return (sockname[0], sockname[1])


# ------------------------------------------------------------------ dual stack


@needs_ipv6
async def test_unspecified_ipv6_listener_takes_ipv4_clients_as_ipv4() -> None:
    """``[::]`` is dual-stack; an IPv4 client reaches the MTA as IPv4 on both ends of the
    PROXY header (not ``::ffff:127.0.0.1``), an IPv6 client as IPv6."""
    mta = FakeMTA()
    async with proxy(mta, listen={"plain": ["[::]:0"]}) as (bound, _):
        ((host, port),) = bound
        assert host == "::"
        v4 = await quit_session("127.0.0.1", port)
        v6 = await quit_session("::1", port)
    assert mta.proxy_sources == [v4, v6]
    assert mta.proxy_destinations == [("127.0.0.1", port), ("::1", port)]


def test_ipv4_mapped_endpoints_are_ipv4() -> None:
    assert endpoint(("::ffff:192.0.2.7", 25, 0, 0)) == ("192.0.2.7", 25)
    assert endpoint(("2001:db8::1", 25, 0, 0)) == ("2001:db8::1", 25)
    assert endpoint(("192.0.2.7", 25)) == ("192.0.2.7", 25)


def test_dual_stack_unless_ipv4_any_on_the_same_port() -> None:
    any6 = Address("::", 25)
    assert dual_stack(any6, [any6])
    assert dual_stack(Address("0::0", 25), [Address("0.0.0.0", 465)])
    assert not dual_stack(any6, [Address("0.0.0.0", 25), any6])
    for other in ("::1", "0.0.0.0", "127.0.0.1", "localhost"):
        assert not dual_stack(Address(other, 25), [])


@needs_ipv6
def test_bind_sets_v6only_as_decided_for_every_copy() -> None:
    """The single process and the workers' sockets (copies sharing a port) alike."""
    for listed, v6only in (((), 0), ((Address("0.0.0.0", 0),), 1)):
        copies = bind(Address("::", 0), listed, copies=2)
        try:
            ((a,), (b,)) = copies
            assert a.getsockname()[1] == b.getsockname()[1]
            for sock in (a, b):
                assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == v6only
        finally:
            for socks in copies:
                for sock in socks:
                    sock.close()


# ------------------------------------------------------------------ accept() errors

_REPORT = re.compile(r"plain listener: accept\(\) failed (\d+) time\(s\) since the last report")


async def test_out_of_file_descriptors_is_logged_once_per_period_and_counted(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Real EMFILE: the descriptor limit lowered, then connections made until none is left,
    so the proxy's accept() fails on every retry (virtual time: the periods take no time)."""

    def complaints() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.levelno >= logging.WARNING]

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    clients: list[socket.socket] = []
    try:
        async with proxy(FakeMTA()) as (bound, metrics):
            highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, hard))
            with pytest.raises(OSError) as exhausted:
                while True:  # no checkpoint: the proxy accepts none of these yet
                    clients.append(socket.socket())
                    clients[-1].connect(("127.0.0.1", bound[0][1]))
            assert exhausted.value.errno == errno.EMFILE
            await trio.sleep(ACCEPT_LOG_PERIOD / 2)
            first = complaints()
            await trio.sleep(ACCEPT_LOG_PERIOD)
            both = complaints()
            count = metrics.registry.get_sample_value(
                "pipeconnect_accept_errors_total", {"listener": "plain", "errno": "EMFILE"}
            )
    finally:
        for sock in clients:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert [r.name for r in both] == ["pipeconnect.listen"] * 2, both
    assert first == both[:1]
    assert all(r.exc_info is None and r.levelno == logging.ERROR for r in both)
    assert "EMFILE (Too many open files)" in both[0].getMessage()
    counts = [int(m[1]) for r in both if (m := _REPORT.match(r.getMessage()))]
    per_period = ACCEPT_LOG_PERIOD / ACCEPT_RETRY
    assert counts[0] == 1 and per_period - 2 <= counts[1] <= per_period + 1
    assert count is not None and 1.5 * per_period - 2 <= count <= 1.5 * per_period + 2
