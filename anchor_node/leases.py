"""VIPA leases: the names the registrar, the tools and the tests know them by.

`LeaseStore` is the embedded store (`anchor_node.store.sqlite`), which
keeps leases, pinned keys, registrations and tunnel records of one anchor
in one SQLite file; `anchor_node.store` has the interface it shares with
the PostgreSQL store, and `anchor_node.pool` the pool's arithmetic.
"""

from anchor_node.pool import anchor_address, parse_pool, source_prefix
from anchor_node.store.api import DEFAULT_PREFIX_CAP, PoolExhausted, PrefixCapReached
from anchor_node.store.sqlite import SqliteStore as LeaseStore

__all__ = [
    "DEFAULT_PREFIX_CAP",
    "LeaseStore",
    "PoolExhausted",
    "PrefixCapReached",
    "anchor_address",
    "parse_pool",
    "source_prefix",
]
