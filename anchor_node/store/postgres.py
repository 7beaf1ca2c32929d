"""The store that several anchors share: PostgreSQL through psycopg 3.

Every anchor opens one connection (and its `MoveWatcher` a second). The
rules that keep anchors from stepping on each other:

- VIPA allocation is one transaction per new lease, and the unique
  constraints on `leases.vipa` and `leases.terminal_id` arbitrate: the
  anchor computes the next free address of its own sub-pool and inserts it
  with ``ON CONFLICT DO NOTHING``; no row back means another connection won
  that address (the next one is tried) or leased this very terminal first
  (its lease is the answer). This needs no pre-populated address table
  (a /10 would be four million rows) and no lock held across anchors:
  sub-pools do not overlap, so anchors only race with themselves, and a
  loser retries with a fresh snapshot. ``SELECT ... FOR UPDATE SKIP
  LOCKED`` on such a table would do the same with more storage and a
  pool that must be kept in step with the configuration.
- A source prefix's cap is counted under an advisory lock on that prefix,
  and a terminal's registration changes under one on its id, so both hold
  under concurrency.
- Durability as in SQLite: a new lease, a pinned key and its removal
  commit with the server's `synchronous_commit` (durable by default);
  `last_seen` refreshes, registrations and tunnel records with
  `synchronous_commit = off` (a server crash may forget the last of them,
  never a lease).

Connection loss is one line in the log and `StoreUnavailable` for every
call until a thread of the store's own has reconnected (every
`RETRY_INTERVAL`; the registrar answers 503 with Retry-After meanwhile).
The registrar calls the store from the trio thread, so calls must stay
short: they never wait for a connection attempt, and `statement_timeout`,
`lock_timeout`, TCP keepalives and `tcp_user_timeout` bound a call to a
server that stopped answering to a few seconds, once: the connection is
then broken and the calls after it fail at once.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psycopg
from psycopg import conninfo as pg_conninfo

from anchor_node.pool import HostRange
from anchor_node.store import pg_ha
from anchor_node.store.api import (
    DEFAULT_PREFIX_CAP,
    KeyConflict,
    MoveWatcher,
    PoolExhausted,
    PrefixCapReached,
    Registration,
    SchemaMismatch,
    StoreUnavailable,
    TunnelInfo,
    nobody,
)
from anchor_node.store.ha_api import SavedState
from anchor_node.store.pg_schema import (
    LOCK_PREFIX,
    LOCK_TERMINAL,
    MOVES_CHANNEL,
    SCHEMA_VERSION,
    schema_version,
)
from ground.errors import SetupError

__all__ = ["PostgresStore", "connection_parameters"]

log = logging.getLogger("upmt.anchor.store")

RETRY_INTERVAL = 2.0  # seconds between reconnection attempts while the store is down
MAX_ATTEMPTS = 32  # addresses tried by one allocation before giving up (contention)
# Set per session unless the URL says otherwise: how long one call may block.
_SESSION_DEFAULTS = {
    "connect_timeout": "3",
    "keepalives": "1",
    "keepalives_idle": "2",
    "keepalives_interval": "1",
    "keepalives_count": "3",
    "tcp_user_timeout": "5000",
}
_SESSION_SETTINGS = (
    "SET statement_timeout = '3s'",
    "SET lock_timeout = '3s'",
    "SET idle_in_transaction_session_timeout = '10s'",
)

Row = tuple[Any, ...]


def connection_parameters(url: str, anchor_id: str) -> dict[str, str]:
    """libpq's parameters for `url`, with the timeouts above where it sets none."""
    try:
        params = {k: str(v) for k, v in pg_conninfo.conninfo_to_dict(url).items()}
    except psycopg.ProgrammingError as exc:
        raise SetupError(f"--store: not a PostgreSQL URL: {_first_line(exc)}") from None
    for key, value in _SESSION_DEFAULTS.items():
        params.setdefault(key, value)
    params.setdefault("application_name", f"anchor-node {anchor_id}"[:63])
    return params


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PostgresStore:
    def __init__(
        self,
        url: str,
        pool: ipaddress.IPv4Network,
        *,
        display: str,
        prefix_cap: int = DEFAULT_PREFIX_CAP,
        shared_pool: ipaddress.IPv4Network | None = None,
        anchor_id: str | None = None,
    ) -> None:
        self.pool = pool
        self.shared_pool = pool if shared_pool is None else shared_pool
        self.prefix_cap = prefix_cap
        self.anchor_id = anchor_id or socket.gethostname()
        self.display = display  # the URL without its password, for every message
        self._params = connection_parameters(url, self.anchor_id)
        self._own = HostRange.of(pool)
        self._valid = HostRange.of(self.shared_pool)
        # One connection, one caller at a time (the watcher has its own).
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Row] | None = None
        self._durable_commit = "on"
        self._reconnecting: threading.Thread | None = None
        self._closing = threading.Event()
        try:
            self._conn = self._connect()
            version = schema_version(self._conn)
        except psycopg.Error as exc:
            self.close()
            raise SetupError(f"cannot reach the store {display}: {_first_line(exc)}") from None
        if version != SCHEMA_VERSION:
            self.close()
            raise SchemaMismatch(_mismatch(display, version))

    # -- the connection ----------------------------------------------------------------
    def _connect(self) -> psycopg.Connection[Row]:
        conn = psycopg.connect(**self._params, autocommit=True)  # type: ignore[arg-type]
        try:
            row = conn.execute("SELECT current_setting('synchronous_commit')").fetchone()
            self._durable_commit = str(row[0]) if row is not None else "on"
            for setting in _SESSION_SETTINGS:
                conn.execute(setting)
            # Refreshes and metadata by default; `_durable` restores the server's setting.
            conn.execute("SET synchronous_commit = off")
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def _session(self) -> Iterator[psycopg.Connection[Row]]:
        """The connection, for one call; StoreUnavailable when it is down or drops."""
        with self._lock:
            conn = self._conn
            if conn is None or conn.closed:
                self._conn = None
                self._start_reconnecting()
                raise StoreUnavailable(f"store {self.display} unreachable, reconnecting")
            try:
                yield conn
            except psycopg.Error as exc:
                if conn.closed or conn.broken:
                    self._lost(exc)
                raise StoreUnavailable(f"store {self.display}: {_first_line(exc)}") from None

    def _lost(self, exc: BaseException) -> None:
        log.error(
            "store %s: connection lost (%s); REGISTERs get 503 until it is back, "
            "reconnecting every %.0f s",
            self.display,
            _first_line(exc),
            RETRY_INTERVAL,
        )
        with contextlib.suppress(Exception):
            if self._conn is not None:
                self._conn.close()
        self._conn = None
        self._start_reconnecting()

    def _start_reconnecting(self) -> None:
        """Reconnect in a thread of its own: a call never waits for a connection attempt
        (up to `connect_timeout` against a server that does not answer)."""
        if self._reconnecting is not None and self._reconnecting.is_alive():
            return
        self._reconnecting = threading.Thread(
            target=self._reconnect_loop, name="upmt-store-reconnect", daemon=True
        )
        self._reconnecting.start()

    def _reconnect_loop(self) -> None:
        while not self._closing.is_set():
            try:
                conn = self._connect()
            except psycopg.Error as exc:
                log.debug("store %s: still unreachable: %s", self.display, _first_line(exc))
                self._closing.wait(RETRY_INTERVAL)
                continue
            with self._lock:
                if self._closing.is_set():
                    conn.close()
                    return
                self._conn = conn
            log.warning("store %s reachable again", self.display)
            return

    @contextlib.contextmanager
    def _durable(self, conn: psycopg.Connection[Row]) -> Iterator[None]:
        """One transaction, committed as durably as the server is configured to."""
        with conn.transaction():
            conn.execute(
                "SELECT set_config('synchronous_commit', %s, true)", (self._durable_commit,)
            )
            yield

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- leases ---------------------------------------------------------------------------
    def _address(self, value: object) -> str | None:
        """The lease's VIPA as text, or None when it lies outside the shared pool."""
        if not isinstance(value, ipaddress.IPv4Address) or int(value) not in self._valid:
            return None
        return str(value)

    def _range(self, hosts: HostRange) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
        return ipaddress.IPv4Address(hosts.first), ipaddress.IPv4Address(hosts.last)

    def lookup(self, terminal_id: str) -> str | None:
        with self._session() as conn:
            return self._lookup(conn, terminal_id)

    def _lookup(self, conn: psycopg.Connection[Row], terminal_id: str) -> str | None:
        row = conn.execute(
            "SELECT vipa FROM upmt.leases WHERE terminal_id = %s", (terminal_id,)
        ).fetchone()
        return None if row is None else self._address(row[0])

    def acquire(
        self,
        terminal_id: str,
        now: float,
        in_use: Callable[[str], bool] = nobody,
        *,
        prefix: str | None = None,
        pin: bytes | None = None,
    ) -> str:
        with self._session() as conn:
            first, last = self._range(self._valid)
            row = conn.execute(
                "UPDATE upmt.leases SET last_seen = %s "
                "WHERE terminal_id = %s AND vipa BETWEEN %s AND %s RETURNING vipa",
                (now, terminal_id, first, last),
            ).fetchone()
            if row is not None:
                if pin is not None:
                    with self._durable(conn):
                        self._lock_prefix(conn, prefix)
                        self._check_cap(conn, "terminal_keys", prefix)
                        self._insert_pin(conn, terminal_id, pin, now, prefix)
                return str(row[0])
            with self._durable(conn):
                self._lock_prefix(conn, prefix)
                self._check_cap(conn, "leases", prefix)
                if pin is not None:
                    self._check_cap(conn, "terminal_keys", prefix)
                vipa = self._allocate(conn, terminal_id, now, in_use, prefix)
                if pin is not None:
                    self._insert_pin(conn, terminal_id, pin, now, prefix)
            return vipa

    def _allocate(
        self,
        conn: psycopg.Connection[Row],
        terminal_id: str,
        now: float,
        in_use: Callable[[str], bool],
        prefix: str | None,
    ) -> str:
        """A new lease for the terminal, inside the caller's transaction."""
        first, last = self._range(self._valid)
        # A lease outside the (possibly changed) shared pool is stale: forget it.
        conn.execute(
            "DELETE FROM upmt.leases WHERE terminal_id = %s AND NOT (vipa BETWEEN %s AND %s)",
            (terminal_id, first, last),
        )
        for _attempt in range(MAX_ATTEMPTS):
            vipa = self._free_address(conn)
            if vipa is None:
                vipa = self._reclaim(conn, in_use, now)
            row = conn.execute(
                "INSERT INTO upmt.leases (terminal_id, vipa, last_seen, prefix, anchor_id) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING vipa",
                (terminal_id, vipa, now, prefix, self.anchor_id),
            ).fetchone()
            if row is not None:
                return str(row[0])
            # Lost a race: for this address, or for the terminal itself (another
            # anchor leased it meanwhile; that lease is the terminal's).
            theirs = self._lookup(conn, terminal_id)
            if theirs is not None:
                return theirs
        raise StoreUnavailable(f"store {self.display}: no address won in {MAX_ATTEMPTS} tries")

    def _lock_prefix(self, conn: psycopg.Connection[Row], prefix: str | None) -> None:
        if prefix is not None:
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_PREFIX, prefix))

    def _check_cap(self, conn: psycopg.Connection[Row], table: str, prefix: str | None) -> None:
        if prefix is None:
            return
        query = (
            "SELECT count(*) FROM upmt.leases WHERE prefix = %s"
            if table == "leases"
            else "SELECT count(*) FROM upmt.terminal_keys WHERE prefix = %s"
        )
        row = conn.execute(query, (prefix,)).fetchone()
        count = 0 if row is None else int(row[0])
        if count >= self.prefix_cap:
            what = "leases" if table == "leases" else "pinned terminal keys"
            raise PrefixCapReached(f"{prefix} made {count} {what} (limit {self.prefix_cap})")

    def _free_address(self, conn: psycopg.Connection[Row]) -> ipaddress.IPv4Address | None:
        first, last = self._range(self._own)
        row = conn.execute(
            "SELECT vipa FROM upmt.leases WHERE vipa BETWEEN %s AND %s ORDER BY vipa DESC LIMIT 1",
            (first, last),
        ).fetchone()
        if row is None:
            return first
        top = row[0]
        if top < last:
            return ipaddress.IPv4Address(int(top) + 1)
        # The top is taken: look for the first gap left by reclaimed leases.
        row = conn.execute(
            "SELECT a.vipa + 1 FROM upmt.leases a WHERE a.vipa >= %s AND a.vipa < %s "
            "AND NOT EXISTS (SELECT 1 FROM upmt.leases b WHERE b.vipa = a.vipa + 1) "
            "ORDER BY a.vipa LIMIT 1",
            (first, last),
        ).fetchone()
        if row is not None:
            return ipaddress.IPv4Address(row[0])
        row = conn.execute("SELECT 1 FROM upmt.leases WHERE vipa = %s", (first,)).fetchone()
        return first if row is None else None

    def _reclaim(
        self, conn: psycopg.Connection[Row], in_use: Callable[[str], bool], now: float
    ) -> ipaddress.IPv4Address:
        """Free the lease seen longest ago of a terminal not associated (here or anywhere)."""
        first, last = self._range(self._own)
        candidates = conn.execute(
            "SELECT l.terminal_id, l.vipa FROM upmt.leases l WHERE l.vipa BETWEEN %s AND %s "
            "AND NOT EXISTS (SELECT 1 FROM upmt.registrations r "
            "WHERE r.terminal_id = l.terminal_id AND r.expires_at > %s) ORDER BY l.last_seen",
            (first, last, now),
        ).fetchall()
        for tid, vipa in candidates:
            if in_use(tid):
                continue
            # Another connection of this anchor may have reclaimed it meanwhile.
            row = conn.execute(
                "DELETE FROM upmt.leases WHERE terminal_id = %s AND vipa = %s RETURNING vipa",
                (tid, vipa),
            ).fetchone()
            if row is not None:
                return ipaddress.IPv4Address(row[0])
        raise PoolExhausted(f"every address of {self.pool} is in use")

    def all(self) -> dict[str, str]:
        with self._session() as conn:
            rows = conn.execute("SELECT terminal_id, vipa FROM upmt.leases").fetchall()
        out = {}
        for tid, vipa in rows:
            text = self._address(vipa)
            if text is not None:
                out[str(tid)] = text
        return out

    # -- pinned keys ---------------------------------------------------------------------------
    def pinned_key(self, terminal_id: str) -> bytes | None:
        with self._session() as conn:
            row = conn.execute(
                "SELECT public_key FROM upmt.terminal_keys WHERE terminal_id = %s", (terminal_id,)
            ).fetchone()
        return None if row is None else bytes(row[0])

    def pin_key(
        self, terminal_id: str, public_key: bytes, now: float, *, prefix: str | None = None
    ) -> None:
        with self._session() as conn, self._durable(conn):
            conn.execute(
                "INSERT INTO upmt.terminal_keys (terminal_id, public_key, pinned_at, prefix) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (terminal_id) DO NOTHING",
                (terminal_id, public_key, now, prefix),
            )

    def _insert_pin(
        self,
        conn: psycopg.Connection[Row],
        terminal_id: str,
        public_key: bytes,
        now: float,
        prefix: str | None,
    ) -> None:
        """Pin inside the caller's transaction; KeyConflict (rolling it back) if another key
        holds the id, pinned by another anchor since this one looked."""
        conn.execute(
            "INSERT INTO upmt.terminal_keys (terminal_id, public_key, pinned_at, prefix) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (terminal_id) DO NOTHING",
            (terminal_id, public_key, now, prefix),
        )
        row = conn.execute(
            "SELECT public_key FROM upmt.terminal_keys WHERE terminal_id = %s", (terminal_id,)
        ).fetchone()
        if row is None or bytes(row[0]) != public_key:
            raise KeyConflict(f"terminal id {terminal_id} belongs to another key")

    def unpin_key(self, terminal_id: str) -> bool:
        with self._session() as conn, self._durable(conn):
            cursor = conn.execute(
                "DELETE FROM upmt.terminal_keys WHERE terminal_id = %s", (terminal_id,)
            )
        return cursor.rowcount > 0

    # -- registrations -----------------------------------------------------------------------
    def register(self, terminal_id: str, expires_at: float, now: float) -> str | None:
        with self._session() as conn, conn.transaction():
            conn.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_TERMINAL, terminal_id)
            )
            row = conn.execute(
                "SELECT anchor_id, expires_at FROM upmt.registrations WHERE terminal_id = %s",
                (terminal_id,),
            ).fetchone()
            conn.execute(
                "INSERT INTO upmt.registrations (terminal_id, anchor_id, expires_at) "
                "VALUES (%s, %s, %s) ON CONFLICT (terminal_id) DO UPDATE SET "
                "anchor_id = excluded.anchor_id, expires_at = excluded.expires_at, "
                "updated_at = now()",
                (terminal_id, self.anchor_id, expires_at),
            )
            if row is None or row[0] == self.anchor_id:
                return None
            conn.execute(
                "DELETE FROM upmt.tunnels WHERE terminal_id = %s AND anchor_id <> %s",
                (terminal_id, self.anchor_id),
            )
            # Delivered at commit; the anchor it left drops its state for it.
            payload = {"terminal_id": terminal_id, "anchor_id": self.anchor_id, "from": row[0]}
            conn.execute("SELECT pg_notify(%s, %s)", (MOVES_CHANNEL, json.dumps(payload)))
            return str(row[0]) if float(row[1]) > now else None

    def unregister(self, terminal_id: str) -> None:
        with self._session() as conn:
            conn.execute(
                "DELETE FROM upmt.registrations WHERE terminal_id = %s AND anchor_id = %s",
                (terminal_id, self.anchor_id),
            )

    def registration(self, terminal_id: str, now: float) -> Registration | None:
        with self._session() as conn:
            row = conn.execute(
                "SELECT anchor_id, expires_at FROM upmt.registrations "
                "WHERE terminal_id = %s AND expires_at > %s",
                (terminal_id, now),
            ).fetchone()
        return None if row is None else Registration(terminal_id, str(row[0]), float(row[1]))

    # -- tunnel records ----------------------------------------------------------------------
    def put_tunnel(self, terminal_id: str, tunnel_id: str, interface: str, now: float) -> None:
        with self._session() as conn:
            conn.execute(
                "INSERT INTO upmt.tunnels (terminal_id, tunnel_id, interface, anchor_id, created) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (terminal_id, tunnel_id) DO UPDATE SET "
                "interface = excluded.interface, anchor_id = excluded.anchor_id",
                (terminal_id, tunnel_id, interface, self.anchor_id, now),
            )

    def drop_tunnel(self, terminal_id: str, tunnel_id: str) -> None:
        with self._session() as conn:
            conn.execute(
                "DELETE FROM upmt.tunnels "
                "WHERE terminal_id = %s AND tunnel_id = %s AND anchor_id = %s",
                (terminal_id, tunnel_id, self.anchor_id),
            )

    def tunnels(self, terminal_id: str) -> list[TunnelInfo]:
        with self._session() as conn:
            rows = conn.execute(
                "SELECT tunnel_id, interface, anchor_id, created FROM upmt.tunnels "
                "WHERE terminal_id = %s ORDER BY created, tunnel_id",
                (terminal_id,),
            ).fetchall()
        return [TunnelInfo(terminal_id, str(t), str(i), str(a), float(c)) for t, i, a, c in rows]

    def clear_tunnels(self) -> None:
        with self._session() as conn:
            conn.execute("DELETE FROM upmt.tunnels WHERE anchor_id = %s", (self.anchor_id,))

    # -- the HA pair (anchor_node.store.ha_api.HaStore) ---------------------------------------
    def take_over(self, holder: str) -> int:
        with self._session() as conn:
            return pg_ha.take_over(conn, self.anchor_id, holder)

    def current_epoch(self) -> tuple[int, str] | None:
        with self._session() as conn:
            return pg_ha.current_epoch(conn, self.anchor_id)

    def save_states(self, epoch: int, states: Iterable[tuple[str, bytes]], now: float) -> None:
        with self._session() as conn:
            pg_ha.save_states(conn, self.anchor_id, epoch, states, now)

    def drop_states(self, epoch: int, terminal_ids: Iterable[str]) -> None:
        with self._session() as conn:
            pg_ha.drop_states(conn, self.anchor_id, epoch, terminal_ids)

    def load_states(self) -> list[SavedState]:
        with self._session() as conn:
            return pg_ha.load_states(conn, self.anchor_id)

    # -- notifications ------------------------------------------------------------------------
    def watcher(self) -> MoveWatcher:
        from anchor_node.store.pg_watch import PostgresMoveWatcher

        # A name of its own, so that an operator tells the two connections apart.
        name = f"{self._params['application_name']} moves"[:63]
        return PostgresMoveWatcher(
            {**self._params, "application_name": name}, self.anchor_id, self.display
        )


def _mismatch(display: str, version: int) -> str:
    if version > SCHEMA_VERSION:
        return (
            f"store {display} has schema version {version}, newer than this anchor's "
            f"({SCHEMA_VERSION}): run a newer anchor-node"
        )
    return (
        f"store {display} has schema version {version}, this anchor needs {SCHEMA_VERSION}: "
        f"run 'anchor-node store migrate --store {display}'"
    )
