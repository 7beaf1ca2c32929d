"""Duplicated flows (sans-IO): the DUP frame and the receiver's duplicate filter.

A redundant application's packets travel on two tunnels at once. Each copy
is a DUP frame: the type byte 0x06, the sender's id for the flow (u32), the
packet's sequence number in that flow (u32, wrapping) and the tunnel frame
the packet would otherwise have been: its IP packet (DATA) or a
DATA-CSUM-PARTIAL frame. `dup_datagrams` wraps what one TUN read became;
`unwrap_dups` gives a receive's frames back as the receiver reads them, each
packet once. Whichever copy arrives first goes to the TUN; the other is dropped
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
from collections.abc import Callable, Hashable, Sequence
from typing import Final

from ground.errors import MalformedError
from tunnel.crypto import ReplayWindow
from tunnel.frames import FrameType
from tunnel.offload import Segments

__all__ = [
    "DUP",
    "DUP_HEADER",
    "DuplicateFilter",
    "decode_dup_untrusted",
    "dup_datagrams",
    "encode_dup",
    "unwrap_dups",
]

DUP: Final = 0x06
_HEADER: Final = struct.Struct("!BII")
DUP_HEADER: Final = _HEADER.size
_SEQ_MOD: Final = 1 << 32
WINDOW_BITS: Final = 1024
MAX_FLOWS: Final = 4096


def encode_dup(flow_id: int, seq: int, packet: bytes) -> bytes:
    return _HEADER.pack(DUP, flow_id, seq % _SEQ_MOD) + packet


_PARTIAL: Final = int(FrameType.DATA_CSUM_PARTIAL)


def decode_dup_untrusted(frame: bytes) -> tuple[int, int, bytes]:
    """(flow id, sequence number, inner frame) of a DUP frame; MalformedError otherwise.

    The inner frame is an IP packet, or a DATA-CSUM-PARTIAL frame holding one.
    """
    if len(frame) <= DUP_HEADER or frame[0] != DUP:
        raise MalformedError("DUP frame: too short or not a DUP frame")
    _kind, flow_id, seq = _HEADER.unpack_from(frame)
    inner = frame[DUP_HEADER:]
    first = inner[0]
    if first == _PARTIAL and len(inner) > 1:
        first = inner[1]
    if first >> 4 not in (4, 6):
        raise MalformedError("DUP frame: no IP packet inside")
    return flow_id, seq, inner


def dup_datagrams(flow_id: int, seq: int, item: bytes | Segments) -> list[bytes]:
    """The DUP frames of one TUN read's datagrams, numbered from `seq`."""
    if isinstance(item, Segments):
        joined = b"".join(item.buffers)
        size = item.size
        frames = [joined[at : at + size] for at in range(0, len(joined), size)]
    else:
        frames = [item]
    return [encode_dup(flow_id, seq + i, frame) for i, frame in enumerate(frames)]


def unwrap_dups(
    frames: Sequence[bytes], accept: Callable[[int, int], bool]
) -> tuple[list[bytes], int]:
    """`frames` with each DUP frame replaced by its inner frame, if `accept(flow id, seq)`.

    Returns the frames to read and how many DUP frames were malformed.
    Copies `accept` refuses (duplicates, counted by the filter) are left out.
    """
    out: list[bytes] = []
    malformed = 0
    for frame in frames:
        if not frame or frame[0] != DUP:
            out.append(frame)
            continue
        try:
            flow_id, seq, inner = decode_dup_untrusted(frame)
        except MalformedError:
            malformed += 1
            continue
        if accept(flow_id, seq):
            out.append(inner)
    return out, malformed


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
