"""What the kernel knows about a TCP connection (``TCP_INFO``, Linux). Standard library only."""

from __future__ import annotations

import socket
import struct
from typing import Any

__all__ = ["syn_data_acked", "tcp_rtt"]

# struct tcp_info (linux/tcp.h): eight u8 fields, then u32s; tcpi_rtt is the 16th (usec).
_TCPI_RTT = struct.Struct("=I")
_TCPI_RTT_OFFSET = 8 + 15 * 4
_TCPI_OPTIONS_OFFSET = 5  # u8 tcpi_options
_TCPI_OPT_SYN_DATA = 32  # the SYN carried data and the server acknowledged it (Fast Open)


def tcp_rtt(sock: Any) -> float | None:
    """The kernel's smoothed RTT for a connected TCP socket, in seconds; None where the
    system has no ``TCP_INFO`` or ``sock`` is not such a socket."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, AttributeError):
        return None
    if len(info) < _TCPI_RTT_OFFSET + 4:
        return None
    return float(_TCPI_RTT.unpack_from(info, _TCPI_RTT_OFFSET)[0]) / 1e6


def syn_data_acked(sock: Any) -> bool:
    """Whether this connection's SYN carried data that the server took (TCP Fast Open)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, AttributeError):
        return False
    return len(info) > _TCPI_OPTIONS_OFFSET and bool(
        info[_TCPI_OPTIONS_OFFSET] & _TCPI_OPT_SYN_DATA
    )
