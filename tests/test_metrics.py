"""Metrics and the /metrics, /healthz endpoint: scripted sessions through a real proxy (in
process, against the fake MTA), then a real HTTP scrape, and exact values."""

from __future__ import annotations

import contextlib
import gzip
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from prometheus_client.parser import text_string_to_metric_families

from proxy.client import EarlyPipeliningClient, dot_stuff
from proxy.config import parse_config
from proxy.httpd import MAX_CONNECTIONS, Health, serve_http
from proxy.metrics import VERSION, Metrics
from proxy.server import Bound, serve
from proxy.session import SessionLog
from proxy.smtp import ReplyReader
from proxy.tls import OpenSSLStream, client_context

from .fakemta import FakeMTA

BODY = b"Subject: metrics\r\n\r\nhello\r\n.leading dot\r\n"
OTHER_HOST = "127.0.0.2"  # outside advertise_hosts; loopback answers on all of 127/8


# ------------------------------------------------------------------ helpers


def make_config(mta_port: int, **sections: dict[str, Any]) -> Any:
    data: dict[str, Any] = {
        "listen": {"plain": ["127.0.0.1:0"]},
        "upstream": {"address": f"127.0.0.1:{mta_port}", "client_identity": "proxy-v2"},
        "pipe_connect": {"advertise_hosts": [f"!{OTHER_HOST}", "*"]},
        "metrics": {"listen": "127.0.0.1:0"},
        "timeouts": {"early_drain": 0.2},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data)


@asynccontextmanager
async def running_proxy(
    mta: FakeMTA | None = None, upstream_port: int | None = None, **sections: dict[str, Any]
) -> AsyncIterator[tuple[Bound, Metrics]]:
    """The proxy with its metrics endpoint, in front of ``mta`` (or of ``upstream_port``)."""
    async with trio.open_nursery() as nursery:
        if mta is not None:
            upstream_port = await nursery.start(mta.serve)
        assert upstream_port is not None
        metrics = Metrics()
        bound: Bound = await nursery.start(serve, make_config(upstream_port, **sections), metrics)
        try:
            yield bound, metrics
        finally:
            nursery.cancel_scope.cancel()


@dataclass
class HTTPResponse:
    status: int
    headers: dict[str, str]
    body: bytes


async def http(
    endpoint: tuple[str, int],
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> HTTPResponse:
    request = f"{method} {path} HTTP/1.1\r\nHost: {endpoint[0]}:{endpoint[1]}\r\n"
    request += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()) + "\r\n"
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*endpoint)
        async with stream:
            await stream.send_all(request.encode())
            raw = bytearray()
            while data := await stream.receive_some(65536):
                raw += data
    return parse_response(bytes(raw))


def parse_response(raw: bytes) -> HTTPResponse:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert int(headers["content-length"]) == len(body) or not body
    return HTTPResponse(int(status_line.split(" ")[1]), headers, body)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_scrape(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def scrape(endpoint: tuple[str, int]) -> Samples:
    response = await http(endpoint, "/metrics")
    assert response.status == 200
    return parse_scrape(response.body.decode())


async def wait_for_sessions(endpoint: tuple[str, int], n: int) -> Samples:
    """Scrape until ``n`` sessions have ended (a session records itself after closing)."""
    with trio.fail_after(10):
        while True:
            samples = await scrape(endpoint)
            ended = sum(
                v for (name, _), v in samples.items() if name == "pipeconnect_sessions_total"
            )
            if ended >= n:
                return samples
            await trio.sleep(0.02)


async def read_reply(stream: trio.abc.Stream, reader: ReplyReader) -> Any:
    with trio.fail_after(5):
        while (reply := reader.next_reply()) is None:
            data = await stream.receive_some(65536)
            if not data:
                return None
            reader.feed(data)
        return reply


async def classic_session(proxy: tuple[str, int], local: str) -> list[bytes]:
    """A client that waits for every reply (no pipelining), from address ``local``."""
    stream = await trio.open_tcp_stream(*proxy, local_address=local)
    reader = ReplyReader()
    lines = []
    async with stream:
        banner = await read_reply(stream, reader)
        assert banner.code == 220
        for command, code in (
            (b"EHLO classic.test\r\n", 250),
            (b"MAIL FROM:<c@src.test>\r\n", 250),
            (b"RCPT TO:<d@dest.test>\r\n", 250),
            (b"DATA\r\n", 354),
            (dot_stuff(BODY), 250),
            (b"QUIT\r\n", 221),
        ):
            await stream.send_all(command)
            reply = await read_reply(stream, reader)
            assert reply is not None and reply.code == code, (command, reply)
            if command.startswith(b"EHLO"):
                lines = [ln.split(b" ")[0] for ln in reply.lines[1:]]
    return lines


async def early_talker(proxy: tuple[str, int], local: str) -> bytes:
    """Sends its commands right after the connect, from a host not advertised to."""
    stream = await trio.open_tcp_stream(*proxy, local_address=local)
    async with stream:
        await stream.send_all(b"EHLO early.test\r\nMAIL FROM:<e@src.test>\r\n")
        received = bytearray()
        with trio.fail_after(5):
            while data := await stream.receive_some(4096):
                received += data
    return bytes(received)


@dataclass
class Script:
    samples: Samples
    text: str
    content_type: str


async def run_script() -> Script:
    """The scripted sessions: learn, use, a classic client and a refused early talker
    (both from a host outside advertise_hosts), then one real scrape."""
    mta = FakeMTA(pipelining=True, banner_delay=0.2)
    async with running_proxy(mta) as (bound, _):
        assert bound.metrics is not None
        client = EarlyPipeliningClient()
        rcpts = ["b@dest.test", "c@dest.test"]
        learn = await client.send(bound[0], "a@src.test", rcpts, BODY)
        use = await client.send(bound[0], "a@src.test", rcpts, BODY)
        assert (learn.early, use.early) == (False, True)
        keywords = await classic_session(bound[0], OTHER_HOST)
        assert b"PIPECONNECT" not in keywords and b"X_PIPE_CONNECT" not in keywords
        refused = await early_talker(bound[0], OTHER_HOST)
        assert refused.startswith(b"421 4.5.0 SMTP synchronization error")
        await wait_for_sessions(bound.metrics, 4)
        response = await http(bound.metrics, "/metrics")
    assert mta.violations == []
    assert len(mta.messages) == 3
    return Script(
        parse_scrape(response.body.decode()),
        response.body.decode(),
        response.headers["content-type"],
    )


# ------------------------------------------------------------------ scripted sessions


async def test_scripted_sessions_give_exact_values() -> None:
    script = await run_script()
    s = script.samples
    assert script.content_type == "text/plain; version=0.0.4; charset=utf-8"
    # learn + use + classic ended with QUIT; the early talker got a sync error
    assert value(s, "pipeconnect_sessions_total", listener="plain", outcome="quit") == 3
    assert value(s, "pipeconnect_sessions_total", listener="plain", outcome="sync-error") == 1
    assert value(s, "pipeconnect_session_duration_seconds_count", listener="plain") == 4
    assert value(s, "pipeconnect_active_sessions", listener="plain") == 0
    # the keyword went to the two sessions from the allowed host; the second used it
    assert value(s, "pipeconnect_early_pipelining_advertised_total") == 2
    assert value(s, "pipeconnect_early_pipelining_used_total") == 1
    assert value(s, "pipeconnect_early_input_refused_total", action="defer") == 1
    assert value(s, "pipeconnect_early_input_refused_total", action="reject") == 0
    # EHLO, MAIL, RCPT, RCPT, DATA held and replayed; banner + EHLO reply waits saved
    assert value(s, "pipeconnect_replayed_commands_total") == 5
    assert value(s, "pipeconnect_round_trips_saved_total") == 2
    # two round trips at loopback RTT (tens of microseconds; the kernel's floor is ~5 us)
    saved = value(s, "pipeconnect_time_saved_seconds_total")
    assert 0 < saved < 0.02
    # three messages, 2 + 2 + 1 recipients, data bytes as sent (dot-stuffed, without .CRLF)
    assert value(s, "pipeconnect_relayed_messages_total") == 3
    assert value(s, "pipeconnect_relayed_recipients_total") == 5
    assert value(s, "pipeconnect_relayed_bytes_total") == 3 * (len(dot_stuff(BODY)) - 3)
    # every session but the refused one waited for the MTA's banner
    assert value(s, "pipeconnect_upstream_banner_seconds_count") == 3
    assert 3 <= value(s, "pipeconnect_upstream_connect_seconds_count") <= 4
    # the sessions' own connects prove the MTA is up: no probe was needed
    assert value(s, "pipeconnect_upstream_up") == 1
    assert value(s, "pipeconnect_upstream_probes_total", result="success") == 0
    assert value(s, "pipeconnect_upstream_probes_total", result="failure") == 0
    assert value(s, "pipeconnect_tls_handshake_failures_total", reason="timeout") == 0
    assert value(s, "pipeconnect_config_reloads_total") == 0
    assert value(s, "pipeconnect_config_last_reload_successful") == 1
    assert value(s, "pipeconnect_build_info", version=VERSION) == 1


# ------------------------------------------------------------------ record_session


def session_log(**fields: Any) -> SessionLog:
    log = SessionLog("plain", ("192.0.2.7", 41522), "127.0.0.1:2525")
    for name, val in fields.items():
        setattr(log, name, val)
    return log


def test_seconds_saved_is_client_rtt_times_round_trips() -> None:
    m = Metrics(process=False)
    m.record_session(
        session_log(
            outcome="quit", early_used=True, replayed=4, round_trips_saved=2, client_rtt=0.05
        )
    )
    m.record_session(
        session_log(
            outcome="quit", early_used=True, replayed=3, round_trips_saved=1, client_rtt=0.2
        )
    )
    # no RTT known (not Linux, or the socket was gone): round trips count, seconds do not
    m.record_session(session_log(outcome="quit", early_used=True, round_trips_saved=2))
    # not used: nothing saved, whatever the RTT
    m.record_session(session_log(outcome="quit", client_rtt=0.3, advertised=True))
    get = m.registry.get_sample_value
    assert get("pipeconnect_time_saved_seconds_total") == pytest.approx(0.05 * 2 + 0.2 * 1)
    assert get("pipeconnect_round_trips_saved_total") == 5
    assert get("pipeconnect_replayed_commands_total") == 7
    assert get("pipeconnect_early_pipelining_used_total") == 3
    assert get("pipeconnect_sessions_total", {"listener": "plain", "outcome": "quit"}) == 4


def test_tls_versions_and_failures_from_the_session_log() -> None:
    m = Metrics(process=False)
    m.record_session(session_log(outcome="quit", tls="TLSv1.3"))
    m.record_session(session_log(outcome="quit", tls="TLSv1.3"))
    m.record_session(session_log(outcome="client-closed", tls="TLSv1.2"))
    m.record_session(session_log(outcome="tls-failed"))
    m.record_session(session_log(outcome="tls-timeout"))
    get = m.registry.get_sample_value
    assert get("pipeconnect_tls_handshakes_total", {"version": "TLSv1.3"}) == 2
    assert get("pipeconnect_tls_handshakes_total", {"version": "TLSv1.2"}) == 1
    assert get("pipeconnect_tls_handshake_failures_total", {"reason": "handshake-error"}) == 1
    assert get("pipeconnect_tls_handshake_failures_total", {"reason": "timeout"}) == 1


def test_config_reloads_counted() -> None:
    m = Metrics(process=False)
    get = m.registry.get_sample_value
    loaded = get("pipeconnect_config_last_reload_success_timestamp_seconds")
    assert loaded is not None and loaded > 0
    m.record_reload(False)
    assert get("pipeconnect_config_reloads_total") == 1
    assert get("pipeconnect_config_reload_failures_total") == 1
    assert get("pipeconnect_config_last_reload_successful") == 0
    assert get("pipeconnect_config_last_reload_success_timestamp_seconds") == loaded
    m.record_reload(True)
    assert get("pipeconnect_config_reloads_total") == 2
    assert get("pipeconnect_config_reload_failures_total") == 1
    assert get("pipeconnect_config_last_reload_successful") == 1
    reloaded = get("pipeconnect_config_last_reload_success_timestamp_seconds")
    assert reloaded is not None and reloaded >= loaded


def test_each_metrics_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.messages.inc()
    assert a.registry.get_sample_value("pipeconnect_relayed_messages_total") == 1
    assert b.registry.get_sample_value("pipeconnect_relayed_messages_total") == 0


# ------------------------------------------------------------------ /healthz


async def test_healthz_ok_after_a_probe_when_idle() -> None:
    mta = FakeMTA()
    async with running_proxy(mta) as (bound, _):
        assert bound.metrics is not None
        first = await http(bound.metrics, "/healthz")
        assert first.status == 200, first.body
        assert first.body.startswith(b"ok: upstream 127.0.0.1:")
        assert first.headers["content-type"] == "text/plain; charset=utf-8"
        second = await http(bound.metrics, "/healthz")  # fresh: no second probe
        assert second.status == 200
        s = await scrape(bound.metrics)
        assert value(s, "pipeconnect_upstream_probes_total", result="success") == 1
        assert value(s, "pipeconnect_upstream_up") == 1
    assert mta.connections == 1  # one bare probe connection, nothing else


async def test_healthz_503_when_the_upstream_is_down() -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    async with running_proxy(upstream_port=dead_port) as (bound, _):
        assert bound.metrics is not None
        response = await http(bound.metrics, "/healthz")
        assert response.status == 503
        assert response.body.startswith(f"unavailable: upstream 127.0.0.1:{dead_port}:".encode())
        assert b"connect failed" in response.body
        # a client session fails the same way and is counted by its outcome
        stream = await trio.open_tcp_stream(*bound[0])
        async with stream:
            reply = await read_reply(stream, ReplyReader())
            assert reply.code == 421
        s = await wait_for_sessions(bound.metrics, 1)
        assert (
            value(s, "pipeconnect_sessions_total", listener="plain", outcome="upstream-down") == 1
        )
        assert value(s, "pipeconnect_upstream_up") == 0
        assert value(s, "pipeconnect_upstream_probes_total", result="failure") >= 2
        assert value(s, "pipeconnect_upstream_probes_total", result="success") == 0


async def test_health_uses_recent_sessions_and_expires() -> None:
    """A session's successful upstream connect counts as evidence for ``fresh`` seconds;
    after that the check probes (and here fails: nothing listens)."""
    metrics = Metrics(process=False)
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        dead = ("127.0.0.1", sock.getsockname()[1])
    health = Health(metrics, dead, fresh=0.2)
    assert await health.status() == (False, "unavailable: the SMTP listeners are not up")
    health.listening = True
    assert (await health.status())[0] is False
    metrics.upstream_connect.observe(0.001)  # a session connected
    ok, text = await health.status()
    assert ok, text
    assert metrics.registry.get_sample_value("pipeconnect_upstream_up") == 1
    await trio.sleep(0.3)
    ok, text = await health.status()
    assert not ok and "connect failed" in text
    assert metrics.registry.get_sample_value("pipeconnect_upstream_up") == 0


# ------------------------------------------------------------------ the HTTP endpoint


@asynccontextmanager
async def endpoint(**limits: Any) -> AsyncIterator[tuple[tuple[str, int], Metrics]]:
    metrics = Metrics(process=False)
    health = Health(metrics, ("127.0.0.1", 9))
    health.listening = True
    metrics.upstream_connect.observe(0.001)  # the upstream counts as up: no probes
    async with trio.open_nursery() as nursery:

        async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            await serve_http(("127.0.0.1", 0), metrics, health, task_status=task_status, **limits)

        bound = await nursery.start(run)
        try:
            yield bound, metrics
        finally:
            nursery.cancel_scope.cancel()


async def test_openmetrics_and_gzip_on_request() -> None:
    async with endpoint() as (ep, metrics):
        metrics.messages.inc(3)
        om = await http(ep, "/metrics", headers={"Accept": "application/openmetrics-text"})
        assert om.status == 200
        assert om.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
        assert om.body.endswith(b"# EOF\n")
        assert b"pipeconnect_relayed_messages_total 3.0\n" in om.body
        gz = await http(ep, "/metrics", headers={"Accept-Encoding": "gzip, deflate"})
        assert gz.headers["content-encoding"] == "gzip"
        plain = await http(ep, "/metrics")
        assert gzip.decompress(gz.body) == plain.body
        assert "content-encoding" not in plain.headers


async def test_http_errors_and_head() -> None:
    async with endpoint() as (ep, _):
        assert (await http(ep, "/nope")).status == 404
        post = await http(ep, "/metrics", method="POST")
        assert post.status == 405 and post.headers["allow"] == "GET, HEAD"
        head = await http(ep, "/metrics", method="HEAD")
        assert head.status == 200 and head.body == b""
        assert int(head.headers["content-length"]) > 1000
        assert (await http(ep, "/healthz?verbose=1")).status == 200
        assert (await http(ep, "/")).status == 200
        raw = await raw_exchange(ep, b"BREW /pot\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 400 ")
        raw = await raw_exchange(ep, b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 400 ")


async def raw_exchange(ep: tuple[str, int], data: bytes) -> bytes:
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(*ep)
        async with stream:
            await stream.send_all(data)
            out = bytearray()
            try:
                while chunk := await stream.receive_some(65536):
                    out += chunk
            except trio.BrokenResourceError:  # reset: we sent more than it read
                pass
    return bytes(out)


async def test_request_head_is_bounded() -> None:
    async with endpoint(max_request=1024) as (ep, _):
        huge = b"GET /metrics HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 4000 + b"\r\n\r\n"
        assert (await raw_exchange(ep, huge)).startswith(b"HTTP/1.1 431 ")
        endless = b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 300  # never ends
        assert (await raw_exchange(ep, endless)).startswith(b"HTTP/1.1 431 ")


async def test_silent_client_is_dropped_after_the_head_timeout() -> None:
    async with endpoint(head_timeout=0.3) as (ep, _):
        stream = await trio.open_tcp_stream(*ep)
        async with stream:
            start = trio.current_time()
            with trio.fail_after(3):
                assert await stream.receive_some(100) == b""
            assert trio.current_time() - start >= 0.3


async def test_the_answer_has_its_own_deadline() -> None:
    """A request whose answer takes longer than the head deadline is still answered:
    the head deadline ends when the head is in."""
    async with endpoint(head_timeout=0.2, timeout=5) as (ep, _):
        stream = await trio.open_tcp_stream(*ep)
        async with stream:
            with trio.fail_after(3):
                await stream.send_all(b"GET /healthz HTTP/1.1\r\n")
                await trio.sleep(0.1)  # the client's pace, not a synchronisation
                await stream.send_all(b"\r\n")
                out = bytearray()
                while chunk := await stream.receive_some(65536):
                    out += chunk
        assert out.startswith(b"HTTP/1.1 200 ")


async def trickle(stream: trio.SocketStream, data: bytes) -> None:
    """One byte every 0.5 s, as a slow-loris client does, until the server closes."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        for byte in data:
            await stream.send_all(bytes([byte]))
            await trio.sleep(0.5)


async def test_idle_connections_do_not_starve_the_probe() -> None:
    """Twice the connection limit of silent clients, and some trickling ones: /healthz and
    /metrics still answer at once (the oldest connection without a head makes room)."""
    async with (
        endpoint() as (ep, _),
        contextlib.AsyncExitStack() as clients,
        trio.open_nursery() as nursery,
    ):

        async def connect() -> trio.SocketStream:
            return await clients.enter_async_context(await trio.open_tcp_stream(*ep))

        idle = [await connect() for _ in range(2 * MAX_CONNECTIONS)]
        for _ in range(10):
            nursery.start_soon(trickle, await connect(), b"GET /metrics HTTP/1.1\r\n" * 10)
        with trio.fail_after(1):
            assert (await http(ep, "/healthz")).status == 200
            assert (await http(ep, "/metrics")).status == 200
        # each connection beyond the limit closed the oldest: the first ones see EOF
        with trio.fail_after(3):
            for stream in idle[:MAX_CONNECTIONS]:
                assert await stream.receive_some(100) == b""
        nursery.cancel_scope.cancel()


async def test_a_connection_beyond_the_limit_closes_the_oldest_without_a_head() -> None:
    async with endpoint(max_connections=2) as (ep, _):
        oldest = await trio.open_tcp_stream(*ep)
        younger = await trio.open_tcp_stream(*ep)
        async with oldest, younger:
            with trio.fail_after(3):
                assert (await http(ep, "/healthz")).status == 200
                assert await oldest.receive_some(100) == b""
            with trio.move_on_after(0.2):  # still open: it was not the oldest
                await younger.receive_some(100)
                pytest.fail("the younger idle connection was closed too")


# ------------------------------------------------------------------ configuration


async def test_metrics_endpoint_disabled() -> None:
    async with running_proxy(FakeMTA(), metrics={"listen": ""}) as (bound, _):
        assert bound.metrics is None
        assert len(bound) == 1 and bound[0][0] == "127.0.0.1"


async def test_metrics_port_taken_logs_and_keeps_relaying(caplog: pytest.LogCaptureFixture) -> None:
    taken = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with taken:
        port = taken.socket.getsockname()[1]
        mta = FakeMTA()
        with caplog.at_level(logging.ERROR, logger="pipeconnect.httpd"):
            async with running_proxy(mta, metrics={"listen": f"127.0.0.1:{port}"}) as (bound, _):
                assert bound.metrics is None
                await EarlyPipeliningClient().send(bound[0], "a@src.test", ["b@dest.test"], BODY)
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text
    assert len(mta.messages) == 1


# ------------------------------------------------------------------ TLS


async def test_tls_sessions_scraped(tmp_path: Path) -> None:
    """A TLS-on-connect session, a STARTTLS session and a client that is not speaking TLS
    on the TLS port: handshakes by version, failures by reason, sessions by listener."""
    ca = trustme.CA()
    cert = ca.issue_cert("mx.test", "127.0.0.1")
    cert_path, key_path, ca_path = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    tls = {"certificate": str(cert_path), "key": str(key_path)}
    listen = {"tls_on_connect": ["127.0.0.1:0"]}
    async with running_proxy(FakeMTA(), tls=tls, listen=listen) as (bound, _):
        assert bound.metrics is not None
        implicit = bound.tls_on_connect[0]

        async def tls_stream(stream: trio.SocketStream) -> OpenSSLStream:
            s = OpenSSLStream(stream, client_context(str(ca_path)), server_hostname="mx.test")
            await s.do_handshake()
            return s

        # TLS on connect: handshake, banner, EHLO, QUIT
        s = await tls_stream(await trio.open_tcp_stream(*implicit))
        async with s:
            reader = ReplyReader()
            assert (await read_reply(s, reader)).code == 220
            await s.send_all(b"EHLO tls.test\r\n")
            assert (await read_reply(s, reader)).code == 250
            await s.send_all(b"QUIT\r\n")
            assert (await read_reply(s, reader)).code == 221
        # STARTTLS on the plain listener
        plain = await trio.open_tcp_stream(*bound[0])
        reader = ReplyReader()
        assert (await read_reply(plain, reader)).code == 220
        await plain.send_all(b"EHLO tls.test\r\n")
        assert (await read_reply(plain, reader)).code == 250
        await plain.send_all(b"STARTTLS\r\n")
        assert (await read_reply(plain, reader)).code == 220
        s = await tls_stream(plain)
        async with s:
            reader = ReplyReader()
            await s.send_all(b"EHLO tls.test\r\nQUIT\r\n")
            assert (await read_reply(s, reader)).code == 250
            assert (await read_reply(s, reader)).code == 221
        # cleartext SMTP on the TLS port: the handshake fails
        raw = await trio.open_tcp_stream(*implicit)
        async with raw:
            await raw.send_all(b"EHLO not-tls.test\r\n" * 10)
            with trio.fail_after(5):
                try:
                    while await raw.receive_some(4096):
                        pass
                except trio.BrokenResourceError:
                    pass
        s = await wait_for_sessions(bound.metrics, 3)
    version = {"TLSv1.3", "TLSv1.2"}
    handshakes = {
        dict(labels)["version"]: v
        for (name, labels), v in s.items()
        if name == "pipeconnect_tls_handshakes_total"
    }
    assert set(handshakes) <= version and sum(handshakes.values()) == 2, handshakes
    assert value(s, "pipeconnect_tls_handshake_failures_total", reason="handshake-error") == 1
    assert value(s, "pipeconnect_tls_handshake_failures_total", reason="timeout") == 0
    assert value(s, "pipeconnect_sessions_total", listener="tls_on_connect", outcome="quit") == 1
    assert (
        value(s, "pipeconnect_sessions_total", listener="tls_on_connect", outcome="tls-failed") == 1
    )
    assert value(s, "pipeconnect_sessions_total", listener="plain", outcome="quit") == 1
    assert value(s, "pipeconnect_active_sessions", listener="tls_on_connect") == 0
