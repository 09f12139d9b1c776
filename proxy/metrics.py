"""Prometheus collectors. One ``Metrics`` per process (tests make their own registry).

Every family is exported under the ``pipeconnect_`` namespace and follows the Prometheus
naming rules: base units (seconds, bytes), ``_total`` on counters, labels of low
cardinality (listener, outcome, action, TLS version, reason; never a client address).
Sessions update a few counters live; everything else a finished session implies is
added once, by ``record_session``. The HTTP endpoint serving them is ``proxy.httpd``.
"""

from __future__ import annotations

import time
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from .outcomes import (
    ENDED,
    OUTBOUND_INVALIDATIONS,
    OUTBOUND_OUTCOMES,
    OUTBOUND_PATHS,
    Outcome,
)

if TYPE_CHECKING:
    from .machine.outbound import OutboundLog
    from .sessionlog import SessionLog

# `*_created` series double the number of series for little use, and exporters written in
# Go (what operators compare us with) do not have them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Sessions and DATA can last minutes: the default buckets stop at 10 s.
_LONG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_SHORT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

NAMESPACE = "pipeconnect"


def package_version(dist: str = "pipeconnect-proxy") -> str:
    """The installed distribution's version (``--version``, build info, the start-up log).

    A source tree that was never installed has no metadata: its pyproject.toml says."""
    try:
        return version(dist)
    except PackageNotFoundError:
        pass
    try:
        with (Path(__file__).resolve().parent.parent / "pyproject.toml").open("rb") as f:
            project = tomllib.load(f)["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"
    return str(project["version"]) if project.get("name") == dist else "unknown"


VERSION = package_version()

# Session outcomes that mean the TLS handshake with the client failed, and the reason label.
_TLS_FAILURES = {Outcome.TLS_FAILED: "handshake-error", Outcome.TLS_TIMEOUT: "timeout"}


class Metrics:
    """All collectors, registered in one ``CollectorRegistry``.

    ``process=True`` (the default) also registers the standard ``process_*``,
    ``python_info`` and ``python_gc_*`` collectors, as every Python exporter has.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ns = NAMESPACE
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

        self.build_info = Gauge(
            "build_info",
            "pipeconnect-proxy version (always 1)",
            ["version"],
            namespace=ns,
            registry=r,
        )
        self.build_info.labels(VERSION).set(1)

        # --- sessions ---------------------------------------------------------------------
        self.sessions = Counter(
            "sessions",
            "Client sessions ended, by listener and outcome",
            ["listener", "outcome"],
            namespace=ns,
            registry=r,
        )
        self.active = Gauge(
            "active_sessions", "Client sessions in progress", ["listener"], namespace=ns, registry=r
        )
        self.duration = Histogram(
            "session_duration_seconds",
            "Client session duration",
            ["listener"],
            namespace=ns,
            registry=r,
            buckets=_LONG_BUCKETS,
        )

        # --- early pipelining -------------------------------------------------------------
        self.advertised = Counter(
            "early_pipelining_advertised",
            "Sessions whose EHLO reply advertised the early-pipelining keywords",
            namespace=ns,
            registry=r,
        )
        self.used = Counter(
            "early_pipelining_used",
            "Sessions whose commands sent before the banner (or behind the first EHLO) were used",
            namespace=ns,
            registry=r,
        )
        self.early_refused = Counter(
            "early_input_refused",
            "Sessions whose input before the banner was refused (SMTP synchronization error), "
            "by the action taken",
            ["action"],
            namespace=ns,
            registry=r,
        )
        self.session_errors = Counter(
            "session_errors",
            "Sessions ended by an unexpected error in the proxy (a bug: see the log)",
            namespace=ns,
            registry=r,
        )
        self.sync_violations = Counter(
            "sync_violations",
            "Sessions ended with a synchronization error because the client sent more input "
            "before the reply to a command it had to wait for, by that command",
            ["command"],
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
        self.time_saved = Counter(
            "time_saved_seconds",
            "Client time saved by early pipelining: the client's smoothed RTT (TCP_INFO) "
            "times the round trips each session saved",
            namespace=ns,
            registry=r,
        )

        # --- relaying ---------------------------------------------------------------------
        self.messages = Counter(
            "relayed_messages",
            "Messages accepted by the MTA (250 after the data) and relayed",
            namespace=ns,
            registry=r,
        )
        self.message_bytes = Counter(
            "relayed_bytes", "Message bytes relayed to the MTA", namespace=ns, registry=r
        )
        self.recipients = Counter(
            "relayed_recipients",
            "Recipients the MTA accepted (RCPT answered 2xx)",
            namespace=ns,
            registry=r,
        )

        # --- upstream ---------------------------------------------------------------------
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
        self.upstream_up = Gauge(
            "upstream_up",
            "1 if the MTA accepted a TCP connection recently (a session or a health probe), "
            "else 0; evaluated when /metrics or /healthz is requested",
            namespace=ns,
            registry=r,
        )
        self.upstream_probes = Counter(
            "upstream_probes",
            "TCP connect probes of the MTA made by the health check, by result",
            ["result"],
            namespace=ns,
            registry=r,
        )

        # --- TLS towards clients ------------------------------------------------------------
        self.tls_handshakes = Counter(
            "tls_handshakes",
            "Completed TLS handshakes with clients, by protocol version",
            ["version"],
            namespace=ns,
            registry=r,
        )
        self.tls_failures = Counter(
            "tls_handshake_failures",
            "Failed TLS handshakes with clients, by reason",
            ["reason"],
            namespace=ns,
            registry=r,
        )

        # --- configuration ------------------------------------------------------------------
        self.config_reloads = Counter(
            "config_reloads",
            "Configuration reloads attempted (SIGHUP)",
            namespace=ns,
            registry=r,
        )
        self.config_reload_failures = Counter(
            "config_reload_failures",
            "Configuration reloads refused (the previous configuration stays in force)",
            namespace=ns,
            registry=r,
        )
        self.config_last_reload_successful = Gauge(
            "config_last_reload_successful",
            "1 if the last configuration load or reload succeeded, else 0",
            namespace=ns,
            registry=r,
        )
        self.config_last_reload_success = Gauge(
            "config_last_reload_success_timestamp_seconds",
            "Unix time the configuration in force was loaded (start-up or reload)",
            namespace=ns,
            registry=r,
        )
        self.config_last_reload_successful.set(1)
        self.config_last_reload_success.set(time.time())

        # --- accepting ----------------------------------------------------------------------
        self.accept_errors = Counter(
            "accept_errors",
            "accept() failures for lack of resources (EMFILE: out of file descriptors; "
            "ENFILE, ENOMEM, ENOBUFS), retried every 0.1 s, by listener "
            "(plain, tls_on_connect, metrics) and errno",
            ["listener", "errno"],
            namespace=ns,
            registry=r,
        )

        # --- outbound mode (the MTA's own deliveries) ---------------------------------------
        self.outbound_sessions = Counter(
            "outbound_sessions",
            "Outbound sessions ended, by path (relay: cache miss; early: early pipelining "
            "used; retried: the MX refused the early talk and the session went on without; "
            "in-step: a cache hit the MTA did not open with EHLO) and outcome",
            ["path", "outcome"],
            namespace=ns,
            registry=r,
        )
        self.outbound_active = Gauge(
            "outbound_active_sessions", "Outbound sessions in progress", namespace=ns, registry=r
        )
        self.outbound_cache = Counter(
            "outbound_cache_lookups",
            "EHLO cache lookups of outbound sessions, by result (hit, miss, bypass: the "
            "destination is not in outbound.hosts)",
            ["result"],
            namespace=ns,
            registry=r,
        )
        self.outbound_learned = Counter(
            "outbound_cache_learned",
            "EHLO cache entries stored or rewritten from what an MX said",
            namespace=ns,
            registry=r,
        )
        self.outbound_invalidations = Counter(
            "outbound_cache_invalidations",
            "EHLO cache entries dropped or rewritten because the MX did not say what they "
            "held, by reason (" + ", ".join(OUTBOUND_INVALIDATIONS) + ")",
            ["reason"],
            namespace=ns,
            registry=r,
        )
        self.outbound_cache_errors = Counter(
            "outbound_cache_errors",
            "EHLO cache file operations that failed (the session relayed without the cache)",
            namespace=ns,
            registry=r,
        )
        self.outbound_recoveries = Counter(
            "outbound_recoveries",
            "Outbound sessions that retried without early pipelining after the MX refused it",
            namespace=ns,
            registry=r,
        )
        self.outbound_deferred = Counter(
            "outbound_deferred",
            "Outbound sessions in which the proxy answered a 4xx in the MX's place",
            namespace=ns,
            registry=r,
        )
        self.outbound_round_trips_saved = Counter(
            "outbound_round_trips_saved",
            "Round trips to the MX that early pipelining saved the MTA",
            namespace=ns,
            registry=r,
        )
        self.outbound_time_saved = Counter(
            "outbound_time_saved_seconds",
            "Seconds early pipelining saved the MTA (the MX path's RTT from TCP_INFO per "
            "round trip saved)",
            namespace=ns,
            registry=r,
        )
        self.outbound_refused = Counter(
            "outbound_refused",
            "Connections to an outbound listener refused, by reason (not-intercepted: no "
            "original destination; loop: the proxy's own connection came back)",
            ["reason"],
            namespace=ns,
            registry=r,
        )

        # Known label values start at 0, so that rate() and increase() see the first event.
        for action in ("defer", "reject"):
            self.early_refused.labels(action)
        for reason in _TLS_FAILURES.values():
            self.tls_failures.labels(reason)
        for result in ("success", "failure"):
            self.upstream_probes.labels(result)

    def expose_listener(self, listener: str) -> None:
        """Export a listener's session series at 0 before any session ends, so Prometheus
        sees the first ones as an increase (rate() sees no step from "no series")."""
        self.active.labels(listener)
        for outcome in ENDED:
            self.sessions.labels(listener, outcome)
        self.duration.labels(listener)

    def record_session(self, log: SessionLog) -> None:
        """Everything a finished session adds, in one place (called once per session)."""
        self.sessions.labels(log.listener, log.outcome).inc()
        self.duration.labels(log.listener).observe(log.elapsed)
        if log.rcpts:
            self.recipients.inc(log.rcpts)
        if log.tls:
            self.tls_handshakes.labels(log.tls).inc()
        reason = _TLS_FAILURES.get(log.outcome)
        if reason is not None:
            self.tls_failures.labels(reason).inc()
        if log.early_used:
            self.used.inc()
            self.replayed.inc(log.replayed)
            self.round_trips_saved.inc(log.round_trips_saved)
            self.time_saved.inc(log.time_saved)

    def expose_outbound(self) -> None:
        """Outbound series at 0 from the start (see ``expose_listener``)."""
        for path in OUTBOUND_PATHS:
            for outcome in OUTBOUND_OUTCOMES:
                self.outbound_sessions.labels(path, outcome)
        for result in ("hit", "miss", "bypass"):
            self.outbound_cache.labels(result)
        for reason in OUTBOUND_INVALIDATIONS:
            self.outbound_invalidations.labels(reason)
        for reason in ("not-intercepted", "loop"):
            self.outbound_refused.labels(reason)

    def record_outbound(self, log: OutboundLog, time_saved: float) -> None:
        """Everything a finished outbound session adds (called once per session)."""
        self.outbound_sessions.labels(log.path, log.outcome).inc()
        self.outbound_cache.labels(log.cache).inc()
        if log.learned:
            self.outbound_learned.inc()
        if log.invalidated:
            self.outbound_invalidations.labels(log.invalidated).inc()
        if log.path == "retried":
            self.outbound_recoveries.inc()
        if log.failure:
            self.outbound_deferred.inc()
        if log.early_used:
            self.outbound_round_trips_saved.inc(log.round_trips_saved)
            self.outbound_time_saved.inc(time_saved)

    def record_reload(self, ok: bool) -> None:
        """One configuration reload attempt (for the reload code in ``server``)."""
        self.config_reloads.inc()
        if ok:
            self.config_last_reload_successful.set(1)
            self.config_last_reload_success.set(time.time())
        else:
            self.config_reload_failures.inc()
            self.config_last_reload_successful.set(0)
