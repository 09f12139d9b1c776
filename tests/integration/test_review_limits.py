"""Limits an outside review found broken, each against the real Postfix behind the proxy.

- SIGTERM while the MTA is deciding on a finished message must not turn its 250 into our
  421 (the client would retry: a duplicate), yet an idle session is still drained.
- A client that never reads cannot hold its session for ever.
- A timeout bounds the whole line, not one read (a trickling client is cut off).
- Message lines longer than 1000 octets that Postfix accepts are not refused.
- Bare LF in message data: normalised by default; under ``reject`` the 554 comes after the
  end of data, readable, not destroyed by a reset.

The clients are raw blocking sockets on loopback (or curl / swaks); every wait is bounded
by a socket timeout or a deadline.
"""

from __future__ import annotations

import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest

from proxy.smtp import Reply, ReplyReader
from tests.conftest import PostfixFactory
from tests.integration.test_smuggling import settle
from tests.mta import swaks
from tests.proxyproc import ProxyProcess

ProxyFactory = Callable[..., ProxyProcess]
RCPT = "box@dest.test"
ENVELOPE = (
    b"MAIL FROM:<a@dest.test>\r\n",
    b"RCPT TO:<box@dest.test>\r\n",
)


class Client:
    """A blocking raw SMTP client from 127.0.0.1; every read is bounded by its timeout."""

    def __init__(self, port: int, *, timeout: float = 10, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.port: int = self.sock.getsockname()[1]
        self.reader = ReplyReader()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self, timeout: float | None = None) -> Reply | None:
        """The next reply, or None when the server closed."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        while (r := self.reader.next_reply()) is None:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.reader.feed(chunk)
        return r

    def expect(self, code: int, timeout: float | None = None) -> Reply:
        r = self.reply(timeout)
        assert r is not None and r.code == code, (code, r)
        return r

    def hello(self) -> Reply:
        """Banner and EHLO; returns the EHLO reply."""
        self.expect(220)
        self.send(b"EHLO client.test\r\n")
        return self.expect(250)

    def envelope(self) -> None:
        for line in ENVELOPE:
            self.send(line)
            self.expect(250)


def session_line(proxy: ProxyProcess, port: int, timeout: float) -> str | None:
    """The proxy's log line for the session of the client on local ``port``, once written."""
    deadline = time.monotonic() + timeout
    while True:
        for line in proxy.session_lines(0, 0):
            if f"]:{port} " in line:
                return line
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def outcome(line: str) -> str:
    found = re.search(r"outcome=(\S+)", line)
    assert found is not None, line
    return found.group(1)


def first_line(r: Reply | None) -> bytes:
    return r.lines[0] if r is not None else b"<closed>"


# ---------------------------------------------------------------- (3) SIGTERM, no duplicate

PAUSE = 4  # Postfix sleeps this long between the end of data and its verdict
GRACE = 1
DATA_TERM = 10
MESSAGE = b"From: <a@dest.test>\r\nSubject: drained\r\n\r\nbody\r\n"


@pytest.mark.parametrize("mode", ["data", "bdat", "idle"])
def test_sigterm_relays_the_verdict_of_a_finished_message(
    mode: str, postfix_factory: PostfixFactory, proxy_factory: ProxyFactory
) -> None:
    """SIGTERM right after the end of data (DATA's dot or BDAT LAST) while Postfix pauses
    before its verdict: the client gets Postfix's 250, not our 421, and one message is
    stored; an idle session still gets 421 4.3.2 when the grace ends, and the process
    exits 0 (``idle``: only the idle session)."""
    pf = postfix_factory(
        proxy_protocol=True,
        forbid_unauth_pipelining=True,
        extra={"smtpd_end_of_data_restrictions": f"sleep {PAUSE}, permit"},
    )
    proxy = proxy_factory(
        pf.port, server={"shutdown_grace": GRACE}, timeouts={"data_term": DATA_TERM}
    )
    assert proxy.proc is not None
    with Client(proxy.port) as idle, Client(proxy.port) as sender:
        idle.hello()
        final: Reply | None = None
        if mode != "idle":
            ehlo = sender.hello()
            sender.envelope()
            if mode == "data":
                sender.send(b"DATA\r\n")
                sender.expect(354)
                sender.send(MESSAGE + b".\r\n")
            else:
                assert any(ln.startswith(b"CHUNKING") for ln in ehlo.lines), ehlo
                sender.send(b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE)
        t0 = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        drained = idle.reply(timeout=GRACE + 5)
        t_idle = time.monotonic() - t0
        after: Reply | None = None
        if mode != "idle":
            final = sender.reply(timeout=PAUSE + 4)
            after = sender.reply(timeout=5)  # then the session ends as the others do
        t_final = time.monotonic() - t0
        try:
            code = proxy.proc.wait(timeout=GRACE + DATA_TERM + 3)
        except subprocess.TimeoutExpired:
            code = None
        t_exit = time.monotonic() - t0
    print(f"{mode}: idle 421 after {t_idle:.2f}s, verdict {first_line(final)!r} after "
          f"{t_final:.2f}s, exit {code} after {t_exit:.2f}s")  # fmt: skip
    if mode != "idle":
        assert final is not None and final.code == 250, (
            f"after SIGTERM the finished message got {first_line(final)!r} "
            f"{t_final:.2f}s later, not Postfix's verdict"
        )
        assert b"queued as" in final.lines[0], final
        assert PAUSE - 1 <= t_final <= PAUSE + 2, t_final  # the 250 came after the pause
        assert after is not None and after.code == 421 and b"4.3.2" in after.lines[0], after
    assert drained is not None and drained.code == 421, drained
    assert b"4.3.2" in drained.lines[0], drained
    assert GRACE - 0.3 <= t_idle <= GRACE + 2, t_idle
    assert code == 0, (code, proxy.log())
    assert len(settle(pf)) == (0 if mode == "idle" else 1), pf.maillog()


# ---------------------------------------------------------------- (4) a client that never reads

TIMEOUTS_2S = {
    key: 2
    for key in (
        "banner", "command", "mail", "rcpt", "data_init", "data_block", "data_term", "reply",
        "early_drain",
    )
}  # fmt: skip


def test_client_that_never_reads_is_cut_off(
    postfix_factory: PostfixFactory, proxy_factory: ProxyFactory
) -> None:
    """A client with a tiny receive buffer pipelines RSET lines and never reads its
    replies: the proxy, stuck writing to it, still ends the session within ~15 s (every
    timeout 2 s), with a timeout outcome; another client is served meanwhile."""
    # RSET is a junk command to Postfix: without this, its error limit ends the flood.
    pf = postfix_factory(
        proxy_protocol=True,
        forbid_unauth_pipelining=True,
        extra={"smtpd_junk_command_limit": "100000000"},
    )
    proxy = proxy_factory(pf.port, timeouts=TIMEOUTS_2S)
    flood = memoryview(b"RSET\r\n" * 200_000)
    sent = [0]
    stop = threading.Event()

    def send_loop(sock: socket.socket, deadline: float) -> None:
        sock.setblocking(False)
        while sent[0] < len(flood) and time.monotonic() < deadline and not stop.is_set():
            try:
                sent[0] += sock.send(flood[sent[0] : sent[0] + 65536])
            except BlockingIOError:
                select.select([], [sock], [], 0.2)
            except OSError:
                return  # the proxy closed: what the test waits for

    with Client(proxy.port, rcvbuf=4096) as flooder:
        flooder.expect(220)
        t0 = time.monotonic()
        sender = threading.Thread(target=send_loop, args=(flooder.sock, t0 + 20), daemon=True)
        sender.start()
        try:
            time.sleep(1)
            other = swaks(proxy.port, to=RCPT, timeout=15)
            t_other = time.monotonic() - t0
            line = session_line(proxy, flooder.port, timeout=15 - (time.monotonic() - t0))
            took = time.monotonic() - t0
        finally:
            stop.set()
            sender.join(timeout=5)
    print(f"other client done at {t_other:.2f}s (rc {other.returncode}); flooder sent "
          f"{sent[0]} bytes; its session line after {took:.2f}s: {line}")  # fmt: skip
    assert other.returncode == 0, other.stdout + other.stderr
    assert "queued as" in other.stdout
    assert line is not None, (
        f"the non-reading client's session is still open {took:.1f}s later "
        f"({sent[0]} bytes of RSET sent)"
    )
    assert outcome(line) != "open" and "timeout" in outcome(line), line


# ---------------------------------------------------------------- (5) whole-line timeouts

LINE_TIMEOUT = 3


@dataclass
class Ended:
    elapsed: float
    reply: Reply | None  # None: closed without a reply
    sent: int


def trickle(c: Client, data: bytes, give_up: float) -> Ended | None:
    """Send ``data`` one byte a second, watching for a reply or a close; None if neither
    came within ``give_up`` seconds."""
    t0 = time.monotonic()
    for i in range(len(data)):
        if time.monotonic() - t0 > give_up:
            return None
        try:
            c.send(data[i : i + 1])
            reply = c.reply(timeout=1.0)
            return Ended(time.monotonic() - t0, reply, i + 1)
        except TimeoutError:
            continue
        except OSError:
            return Ended(time.monotonic() - t0, None, i + 1)
    return None


def _line_timeout_proxy(
    postfix_factory: PostfixFactory, proxy_factory: ProxyFactory
) -> tuple[ProxyProcess, Callable[[], list[bytes]]]:
    pf = postfix_factory(proxy_protocol=True, forbid_unauth_pipelining=True)
    timeouts = {"command": LINE_TIMEOUT, "data_block": LINE_TIMEOUT}
    return proxy_factory(pf.port, timeouts=timeouts), lambda: settle(pf)


def _assert_timed_out(proxy: ProxyProcess, c: Client, ended: Ended | None, sent: int) -> None:
    assert ended is not None, f"no timeout 8 s into a line trickled at 1 byte/s ({sent} bytes)"
    print(f"ended after {ended.elapsed:.2f}s, {ended.sent} bytes: {first_line(ended.reply)!r}")
    assert ended.reply is None or (ended.reply.code == 421 and b"4.4.2" in ended.reply.lines[0])
    assert LINE_TIMEOUT - 1 <= ended.elapsed <= LINE_TIMEOUT + 2.5, ended
    line = session_line(proxy, c.port, timeout=8)
    assert line is not None and "timeout" in outcome(line), line


def test_trickled_command_line_times_out(
    postfix_factory: PostfixFactory, proxy_factory: ProxyFactory
) -> None:
    """MAIL trickled one byte a second (each read well within the 3 s command timeout):
    the session ends ~3 s after the line started, long before the line is complete."""
    proxy, _ = _line_timeout_proxy(postfix_factory, proxy_factory)
    line = b"MAIL FROM:<a@dest.test>\r\n"
    with Client(proxy.port) as c:
        c.hello()
        ended = trickle(c, line, give_up=8)
        _assert_timed_out(proxy, c, ended, 8)
        assert ended is not None and ended.sent < len(line)


def test_trickled_message_line_times_out(
    postfix_factory: PostfixFactory, proxy_factory: ProxyFactory
) -> None:
    """After 354, a line trickled one byte a second without a line end: the 3 s
    data_block timeout ends the session within ~5 s, and no message is stored."""
    proxy, messages = _line_timeout_proxy(postfix_factory, proxy_factory)
    with Client(proxy.port) as c:
        c.hello()
        c.envelope()
        c.send(b"DATA\r\n")
        c.expect(354)
        ended = trickle(c, b"x" * 30, give_up=8)
        _assert_timed_out(proxy, c, ended, 8)
    assert messages() == []


def test_whole_lines_within_the_timeout_are_not_cut_off(
    postfix_factory: PostfixFactory, proxy_factory: ProxyFactory
) -> None:
    """The control: MAIL, RCPT and four message lines, each whole line sent 2 s after the
    last (within the 3 s timeouts): delivered."""
    proxy, messages = _line_timeout_proxy(postfix_factory, proxy_factory)
    body = [b"Subject: slow but steady\r\n", b"\r\n", b"line 3\r\n", b"line 4\r\n.\r\n"]
    with Client(proxy.port) as c:
        c.hello()
        for line in ENVELOPE:
            time.sleep(2)
            c.send(line)
            c.expect(250)
        c.send(b"DATA\r\n")
        c.expect(354)
        for line in body:
            time.sleep(2)
            c.send(line)
        final = c.reply(timeout=10)
        assert final is not None and final.code == 250, final
    [stored] = messages()
    assert b"line 4\n" in stored


# ---------------------------------------------------------------- (9) long message lines


def long_line(tag: bytes, octets: int) -> bytes:
    """A line of exactly ``octets`` octets, CRLF included, without whitespace."""
    text = tag + b"-" + b"0123456789abcdefghijklmnopqrstuvwxyz" * (octets // 36 + 1)
    return text[: octets - 2] + b"\r\n"


def test_long_message_lines_are_delivered(
    postfix_factory: PostfixFactory, proxy_factory: ProxyFactory
) -> None:
    """Lines of 1500, 5000 and 100 000 octets, which Postfix accepts (it may wrap them at
    its line_length_limit of 2048), go through the proxy's default configuration."""
    pf = postfix_factory(proxy_protocol=True, forbid_unauth_pipelining=True)
    proxy = proxy_factory(pf.port)
    lines = [long_line(b"A", 1500), long_line(b"B", 5000), long_line(b"C", 100_000)]
    with Client(proxy.port) as c:
        c.hello()
        c.envelope()
        c.send(b"DATA\r\n")
        c.expect(354)
        c.send(b"Subject: long lines\r\n\r\n" + b"".join(lines) + b".\r\n")
        final = c.reply(timeout=15)
    assert final is not None and final.code == 250, first_line(final)
    [stored] = pf.wait_messages(1)
    flat = re.sub(rb"\s", b"", stored)
    for line in lines:
        assert line.strip() in flat, line[:20]


# ---------------------------------------------------------------- (10) bare LF in message data

SIZES = {"1M": 1 << 20, "3M": 3 << 20}


def lf_text(name: str, size: int) -> bytes:
    """A message of about ``size`` octets whose every line ends in a bare LF."""
    head = b"Subject: upload-%s\n\n" % name.encode()
    line = b"line %07d of the %s upload, ending in a bare LF\n"
    out = [head]
    total, i = len(head), 0
    while total < size:
        out.append(line % (i, name.encode()))
        total += len(out[-1])
        i += 1
    return b"".join(out)


def curl(port: int, path: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("curl")
    if exe is None:
        pytest.skip("curl is not installed")
    cmd = [exe, "-sS", "--max-time", "30", f"smtp://127.0.0.1:{port}"]
    cmd += ["--mail-from", "a@dest.test", "--mail-rcpt", RCPT, "-T", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=40, check=False)


def test_curl_lf_upload_is_normalized_by_default(
    postfix_factory: PostfixFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """curl -T of LF-only files (1 MB, 3 MB) through the default configuration succeeds;
    Postfix, itself refusing any bare LF here, stores each message line for line."""
    pf = postfix_factory(
        proxy_protocol=True,
        forbid_unauth_pipelining=True,
        # Postfix itself refuses a bare LF (no exclusions), so a delivery proves CRLF.
        extra={"smtpd_forbid_bare_newline": "yes", "smtpd_forbid_bare_newline_exclusions": ""},
    )
    proxy = proxy_factory(pf.port)
    bodies = []
    for name, size in SIZES.items():
        path = tmp_path / f"{name}.txt"
        path.write_bytes(text := lf_text(name, size))
        bodies.append(text.split(b"\n\n", 1)[1])
        t0 = time.monotonic()
        done = curl(proxy.port, path)
        print(f"curl {name}: exit {done.returncode} in {time.monotonic() - t0:.2f}s")
        assert done.returncode == 0, (name, done.returncode, done.stderr)
    stored = settle(pf)
    assert len(stored) == len(SIZES), pf.maillog()
    for message, body in zip(stored, bodies, strict=True):
        assert message.split(b"\n\n", 1)[1].rstrip(b"\n") == body.rstrip(b"\n")
    assert "bare <LF>" not in pf.maillog()


def refused_reply(port: int, data: bytes) -> str:
    """Send one message (``data`` ends in CRLF . CRLF) and describe the reply after it, or
    how the connection failed before a reply could be read."""
    with Client(port, timeout=20) as c:
        c.hello()
        c.envelope()
        c.send(b"DATA\r\n")
        c.expect(354)
        t0, sent = time.monotonic(), 0
        try:
            # Paced like a sender on a real link, so the message is still in flight when
            # the proxy refuses it (on loopback a burst would fit the socket buffers).
            for sent in range(0, len(data), 65536):
                c.send(data[sent : sent + 65536])
                time.sleep(0.005)
            final = c.reply(timeout=15)
        except OSError as exc:
            return f"{exc!r} after {sent} of {len(data)} bytes ({time.monotonic() - t0:.2f}s)"
        return f"{final.code if final else ''} {first_line(final).decode()}"


def test_rejected_bare_lf_gets_a_readable_554_after_the_end(
    postfix_factory: PostfixFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """``bare_newline = "reject"``: 1 MB and 3 MB messages with bare LFs from the first
    line, then CRLF . CRLF; the client can send it all and then reads 554 5.5.2 (not a
    reset); Postfix stores nothing; curl's exit code is not 55 (send failure)."""
    pf = postfix_factory(proxy_protocol=True, forbid_unauth_pipelining=True)
    proxy = proxy_factory(pf.port, limits={"bare_newline": "reject"})
    problems = []
    for name, size in SIZES.items():
        got = refused_reply(proxy.port, lf_text(name, size) + b"\r\n.\r\n")
        print(f"raw {name}: {got}")
        if not got.startswith("554 5.5.2"):
            problems.append(f"raw {name}: {got}")
        path = tmp_path / f"{name}.txt"
        path.write_bytes(lf_text(name, size))
        done = curl(proxy.port, path)
        print(f"curl {name}: exit {done.returncode}: {done.stderr.strip()}")
        if done.returncode in (0, 55):
            problems.append(f"curl {name}: exit {done.returncode} {done.stderr.strip()}")
    assert problems == []
    assert settle(pf) == []
