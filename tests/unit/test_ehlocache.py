"""Outbound mode's EHLO cache (proxy/ehlocache.py): a real SQLite file in a temp dir."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from proxy.ehlocache import BLOCK_SECONDS, MAX_STRIKES, EhloCache, cacheable
from proxy.smtp import Reply

BANNER = Reply.make(220, "mx.dest.test ESMTP Exim 4.96")
EHLO = Reply.make(
    250, "mx.dest.test Hello", "SIZE 52428800", "PIPELINING", "PIPECONNECT", "STARTTLS"
)
KEY = ("192.0.2.1", "198.51.100.25", 25)
T0 = 1_000_000.0


@pytest.fixture
def cache(tmp_path: Path) -> EhloCache:
    return EhloCache(str(tmp_path / "ehlo.sqlite"), ttl=3600)


def test_learned_replies_come_back_byte_for_byte(cache: EhloCache) -> None:
    assert cache.lookup(*KEY, T0) is None
    assert cache.learn(*KEY, BANNER, EHLO, T0)
    entry = cache.lookup(*KEY, T0 + 10)
    assert entry is not None
    assert entry.banner.to_bytes() == BANNER.to_bytes()
    assert entry.ehlo.to_bytes() == EHLO.to_bytes()
    assert (entry.learned, entry.verified, entry.strikes) == (T0, T0, 0)
    assert cache.lookup("192.0.2.2", KEY[1], KEY[2], T0) is None  # the source is in the key
    assert cache.lookup(KEY[0], KEY[1], 587, T0) is None  # so is the port


def test_an_entry_expires_after_the_ttl(cache: EhloCache) -> None:
    cache.learn(*KEY, BANNER, EHLO, T0)
    assert cache.lookup(*KEY, T0 + 3600) is not None
    assert cache.lookup(*KEY, T0 + 3601) is None


@pytest.mark.parametrize(
    ("banner", "ehlo"),
    [
        (BANNER, Reply.make(250, "mx Hello", "PIPELINING", "SIZE 1000")),  # no keyword
        (BANNER, Reply.make(250, "mx Hello", "PIPECONNECT")),  # no PIPELINING
        (Reply.make(220, "*************************"), EHLO),  # PIX-style masked banner
        (Reply.make(421, "mx busy"), EHLO),
        (BANNER, Reply.make(550, "go away")),
    ],
    ids=["no-keyword", "no-pipelining", "pix-banner", "banner-421", "ehlo-550"],
)
def test_what_is_never_cached(cache: EhloCache, banner: Reply, ehlo: Reply) -> None:
    assert not cacheable(banner, ehlo)
    assert not cache.learn(*KEY, banner, ehlo, T0)
    assert cache.lookup(*KEY, T0) is None


@pytest.mark.parametrize("keyword", ["PIPECONNECT", "PIPE_CONNECT", "X_PIPE_CONNECT"])
def test_every_exim_generation_keyword_counts(keyword: str) -> None:
    assert cacheable(BANNER, Reply.make(250, "mx Hello", "PIPELINING", keyword))


def test_strikes_drop_the_entry_then_block_the_destination(cache: EhloCache) -> None:
    cache.learn(*KEY, BANNER, EHLO, T0)
    for n in range(1, MAX_STRIKES):
        assert not cache.strike(*KEY, T0 + n)
        assert cache.lookup(*KEY, T0 + n) is None  # a mismatch drops what was cached
        assert cache.learn(*KEY, BANNER, EHLO, T0 + n)  # the next session learns again
    assert cache.strike(*KEY, T0 + MAX_STRIKES)  # blocked now
    assert not cache.learn(*KEY, BANNER, EHLO, T0 + MAX_STRIKES + 1)
    assert cache.lookup(*KEY, T0 + MAX_STRIKES + 1) is None
    later = T0 + MAX_STRIKES + BLOCK_SECONDS + 1
    assert cache.learn(*KEY, BANNER, EHLO, later)  # after a while it is tried again
    assert cache.lookup(*KEY, later) is not None


def test_a_verified_session_clears_the_strikes(cache: EhloCache) -> None:
    cache.learn(*KEY, BANNER, EHLO, T0)
    cache.strike(*KEY, T0 + 1)
    cache.learn(*KEY, BANNER, EHLO, T0 + 2)
    cache.verified(*KEY, T0 + 3)
    entry = cache.lookup(*KEY, T0 + 4)
    assert entry is not None and entry.strikes == 0 and entry.verified == T0 + 3
    for n in range(MAX_STRIKES - 1):  # the count starts again from zero
        assert not cache.strike(*KEY, T0 + 5 + n)


def test_flush_all_or_one_destination(cache: EhloCache) -> None:
    other = ("192.0.2.1", "203.0.113.9", 25)
    cache.learn(*KEY, BANNER, EHLO, T0)
    cache.learn(*other, BANNER, EHLO, T0)
    assert [e.dest for e in cache.entries()] == ["198.51.100.25", "203.0.113.9"]
    assert cache.flush("203.0.113.9") == 1
    assert [e.dest for e in cache.entries()] == ["198.51.100.25"]
    assert cache.flush() == 1
    assert cache.entries() == []


def test_two_workers_share_one_file(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite")
    first, second = EhloCache(path), EhloCache(path)
    first.learn(*KEY, BANNER, EHLO, T0)
    entry = second.lookup(*KEY, T0)
    assert entry is not None and entry.ehlo == EHLO
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_an_unreadable_row_is_a_miss(cache: EhloCache) -> None:
    cache.learn(*KEY, BANNER, EHLO, T0)
    with sqlite3.connect(cache.path) as db:
        db.execute("UPDATE ehlo SET ehlo = ?", (b"250-half a reply\r\n",))
    assert cache.lookup(*KEY, T0) is None
