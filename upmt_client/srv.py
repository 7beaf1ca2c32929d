"""The order in which to try the targets of a DNS SRV answer, as RFC 2782 says (pure).

RFC 3263 §4.4 has SIP clients contact the targets of `_sip._udp` in this
order, and so does the client with `--anchor-srv`: the lowest priority
first; within one priority a weighted random order, drawn by the RFC's
algorithm (weight 0 records first in the list, running sums, a uniform
integer between 0 and the sum inclusive, the first record whose running
sum reaches it; then again with the rest). A weight-0 record is chosen
first only when the draw is 0, so it is tried after the weighted ones
almost always, and in random order among its kind when all weights are 0.
A single record whose target is "." means the service is not offered.

The random source is a parameter (`random.Random`): tests draw from a
seeded one, the daemon from the system's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import groupby

__all__ = ["SrvRecord", "order_srv"]


@dataclass(frozen=True, slots=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    target: str  # a host name, without the trailing dot

    def __post_init__(self) -> None:
        for name in ("priority", "weight", "port"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFFFF:
                raise ValueError(f"SRV {name} {value} is not a 16-bit value")


def order_srv(records: list[SrvRecord], rng: random.Random) -> list[SrvRecord]:
    """`records` in the order to contact them; [] when the service is not offered."""
    if len(records) == 1 and records[0].target in ("", "."):
        return []  # RFC 2782: "decidedly not available at this domain"
    out: list[SrvRecord] = []
    by_priority = sorted(records, key=lambda r: r.priority)
    for _priority, group in groupby(by_priority, key=lambda r: r.priority):
        out += _weighted_order(list(group), rng)
    return out


def _weighted_order(records: list[SrvRecord], rng: random.Random) -> list[SrvRecord]:
    """One priority's records, by repeated weighted draws without replacement."""
    zero = [r for r in records if r.weight == 0]
    rng.shuffle(zero)  # "in any order": a random one, so no zero-weight target is favoured
    unordered = zero + [r for r in records if r.weight > 0]
    ordered: list[SrvRecord] = []
    while unordered:
        total = sum(r.weight for r in unordered)
        draw = rng.randint(0, total)
        running = 0
        for index, record in enumerate(unordered):
            running += record.weight
            if running >= draw:
                ordered.append(unordered.pop(index))
                break
    return ordered
