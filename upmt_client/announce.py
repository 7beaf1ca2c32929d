"""Telling the anchor which flows now travel on a tunnel: HandoverRequests in turn (sans-IO).

An announcement is as many HandoverRequests as the anchor's cap and the
datagram size need (`upmt_client.handover.handover_requests`), sent one
after the other on the target tunnel; moved flows add up and the answer
reported is the last one. When it ends, the handover's record in the
`FlowBook` gets the answer and the time it took, and `on_done` (a CLI
command waiting) gets (answer, milliseconds, moved).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from sipmessage import Request, Response

from ground.constants import Addr
from ground.errors import MalformedError
from paft.flow import FiveTuple
from signalling.bodies import HandoverResponse, decode_body_untrusted
from signalling.message import MessageTooLarge
from upmt_client.flows import FlowBook
from upmt_client.handover import handover_requests
from upmt_client.transactions import ClientTransactions
from upmt_client.tunnels import tunnel_channel

__all__ = ["Announced", "Announcer"]

log = logging.getLogger("upmt.client")
ANSWER_TIMEOUT = 6.0
# (the anchor's answer, milliseconds to it or None, flows it moved or None, now)
Announced = Callable[[str, float | None, int | None, float], None]


@dataclass
class _Announcement:
    interface: str
    requests: list[Request]
    started: float
    index: int | None
    on_done: Announced | None
    answer: str = "no answer"
    moved: int = 0


class Announcer:
    def __init__(
        self, transactions: ClientTransactions, book: FlowBook, anchor_tunnel: Addr
    ) -> None:
        self._transactions = transactions
        self._book = book
        self.anchor = anchor_tunnel  # the current anchor's tunnel port (it may change)

    def announce(
        self,
        interface: str,
        keys: list[FiveTuple],
        build: Callable[[bytes], Request],
        now: float,
        *,
        index: int | None = None,
        on_done: Announced | None = None,
        twin_id: str | None = None,
    ) -> None:
        """Announce `keys` on `interface`'s tunnel (`build` signs a MESSAGE of a JSON body).

        With `twin_id` the flows are redundant on that tunnel as well.
        """
        if not self._transactions.is_open(tunnel_channel(interface)):
            if on_done is not None:
                on_done("no tunnel", None, None, now)
            return
        try:
            requests = handover_requests(keys, build, twin_id=twin_id)
        except MessageTooLarge as exc:  # one move alone does not fit: cannot happen, but
            log.error("HandoverRequest on %s not sent: %s", interface, exc)
            if on_done is not None:
                on_done("not sent (too large)", None, None, now)
            return
        self._next(_Announcement(interface, requests, now, index, on_done), now)

    def announce_move(
        self,
        interface: str,
        keys: list[FiveTuple],
        build: Callable[[bytes], Request],
        now: float,
        index: int,
        twin: str,
        twin_id: str | None,
    ) -> None:
        """A re-evaluation's move, with the flows' twin (redundant) or none ("").

        `FlowBook.twins` remembers what the anchor was told; when the
        announcement of a twin gets no answer, it is forgotten, so that the
        next re-evaluation tells the anchor again.
        """
        self._book.told_twins(keys, twin if twin_id else "")

        def unanswered(answer: str, _ms: float | None, _moved: int | None, _at: float) -> None:
            if twin_id and answer == "no answer":
                self._book.told_twins(keys, "")

        self.announce(interface, keys, build, now, index=index, on_done=unanswered, twin_id=twin_id)

    def _next(self, job: _Announcement, now: float) -> None:
        if not job.requests:
            self._finish(job, now)
            return
        request = job.requests.pop(0)
        self._transactions.request(
            tunnel_channel(job.interface),
            request,
            self.anchor,
            now,
            lambda response, at: self._answered(job, response, at),
            timeout=ANSWER_TIMEOUT,
        )

    def _answered(self, job: _Announcement, response: Response | None, now: float) -> None:
        if response is None:
            log.warning("no answer to HandoverRequest on %s", job.interface)
            job.answer = "no answer"
            self._finish(job, now)
            return
        job.answer = f"{response.code} {response.phrase}"
        with contextlib.suppress(MalformedError):
            body = decode_body_untrusted(response.body)
            if isinstance(body, HandoverResponse):
                job.moved += body.moved
        self._next(job, now)

    def _finish(self, job: _Announcement, now: float) -> None:
        answer = job.answer
        elapsed_ms: float | None = round((now - job.started) * 1000, 3)
        moved: int | None = job.moved
        if answer.startswith("200"):
            answer += f", moved {job.moved}"
        else:
            moved = None
            if answer == "no answer":
                elapsed_ms = None
        history = self._book.history
        if job.index is not None and 0 <= job.index < len(history):
            old = history[job.index]
            history[job.index] = replace(old, anchor=answer, anchor_ms=elapsed_ms)
        if job.on_done is not None:
            job.on_done(answer, elapsed_ms, moved, now)
