"""The important rows of the fault matrix against the real Postfix: its ``smtpd`` is killed
(SIGKILL) while it serves a session through the proxy.

Postfix is made to pause where the kill must land, with its own ``sleep`` restriction:
before the greeting (``smtpd_client_restrictions`` with ``smtpd_delay_reject = no``) and
after the end of data, before the final reply (``smtpd_end_of_data_restrictions``). Then:
the client gets a 4xx and never a 250, the Maildir holds no message, and the proxy's session
ends, closed and counted. A control row without a kill proves the same path delivers.
"""

from __future__ import annotations

import logging
import re

import pytest
import trio

from proxy.metrics import Metrics
from proxy.server import serve
from tests.conftest import PostfixFactory
from tests.mta import Postfix, _children
from tests.samples import sample
from tests.test_faults import ENVELOPE, HEAD, TAIL, FaultClient, Result, session_sockets
from tests.test_session import make_config

PAUSE = 3  # seconds Postfix sleeps where the kill lands
POINTS = ("none", "banner", "after-RCPT", "mid-DATA", "before-final-reply")
SECTIONS = {
    "timeouts": {"banner": 10, "reply": 10, "data_term": 10, "early_drain": 0.2},
    "metrics": {"listen": ""},
}


def postfix_for(point: str, make: PostfixFactory) -> Postfix:
    extra = {}
    if point == "banner":
        extra = {"smtpd_client_restrictions": f"sleep {PAUSE}", "smtpd_delay_reject": "no"}
    elif point == "before-final-reply":
        extra = {"smtpd_end_of_data_restrictions": f"sleep {PAUSE}"}
    return make(proxy_protocol=True, forbid_unauth_pipelining=True, extra=extra)


async def kill_smtpd(postfix: Postfix) -> list[int]:
    """SIGKILL the smtpd serving the session (the only one: each row has its own Postfix)
    once the master has forked it."""
    master = postfix.master_pid()
    assert master is not None
    with trio.fail_after(5):
        while not _children(master, "smtpd"):  # noqa: ASYNC110 (a process, not an event)
            await trio.sleep(0.02)
    await trio.sleep(0.3)  # let it reach the pause (or read what was sent)
    pids = postfix.smtpd_kill()
    assert pids, "no smtpd to kill"
    return pids


async def session(port: int, postfix: Postfix, point: str) -> Result:
    res = Result()
    c = FaultClient(await trio.open_tcp_stream("127.0.0.1", port), res)
    async with c.stream:
        await converse(c, res, postfix, point)
    return res


async def converse(c: FaultClient, res: Result, postfix: Postfix, point: str) -> None:
    if point == "banner":
        # Early pipelining: the commands wait in the proxy while Postfix has not greeted.
        await c.send(b"".join(data for _, data in ENVELOPE) + b"DATA\r\n")
        await kill_smtpd(postfix)
        while await c.reply() is not None:
            pass
        return
    banner = await c.reply()
    assert banner is not None and banner.code == 220
    for _, data in ENVELOPE:
        await c.send(data)
        r = await c.reply()
        assert r is not None and r.code == 250, res.codes
    if point == "after-RCPT":
        await kill_smtpd(postfix)
    await c.send(b"DATA\r\n")
    r = await c.reply()
    if r is None or r.code != 354:
        return
    res.message = HEAD + TAIL
    await c.send(HEAD)
    if point == "mid-DATA":
        await trio.sleep(0.1)
        await kill_smtpd(postfix)
    res.finished = await c.send(TAIL + b".\r\n")
    if point == "before-final-reply":
        await kill_smtpd(postfix)
    final = await c.reply()
    res.final = final.code if final is not None else None
    if final is not None and final.code == 250:
        await c.send(b"QUIT\r\n")
        await c.reply()


@pytest.mark.parametrize("point", POINTS)
async def test_smtpd_killed(
    point: str, postfix_factory: PostfixFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pipeconnect.session")
    postfix = postfix_for(point, postfix_factory)
    metrics = Metrics(process=False)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(serve, make_config(postfix.port, **SECTIONS), metrics)
        port = bound[0][1]
        res = await session(port, postfix, point)
        with trio.fail_after(5):
            while sample(metrics, "active_sessions", listener="plain"):  # noqa: ASYNC110
                await trio.sleep(0.02)
        leaked = session_sockets(port, postfix.port)
        nursery.cancel_scope.cancel()
    [line] = [r.getMessage() for r in caplog.records if r.name == "pipeconnect.session"]
    outcome = re.search(r"outcome=(\S+)", line)
    assert outcome is not None
    assert leaked == []

    if point == "none":
        assert res.final == 250 and outcome.group(1) == "quit", (res.codes, line)
        [message] = await trio.to_thread.run_sync(postfix.wait_messages, 1)
        assert b"second half" in message
        return

    # Never a 250 for the message; the failure reported as a 4xx (the proxy's 421).
    assert 250 not in res.codes[5 if point != "banner" else 0 :], (res.codes, line)
    assert res.codes[-1] == 421, (res.codes, line)
    if point == "banner":
        assert res.codes == [421], "the kill must land before the greeting"
        early = sum(len(data) for _, data in ENVELOPE) + len(b"DATA\r\n")
        assert f" E={early} " in line, line  # the held early input is in the log
    assert outcome.group(1) == "upstream-lost", line
    assert sample(metrics, "sessions_total", listener="plain", outcome="upstream-lost") == 1
    assert sample(metrics, "relayed_messages_total") == 0
    # Postfix noticed the kill, and delivered nothing (not even later, from its queue).
    await trio.to_thread.run_sync(postfix.wait_log, r"smtpd.* killed by signal 9")
    await trio.sleep(1)
    assert postfix.message_files() == [], postfix.maillog()
