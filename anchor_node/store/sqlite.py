"""The embedded store: one SQLite file, for an anchor that shares its state with nobody.

A lease is sticky: a terminal gets the same VIPA every time it associates,
also after an anchor restart, because the table lives in a file. Addresses
are handed out from the pool in order, skipping the network and broadcast
addresses and the anchor's own (the first host). When the pool is full, the
lease seen longest ago that is not in use (associated here, or registered
and not expired) is reclaimed. Each lease records the source prefix (/24,
or /48 for IPv6) it was first asked from, and one prefix may create at most
`prefix_cap` leases, so that one network cannot drain the pool with made-up
terminal ids.

Without a users file a terminal id belongs to the first key that registered
it (trust on first use): `terminal_keys` keeps that public key, and the
prefix it came from, which may pin at most `prefix_cap` ids too (a
reclaimed lease frees an address, never an id's pinned key).

Durability: the file is in WAL mode. A new lease or a pinned key is written
with ``synchronous=FULL`` (fsync before the answer leaves), so that a power
loss never forgets an address already handed out, which would give it to
another terminal; the `last_seen` refresh of every REGISTER, registrations
and tunnel records are not (NORMAL: losing them only reorders reclaiming or
forgets metadata that the next REGISTER writes again). The file is created
mode 0600.

Schema: `PRAGMA user_version` is 1 once `registrations` and `tunnels`
exist; a file of version 0 (written before them, maybe before the prefix
columns too) is brought up to date when opened.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

from anchor_node.pool import HostRange
from anchor_node.store.api import (
    DEFAULT_PREFIX_CAP,
    KeyConflict,
    MoveWatcher,
    PoolExhausted,
    PrefixCapReached,
    Registration,
    TunnelInfo,
    nobody,
)
from ground.errors import SetupError

__all__ = ["SCHEMA_VERSION", "SqliteStore", "migrate", "migrate_file"]

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    terminal_id TEXT PRIMARY KEY,
    vipa INTEGER NOT NULL UNIQUE,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS terminal_keys (
    terminal_id TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    pinned_at REAL NOT NULL,
    prefix TEXT
);
CREATE TABLE IF NOT EXISTS registrations (
    terminal_id TEXT PRIMARY KEY,
    anchor_id TEXT NOT NULL,
    expires_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tunnels (
    terminal_id TEXT NOT NULL,
    tunnel_id TEXT NOT NULL,
    interface TEXT NOT NULL,
    anchor_id TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (terminal_id, tunnel_id)
);
"""


def _create_private(path: Path) -> None:
    """Create `path` mode 0600 if absent (SQLite gives its -wal and -shm files that mode)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        with contextlib.suppress(OSError):
            if os.stat(path).st_mode & 0o077:
                os.chmod(path, 0o600)
        return
    except OSError as exc:
        raise SetupError(f"cannot create lease store {path}: {exc.strerror}") from None
    os.close(fd)


def migrate(db: sqlite3.Connection) -> tuple[int, int]:
    """Bring an open file to `SCHEMA_VERSION`; (version before, version after)."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise SetupError(
            f"lease store schema version {version} is newer than this anchor's "
            f"({SCHEMA_VERSION}): run a newer anchor-node"
        )
    db.executescript(SCHEMA)
    for table in ("leases", "terminal_keys"):
        columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if "prefix" not in columns:  # a store written before the prefix caps
            db.execute(f"ALTER TABLE {table} ADD COLUMN prefix TEXT")
        db.execute(f"CREATE INDEX IF NOT EXISTS {table}_prefix ON {table} (prefix)")
    if version < SCHEMA_VERSION:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return int(version), SCHEMA_VERSION


def migrate_file(path: Path) -> tuple[int, int]:
    """`migrate` on the file at `path`, created (mode 0600) if absent."""
    _create_private(path)
    try:
        with contextlib.closing(sqlite3.connect(str(path), isolation_level=None)) as db:
            db.execute("PRAGMA journal_mode=WAL")
            return migrate(db)
    except sqlite3.Error as exc:
        raise SetupError(f"cannot migrate lease store {path}: {exc}") from None


class SqliteStore:
    def __init__(
        self,
        path: Path | str,
        pool: ipaddress.IPv4Network,
        *,
        prefix_cap: int = DEFAULT_PREFIX_CAP,
        shared_pool: ipaddress.IPv4Network | None = None,
        anchor_id: str | None = None,
    ) -> None:
        self.pool = pool
        self.shared_pool = pool if shared_pool is None else shared_pool
        self.prefix_cap = prefix_cap
        self.anchor_id = anchor_id or socket.gethostname()
        self._own = HostRange.of(pool)
        self._valid = HostRange.of(self.shared_pool)
        if str(path) != ":memory:":
            _create_private(Path(path))
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL for the frequent refreshes; `_durable` raises it to FULL for
            # the writes that must survive a power loss (see the module docstring).
            self._db.execute("PRAGMA synchronous=NORMAL")
            migrate(self._db)
        except sqlite3.Error as exc:
            raise SetupError(f"cannot open lease store {path}: {exc}") from None

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @contextlib.contextmanager
    def _durable(self) -> Iterator[None]:
        """One transaction, synced to disk before it returns."""
        self._db.execute("PRAGMA synchronous=FULL")
        try:
            with self._transaction():
                yield
        finally:
            self._db.execute("PRAGMA synchronous=NORMAL")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    # -- leases ------------------------------------------------------------------
    def lookup(self, terminal_id: str) -> str | None:
        row = self._db.execute(
            "SELECT vipa FROM leases WHERE terminal_id = ?", (terminal_id,)
        ).fetchone()
        if row is None or row[0] not in self._valid:
            return None
        return str(ipaddress.IPv4Address(row[0]))

    def acquire(
        self,
        terminal_id: str,
        now: float,
        in_use: Callable[[str], bool] = nobody,
        *,
        prefix: str | None = None,
        pin: bytes | None = None,
    ) -> str:
        current = self.lookup(terminal_id)
        if current is not None:
            self._db.execute(
                "UPDATE leases SET last_seen = ? WHERE terminal_id = ?", (now, terminal_id)
            )
            if pin is not None:
                self._check_cap("terminal_keys", prefix)
                with self._durable():
                    self._insert_pin(terminal_id, pin, now, prefix)
            return current
        self._check_cap("leases", prefix)
        if pin is not None:
            self._check_cap("terminal_keys", prefix)
        with self._durable():
            # A lease outside the (possibly changed) pool is stale: forget it.
            self._db.execute("DELETE FROM leases WHERE terminal_id = ?", (terminal_id,))
            vipa = self._free_address()
            if vipa is None:
                vipa = self._reclaim(in_use, now)
            self._db.execute(
                "INSERT INTO leases (terminal_id, vipa, last_seen, prefix) VALUES (?, ?, ?, ?)",
                (terminal_id, vipa, now, prefix),
            )
            if pin is not None:
                self._insert_pin(terminal_id, pin, now, prefix)
        return str(ipaddress.IPv4Address(vipa))

    def _check_cap(self, table: str, prefix: str | None) -> None:
        """PrefixCapReached if `prefix` made `prefix_cap` rows of `table` (leases, or pins:
        a reclaimed lease frees its address, never its terminal id's pinned key)."""
        if prefix is None:
            return
        (count,) = self._db.execute(
            f"SELECT COUNT(*) FROM {table} WHERE prefix = ?", (prefix,)
        ).fetchone()
        if count >= self.prefix_cap:
            what = "leases" if table == "leases" else "pinned terminal keys"
            raise PrefixCapReached(f"{prefix} made {count} {what} (limit {self.prefix_cap})")

    def all(self) -> dict[str, str]:
        rows = self._db.execute("SELECT terminal_id, vipa FROM leases").fetchall()
        return {tid: str(ipaddress.IPv4Address(v)) for tid, v in rows if v in self._valid}

    def _free_address(self) -> int | None:
        first, last = self._own.first, self._own.last
        row = self._db.execute(
            "SELECT MAX(vipa) FROM leases WHERE vipa BETWEEN ? AND ?", (first, last)
        ).fetchone()
        top = row[0]
        if top is None:
            return first
        if top < last:
            return int(top) + 1
        # The top is taken: look for the first gap left by reclaimed leases.
        row = self._db.execute(
            "SELECT a.vipa + 1 FROM leases a WHERE a.vipa BETWEEN ? AND ? AND NOT EXISTS "
            "(SELECT 1 FROM leases b WHERE b.vipa = a.vipa + 1) AND a.vipa < ? "
            "ORDER BY a.vipa LIMIT 1",
            (first, last, last),
        ).fetchone()
        if row is not None:
            return int(row[0])
        row = self._db.execute("SELECT 1 FROM leases WHERE vipa = ?", (first,)).fetchone()
        return first if row is None else None

    def _reclaim(self, in_use: Callable[[str], bool], now: float) -> int:
        # Only leases inside the pool: a stale one from an older pool has an
        # address this pool cannot hand out.
        for tid, vipa in self._db.execute(
            "SELECT terminal_id, vipa FROM leases WHERE vipa BETWEEN ? AND ? AND NOT EXISTS "
            "(SELECT 1 FROM registrations r WHERE r.terminal_id = leases.terminal_id "
            "AND r.expires_at > ?) ORDER BY last_seen",
            (self._own.first, self._own.last, now),
        ).fetchall():
            if not in_use(tid):
                self._db.execute("DELETE FROM leases WHERE terminal_id = ?", (tid,))
                return int(vipa)
        raise PoolExhausted(f"every address of {self.pool} is in use")

    # -- pinned keys (trust on first use) ----------------------------------------
    def pinned_key(self, terminal_id: str) -> bytes | None:
        row = self._db.execute(
            "SELECT public_key FROM terminal_keys WHERE terminal_id = ?", (terminal_id,)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def pin_key(
        self, terminal_id: str, public_key: bytes, now: float, *, prefix: str | None = None
    ) -> None:
        with self._durable():
            self._db.execute(
                "INSERT OR IGNORE INTO terminal_keys (terminal_id, public_key, pinned_at, prefix) "
                "VALUES (?, ?, ?, ?)",
                (terminal_id, public_key, now, prefix),
            )

    def _insert_pin(
        self, terminal_id: str, public_key: bytes, now: float, prefix: str | None
    ) -> None:
        """Pin inside the caller's transaction; KeyConflict (rolling it back) if another key
        holds the id."""
        self._db.execute(
            "INSERT OR IGNORE INTO terminal_keys (terminal_id, public_key, pinned_at, prefix) "
            "VALUES (?, ?, ?, ?)",
            (terminal_id, public_key, now, prefix),
        )
        if self.pinned_key(terminal_id) != public_key:
            raise KeyConflict(f"terminal id {terminal_id} belongs to another key")

    def unpin_key(self, terminal_id: str) -> bool:
        with self._durable():
            cursor = self._db.execute(
                "DELETE FROM terminal_keys WHERE terminal_id = ?", (terminal_id,)
            )
        return cursor.rowcount > 0

    # -- registrations ---------------------------------------------------------------
    def register(self, terminal_id: str, expires_at: float, now: float) -> str | None:
        with self._transaction():
            row = self._db.execute(
                "SELECT anchor_id, expires_at FROM registrations WHERE terminal_id = ?",
                (terminal_id,),
            ).fetchone()
            self._db.execute(
                "INSERT INTO registrations (terminal_id, anchor_id, expires_at, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (terminal_id) DO UPDATE SET "
                "anchor_id = excluded.anchor_id, expires_at = excluded.expires_at, "
                "updated_at = excluded.updated_at",
                (terminal_id, self.anchor_id, expires_at, now),
            )
            if row is None or row[0] == self.anchor_id:
                return None
            self._db.execute(
                "DELETE FROM tunnels WHERE terminal_id = ? AND anchor_id <> ?",
                (terminal_id, self.anchor_id),
            )
            return str(row[0]) if row[1] > now else None

    def unregister(self, terminal_id: str) -> None:
        self._db.execute(
            "DELETE FROM registrations WHERE terminal_id = ? AND anchor_id = ?",
            (terminal_id, self.anchor_id),
        )

    def registration(self, terminal_id: str, now: float) -> Registration | None:
        row = self._db.execute(
            "SELECT anchor_id, expires_at FROM registrations "
            "WHERE terminal_id = ? AND expires_at > ?",
            (terminal_id, now),
        ).fetchone()
        return None if row is None else Registration(terminal_id, str(row[0]), float(row[1]))

    # -- tunnel records ------------------------------------------------------------------
    def put_tunnel(self, terminal_id: str, tunnel_id: str, interface: str, now: float) -> None:
        self._db.execute(
            "INSERT INTO tunnels (terminal_id, tunnel_id, interface, anchor_id, created) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (terminal_id, tunnel_id) DO UPDATE SET "
            "interface = excluded.interface, anchor_id = excluded.anchor_id",
            (terminal_id, tunnel_id, interface, self.anchor_id, now),
        )

    def drop_tunnel(self, terminal_id: str, tunnel_id: str) -> None:
        self._db.execute(
            "DELETE FROM tunnels WHERE terminal_id = ? AND tunnel_id = ? AND anchor_id = ?",
            (terminal_id, tunnel_id, self.anchor_id),
        )

    def tunnels(self, terminal_id: str) -> list[TunnelInfo]:
        rows = self._db.execute(
            "SELECT tunnel_id, interface, anchor_id, created FROM tunnels "
            "WHERE terminal_id = ? ORDER BY created, tunnel_id",
            (terminal_id,),
        ).fetchall()
        return [TunnelInfo(terminal_id, str(t), str(i), str(a), float(c)) for t, i, a, c in rows]

    def clear_tunnels(self) -> None:
        self._db.execute("DELETE FROM tunnels WHERE anchor_id = ?", (self.anchor_id,))

    def watcher(self) -> MoveWatcher | None:
        return None  # one file, one anchor: nobody else to move to
