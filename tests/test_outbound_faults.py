"""Outbound mode's driver (proxy/outbound.py) against a scripted fake MX, in process, on
loopback, without NAT.

In production a NAT rule redirects the MTA's port-25 connections to the outbound listener
and ``original_destination`` reads where they were going (SO_ORIGINAL_DST). That single
syscall is all NAT gives the proxy, so here ``proxy.outbound.original_destination`` is
monkeypatched to return the fake MX's (host, port), and the test connects straight to the
outbound listener as the "MTA". Everything else is real: ``serve()`` with
``[outbound] enabled = true``, the SQLite EHLO cache in tmp_path, the sockets, the timers.

The MTA is a small scripted client that behaves like Postfix's smtp(8): it reads the
banner, sends ``EHLO mta.test``, reads the EHLO reply, writes MAIL, RCPT and DATA in one
write, reads three replies, sends the body and the dot (optionally QUIT in the same write)
and reads the verdict. The fake MX (``FakeMX``) waits before its banner (so "arrived before
the banner" is observable), then follows a script with one injected fault, and records
every byte it received and when, relative to when it sent its banner.

Real parts end to end (Postfix -> NAT -> proxy -> Exim in a network namespace) are in
tests/integration/test_outbound.py.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

import proxy.outbound
from proxy.config import parse_config
from proxy.ehlocache import EhloCache, Entry
from proxy.metrics import Metrics
from proxy.server import Runtime, serve
from proxy.smtp import Reply, ReplyReader

from .samples import sample

WAIT = 5.0  # every single wait in this file is bounded by this (seconds)
BANNER_DELAY = 0.1  # the fake MX's pause before its banner

MTA_EHLO = b"EHLO mta.test\r\n"
GROUP = b"MAIL FROM:<a@mta.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n"
BODY = b"Subject: t\r\n\r\nline one\r\n..dot stuffed\r\n"

BANNER = b"220 mx.dest.test ESMTP fake MX\r\n"
KEYWORDS = (b"SIZE 1000000", b"8BITMIME", b"PIPELINING", b"PIPECONNECT", b"CHUNKING")
MAIL_OK = b"250 2.1.0 Sender <a@mta.test> ok (mx)\r\n"
RCPT_OK = b"250 2.1.5 Recipient <b@dest.test> ok (mx)\r\n"
DATA_GO = b'354 Enter message, ending with "." on a line by itself (mx)\r\n'
QUEUED = b"250 2.0.0 Ok: queued as 1FAKEMX\r\n"
BYE = b"221 2.0.0 mx.dest.test closing connection\r\n"
SYNC_ERROR = b"554 SMTP synchronization error\r\n"
NO_STARTTLS = b"503 5.5.1 STARTTLS command used when not advertised\r\n"


def ehlo_reply(name: bytes = b"mx.dest.test", keywords: tuple[bytes, ...] = KEYWORDS) -> bytes:
    lines = [name + b" Hello mta.test [127.0.0.1]", *keywords]
    return b"".join(b"250-" + ln + b"\r\n" for ln in lines[:-1]) + b"250 " + lines[-1] + b"\r\n"


def parse(data: bytes) -> Reply:
    reader = ReplyReader(max_line=65536, max_lines=1000)
    reader.feed(data)
    reply = reader.next_reply()
    assert reply is not None and not reader.buffered
    return reply


def keywords_of(reply: Reply) -> list[bytes]:
    return [ln.split(b" ", 1)[0].upper() for ln in reply.lines[1:]]


# ---------------------------------------------------------------- the fake MX


@dataclass
class MxConn:
    """One connection the fake MX accepted. Times are trio.current_time()."""

    opened: float
    chunks: list[tuple[float, bytes]] = field(default_factory=list)  # what arrived, when
    sent: list[tuple[float, bytes]] = field(default_factory=list)  # what it wrote, when
    banner_at: float | None = None  # just before the banner was written
    messages: list[bytes] = field(default_factory=list)  # bodies up to (not incl.) the dot
    eof: bool = False
    deaf: bool = False  # reads no more (stop_reading_after_354)
    buf: bytearray = field(default_factory=bytearray)
    changed: trio.Event = field(default_factory=trio.Event)

    @property
    def received(self) -> bytes:
        return b"".join(data for _, data in self.chunks)

    @property
    def said(self) -> bytes:
        return b"".join(data for _, data in self.sent)

    def before_banner(self) -> bytes:
        assert self.banner_at is not None
        return b"".join(data for t, data in self.chunks if t < self.banner_at)

    def arrival(self, needle: bytes) -> float:
        """When the bytes that complete the first ``needle`` arrived."""
        seen = b""
        for t, data in self.chunks:
            seen += data
            if needle in seen:
                return t
        raise AssertionError(f"{needle!r} never arrived: {self.received!r}")

    def sent_at(self, data: bytes) -> float:
        return next(t for t, d in self.sent if d == data)

    def poke(self) -> None:
        ev, self.changed = self.changed, trio.Event()
        ev.set()

    async def line(self) -> bytes | None:
        while b"\n" not in self.buf:
            if self.eof:
                return None
            await self.changed.wait()
        end = self.buf.index(b"\n") + 1
        line = bytes(self.buf[:end])
        del self.buf[:end]
        return line

    async def body(self) -> bytes | None:
        while (end := (b"\r\n" + self.buf).find(b"\r\n.\r\n")) < 0:
            if self.eof:
                return None
            await self.changed.wait()
        data = bytes(self.buf[:end])
        del self.buf[: end + 3]
        return data

    async def closed(self) -> None:
        while not self.eof:
            await self.changed.wait()


@dataclass
class FakeMX:
    """A scripted MX. ``replies`` maps a verb (``.`` for the end of data) to the reply
    sent instead of the normal one. Faults: ``sync_error`` (input before the banner gets
    554 and a close: an Exim without early pipelining), ``close_after_354``,
    ``silent_after`` (that verb and everything after it gets no reply),
    ``verdict_delay`` (the end-of-data reply is held), ``stop_reading_after_354`` (it
    takes no more input: writes to it block once the socket buffers are full)."""

    banner: bytes = BANNER
    banner_delay: float = BANNER_DELAY
    ehlo: bytes = field(default_factory=ehlo_reply)
    replies: dict[str, bytes] = field(default_factory=dict)
    sync_error: bool = False
    close_after_354: bool = False
    silent_after: str = ""
    verdict_delay: float = 0.0
    stop_reading_after_354: bool = False
    port: int = 0
    conns: list[MxConn] = field(default_factory=list)
    got_message: trio.Event = field(default_factory=trio.Event)  # an end of data came

    @property
    def messages(self) -> list[bytes]:
        return [m for c in self.conns for m in c.messages]

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.port)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = MxConn(opened=trio.current_time())
        self.conns.append(conn)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, stream, conn)
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._talk(stream, conn)
                nursery.cancel_scope.cancel()
        finally:
            await trio.aclose_forcefully(stream)

    async def _read(self, stream: trio.SocketStream, conn: MxConn) -> None:
        while True:
            if conn.deaf:
                await trio.sleep_forever()
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if data:
                conn.chunks.append((trio.current_time(), data))
                conn.buf += data
            else:
                conn.eof = True
            conn.poke()
            if not data:
                return

    async def _send(self, stream: trio.SocketStream, conn: MxConn, data: bytes) -> None:
        conn.sent.append((trio.current_time(), data))
        await stream.send_all(data)

    async def _talk(self, stream: trio.SocketStream, conn: MxConn) -> None:
        await trio.sleep(self.banner_delay)
        if self.sync_error and conn.chunks:
            await self._send(stream, conn, SYNC_ERROR)
            return
        conn.banner_at = trio.current_time()
        await self._send(stream, conn, self.banner)
        if not self.banner.startswith(b"220"):
            return
        while (line := await conn.line()) is not None:
            verb = line.split(b" ", 1)[0].strip().upper().decode()
            if verb == self.silent_after:
                await conn.closed()
                return
            if verb == "DATA":
                go = self.replies.get("DATA", DATA_GO)
                await self._send(stream, conn, go)
                if not go.startswith(b"354"):
                    continue
                if self.close_after_354:
                    return
                if self.stop_reading_after_354:
                    conn.deaf = True
                    await trio.sleep_forever()
                body = await conn.body()
                if body is None:
                    return
                conn.messages.append(body)
                self.got_message.set()
                await trio.sleep(self.verdict_delay)
                await self._send(stream, conn, self.replies.get(".", QUEUED))
                continue
            normal = {
                "EHLO": self.ehlo,
                "MAIL": MAIL_OK,
                "RCPT": RCPT_OK,
                "RSET": b"250 2.0.0 Reset (mx)\r\n",
                "NOOP": b"250 2.0.0 Ok (mx)\r\n",
                "STARTTLS": NO_STARTTLS,
                "QUIT": BYE,
            }
            reply = self.replies.get(verb, normal.get(verb, b"500 5.5.1 Unknown command\r\n"))
            await self._send(stream, conn, reply)
            if verb == "QUIT":
                return


def dead_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- the MTA


class Mta:
    """The MTA's side of one connection to the outbound listener."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = ReplyReader(max_line=65536, max_lines=1000)
        self.raw = b""  # every byte read
        self.wrote = b""  # every byte written

    async def send(self, data: bytes) -> None:
        self.wrote += data
        with trio.fail_after(WAIT):
            await self.stream.send_all(data)

    async def reply(self) -> Reply | None:
        """The next reply; None once the proxy closed (or reset) the connection."""
        with trio.fail_after(WAIT):
            while (reply := self.reader.next_reply()) is None:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    return None
                self.raw += data
                self.reader.feed(data)
            return reply

    async def replies(self, n: int) -> list[Reply | None]:
        return [await self.reply() for _ in range(n)]


@dataclass
class Transcript:
    banner: Reply | None = None
    ehlo: Reply | None = None
    starttls: Reply | None = None
    group: list[Reply | None] = field(default_factory=list)
    verdict: Reply | None = None
    quit: Reply | None = None
    after: Reply | None = None  # anything past the last expected reply (None: closed)
    mta: Mta | None = None

    def codes(self) -> list[int]:
        got = [self.banner, self.ehlo, self.starttls, *self.group, self.verdict, self.quit]
        return [r.code for r in got if r is not None]

    def texts(self) -> list[bytes]:
        got = [self.banner, self.ehlo, self.starttls, *self.group, self.verdict, self.quit]
        return [r.to_bytes() for r in got if r is not None]


async def send_mail(
    port: int,
    *,
    mail: bytes = b"MAIL FROM:<a@mta.test>\r\n",
    starttls: bool = False,
    quit_behind_dot: bool = True,
    smtputf8_if_offered: bool = False,
) -> Transcript:
    """One delivery, as Postfix's smtp(8) makes it (a 4xx/5xx at any step: QUIT).
    ``smtputf8_if_offered``: MAIL gets SMTPUTF8 only if the EHLO reply offered it (Postfix
    with a message whose envelope is ASCII and only the headers UTF-8)."""
    t = Transcript()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        t.mta = mta = Mta(stream)
        t.banner = await mta.reply()
        if t.banner is None or t.banner.code != 220:
            return t
        await mta.send(MTA_EHLO)
        t.ehlo = await mta.reply()
        if t.ehlo is None or t.ehlo.code != 250:
            return await _quit(mta, t)
        if starttls:
            await mta.send(b"STARTTLS\r\n")
            t.starttls = await mta.reply()
            assert t.starttls is not None and t.starttls.code != 220, "no TLS in this test"
        if smtputf8_if_offered and b"SMTPUTF8" in keywords_of(t.ehlo):
            mail = mail.rstrip(b"\r\n") + b" SMTPUTF8\r\n"
        await mta.send(mail + GROUP.split(b"\r\n", 1)[1])
        t.group = await mta.replies(3)
        if any(r is None for r in t.group) or t.group[2].code != 354:  # type: ignore[union-attr]
            if all(r is not None for r in t.group):
                await _quit(mta, t)
            return t
        # (if the proxy gave up meanwhile, its reply is still there to read)
        with suppress(trio.BrokenResourceError):
            await mta.send(BODY + b".\r\n" + (b"QUIT\r\n" if quit_behind_dot else b""))
        t.verdict = await mta.reply()
        if t.verdict is None:
            return t
        if not quit_behind_dot:
            await mta.send(b"QUIT\r\n")
        t.quit = await mta.reply()
        if t.quit is not None:
            t.after = await mta.reply()
    return t


async def _quit(mta: Mta, t: Transcript) -> Transcript:
    try:
        await mta.send(b"QUIT\r\n")
    except trio.BrokenResourceError:
        return t
    t.quit = await mta.reply()
    if t.quit is not None:
        t.after = await mta.reply()
    return t


# ---------------------------------------------------------------- the proxy


@dataclass
class Proxy:
    port: int  # the outbound listener
    metrics: Metrics
    runtime: Runtime
    cache: str

    def entries(self) -> list[Entry]:
        return EhloCache(self.cache).entries()

    def ended(self, path: str | None = None) -> int:
        """Outbound sessions ended (on ``path``), whatever their outcome."""
        total = 0.0
        for metric in self.metrics.registry.collect():
            if metric.name == "pipeconnect_outbound_sessions":
                for s in metric.samples:
                    if s.name.endswith("_total") and path in (None, s.labels["path"]):
                        total += s.value
        return int(total)

    async def settle(self, sessions: int) -> None:
        """Wait (bounded) until ``sessions`` outbound sessions have ended and logged."""
        with trio.fail_after(WAIT):
            active = "outbound_active_sessions"
            while self.ended() < sessions or sample(self.metrics, active):  # noqa: ASYNC110
                await trio.sleep(0.005)
        assert self.ended() == sessions


def config_for(cache: str, **sections: dict[str, Any]) -> Any:
    data: dict[str, Any] = {
        "upstream": {"address": "127.0.0.1:25", "connect_timeout": 2},
        "metrics": {"listen": ""},
        "outbound": {"enabled": True, "listen": ["127.0.0.1:0"], "cache": cache},
        "timeouts": {"command": 5, "reply": 3, "data_term": 5},
        "server": {"shutdown_grace": 0.2},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data)


@asynccontextmanager
async def outbound_proxy(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dest: tuple[str, int] | None,
    *,
    cache: str | None = None,
    **sections: Any,
) -> AsyncIterator[Proxy]:
    """``serve()`` with one outbound listener; its sessions "were going to" ``dest``
    (None: ``original_destination`` is left alone)."""
    if dest is not None:
        monkeypatch.setattr(proxy.outbound, "original_destination", lambda sock: dest)
    path = cache if cache is not None else str(tmp_path / "outbound.sqlite")
    config = config_for(path, **sections)
    metrics = Metrics(process=False)
    runtime = Runtime(config)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(functools.partial(serve, config, metrics, runtime=runtime))
        try:
            yield Proxy(bound.outbound[0][1], metrics, runtime, path)
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def mx_and_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mx: FakeMX, **sections: Any
) -> AsyncIterator[Proxy]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(mx.serve)
        async with outbound_proxy(tmp_path, monkeypatch, ("127.0.0.1", port), **sections) as p:
            yield p
        nursery.cancel_scope.cancel()


def learn(
    proxy_: Proxy,
    port: int,
    *,
    ehlo: bytes | None = None,
    banner: bytes = BANNER,
    client_ehlo: bytes = MTA_EHLO,
    age: float = 0.0,
) -> None:
    """A cache entry as an earlier session would have left it."""
    stored = EhloCache(proxy_.cache).learn(
        "127.0.0.1",
        "127.0.0.1",
        port,
        parse(banner),
        parse(ehlo if ehlo is not None else ehlo_reply()),
        time.time() - age,
        client_ehlo,
    )
    assert stored


def outbound_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "pipeconnect.outbound" and r.getMessage().startswith("outbound S=")
    ]


def no_5xx(t: Transcript) -> None:
    assert all(c < 500 for c in t.codes()), t.codes()


# ---------------------------------------------------------------- 1. miss, then hit


async def test_miss_relays_and_learns_then_hit_talks_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pipeconnect")
    mx = FakeMX()
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        # a miss: byte for byte both ways, and learned
        first = await send_mail(p.port)
        await p.settle(1)
        [c1] = mx.conns
        assert first.mta is not None
        assert c1.received == first.mta.wrote
        assert first.mta.raw == c1.said
        assert first.texts() == [BANNER, ehlo_reply(), MAIL_OK, RCPT_OK, DATA_GO, QUEUED, BYE]
        assert c1.before_banner() == b""
        [entry] = p.entries()
        assert (entry.source, entry.dest, entry.port) == ("127.0.0.1", "127.0.0.1", mx.port)
        assert entry.banner.to_bytes() == BANNER
        assert entry.ehlo.to_bytes() == ehlo_reply()
        assert entry.client_ehlo == MTA_EHLO
        assert entry.strikes == 0
        assert p.ended("relay") == 1  # (its outcome: see test_relayed_session_outcome_is_quit)
        assert sample(p.metrics, "outbound_cache_lookups_total", result="miss") == 1
        assert sample(p.metrics, "outbound_cache_learned_total") == 1

        # a hit: the cached greeting at once, the MTA's talk before the MX's banner
        second = await send_mail(p.port)
        await p.settle(2)
        c2 = mx.conns[1]
        assert second.banner is not None and second.banner.to_bytes() == BANNER
        assert second.ehlo is not None
        kws = keywords_of(second.ehlo)
        assert b"SIZE" in second.ehlo.lines  # the number withheld
        assert b"SMTPUTF8" in kws
        assert b"PIPECONNECT" not in kws and b"CHUNKING" not in kws
        assert b"PIPELINING" in kws
        assert [r.to_bytes() for r in second.group if r] == [MAIL_OK, RCPT_OK, DATA_GO]
        assert second.verdict is not None and second.verdict.to_bytes() == QUEUED
        assert second.quit is not None and second.quit.to_bytes() == BYE
        assert second.after is None
        before = c2.before_banner()
        assert before.startswith(MTA_EHLO)
        assert before == MTA_EHLO + GROUP
        assert c2.received == MTA_EHLO + GROUP + BODY + b".\r\nQUIT\r\n"
        assert mx.messages == [BODY, BODY]  # the second session's message once
    assert sample(p.metrics, "outbound_sessions_total", path="early", outcome="quit") == 1
    assert sample(p.metrics, "outbound_cache_lookups_total", result="hit") == 1
    assert sample(p.metrics, "outbound_round_trips_saved_total") == 2
    assert sample(p.metrics, "outbound_recoveries_total") == 0
    [entry] = p.entries()
    assert entry.strikes == 0 and entry.verified >= entry.learned
    miss, hit = outbound_lines(caplog)
    assert " L " in miss and "P=relay" in miss and "cache=miss+learned" in miss
    assert " L* " in hit and "P=early" in hit and "cache=hit" in hit and "outcome=quit" in hit


async def test_the_log_line_follows_log_format_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`[log] format = "json"` makes the outbound line JSON too, as the inbound one."""
    caplog.set_level(logging.INFO, "pipeconnect")
    mx = FakeMX()
    async with mx_and_proxy(tmp_path, monkeypatch, mx, log={"format": "json"}) as p:
        learn(p, mx.port)
        t = await send_mail(p.port)
        await p.settle(1)
    assert t.verdict is not None and t.verdict.to_bytes() == QUEUED
    [line] = [r.getMessage() for r in caplog.records if r.name == "pipeconnect.outbound"]
    record = json.loads(line)
    assert record["event"] == "outbound" and record["dest"] == f"127.0.0.1:{mx.port}"
    assert (record["L"], record["path"], record["cache"]) == ("L*", "early", "hit")
    assert (record["outcome"], record["round_trips_saved"]) == ("quit", 2)


# ---------------------------------------------------------------- 2. sync error: retried


WITHOUT_PIPECONNECT = tuple(k for k in KEYWORDS if k != b"PIPECONNECT")


async def test_sync_error_to_early_talk_is_retried_in_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An Exim that withdrew PIPECONNECT: input before its banner gets 554 and a close.
    mx = FakeMX(sync_error=True, ehlo=ehlo_reply(keywords=WITHOUT_PIPECONNECT))
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        learn(p, mx.port)
        t = await send_mail(p.port)
        await p.settle(1)
        entries = p.entries()
    first, second = mx.conns
    assert first.said == SYNC_ERROR and first.banner_at is None
    assert first.received.startswith(MTA_EHLO) and first.messages == []
    # in step: the banner first, then EHLO, then the group behind the EHLO reply
    assert second.before_banner() == b""
    assert second.arrival(MTA_EHLO) > second.sent_at(BANNER)
    assert second.arrival(b"DATA\r\n") > second.sent_at(mx.ehlo)
    assert second.received == MTA_EHLO + GROUP + BODY + b".\r\nQUIT\r\n"
    assert mx.messages == [BODY]
    no_5xx(t)
    assert t.texts()[2:] == [MAIL_OK, RCPT_OK, DATA_GO, QUEUED, BYE]
    [entry] = entries
    assert not entry.usable and entry.strikes == 1 and entry.blocked_until == 0
    assert sample(p.metrics, "outbound_recoveries_total") == 1
    assert sample(p.metrics, "outbound_sessions_total", path="retried", outcome="quit") == 1
    assert sample(p.metrics, "outbound_deferred_total") == 0


# ---------------------------------------------------------------- 3. 4xx banner on a hit


async def test_4xx_banner_on_a_hit_defers_every_waiting_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mx = FakeMX(banner=b"421 4.3.2 mx.dest.test busy, try again later\r\n")
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        learn(p, mx.port)
        t = await send_mail(p.port)
        await p.settle(1)
        [entry] = p.entries()
    assert t.banner is not None and t.banner.to_bytes() == BANNER  # the cached one
    assert [r.code for r in t.group if r] == [451, 451, 451]
    for r in t.group:
        assert r is not None and r.lines[0].startswith(b"4.4.2 ") and b"busy" in r.lines[0]
    assert t.quit is not None and t.quit.code == 221 and t.after is None
    no_5xx(t)
    assert mx.messages == []
    assert not entry.usable and entry.strikes == 1
    assert sample(p.metrics, "outbound_cache_invalidations_total", reason="banner") == 1
    assert sample(p.metrics, "outbound_deferred_total") == 1


# ---------------------------------------------------------------- 4. a loop


async def test_mx_greeting_with_the_mtas_own_name_is_a_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mx = FakeMX(ehlo=ehlo_reply(name=b"mta.test"))
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        learn(p, mx.port)
        t = await send_mail(p.port)
        await p.settle(1)
        [entry] = p.entries()
    assert [r.code for r in t.group if r] == [451, 451, 451]
    assert all(r is not None and r.lines[0].startswith(b"4.4.6 ") for r in t.group)
    no_5xx(t)
    assert mx.messages == []
    assert not entry.usable and entry.blocked_until > time.time() + 3600
    assert sample(p.metrics, "outbound_cache_invalidations_total", reason="loop") == 1


# ---------------------------------------------------------------- 5. features changed


TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"


@pytest.mark.parametrize("changed", [True, False], ids=["changed", "unchanged"])
async def test_5xx_after_a_feature_change_becomes_4xx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changed: bool
) -> None:
    now = tuple(b"SIZE 100" if k.startswith(b"SIZE") else k for k in KEYWORDS)
    mx = FakeMX(ehlo=ehlo_reply(keywords=now if changed else KEYWORDS), replies={".": TOO_BIG})
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        learn(p, mx.port)  # learned with SIZE 1000000
        t = await send_mail(p.port)
        await p.settle(1)
        [entry] = p.entries()
    assert t.texts()[2:5] == [MAIL_OK, RCPT_OK, DATA_GO]
    assert mx.messages == [BODY]
    assert t.verdict is not None and t.quit is not None and t.quit.to_bytes() == BYE
    assert entry.usable and entry.strikes == 0
    if changed:
        assert t.verdict.code == 451 and t.verdict.lines[0].startswith(b"4.3.0 ")
        assert b"Message size exceeds fixed maximum" in t.verdict.lines[0]  # the MX's words
        assert entry.ehlo.to_bytes() == mx.ehlo  # rewritten
        assert sample(p.metrics, "outbound_cache_invalidations_total", reason="features") == 1
        assert sample(p.metrics, "outbound_deferred_total") == 1
    else:
        assert t.verdict.to_bytes() == TOO_BIG  # the MX's own verdict, verbatim
        assert entry.ehlo.to_bytes() == ehlo_reply()
        assert sample(p.metrics, "outbound_deferred_total") == 0


# ---------------------------------------------------------------- 6. SMTPUTF8 withdrawn


async def test_smtputf8_withdrawn_defers_before_any_message_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mx = FakeMX()  # no SMTPUTF8
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        learn(p, mx.port, ehlo=ehlo_reply(keywords=(*KEYWORDS, b"SMTPUTF8")))
        t = await send_mail(p.port, mail=b"MAIL FROM:<a@mta.test> SMTPUTF8\r\n")
        await p.settle(1)
    assert [r.code for r in t.group if r] == [451, 451, 451]
    assert all(r is not None and r.lines[0].startswith(b"4.3.0 ") for r in t.group)
    no_5xx(t)
    [conn] = mx.conns
    assert conn.messages == [] and BODY not in conn.received
    assert (
        conn.received
        == MTA_EHLO + b"MAIL FROM:<a@mta.test> SMTPUTF8\r\n" + GROUP.split(b"\r\n", 1)[1]
    )
    assert sample(p.metrics, "outbound_deferred_total") == 1


# ---------------------------------------------------------------- 7. STARTTLS withdrawn


async def test_starttls_withdrawn_gets_454_and_delivers_in_cleartext(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mx = FakeMX()  # no STARTTLS
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        learn(p, mx.port, ehlo=ehlo_reply(keywords=(*KEYWORDS, b"STARTTLS")))
        t = await send_mail(p.port, starttls=True)
        await p.settle(1)
        [entry] = p.entries()
    assert t.ehlo is not None and b"STARTTLS" in keywords_of(t.ehlo)  # the cached offer
    assert t.starttls is not None and t.starttls.code == 454
    assert t.starttls.lines[0].startswith(b"4.7.0 ")
    assert t.texts()[3:] == [MAIL_OK, RCPT_OK, DATA_GO, QUEUED, BYE]
    assert mx.messages == [BODY]
    assert entry.usable and b"STARTTLS" not in keywords_of(entry.ehlo)


# ---------------------------------------------------------------- 8. the MX goes away


async def test_mx_closing_after_354_gets_421(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mx = FakeMX(close_after_354=True)
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        learn(p, mx.port)
        t = await send_mail(p.port)
        await p.settle(1)
    assert t.texts()[2:5] == [MAIL_OK, RCPT_OK, DATA_GO]
    assert t.verdict is not None and t.verdict.code == 421
    assert t.verdict.lines[0].startswith(b"4.4.2 ")
    assert t.quit is None  # closed behind the 421
    assert mx.messages == []
    assert sample(p.metrics, "outbound_sessions_total", path="early", outcome="mx-closed") == 1


async def test_mx_silent_after_mail_gets_421_after_the_reply_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mx = FakeMX(silent_after="MAIL")
    async with mx_and_proxy(tmp_path, monkeypatch, mx, timeouts={"reply": 1}) as p:
        learn(p, mx.port)
        started = trio.current_time()
        with trio.fail_after(2.5):
            t = await send_mail(p.port)
        took = trio.current_time() - started
        await p.settle(1)
    assert t.group[0] is not None and t.group[0].code == 421
    assert t.group[0].lines[0].startswith(b"4.4.2 ")
    assert t.group[1:] == [None, None]
    assert 1.0 <= took < 2.0, took
    assert mx.messages == []
    assert sample(p.metrics, "outbound_sessions_total", path="early", outcome="mx-timeout") == 1


async def test_mx_that_stops_reading_mid_message_gets_the_mta_a_421(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that stops reading: the proxy's write to the MX is bounded by
    timeouts.command; when it runs out the MTA, still sending its message, gets
    `421 4.4.2` (a deferral) and the session ends; the MX never saw an end of data."""
    mx = FakeMX(stop_reading_after_354=True)
    async with mx_and_proxy(tmp_path, monkeypatch, mx, timeouts={"command": 1}) as p:
        learn(p, mx.port)
        stream = await trio.open_tcp_stream("127.0.0.1", p.port)
        async with stream:
            mta = Mta(stream)
            assert (await mta.reply()) is not None  # the cached banner
            await mta.send(MTA_EHLO)
            assert (await mta.reply()) is not None
            await mta.send(b"MAIL FROM:<a@mta.test>\r\n" + GROUP.split(b"\r\n", 1)[1])
            group = await mta.replies(3)
            assert [r.code for r in group if r] == [250, 250, 354]
            started = trio.current_time()

            async def flood() -> None:  # far more than the socket buffers hold
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    for _ in range(512):
                        await stream.send_all((b"x" * 998 + b"\r\n") * 64)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                verdict = await mta.reply()
                nursery.cancel_scope.cancel()
        await p.settle(1)
    assert verdict is not None and verdict.code == 421, verdict
    assert verdict.lines[0].startswith(b"4.4.2 "), verdict
    assert trio.current_time() - started < WAIT
    assert mx.messages == []


# ---------------------------------------------------------------- 9. QUIT behind the dot


async def test_quit_pipelined_behind_the_dot_waits_for_the_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mx = FakeMX(verdict_delay=0.3)  # as Exim up to 4.98 delays its 250 when QUIT is behind
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        learn(p, mx.port)
        t = await send_mail(p.port, quit_behind_dot=True)
        await p.settle(1)
    [conn] = mx.conns
    assert conn.arrival(b"QUIT\r\n") > conn.sent_at(QUEUED)
    assert t.verdict is not None and t.verdict.to_bytes() == QUEUED
    assert t.quit is not None and t.quit.to_bytes() == BYE
    assert mx.messages == [BODY]


# ---------------------------------------------------------------- 10. not intercepted


@pytest.mark.parametrize("how", ["no-nat", "own-address"])
async def test_a_connection_not_redirected_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    if how == "own-address":
        monkeypatch.setattr(
            proxy.outbound, "original_destination", lambda sock: sock.getsockname()[:2]
        )
    async with (
        outbound_proxy(tmp_path, monkeypatch, None) as p,
        await trio.open_tcp_stream("127.0.0.1", p.port) as stream,
    ):
        mta = Mta(stream)
        refusal = await mta.reply()
        assert await mta.reply() is None
    assert refusal is not None and refusal.code == 421
    assert refusal.lines[0].startswith(b"4.3.0 ")
    assert sample(p.metrics, "outbound_refused_total", reason="not-intercepted") == 1
    assert sample(p.metrics, "outbound_refused_total", reason="loop") == 0
    assert p.ended() == 0


# ---------------------------------------------------------------- 11. a broken cache file


@pytest.mark.parametrize("broken", ["corrupt", "unwritable"])
async def test_a_broken_cache_never_stops_mail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, broken: str
) -> None:
    caplog.set_level(logging.INFO, "pipeconnect")
    if broken == "corrupt":
        path = tmp_path / "outbound.sqlite"
        path.write_bytes(b"\x00garbage, not SQLite\xff" * 200)
    else:
        path = tmp_path / "no-such-directory" / "outbound.sqlite"
    mx = FakeMX()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(mx.serve)
        dest = ("127.0.0.1", port)
        async with outbound_proxy(tmp_path, monkeypatch, dest, cache=str(path)) as p:
            for n in range(1, 4):
                t = await send_mail(p.port)
                await p.settle(n)
                assert t.texts() == [BANNER, ehlo_reply(), MAIL_OK, RCPT_OK, DATA_GO, QUEUED, BYE]
        nursery.cancel_scope.cancel()
    assert mx.messages == [BODY] * 3
    assert p.ended("relay") == 3
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].name == "pipeconnect.outbound" and str(path) in errors[0].getMessage()
    assert sample(p.metrics, "outbound_cache_errors_total") > 0
    assert all("P=relay" in line for line in outbound_lines(caplog))


# ---------------------------------------------------------------- 12. shutdown


@asynccontextmanager
async def message_at_the_mx(p: Proxy, mx: FakeMX) -> AsyncIterator[list[Transcript]]:
    """A delivery under way, its end of data with the MX (whose verdict may be held): the
    body runs then; on exit the delivery has ended and its transcript is in the list."""
    got: list[Transcript] = []

    async def deliver() -> None:
        got.append(await send_mail(p.port))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliver)
        with trio.fail_after(WAIT):
            await mx.got_message.wait()
        yield got


@pytest.mark.parametrize("hit", [True, False], ids=["hit", "miss"])
async def test_shutdown_relays_the_held_verdict_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hit: bool
) -> None:
    mx = FakeMX(verdict_delay=1.0)
    async with mx_and_proxy(tmp_path, monkeypatch, mx, server={"shutdown_grace": 0.2}) as p:
        if hit:
            learn(p, mx.port)
        async with message_at_the_mx(p, mx) as got:  # its verdict held
            p.runtime.stopping.set()
        await p.settle(1)
    [t] = got
    assert t.verdict is not None and t.verdict.to_bytes() == QUEUED
    assert mx.messages == [BODY]
    if t.quit is not None:  # then the session ends: the proxy's 421 or the MX's 221
        assert t.quit.code in (421, 221)
        assert t.after is None


# ---------------------------------------------------------------- 13. TCP Fast Open


async def test_fast_open_hit_delivers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mx = FakeMX()
    async with mx_and_proxy(tmp_path, monkeypatch, mx, outbound={"tcp_fastopen": True}) as p:
        learn(p, mx.port)
        t = await send_mail(p.port)
        await p.settle(1)
    [conn] = mx.conns
    assert conn.before_banner() == MTA_EHLO + GROUP
    assert t.texts()[2:] == [MAIL_OK, RCPT_OK, DATA_GO, QUEUED, BYE]
    assert mx.messages == [BODY]
    assert sample(p.metrics, "outbound_sessions_total", path="early", outcome="quit") == 1


async def test_fast_open_to_a_dead_mx_defers_after_the_cached_banner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = dead_port()
    dest = ("127.0.0.1", port)
    async with outbound_proxy(tmp_path, monkeypatch, dest, outbound={"tcp_fastopen": True}) as p:
        learn(p, port)
        t = await send_mail(p.port)
        await p.settle(1)
    assert t.banner is not None and t.banner.to_bytes() == BANNER
    # The EHLO is answered from the cache too: the connect waits for the group (all of it
    # in the SYN), and its failure answers the group.
    assert t.ehlo is not None and t.ehlo.code == 250
    later = [r for r in (*t.group, t.verdict) if r is not None]
    assert later and all(400 <= r.code < 500 for r in later), [r.to_bytes() for r in later]
    assert all(r.lines[0].startswith(b"4.4.1 ") for r in later)
    assert t.quit is None or t.quit.code == 221
    assert (
        sample(p.metrics, "outbound_sessions_total", path="early", outcome="connect-failed")
        + (sample(p.metrics, "outbound_sessions_total", path="retried", outcome="connect-failed"))
        == 1
    )


# ---------------------------------------------------------------- bugs found here


async def test_an_entry_older_than_the_ttl_is_a_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mx = FakeMX()
    async with mx_and_proxy(tmp_path, monkeypatch, mx, outbound={"cache_ttl": 60}) as p:
        learn(p, mx.port, age=3600)  # learned an hour ago, the TTL a minute
        t = await send_mail(p.port)
        await p.settle(1)
    assert t.texts()[:2] == [BANNER, ehlo_reply()]  # relayed: the MX's own EHLO reply
    assert mx.conns[0].before_banner() == b""
    assert sample(p.metrics, "outbound_cache_lookups_total", result="miss") == 1


async def test_a_destination_that_keeps_refusing_early_talk_gets_blocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Still advertises PIPECONNECT, but refuses input before its banner (a pool in which
    # some MXes have early pipelining off, behind one address).
    mx = FakeMX(sync_error=True)
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        for n in range(3):
            miss = await send_mail(p.port)  # relayed: learns again
            hit = await send_mail(p.port)  # early: 554, retried in step
            await p.settle(2 * n + 2)
            assert miss.verdict is not None and miss.verdict.to_bytes() == QUEUED
            assert hit.verdict is not None and hit.verdict.to_bytes() == QUEUED
        assert sample(p.metrics, "outbound_recoveries_total") == 3
        [entry] = p.entries()
    assert mx.messages == [BODY] * 6
    assert entry.strikes >= 3 and entry.blocked_until > time.time()


async def test_smtputf8_that_the_mx_never_offered_does_not_defer_for_ever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mx = FakeMX()  # no SMTPUTF8, now or when learned
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        learn(p, mx.port)
        first = await send_mail(p.port, smtputf8_if_offered=True)
        retry = await send_mail(p.port, smtputf8_if_offered=True)
        await p.settle(2)
    assert [r.code for r in first.group if r] == [451, 451, 451]  # (fine once)
    assert retry.verdict is not None and retry.verdict.to_bytes() == QUEUED
    assert mx.messages == [BODY]


async def test_smtputf8_that_the_mx_never_offered_never_gets_a_5xx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mx = FakeMX(
        replies={
            "MAIL": b"555 5.5.4 Unsupported option: SMTPUTF8\r\n",
            "RCPT": b"503 5.5.1 Error: need MAIL command\r\n",
            "DATA": b"503 5.5.1 Error: need RCPT command\r\n",
        }
    )
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        learn(p, mx.port)
        t = await send_mail(p.port, smtputf8_if_offered=True)
        await p.settle(1)
    assert t.ehlo is not None and b"SMTPUTF8" in keywords_of(t.ehlo)  # offered by the proxy
    no_5xx(t)


async def test_relayed_session_outcome_is_quit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mx = FakeMX()
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        t = await send_mail(p.port)
        await p.settle(1)
    assert t.quit is not None and t.quit.to_bytes() == BYE
    assert sample(p.metrics, "outbound_sessions_total", path="relay", outcome="quit") == 1


async def test_an_mx_that_withdrew_pipeconnect_is_not_talked_to_early_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mx = FakeMX(ehlo=ehlo_reply(keywords=WITHOUT_PIPECONNECT))  # and no sync check
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        learn(p, mx.port)
        first = await send_mail(p.port)
        second = await send_mail(p.port)
        await p.settle(2)
        entries = p.entries()
    assert first.verdict is not None and second.verdict is not None
    assert mx.messages == [BODY, BODY]
    assert all(not e.usable for e in entries), entries
    assert mx.conns[1].before_banner() == b""  # the second session waited for the banner
    assert sample(p.metrics, "outbound_cache_learned_total") == 0


async def test_relayed_session_with_a_silent_mx_gets_421_after_the_reply_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mx = FakeMX(silent_after="MAIL")
    timeouts = {"reply": 1, "command": 2, "data_term": 2}
    async with mx_and_proxy(tmp_path, monkeypatch, mx, timeouts=timeouts) as p:
        started = trio.current_time()
        with trio.fail_after(3):
            t = await send_mail(p.port)  # a miss: relayed
        took = trio.current_time() - started
        await p.settle(1)
    assert t.group[0] is not None and t.group[0].code == 421, t.group
    assert took < 2.0
