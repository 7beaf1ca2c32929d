"""VIPA leases: which terminal holds which Virtual IP Address, kept in SQLite.

A lease is sticky: a terminal gets the same VIPA every time it associates,
also after an anchor restart, because the table lives in a file. Addresses
are handed out from the pool in order, skipping the network and broadcast
addresses and the anchor's own (the first host). When the pool is full, the
lease seen longest ago that is not in use is reclaimed.
"""

import ipaddress
import sqlite3
from collections.abc import Callable
from pathlib import Path

from upmt.errors import ConfigError, SetupError

SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    terminal_id TEXT PRIMARY KEY,
    vipa INTEGER NOT NULL UNIQUE,
    last_seen REAL NOT NULL
);
"""


def parse_pool(text: str) -> ipaddress.IPv4Network:
    """The VIPA pool; ConfigError for anything but an IPv4 prefix with room for terminals."""
    try:
        pool = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise ConfigError(f"--pool {text!r}: {exc}") from None
    if pool.prefixlen > 29:
        raise ConfigError(f"--pool {text!r}: too small, use a /29 or larger")
    return pool


def anchor_address(pool: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The pool address the anchor keeps for itself (the first host)."""
    return pool.network_address + 1


class LeaseStore:
    def __init__(self, path: Path | str, pool: ipaddress.IPv4Network) -> None:
        self.pool = pool
        self._first = int(pool.network_address) + 2
        self._last = int(pool.broadcast_address) - 1
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # With WAL, NORMAL syncs at checkpoints only: a power loss may forget the
            # newest leases, never corrupt the file; a REGISTER no longer waits on fsync.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise SetupError(f"cannot open lease store {path}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def lookup(self, terminal_id: str) -> str | None:
        row = self._db.execute(
            "SELECT vipa FROM leases WHERE terminal_id = ?", (terminal_id,)
        ).fetchone()
        if row is None or not self._in_pool(row[0]):
            return None
        return str(ipaddress.IPv4Address(row[0]))

    def acquire(
        self, terminal_id: str, now: float, in_use: Callable[[str], bool] = lambda _tid: False
    ) -> str:
        """The terminal's VIPA, allocating one on first association."""
        current = self.lookup(terminal_id)
        if current is not None:
            self._db.execute(
                "UPDATE leases SET last_seen = ? WHERE terminal_id = ?", (now, terminal_id)
            )
            return current
        # A lease outside the (possibly changed) pool is stale: forget it.
        self._db.execute("DELETE FROM leases WHERE terminal_id = ?", (terminal_id,))
        vipa = self._free_address()
        if vipa is None:
            vipa = self._reclaim(in_use)
        self._db.execute(
            "INSERT INTO leases (terminal_id, vipa, last_seen) VALUES (?, ?, ?)",
            (terminal_id, vipa, now),
        )
        return str(ipaddress.IPv4Address(vipa))

    def all(self) -> dict[str, str]:
        rows = self._db.execute("SELECT terminal_id, vipa FROM leases").fetchall()
        return {tid: str(ipaddress.IPv4Address(v)) for tid, v in rows if self._in_pool(v)}

    def _in_pool(self, value: int) -> bool:
        return self._first <= value <= self._last

    def _free_address(self) -> int | None:
        row = self._db.execute(
            "SELECT MAX(vipa) FROM leases WHERE vipa BETWEEN ? AND ?", (self._first, self._last)
        ).fetchone()
        top = row[0]
        if top is None:
            return self._first
        if top < self._last:
            return int(top) + 1
        # The top is taken: look for the first gap left by reclaimed leases.
        row = self._db.execute(
            "SELECT a.vipa + 1 FROM leases a WHERE a.vipa BETWEEN ? AND ? AND NOT EXISTS "
            "(SELECT 1 FROM leases b WHERE b.vipa = a.vipa + 1) AND a.vipa < ? "
            "ORDER BY a.vipa LIMIT 1",
            (self._first, self._last, self._last),
        ).fetchone()
        if row is not None:
            return int(row[0])
        row = self._db.execute("SELECT 1 FROM leases WHERE vipa = ?", (self._first,)).fetchone()
        return self._first if row is None else None

    def _reclaim(self, in_use: Callable[[str], bool]) -> int:
        # Only leases inside the pool: a stale one from an older pool has an
        # address this pool cannot hand out.
        for tid, vipa in self._db.execute(
            "SELECT terminal_id, vipa FROM leases WHERE vipa BETWEEN ? AND ? ORDER BY last_seen",
            (self._first, self._last),
        ).fetchall():
            if not in_use(tid):
                self._db.execute("DELETE FROM leases WHERE terminal_id = ?", (tid,))
                return int(vipa)
        raise PoolExhausted(f"every address of {self.pool} is in use")


class PoolExhausted(Exception):
    """No address left and none reclaimable."""
