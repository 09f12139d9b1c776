"""The metrics and health endpoint: a small HTTP/1.1 server as a trio task.

Not prometheus_client's ``start_http_server`` (a thread per process, unbounded): this one
runs in the proxy's own nursery, answers one request per connection, and bounds everything
a scraper or a stray client can make it hold: the request head (``max_request`` bytes, to
arrive within ``head_timeout``), the time to build and send the answer (``timeout``), and
the connections held at once (``max_connections``). It never stops accepting, so that
clients which connect and stay silent (or trickle) cannot starve the health checks: a new
connection beyond the limit closes the oldest one still sending its request head (the
oldest of all if every one is being answered).

- ``/metrics``: the registry in the format the ``Accept`` header asks for (Prometheus
  text 0.0.4 by default, OpenMetrics on request), gzip if the client accepts it.
- ``/healthz``: 200 when the SMTP listeners are up and the MTA accepted a TCP connection
  recently, else 503; a one-line text body says why.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass

import trio
from prometheus_client.exposition import choose_encoder

from .addresses import Endpoint
from .config import Address
from .listen import AcceptErrors, open_listeners, serve_listeners
from .metrics import Metrics

log = logging.getLogger("pipeconnect.httpd")

MAX_REQUEST = 8192  # request line and headers; a scrape sends a few hundred bytes
HEAD_TIMEOUT = 3.0  # from connect to the end of the request head
TIMEOUT = 10.0  # then to build and send the answer (a health probe, a large scrape)
MAX_CONNECTIONS = 128
HEALTH_FRESH = 10.0  # an upstream connect younger than this counts as "recently"
PROBE_TIMEOUT = 2.0

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
_TEXT = "text/plain; charset=utf-8"


class Health:
    """Readiness: the listeners are up and the MTA accepted a TCP connection recently.

    Evidence comes first from the sessions themselves (every successful upstream connect
    is counted in ``upstream_connect_seconds``); only when none happened within ``fresh``
    seconds does a check open one bare TCP connection to the MTA (and close it at once).
    So an idle proxy probes at most once per ``fresh`` seconds of health checks and
    scrapes, a busy one never. The MTA may log such a probe as a lost connection.
    """

    def __init__(
        self,
        metrics: Metrics,
        upstream: Endpoint,
        *,
        fresh: float = HEALTH_FRESH,
        probe_timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self.metrics = metrics
        self.upstream = upstream
        self.fresh = fresh
        self.probe_timeout = probe_timeout
        self.listening = False
        self.last_error = "not checked yet"
        self._last_ok: float | None = None
        self._connects_seen = 0.0
        self._lock = trio.Lock()

    def _session_connects(self) -> float:
        for family in self.metrics.upstream_connect.collect():
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    return sample.value
        return 0.0  # pragma: no cover

    def _recent(self) -> bool:
        now = trio.current_time()
        count = self._session_connects()
        if count != self._connects_seen:
            self._connects_seen = count
            self._last_ok = now
        return self._last_ok is not None and now - self._last_ok <= self.fresh

    async def upstream_ok(self) -> bool:
        """Whether the MTA accepted a connection recently (probing it if need be); sets
        ``pipeconnect_upstream_up``."""
        ok = self._recent()
        if not ok:
            async with self._lock:  # one probe at a time; the others take its result
                ok = self._recent() or await self._probe()
        self.metrics.upstream_up.set(1 if ok else 0)
        return ok

    async def _probe(self) -> bool:
        host, port = self.upstream
        try:
            with trio.fail_after(self.probe_timeout):
                stream = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            return self._probe_failed(f"connect timed out after {self.probe_timeout:g}s")
        except OSError as exc:
            return self._probe_failed(f"connect failed: {exc.strerror or exc}")
        await stream.aclose()
        self._last_ok = trio.current_time()
        self.last_error = ""
        self.metrics.upstream_probes.labels("success").inc()
        return True

    def _probe_failed(self, error: str) -> bool:
        self.last_error = error
        self.metrics.upstream_probes.labels("failure").inc()
        return False

    async def status(self) -> tuple[bool, str]:
        """(healthy, one line saying why)."""
        host, port = self.upstream
        if not self.listening:
            return False, "unavailable: the SMTP listeners are not up"
        if not await self.upstream_ok():
            return False, f"unavailable: upstream {host}:{port}: {self.last_error}"
        assert self._last_ok is not None
        age = trio.current_time() - self._last_ok
        return True, f"ok: upstream {host}:{port} accepted a connection {age:.1f}s ago"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = _TEXT
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(cls, status: int, text: str, *headers: tuple[str, str]) -> Response:
        return cls(status, text.encode() + b"\n", _TEXT, headers)

    def to_bytes(self, head_only: bool) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Unknown')}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + self.body


class _BadRequest(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.response = Response.text(status, text)


def parse_request(head: bytes) -> Request:
    """Parse a request head (without the blank line that ends it)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, "bad request line")
    method, target, _ = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(400, "bad header line")
        name = name.lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return Request(method, target.split("?", 1)[0], headers)


class MetricsServer:
    def __init__(
        self,
        metrics: Metrics,
        health: Health,
        *,
        max_request: int = MAX_REQUEST,
        head_timeout: float = HEAD_TIMEOUT,
        timeout: float = TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.metrics = metrics
        self.health = health
        self.max_request = max_request
        self.head_timeout = head_timeout
        self.timeout = timeout
        self.max_connections = max_connections
        # Open connections, oldest first: their cancel scope -> whether the head is in.
        self._open: dict[trio.CancelScope, bool] = {}

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        errors = AcceptErrors(self.metrics.accept_errors, "metrics")
        await serve_listeners(self._connection, listeners, errors, task_status=task_status)

    def _make_room(self) -> None:
        while len(self._open) >= self.max_connections:
            waiting = (scope for scope, head_in in self._open.items() if not head_in)
            oldest = next(waiting, next(iter(self._open)))
            del self._open[oldest]
            oldest.cancel()

    async def _connection(self, stream: trio.SocketStream) -> None:
        self._make_room()
        scope = trio.CancelScope(deadline=trio.current_time() + self.head_timeout)
        self._open[scope] = False
        try:
            with scope:
                got = await self._read_head(stream)
                if got is None:
                    return
                self._open[scope] = True
                scope.deadline = trio.current_time() + self.timeout
                if isinstance(got, Response):
                    await stream.send_all(got.to_bytes(False))
                else:
                    response = await self.respond(got)
                    await stream.send_all(response.to_bytes(head_only=got.method == "HEAD"))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._open.pop(scope, None)

    async def _read_head(self, stream: trio.SocketStream) -> Request | Response | None:
        """The request, a response refusing it, or None if the client left first."""
        buf = bytearray()
        searched = 0
        while (end := buf.find(b"\r\n\r\n", max(searched - 3, 0))) < 0:
            if len(buf) > self.max_request:
                return Response.text(431, "request head too large")
            searched = len(buf)
            data = await stream.receive_some(4096)
            if not data:
                return None
            buf += data
        if end > self.max_request:
            return Response.text(431, "request head too large")
        try:
            return parse_request(bytes(buf[:end]))
        except _BadRequest as exc:
            return exc.response

    async def respond(self, request: Request) -> Response:
        if request.path not in ("/metrics", "/healthz", "/"):
            return Response.text(404, "not found: try /metrics or /healthz")
        if request.method not in ("GET", "HEAD"):
            return Response.text(405, "method not allowed", ("Allow", "GET, HEAD"))
        if request.path == "/healthz":
            healthy, text = await self.health.status()
            return Response.text(200 if healthy else 503, text)
        if request.path == "/":
            return Response.text(200, "pipeconnect-proxy: /metrics, /healthz")
        await self.health.upstream_ok()  # refreshes pipeconnect_upstream_up
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        body = encoder(self.metrics.registry)
        encodings = request.headers.get("accept-encoding", "")
        if "gzip" in (e.split(";")[0].strip().lower() for e in encodings.split(",")):
            return Response(
                200, gzip.compress(body, 6), content_type, (("Content-Encoding", "gzip"),)
            )
        return Response(200, body, content_type)


async def serve_http(
    address: tuple[str, int],
    metrics: Metrics,
    health: Health,
    *,
    max_request: int = MAX_REQUEST,
    head_timeout: float = HEAD_TIMEOUT,
    timeout: float = TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    task_status: trio.TaskStatus[Endpoint | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` and ``/healthz`` on ``address`` until cancelled.

    ``task_status`` receives the bound address, or ``None`` when the address cannot be
    bound: that is logged as an error and the proxy goes on relaying mail without its
    endpoint (the scrape target then shows as down, which the ``up`` alert catches) --
    monitoring must never take the mail down."""
    try:
        listeners = await open_listeners(Address(*address))
    except OSError as exc:
        log.error(
            "metrics endpoint: cannot listen on %s:%d (%s); running without it", *address, exc
        )
        task_status.started(None)
        return
    sockname = listeners[0].socket.getsockname()
    bound: Endpoint = (sockname[0], sockname[1])
    server = MetricsServer(
        metrics,
        health,
        max_request=max_request,
        head_timeout=head_timeout,
        timeout=timeout,
        max_connections=max_connections,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, listeners)
        log.info("metrics on http://%s:%d/metrics and /healthz", *bound)
        task_status.started(bound)
