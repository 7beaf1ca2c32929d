"""Where a new flow goes: asked by the data-path thread, answered from the steering snapshot.

A TCP or UDP flow whose owning socket is known and whose process is in the
classifier's cache is decided at once. One whose process is not cached is
held by the data path (`decide` returns None) and looked up on the
classifier thread (a /proc scan), which hands the answer straight back to
the data path (`resolve`). Flows the control plane wants re-examined (owner
not found at first) go the same way. The control plane is not in between:
it only replaces the steering snapshot that both threads read.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable

from ground.errors import MalformedError
from paft.flow import FiveTuple
from upmt_client.classifier import Classifier
from upmt_client.flows import FlowBook
from upmt_client.forwarder import FlowChoice
from upmt_client.procscan import AppInfo
from upmt_client.reevaluation import CLASSIFIABLE
from upmt_client.sockdiag import SockDiag, SocketOwner
from upmt_client.steering import Steering

__all__ = ["FlowDecider"]

log = logging.getLogger("upmt.client")


class FlowDecider:
    def __init__(self, classifier: Classifier, steering: Steering, book: FlowBook) -> None:
        self.classifier = classifier
        self._steering = steering
        self._book = book
        self._queue: queue.SimpleQueue[tuple[FiveTuple, SocketOwner | None] | None] = (
            queue.SimpleQueue()
        )
        # The data path's `resolve`, for flows held until classified.
        self.resolve: Callable[[FiveTuple, FlowChoice], None] | None = None

    def choice(self, app: AppInfo | None) -> FlowChoice:
        name, exe = (app.name, app.exe_name) if app is not None else (None, None)
        decision = self._steering.view.decide(name, exe)
        return FlowChoice(decision.tunnel, name, decision.movable, decision.twin)

    def decide(self, key: FiveTuple) -> FlowChoice | None:
        """Data-path thread: where a new flow goes, or None to hold it until classified."""
        if key.proto not in CLASSIFIABLE:
            return self.choice(None)
        owner = self.classifier.owner(key)
        if owner is None:
            return self.choice(None)  # re-examined later by the control plane
        app = self.classifier.cached_app(owner)
        if app is None:
            self._queue.put((key, owner))
            return None
        self._book.apps[key] = app
        return self.choice(app)

    def fallback(self, key: FiveTuple) -> FlowChoice:
        return self.choice(None)

    def reexamine(self, key: FiveTuple) -> None:
        self._queue.put((key, None))

    def stop(self) -> None:
        self._queue.put(None)

    def run(self) -> None:
        """Classifier thread: the slow part (a /proc scan) of finding a flow's owner."""
        # The data path owns the classifier's sock_diag socket; re-examinations
        # here need their own.
        with SockDiag() as diag:
            while (item := self._queue.get()) is not None:
                key, owner = item
                try:
                    if owner is None:
                        owner = diag.lookup(key)
                    app = self.classifier.app_for_owner(owner) if owner is not None else None
                except (MalformedError, OSError) as exc:
                    log.debug("classifying %s failed: %r", key, exc)
                    app = None
                if app is not None:
                    self._book.apps[key] = app
                if self.resolve is not None:
                    self.resolve(key, self.choice(app))
