"""The MTA side of a conversation, in the client role: what was sent, what answers what.

Sans-I/O like the rest of the machine: ``send`` returns the bytes to write and remembers
what they expect, ``feed`` takes what the server wrote, ``next_reply`` pairs each reply
with the tag its command was sent under, in order (RFC 2920: replies come in the order of
the commands, so a pipelined group is a queue). The banner is a reply too: ``expect``
queues an answer nobody asked for. A 250 to EHLO sets ``capabilities``; HELO clears them
(a refused EHLO changes nothing).

The session machine uses it towards the MTA behind the proxy; ``probe``, the built-in
early-pipelining client and the tests use it the same way, and outbound mode will drive it
towards a remote MX.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

from ..smtp import Reply, ReplyReader, ehlo_keywords

T = TypeVar("T")
_BANNER = "banner"


class MtaConversation(Generic[T]):
    def __init__(self, max_reply_line: int = 4096) -> None:
        self._replies = ReplyReader(max_line=max_reply_line)
        self._pending: deque[tuple[T, str]] = deque()
        self.banner: Reply | None = None
        self.capabilities: dict[str, str] = {}  # from the last 250 to EHLO

    # -- what the server will answer

    def expect(self, tag: T, *, banner: bool = False) -> None:
        """A reply will come that no command asked for: the ``banner``, or the verdict on
        message data (after the end of data)."""
        self._pending.append((tag, _BANNER if banner else ""))

    def send(self, tag: T, line: bytes, *, command: bool = True) -> bytes:
        """``line`` goes out (CRLF included): a command, or with ``command=False`` a line
        that only answers the server (an AUTH response); its reply will carry ``tag``."""
        verb = line[:4].upper().decode("ascii", "replace") if command else ""
        self._pending.append((tag, verb))
        return line

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def next_tag(self) -> T:
        return self._pending[0][0]

    # -- what it said

    def feed(self, data: bytes) -> None:
        self._replies.feed(data)

    @property
    def buffered(self) -> int:
        """Bytes read but not yet part of a reply (or replies nobody is waiting for)."""
        return self._replies.buffered

    def next_reply(self) -> tuple[T, Reply] | None:
        """The next complete reply and the tag it answers, or None (feed more). Raises
        ``ProtocolError`` for bytes that are no SMTP reply. Bytes nobody waits for stay
        buffered (``buffered`` tells): a reply to nothing is the caller's to judge."""
        if not self._pending or not self._replies.buffered:
            return None
        reply = self._replies.next_reply()
        if reply is None:
            return None
        tag, verb = self._pending.popleft()
        if verb is _BANNER:
            if self.banner is None:
                self.banner = reply
        elif verb == "EHLO" and reply.code == 250:
            self.capabilities = ehlo_keywords(reply)
        elif verb == "HELO":
            self.capabilities = {}
        return tag, reply

    # -- what it offers

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.capabilities

    @property
    def chunking(self) -> bool:
        return "CHUNKING" in self.capabilities

    @property
    def size(self) -> int:
        """The SIZE limit it announced (0: none)."""
        size = self.capabilities.get("SIZE", "").split(" ", 1)[0]
        return int(size) if size.isdigit() else 0
