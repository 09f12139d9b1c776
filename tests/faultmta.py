"""A fault upstream: an MTA that fails at one chosen protocol step in one chosen way.

``FaultMTA(step, behaviour)`` behaves like a plain ESMTP server (PIPELINING, CHUNKING,
a small MAIL/RCPT/DATA state machine) until the reply to ``step`` is due, then does
``behaviour`` instead. It records what a test needs to judge the proxy: every reply code it
sent in full, every message whose end (CRLF.CRLF or the whole BDAT LAST chunk) it received,
and which of those it accepted with a 250.

tests/fakemta.py stays the general scriptable fake; this one exists for the fault matrix
(tests/test_faults.py), where the failure is the point and the bookkeeping must be exact.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

import trio

from proxy.proxyproto import parse_header

# Protocol steps at which the MTA can fail (the reply to that step is where it happens).
# "connect": before the MTA has read the PROXY header; "banner": in place of the greeting;
# "mid-message": after the first message bytes, before the end of data; "dot": the reply
# to CRLF.CRLF; "BDAT": the reply to a non-last chunk; "BDAT-LAST": the reply to the last.
STEPS = (
    "connect",
    "banner",
    "EHLO",
    "MAIL",
    "RCPT",
    "DATA",
    "mid-message",
    "dot",
    "BDAT",
    "BDAT-LAST",
    "QUIT",
)
# "refused" (nothing listens) exists for "connect" only; "stall" at "connect" is a TCP
# connect that never completes (full accept queue), elsewhere a reply that never comes
# (mid-message: the MTA stops reading altogether).
BEHAVIOURS = ("close", "reset", "421", "4xx", "5xx", "stall")
CONNECT_ONLY = ("refused",)

FAULT_REPLY = {"421": 421, "4xx": 451, "5xx": 554}


def reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER on, zero timeout)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


EHLO_REPLY = (
    b"250-fault.test\r\n250-PIPELINING\r\n250-SIZE 100000000\r\n250-8BITMIME\r\n"
    b"250-CHUNKING\r\n250 ENHANCEDSTATUSCODES\r\n"
)


class _Stop(Exception):
    """The fault ended the conversation."""


@dataclass
class FaultMTA:
    step: str | None = None
    behaviour: str | None = None
    banner_delay: float = 0.0
    port: int = 0
    filler_port: int = 0  # "connect"+"stall": our own socket that fills the accept queue
    connections: int = 0
    sent_codes: list[int] = field(default_factory=list)  # replies written in full
    completed: list[bytes] = field(default_factory=list)  # messages whose end it received
    accepted: list[bytes] = field(default_factory=list)  # ... and answered with 250
    commands: list[bytes] = field(default_factory=list)
    release: trio.Event = field(default_factory=trio.Event)  # ends a stall

    def _is(self, step: str) -> str | None:
        return self.behaviour if self.step == step else None

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        if self.step == "connect" and self.behaviour in ("refused", "stall"):
            await self._serve_dead(task_status)
            return
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.port)

    async def _serve_dead(self, task_status: trio.TaskStatus[int]) -> None:
        """refused: a port nothing listens on. stall: a listener whose accept queue is full
        (backlog 0 plus one connection nobody accepts), so the kernel drops further SYNs and
        a connect hangs until the caller's timeout."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        filler = socket.socket()
        try:
            if self.behaviour == "refused":
                sock.close()
            else:
                sock.listen(0)
                filler.connect(("127.0.0.1", self.port))
                self.filler_port = filler.getsockname()[1]
            task_status.started(self.port)
            await trio.sleep_forever()
        finally:
            filler.close()
            sock.close()

    async def _send(self, stream: trio.SocketStream, reply: bytes) -> None:
        await stream.send_all(reply)
        self.sent_codes.append(int(reply[:3]))

    async def _fail(self, stream: trio.SocketStream, behaviour: str, what: str) -> None:
        """Do ``behaviour`` where a reply is due. Returns only for 4xx/5xx (the reply was
        sent and the conversation goes on); otherwise raises _Stop."""
        if behaviour == "close":
            await stream.aclose()
        elif behaviour == "reset":
            reset(stream.socket)
            await stream.aclose()
        elif behaviour == "stall":
            # Never reply, but keep reading so that the proxy hanging up is noticed.
            with trio.move_on_after(30):
                while await stream.receive_some(65536):
                    pass
        else:
            code = FAULT_REPLY[behaviour]
            await self._send(stream, b"%d 4.3.0 fault at %s\r\n" % (code, what.encode()))
            if code != 421:
                return
            await stream.aclose()
        raise _Stop

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buf = bytearray()
        try:
            async with stream:
                refusing = False
                if (b := self._is("connect")) is not None:
                    await self._fail(stream, b, "connect")
                    refusing = True  # a 4xx/5xx greeting went out before the header
                while (hdr := parse_header(bytes(buf))) is None:
                    data = await stream.receive_some(4096)
                    if not data:
                        return
                    buf += data
                del buf[: hdr.length]
                await trio.sleep(self.banner_delay)
                if (b := self._is("banner")) is not None:
                    await self._fail(stream, b, "banner")
                    refusing = True
                elif not refusing:
                    await self._send(stream, b"220 fault.test ESMTP\r\n")
                await self._converse(stream, buf, refusing)
        except (_Stop, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _line(self, stream: trio.SocketStream, buf: bytearray) -> bytes | None:
        while (nl := buf.find(b"\n")) < 0:
            data = await stream.receive_some(65536)
            if not data:
                return None
            buf += data
        line = bytes(buf[: nl + 1])
        del buf[: nl + 1]
        return line

    async def _converse(self, stream: trio.SocketStream, buf: bytearray, refusing: bool) -> None:
        helo = mail = rcpt = False
        message = bytearray()  # BDAT chunks so far
        while (line := await self._line(stream, buf)) is not None:
            self.commands.append(line)
            words = line.split()
            verb = words[0].upper().decode("ascii", "replace") if words else ""
            if verb == "QUIT":
                if (b := self._is("QUIT")) is not None:
                    await self._fail(stream, b, "QUIT")
                else:
                    await self._send(stream, b"221 2.0.0 Bye\r\n")
                return
            if refusing:
                if verb == "BDAT":
                    await self._chunk(stream, buf, int(words[1]))
                await self._send(stream, b"503 5.5.1 Error: no service\r\n")
                continue
            if verb in ("EHLO", "MAIL", "RCPT", "DATA") and (b := self._is(verb)) is not None:
                await self._fail(stream, b, verb)
                continue
            if verb == "EHLO":
                helo = True
                await self._send(stream, EHLO_REPLY)
            elif verb == "MAIL" and not helo:
                await self._send(stream, b"503 5.5.1 Error: send HELO/EHLO first\r\n")
            elif verb == "MAIL":
                mail, rcpt = True, False
                await self._send(stream, b"250 2.1.0 Ok\r\n")
            elif verb == "RCPT":
                rcpt = mail
                await self._send(
                    stream, b"250 2.1.5 Ok\r\n" if mail else b"503 5.5.1 need MAIL\r\n"
                )
            elif verb == "DATA":
                if not rcpt:
                    await self._send(stream, b"554 5.5.1 Error: no valid recipients\r\n")
                    continue
                await self._send(stream, b"354 End data with <CR><LF>.<CR><LF>\r\n")
                await self._data(stream, buf)
                mail = rcpt = False
            elif verb == "BDAT":
                last = len(words) > 2
                step = "BDAT-LAST" if last else "BDAT"
                chunk = await self._chunk(stream, buf, int(words[1]))
                if not rcpt:
                    await self._send(stream, b"503 5.5.1 need RCPT\r\n")
                    continue
                message += chunk
                if last:
                    self.completed.append(bytes(message))
                if (b := self._is(step)) is not None:
                    message.clear()
                    await self._fail(stream, b, step)
                    mail = rcpt = False
                    continue
                if last:
                    self.accepted.append(self.completed[-1])
                    message.clear()
                    mail = rcpt = False
                await self._send(stream, b"250 2.0.0 chunk ok\r\n")
            elif verb in ("RSET", "NOOP"):
                await self._send(stream, b"250 2.0.0 Ok\r\n")
            else:
                await self._send(stream, b"502 5.5.2 Error: command not recognized\r\n")

    async def _chunk(self, stream: trio.SocketStream, buf: bytearray, size: int) -> bytes:
        while len(buf) < size:
            data = await stream.receive_some(65536)
            if not data:
                raise _Stop
            buf += data
        chunk = bytes(buf[:size])
        del buf[:size]
        return chunk

    async def _data(self, stream: trio.SocketStream, buf: bytearray) -> None:
        raw = bytearray(buf)
        buf.clear()
        searched = 0
        answered = False
        while True:
            # -2: an empty message (the end marker right at the start)
            end = -2 if raw.startswith(b".\r\n") else raw.find(b"\r\n.\r\n", max(0, searched - 4))
            if end != -1:
                break
            searched = len(raw)
            if raw and not answered and (b := self._is("mid-message")) is not None:
                if b == "stall":
                    # Stop reading altogether: the proxy's sends back up (TCP backpressure).
                    await self.release.wait()
                    raise _Stop
                await self._fail(stream, b, "mid-message")
                answered = True  # a 4xx/5xx was the answer; none follows the dot
            data = await stream.receive_some(65536)
            if not data:
                raise _Stop
            raw += data
        message = bytes(raw[: end + 2])
        buf += raw[end + 5 :]
        self.completed.append(message)
        if answered:
            return
        if (b := self._is("dot")) is not None:
            await self._fail(stream, b, "dot")
            return
        self.accepted.append(message)
        await self._send(stream, b"250 2.0.0 queued as FAULT\r\n")
