"""A small, strict SMTP server on trio: the upstream of ``pipeconnect-proxy demo`` and of tests.

It is a demo, not a product, but it judges its clients like a strict MTA does:

- with ``proxy_protocol`` it expects a PROXY v1/v2 header first and reports the header's source
  as the client address;
- input that arrives before the banner (after ``banner_delay``) is answered with
  ``554 SMTP synchronization error`` and the connection is closed (Exim, Postfix pregreet);
- without PIPELINING, input already waiting behind any command is a synchronization error;
  with ``strict_sync`` (the default) so is input pipelined behind EHLO/HELO or DATA, which are
  RFC 2920 group ends (Postfix ``smtpd_forbid_unauth_pipelining``, Exim's sync checks);
- replies are held while more pipelined input is buffered and flushed before blocking on a read.

Recipients whose local part starts with ``reject`` get 550 and with ``tempfail`` 450, so tests
can exercise partial and total recipient failure.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import select
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from .proxyproto import ProxyProtocolError, parse_header

SYNC_ERROR = b"554 SMTP synchronization error\r\n"
MAX_RCPTS = 100
_MAIL = re.compile(r"FROM: ?<([^<> ]*)>((?: +[A-Za-z0-9-]+(?:=\S+)?)*) *", re.I)
_RCPT = re.compile(r"TO: ?<([^<> ]+)>((?: +[A-Za-z0-9-]+(?:=\S+)?)*) *", re.I)
_BDAT = re.compile(r"([0-9]{1,10})(?: +(LAST))? *", re.I)


@dataclass
class DemoMessage:
    client_addr: str
    helo: str
    mail_from: str
    rcpts: list[str]
    data: bytes  # dot-unstuffed, without the terminating ".\r\n"
    via: str  # "DATA" or "BDAT"


class _End(Exception):
    """Close the session, after sending ``reply`` if there is one."""

    def __init__(self, reply: bytes | None = None) -> None:
        super().__init__(reply)
        self.reply = reply


class DemoMTA:
    def __init__(
        self,
        *,
        proxy_protocol: bool = True,
        pipelining: bool = True,
        chunking: bool = True,
        strict_sync: bool = True,
        hostname: str = "demo-mta.test",
        banner_delay: float = 0.0,
        idle_timeout: float = 60.0,
        max_line: int = 2048,
        max_size: int = 10485760,
        on_message: Callable[[DemoMessage], None] | None = None,
    ) -> None:
        self.proxy_protocol = proxy_protocol
        self.pipelining = pipelining
        self.chunking = chunking
        self.strict_sync = strict_sync
        self.hostname = hostname
        self.banner_delay = banner_delay
        self.idle_timeout = idle_timeout
        self.max_line = max_line
        self.max_size = max_size
        self.on_message = on_message
        self.messages: list[DemoMessage] = []
        self.sync_errors = 0
        self._ids = itertools.count(1)

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        listeners: Sequence[trio.SocketListener] | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled (``trio.serve_tcp``'s shape); ``task_status`` gets the port."""
        if listeners is None:
            listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self.handle, list(listeners))

    async def handle(self, stream: trio.SocketStream) -> None:
        """One SMTP session; network errors and timeouts end it quietly."""
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await _Session(self, stream).run()

    def _ehlo_lines(self) -> list[str]:
        lines = [self.hostname]
        lines += ["PIPELINING"] if self.pipelining else []
        lines += [f"SIZE {self.max_size}", "8BITMIME"]
        lines += ["CHUNKING"] if self.chunking else []
        return [*lines, "ENHANCEDSTATUSCODES", "SMTPUTF8"]


def _reply(code: int, *lines: str) -> bytes:
    last = len(lines) - 1
    return b"".join(
        f"{code}{' ' if i == last else '-'}{ln}\r\n".encode("utf-8", "surrogateescape")
        for i, ln in enumerate(lines)
    )


def _unstuff(content: bytes) -> bytes:
    return b"\r\n".join(ln[1:] if ln[:1] == b"." else ln for ln in content.split(b"\r\n"))


class _Session:
    def __init__(self, mta: DemoMTA, stream: trio.SocketStream) -> None:
        self.mta = mta
        self.stream = stream
        self.buf = bytearray()
        self.out = bytearray()
        self.eof = False
        self.client_addr = str(stream.socket.getpeername()[0])
        self.helo: str | None = None
        self._reset()

    def _reset(self) -> None:
        self.mail_from: str | None = None
        self.rcpts: list[str] = []
        self.chunks: bytearray | None = None  # a BDAT transaction in progress
        self.too_big = False

    async def run(self) -> None:
        try:
            if self.mta.proxy_protocol:
                await self._read_proxy_header()
            await trio.sleep(self.mta.banner_delay)
            if await self._input_waiting():
                raise _End(SYNC_ERROR)
            self.out += _reply(220, f"{self.mta.hostname} ESMTP demo")
            while True:
                await self._command(await self._read_line())
        except _End as end:
            await self._close(end.reply)

    async def _close(self, reply: bytes | None) -> None:
        """Reply, shut down our side, drain briefly: an RST would destroy the reply in transit."""
        if reply == SYNC_ERROR:
            self.mta.sync_errors += 1
        self.out += reply or b""
        await self._flush()
        await self.stream.send_eof()
        with trio.move_on_after(1.0):
            while await self.stream.receive_some(65536):
                pass

    async def _flush(self) -> None:
        if self.out:
            data = bytes(self.out)
            self.out.clear()
            await self.stream.send_all(data)

    async def _fill(self) -> None:
        """Flush held replies, then wait for more input (bounded by the idle timeout)."""
        await self._flush()
        if self.eof:
            raise _End()
        try:
            with trio.fail_after(self.mta.idle_timeout):
                data = await self.stream.receive_some(65536)
        except trio.TooSlowError:
            raise _End(_reply(421, f"4.4.2 {self.mta.hostname} Error: timeout exceeded")) from None
        if not data:
            raise _End()
        self.buf += data

    async def _input_waiting(self) -> bool:
        """True if the client sent input we have not asked for yet (buffered or readable now)."""
        if not self.buf and not self.eof:
            poll = select.poll()
            poll.register(self.stream.socket.fileno(), select.POLLIN)
            if poll.poll(0):
                data = await self.stream.receive_some(65536)
                self.eof = not data
                self.buf += data
        return bool(self.buf)

    async def _read_proxy_header(self) -> None:
        while True:
            try:
                header = parse_header(self.buf)
            except ProxyProtocolError:
                raise _End() from None  # the spec says: drop the connection, say nothing
            if header is not None:
                break
            await self._fill()
        del self.buf[: header.length]
        if header.src is not None:
            self.client_addr = header.src[0]

    async def _read_line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > self.mta.max_line:
                break
            await self._fill()
        if not 0 <= end <= self.mta.max_line:
            raise _End(_reply(500, "5.5.2 Error: line too long"))
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    async def _command(self, line: bytes) -> None:
        text = line.decode("utf-8", "surrogateescape")
        verb, _, arg = text.partition(" ")
        verb, arg = verb.upper(), arg.strip()
        bdat = verb == "BDAT" and self.mta.chunking  # its chunk follows: checked after it
        sync_point = verb in ("EHLO", "HELO", "DATA") and self.mta.strict_sync
        must_wait = (sync_point or not self.mta.pipelining) and not bdat and verb != "QUIT"
        if must_wait and await self._input_waiting():
            raise _End(SYNC_ERROR)
        if bdat:
            reply = await self._bdat(arg)
        elif verb == "DATA":
            reply = await self._data(arg)
        elif verb == "QUIT":
            raise _End(_reply(221, f"2.0.0 {self.mta.hostname} Bye"))
        else:
            reply = self._simple(verb, arg)
        self.out += reply

    def _simple(self, verb: str, arg: str) -> bytes:
        if verb in ("EHLO", "HELO"):
            if not arg:
                return _reply(501, f"5.5.4 Syntax: {verb} hostname")
            self.helo = arg
            self._reset()
            if verb == "HELO":
                return _reply(250, self.mta.hostname)
            return _reply(250, *self.mta._ehlo_lines())
        if verb == "MAIL":
            if self.helo is None:
                return _reply(503, "5.5.1 Error: send HELO/EHLO first")
            if self.mail_from is not None:
                return _reply(503, "5.5.1 Error: nested MAIL command")
            m = _MAIL.fullmatch(arg)
            if not m:
                return _reply(501, "5.5.4 Syntax: MAIL FROM:<address>")
            size = re.search(r"(?i)(?:^| )SIZE=([0-9]+)", m[2])
            if size and int(size[1]) > self.mta.max_size:
                return _reply(552, "5.3.4 Message size exceeds fixed limit")
            self.mail_from = m[1]
            return _reply(250, "2.1.0 Ok")
        if verb == "RCPT":
            if self.mail_from is None:
                return _reply(503, "5.5.1 Error: need MAIL command")
            if self.chunks is not None:
                return _reply(503, "5.5.1 Error: RCPT after BDAT")
            m = _RCPT.fullmatch(arg)
            if not m:
                return _reply(501, "5.5.4 Syntax: RCPT TO:<address>")
            if len(self.rcpts) >= MAX_RCPTS:
                return _reply(452, "4.5.3 Error: too many recipients")
            local = m[1].lower()
            if local.startswith("reject"):
                return _reply(550, f"5.1.1 <{m[1]}>: Recipient address rejected")
            if local.startswith("tempfail"):
                return _reply(450, f"4.2.0 <{m[1]}>: Recipient address temporarily rejected")
            self.rcpts.append(m[1])
            return _reply(250, "2.1.5 Ok")
        if verb in ("RSET", "NOOP"):
            if verb == "RSET":
                self._reset()
            return _reply(250, "2.0.0 Ok")
        if not verb:
            return _reply(500, "5.5.2 Error: bad syntax")
        return _reply(502, "5.5.2 Error: command not recognized")

    def _check_transaction(self) -> bytes | None:
        if self.mail_from is None:
            return _reply(503, "5.5.1 Error: need MAIL command")
        if not self.rcpts:
            return _reply(554, "5.5.1 Error: no valid recipients")
        return None

    async def _data(self, arg: str) -> bytes:
        if arg:
            return _reply(501, "5.5.4 Syntax: DATA")
        if self.chunks is not None:
            return _reply(503, "5.5.1 Error: DATA after BDAT")
        if error := self._check_transaction():
            return error
        self.out += _reply(354, "End data with <CR><LF>.<CR><LF>")
        start, dropped = 0, False  # scan each byte once; keep only a 4-byte tail when too big
        while True:
            if not dropped and self.buf.startswith(b".\r\n"):
                content_end = 0
                break
            if (pos := self.buf.find(b"\r\n.\r\n", start)) >= 0:
                content_end = pos + 2
                break
            if len(self.buf) > self.mta.max_size:
                del self.buf[:-4]
                dropped = True
            start = max(0, len(self.buf) - 4)
            await self._fill()
        content = bytes(self.buf[:content_end])
        del self.buf[: content_end + 3]
        if not self.mta.pipelining and await self._input_waiting():
            raise _End(SYNC_ERROR)
        if dropped or len(content) > self.mta.max_size:
            self._reset()
            return _reply(552, "5.3.4 Error: message too big")
        return self._deliver(_unstuff(content), "DATA")

    async def _bdat(self, arg: str) -> bytes:
        m = _BDAT.fullmatch(arg)
        if not m:  # without a size the chunk cannot be skipped: the session is lost
            raise _End(_reply(501, "5.5.4 Syntax: BDAT size [LAST]"))
        remaining, last = int(m[1]), m[2] is not None
        chunk = bytearray()
        while remaining:
            if not self.buf:
                await self._fill()
            take = self.buf[:remaining]
            del self.buf[:remaining]
            remaining -= len(take)
            if len(chunk) + len(take) + len(self.chunks or b"") > self.mta.max_size:
                self.too_big = True
            elif not self.too_big:
                chunk += take
        if not self.mta.pipelining and await self._input_waiting():
            raise _End(SYNC_ERROR)
        if error := self._check_transaction():
            return error
        if self.too_big:
            self._reset()
            return _reply(552, "5.3.4 Error: message too big")
        if self.chunks is None:
            self.chunks = bytearray()
        self.chunks += chunk
        if not last:
            return _reply(250, f"2.0.0 {len(chunk)} octets received")
        return self._deliver(bytes(self.chunks), "BDAT")

    def _deliver(self, data: bytes, via: str) -> bytes:
        assert self.mail_from is not None
        msg = DemoMessage(self.client_addr, self.helo or "", self.mail_from, self.rcpts, data, via)
        self.mta.messages.append(msg)
        if self.mta.on_message is not None:
            self.mta.on_message(msg)
        self._reset()
        return _reply(250, f"2.0.0 Ok: queued as {next(self.mta._ids):08X}")
