"""A real Exim 4.96 client delivering through the proxy to a real Postfix 3.7.

Postfix runs with ``smtpd_forbid_unauth_pipelining = yes``: it answers any input before
its greeting, or a command pipelined behind EHLO, with 554 — so every delivery here also
proves the proxy never talks early or pipelines past a sync point.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from tests.conftest import ProxyFactory
from tests.mta import EximClient, Postfix, deliveries


def body(n: int) -> bytes:
    # A leading dot, a long-ish line and 8-bit-free text: must arrive byte-identical.
    return (
        f"Message number {n} through pipeconnect-proxy.\n"
        ".a line starting with a dot\n"
        "..two dots\n" + "x" * 900 + "\n"
        "last line\n"
    ).encode()


def delivered_body(message: bytes) -> bytes:
    """The body as stored in the Maildir (LF line ends), after the header block."""
    return message.split(b"\n\n", 1)[1]


def test_exim_learns_then_uses_early_pipelining_through_proxy(
    postfix: Postfix,
    exim_client_factory: Callable[..., EximClient],
    proxy_factory: ProxyFactory,
) -> None:
    proxy = proxy_factory(postfix.port)
    exim = exim_client_factory(proxy.port)
    logs = [exim.send("alice@client.test", "box@dest.test", body(n)) for n in (1, 2, 3)]
    found = [deliveries(log) for log in logs]
    assert all(found), (logs, exim.paniclog(), proxy.log(), postfix.maillog())
    lines = [d[-1] for d in found]
    assert [d.kind for d in lines] == ["=>", "=>", "=>"], (logs, proxy.log())
    # first delivery learns the keyword (pipelining, not early); the next two use it
    assert "L" in lines[0].flags and "L*" not in lines[0].flags, lines[0].line
    assert lines[1].early_pipelined and lines[2].early_pipelined, logs

    messages = postfix.wait_messages(3)
    bodies = sorted(delivered_body(m) for m in messages)
    assert bodies == sorted(body(n) for n in (1, 2, 3))

    maillog = postfix.maillog()
    # Postfix saw the Exim client's own address (127.0.0.2), never the proxy's 127.0.0.1
    clients = re.findall(r"smtpd\[\d+\]: [0-9A-F]+: client=(\S+)", maillog)
    assert len(clients) == 3 and all(c.endswith("[127.0.0.2]") for c in clients), maillog
    assert "improper command pipelining" not in maillog
    assert "protocol synchronization" not in maillog

    sessions = proxy.session_lines(3)
    assert len(sessions) == 3, proxy.log()
    assert " L. " in sessions[0] and " L* " in sessions[1] and " L* " in sessions[2]
    assert all("[127.0.0.2]" in s and "outcome=quit" in s for s in sessions)
    # quoted in the closing note
    print("\n".join(d.line for d in lines))
    print("\n".join(ln for ln in maillog.splitlines() if "client=" in ln))
    print("\n".join(sessions))


def test_no_pipelining_mta_gets_one_command_at_a_time(
    exim_server_factory: Callable[..., Any],
    exim_client_factory: Callable[..., EximClient],
    proxy_factory: ProxyFactory,
) -> None:
    """Strict Exim: no PIPELINING offered, any pipelined input answered with 554."""
    server = exim_server_factory(
        pipelining=False, pipe_connect_advertise=False, proxy_hosts="127.0.0.1"
    )
    proxy = proxy_factory(server.port)
    exim = exim_client_factory(proxy.port)
    logs = [exim.send("alice@client.test", "box@dest.test", body(n)) for n in (1, 2)]
    lines = [deliveries(log)[-1] for log in logs]
    assert [d.kind for d in lines] == ["=>", "=>"], logs
    # the client pipelined (the proxy offers PIPELINING), early the second time
    assert lines[1].early_pipelined, logs
    mainlog = server.mainlog()
    assert "synchronization error" not in mainlog
    assert mainlog.count(" <= ") == 2
    assert "[127.0.0.2]" in mainlog  # PROXY header honoured by hosts_proxy


def test_stale_cache_defers_then_delivers_nothing_lost(
    postfix: Postfix,
    exim_client_factory: Callable[..., EximClient],
    proxy_factory: ProxyFactory,
) -> None:
    proxy = proxy_factory(postfix.port)
    # one message per connection: no -Mc child carrying the deferred message along
    exim = exim_client_factory(proxy.port, extra_transport="connection_max_messages = 1")
    first = deliveries(exim.send("alice@client.test", "box@dest.test", body(1)))[-1]
    assert first.kind == "=>"
    # the operator toggles the host off; the client still has the keyword cached
    proxy.restart(pipe_connect={"advertise_hosts": ["!127.0.0.2", "*"]})
    second_log = exim.send("alice@client.test", "box@dest.test", body(2))
    kinds = [d.kind for d in deliveries(second_log, "=> == **")]
    assert "**" not in kinds, second_log  # never bounced
    if "==" in kinds:  # deferred on our 421: retry without early pipelining
        retry = exim.retry()
        done = deliveries(retry)
        assert done and done[-1].kind == "=>" and not done[-1].early_pipelined, retry
    messages = postfix.wait_messages(2)
    assert sorted(delivered_body(m) for m in messages) == sorted([body(1), body(2)])
    assert any("sync-error" in s for s in proxy.session_lines()), proxy.log()
