"""Two byte relays with no SMTP in them: the floors P2 measures the proxy against.

- ``trio``: what any trio relay pays per session: accept, a direct non-blocking connect
  (as the proxy's), one task per direction, ``receive_some``/``send_all`` until EOF.
  ``trio-v2`` first sends a PROXY v2 header (``proxy.proxyproto``, as the proxy's
  ``proxy-v2`` upstream identity), for an MTA that expects one (P5).
- ``epoll``: the same in plain Python on ``select.epoll``, one thread, no framework: what
  the interpreter itself costs.
- ``epoll-smtp``: ``epoll`` plus the proxy's sans-I/O framing of both directions
  (``proxy.smtp``: every command, reply and message line parsed, the DATA phase tracked),
  bytes passed on as they came: the least any Python relay that tracks SMTP costs.

The proxy's CPU per session minus the trio floor is what its SMTP tracking costs; the trio
floor minus the epoll floor is what the framework costs (bench/RESULTS.md).

    python -m bench.floors trio|trio-v2|epoll|epoll-smtp LISTEN_PORT UPSTREAM_PORT   # loopback only
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import select
import socket
import sys
from collections.abc import Callable

import trio

from proxy.proxyproto import encode_v2
from proxy.smtp import (
    NEED_DATA,
    Command,
    CommandReader,
    EndOfData,
    ProtocolError,
    ReplyReader,
)

LOCAL = "127.0.0.1"


async def _pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
    try:
        while data := await src.receive_some(65536):
            await dst.send_all(data)
        await dst.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _trio_session(
    client: trio.SocketStream, upstream_port: int, proxy_v2: bool = False
) -> None:
    sock = trio.socket.socket()
    try:
        await sock.connect((LOCAL, upstream_port))
    except OSError:
        sock.close()
        await client.aclose()
        return
    up = trio.SocketStream(sock)
    async with client, up, trio.open_nursery() as nursery:
        if proxy_v2:
            peer, local = client.socket.getpeername(), client.socket.getsockname()
            with contextlib.suppress(trio.BrokenResourceError):
                await up.send_all(encode_v2(peer[:2], local[:2]))
        nursery.start_soon(_pump, up, client)
        await _pump(client, up)


async def trio_relay(port: int, upstream_port: int, proxy_v2: bool = False) -> None:
    listeners = await trio.open_tcp_listeners(port, host=LOCAL, backlog=4096)
    await trio.serve_listeners(
        functools.partial(_trio_session, upstream_port=upstream_port, proxy_v2=proxy_v2),
        listeners,
    )


class _Tracker:
    """The framing a tracking relay does per session: commands and replies paired, 354 ->
    message data framed until the dot. No decisions: bytes are passed on regardless."""

    def __init__(self) -> None:
        self.commands = CommandReader()
        self.replies = ReplyReader()
        self.pending: collections.deque[str] = collections.deque()

    def client(self, data: bytes) -> None:
        self.commands.feed(data)
        while (event := self.commands.next_event()) is not NEED_DATA:
            if isinstance(event, Command):
                self.pending.append(event.verb)
            elif isinstance(event, EndOfData):
                self.pending.append(".")  # the MTA answers the end of data too

    def mta(self, data: bytes) -> None:
        self.replies.feed(data)
        while (reply := self.replies.next_reply()) is not None:
            verb = self.pending.popleft() if self.pending else "banner"
            if verb == "DATA" and reply.code == 354:
                self.commands.start_data()


class _Side:
    __slots__ = ("out", "parse", "peer", "read_done", "shut", "sock")

    def __init__(self, sock: socket.socket, parse: Callable[[bytes], None] | None) -> None:
        self.sock = sock
        self.parse = parse  # sees every byte read from this socket
        self.peer: _Side = self
        self.out = bytearray()  # bytes for this socket that did not fit yet
        self.read_done = False  # this socket sent EOF
        self.shut = False  # EOF passed on to this socket


def epoll_relay(port: int, upstream_port: int, track: bool = False) -> None:
    """Read from a side only while its peer has nothing waiting to go out (backpressure);
    pass EOF on as a half-close; close the pair when both directions are done."""
    listener = socket.create_server((LOCAL, port), backlog=4096)
    listener.setblocking(False)
    ep = select.epoll()
    ep.register(listener.fileno(), select.EPOLLIN)
    sides: dict[int, _Side] = {}

    def close(side: _Side) -> None:
        for s in (side, side.peer):
            fd = s.sock.fileno()
            if fd in sides:
                del sides[fd]
                ep.unregister(fd)
                s.sock.close()

    def settle(side: _Side) -> bool:
        """Send what is queued for ``side``; pass EOF on; False when the pair is over."""
        if side.out:
            try:
                del side.out[: side.sock.send(side.out)]
            except BlockingIOError:
                pass
            except OSError:
                return False
        if not side.out and side.peer.read_done:
            if side.read_done:
                return False  # both directions ended and everything went out
            if not side.shut:
                side.shut = True
                try:
                    side.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    return False
        return True

    def interest(side: _Side) -> None:
        mask = select.EPOLLIN if not side.read_done and not side.peer.out else 0
        ep.modify(side.sock.fileno(), mask | (select.EPOLLOUT if side.out else 0))

    while True:
        for fd, events in ep.poll():
            if fd == listener.fileno():
                while True:
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        break
                    up = socket.socket()
                    for raw in (conn, up):
                        raw.setblocking(False)
                        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    up.connect_ex((LOCAL, upstream_port))  # readable once the banner comes
                    tracker = _Tracker() if track else None
                    a = _Side(conn, tracker.client if tracker else None)
                    b = _Side(up, tracker.mta if tracker else None)
                    a.peer, b.peer = b, a
                    for s in (a, b):
                        sides[s.sock.fileno()] = s
                        ep.register(s.sock.fileno(), select.EPOLLIN)
                continue
            side = sides.get(fd)
            if side is None:
                continue
            peer = side.peer
            if events & (select.EPOLLHUP | select.EPOLLERR) and side.read_done:
                close(side)  # gone both ways: nothing more can reach it
                continue
            if events & ~select.EPOLLOUT and not side.read_done and not peer.out:
                try:
                    data = side.sock.recv(65536)
                except BlockingIOError:
                    data = None
                except OSError:
                    data = b""
                if data is not None:
                    side.read_done = not data
                    if data and side.parse is not None:
                        try:
                            side.parse(data)
                        except ProtocolError:  # not SMTP after all: just relay it
                            side.parse = peer.parse = None
                    peer.out += data
                    if not settle(peer):
                        close(side)
                        continue
            if not settle(side):
                close(side)
                continue
            interest(side)
            interest(peer)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.floors", description=__doc__)
    ap.add_argument("kind", choices=["trio", "trio-v2", "epoll", "epoll-smtp"])
    ap.add_argument("port", type=int)
    ap.add_argument("upstream_port", type=int)
    args = ap.parse_args(argv)
    try:
        if args.kind in ("trio", "trio-v2"):
            trio.run(trio_relay, args.port, args.upstream_port, args.kind == "trio-v2")
        else:
            epoll_relay(args.port, args.upstream_port, track=args.kind == "epoll-smtp")
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
