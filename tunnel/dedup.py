"""Duplicated flows (sans-IO): the DUP frame and the receiver's duplicate filter.

A redundant application's packets travel on two tunnels at once. Each copy
is a DUP frame: the type byte 0x05, the sender's id for the flow (u32), the
packet's sequence number in that flow (u32, wrapping) and the inner IP
packet. Whichever copy arrives first goes to the TUN; the other is dropped
by `DuplicateFilter`, one sliding window per flow (RFC 6479's, as for
replayed frames: `tunnel.crypto.ReplayWindow`), so the application never
sees a duplicate. A copy more than the window behind the newest is dropped
too: it is late enough to be useless to a real-time application. A sender
that starts a flow's sequence again must take a new flow id (its window
would take the new numbers for old ones).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Hashable
from typing import Final

from ground.errors import MalformedError
from tunnel.crypto import ReplayWindow

__all__ = ["DUP", "DUP_HEADER", "DuplicateFilter", "decode_dup_untrusted", "encode_dup"]

DUP: Final = 0x05
_HEADER: Final = struct.Struct("!BII")
DUP_HEADER: Final = _HEADER.size
_SEQ_MOD: Final = 1 << 32
WINDOW_BITS: Final = 1024
MAX_FLOWS: Final = 4096


def encode_dup(flow_id: int, seq: int, packet: bytes) -> bytes:
    return _HEADER.pack(DUP, flow_id, seq % _SEQ_MOD) + packet


def decode_dup_untrusted(frame: bytes) -> tuple[int, int, bytes]:
    """(flow id, sequence number, inner packet) of a DUP frame; MalformedError otherwise."""
    if len(frame) <= DUP_HEADER or frame[0] != DUP:
        raise MalformedError("DUP frame: too short or not a DUP frame")
    _kind, flow_id, seq = _HEADER.unpack_from(frame)
    packet = frame[DUP_HEADER:]
    if packet[0] >> 4 not in (4, 6):
        raise MalformedError("DUP frame: no IP packet inside")
    return flow_id, seq, packet


class DuplicateFilter:
    """The first copy of each (flow, sequence number) passes; at most `max_flows` flows kept."""

    def __init__(self, max_flows: int = MAX_FLOWS) -> None:
        self.max_flows = max_flows
        self._flows: OrderedDict[Hashable, ReplayWindow] = OrderedDict()
        self.duplicates = 0  # copies of a packet that already passed
        self.too_late = 0  # further behind the newest than the window reaches

    def __len__(self) -> int:
        return len(self._flows)

    def accept(self, flow: Hashable, seq: int) -> bool:
        window = self._flows.get(flow)
        if window is None:
            window = self._flows[flow] = ReplayWindow(WINDOW_BITS)
            if len(self._flows) > self.max_flows:
                self._flows.popitem(last=False)
        else:
            self._flows.move_to_end(flow)
        counter = _unwrap(window.top, seq)
        if window.fresh(counter):
            window.accept(counter)
            return True
        if 0 <= window.top - counter < WINDOW_BITS - 64:
            self.duplicates += 1
        else:
            self.too_late += 1
        return False

    def forget(self, flow: Hashable) -> None:
        self._flows.pop(flow, None)


def _unwrap(top: int, seq: int) -> int:
    """The u32 `seq` as a counter that never wraps: the one closest to `top`."""
    if top < 0:
        return seq
    base = top - top % _SEQ_MOD
    return min(
        (base - _SEQ_MOD + seq, base + seq, base + _SEQ_MOD + seq), key=lambda c: abs(c - top)
    )
