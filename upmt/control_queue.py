"""Frames travelling from the data-path thread to the trio control plane, bounded.

Control frames (SIGNAL, PROBE-ACK) are rare in normal operation but anyone
can send them, so the queue between the threads has a limit: beyond it the
data path drops the frame and counts it instead of letting a flood grow the
trio run queue without bound. The count is approximate under contention,
which is all a bound needs.
"""

import contextlib
from collections.abc import Callable
from typing import Generic, TypeVar

import trio

K = TypeVar("K")
DEFAULT_LIMIT = 1024


class ControlQueue(Generic[K]):
    """Hands control frames from the data-path thread to trio, at most `limit` pending."""

    def __init__(self, deliver: Callable[[K, bytes], None], limit: int = DEFAULT_LIMIT) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._deliver = deliver
        self.limit = limit
        self.pending = 0
        self.dropped = 0

    def __call__(self, key: K, data: bytes) -> None:
        """Called in the data-path thread."""
        if self.pending >= self.limit:
            self.dropped += 1
            return
        self.pending += 1
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._run, key, data)

    def _run(self, key: K, data: bytes) -> None:
        self.pending -= 1
        self._deliver(key, data)
