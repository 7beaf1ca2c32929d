"""Stores for the tests: one implementation on one location, as several anchors open it."""

from __future__ import annotations

import time
from collections.abc import Callable

from anchor_node.pool import parse_pool
from anchor_node.store.api import Store
from anchor_node.store.location import StoreLocation, open_store

__all__ = ["Backend", "wait_for"]


class Backend:
    """Stores of one implementation on one location; closed after the test."""

    def __init__(self, kind: str, location: StoreLocation) -> None:
        self.kind = kind
        self.location = location
        self.opened: list[Store] = []

    def open(
        self,
        pool: str = "10.9.0.0/29",
        *,
        shared_pool: str | None = None,
        prefix_cap: int = 1024,
        anchor_id: str = "a1",
    ) -> Store:
        store = open_store(
            self.location,
            parse_pool(pool),
            shared_pool=None if shared_pool is None else parse_pool(shared_pool),
            prefix_cap=prefix_cap,
            anchor_id=anchor_id,
        )
        self.opened.append(store)
        return store

    def close(self) -> None:
        for store in self.opened:
            store.close()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
