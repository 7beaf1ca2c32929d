"""VIPA leases and pinned terminal keys, kept in SQLite.

A lease is sticky: a terminal gets the same VIPA every time it associates,
also after an anchor restart, because the table lives in a file. Addresses
are handed out from the pool in order, skipping the network and broadcast
addresses and the anchor's own (the first host). When the pool is full, the
lease seen longest ago that is not in use is reclaimed. Each lease records
the source prefix (/24, or /48 for IPv6) it was first asked from, and one
prefix may create at most `prefix_cap` leases, so that one network cannot
drain the pool with made-up terminal ids.

Without a users file a terminal id belongs to the first key that registered
it (trust on first use): `terminal_keys` keeps that public key, and the
prefix it came from, which may pin at most `prefix_cap` ids too (a
reclaimed lease frees an address, never an id's pinned key).

Durability: the file is in WAL mode. A new lease or a pinned key is written
with ``synchronous=FULL`` (fsync before the answer leaves), so that a power
loss never forgets an address already handed out, which would give it to
another terminal; the `last_seen` refresh of every REGISTER is not (NORMAL:
losing it only reorders reclaiming). The file is created mode 0600.
"""

import contextlib
import ipaddress
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

from ground.errors import ConfigError, SetupError

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
"""
DEFAULT_PREFIX_CAP = 1024


def source_prefix(host: str) -> str:
    """The network a source address is counted in: its /24 (IPv4) or /48 (IPv6)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    length = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{length}", strict=False))


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


class LeaseStore:
    def __init__(
        self,
        path: Path | str,
        pool: ipaddress.IPv4Network,
        *,
        prefix_cap: int = DEFAULT_PREFIX_CAP,
    ) -> None:
        self.pool = pool
        self.prefix_cap = prefix_cap
        self._first = int(pool.network_address) + 2
        self._last = int(pool.broadcast_address) - 1
        if str(path) != ":memory:":
            _create_private(Path(path))
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL for the frequent refreshes; `_durable` raises it to FULL for
            # the writes that must survive a power loss (see the module docstring).
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            for table in ("leases", "terminal_keys"):
                columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                if "prefix" not in columns:  # a store written before the prefix caps
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN prefix TEXT")
                self._db.execute(f"CREATE INDEX IF NOT EXISTS {table}_prefix ON {table} (prefix)")
        except sqlite3.Error as exc:
            raise SetupError(f"cannot open lease store {path}: {exc}") from None

    @contextlib.contextmanager
    def _durable(self) -> Iterator[None]:
        """One transaction, synced to disk before it returns."""
        self._db.execute("PRAGMA synchronous=FULL")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        finally:
            self._db.execute("PRAGMA synchronous=NORMAL")

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
        self,
        terminal_id: str,
        now: float,
        in_use: Callable[[str], bool] = lambda _tid: False,
        *,
        prefix: str | None = None,
        pin: bytes | None = None,
    ) -> str:
        """The terminal's VIPA, allocating one on first association (asked from `prefix`).

        `pin`: the public key to pin the terminal id to in the same durable
        transaction (its first association without users).
        """
        current = self.lookup(terminal_id)
        if current is not None:
            self._db.execute(
                "UPDATE leases SET last_seen = ? WHERE terminal_id = ?", (now, terminal_id)
            )
            if pin is not None:
                self._check_cap("terminal_keys", prefix)
                self.pin_key(terminal_id, pin, now, prefix=prefix)
            return current
        self._check_cap("leases", prefix)
        if pin is not None:
            self._check_cap("terminal_keys", prefix)
        with self._durable():
            # A lease outside the (possibly changed) pool is stale: forget it.
            self._db.execute("DELETE FROM leases WHERE terminal_id = ?", (terminal_id,))
            vipa = self._free_address()
            if vipa is None:
                vipa = self._reclaim(in_use)
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

    # -- pinned keys (trust on first use) ----------------------------------------
    def pinned_key(self, terminal_id: str) -> bytes | None:
        row = self._db.execute(
            "SELECT public_key FROM terminal_keys WHERE terminal_id = ?", (terminal_id,)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def pin_key(
        self, terminal_id: str, public_key: bytes, now: float, *, prefix: str | None = None
    ) -> None:
        """Bind `terminal_id` to `public_key`; a binding that exists is kept."""
        with self._durable():
            self._insert_pin(terminal_id, public_key, now, prefix)

    def _insert_pin(
        self, terminal_id: str, public_key: bytes, now: float, prefix: str | None
    ) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO terminal_keys (terminal_id, public_key, pinned_at, prefix) "
            "VALUES (?, ?, ?, ?)",
            (terminal_id, public_key, now, prefix),
        )

    def unpin_key(self, terminal_id: str) -> bool:
        """Forget the key of `terminal_id` (an operator's decision); whether there was one."""
        with self._durable():
            cursor = self._db.execute(
                "DELETE FROM terminal_keys WHERE terminal_id = ?", (terminal_id,)
            )
        return cursor.rowcount > 0

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


class PrefixCapReached(Exception):
    """The source prefix created `prefix_cap` leases already."""
