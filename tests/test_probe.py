"""``pipeconnect-proxy probe``: against native Exim, Postfix, and the proxy in front of Postfix
(what each advertises), a server that never greets, a closed port, and the RTT through the
bench delay relay."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from bench.delay import DelayRelay
from proxy.config import Address
from proxy.probe import ProbeError, ProbeResult, parse_target, probe
from tests.conftest import EximServerFactory, PostfixFactory
from tests.fakemta import CLOSE, FakeMTA
from tests.mta import free_port
from tests.proxyproc import ProxyProcess


def run_probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "probe", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def probe_json(port: int) -> dict[str, Any]:
    result = run_probe("--json", "--ehlo", "probe.test", f"127.0.0.1:{port}")
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout)
    return out


# ---------------------------------------------------------------- no sockets


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mx.example.org", Address("mx.example.org", 25)),
        ("127.0.0.1:2525", Address("127.0.0.1", 2525)),
        ("[::1]:587", Address("::1", 587)),
        ("[::1]", Address("::1", 25)),
        ("2001:db8::25", Address("2001:db8::25", 25)),
    ],
)
def test_parse_target(text: str, expected: Address) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize("text", ["mx.example.org:0", "mx.example.org:x", "bad host", "::1:25]"])
def test_parse_target_refuses(text: str) -> None:
    with pytest.raises(ProbeError, match=r"HOST\[:PORT\]"):
        parse_target(text)


def test_savings_follow_the_path_and_need_pipelining() -> None:
    r = ProbeResult("mx", 25, smtp_rtt_ms=40.0, tcp_rtt_ms=1.0, connect_ms=2.0)
    r.keywords = {"PIPECONNECT": "", "SIZE": "1000"}
    assert not r.early_pipelining  # Exim's client also wants PIPELINING
    r.keywords["PIPELINING"] = ""
    assert r.early_pipelining and r.path == "cleartext"
    assert (r.round_trips_saved, r.ms_saved) == (1.5, 60.0)
    r.keywords["STARTTLS"] = ""
    assert (r.path, r.round_trips_saved, r.ms_saved) == ("starttls", 2.5, 100.0)
    r.smtp_rtt_ms = None  # no reply timing: the kernel's RTT, then the connect time
    assert r.rtt_ms == 1.0
    r.tcp_rtt_ms = None
    assert r.rtt_ms == 2.0


# ---------------------------------------------------------------- real servers


def test_native_exim_advertises_pipeconnect(exim_server_factory: EximServerFactory) -> None:
    exim = exim_server_factory()  # pipelining_connect_advertise_hosts = *
    out = probe_json(exim.port)
    assert out["banner_code"] == 220 and "Exim 4.96" in out["banner"][0]
    assert out["early_keywords"] == ["PIPECONNECT"]  # 4.96's name, not the older ones
    assert out["early_pipelining"] is True
    assert out["features"] | {"SIZE": None} == {
        "PIPELINING": True,
        "STARTTLS": False,  # tls_advertise_hosts is empty in the harness
        "CHUNKING": True,
        "SIZE": None,
        "8BITMIME": True,
        "SMTPUTF8": True,
        "DSN": False,
        "AUTH": False,
    }
    assert out["keywords"]["SIZE"].isdigit()
    assert out["path"] == "cleartext" and out["round_trips_saved"] == 1.5
    assert out["ms_saved"] == pytest.approx(out["rtt_ms"] * 1.5)
    assert out["tcp_rtt_ms"] is not None and out["smtp_rtt_ms"] > 0
    # the probe did not talk early: Exim logs no synchronization error
    exim.wait_log(r"SMTP connection from .*closed by QUIT")
    assert "synchronization error" not in exim.mainlog()


def test_exim_without_advertising(exim_server_factory: EximServerFactory) -> None:
    exim = exim_server_factory(pipe_connect_advertise=False)
    result = run_probe(f"127.0.0.1:{exim.port}")
    assert result.returncode == 0, result.stderr
    assert "early pipelining: not usable (no keyword advertised)" in result.stdout
    assert "pipeconnect-proxy in front would save 1.5 round trips" in result.stdout


def test_postfix_advertises_no_early_pipelining(postfix_factory: PostfixFactory) -> None:
    # The strictest setting: any input before the greeting is a protocol error.
    postfix = postfix_factory(proxy_protocol=False, forbid_unauth_pipelining=True)
    out = probe_json(postfix.port)
    assert out["banner"] == ["mta.test ESMTP Postfix"]
    assert out["early_keywords"] == [] and out["early_pipelining"] is False
    assert out["features"]["PIPELINING"] and out["features"]["CHUNKING"]
    assert out["features"]["DSN"] and not out["features"]["STARTTLS"]
    assert out["keywords"]["SIZE"] == "10240000"
    log = postfix.wait_log(r"disconnect from .* ehlo=1 quit=1 commands=2").string
    assert "improper command pipelining" not in log and "synchronization" not in log


def test_proxy_in_front_of_postfix(postfix_factory: PostfixFactory, tmp_path: Path) -> None:
    postfix = postfix_factory(proxy_protocol=True, forbid_unauth_pipelining=True)
    proxy = ProxyProcess(tmp_path, postfix.port).start()
    try:
        out = probe_json(proxy.port)
    finally:
        proxy.stop()
    assert out["banner"] == ["mta.test ESMTP Postfix"]  # the MTA's own banner, relayed
    assert out["early_keywords"] == ["PIPECONNECT", "PIPE_CONNECT", "X_PIPE_CONNECT"]
    assert out["early_pipelining"] is True and out["features"]["PIPELINING"]
    # what only the proxy may use stays hidden
    assert "XCLIENT" not in out["keywords"] and "XFORWARD" not in out["keywords"]
    assert out["keywords"]["SIZE"] == "10240000"
    # the proxy logged a session that was offered the keyword but did not use it
    (line,) = proxy.session_lines()
    assert " L. " in line and "H=(probe.test)" in line and "outcome=quit" in line
    assert "improper command pipelining" not in postfix.maillog()


def test_closed_port_is_an_error() -> None:
    result = run_probe(f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "connect: 127.0.0.1: Connection refused" in result.stderr
    assert result.stdout == ""


# ---------------------------------------------------------------- fault injection


async def test_silent_server_times_out_and_hears_nothing() -> None:
    """A server that accepts but never greets: the probe gives up after --timeout without
    having sent a byte (it must never trip a server's sync check)."""
    got = bytearray()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(4096):
                got.extend(data)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        with pytest.raises(ProbeError, match=r"banner: no answer within 0.3 s"):
            await probe(Address("127.0.0.1", port), ehlo_name="p.test", timeout=0.3)
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert got == b""


async def test_waits_for_a_slow_multiline_banner() -> None:
    """A late greeting sent as a 220- teaser plus the final line: the probe waits for all of
    it; the fake MTA checks that nothing arrived before it greeted."""
    mta = FakeMTA(proxy_protocol=False, banner_delay=0.3, banner=b"220-fake.test\r\n220 ready\r\n")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(mta.serve)
        result = await probe(Address("127.0.0.1", port), ehlo_name="p.test", timeout=5)
        nursery.cancel_scope.cancel()
    assert mta.violations == [] and mta.early_input == []
    assert result.banner == ["fake.test", "ready"] and result.banner_ms >= 250
    assert mta.commands[:2] == [b"EHLO p.test\r\n", b"QUIT\r\n"]
    assert not result.early_pipelining and result.keywords["STARTTLS"] == ""
    assert (result.path, result.round_trips_saved) == ("starttls", 2.5)


async def test_refusing_banner_is_an_error() -> None:
    mta = FakeMTA(proxy_protocol=False, banner=b"554 no thanks\r\n")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(mta.serve)
        with pytest.raises(ProbeError, match="refuses sessions: 554 no thanks"):
            await probe(Address("127.0.0.1", port), ehlo_name="p.test", timeout=5)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("greeting", "on_ehlo", "error"),
    [
        (b"", False, r"^banner: the server closed the connection$"),
        (b"hello\r\n", False, r"^banner: not an SMTP reply \(.*malformed reply line\)$"),
        (b"220 hi\r\n250 early\r\n", False, r"^the server sent more than its banner before EHLO$"),
        (b"220 hi\r\n", True, r"^EHLO: the server closed the connection$"),
    ],
    ids=["closed-before-banner", "not-smtp", "more-than-banner", "closed-on-ehlo"],
)
async def test_broken_server_is_an_error(greeting: bytes, on_ehlo: bool, error: str) -> None:
    """Each way a server can fail the probe names the step it failed at."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            if greeting:
                await stream.send_all(greeting)  # one write: the banner and what follows
            if on_ehlo:
                await stream.receive_some(4096)  # the EHLO, then hang up

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        with pytest.raises(ProbeError, match=error):
            await probe(Address("127.0.0.1", port), ehlo_name="p.test", timeout=5)
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- RTT through a delay relay


async def test_rtt_tracks_a_set_rtt(exim_server_factory: EximServerFactory) -> None:
    """Through the bench delay relay set to 60 ms the SMTP turnaround shows the set RTT (the
    kernel's RTT shows only the loopback hop to the relay). Generous bounds: a check that
    the right thing is measured, not a speed test."""
    exim = exim_server_factory()
    relay = DelayRelay(("127.0.0.1", exim.port), rtt=0.060)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(relay.serve)
        result = await probe(Address("127.0.0.1", port), ehlo_name="p.test", timeout=10)
        nursery.cancel_scope.cancel()
    assert result.smtp_rtt_ms is not None and 50 <= result.smtp_rtt_ms <= 1000
    assert result.rtt_ms == result.smtp_rtt_ms
    assert result.ms_saved == pytest.approx(result.smtp_rtt_ms * 1.5)
    assert result.early_pipelining


async def test_quit_cut_short_still_reports() -> None:
    """A server that drops the line on QUIT: the probe has what it came for."""
    mta = FakeMTA(proxy_protocol=False, script={"QUIT": CLOSE})
    async with trio.open_nursery() as nursery:
        port = await nursery.start(mta.serve)
        result = await probe(Address("127.0.0.1", port), ehlo_name="p.test", timeout=5)
        nursery.cancel_scope.cancel()
    assert result.ehlo_code == 250 and result.keywords["SIZE"] == "1000000"
    assert result.smtp_rtt_ms is not None and result.smtp_rtt_ms > 0  # the EHLO sample
