"""The anchor's tunnel keys: receiver index → key, tunnel address → sending key (sans-IO).

Theory of operation. An association (see `signalling.handshake`) gives a
terminal a *generation* of keys: one receiver index per tunnel slot (a block
of `MAX_SLOTS` from a random base), each with its upstream `Opener` and the
slot's downstream `Sealer`. A slot is bound to a tunnel address when the
terminal sets that tunnel up through it; from then on only authenticated
frames that arrive from that address may refresh the tunnel, move a flow or
change the terminal's default tunnel (the data path checks `endpoint`).

A rekey (the next association) installs a new generation beside the current
one. The anchor keeps sending under the old keys until the first frame under
a new one arrives on a tunnel (key confirmation: the terminal has it), then
switches that tunnel's `senders` entry. The previous generation is accepted
for `PREVIOUS_GRACE` seconds, for frames in flight, and never switches a
sender back. A generation older than `REJECT_AFTER_TIME` is dropped: a
terminal that stops rekeying loses its tunnels.

The data path reads `receivers` and `senders` and writes `senders` (one dict
assignment, atomic under the GIL); the control plane owns everything else.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Final

from ground.constants import Addr
from signalling.handshake import MAX_SLOTS, SessionKeys, encode_key, tunnel_keys
from tunnel.crypto import Opener, Sealer

__all__ = [
    "HA_COUNTER_MARGIN",
    "PREVIOUS_GRACE",
    "REJECT_AFTER_TIME",
    "RESTART_COUNTER_MARGIN",
    "Receiver",
    "TunnelSessions",
]


# A terminal rekeys every REKEY_AFTER_TIME (120 s, upmt_client); the anchor
# tolerates three missed rekeys (its retries every few seconds) before it
# stops accepting a generation, and keeps the one before the newest for
# frames still in flight.
REJECT_AFTER_TIME: Final = 360.0
PREVIOUS_GRACE: Final = 60.0
# Where an imported key's sending counter starts beyond the one saved. A
# restart in place saves as the data path stops: a few frames may still have
# left. An HA checkpoint may be seconds old when the standby takes over; a
# key lives at most REJECT_AFTER_TIME, in which no anchor sends 2^40 frames
# (3·10^9 a second), so counters never meet, and 2^64 leaves room for 2^23
# takeovers per key.
RESTART_COUNTER_MARGIN: Final = 1024
HA_COUNTER_MARGIN: Final = 1 << 40
_MAX_ORIGINS: Final = 4096


@dataclass(slots=True, eq=False)
class Receiver:
    """One tunnel slot of one generation: what the data path needs per received frame."""

    opener: Opener
    sealer: Sealer
    vipa: bytes
    terminal_id: str
    slot: int
    endpoint: Addr | None = None
    current: bool = True  # False: the previous generation's, accepted but never promoted


@dataclass(slots=True, eq=False)
class _Generation:
    keys: SessionKeys
    created: float
    receivers: list[Receiver] = field(default_factory=list)
    superseded_at: float | None = None


def _used(generation: _Generation) -> bool:
    """Whether any frame authenticated under one of the generation's keys."""
    return any(rx.opener.window.top >= 0 for rx in generation.receivers)


class TunnelSessions:
    def __init__(self, max_slots: int = MAX_SLOTS) -> None:
        if not 1 <= max_slots <= MAX_SLOTS:
            raise ValueError(f"max_slots {max_slots} out of 1..{MAX_SLOTS}")
        self.max_slots = max_slots
        # Shared with the data path.
        self.receivers: dict[int, Receiver] = {}
        self.senders: dict[Addr, Sealer] = {}
        self._generations: dict[str, list[_Generation]] = {}  # newest last, at most two
        # Where a SIGNAL from an address not yet bound came through: its answer
        # must go out under that slot's key.
        self._origins: OrderedDict[Addr, Receiver] = OrderedDict()

    # -- associations --------------------------------------------------------
    def new_base(self) -> int:
        """A free receiver-index base for the next generation."""
        while True:
            base = (secrets.randbelow((1 << 32) // MAX_SLOTS - 1) + 1) * MAX_SLOTS
            if not any(base + slot in self.receivers for slot in range(MAX_SLOTS)):
                return base

    def install(self, terminal_id: str, vipa: bytes, keys: SessionKeys, now: float) -> None:
        """A new generation for `terminal_id`: every slot's keys, bound as the current ones are.

        At most two are kept. When a third comes, the one to go is a newer
        generation the terminal never used (its answer was lost), before the
        one it is still sending under.
        """
        gens = self._generations.setdefault(terminal_id, [])
        bound = {rx.slot: rx.endpoint for rx in gens[-1].receivers} if gens else {}
        while len(gens) >= 2:
            unused = [g for g in gens[1:] if not _used(g)]
            victim = unused[-1] if unused and _used(gens[0]) else gens[0]
            gens.remove(victim)
            self._drop_generation(victim)
        if gens:
            gens[-1].superseded_at = now
            for rx in gens[-1].receivers:
                rx.current = False
        generation = _Generation(keys, now)
        for slot in range(self.max_slots):
            up, down = tunnel_keys(keys, slot)
            rx = Receiver(
                Opener(up, keys.anchor_index + slot, created=now),
                Sealer(down, keys.terminal_index + slot, created=now),
                vipa,
                terminal_id,
                slot,
                bound.get(slot),
            )
            generation.receivers.append(rx)
            self.receivers[rx.opener.index] = rx
        gens.append(generation)

    def drop_terminal(self, terminal_id: str) -> None:
        for generation in self._generations.pop(terminal_id, []):
            self._drop_generation(generation)

    def _drop_generation(self, generation: _Generation) -> None:
        dropped = set()
        for rx in generation.receivers:
            self.receivers.pop(rx.opener.index, None)
            dropped.add(id(rx))
            if rx.endpoint is not None and self.senders.get(rx.endpoint) is rx.sealer:
                del self.senders[rx.endpoint]
        # No answer may go out under a retired key.
        for addr in [a for a, rx in self._origins.items() if id(rx) in dropped]:
            del self._origins[addr]

    def live(self, rx: Receiver) -> bool:
        """Whether `rx` is still installed (a frame queued for the control plane may outlive it)."""
        return self.receivers.get(rx.opener.index) is rx

    # -- tunnels ---------------------------------------------------------------
    def note_origin(self, addr: Addr, rx: Receiver) -> None:
        """A SIGNAL from `addr` came through `rx` (called before it is handled)."""
        self._origins[addr] = rx
        self._origins.move_to_end(addr)
        while len(self._origins) > _MAX_ORIGINS:
            self._origins.popitem(last=False)

    def origin(self, addr: Addr) -> Receiver | None:
        return self._origins.get(addr)

    def bind(self, rx: Receiver, addr: Addr) -> bool:
        """Tunnel slot `rx.slot` of its terminal now lives at `addr` (a tunnel set-up).

        False (nothing bound) when `rx` was retired meanwhile.
        """
        gens = self._generations.get(rx.terminal_id)
        if not gens or not self.live(rx):
            return False
        for generation in gens:
            for other in generation.receivers:
                if other.slot == rx.slot:
                    other.endpoint = addr
        newest = gens[-1].receivers[rx.slot]
        self.senders[addr] = newest.sealer if rx.current else rx.sealer
        return True

    def unbind(self, addr: Addr, terminal_id: str) -> None:
        """`addr` is no tunnel of `terminal_id` any more: no key of it sends there, no frame
        from there counts. A frame another terminal sent from `addr` meanwhile (a NAT that
        reused the address) keeps the key it came under."""
        self.senders.pop(addr, None)
        origin = self._origins.get(addr)
        if origin is not None and origin.terminal_id == terminal_id:
            del self._origins[addr]
        for generations in self._generations.values():
            for generation in generations:
                for rx in generation.receivers:
                    if rx.endpoint == addr:
                        rx.endpoint = None

    def reply_sealer(self, addr: Addr) -> Sealer | None:
        """The key an answer to `addr` goes out under."""
        sealer = self.senders.get(addr)
        if sealer is not None:
            return sealer
        rx = self._origins.get(addr)
        return None if rx is None else rx.sealer

    def slot_of(self, terminal_id: str, addr: Addr) -> int | None:
        gens = self._generations.get(terminal_id)
        if not gens:
            return None
        for rx in gens[-1].receivers:
            if rx.endpoint == addr:
                return rx.slot
        return None

    # -- time ------------------------------------------------------------------
    def expire(self, now: float) -> list[str]:
        """Drop superseded generations past their grace and any older than the limit.

        Returns the terminals left without keys (their tunnels are dead).
        """
        orphaned = []
        for terminal_id, gens in list(self._generations.items()):
            keep = []
            for at, generation in enumerate(gens):
                superseded = generation.superseded_at
                # The grace runs out only once the terminal uses a newer key: while
                # its answer is lost, the keys in use are the older ones.
                replaced = (
                    superseded is not None
                    and now - superseded > PREVIOUS_GRACE
                    and any(_used(newer) for newer in gens[at + 1 :])
                )
                if now - generation.created > REJECT_AFTER_TIME or replaced:
                    self._drop_generation(generation)
                else:
                    keep.append(generation)
            if keep:
                self._generations[terminal_id] = keep
            else:
                del self._generations[terminal_id]
                orphaned.append(terminal_id)
        return orphaned

    def key_age(self, terminal_id: str, now: float) -> float | None:
        gens = self._generations.get(terminal_id)
        return None if not gens else now - gens[-1].created

    # -- restart in place ---------------------------------------------------------
    def export_terminal(self, terminal_id: str, now: float) -> list[dict[str, Any]]:
        """The terminal's generations, with counters and window tops, for the next process."""
        out = []
        for generation in self._generations.get(terminal_id, []):
            keys = generation.keys
            out.append(
                {
                    "up": encode_key(keys.up),
                    "down": encode_key(keys.down),
                    "signing": encode_key(keys.signing),
                    "terminal_index": keys.terminal_index,
                    "anchor_index": keys.anchor_index,
                    "age": now - generation.created,
                    "superseded": None
                    if generation.superseded_at is None
                    else now - generation.superseded_at,
                    "slots": [
                        [rx.slot, rx.sealer.sent(), rx.opener.window.top]
                        + (list(rx.endpoint) if rx.endpoint else [])
                        for rx in generation.receivers
                    ],
                    "senders": [
                        list(addr)
                        for addr, sealer in self.senders.items()
                        if any(sealer is rx.sealer for rx in generation.receivers)
                    ],
                }
            )
        return out

    def import_terminal(
        self,
        terminal_id: str,
        vipa: bytes,
        saved: list[dict[str, Any]],
        now: float,
        *,
        counter_margin: int = RESTART_COUNTER_MARGIN,
    ) -> None:
        """Restore what `export_terminal` wrote (its keys already decoded by the caller).

        Each sending counter starts `counter_margin` past the one saved: the
        writer may have sent more under the key after it saved (a few frames
        for a restart in place; for an HA takeover, everything since the
        last checkpoint, see `HA_COUNTER_MARGIN`).
        """
        for item in saved:
            keys: SessionKeys = item["keys"]
            self.install(terminal_id, vipa, keys, now - float(item["age"]))
            generation = self._generations[terminal_id][-1]
            if item.get("superseded") is not None:
                generation.superseded_at = now - float(item["superseded"])
            by_slot = {rx.slot: rx for rx in generation.receivers}
            for slot, counter, top, *endpoint in item["slots"]:
                rx = by_slot.get(int(slot))
                if rx is None:
                    continue
                _up, down = tunnel_keys(keys, rx.slot)
                rx.sealer = Sealer(
                    down,
                    rx.sealer.receiver,
                    created=rx.sealer.created,
                    start=int(counter) + counter_margin,
                )
                if int(top) >= 0:
                    rx.opener.window.start_at(int(top))
                if endpoint:
                    rx.endpoint = (str(endpoint[0]), int(endpoint[1]))
            for host, port in item.get("senders", []):
                addr = (str(host), int(port))
                for rx in generation.receivers:
                    if rx.endpoint == addr:
                        self.senders[addr] = rx.sealer
