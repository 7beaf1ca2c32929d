"""The PostgreSQL store's schema, `upmt`, and its migrations.

The schema is versioned in `upmt.schema_version` (one row). `migrate`
applies the missing steps in one transaction under an advisory lock, so
two anchors migrating at once do it once; `anchor-node store migrate`
runs it. An anchor never migrates by itself at `run`: anchors of
different releases may share the database, and an operator decides when
its schema moves. A step is only ever added at the end of `MIGRATIONS`.

VIPAs are `inet` (readable in psql, ordered and incremented like integers);
times the anchors compare (`last_seen`, `expires_at`, `created`) are their
wall clocks in seconds, as in the SQLite store; `updated_at` is the
database's own clock, by which a watcher catches up on moves it missed.
"""

from __future__ import annotations

from typing import Any

import psycopg

__all__ = [
    "LOCK_HA",
    "MIGRATIONS",
    "MOVES_CHANNEL",
    "SCHEMA_VERSION",
    "migrate",
    "schema_version",
]

# Keys of the advisory locks the store takes (first argument of the two-key form).
LOCK_MIGRATE = 75700
LOCK_PREFIX = 75701  # per source prefix: its cap is counted and used in one go
LOCK_TERMINAL = 75702  # per terminal id: one registration change at a time
LOCK_HA = 75703  # per anchor id: one takeover at a time
# Where a registration that takes a terminal from another anchor is announced.
MOVES_CHANNEL = "upmt_moves"

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE upmt.leases (
        terminal_id text PRIMARY KEY,
        vipa inet NOT NULL UNIQUE CHECK (family(vipa) = 4 AND masklen(vipa) = 32),
        last_seen double precision NOT NULL,
        prefix text,
        anchor_id text NOT NULL
    );
    CREATE INDEX leases_prefix ON upmt.leases (prefix);
    CREATE INDEX leases_last_seen ON upmt.leases (last_seen);
    CREATE TABLE upmt.terminal_keys (
        terminal_id text PRIMARY KEY,
        public_key bytea NOT NULL,
        pinned_at double precision NOT NULL,
        prefix text
    );
    CREATE INDEX terminal_keys_prefix ON upmt.terminal_keys (prefix);
    CREATE TABLE upmt.registrations (
        terminal_id text PRIMARY KEY,
        anchor_id text NOT NULL,
        expires_at double precision NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX registrations_updated ON upmt.registrations (updated_at);
    CREATE TABLE upmt.tunnels (
        terminal_id text NOT NULL,
        tunnel_id text NOT NULL,
        interface text NOT NULL,
        anchor_id text NOT NULL,
        created double precision NOT NULL,
        PRIMARY KEY (terminal_id, tunnel_id)
    );
    CREATE INDEX tunnels_anchor ON upmt.tunnels (anchor_id);
    """,
    # 2: the HA pair (anchor_node.ha). One epoch per anchor id, taken by the
    # node that holds the shared address; the terminals' sealed state, written
    # only under the current epoch (fencing).
    """
    CREATE TABLE upmt.ha_epochs (
        anchor_id text PRIMARY KEY,
        epoch bigint NOT NULL,
        holder text NOT NULL,
        taken_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE upmt.terminal_state (
        anchor_id text NOT NULL,
        terminal_id text NOT NULL,
        epoch bigint NOT NULL,
        sealed bytea NOT NULL,
        written_at double precision NOT NULL,
        PRIMARY KEY (anchor_id, terminal_id)
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The schema's version: 0 where no anchor migrated this database yet."""
    row = conn.execute("SELECT to_regclass('upmt.schema_version') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    row = conn.execute("SELECT version FROM upmt.schema_version").fetchone()
    return 0 if row is None else int(row[0])


def migrate(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """Bring the schema to `SCHEMA_VERSION`; (version before, version after).

    A database newer than this anchor is left alone (before > after then).
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (LOCK_MIGRATE,))
        conn.execute("CREATE SCHEMA IF NOT EXISTS upmt")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS upmt.schema_version ("
            "one boolean PRIMARY KEY DEFAULT true CHECK (one), version integer NOT NULL)"
        )
        before = schema_version(conn)
        if before >= SCHEMA_VERSION:
            return before, SCHEMA_VERSION
        for step in MIGRATIONS[before:]:
            conn.execute(step)
        conn.execute(
            "INSERT INTO upmt.schema_version (one, version) VALUES (true, %s) "
            "ON CONFLICT (one) DO UPDATE SET version = excluded.version",
            (SCHEMA_VERSION,),
        )
    return before, SCHEMA_VERSION
