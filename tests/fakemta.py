"""A scriptable fake MTA for fault injection (real MTAs are used everywhere else).

It records every byte it receives and flags pipelining it did not invite: when it has
not advertised PIPELINING, finding more input buffered behind a command is a violation.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from proxy.proxyproto import parse_header

# What the script returns for a command line: reply bytes, or an action.
CLOSE = "close"
STALL = "stall"
Action = bytes | str


# The answers to everything but EHLO (tests/machine_harness.py's pure model answers alike).
DEFAULT_REPLIES: dict[str, bytes] = {
    "HELO": b"250 fake.test\r\n",
    "MAIL": b"250 2.1.0 Ok\r\n",
    "RCPT": b"250 2.1.5 Ok\r\n",
    "DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
    "BDAT": b"250 2.0.0 chunk ok\r\n",
    "RSET": b"250 2.0.0 Ok\r\n",
    "NOOP": b"250 2.0.0 Ok\r\n",
    "QUIT": b"221 2.0.0 Bye\r\n",
}
UNKNOWN_COMMAND = b"502 5.5.2 Error: command not recognized\r\n"


def default_ehlo(pipelining: bool, chunking: bool = True) -> bytes:
    lines = ["fake.test", "SIZE 1000000", "8BITMIME"]
    if pipelining:
        lines.insert(1, "PIPELINING")
    if chunking:
        lines.append("CHUNKING")
    lines += ["STARTTLS", "XCLIENT NAME ADDR", "ENHANCEDSTATUSCODES"]
    return b"".join(
        b"250" + (b" " if i == len(lines) - 1 else b"-") + ln.encode() + b"\r\n"
        for i, ln in enumerate(lines)
    )


@dataclass
class FakeMTA:
    pipelining: bool = True
    chunking: bool = True
    proxy_protocol: bool = True
    banner: bytes = b"220 fake.test ESMTP\r\n"
    banner_delay: float = 0.0
    # Sends the greeting itself, when a test must time it exactly (instead of banner and
    # banner_delay, and of the look for input sent before it).
    greet: Callable[[trio.SocketStream], Awaitable[None]] | None = None
    # verb -> action, consulted before the defaults
    script: dict[str, Action] = field(default_factory=dict)
    # Per command line, before the script: an action, None for the default, or an awaitable
    # of either (a test holding a reply back until it is ready).
    on_line: Callable[[bytes], Action | Awaitable[Action | None] | None] | None = None
    received: bytearray = field(default_factory=bytearray)
    commands: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    proxy_sources: list[tuple[str, int]] = field(default_factory=list)
    proxy_destinations: list[tuple[str, int]] = field(default_factory=list)
    proxy_tlvs: list[tuple[tuple[int, bytes], ...]] = field(default_factory=list)
    connections: int = 0
    early_input: list[bytes] = field(default_factory=list)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(port)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buf = bytearray()
        try:
            async with stream:
                if self.proxy_protocol:
                    while (hdr := parse_header(bytes(buf))) is None:
                        data = await stream.receive_some(4096)
                        if not data:
                            return
                        buf += data
                    assert hdr.src is not None and hdr.dst is not None
                    self.proxy_sources.append(hdr.src)
                    self.proxy_destinations.append(hdr.dst)
                    self.proxy_tlvs.append(hdr.tlvs)
                    del buf[: hdr.length]
                if self.greet is not None:
                    await self.greet(stream)
                    await self._converse(stream, buf)
                    return
                await trio.sleep(self.banner_delay)
                # Anything already readable now was sent before our greeting.
                with trio.move_on_after(0.01):
                    data = await stream.receive_some(4096)
                    if data:
                        buf += data
                if buf:
                    self.early_input.append(bytes(buf))
                    self.violations.append(f"input before greeting: {bytes(buf)!r}")
                await stream.send_all(self.banner)
                if not self.banner.startswith(b"220"):
                    return
                await self._converse(stream, buf)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _converse(self, stream: trio.SocketStream, buf: bytearray) -> None:
        in_data = False
        message = bytearray()
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                data = await stream.receive_some(65536)
                if not data:
                    return
                self.received += data
                buf += data
                continue
            line = bytes(buf[: nl + 1])
            del buf[: nl + 1]
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    self.messages.append(bytes(message))
                    message.clear()
                    reply: Action = self.script.get("EOD", b"250 2.0.0 queued as FAKE\r\n")
                else:
                    message += line
                    continue
            else:
                self.commands.append(line)
                if buf and not self.pipelining:
                    self.violations.append(f"pipelined behind {line!r}: {bytes(buf)!r}")
                verb = line.split(b" ", 1)[0].strip().upper().decode("ascii", "replace")
                reply = await self._reply_for(verb, line)
                if verb == "DATA" and isinstance(reply, bytes) and reply.startswith(b"354"):
                    in_data = True
                if verb == "BDAT":
                    parts = line.split()
                    bdat_left = int(parts[1])
                    last = len(parts) > 2
                    while bdat_left:
                        if not buf:
                            data = await stream.receive_some(65536)
                            if not data:
                                return
                            self.received += data
                            buf += data
                        take = buf[:bdat_left]
                        message += take
                        del buf[: len(take)]
                        bdat_left -= len(take)
                    if last and isinstance(reply, bytes) and reply.startswith(b"250"):
                        self.messages.append(bytes(message))
                        message.clear()
            if reply == CLOSE:
                return
            if reply == STALL:
                await trio.sleep_forever()
            assert isinstance(reply, bytes)
            await stream.send_all(reply)
            if line.upper().startswith(b"QUIT"):
                return

    async def _reply_for(self, verb: str, line: bytes) -> Action:
        if self.on_line is not None:
            action = self.on_line(line)
            if inspect.isawaitable(action):
                action = await action
            if action is not None:
                return action
        if verb in self.script:
            return self.script[verb]
        if verb == "EHLO":
            return default_ehlo(self.pipelining, self.chunking)
        return DEFAULT_REPLIES.get(verb, UNKNOWN_COMMAND)
