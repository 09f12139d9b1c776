"""The session's record: what happened, for the log line and the metrics.

The machine fills it as the session goes; the driver adds what needs a clock or a socket
(the duration, the client's TCP RTT). ``render`` writes the one line per session that
operators grep, Exim style (``L.`` early pipelining advertised, ``L*`` used), or JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .addresses import Endpoint
from .outcomes import Outcome

# Characters written as \xHH in the text log: in the HELO name (between parentheses) blanks
# and parentheses too, so no HELO can make the line read as if another client had connected;
# in the quoted detail quotes, backslashes and control characters.
_HELO_UNSAFE = re.compile(r'[^\x21-\x7e]|[()"\\]')
_QUOTED_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')


def _log_text(unsafe: re.Pattern[str], text: str) -> str:
    return unsafe.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def quoted(text: str) -> str:
    """``text`` safe between the double quotes of a log field (a peer's words: no quote,
    backslash or control character can end the field or the line)."""
    return _log_text(_QUOTED_UNSAFE, text)


@dataclass
class SessionLog:
    listener: str
    client: Endpoint
    upstream: str
    helo: str = ""
    outcome: Outcome = Outcome.OPEN
    advertised: bool = False
    early_bytes: int = 0
    early_used: bool = False
    replayed: int = 0
    round_trips_saved: int = 0
    client_rtt: float | None = None  # smoothed RTT from TCP_INFO, seconds
    tls: str = ""  # negotiated TLS version towards the client
    upstream_tls: str = ""  # towards the MTA (upstream.tls = "starttls")
    commands: int = 0
    messages: int = 0
    rcpts: int = 0
    bytes_in: int = 0
    detail: str = ""
    elapsed: float = 0.0  # seconds from accept to the end (set by the driver)

    @property
    def time_saved(self) -> float:
        """Seconds early pipelining saved this client: its smoothed RTT per skipped wait."""
        if self.client_rtt is None:
            return 0.0
        return self.client_rtt * self.round_trips_saved

    @property
    def l_field(self) -> str:
        return "L*" if self.early_used else "L." if self.advertised else ""

    def render(self, fmt: str) -> str:
        duration = self.elapsed
        if fmt == "json":
            return json.dumps(
                {
                    "event": "session",
                    "listener": self.listener,
                    "tls": self.tls,
                    "upstream_tls": self.upstream_tls,
                    "client": f"{self.client[0]}:{self.client[1]}",
                    "helo": self.helo,
                    "upstream": self.upstream,
                    "outcome": self.outcome,
                    "L": self.l_field,
                    "advertised": self.advertised,
                    "early_bytes": self.early_bytes,
                    "early_used": self.early_used,
                    "replayed": self.replayed,
                    "round_trips_saved": self.round_trips_saved,
                    "client_rtt": self.client_rtt,
                    "time_saved": round(self.time_saved, 6),
                    "commands": self.commands,
                    "messages": self.messages,
                    "rcpts": self.rcpts,
                    "bytes": self.bytes_in,
                    "duration": round(duration, 3),
                    "detail": self.detail,
                }
            )
        parts = [
            f"H=({_log_text(_HELO_UNSAFE, self.helo)}) [{self.client[0]}]:{self.client[1]}",
            f"I={self.listener}",
            f"X={self.tls}" if self.tls else "",
            f"U={self.upstream}",
            f"UX={self.upstream_tls}" if self.upstream_tls else "",
            self.l_field,
            f"C={self.commands}",
            f"M={self.messages}",
            f"R={self.rcpts}",
            f"S={self.bytes_in}",
            f"E={self.early_bytes}" if self.early_bytes else "",
            f"RT={self.round_trips_saved}" if self.round_trips_saved else "",
            f"TS={self.time_saved * 1000:.3f}ms" if self.round_trips_saved else "",
            f"DT={duration:.3f}s",
            f"outcome={self.outcome}",
            f'detail="{quoted(self.detail)}"' if self.detail else "",
        ]
        return " ".join(p for p in parts if p)
