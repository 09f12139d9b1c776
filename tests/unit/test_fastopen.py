"""TCP Fast Open on the listeners (`listen.tcp_fastopen`): the option, and the warnings when
the kernel will not give it. End to end with the real Exim client: test_exim_matrix.py."""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

import pytest
import trio

from proxy import server
from proxy.server import enable_fast_open

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="TCP_FASTOPEN semantics: Linux")


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Each test starts with no warning given yet and its own stand-in for the sysctl."""
    monkeypatch.setattr(server, "_tfo_warned", set())
    sysctl = tmp_path / "tcp_fastopen"
    sysctl.write_text("3\n")
    monkeypatch.setattr(server, "_TFO_SYSCTL", sysctl)
    return sysctl


async def test_sets_the_queue_length_on_every_listener(caplog: pytest.LogCaptureFixture) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listeners += await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        assert enable_fast_open(listeners, 37)
        for lst in listeners:
            assert lst.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN) == 37
        assert not caplog.records
    finally:
        for lst in listeners:
            await lst.aclose()


@pytest.fixture
def client_only(fresh_warnings: Path) -> None:
    fresh_warnings.write_text("1\n")  # the Linux default: client side only


@pytest.mark.usefixtures("client_only")
async def test_sysctl_without_server_bit_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        with caplog.at_level(logging.WARNING, "pipeconnect.server"):
            assert enable_fast_open(listeners, 16)
            assert enable_fast_open(listeners, 16)  # the TLS-on-connect listeners, say
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1, warnings
        assert "net.ipv4.tcp_fastopen = 1" in warnings[0]
    finally:
        for lst in listeners:
            await lst.aclose()


async def test_kernel_refusal_warns_once_and_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    for lst in listeners:
        lst.socket.close()  # any setsockopt now fails with EBADF
    with caplog.at_level(logging.WARNING, "pipeconnect.server"):
        assert not enable_fast_open(listeners, 16)
        assert not enable_fast_open(listeners, 16)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "refused by the kernel" in warnings[0], warnings
