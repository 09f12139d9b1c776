"""Prometheus collectors. One ``Metrics`` per process (tests make their own registry)."""

from __future__ import annotations

import socket
import struct
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Sessions and DATA can last minutes: the default buckets stop at 10 s.
_LONG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_SHORT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


if TYPE_CHECKING:
    from .session import SessionLog

# struct tcp_info (linux/tcp.h): eight u8 fields, then u32s; tcpi_rtt is the 16th (usec).
_TCPI_RTT = struct.Struct("=I")
_TCPI_RTT_OFFSET = 8 + 15 * 4


def tcp_rtt(sock: Any) -> float | None:
    """The kernel's smoothed RTT for a connected TCP socket, in seconds (Linux only)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, AttributeError):
        return None
    if len(info) < _TCPI_RTT_OFFSET + 4:
        return None
    return float(_TCPI_RTT.unpack_from(info, _TCPI_RTT_OFFSET)[0]) / 1e6


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ns = "pipeconnect"
        self.sessions = Counter(
            "sessions", "Client sessions ended", ["listener", "outcome"], namespace=ns, registry=r
        )
        self.active = Gauge(
            "active_sessions", "Client sessions in progress", ["listener"], namespace=ns, registry=r
        )
        self.advertised = Counter(
            "ehlo_advertised",
            "EHLO replies that advertised the early-pipelining keywords",
            namespace=ns,
            registry=r,
        )
        self.used = Counter(
            "early_pipelining_used",
            "Sessions whose commands sent before the banner were used",
            namespace=ns,
            registry=r,
        )
        self.early_refused = Counter(
            "early_input_refused",
            "Sessions whose input before the banner was refused (SMTP synchronization error)",
            ["action"],
            namespace=ns,
            registry=r,
        )
        self.replayed = Counter(
            "replayed_commands",
            "Commands held before the banner and replayed to the MTA",
            namespace=ns,
            registry=r,
        )
        self.round_trips_saved = Counter(
            "round_trips_saved",
            "Client round trips saved by early pipelining",
            namespace=ns,
            registry=r,
        )
        self.messages = Counter(
            "messages", "Messages accepted by the MTA and relayed", namespace=ns, registry=r
        )
        self.message_bytes = Counter(
            "message_bytes", "Message bytes relayed to the MTA", namespace=ns, registry=r
        )
        self.upstream_connect = Histogram(
            "upstream_connect_seconds",
            "Time to connect to the MTA",
            namespace=ns,
            registry=r,
            buckets=_SHORT_BUCKETS,
        )
        self.upstream_banner = Histogram(
            "upstream_banner_seconds",
            "Time from connect to the MTA's final 220 banner line",
            namespace=ns,
            registry=r,
            buckets=_LONG_BUCKETS,
        )
        self.duration = Histogram(
            "session_duration_seconds",
            "Client session duration",
            ["listener"],
            namespace=ns,
            registry=r,
            buckets=_LONG_BUCKETS,
        )

    def record_session(self, log: SessionLog) -> None:
        """Everything a finished session adds, in one place (called once per session)."""
        self.sessions.labels(log.listener, log.outcome).inc()
        self.duration.labels(log.listener).observe(log.elapsed)
        if log.early_used:
            self.used.inc()
            self.replayed.inc(log.replayed)
            self.round_trips_saved.inc(log.round_trips_saved)
