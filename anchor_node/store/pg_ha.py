"""The HA pair's epoch and terminal state in PostgreSQL (see `anchor_node.store.ha_api`).

Fencing is by row lock: a write reads the anchor id's epoch `FOR SHARE`
in its own transaction and writes nothing unless it is the writer's, and a
takeover updates that row. Either the write commits first (the takeover
waits for its lock, and the new active's load after it sees the write),
or the takeover does (the write then reads the new epoch and is refused).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psycopg

from anchor_node.store.ha_api import Fenced, SavedState
from anchor_node.store.pg_schema import LOCK_HA

__all__ = ["current_epoch", "drop_states", "load_states", "save_states", "take_over"]

Conn = psycopg.Connection[tuple[Any, ...]]


def take_over(conn: Conn, anchor_id: str, holder: str) -> int:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_HA, anchor_id))
        row = conn.execute(
            "INSERT INTO upmt.ha_epochs (anchor_id, epoch, holder) VALUES (%s, 1, %s) "
            "ON CONFLICT (anchor_id) DO UPDATE SET epoch = upmt.ha_epochs.epoch + 1, "
            "holder = excluded.holder, taken_at = now() RETURNING epoch",
            (anchor_id, holder),
        ).fetchone()
    assert row is not None
    return int(row[0])


def current_epoch(conn: Conn, anchor_id: str) -> tuple[int, str] | None:
    row = conn.execute(
        "SELECT epoch, holder FROM upmt.ha_epochs WHERE anchor_id = %s", (anchor_id,)
    ).fetchone()
    return None if row is None else (int(row[0]), str(row[1]))


def _fence(conn: Conn, anchor_id: str, epoch: int) -> None:
    row = conn.execute(
        "SELECT epoch FROM upmt.ha_epochs WHERE anchor_id = %s FOR SHARE", (anchor_id,)
    ).fetchone()
    if row is None or int(row[0]) != epoch:
        now = None if row is None else int(row[0])
        raise Fenced(f"epoch {epoch} of anchor {anchor_id} is over (now {now})")


def save_states(
    conn: Conn, anchor_id: str, epoch: int, states: Iterable[tuple[str, bytes]], now: float
) -> None:
    rows = [(anchor_id, tid, epoch, sealed, now) for tid, sealed in states]
    if not rows:
        return
    with conn.transaction():
        _fence(conn, anchor_id, epoch)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO upmt.terminal_state "
                "(anchor_id, terminal_id, epoch, sealed, written_at) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (anchor_id, terminal_id) DO UPDATE SET epoch = excluded.epoch, "
                "sealed = excluded.sealed, written_at = excluded.written_at",
                rows,
            )


def drop_states(conn: Conn, anchor_id: str, epoch: int, terminal_ids: Iterable[str]) -> None:
    ids = list(terminal_ids)
    if not ids:
        return
    with conn.transaction():
        _fence(conn, anchor_id, epoch)
        conn.execute(
            "DELETE FROM upmt.terminal_state WHERE anchor_id = %s AND terminal_id = ANY(%s)",
            (anchor_id, ids),
        )


def load_states(conn: Conn, anchor_id: str) -> list[SavedState]:
    rows = conn.execute(
        "SELECT terminal_id, sealed, written_at, epoch FROM upmt.terminal_state "
        "WHERE anchor_id = %s",
        (anchor_id,),
    ).fetchall()
    return [SavedState(str(t), bytes(s), float(w), int(e)) for t, s, w, e in rows]
