"""How a session ended: the ``outcome`` of its log line and of ``pipeconnect_sessions_total``.

One definition, so metrics can be exported at zero from the start (Prometheus' rate() sees
no increase in a series that is born at its first value) and README can be checked against
it. The values are the names operators see; never rename one lightly.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    OPEN = "open"  # not ended yet
    QUIT = "quit"
    CLIENT_CLOSED = "client-closed"
    CLIENT_GONE = "client-gone"
    CLIENT_GONE_IN_DATA = "client-gone-in-data"
    CLIENT_TIMEOUT = "client-timeout"
    SYNC_ERROR = "sync-error"  # early input refused
    SYNC_VIOLATION = "sync-violation"  # input behind a sync point
    PROTOCOL_ERROR = "protocol-error"
    TOO_MANY_ERRORS = "too-many-errors"
    TLS_FAILED = "tls-failed"
    TLS_TIMEOUT = "tls-timeout"
    UPSTREAM_DOWN = "upstream-down"
    UPSTREAM_LOST = "upstream-lost"
    UPSTREAM_TIMEOUT = "upstream-timeout"
    UPSTREAM_PROTOCOL = "upstream-protocol"
    UPSTREAM_421 = "upstream-421"
    UPSTREAM_221 = "upstream-221"
    UPSTREAM_TLS = "upstream-tls"
    UPSTREAM_XCLIENT = "upstream-xclient"
    SHUTDOWN = "shutdown"
    TOO_MANY = "too-many"  # session limits, at accept
    INTERNAL_ERROR = "internal-error"


ENDED = tuple(o for o in Outcome if o is not Outcome.OPEN)

# Outbound mode (proxy/machine/outbound.py): the labels of pipeconnect_outbound_sessions_total
# and pipeconnect_outbound_cache_invalidations_total, and the log line's P=, outcome= and
# invalidated= fields.
OUTBOUND_PATHS = ("relay", "early", "retried", "in-step")
OUTBOUND_OUTCOMES = (
    "quit",  # the MTA said QUIT and the session ended
    "closed",
    "mta-closed",
    "mta-gone",
    "connect-failed",
    "deferred",  # the proxy answered a 4xx in the MX's place
    "mx-closed",
    "mx-timeout",
    "mx-protocol",
    "mx-421",
    "timeout",
    "shutdown",
)
OUTBOUND_INVALIDATIONS = (
    "sync-error",  # the MX refused the early talk (retried in step)
    "closed",  # ... or closed before answering it
    "banner",  # another 4xx/5xx banner
    "ehlo",  # a 4xx/5xx EHLO reply
    "loop",  # the MX greets with the MTA's own name
    "features",  # rewritten: the EHLO reply changed
    "smtputf8",  # the MTA used SMTPUTF8, which the MX does not offer
    "protocol",  # the MX's replies broke SMTP framing
)
