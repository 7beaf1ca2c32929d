"""Anchors sharing one PostgreSQL store, allocating at once: never a VIPA twice.

Two anchors, each with two connections (as two worker processes would
have), sub-pools 10.64.0.0/24 and 10.64.1.0/24 of the shared 10.64.0.0/23.
200 terminals associate through threads at the same time: most ask one
anchor, every fifth asks both at once (a terminal trying two anchors, or
retrying at another). The unique constraints must leave each terminal
exactly one lease, in the sub-pool of the anchor that made it, and no
address shared; a terminal that asked both ends up registered at one of
them, and the other hears that it moved.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from anchor_node.pool import parse_pool
from anchor_node.store.api import Moved, PrefixCapReached, Store
from anchor_node.store.location import migrate_store, open_store, parse_store
from anchor_node.store.pg_watch import PostgresMoveWatcher
from anchor_node.store.postgres import connection_parameters
from tests.unit.store_kit import wait_for

SHARED = "10.64.0.0/23"
SUB_POOLS = {"a1": "10.64.0.0/24", "b1": "10.64.1.0/24"}
TERMINALS = 200
FAR = 1e12  # registrations that do not expire during the test


@pytest.fixture
def url(postgres_url: str, tmp_path: Path) -> str:
    migrate_store(parse_store(postgres_url, tmp_path / "unused"))
    return postgres_url


@pytest.fixture
def stores(url: str, tmp_path: Path) -> Iterator[dict[str, list[Store]]]:
    """Two connections per anchor."""
    location = parse_store(url, tmp_path / "unused")
    opened = {
        anchor: [
            open_store(
                location,
                parse_pool(pool),
                shared_pool=parse_pool(SHARED),
                anchor_id=anchor,
            )
            for _ in range(2)
        ]
        for anchor, pool in SUB_POOLS.items()
    }
    yield opened
    for connections in opened.values():
        for store in connections:
            store.close()


def test_concurrent_associations_never_share_a_vipa(
    url: str, stores: dict[str, list[Store]]
) -> None:
    heard: dict[str, list[Moved]] = {anchor: [] for anchor in SUB_POOLS}
    watchers = []
    for anchor in SUB_POOLS:
        params = connection_parameters(url, f"{anchor}-moves")
        watcher = PostgresMoveWatcher(params, anchor, "test", heartbeat=0.1, retry=0.1)
        thread = threading.Thread(target=watcher.run, args=(heard[anchor].append,), daemon=True)
        thread.start()
        watchers.append((watcher, thread))
    wait_for(lambda: _listeners(url) == len(SUB_POOLS))
    start = threading.Barrier(8)
    got: dict[tuple[str, str], str] = {}  # (terminal, anchor) -> VIPA answered
    moved_from: dict[str, str] = {}  # terminal -> anchor its registration was taken from
    lock = threading.Lock()

    def associate(terminal: str, anchor: str, connection: int) -> None:
        store = stores[anchor][connection]
        vipa = store.acquire(terminal, 1.0, prefix=f"198.18.{int(terminal[1:]) % 8}.0/24")
        previous = store.register(terminal, FAR, 1.0)
        with lock:
            got[terminal, anchor] = vipa
            if previous is not None:
                moved_from[terminal] = previous

    jobs: list[Callable[[], None]] = []
    for n in range(TERMINALS):
        terminal = f"t{n}"
        if n % 5 == 0:  # both anchors at once
            jobs += [_job(associate, terminal, "a1", n % 2), _job(associate, terminal, "b1", n % 2)]
        else:
            jobs.append(_job(associate, terminal, "a1" if n % 2 else "b1", (n // 2) % 2))

    def run(job: Callable[[], None]) -> None:
        job()

    def first(job: Callable[[], None]) -> None:
        start.wait()
        job()

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(first, jobs[:8]))
            list(pool.map(run, jobs[8:]))
        leases = stores["a1"][0].all()
        assert len(leases) == TERMINALS
        assert len(set(leases.values())) == TERMINALS, "a VIPA handed out twice"
        for (terminal, _anchor), vipa in got.items():
            assert leases[terminal] == vipa  # both anchors answered the same one
        for terminal, anchor in _makers(url).items():
            assert ipaddress.IPv4Address(leases[terminal]) in parse_pool(SUB_POOLS[anchor])
        both = [f"t{n}" for n in range(0, TERMINALS, 5)]
        for terminal in both:
            registration = stores["a1"][0].registration(terminal, 2.0)
            assert registration is not None
            holder = registration.anchor_id
            left = moved_from.get(terminal)
            if left is not None:  # the second to register took it from the first
                assert left != holder
                wait_for(_heard(heard[left], Moved(terminal, holder)))
        assert moved_from.keys() <= set(both)
    finally:
        for watcher, thread in watchers:
            watcher.stop()
            thread.join(timeout=10)


def test_a_prefix_cap_holds_under_concurrency(stores: dict[str, list[Store]]) -> None:
    """40 new terminals from one /24 at once through four connections, cap 10: ten leases."""
    every = [s for connections in stores.values() for s in connections]
    for store in every:
        store.prefix_cap = 10

    def one(n: int) -> bool:
        try:
            every[n % 4].acquire(f"c{n}", 1.0, prefix="203.0.113.0/24")
        except PrefixCapReached:
            return False
        return True

    with ThreadPoolExecutor(max_workers=8) as pool:
        made = sum(pool.map(one, range(40)))
    assert made == 10 and len(every[0].all()) == 10


def _job(
    associate: Callable[[str, str, int], None], terminal: str, anchor: str, connection: int
) -> Callable[[], None]:
    return lambda: associate(terminal, anchor, connection)


def _heard(moves: list[Moved], move: Moved) -> Callable[[], bool]:
    return lambda: move in moves


def _makers(url: str) -> dict[str, str]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT terminal_id, anchor_id FROM upmt.leases").fetchall()
    return {str(t): str(a) for t, a in rows}


def _listeners(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '%-moves' "
            "AND query LIKE 'SELECT now()%'"
        ).fetchone()
    return 0 if row is None else int(row[0])
