"""A thin trio driver around one sans-IO `TransactionLayer`.

Datagrams come in through `feed` (from a socket loop, or from the data path
for SIP carried in SIGNAL frames); what the layer wants sent goes out through
the `send` callable; `run` sleeps until the layer's next timer. Requests
received are answered synchronously by `on_request` (the protocol cores are
sync); requests sent are awaited with `request`.
"""

import contextlib
import logging
import math
from collections.abc import Callable

import trio
from sipmessage import Request, Response

from ground.constants import Addr
from signalling.events import (
    ClientKey,
    RequestReceived,
    ResponseReceived,
    TransactionTimedOut,
)
from signalling.message import serialize
from signalling.transaction import TransactionLayer

log = logging.getLogger("upmt.sip")


class TransactionFailed(Exception):
    """No final response arrived before Timer F (64·T1)."""


class SipChannel:
    def __init__(
        self,
        name: str,
        send: Callable[[bytes, Addr], object],
        on_request: Callable[[Request, Addr], Response | None] | None = None,
        *,
        layer: TransactionLayer | None = None,
    ) -> None:
        self.name = name
        self.layer = layer or TransactionLayer()
        self._send = send
        self._on_request = on_request
        self._waiters: dict[ClientKey, trio.MemorySendChannel[Response | None]] = {}
        self._timer_changed = trio.Event()

    def feed(self, data: bytes, addr: Addr) -> None:
        """One datagram from the network (never raises on bad input)."""
        now = trio.current_time()
        self.layer.receive_datagram(data, addr, now)
        self._process(now)

    async def request(self, request: Request, addr: Addr) -> Response:
        """Send `request`, absorb provisional answers, return the final response."""
        now = trio.current_time()
        send_ch, recv_ch = trio.open_memory_channel[Response | None](4)
        key = self.layer.send_request(request, addr, now)
        self._waiters[key] = send_ch
        try:
            self._process(now)
            async for response in recv_ch:
                if response is None:
                    raise TransactionFailed(f"{request.method} to {addr[0]}:{addr[1]}: no answer")
                if response.code >= 200:
                    return response
            raise TransactionFailed(f"{request.method}: transaction ended without answer")
        finally:
            self._waiters.pop(key, None)

    async def run(self) -> None:
        """Fire the layer's timers until cancelled."""
        while True:
            deadline = self.layer.get_timer()
            self._timer_changed = trio.Event()
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                await self._timer_changed.wait()
            now = trio.current_time()
            if deadline is not None and now >= deadline:
                self.layer.handle_timer(now)
                self._process(now)

    def _process(self, now: float) -> None:
        while (event := self.layer.next_event()) is not None:
            if isinstance(event, RequestReceived):
                response = None
                if self._on_request is not None:
                    response = self._on_request(event.request, event.addr)
                if response is not None:
                    self.layer.send_response(event.key, response, now)
            elif isinstance(event, ResponseReceived):
                waiter = self._waiters.get(event.key)
                if waiter is not None:
                    with contextlib.suppress(trio.WouldBlock):
                        waiter.send_nowait(event.response)
            elif isinstance(event, TransactionTimedOut):
                waiter = self._waiters.get(event.key)
                if waiter is not None:
                    with contextlib.suppress(trio.WouldBlock):
                        waiter.send_nowait(None)
        for data, addr in self.layer.datagrams_to_send():
            try:
                self._send(data, addr)
            except OSError as exc:
                log.debug("%s: send to %s failed: %s", self.name, addr, exc)
        self._timer_changed.set()

    @staticmethod
    def encode(message: Request | Response) -> bytes:
        return serialize(message)
