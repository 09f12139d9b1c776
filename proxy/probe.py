"""``pipeconnect-proxy probe HOST[:PORT]``: what an early-pipelining client learns from a server.

The probe behaves like an Exim client on its first visit: it connects, waits for the whole
banner (never a byte before it, so no sync check, pregreet test or early-talker trap can fire),
sends EHLO, reads the reply and QUITs. From the EHLO reply it tells whether a client would use
early pipelining next time (an early-pipelining keyword *and* PIPELINING, as Exim requires) and
how many round trips and milliseconds that saves on this path.

Framing, reply matching and the EHLO keywords are the sans-I/O MTA conversation's
(``MtaConversation``, read through ``replies.receive_reply``); this module adds only the
socket and the arithmetic.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from .config import Address, parse_address
from .errors import ConfigError
from .machine.mta import MtaConversation
from .replies import receive_reply
from .smtp import EARLY_PIPELINING_KEYWORDS, ProtocolError, Reply
from .tcpinfo import tcp_rtt

DEFAULT_PORT = 25
# Round trips a client waits for after the TCP handshake (the waits the session log's RT
# counts: README, "Behaviour"). Classic cleartext: the banner (half a round trip: the server
# greets when the handshake completes), EHLO, then the pipelined MAIL/RCPT/DATA = 2.5; early:
# one flight for all of it = 1. STARTTLS: banner, EHLO, STARTTLS, then EHLO and the envelope
# after the handshake = 4.5; early: EHLO+STARTTLS, then EHLO+envelope = 2. The TLS handshake
# costs the same either way.
ROUND_TRIPS_SAVED = {"cleartext": 1.5, "starttls": 2.5}
# Extensions an operator checking a deployment asks about, shown in this order.
FEATURES = ("PIPELINING", "STARTTLS", "CHUNKING", "SIZE", "8BITMIME", "SMTPUTF8", "DSN", "AUTH")


class ProbeError(Exception):
    """The server could not be probed; ``str()`` is the message for the operator."""


def parse_target(text: str) -> Address:
    """``HOST``, ``HOST:PORT``, ``[IPv6]:PORT``, ``[IPv6]`` or a bare IPv6 address."""
    if text.count(":") > 1 and not text.startswith("["):
        text = f"[{text}]"  # a bare IPv6 address has no port
    if text.endswith("]") or ":" not in text:
        text = f"{text}:{DEFAULT_PORT}"
    try:
        return parse_address(text, "HOST[:PORT]", min_port=1)
    except ConfigError as exc:
        raise ProbeError(str(exc)) from None


@dataclass
class ProbeResult:
    host: str
    port: int
    peer: str = ""
    connect_ms: float = 0.0  # TCP handshake as seen by connect(): about one RTT
    tcp_rtt_ms: float | None = None  # the kernel's smoothed RTT (TCP_INFO), after EHLO
    smtp_rtt_ms: float | None = None  # fastest reply turnaround (EHLO, QUIT)
    banner_ms: float = 0.0  # connect() returned -> whole banner read
    banner: list[str] = field(default_factory=list)
    banner_code: int = 0
    ehlo_code: int = 0
    ehlo: list[str] = field(default_factory=list)
    keywords: dict[str, str] = field(default_factory=dict)

    # -- what the EHLO reply means

    @property
    def early_keywords(self) -> list[str]:
        return [k for k in EARLY_PIPELINING_KEYWORDS if k in self.keywords]

    @property
    def early_pipelining(self) -> bool:
        """A client that cached this reply would talk before the next banner."""
        return bool(self.early_keywords) and "PIPELINING" in self.keywords

    @property
    def path(self) -> str:
        """How a client delivers here: an opportunistic-TLS client uses STARTTLS if offered."""
        return "starttls" if "STARTTLS" in self.keywords else "cleartext"

    @property
    def round_trips_saved(self) -> float:
        return ROUND_TRIPS_SAVED[self.path]

    @property
    def rtt_ms(self) -> float:
        """The RTT the savings are counted in. A saved round trip is a wait for a reply, so
        the reply turnaround is the measure; it also spans relays and load balancers in the
        path, which TCP_INFO and the connect time (first hop only) do not."""
        for value in (self.smtp_rtt_ms, self.tcp_rtt_ms):
            if value is not None:
                return value
        return self.connect_ms

    @property
    def ms_saved(self) -> float:
        return self.rtt_ms * self.round_trips_saved

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            early_keywords=self.early_keywords,
            early_pipelining=self.early_pipelining,
            features={f: f in self.keywords for f in FEATURES},
            path=self.path,
            rtt_ms=self.rtt_ms,
            round_trips_saved=self.round_trips_saved,
            ms_saved=self.ms_saved,
        )
        return out

    def report(self) -> str:
        yes = {True: "yes", False: "no"}
        kw = self.keywords
        lines = [
            f"probe {Address(self.host, self.port)} ({self.peer})",
            f"  banner      {self.banner_code} {' / '.join(self.banner)}",
            f"  EHLO        {self.ehlo_code} {self.ehlo[0] if self.ehlo else ''}",
            f"  RTT         {self.rtt_ms:.3f} ms (SMTP turnaround {_ms(self.smtp_rtt_ms)}, "
            f"TCP_INFO {_ms(self.tcp_rtt_ms)}, connect {self.connect_ms:.3f} ms)",
            "  early pipelining keyword  "
            + (
                ", ".join(self.early_keywords)
                or f"none ({' / '.join(EARLY_PIPELINING_KEYWORDS)} absent)"
            ),
        ]
        for f in FEATURES:
            value = kw.get(f, "")
            lines.append(f"  {f:<25} {yes[f in kw]}{' ' + value if value else ''}")
        saving = (
            f"{self.round_trips_saved:g} round trips, {self.ms_saved:.1f} ms per {self.path} "
            f"delivery (RTT {self.rtt_ms:.3f} ms x {self.round_trips_saved:g})"
        )
        if self.early_pipelining:
            lines.append(f"early pipelining: ADVERTISED; a client that cached it saves {saving}")
        else:
            why = "PIPELINING missing" if self.early_keywords else "no keyword advertised"
            lines.append(
                f"early pipelining: not usable ({why}); pipeconnect-proxy in front would save "
                f"{saving}"
            )
        return "\n".join(lines)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} ms"


async def _reply(stream: trio.SocketStream, conversation: MtaConversation[str]) -> Reply:
    """The next reply; its tag names the step for the operator. Raises ProbeError."""
    what = conversation.next_tag
    try:
        got = await receive_reply(stream, conversation)
    except ProtocolError as exc:
        raise ProbeError(f"{what}: not an SMTP reply ({exc.reply.text})") from None
    if got is None:
        raise ProbeError(f"{what}: the server closed the connection")
    return got[1]


def _lines(reply: Reply) -> list[str]:
    return [line.decode("utf-8", "replace") for line in reply.lines]


async def probe(target: Address, *, ehlo_name: str, timeout: float) -> ProbeResult:
    """Probe ``target``; every step under ``timeout`` seconds. Raises ProbeError."""
    result = ProbeResult(target.host, target.port)
    step = "connect"
    try:
        with trio.fail_after(timeout):
            stream, result.connect_ms = await _connect(target)
        t1 = time.perf_counter()
        async with stream:
            peer = stream.socket.getpeername()
            result.peer = str(Address(peer[0], peer[1]))
            conversation: MtaConversation[str] = MtaConversation()
            conversation.expect("banner", banner=True)
            step = "banner"
            with trio.fail_after(timeout):
                banner = await _reply(stream, conversation)  # the whole reply, 220- teasers too
            result.banner_ms = (time.perf_counter() - t1) * 1000
            result.banner_code, result.banner = banner.code, _lines(banner)
            if banner.code != 220:
                raise ProbeError(f"the server refuses sessions: {banner.code} {banner.text}")
            if conversation.buffered:
                raise ProbeError("the server sent more than its banner before EHLO")
            step = "EHLO"
            with trio.fail_after(timeout):
                line = conversation.send("EHLO", f"EHLO {ehlo_name}\r\n".encode())
                turnaround = await _exchange(stream, line)
                ehlo = await _reply(stream, conversation)
                samples = [turnaround()]
            result.ehlo_code, result.ehlo = ehlo.code, _lines(ehlo)
            if ehlo.code != 250:
                raise ProbeError(f"EHLO refused: {ehlo.code} {ehlo.text}")
            result.keywords = conversation.capabilities  # the keywords of this 250
            result.tcp_rtt_ms = _scale(tcp_rtt(stream.socket))
            step = "QUIT"
            # The probe is done: a QUIT unanswered or cut short only costs its RTT sample.
            lost = (ProbeError, OSError, trio.BrokenResourceError)
            with trio.move_on_after(timeout), contextlib.suppress(*lost):
                turnaround = await _exchange(stream, conversation.send("QUIT", b"QUIT\r\n"))
                await _reply(stream, conversation)
                samples.append(turnaround())
            result.smtp_rtt_ms = min(samples) * 1000
    except trio.TooSlowError:
        raise ProbeError(f"{step}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise ProbeError(f"{step}: {exc.strerror or exc}") from None
    except trio.BrokenResourceError as exc:
        raise ProbeError(f"{step}: connection lost ({exc.__cause__ or exc})") from None
    return result


async def _connect(target: Address) -> tuple[trio.SocketStream, float]:
    """Resolve first, then time the connect alone (the handshake: about one RTT)."""
    infos = await trio.socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    errors: list[str] = []
    for family, type_, proto, _, addr in infos:
        sock = trio.socket.socket(family, type_, proto)
        try:
            t0 = time.perf_counter()
            await sock.connect(addr)
            elapsed = (time.perf_counter() - t0) * 1000
        except OSError as exc:
            sock.close()
            errors.append(f"{addr[0]}: {os.strerror(exc.errno) if exc.errno else exc}")
            continue
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock), elapsed
    raise ProbeError("connect: " + ("; ".join(errors) or "no address"))


async def _exchange(stream: trio.SocketStream, line: bytes) -> Callable[[], float]:
    """Send ``line``; return a clock reading the seconds since."""
    await stream.send_all(line)
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


def _scale(seconds: float | None) -> float | None:
    return None if seconds is None or math.isnan(seconds) else seconds * 1000
