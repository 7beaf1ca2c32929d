"""The client's SIP transactions, one `TransactionLayer` per channel, sans-IO.

A channel is where datagrams travel: the REGISTER socket of an interface, or
a tunnel (SIP in SIGNAL frames). Each request carries a callback for its
final answer (or None: no answer within the deadline, or Timer F); a
provisional answer is absorbed. Closing a channel (a tunnel whose link went
down) answers what still waits on it with None. Time comes in as `now`;
datagrams and the next deadline go out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from sipmessage import Request, Response

from ground.constants import Addr
from signalling.events import ClientKey, ResponseReceived, TransactionTimedOut
from signalling.transaction import TransactionLayer

__all__ = ["Answer", "ClientTransactions"]

# Called with the final response, or None when none came in time.
Answer = Callable[[Response | None, float], None]


@dataclass
class _Pending:
    channel: str
    on_answer: Answer
    deadline: float


class ClientTransactions:
    def __init__(self) -> None:
        self._layers: dict[str, TransactionLayer] = {}
        self._pending: dict[tuple[str, ClientKey], _Pending] = {}
        self._out: list[tuple[str, bytes, Addr]] = []

    def open(self, channel: str) -> None:
        self._layers.setdefault(channel, TransactionLayer())

    def close(self, channel: str, now: float) -> None:
        """Forget `channel`; requests still waiting on it are answered None."""
        self._layers.pop(channel, None)
        for key in [k for k in self._pending if k[0] == channel]:
            pending = self._pending.pop(key, None)
            if pending is not None:
                pending.on_answer(None, now)

    def is_open(self, channel: str) -> bool:
        return channel in self._layers

    def request(
        self,
        channel: str,
        request: Request,
        addr: Addr,
        now: float,
        on_answer: Answer,
        *,
        timeout: float = math.inf,
    ) -> None:
        """Send `request` on `channel`; `on_answer` gets the final response or None."""
        layer = self._layers.get(channel)
        if layer is None:
            on_answer(None, now)
            return
        key = layer.send_request(request, addr, now)
        self._pending[(channel, key)] = _Pending(channel, on_answer, now + timeout)
        self._drain(channel, layer, now)

    def receive(self, channel: str, data: bytes, addr: Addr, now: float) -> None:
        """One datagram of `channel` (never raises on bad input)."""
        layer = self._layers.get(channel)
        if layer is None:
            return
        layer.receive_datagram(data, addr, now)
        self._drain(channel, layer, now)

    def get_timer(self) -> float | None:
        deadlines = [d for layer in self._layers.values() if (d := layer.get_timer()) is not None]
        deadlines.extend(p.deadline for p in self._pending.values() if p.deadline != math.inf)
        return min(deadlines, default=None)

    def handle_timer(self, now: float) -> None:
        for channel, layer in list(self._layers.items()):
            timer = layer.get_timer()
            if timer is not None and timer <= now:
                layer.handle_timer(now)
                self._drain(channel, layer, now)
        for key, pending in list(self._pending.items()):
            if pending.deadline <= now and self._pending.pop(key, None) is not None:
                pending.on_answer(None, now)

    def datagrams_to_send(self) -> list[tuple[str, bytes, Addr]]:
        out, self._out = self._out, []
        return out

    def _drain(self, channel: str, layer: TransactionLayer, now: float) -> None:
        while (event := layer.next_event()) is not None:
            if isinstance(event, ResponseReceived):
                if event.response.code < 200:
                    continue
                pending = self._pending.pop((channel, event.key), None)
                if pending is not None:
                    pending.on_answer(event.response, now)
            elif isinstance(event, TransactionTimedOut):
                pending = self._pending.pop((channel, event.key), None)
                if pending is not None:
                    pending.on_answer(None, now)
            # Requests from the anchor: none are defined; the layer counts them.
        self._out.extend((channel, data, addr) for data, addr in layer.datagrams_to_send())
