"""proxy.acceptor: every queued connection is accepted in one wake-up, errors as trio
treats them, listeners closed when the loop is cancelled."""

from __future__ import annotations

import errno
import logging
import socket
from typing import Any

import pytest
import trio
import trio.testing

from proxy import acceptor, fastio


async def _listener() -> trio.SocketListener:
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=256)
    return listener


def _connect_blocking(port: int, n: int) -> list[socket.socket]:
    """Connections the kernel completes into the accept queue before anyone accepts."""
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]


class _CountingSocket:
    """Stands in for the listener's socket: counts accepts, can fail accept() once."""

    def __init__(self, real: socket.socket, fail_with: int | None = None) -> None:
        self.real = real
        self.fail_with = fail_with
        self.accepted = 0

    def fileno(self) -> int:
        return self.real.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        if self.fail_with is not None:
            code, self.fail_with = self.fail_with, None
            raise OSError(code, "injected")
        conn = self.real.accept()
        self.accepted += 1
        return conn

    def close(self) -> None:
        self.real.close()


async def _serve_and_greet(
    listener: trio.SocketListener, clients: list[socket.socket], seen: list[int] | None = None
) -> list[bytes]:
    """Run the acceptor with a handler that greets; return what each client read. ``seen``
    gets, for each handler as it starts, how many connections had been accepted by then."""
    sock = listener.socket._sock  # type: ignore[attr-defined]

    async def greet(stream: trio.SocketStream) -> None:
        if seen is not None:
            seen.append(sock.accepted)
        await stream.send_all(b"220 hi\r\n")

    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: acceptor.serve_listeners(
                greet, [listener], handler_nursery=nursery, task_status=task_status
            )
        )
        with trio.fail_after(10):
            got = [await trio.to_thread.run_sync(c.recv, 100) for c in clients]
        nursery.cancel_scope.cancel()
    return got


async def test_a_queue_of_connections_is_accepted_in_one_wake_up() -> None:
    listener = await _listener()
    port = listener.socket.getsockname()[1]
    clients = _connect_blocking(port, 50)
    counting = _CountingSocket(listener.socket._sock)  # type: ignore[attr-defined]
    listener.socket._sock = counting  # type: ignore[attr-defined]
    seen: list[int] = []
    try:
        assert await _serve_and_greet(listener, clients, seen) == [b"220 hi\r\n"] * 50
    finally:
        for c in clients:
            c.close()
        counting.close()
    # No handler ran before the whole queue was taken (trio.serve_listeners passes through
    # the scheduler after each accept, so its first handler would see 1 or 2).
    assert seen[0] == 50, seen


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ECONNABORTED])
async def test_accept_errors_are_retried(code: int, caplog: pytest.LogCaptureFixture) -> None:
    listener = await _listener()
    port = listener.socket.getsockname()[1]
    clients = _connect_blocking(port, 3)
    counting = _CountingSocket(listener.socket._sock, fail_with=code)  # type: ignore[attr-defined]
    listener.socket._sock = counting  # type: ignore[attr-defined]
    try:
        with caplog.at_level(logging.ERROR, "pipeconnect.server"):
            assert await _serve_and_greet(listener, clients) == [b"220 hi\r\n"] * 3
    finally:
        for c in clients:
            c.close()
        counting.close()
    logged = [r.getMessage() for r in caplog.records if r.name == "pipeconnect.server"]
    if code == errno.EMFILE:  # out of descriptors: said, paused, retried
        assert logged and "EMFILE" in logged[0]
    else:  # a connection that died in the queue: skipped silently
        assert not logged


async def test_cancelling_closes_the_listener() -> None:
    listener = await _listener()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: acceptor.serve_listeners(
                trio.testing.wait_all_tasks_blocked,
                [listener],
                handler_nursery=nursery,
                task_status=task_status,
            )
        )
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert listener.socket.fileno() == -1


async def test_trio_loop_when_fast_paths_are_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastio, "BUDGET", 0)
    listener = await _listener()
    clients = _connect_blocking(listener.socket.getsockname()[1], 2)
    try:
        assert await _serve_and_greet(listener, clients) == [b"220 hi\r\n"] * 2
    finally:
        for c in clients:
            c.close()
