"""Outbound mode's EHLO cache: what a remote MX said when it offered early pipelining.

One row per (source IP, destination IP, port), as Exim's hints database keys its
``hosts_pipe_connect`` records: the MX's banner and EHLO reply, when they were learned and
last verified, and a strike count. An entry is served only while it is younger than the TTL
(Exim's ``retry_data_expire``, 7 days by default). A mismatch between a cached reply and the
MX's real one is a strike: the entry goes, and a destination that keeps mismatching (a load
balancer in front of different MXes) is not cached again for a while.

Standard library ``sqlite3`` in WAL mode, so the processes of ``server.workers`` share one
file. Synchronous and short: every statement is one indexed row. Times are passed in (the
caller's clock), so the cache is tested without sleeping.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from .config import Address
from .smtp import EARLY_PIPELINING_KEYWORDS, ProtocolError, Reply, ReplyReader, ehlo_keywords

DEFAULT_TTL = 7 * 24 * 3600.0
MAX_STRIKES = 3  # mismatches in a row before a destination is left uncached ...
BLOCK_SECONDS = 24 * 3600.0  # ... for this long

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ehlo (
    source TEXT NOT NULL,
    dest TEXT NOT NULL,
    port INTEGER NOT NULL,
    banner BLOB NOT NULL,
    ehlo BLOB NOT NULL,
    learned REAL NOT NULL,
    verified REAL NOT NULL,
    strikes INTEGER NOT NULL DEFAULT 0,
    blocked_until REAL NOT NULL DEFAULT 0,
    client_ehlo BLOB NOT NULL DEFAULT x'',
    PRIMARY KEY (source, dest, port)
)
"""


@dataclass(frozen=True, slots=True)
class Entry:
    source: str
    dest: str
    port: int
    banner: Reply
    ehlo: Reply
    learned: float
    verified: float
    strikes: int
    blocked_until: float
    client_ehlo: bytes = b""  # the MTA's own EHLO line from this source (sent at connect)

    @property
    def usable(self) -> bool:
        """Whether the row holds replies to serve (a blocked destination keeps none)."""
        return self.banner.code == 220 and self.ehlo.code == 250


def cacheable(banner: Reply, ehlo: Reply) -> bool:
    """Whether an MX's greeting may be served from the cache: a 220 banner that is not a
    PIX-style masked one ("220 ****...", whose text changes the session's meaning), and a
    250 EHLO reply offering PIPELINING and an early-pipelining keyword."""
    if banner.code != 220 or ehlo.code != 250:
        return False
    if banner.lines[0].lstrip().startswith(b"*"):
        return False
    keywords = ehlo_keywords(ehlo)
    return "PIPELINING" in keywords and any(k in keywords for k in EARLY_PIPELINING_KEYWORDS)


def describe(entry: Entry) -> dict[str, object]:
    """An entry as ``cache list`` shows it (times in UTC, ISO 8601)."""

    def when(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")

    return {
        "dest": str(Address(entry.dest, entry.port)),
        "source": entry.source,
        "learned": when(entry.learned),
        "verified": when(entry.verified),
        "strikes": entry.strikes,
        "blocked_until": when(entry.blocked_until) if entry.blocked_until else None,
        "banner": entry.banner.to_bytes().decode("utf-8", "replace") if entry.usable else None,
        "ehlo": entry.ehlo.to_bytes().decode("utf-8", "replace") if entry.usable else None,
        "client_ehlo": entry.client_ehlo.decode("ascii", "replace").strip() or None,
    }


_EHLO_LINE = re.compile(rb"EHLO [\x21-\x7e]{1,255}\r\n", re.IGNORECASE)


def _is_ehlo_line(line: object) -> bool:
    """Only a plain ``EHLO name`` line is ever sent on the MTA's behalf."""
    return isinstance(line, bytes) and _EHLO_LINE.fullmatch(line) is not None


def _parse(data: object) -> Reply:
    if not isinstance(data, bytes):  # a row written by something else: a miss, replaced
        return Reply.make(0, "unreadable cache entry")
    reader = ReplyReader(max_line=65536, max_lines=1000)
    reader.feed(data)
    try:
        reply = reader.next_reply()
    except ProtocolError:
        reply = None
    if reply is None or reader.buffered:
        return Reply.make(0, "unreadable cache entry")
    return reply


class EhloCache:
    def __init__(self, path: str, *, ttl: float = DEFAULT_TTL) -> None:
        self.path = path
        self.ttl = ttl
        self._reader: sqlite3.Connection | None = None
        with closing(sqlite3.connect(self.path, timeout=2.0, isolation_level=None)) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)

    @contextmanager
    def _db(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        # Reads share one connection, kept open (a session's lookup is on the event loop:
        # opening a connection costs ten times the query). In autocommit each statement
        # reads the latest commit, and WAL readers never wait for a writer. A write gets
        # a connection of its own (it runs in a thread) and is one IMMEDIATE transaction,
        # its reads included, so two workers' read-modify-writes cannot interleave.
        if not write:
            if self._reader is None:
                self._reader = sqlite3.connect(self.path, timeout=2.0, isolation_level=None)
            yield self._reader
            return
        with closing(sqlite3.connect(self.path, timeout=2.0, isolation_level=None)) as db:
            # WAL without an fsync per commit: a lost entry after a crash is a cache miss.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _row(self, db: sqlite3.Connection, key: tuple[str, str, int]) -> Entry | None:
        row = db.execute(
            "SELECT source, dest, port, banner, ehlo, learned, verified, strikes, blocked_until,"
            " client_ehlo"
            " FROM ehlo WHERE source = ? AND dest = ? AND port = ?",
            key,
        ).fetchone()
        if row is None:
            return None
        source, dest, port, banner, ehlo, learned, verified, strikes, blocked, client = row
        try:
            times = (float(learned), float(verified), int(strikes), float(blocked))
        except (TypeError, ValueError):  # not written by us: unreadable, replaced by a learn
            times, banner, ehlo = (0.0, 0.0, 0, 0.0), None, None
        return Entry(
            str(source),
            str(dest),
            int(port),
            _parse(banner),
            _parse(ehlo),
            *times,
            bytes(client) if _is_ehlo_line(client) else b"",
        )

    # -- what the outbound session asks

    def lookup(self, source: str, dest: str, port: int, now: float) -> Entry | None:
        """The entry to serve early pipelining from, or None: none, expired, blocked, or
        unreadable (a miss: the session relays and learns)."""
        with self._db(write=False) as db:
            entry = self._row(db, (source, dest, port))
        if entry is None or not entry.usable or now - entry.learned > self.ttl:
            return None
        if not cacheable(entry.banner, entry.ehlo):
            return None
        return entry

    def learn(
        self,
        source: str,
        dest: str,
        port: int,
        banner: Reply,
        ehlo: Reply,
        now: float,
        client_ehlo: bytes = b"",
    ) -> bool:
        """Store what the MX said, if it may be served later; False if not stored (not
        cacheable, or the destination is blocked after repeated mismatches)."""
        if not cacheable(banner, ehlo):
            # What was cached is no longer true (the keyword or PIPELINING went, the banner
            # is masked now): it must not be served again.
            with self._db() as db:
                db.execute(
                    "UPDATE ehlo SET banner = x'', ehlo = x'', client_ehlo = x''"
                    " WHERE source = ? AND dest = ? AND port = ?",
                    (source, dest, port),
                )
            return False
        with self._db() as db:
            old = self._row(db, (source, dest, port))
            if old is not None and old.blocked_until > now:
                return False
            db.execute(
                "INSERT OR REPLACE INTO ehlo VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                (
                    source,
                    dest,
                    port,
                    banner.to_bytes(),
                    ehlo.to_bytes(),
                    now,
                    now,
                    0 if old is None else old.strikes,
                    client_ehlo if _is_ehlo_line(client_ehlo) else b"",
                ),
            )
        return True

    def verified(
        self, source: str, dest: str, port: int, now: float, *, client_ehlo: bytes = b""
    ) -> None:
        """The MX's real banner and EHLO reply matched the cache: a clean session. The TTL
        still counts from ``learned`` (Exim's hints expire likewise). ``client_ehlo``: the
        MTA's EHLO line to keep from now on, when it changed."""
        with self._db() as db:
            db.execute(
                "UPDATE ehlo SET verified = ?, strikes = 0"
                " WHERE source = ? AND dest = ? AND port = ?",
                (now, source, dest, port),
            )
            if _is_ehlo_line(client_ehlo):
                db.execute(
                    "UPDATE ehlo SET client_ehlo = ? WHERE source = ? AND dest = ? AND port = ?",
                    (client_ehlo, source, dest, port),
                )

    def strike(self, source: str, dest: str, port: int, now: float, *, block: bool = False) -> bool:
        """The MX did not say what the cache held: drop the replies and count it. True if
        the destination is now blocked (MAX_STRIKES in a row, or ``block``: a loop) for
        BLOCK_SECONDS."""
        with self._db() as db:
            old = self._row(db, (source, dest, port))
            strikes = 1 if old is None else old.strikes + 1
            blocked = now + BLOCK_SECONDS if block or strikes >= MAX_STRIKES else 0.0
            db.execute(
                "INSERT OR REPLACE INTO ehlo VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, x'')",
                (source, dest, port, b"", b"", now, now, strikes, blocked),
            )
        return blocked > 0

    # -- what the operator asks (pipeconnect-proxy cache list|flush [DEST])

    def entries(self) -> list[Entry]:
        with self._db(write=False) as db:
            keys = db.execute("SELECT source, dest, port FROM ehlo ORDER BY dest, port, source")
            rows = [self._row(db, key) for key in keys.fetchall()]
        return [row for row in rows if row is not None]

    def flush(self, dest: str | None = None) -> int:
        """Forget every entry (or those for ``dest``); how many went."""
        with self._db() as db:
            if dest is None:
                cursor = db.execute("DELETE FROM ehlo")
            else:
                cursor = db.execute("DELETE FROM ehlo WHERE dest = ?", (dest,))
            return cursor.rowcount
