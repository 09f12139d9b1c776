"""The fault matrix (issue 6): every protocol step x every way the MTA or the client fails.

Each row runs one session through the in-process proxy to ``FaultMTA`` and checks the same
four things:

- no forged reply: the reply codes the client got are the MTA's own, in order, plus at most
  one 421 from the proxy at the end -- so never a 250 for a message the MTA did not accept;
- no unfinished message: the MTA saw an end of data only for a message the client finished
  (and then byte for byte as sent);
- no leak: the session's task is gone, the active-sessions gauge is back to 0, and no socket
  of the session (client side or MTA side) is left open in this process;
- the session log line's ``outcome`` and the sessions-by-outcome counter name what happened.

Both ways into a transaction are covered: ``early`` (EHLO, MAIL, RCPT and DATA or the first
BDAT chunk sent before the banner: the proxy replays them) and ``relay`` (the client waits for
every reply). ``python -m tests.test_faults`` rewrites tests/FAULTS.md from the same rows;
``test_faults_table_is_current`` fails when the table and the rows disagree.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import sys
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from proxy.metrics import Metrics
from proxy.server import serve
from proxy.smtp import Reply, ReplyReader

from .faultmta import BEHAVIOURS, FAULT_REPLY, STEPS, FaultMTA, reset
from .samples import sample
from .test_session import make_config

PATHS = ("early", "relay")
CLIENT_WAYS = ("close", "reset")
MTA_STEPS = STEPS
# Steps the client can vanish at, the same ones: after sending that step's bytes (part of
# them for the message and the chunks), without reading the answer.
CLIENT_STEPS = STEPS
TIMEOUT = 0.3  # every proxy timeout in these rows
SECTIONS: dict[str, dict[str, Any]] = {
    "timeouts": {
        "banner": TIMEOUT,
        "mail": TIMEOUT,
        "rcpt": TIMEOUT,
        "data_init": TIMEOUT,
        "data_block": 1.0,  # the client pauses mid-message on purpose
        "data_term": TIMEOUT,
        "reply": TIMEOUT,
        "command": 2.0,
        "early_drain": 0.2,
    },
    "upstream": {"connect_timeout": TIMEOUT},
    "metrics": {"listen": ""},
}

HEAD = b"Subject: fault matrix\r\n\r\n" + b"first half of the body\r\n" * 20
TAIL = b"..a dot-stuffed line\r\nsecond half\r\n"
# The MTA stops reading mid-message: the message must exceed every socket buffer between
# proxy and MTA for the proxy's send to block (loopback autotunes them up to 4 MiB).
BIG_TAIL = b"x" * 998 + b"\r\n"
BIG_LINES = 8 * 1024
CHUNK1 = b"Subject: chunked\r\n\r\n.\r\nnot an end\r\n"
CHUNK2 = b"last chunk\r\n" * 10

ENVELOPE = [
    ("EHLO", b"EHLO client.test\r\n"),
    ("MAIL", b"MAIL FROM:<a@src.test>\r\n"),
    ("RCPT", b"RCPT TO:<b@dest.test>\r\n"),
]


# --------------------------------------------------------------------------- the rows


@dataclass(frozen=True)
class Row:
    actor: str  # "mta" or "client"
    path: str
    step: str
    how: str

    @property
    def id(self) -> str:
        return f"{self.path}-{self.step}-{self.how}"

    @property
    def bdat(self) -> bool:
        return self.step in ("BDAT", "BDAT-LAST")

    @property
    def test(self) -> str:
        name = "test_mta_fault" if self.actor == "mta" else "test_client_vanishes"
        return f"tests/test_faults.py::{name}[{self.id}]"


def mta_rows() -> list[Row]:
    rows = []
    for path in PATHS:
        for step in MTA_STEPS:
            hows = BEHAVIOURS + (("refused",) if step == "connect" else ())
            rows += [Row("mta", path, step, how) for how in hows]
    return rows


def client_rows() -> list[Row]:
    return [
        Row("client", path, step, how)
        for path in PATHS
        for step in CLIENT_STEPS
        for how in CLIENT_WAYS
    ]


CLIENT_GONE = {"client-gone", "client-closed", "client-gone-in-data"}


def expected_outcomes(row: Row) -> set[str]:
    """What the session log must say. Derived from the fault, not from observed runs."""
    if row.actor == "client":
        if row.step == "QUIT":
            return {"quit"} | CLIENT_GONE  # the QUIT got through, or the proxy saw it go
        return CLIENT_GONE
    if row.how == "refused" or (row.step == "connect" and row.how == "stall"):
        return {"upstream-down"}
    if row.how in ("close", "reset"):
        return {"upstream-lost"}
    if row.how == "stall":
        return {"upstream-timeout"}
    if row.how == "421":
        if row.step == "mid-message":
            # The MTA's 421 waits unread while the proxy is still sending the message: the
            # proxy may find the connection gone first.
            return {"upstream-421", "upstream-lost"}
        return {"upstream-421"}  # the MTA said it is closing the channel
    return {"quit"}  # 4xx/5xx: the client gives up politely


def expectation(row: Row) -> str:
    """The row's promise in words, for the table."""
    if row.actor == "client":
        unfinished = row.step in ("connect", "banner", "EHLO", "MAIL", "RCPT", "DATA")
        unfinished = unfinished or row.step in ("mid-message", "BDAT", "BDAT-LAST")
        mta = "MTA gets no message" if unfinished else "MTA may get the finished message"
        return f"{mta}; no leak; outcome {'/'.join(sorted(expected_outcomes(row)))}"
    if row.how in ("421", "4xx", "5xx"):
        code = FAULT_REPLY[row.how]
        client = f"client gets the MTA's {code}"
    elif row.how in ("close", "reset", "stall", "refused"):
        client = "client gets 421 from the proxy"
    else:  # pragma: no cover
        raise AssertionError(row.how)
    if row.step == "QUIT":
        client += " (message already accepted)"
    else:
        client += ", never 250"
    outcome = "/".join(sorted(expected_outcomes(row)))
    return f"{client}; no leak; outcome {outcome}"


# --------------------------------------------------------------------------- the client


@dataclass
class Result:
    codes: list[int] = field(default_factory=list)
    finished: bool = False  # the client sent its whole message, end included
    message: bytes = b""
    final: int | None = None  # reply to the end of data / BDAT LAST


class FaultClient:
    def __init__(self, stream: trio.SocketStream, result: Result) -> None:
        self.stream = stream
        self.replies = ReplyReader()
        self.result = result
        self.eof = False

    async def send(self, data: bytes) -> bool:
        try:
            with trio.move_on_after(3):
                await self.stream.send_all(data)
                return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return False

    async def reply(self) -> Reply | None:
        with trio.move_on_after(5):
            while (r := self.replies.next_reply()) is None:
                if self.eof:
                    return None
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:  # reset by the proxy
                    data = b""
                if not data:
                    self.eof = True
                    return None
                self.replies.feed(data)
            self.result.codes.append(r.code)
            return r
        raise AssertionError(f"no reply within 5 s (got {self.result.codes})")

    async def vanish(self, how: str) -> None:
        if how == "reset":
            reset(self.stream.socket)
        await self.stream.aclose()

    async def give_up(self, last: Reply | None) -> None:
        """After a failure: QUIT unless the server is already gone, then hang up."""
        if last is not None and last.code != 421 and not self.eof and await self.send(b"QUIT\r\n"):
            await self.reply()
        await self.stream.aclose()


async def run_client(port: int, row: Row, vanish: str | None) -> Result:
    """One transaction along ``row.path``; stop where ``vanish`` (a step) says."""
    res = Result()
    c = FaultClient(await trio.open_tcp_stream("127.0.0.1", port), res)
    how = row.how
    if vanish == "connect":
        await c.vanish(how)
        return res
    big = row.actor == "mta" and row.step == "mid-message" and row.how == "stall"
    if row.bdat:
        opener = [("BDAT", b"BDAT %d\r\n" % len(CHUNK1) + CHUNK1)]
    else:
        opener = [("DATA", b"DATA\r\n")]
    steps = ENVELOPE + opener
    if row.path == "early":
        sent = []
        for step, data in steps:
            sent.append(data if step != "BDAT" or vanish != "BDAT" else data[: -len(CHUNK1) // 2])
            if step == vanish:
                await c.send(b"".join(sent))
                await c.vanish(how)
                return res
        await c.send(b"".join(sent))
        last = None
        for _ in range(1 + len(steps)):
            last = await c.reply()
            if last is None:
                break
            if vanish == "banner":
                await c.vanish(how)
                return res
        ok = last is not None and last.code in (250, 354) and res.codes[:2] == [220, 250]
        if not ok or any(code >= 400 for code in res.codes):
            await c.give_up(last)
            return res
    else:
        banner = await c.reply()
        if vanish == "banner":
            await c.vanish(how)
            return res
        if banner is None or banner.code != 220:
            await c.give_up(banner)
            return res
        for step, data in steps:
            if step == vanish:
                await c.send(data if step != "BDAT" else data[: -len(CHUNK1) // 2])
                await c.vanish(how)
                return res
            await c.send(data)
            r = await c.reply()
            if r is None or r.code >= 400:
                await c.give_up(r)
                return res
    # The message: in two parts, so that faults can strike between them.
    if row.bdat:
        head = b"BDAT %d LAST\r\n" % len(CHUNK2) + CHUNK2[:20]
        tail = CHUNK2[20:]
        res.message = CHUNK1 + CHUNK2
    else:
        head = HEAD
        tail = (BIG_TAIL * BIG_LINES if big else TAIL) + b".\r\n"
        res.message = HEAD + tail[:-3]
    await c.send(head)
    if vanish in ("mid-message", "BDAT-LAST"):
        await c.vanish(how)
        return res
    await trio.sleep(0.05)  # let the first part reach the MTA before the rest
    if await c.send(tail):
        res.finished = True
    if vanish == "dot":
        await c.vanish(how)
        return res
    final = await c.reply()
    res.final = final.code if final is not None else None
    if final is None or final.code == 421:
        await c.give_up(final)
        return res
    if vanish == "QUIT":
        await c.send(b"QUIT\r\n")
        await c.vanish(how)
        return res
    await c.give_up(final)
    return res


# --------------------------------------------------------------------------- the checks


def _tcp_table() -> dict[int, tuple[int, int, str]]:
    """socket inode -> (local port, remote port, state) for this network namespace."""
    table = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            next(f)
            for line in f:
                parts = line.split()
                local, remote, state, inode = parts[1], parts[2], parts[3], int(parts[9])
                table[inode] = (
                    int(local.rsplit(":", 1)[1], 16),
                    int(remote.rsplit(":", 1)[1], 16),
                    state,
                )
    return table


def session_sockets(proxy_port: int, mta_port: int, ignore: int = 0) -> list[str]:
    """This process's open sockets that belong to a proxy session: accepted from a client
    (local port = the proxy's, not the listener) or connected to the MTA."""
    table = _tcp_table()
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m is None or int(m.group(1)) not in table:
            continue
        local, remote, state = table[int(m.group(1))]
        if local == ignore:
            continue
        if (local == proxy_port and state != "0A") or remote == mta_port:
            found.append(f"fd {fd}: {local}->{remote} state {state}")
    return found


def session_tasks() -> list[str]:
    """Tasks running the server's per-connection handler, anywhere in the task tree."""
    found = []
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if task.name.endswith("serve.<locals>.handle"):
            found.append(task.name)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return found


def sessions_ended(metrics: Metrics) -> dict[str, float]:
    return {
        s.labels["outcome"]: s.value
        for fam in metrics.sessions.collect()
        for s in fam.samples
        if s.name.endswith("_total") and s.value
    }


@asynccontextmanager
async def running(mta: FaultMTA) -> AsyncIterator[tuple[int, Metrics]]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(mta.serve)
        metrics = Metrics(process=False)
        bound = await nursery.start(serve, make_config(port, **SECTIONS), metrics)
        try:
            yield bound[0][1], metrics
        finally:
            mta.release.set()
            nursery.cancel_scope.cancel()


async def run_row(row: Row, caplog: pytest.LogCaptureFixture) -> tuple[Result, FaultMTA, str]:
    caplog.set_level(logging.INFO, "pipeconnect.session")
    if row.actor == "mta":
        mta = FaultMTA(row.step, row.how, banner_delay=0.05 if row.path == "early" else 0)
        vanish = None
    else:
        mta = FaultMTA(banner_delay=0.05 if row.path == "early" else 0)
        vanish = row.step
    with warnings.catch_warnings(record=True) as caught:
        # A socket the session forgot to close is closed when its objects are freed, with a
        # ResourceWarning: record those here rather than let them escape as unraisable.
        warnings.simplefilter("always", ResourceWarning)
        async with running(mta) as (port, metrics):
            res = await run_client(port, row, vanish)
            # The session must end by itself, within its timeouts.
            with trio.fail_after(5):
                # Polled: no event marks the end of a handler task or a gauge going to 0.
                plain = {"listener": "plain"}
                while session_tasks() or sample(metrics, "active_sessions", **plain):  # noqa: ASYNC110
                    await trio.sleep(0.01)
            gc.collect()
            leaked = session_sockets(port, mta.port, mta.filler_port)
            leaked += [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
            ended = sessions_ended(metrics)
            messages = sample(metrics, "relayed_messages_total")
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeconnect.session"]

    # -- no forged reply: the client's codes are the MTA's, then at most one 421 of ours.
    n = len(mta.sent_codes)
    assert res.codes[:n] == mta.sent_codes[: len(res.codes[:n])], (res.codes, mta.sent_codes)
    assert res.codes[n:] in ([], [421]), (res.codes, mta.sent_codes)
    if res.final is not None and 200 <= res.final < 300:
        assert mta.accepted == [res.message]
    assert messages == len(mta.accepted)  # the proxy counts the MTA's 250s, no more

    # -- no unfinished message
    for message in mta.completed:
        assert res.finished and message == res.message, "MTA saw an end the client never sent"

    # -- no leak
    assert leaked == [], leaked

    # -- the log and the metrics
    if row.actor == "client" and row.step == "connect" and row.how == "reset" and not lines:
        # Reset before the proxy looked at the connection: no session was started at all.
        assert ended == {}
        return res, mta, ""
    assert len(lines) == 1, lines
    outcome = re.search(r"outcome=(\S+)", lines[0])
    assert outcome is not None, lines[0]
    assert outcome.group(1) in expected_outcomes(row), lines[0]
    assert ended == {outcome.group(1): 1.0}
    return res, mta, lines[0]


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("row", mta_rows(), ids=lambda r: r.id)
async def test_mta_fault(row: Row, caplog: pytest.LogCaptureFixture) -> None:
    res, mta, line = await run_row(row, caplog)
    assert mta.connections <= 1
    if row.how in FAULT_REPLY:
        # The MTA's own refusal reaches the client (where the client was still asking).
        assert FAULT_REPLY[row.how] in res.codes, (res.codes, line)
    else:
        assert res.codes[-1:] == [421], (res.codes, line)
    if row.step != "QUIT":
        assert res.final != 250 and mta.accepted == [], (res.codes, line)
    else:
        assert res.final == 250 and len(mta.accepted) == 1


@pytest.mark.parametrize("row", client_rows(), ids=lambda r: r.id)
async def test_client_vanishes(row: Row, caplog: pytest.LogCaptureFixture) -> None:
    res, mta, line = await run_row(row, caplog)
    if row.step in ("dot", "QUIT") and row.how == "close":
        # A client that finished its message and then hung up still gets it delivered.
        assert mta.accepted == [res.message], line
    if row.step not in ("dot", "QUIT"):
        assert mta.completed == [] and not res.finished, line


# --------------------------------------------------------------------------- the table

TABLE = Path(__file__).with_name("FAULTS.md")


def render_table() -> str:
    out = [
        "# Fault matrix",
        "",
        "Generated by `python -m tests.test_faults` from the rows in tests/test_faults.py;",
        "`test_faults_table_is_current` keeps this file and the rows in step.",
        "",
        "Every row also checks: the client's reply codes are the MTA's own in order (plus at",
        "most one 421 from the proxy), so no 250 for a message the MTA did not accept; the MTA",
        "sees an end of data only for a message the client finished; after the session no",
        "session task, no session socket and no active-session count is left; one log line",
        "whose outcome matches `pipeconnect_sessions_total{outcome}`.",
        "",
        "Paths: `early` = EHLO, MAIL, RCPT and DATA (or the first BDAT chunk) sent before the",
        "banner and replayed by the proxy; `relay` = the client waits for every reply.",
        "Faults: `close` (FIN), `reset` (RST: SO_LINGER 0), `421` (then close), `4xx` (451),",
        "`5xx` (554), `stall` (past the proxy's timeout: 0.3 s for a reply; at `connect` a TCP",
        "connect that never completes; at `mid-message` the MTA stops reading an 8 MiB message",
        "and the proxy's blocked send gives up after the 1 s data-block timeout), `refused`",
        "(nothing listens).",
        "",
        "Found and fixed by these rows: `*-mid-message-stall` hung for ever (no bound on a send",
        "to the MTA: now `timeouts.data_block`, outcome `upstream-timeout`); `*-421` rows were",
        "logged as `client-closed` or `upstream-lost` depending on the path, after relaying",
        "more commands into the closed connection (now the session ends at the MTA's 421 with",
        "outcome `upstream-421`).",
        "",
        "## The MTA fails",
        "",
        "| path | step | fault | expected | test |",
        "|---|---|---|---|---|",
    ]
    out += [
        f"| {r.path} | {r.step} | {r.how} | {expectation(r)} | `{r.test}` |" for r in mta_rows()
    ]
    out += [
        "",
        "## The client vanishes",
        "",
        "The client sends the step (half of the message or chunk for `mid-message`, `BDAT`,",
        "`BDAT-LAST`), then closes or resets without reading the answer.",
        "",
        "| path | step | client | expected | test |",
        "|---|---|---|---|---|",
    ]
    out += [
        f"| {r.path} | {r.step} | {r.how} | {expectation(r)} | `{r.test}` |" for r in client_rows()
    ]
    out += [
        "",
        "## Against the real Postfix",
        "",
        "tests/integration/test_faults_postfix.py kills the `smtpd` serving the session",
        "(SIGKILL) at the banner, after RCPT, mid-DATA and before the final reply: the client",
        "gets 421 and never 250, and the Maildir holds no message.",
        "",
    ]
    return "\n".join(out)


def test_faults_table_is_current() -> None:
    assert TABLE.read_text() == render_table(), "run: python -m tests.test_faults"


def test_matrix_is_complete() -> None:
    """Every step meets every fault, on both paths."""
    seen = {(r.path, r.step, r.how) for r in mta_rows()}
    for path in PATHS:
        for step in MTA_STEPS:
            for how in BEHAVIOURS:
                assert (path, step, how) in seen
    assert len({r.id for r in client_rows()}) == len(PATHS) * len(CLIENT_STEPS) * 2


if __name__ == "__main__":
    TABLE.write_text(render_table())
    sys.stdout.write(f"wrote {TABLE} ({len(mta_rows())} + {len(client_rows())} rows)\n")
