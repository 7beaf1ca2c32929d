"""Moves of terminals between anchors, learnt from PostgreSQL's LISTEN/NOTIFY.

`PostgresStore.register` notifies `upmt_moves` when a terminal that
another anchor held registers here; the anchor it left hears it on its own
connection (`run`, in a thread of its own, since psycopg blocks) and drops
the terminal's registration, tunnels and flows. Before passing a move on,
the watcher reads who holds the terminal now, so a terminal that came back
meanwhile is not dropped.

Notifications sent while the connection is down are lost; on reconnecting,
the watcher asks for every registration that changed to another anchor
since it last heard the server (by the database's clock, with a margin),
so a move is learnt late but not missed. A query every `heartbeat`
seconds is what notices a dead connection.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg

from anchor_node.store.api import Moved
from anchor_node.store.pg_schema import MOVES_CHANNEL

__all__ = ["PostgresMoveWatcher"]

log = logging.getLogger("upmt.anchor.store")

# Catching up after an outage looks back this much further than the last
# heartbeat, for registrations committed around it.
_MARGIN = datetime.timedelta(seconds=5)
# At the first connection: moves that a process restarted in place may have missed.
_FIRST_LOOK_BACK = datetime.timedelta(seconds=60)


class PostgresMoveWatcher:
    def __init__(
        self,
        params: dict[str, str],
        anchor_id: str,
        display: str,
        *,
        heartbeat: float = 1.0,
        retry: float = 2.0,
    ) -> None:
        self._params = params
        self.anchor_id = anchor_id
        self.display = display
        self.heartbeat = heartbeat
        self.retry = retry
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self, deliver: Callable[[Moved], None]) -> None:
        since: datetime.datetime | None = None
        lost = False
        while not self._stopping.is_set():
            try:
                with psycopg.connect(**self._params, autocommit=True) as conn:  # type: ignore[arg-type]
                    conn.execute(f"LISTEN {MOVES_CHANNEL}")
                    now = _server_time(conn)
                    start = now - _FIRST_LOOK_BACK if since is None else since - _MARGIN
                    self._catch_up(conn, start, deliver)
                    if lost:
                        log.warning("store %s: listening for moves again", self.display)
                        lost = False
                    since = now
                    while not self._stopping.is_set():
                        # Gathered first: the generator holds the connection's lock,
                        # and each note needs a query.
                        notes = list(conn.notifies(timeout=self.heartbeat))
                        for note in notes:
                            self._on_note(conn, note.payload, deliver)
                        since = _server_time(conn)
            except psycopg.Error as exc:
                if not lost:
                    log.error(
                        "store %s: lost the connection that hears of moves (%s); "
                        "reconnecting, missed moves are caught up then",
                        self.display,
                        str(exc).strip().splitlines()[0] if str(exc).strip() else exc,
                    )
                    lost = True
                self._stopping.wait(self.retry)

    def _catch_up(
        self,
        conn: psycopg.Connection[Any],
        start: datetime.datetime,
        deliver: Callable[[Moved], None],
    ) -> None:
        rows = conn.execute(
            "SELECT terminal_id, anchor_id FROM upmt.registrations "
            "WHERE anchor_id <> %s AND updated_at >= %s",
            (self.anchor_id, start),
        ).fetchall()
        for terminal_id, anchor_id in rows:
            deliver(Moved(str(terminal_id), str(anchor_id)))

    def _on_note(
        self, conn: psycopg.Connection[Any], payload: str, deliver: Callable[[Moved], None]
    ) -> None:
        try:
            note = json.loads(payload)
            terminal_id, anchor_id = str(note["terminal_id"]), str(note["anchor_id"])
        except (ValueError, KeyError, TypeError):
            log.warning("store %s: a move notification that does not parse", self.display)
            return
        if anchor_id == self.anchor_id:
            return
        row = conn.execute(
            "SELECT anchor_id FROM upmt.registrations WHERE terminal_id = %s", (terminal_id,)
        ).fetchone()
        if row is not None and row[0] != self.anchor_id:
            deliver(Moved(terminal_id, str(row[0])))


def _server_time(conn: psycopg.Connection[Any]) -> datetime.datetime:
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    value = row[0]
    assert isinstance(value, datetime.datetime)
    return value
