"""Which application owns a flow: sock_diag for the socket, /proc for the process.

Classification is split by cost so that the data path never waits on /proc:

- `owner(key)` — one sock_diag request, a few microseconds; safe on the data
  path thread, and it must be called early, while the socket still exists.
- `app_for_owner(owner)` — may scan /proc (milliseconds); call it from a
  worker thread.
- `cached_app(owner)` — dict hits only; lets the data path reuse what a worker
  already learnt about a socket.

`classify(key)` does both steps in one call, for a caller that may block.
Each side is meant for one thread: `owner` from the data path thread,
`app_for_owner`/`classify` from one worker. `cached_app` only reads a dict the
worker writes, which is safe under the GIL. Every counter is written by only
one of the two threads, so none loses updates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final, Protocol

from ground.errors import MalformedError
from paft.flow import PROTO_TCP, PROTO_UDP, FiveTuple
from upmt_client.procscan import AppInfo, ProcessIndex
from upmt_client.sockdiag import SockDiag, SocketOwner

__all__ = ["Classifier", "ClassifierStatistics", "SocketLookup"]

_LOOKED_UP: Final = frozenset({PROTO_TCP, PROTO_UDP})
# Sockets remembered for `cached_app`; a socket's inode is never reused while
# it lives, so only the bound matters. Oldest entries go first.
DEFAULT_MAX_CACHED_SOCKETS: Final = 4096


class SocketLookup(Protocol):
    """What the classifier needs of `SockDiag`; tests pass an in-memory fake."""

    def lookup(self, key: FiveTuple) -> SocketOwner | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ClassifierStatistics:
    lookups: int  # owner() calls for TCP and UDP keys
    unsupported: int  # owner() calls for other protocols (ICMP, ...)
    diag_hits: int
    diag_misses: int  # no socket (or only a TIME_WAIT one)
    diag_errors: int  # the netlink socket failed or the reply did not parse
    diag_seconds_total: float
    app_lookups: int  # app_for_owner() calls
    no_process: int  # no process of the socket's uid holds it
    no_app: int  # the process exited before it could be described
    scans: int
    scan_seconds_total: float
    inode_cache_hits: int
    app_cache_hits: int
    cached_app_hits: int  # cached_app() answered
    cached_app_misses: int


class Classifier:
    """Flow → socket owner → application, with counters."""

    def __init__(
        self,
        diag: SocketLookup | None = None,
        index: ProcessIndex | None = None,
        *,
        max_cached_sockets: int = DEFAULT_MAX_CACHED_SOCKETS,
    ) -> None:
        self._diag: SocketLookup = diag if diag is not None else SockDiag()
        self._index = index if index is not None else ProcessIndex()
        self._max_cached = max_cached_sockets
        # inode → app, filled by app_for_owner, read by cached_app.
        self._by_inode: dict[int, AppInfo] = {}
        # Data path side.
        self._lookups = 0
        self._unsupported = 0
        self._diag_hits = 0
        self._diag_misses = 0
        self._diag_errors = 0
        self._diag_seconds = 0.0
        self._cached_hits = 0
        self._cached_misses = 0
        # Worker side.
        self._app_lookups = 0
        self._no_process = 0
        self._no_app = 0

    def owner(self, key: FiveTuple) -> SocketOwner | None:
        """The local socket sending `key` (`key.src` is the local end), or None.

        Never raises for a kernel or parse failure: the data path counts it
        (`diag_errors`) and treats the flow as unclassified.
        """
        if key.proto not in _LOOKED_UP:
            self._unsupported += 1
            return None
        self._lookups += 1
        started = time.perf_counter()
        try:
            found = self._diag.lookup(key)
        except (OSError, MalformedError):
            self._diag_errors += 1
            return None
        finally:
            self._diag_seconds += time.perf_counter() - started
        if found is None:
            self._diag_misses += 1
        else:
            self._diag_hits += 1
        return found

    def app_for_owner(self, owner: SocketOwner) -> AppInfo | None:
        """The application holding the socket, or None. May scan /proc."""
        self._app_lookups += 1
        pid = self._index.pid_of_inode(owner.inode, owner.uid)
        if pid is None:
            self._no_process += 1
            return None
        app = self._index.app_of_pid(pid)
        if app is None:
            self._no_app += 1
            return None
        by_inode = self._by_inode
        if owner.inode not in by_inode and len(by_inode) >= self._max_cached:
            # Dicts keep insertion order: the first key is the oldest.
            del by_inode[next(iter(by_inode))]
        by_inode[owner.inode] = app
        return app

    def classify(self, key: FiveTuple) -> AppInfo | None:
        """`owner` then `app_for_owner`; may scan /proc."""
        found = self.owner(key)
        if found is None:
            return None
        return self.app_for_owner(found)

    def cached_app(self, owner: SocketOwner) -> AppInfo | None:
        """The application last found for this socket, without touching /proc."""
        app = self._by_inode.get(owner.inode)
        if app is None:
            self._cached_misses += 1
        else:
            self._cached_hits += 1
        return app

    def statistics(self) -> ClassifierStatistics:
        index = self._index.statistics()
        return ClassifierStatistics(
            lookups=self._lookups,
            unsupported=self._unsupported,
            diag_hits=self._diag_hits,
            diag_misses=self._diag_misses,
            diag_errors=self._diag_errors,
            diag_seconds_total=self._diag_seconds,
            app_lookups=self._app_lookups,
            no_process=self._no_process,
            no_app=self._no_app,
            scans=index.scans,
            scan_seconds_total=index.scan_seconds_total,
            inode_cache_hits=index.inode_hits,
            app_cache_hits=index.app_hits,
            cached_app_hits=self._cached_hits,
            cached_app_misses=self._cached_misses,
        )

    def close(self) -> None:
        self._diag.close()
