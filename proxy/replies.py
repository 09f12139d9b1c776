"""Replies off a trio stream: the one async loop around ``MtaConversation``.

Framing the server's replies and matching each to what was sent are the conversation's
(sans-I/O, ``proxy/machine/mta.py``); this only moves bytes from the stream into it until it
has the next reply. ``probe``, the built-in early-pipelining client and the tests read
replies through it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

from .machine.mta import MtaConversation
from .smtp import Reply

T = TypeVar("T")
RECEIVE_SIZE = 65536


async def receive_reply(
    stream: trio.abc.ReceiveStream,
    conversation: MtaConversation[T],
    *,
    on_data: Callable[[bytes], object] | None = None,
) -> tuple[T, Reply] | None:
    """The next reply and the tag it answers, reading ``stream`` as long as that takes (a
    reply already buffered costs no read); None if the stream ends first. ``on_data`` sees
    each chunk read. ``ProtocolError`` (bytes that are no SMTP reply) propagates. A reply
    must be pending (``send`` or ``expect``): reading for none would never end."""
    if not conversation.pending:
        raise ValueError("no reply is pending: nothing was sent or expected")
    while (got := conversation.next_reply()) is None:
        data = bytes(await stream.receive_some(RECEIVE_SIZE))
        if not data:
            return None
        if on_data is not None:
            on_data(data)
        conversation.feed(data)
    return got
