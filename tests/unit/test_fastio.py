"""proxy.fastio: the raw-socket paths must behave as trio's SocketStream methods do (data,
EOF, the exceptions the session catches) and keep the scheduler fair."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from proxy import fastio


@pytest.fixture
async def pair() -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    a, b = trio.socket.socketpair()
    left, right = trio.SocketStream(a), trio.SocketStream(b)
    yield left, right
    await left.aclose()
    await right.aclose()


@pytest.fixture(params=[16, 0], ids=["fast", "trio"])
def budget(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Both ways: the fast paths, and PIPECONNECT_FASTIO=0 (the streams' own methods)."""
    monkeypatch.setattr(fastio, "BUDGET", request.param)
    monkeypatch.setattr(fastio, "_budget", request.param)
    return int(request.param)


async def test_receive_waits_for_data_then_eof(
    pair: tuple[trio.SocketStream, trio.SocketStream], budget: int
) -> None:
    left, right = pair
    assert fastio.try_receive(left, 100) is None  # nothing there: the caller must wait
    async with trio.open_nursery() as nursery:

        async def later() -> None:
            await trio.sleep(0.01)
            await right.send_all(b"250 ok\r\n")

        nursery.start_soon(later)
        assert await fastio.receive_some(left, 100) == b"250 ok\r\n"
    await right.send_eof()
    assert await fastio.receive_some(left, 100) == b""


async def test_try_receive_and_try_send_when_ready(
    pair: tuple[trio.SocketStream, trio.SocketStream], budget: int
) -> None:
    left, right = pair
    sent = fastio.try_send(left, b"EHLO x\r\n")
    if budget:
        assert sent == 8
        assert fastio.try_receive(right, 100) == b"EHLO x\r\n"
    else:  # off: nothing is tried, everything goes through the stream
        assert sent == 0 and fastio.try_receive(right, 100) is None


async def test_send_all_larger_than_the_socket_buffer(
    pair: tuple[trio.SocketStream, trio.SocketStream], budget: int
) -> None:
    left, right = pair
    data = bytes(range(256)) * 8192  # 2 MiB: must wait for the reader several times
    got = bytearray()

    async def read() -> None:
        while len(got) < len(data):
            got.extend(await right.receive_some(65536))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        sent = fastio.try_send(left, data)
        assert sent < len(data)
        await fastio.send_all(left, data[sent:])
    assert bytes(got) == data


async def test_errors_are_trio_stream_errors(
    pair: tuple[trio.SocketStream, trio.SocketStream], budget: int
) -> None:
    left, right = pair
    # the peer resets: sending fails as trio's SocketStream would fail
    right.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    await right.aclose()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the first sends may still be accepted by the kernel
            await fastio.send_all(left, b"x" * 65536)
    await left.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await fastio.receive_some(left, 100)
    with pytest.raises(trio.ClosedResourceError):
        await fastio.send_all(left, b"x")


async def test_closing_wakes_a_waiting_receive(
    pair: tuple[trio.SocketStream, trio.SocketStream], budget: int
) -> None:
    left, _ = pair
    async with trio.open_nursery() as nursery:

        async def close_soon() -> None:
            await trio.sleep(0.01)
            await left.aclose()

        nursery.start_soon(close_soon)
        with pytest.raises(trio.ClosedResourceError):
            await fastio.receive_some(left, 100)


async def test_fast_operations_are_budgeted(
    pair: tuple[trio.SocketStream, trio.SocketStream],
) -> None:
    """After BUDGET operations that did not block, the next declines so that its caller
    takes the waiting path, which checkpoints (other sessions run, cancellation lands)."""
    left, right = pair
    fastio._budget = fastio.BUDGET
    await right.send_all(b"x" * (fastio.BUDGET + 1))
    got = [fastio.try_receive(left, 1) for _ in range(fastio.BUDGET + 1)]
    assert got[: fastio.BUDGET] == [b"x"] * fastio.BUDGET and got[-1] is None
    with trio.testing.assert_checkpoints():
        assert await fastio.receive_some(left, 1) == b"x"


async def test_input_pending(pair: tuple[trio.SocketStream, trio.SocketStream]) -> None:
    left, right = pair
    assert not fastio.input_pending(left)
    await right.send_all(b"junk after QUIT\r\n")
    assert fastio.input_pending(left)
    assert await left.receive_some(100) == b"junk after QUIT\r\n"  # peeked, not consumed
    assert not fastio.input_pending(left)
    # anything it cannot look into counts as pending: the caller then drains
    assert fastio.input_pending(trio.testing.MemorySendStream())  # type: ignore[arg-type]
