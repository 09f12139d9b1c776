"""What the driver tells the session machine (inputs) and what the machine asks of it
(actions). Plain frozen records; the theory of operation is in docs/machine.md."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..addresses import Endpoint


class Side(Enum):
    CLIENT = "client"
    UPSTREAM = "upstream"


# ---------------------------------------------------------------- events (driver -> machine)


@dataclass(frozen=True, slots=True)
class ClientData:
    data: bytes  # never empty: end of stream is ClientEof


@dataclass(frozen=True, slots=True)
class ClientEof:
    pass


@dataclass(frozen=True, slots=True)
class ClientBroken:
    """A read or write on the client connection failed (reset, closed)."""


@dataclass(frozen=True, slots=True)
class UpstreamConnected:
    """The connection to the MTA is up and the identity header is written."""


@dataclass(frozen=True, slots=True)
class UpstreamConnectFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class UpstreamData:
    data: bytes


@dataclass(frozen=True, slots=True)
class UpstreamEof:
    pass


@dataclass(frozen=True, slots=True)
class UpstreamBroken:
    """A read (``sending`` False) or write on the MTA connection failed."""

    sending: bool


@dataclass(frozen=True, slots=True)
class TlsEstablished:
    side: Side
    version: str
    cipher: str | None = None


@dataclass(frozen=True, slots=True)
class TlsFailed:
    side: Side
    reason: str


@dataclass(frozen=True, slots=True)
class ClientNameResolved:
    """The client's verified host name for XCLIENT NAME= (or Postfix's [UNAVAILABLE] forms)."""

    name: str


@dataclass(frozen=True, slots=True)
class DeadlinePassed:
    """The machine's ``deadline`` came while the driver waited for what it asked for."""


@dataclass(frozen=True, slots=True)
class SendTimedOut:
    """A write to ``side`` could not finish within the bound the driver was given."""

    side: Side


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The proxy is stopping and the grace is over. ``send_cut``: a write to the client (or
    a TLS handshake) was cut half way, so no further byte may go to it."""

    send_cut: bool = False


Event = (
    ClientData
    | ClientEof
    | ClientBroken
    | UpstreamConnected
    | UpstreamConnectFailed
    | UpstreamData
    | UpstreamEof
    | UpstreamBroken
    | TlsEstablished
    | TlsFailed
    | ClientNameResolved
    | DeadlinePassed
    | SendTimedOut
    | Shutdown
)


# ---------------------------------------------------------------- actions (machine -> driver)


@dataclass(frozen=True, slots=True)
class SendClient:
    """One write to the client. ``verdict``: it carries the MTA's verdict on a message, so
    a shutdown must not cut it (the client would retry a message the MTA has)."""

    data: bytes
    verdict: bool = False


@dataclass(frozen=True, slots=True)
class SendUpstream:
    data: bytes


@dataclass(frozen=True, slots=True)
class ConnectUpstream:
    """Connect to ``address`` and write ``header`` alone in its own segment (Postfix peeks
    at the PROXY header and counts anything behind it as talking too early)."""

    address: Endpoint
    header: bytes


@dataclass(frozen=True, slots=True)
class StartTls:
    """Run the TLS handshake towards ``side`` (the client: server role)."""

    side: Side
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class ResolveClientName:
    address: str


@dataclass(frozen=True, slots=True)
class CloseUpstream:
    pass


@dataclass(frozen=True, slots=True)
class CloseClient:
    """Half-close towards the client and drain its input briefly (a close with unread input
    sends an RST that can destroy the last reply in the client's buffer). Without
    ``linger`` only input already waiting is drained."""

    linger: bool = True


Action = (
    SendClient
    | SendUpstream
    | ConnectUpstream
    | StartTls
    | ResolveClientName
    | CloseUpstream
    | CloseClient
)
