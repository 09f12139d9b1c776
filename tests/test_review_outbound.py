"""Adversarial review of outbound mode (proxy/outbound.py, proxy/machine/outbound.py).

The harness is tests/test_outbound_faults.py's (a real ``serve()`` with an outbound
listener, a scripted fake MX, ``original_destination`` patched); a few checks are on the
sans-I/O machine alone. Each test named for a defect failed before its fix (the body of
the message cut, a half-close losing the verdict, a badly framed acceptance turned into a
421, a locked cache freezing the worker, a deadline that moved still firing, ...).
"""

from __future__ import annotations

import functools
import logging
import re
import socket
import sqlite3
import time
from contextlib import closing, suppress
from pathlib import Path

import pytest
import trio

import proxy.outbound
from proxy.ehlocache import EhloCache
from proxy.machine.events import ClientData, Event, Shutdown, UpstreamEof
from proxy.metrics import Metrics
from proxy.server import Runtime, Snapshot, serve
from tests.samples import sample
from tests.test_outbound_faults import (
    BANNER,
    BODY,
    BYE,
    DATA_GO,
    GROUP,
    MAIL_OK,
    MTA_EHLO,
    QUEUED,
    RCPT_OK,
    SYNC_ERROR,
    WAIT,
    FakeMX,
    Mta,
    Proxy,
    config_for,
    ehlo_reply,
    learn,
    message_at_the_mx,
    mx_and_proxy,
    outbound_lines,
    parse,
    send_mail,
)
from tests.unit import test_outbound_machine as um
from tests.unit.test_outbound_machine import early_session

HIT_MISS = pytest.mark.parametrize("hit", [True, False], ids=["hit", "miss"])


async def greet(port: int) -> Mta:
    """An MTA connection up to the replies to MAIL, RCPT and DATA (all expected good)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    mta = Mta(stream)
    banner = await mta.reply()
    assert banner is not None and banner.to_bytes() == BANNER
    await mta.send(MTA_EHLO)
    ehlo = await mta.reply()
    assert ehlo is not None and ehlo.code == 250
    await mta.send(GROUP)
    got = [r.to_bytes() if r else None for r in await mta.replies(3)]
    assert got == [MAIL_OK, RCPT_OK, DATA_GO]
    return mta


async def rest_of(mta: Mta) -> bytes:
    """Every byte the proxy sends the MTA from here until it closes (bounded)."""
    data = b""
    with trio.fail_after(WAIT):
        while chunk := await mta.stream.receive_some(65536):
            data += chunk
    return data


# ---------------------------------------------------------------- the MTA's half-close


@HIT_MISS
async def test_half_close_after_pipelined_quit_still_gets_the_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hit: bool
) -> None:
    """Exim as the sending MTA (src/transports/smtp.c: a first delivery in cleartext, no
    more mail for the connection) writes the dot and QUIT in one segment, then
    ``shutdown(SHUT_WR)`` ("SMTP(shutdown)>>"), and only then reads the verdict. Any
    client may half-close after QUIT. The proxy takes the FIN for "the MTA is gone" and
    closes both sides: the MX has the whole message and queues it, the MTA sees the
    connection lost after the dot, defers, and sends it again. (Postfix does not
    half-close; spliced TLS sessions are cut the same way on any FIN.)"""
    mx = FakeMX(verdict_delay=0.2)
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        if hit:
            learn(p, mx.port)
        async with (mta := await greet(p.port)).stream:
            await mta.send(BODY + b".\r\nQUIT\r\n")
            await mta.stream.send_eof()  # Exim: "SMTP(shutdown)>>", then reads the replies
            verdict = await mta.reply()
        await p.settle(1)
    assert mx.messages == [BODY]  # the MX has it ...
    assert verdict is not None and verdict.to_bytes() == QUEUED  # ... and the MTA must know


# ---------------------------------------------------------------- a long message


@HIT_MISS
async def test_a_body_that_keeps_flowing_is_not_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hit: bool
) -> None:
    """After the 354 the machine sets one idle deadline (max(command, data_term), 600 s by
    default) and message bytes never push it back, so the whole upload must finish
    within it. A large attachment over a slow path (or an MX that reads slowly) is
    closed mid-data every time: deferred on every attempt, then bounced when the queue
    lifetime is over. (Cleartext only: a spliced STARTTLS session re-arms on every byte.)
    Here the deadline is 1 s and the body flows for 2 s."""
    mx = FakeMX()
    timeouts = {"command": 1, "reply": 1, "data_term": 1}
    async with mx_and_proxy(tmp_path, monkeypatch, mx, timeouts=timeouts) as p:
        if hit:
            learn(p, mx.port)
        async with (mta := await greet(p.port)).stream:
            with suppress(trio.BrokenResourceError):  # (the cut, when it comes)
                for n in range(8):  # never silent for more than 0.25 s
                    await mta.send(b"line %d of a long message\r\n" % n)
                    await trio.sleep(0.25)
                await mta.send(b".\r\nQUIT\r\n")
            verdict = await mta.reply()
        await p.settle(1)
    assert verdict is not None and verdict.to_bytes() == QUEUED


# ---------------------------------------------------------------- an MX's framing quirks

QUIRKY_VERDICTS = {
    "long-line": b"250 2.0.0 Ok: queued as 1FAKEMX " + b"x" * 5000 + b"\r\n",
    "bare-lf": b"250 2.0.0 Ok: queued as 1FAKEMX\n",
    "code-changes": b"250-2.0.0 Ok\r\n251 2.0.0 queued as 1FAKEMX\r\n",
}


@pytest.mark.parametrize("quirk", list(QUIRKY_VERDICTS))
async def test_a_badly_framed_acceptance_is_not_turned_into_a_421(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quirk: str
) -> None:
    """The MX has the message and says 2xx, only not by the book (a line over
    limits.max_reply_line, a bare LF, a code that changes inside the reply: Postfix
    reads all three as success). On a hit the proxy answers ``421 4.4.2 Remote server
    protocol error`` instead; the MTA defers and sends the message again, and the entry is
    not struck, so every retry is a hit that delivers it again and is told 421 again until
    the entry's TTL (7 days) runs out."""
    mx = FakeMX(replies={".": QUIRKY_VERDICTS[quirk]})
    heard: list[bytes] = []
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        learn(p, mx.port)
        for _ in range(2):
            async with (mta := await greet(p.port)).stream:
                await mta.send(BODY + b".\r\nQUIT\r\n")
                heard.append(await rest_of(mta))
        await p.settle(2)
    assert mx.messages == [BODY, BODY]  # two attempts, each delivered
    for raw in heard:  # the MTA judges the MX's own bytes (Postfix reads a 2xx)
        assert raw.startswith(QUIRKY_VERDICTS[quirk]) and b"421 " not in raw, raw[:80]


LONG_RCPT_OK = b"250 2.1.5 Recipient <b@dest.test> ok " + b"y" * 5000 + b"\r\n"


async def test_a_framing_error_on_a_hit_is_a_strike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MX answers RCPT with one 5 kB line. A miss relays it as it came (Postfix takes
    it), so the MX's greeting is learned and delivery works; each later attempt is a hit,
    gets ``421 4.4.2 Remote server protocol error: reply line too long`` and leaves the
    entry as it was. With cache_ttl (7 days) above Postfix's maximal_queue_lifetime (5
    days) every message to that MX bounces in the end, though the MX accepts them all."""
    mx = FakeMX(replies={"RCPT": LONG_RCPT_OK})
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        miss = await send_mail(p.port)  # relayed verbatim, learned
        hit = await send_mail(p.port)  # 421 4.4.2 (acceptable once)
        again = await send_mail(p.port)
        await p.settle(3)
    assert miss.verdict is not None and miss.verdict.to_bytes() == QUEUED
    assert hit.verdict is None or hit.verdict.to_bytes() == QUEUED
    assert again.verdict is not None and again.verdict.to_bytes() == QUEUED, again.codes()


# ---------------------------------------------------------------- a stale deadline


async def test_a_deadline_that_moved_does_not_fire(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_timer`` sees the 50 ms group wait expire, finds ``machine.deadline`` unchanged
    and waits for the lock, which the MTA's reader holds for the rest of the group (here
    the event loop is made slow for it, as a busy worker is). The MTA's DATA ends the group
    and arms the reply wait; then the stale DeadlinePassed runs and the machine, which does
    not look at the time, treats it as the MX's silence: ``421 4.4.2 Remote server closed
    the connection or timed out`` to MAIL, 0.1 s into a healthy session. (The inbound
    driver checks ``current_time() < deadline`` before it reports one.)"""
    original = proxy.outbound.OutboundSession._feed

    async def busy_feed(self: proxy.outbound.OutboundSession, event: Event) -> None:
        if isinstance(event, ClientData) and b"DATA" in event.data:
            async with self._lock:
                await trio.sleep(0.1)  # other sessions' turn: the loop is busy
                if self.machine.done:
                    return
                await self._perform(self.machine.handle(event, trio.current_time()))
            return
        await original(self, event)

    monkeypatch.setattr(proxy.outbound.OutboundSession, "_feed", busy_feed)
    mx = FakeMX()
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        learn(p, mx.port)
        async with await trio.open_tcp_stream("127.0.0.1", p.port) as stream:
            mta = Mta(stream)
            await mta.reply()
            await mta.send(MTA_EHLO)
            await mta.reply()
            mail, rest = GROUP.split(b"\r\n", 1)
            await mta.send(mail + b"\r\n")  # the group's first line: 50 ms to the next
            await trio.sleep(0.03)
            await mta.send(rest)
            got = [r.to_bytes() if r else None for r in await mta.replies(3)]
        await p.settle(1)
    assert got == [MAIL_OK, RCPT_OK, DATA_GO]


# ---------------------------------------------------------------- the retry


async def test_the_retry_is_in_step_whatever_the_mtas_ehlo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MX refuses input before its banner (554 synchronization error, then close). The
    proxy retries on a new connection, in step. The MTA's EHLO (another name than the one
    cached, e.g. a second transport with its own smtp_helo_name on the same address)
    arrives after the new connection is up and before its banner: ``_first_command``
    writes it at once and sets ``_early`` again, the MX refuses again, and since this is
    the retry the MTA gets ``451 4.4.2 Remote server said SMTP synchronization error`` to
    MAIL, RCPT and DATA instead of a delivery."""
    mx = FakeMX(sync_error=True, banner_delay=0.2)
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        learn(p, mx.port)  # with EHLO mta.test
        async with await trio.open_tcp_stream("127.0.0.1", p.port) as stream:
            mta = Mta(stream)
            await mta.reply()  # the cached banner, at once
            await trio.sleep(0.3)  # the first MX has refused, the second not greeted yet
            await mta.send(b"EHLO other.test\r\n")
            await mta.reply()
            await mta.send(GROUP)
            got = [r.code if r else None for r in await mta.replies(3)]
        await p.settle(1)
    assert got == [250, 250, 354]
    assert len(mx.conns) == 2
    assert mx.conns[1].said != SYNC_ERROR, "the retry talked early again and was refused"


# ---------------------------------------------------------------- the cache file


async def test_a_bad_row_is_replaced_by_the_next_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row whose banner is TEXT, not a BLOB (an older writer, a hand edit with the
    sqlite3 shell: SQLite keeps the type it is given). ``_parse`` feeds a str to the
    reply reader, TypeError: the lookup fails (a miss, fine), the miss's Learn fails on the
    same row, so it stays; the operator gets ``outbound cache ... unusable`` at ERROR
    (and ``works again`` after any other destination's session: the two alternate), the
    PipeconnectOutboundCacheErrors alert, and ``cache list`` crashes on that row."""
    mx = FakeMX()
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        EhloCache(p.cache)  # the file and its table
        with closing(sqlite3.connect(p.cache)) as db, db:
            db.execute(
                "INSERT INTO ehlo VALUES ('127.0.0.1', '127.0.0.1', ?, ?, ?, ?, ?, 0, 0, x'')",
                (mx.port, BANNER.decode(), ehlo_reply(), time.time(), time.time()),
            )
        first = await send_mail(p.port)
        second = await send_mail(p.port)
        await p.settle(2)
    assert first.verdict is not None and second.verdict is not None  # mail flows, always
    [entry] = EhloCache(p.cache).entries()
    assert entry.usable and entry.banner.to_bytes() == BANNER  # relearned by the miss
    assert sample(p.metrics, "outbound_cache_lookups_total", result="hit") == 1


async def test_a_locked_cache_file_does_not_freeze_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds the file's write lock (a sqlite3 shell with an open
    transaction, a backup, another worker in a long transaction, a cache on NFS). Every
    Learn / Verified / strike then waits ``sqlite3.connect(timeout=2.0)`` inside the trio
    thread: nothing else in that worker runs meanwhile, inbound sessions included, and
    with a session per second the worker never gets out. Here a ticker task, which should
    run every 10 ms, is stalled for the whole busy timeout by one outbound session."""
    mx = FakeMX()
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        EhloCache(p.cache)
        holder = sqlite3.connect(p.cache, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the write lock, held
        gaps: list[float] = []

        async def ticker() -> None:
            last = trio.current_time()
            while True:
                await trio.sleep(0.01)
                now = trio.current_time()
                gaps.append(now - last)
                last = now

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker)
                t = await send_mail(p.port)  # a miss: its Learn is a write
                await p.settle(1)
                nursery.cancel_scope.cancel()
        finally:
            holder.execute("ROLLBACK")
            holder.close()
    assert t.verdict is not None and t.verdict.to_bytes() == QUEUED
    assert max(gaps) < 0.5, f"the event loop stood still for {max(gaps):.2f} s"


async def test_smtputf8_in_an_address_is_not_the_smtputf8_parameter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``b"SMTPUTF8" in pending.line.upper()``: ``MAIL FROM:<smtputf8-owner@lists.test>``
    (or any ENVID, or an ORCPT-like value containing the letters) to an MX without
    SMTPUTF8 gets ``451 4.3.0 Remote server does not offer SMTPUTF8`` to MAIL, RCPT and
    DATA and costs a strike, although the MTA never asked for SMTPUTF8 and the MX said
    250."""
    mx = FakeMX()  # no SMTPUTF8, which is fine: the MTA does not use it
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        learn(p, mx.port)
        t = await send_mail(p.port, mail=b"MAIL FROM:<smtputf8-owner@lists.test>\r\n")
        await p.settle(1)
    assert [r.code for r in t.group if r] == [250, 250, 354]
    assert mx.messages == [BODY]


# ---------------------------------------------------------------- the loop check


async def test_a_looping_hit_is_refused_at_the_first_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NAT rule that also catches the proxy's own connections (the wrong uid in
    ``--except-user``, ``--mark`` without ``socket_mark``). ``_connect`` connects, then
    ``await``s the write of the cached EHLO, and only then adds its local end to ``own``;
    the listener's task may run ``handle_outbound`` for the looped connection in between,
    find nothing in ``own`` and start a full session, which connects (and loops) again.
    Here each of 20 deliveries should end in one session and one ``loop`` refusal; about
    half of them chain sessions instead (each striking cache entries on the way)."""
    path = str(tmp_path / "outbound.sqlite")
    listen = {"listen": ["127.0.0.1:0", "127.0.0.1:0"]}
    config = config_for(path, outbound=listen)
    metrics = Metrics(process=False)
    ports: list[int] = []

    def looped(sock: socket.socket) -> tuple[str, int]:
        # The MTA's connection (to the first listener) "was going to" the second, which
        # stands for an MX whose connections the rule sends back to the proxy; and back.
        here = sock.getsockname()[1]
        return ("127.0.0.1", ports[1] if here == ports[0] else ports[0])

    monkeypatch.setattr(proxy.outbound, "original_destination", looped)
    deliveries = 20
    runtime = Runtime(config)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(functools.partial(serve, config, metrics, runtime=runtime))
        ports[:] = [port for _, port in bound.outbound]
        p = Proxy(ports[0], metrics, runtime, path)
        for _ in range(deliveries):
            EhloCache(path).flush()
            learn(p, ports[0])
            learn(p, ports[1])  # hits both ways: the remembered EHLO goes at connect
            with trio.fail_after(WAIT):
                async with await trio.open_tcp_stream("127.0.0.1", ports[0]) as stream:
                    mta = Mta(stream)
                    await mta.reply()
                    await mta.send(MTA_EHLO)
                    await mta.reply()
                while sample(metrics, "outbound_active_sessions"):  # noqa: ASYNC110
                    await trio.sleep(0.005)
        nursery.cancel_scope.cancel()
    assert sample(metrics, "outbound_refused_total", reason="loop") == deliveries
    assert p.ended() == deliveries, "looped connections were taken for the MTA's"


# ================================================================ checked, and correct
#
# The sans-I/O machine, a hit from the first byte to the last, against an MX whose
# bytes are cut at every position (split in two reads, or the MX closing there, or the
# proxy told to stop there). The MTA is Postfix-like: its message after the 354, with
# QUIT behind the dot.

MX_STREAM = (
    um.BANNER.to_bytes()
    + um.EHLO_REPLY.to_bytes()
    + um.MAIL_OK
    + um.RCPT_OK
    + um.RCPT_OK
    + um.GO_AHEAD
    + um.QUEUED
    + um.BYE
)
GO_AHEAD_END = MX_STREAM.index(um.GO_AHEAD) + len(um.GO_AHEAD)
VERDICT_END = MX_STREAM.index(um.QUEUED) + len(um.QUEUED)


def _mx_says(run: um.Run, data: bytes, at: int) -> None:
    """The MX's bytes ``data`` (from offset ``at`` of MX_STREAM), each piece only once the
    MX can have written it (its verdict after the message, its 221 after QUIT), and the
    MTA's message once it has the 354."""
    for edge in (GO_AHEAD_END, VERDICT_END, len(MX_STREAM)):
        if at < edge and data and not run.machine.done:
            piece, data = data[: edge - at], data[edge - at :]
            at += len(piece)
            run.mx(piece)
            if um.GO_AHEAD in run.to_mta and um.MESSAGE not in run.to_mx:
                run.mta(um.MESSAGE + um.QUIT)


def _codes(run: um.Run) -> list[int]:
    return [r.code for r in um.replies(run.to_mta)]


@pytest.mark.parametrize("cut", range(1, len(MX_STREAM)))
def test_machine_every_split_of_the_mx_stream_gives_the_same_session(cut: int) -> None:
    run = early_session()
    _mx_says(run, MX_STREAM[:cut], 0)
    _mx_says(run, MX_STREAM[cut:], cut)
    assert run.to_mta == (
        um.BANNER.to_bytes()
        + um.SERVED_EHLO
        + um.MAIL_OK
        + um.RCPT_OK * 2
        + um.GO_AHEAD
        + um.QUEUED
        + um.BYE
    )
    assert run.to_mx == um.EHLO + um.GROUP + um.MESSAGE + um.QUIT
    assert run.machine.done and run.machine.log.outcome == "quit"


@pytest.mark.parametrize("cut", range(len(MX_STREAM) + 1))
def test_machine_the_mx_closing_anywhere_never_bounces_nor_denies_its_250(cut: int) -> None:
    run = early_session()
    _mx_says(run, MX_STREAM[:cut], 0)
    run.feed(UpstreamEof())
    codes = _codes(run)
    assert all(c < 500 for c in codes), codes  # this MX never says 5xx
    if cut >= VERDICT_END:  # the MX accepted: the MTA must have its 250, nothing after
        assert um.QUEUED in run.to_mta
        assert run.to_mta.rindex(um.QUEUED) + len(um.QUEUED) == len(run.to_mta) or (
            run.to_mta.endswith(um.BYE)
        )
    elif um.MESSAGE in run.to_mx:  # the dot is with the MX, its verdict not: a 421
        assert codes[-1] == 421
    if not run.machine.done:  # nothing of the MX's relayed yet: retried in step, once
        assert len(run.of(um.ConnectMx)) == 2 and um.MAIL_OK not in run.to_mta


@pytest.mark.parametrize("cut", range(0, len(MX_STREAM) + 1, 7))
def test_machine_shutdown_anywhere_relays_a_verdict_it_waits_for(cut: int) -> None:
    run = early_session()
    _mx_says(run, MX_STREAM[:cut], 0)
    dot_sent = um.MESSAGE in run.to_mx
    run.feed(Shutdown())
    if not run.machine.done:
        _mx_says(run, MX_STREAM[cut:], cut)
    codes = _codes(run)
    assert all(c < 500 for c in codes), codes
    if dot_sent:
        assert um.QUEUED in run.to_mta  # the verdict first ...
    else:
        assert um.MESSAGE not in run.to_mx  # ... or the MX never gets an end of data
    assert run.machine.done


# ---------------------------------------------------------------- end to end


async def test_a_second_message_on_the_same_hit_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Postfix's connection reuse: RSET, then MAIL/RCPT/DATA again on the early session."""
    mx = FakeMX()
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        learn(p, mx.port)
        async with (mta := await greet(p.port)).stream:
            await mta.send(BODY + b".\r\n")
            assert (await mta.reply()) == parse(QUEUED)
            await mta.send(b"RSET\r\n")
            assert (await mta.reply()) == parse(b"250 2.0.0 Reset (mx)\r\n")
            await mta.send(GROUP)
            got = [r.to_bytes() if r else None for r in await mta.replies(3)]
            assert got == [MAIL_OK, RCPT_OK, DATA_GO]
            await mta.send(b"second\r\n.\r\nQUIT\r\n")
            assert [r.to_bytes() if r else None for r in await mta.replies(2)] == [QUEUED, BYE]
        await p.settle(1)
    assert mx.messages == [BODY, b"second\r\n"]
    assert sample(p.metrics, "outbound_sessions_total", path="early", outcome="quit") == 1


@pytest.mark.parametrize("stage", ["banner", "ehlo", "group", "354", "body", "dot"])
async def test_the_mta_closing_anywhere_leaves_no_session_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    mx = FakeMX(verdict_delay=0.5)
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        learn(p, mx.port)
        async with await trio.open_tcp_stream("127.0.0.1", p.port) as stream:
            mta = Mta(stream)
            await mta.reply()
            if stage != "banner":
                await mta.send(MTA_EHLO)
                await mta.reply()
            if stage == "group":
                await mta.send(GROUP.split(b"\r\n", 1)[0] + b"\r\n")
            elif stage in ("354", "body", "dot"):
                await mta.send(GROUP)
                await mta.replies(3)
            if stage == "body":
                await mta.send(BODY[:10])
            elif stage == "dot":
                await mta.send(BODY + b".\r\n")
        await p.settle(1)  # the session ended: outbound_active_sessions back to 0
    assert sample(p.metrics, "outbound_active_sessions") == 0
    if stage == "body":
        assert mx.messages == []  # half a message: never delivered


async def test_the_mx_cannot_forge_the_log_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pipeconnect")
    evil = b'451-x" outcome=quit C="ok\r\n451 4.3.0 \x1b[2J\\ done\r\n'
    mx = FakeMX(banner=evil)
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        learn(p, mx.port)
        t = await send_mail(p.port)
        await p.settle(1)
    assert all(c < 500 for c in t.codes())
    [line] = outbound_lines(caplog)
    # Read as logfmt (key=value, values with blanks in double quotes): the MX's words
    # stay inside their field, which ends where the proxy ended it.
    fields = re.findall(r'(\S+?)=("[^"]*"|\S+)', line.split(" ", 1)[1])
    keys = [k for k, _ in fields]
    assert len(keys) == len(set(keys)), keys
    assert dict(fields)["outcome"] == "deferred"
    assert keys[-1] == "deferred" and line.endswith('done"')
    assert "\x1b" not in line and "\n" not in line and "\r" not in line


async def test_a_5xx_to_the_early_ehlo_that_is_not_a_sync_error_defers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MX now refuses the remembered EHLO name for good: the MTA (which was served a
    250) is deferred, never bounced; the entry is struck, so the next attempt is a miss in
    which the MTA sees the 550 itself (and falls back to HELO)."""
    mx = FakeMX(ehlo=b"550 5.7.1 <mta.test>: Helo command rejected: not a FQDN\r\n")
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        learn(p, mx.port)
        t = await send_mail(p.port)
        await p.settle(1)
        [entry] = p.entries()
    assert [r.code for r in t.group if r] == [451, 451, 451]
    assert all(c < 500 for c in t.codes())
    assert mx.messages == [] and not entry.usable and entry.strikes == 1


async def test_a_reload_that_drops_the_destination_leaves_the_running_session_be(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mx = FakeMX(verdict_delay=0.3)
    async with mx_and_proxy(tmp_path, monkeypatch, mx) as p:
        learn(p, mx.port)
        async with message_at_the_mx(p, mx) as got:
            new = config_for(p.cache, outbound={"hosts": ["!127.0.0.1", "*"]})
            p.runtime.current = Snapshot(new)  # what a SIGHUP's reload does
        after = await send_mail(p.port)
        await p.settle(2)
    assert got[0].verdict is not None and got[0].verdict.to_bytes() == QUEUED
    assert after.verdict is not None and after.verdict.to_bytes() == QUEUED
    assert sample(p.metrics, "outbound_sessions_total", path="early", outcome="quit") == 1
    assert sample(p.metrics, "outbound_cache_lookups_total", result="bypass") == 1
