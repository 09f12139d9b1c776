"""The I/O the driver needs towards the MTA beyond moving bytes: opening the connection and
looking up the client's name for XCLIENT. What is said to the MTA is the machine's
(``proxy.machine``)."""

from __future__ import annotations

import ipaddress
import socket

import trio

from .addresses import Endpoint


async def open_stream(address: Endpoint) -> trio.SocketStream:
    """A numeric address (the usual sidecar case) skips open_tcp_stream's resolver and
    happy-eyeballs machinery, which costs as much again as the connect on loopback."""
    host, port = address
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def client_name(addr: str, timeout: float = 5.0) -> str:
    """The client's verified host name, as Postfix would find it itself: the PTR name only if
    it resolves back to the address. Without NAME, Postfix would keep the proxy's own name."""
    with trio.move_on_after(timeout):
        try:
            name, _ = await trio.socket.getnameinfo((addr, 0), socket.NI_NAMEREQD)
            infos = await trio.socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            return "[TEMPUNAVAIL]" if exc.errno == socket.EAI_AGAIN else "[UNAVAILABLE]"
        if any(info[4][0] == addr for info in infos):
            return str(name)
        return "[UNAVAILABLE]"
    return "[TEMPUNAVAIL]"
