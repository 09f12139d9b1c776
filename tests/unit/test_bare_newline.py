"""``limits.bare_newline = "normalize"``: bare CR/LF in message data become CRLF.

The invariant checked here (and against a permissive Postfix in
tests/integration/test_smuggling.py): what leaves the reader has no bare CR or LF, and the
only end of data a strict CRLF reader (the MTA) can find in it is the one the reader
reported -- the client's own CRLF "." CRLF.
"""

from __future__ import annotations

import re
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.smtp import DATA_PIECE, Command, CommandReader, DataChunk, EndOfData

from .test_smtp import BARE_NEWLINE, SMUGGLING_ENDINGS, Event, bytewise, cmd, drive, merged

SMUGGLED = b"MAIL FROM:<admin@bank.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"


def normalizing() -> CommandReader:
    return CommandReader(bare_newline="normalize")


def run(chunks: list[bytes]) -> list[Event]:
    return merged(drive(chunks, reader=normalizing()))


def splits(stream: bytes) -> list[list[bytes]]:
    return [[stream], bytewise(stream), [stream[:7], stream[7:20], stream[20:]]]


def mta_end_of_data(sent: bytes) -> int:
    """Where a strict CRLF reader, starting right after DATA's CRLF, sees the end of data
    (index of the "." line), or -1."""
    if sent.startswith(b".\r\n"):
        return 0
    pos = sent.find(b"\r\n.\r\n")
    return -1 if pos < 0 else pos + 2


def has_bare(data: bytes) -> bool:
    rest = data.replace(b"\r\n", b"")
    return b"\r" in rest or b"\n" in rest


def test_reject_is_the_default_and_unknown_policy_refused() -> None:
    assert not CommandReader().normalize
    with pytest.raises(ValueError, match="bare_newline"):
        CommandReader(bare_newline="accept")


@pytest.mark.parametrize(
    ("message", "sent"),
    [
        (b"a\nb\r\n", b"a\r\nb\r\n"),
        (b"a\rb\r\n", b"a\r\nb\r\n"),
        (b"a\r\r\n", b"a\r\n\r\n"),  # bare CR, then a CRLF: two line ends
        (b"a\n\rb\r\n", b"a\r\n\r\nb\r\n"),  # LF CR is two bare line ends, not a CRLF
        (b"plain\r\n..stuffed\r\n", b"plain\r\n..stuffed\r\n"),  # untouched
    ],
)
def test_bare_line_ends_become_crlf(message: bytes, sent: bytes) -> None:
    for chunks in splits(b"DATA\r\n" + message + b".\r\n"):
        assert run(chunks) == [cmd(b"DATA\r\n"), DataChunk(sent), EndOfData()]


@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS, ids=repr)
def test_smuggled_end_of_data_stays_inside_the_message(ending: bytes) -> None:
    message = b"Subject: hi\r\n\r\nhello" + ending + SMUGGLED + b"evil\r\n"
    stream = b"DATA\r\n" + message + b".\r\nQUIT\r\n"
    for chunks in splits(stream):
        events = run(chunks)
        assert events[0] == cmd(b"DATA\r\n")
        if b"\r\n.\r\n" in ending:
            # e.g. "\r\r\n.\r\n": a real CRLF "." CRLF, the end for every strict reader (the
            # MTA too); what follows are the client's own commands, not a smuggled message
            assert isinstance(events[2], EndOfData)
            assert [e.verb for e in events[3:] if isinstance(e, Command)][:3] == [
                "MAIL",
                "RCPT",
                "DATA",
            ]
            continue
        # exactly one end of data: the client's real one; the smuggled commands are text
        assert events[2:] == [EndOfData(), cmd(b"QUIT\r\n")], events
        data = events[1]
        assert isinstance(data, DataChunk)
        assert not has_bare(data.data)
        assert mta_end_of_data(data.data + b".\r\n") == len(data.data)
        assert SMUGGLED in data.data
        if not has_bare(ending):
            assert data.data == message  # CRLF-only variants pass verbatim


@pytest.mark.parametrize(
    ("message", "sent"),
    [
        (b"\n.\n", b"\r\n..\r\n"),  # a bare LF, then a "." line ended by a bare LF
        (b"a\n.\r\n", b"a\r\n..\r\n"),  # the "." line itself has a real CRLF
        (b"a\r\n.\n", b"a\r\n..\r\n"),
        (b"a\r\n.\r", b"a\r\n..\r\n"),
        (b".\n", b"..\r\n"),  # right after DATA
        (b".\r\r\n", b"..\r\n\r\n"),
    ],
)
def test_normalised_dot_lines_are_stuffed(message: bytes, sent: bytes) -> None:
    for chunks in splits(b"DATA\r\n" + message + b"x\r\n.\r\n"):
        assert run(chunks) == [cmd(b"DATA\r\n"), DataChunk(sent + b"x\r\n"), EndOfData()]


def test_dot_line_after_bare_line_end_is_text_then_real_end() -> None:
    # ".\r\n" right after a bare LF is text; the next CRLF "." CRLF is the real end
    for chunks in splits(b"DATA\r\na\n.\r\n.\r\nQUIT\r\n"):
        assert run(chunks) == [
            cmd(b"DATA\r\n"),
            DataChunk(b"a\r\n..\r\n"),
            EndOfData(),
            cmd(b"QUIT\r\n"),
        ]


def test_trailing_cr_waits_for_the_next_byte() -> None:
    r = normalizing()
    events = drive([b"DATA\r\nab\r"], reader=r)
    assert events == [cmd(b"DATA\r\n")]  # "ab\r" may yet be "ab\r\n"
    events = drive([b"\n.\r\n"], reader=r)
    assert events == [DataChunk(b"ab\r\n"), EndOfData()]


def test_commands_stay_strict() -> None:
    assert drive([b"NOOP\n"], reader=normalizing()) == [BARE_NEWLINE]


def test_long_line_with_a_bare_line_end_is_passed_on_whole() -> None:
    line = b"y" * (3 * DATA_PIECE + 5)
    for chunks in splits(b"DATA\r\n" + line + b"\n.\nx\r\n.\r\n"):
        events = run(chunks)
        assert events == [cmd(b"DATA\r\n"), DataChunk(line + b"\r\n..\r\nx\r\n"), EndOfData()]


# -- properties

_LINE_END = re.compile(rb"\r\n|\r|\n")


def _reference(message: bytes) -> tuple[list[bytes], bytes]:
    """The normalised lines up to the client's real end of data, and what follows it."""
    stream = b"\r\n" + message  # the CRLF that ended the DATA command
    stop = stream.find(b"\r\n.\r\n")
    assert stop >= 0
    body, rest = stream[2 : stop + 2], stream[stop + 5 :]
    lines = _LINE_END.split(body)[:-1] if body else []
    return lines, rest


# Data built from the characters that matter for framing.
_framing = st.binary(max_size=0) | st.sampled_from(
    [b"\r", b"\n", b".", b"\r\n", b"a", b"\x00", b"\r\n.\r\n", b"\n.\n", b"\r.\r"]
)
_messages = st.lists(_framing, max_size=40).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(message=_messages, data=st.data(), piece=st.sampled_from([DATA_PIECE, 1, 2, 5]))
def test_mta_sees_only_the_proxys_end_of_data(
    message: bytes, data: st.DataObject, piece: int
) -> None:
    # A small DATA_PIECE cuts long lines everywhere: pieces must not change what leaves.
    with mock.patch("proxy.smtp.DATA_PIECE", piece):
        _check_end_of_data(message, data)


def _check_end_of_data(message: bytes, data: st.DataObject) -> None:
    message += b"\r\n.\r\nQUIT\r\n"  # always a real end somewhere
    stream = b"DATA\r\n" + message
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    events = drive(chunks, reader=normalizing())
    assert events[0] == cmd(b"DATA\r\n")
    end = next(i for i, e in enumerate(events) if isinstance(e, EndOfData))
    chunks_out = events[1:end]
    assert all(isinstance(e, DataChunk) for e in chunks_out)
    sent = b"".join(e.data for e in chunks_out if isinstance(e, DataChunk))
    assert not has_bare(sent)
    # the MTA, reading CRLF strictly, ends the message exactly where the proxy did
    assert mta_end_of_data(sent + b".\r\n") == len(sent)
    # and reads the client's lines, each "." line that was not the end dot-stuffed
    lines, rest = _reference(message)
    want = [b".." if line == b"." else line for line in lines]
    assert sent == b"".join(line + b"\r\n" for line in want)
    # after the end, commands resume exactly where the client's real end of data was
    # (a line refused as a command, e.g. ".", leaves no raw bytes: the rest keep their order)
    pos = 0
    for e in events[end + 1 :]:
        if isinstance(e, Command):
            pos = rest.index(e.raw, pos) + len(e.raw)


@settings(max_examples=200, deadline=None)
@given(message=st.binary(max_size=300))
def test_any_bytes_never_leak_a_bare_line_end(message: bytes) -> None:
    events = drive(bytewise(b"DATA\r\n" + message), reader=normalizing())
    sent = b"".join(e.data for e in events if isinstance(e, DataChunk))
    assert not has_bare(sent)
    assert mta_end_of_data(sent) == -1  # the end of data, if any, is an event, never in data
