"""SRV order and weights respected: RFC 2782's selection, checked over many draws.

`upmt_client.srv.order_srv` with a seeded random source: priorities strictly
ascending, and within one priority each record first as often as the RFC's
algorithm makes it (the running sums over a uniform draw in [0, sum]).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from upmt_client.srv import SrvRecord, order_srv

DRAWS = 20_000
TOLERANCE = 0.015  # about 4.5 standard deviations of a share near 0.5 over DRAWS


def rr(priority: int, weight: int, target: str, port: int = 5060) -> SrvRecord:
    return SrvRecord(priority, weight, port, target)


def first_shares(records: list[SrvRecord], draws: int = DRAWS) -> dict[str, float]:
    rng = random.Random(2782)
    counts = Counter(order_srv(records, rng)[0].target for _ in range(draws))
    return {target: n / draws for target, n in counts.items()}


def rfc_first_shares(weights: dict[str, int]) -> dict[str, float]:
    """What RFC 2782 gives: weight-0 records lead the list, the draw is uniform in [0, sum].

    A draw of 0 picks the first record of the list: one of the weight-0
    records when there are any, else the first weighted one, which so gets
    (w + 1) / (sum + 1) and every other w / (sum + 1).
    """
    total = sum(weights.values())
    zero = [t for t, w in weights.items() if w == 0]
    weighted = [t for t, w in weights.items() if w > 0]
    shares = {t: weights[t] / (total + 1) for t in weighted}
    if zero:
        for t in zero:
            shares[t] = 1 / (total + 1) / len(zero)
    else:
        shares[weighted[0]] += 1 / (total + 1)
    return shares


def test_lower_priority_always_first_whatever_the_weights() -> None:
    records = [rr(20, 1000, "backup"), rr(10, 1, "a"), rr(10, 0, "b"), rr(30, 0, "last")]
    rng = random.Random(1)
    for _ in range(2000):
        order = [r.target for r in order_srv(records, rng)]
        assert order[2:] == ["backup", "last"]
        assert set(order[:2]) == {"a", "b"}


@pytest.mark.parametrize(
    "weights",
    [
        {"a": 10, "b": 20, "c": 70},
        {"a": 1, "b": 1},
        {"a": 60, "b": 30, "c": 10},
        {"z": 0, "a": 1, "b": 3},
        {"a": 5, "y": 0, "z": 0, "b": 5},
    ],
)
def test_weighted_shares_within_a_priority(weights: dict[str, int]) -> None:
    records = [rr(1, w, t) for t, w in weights.items()]
    shares = first_shares(records)
    for target, expected in rfc_first_shares(weights).items():
        assert shares.get(target, 0.0) == pytest.approx(expected, abs=TOLERANCE), (target, shares)


def test_weight_zero_records_come_after_the_weighted_ones_almost_always() -> None:
    records = [rr(1, 0, "spare"), rr(1, 50, "a"), rr(1, 50, "b")]
    rng = random.Random(5)
    last = Counter(order_srv(records, rng)[-1].target for _ in range(DRAWS))
    # "spare" is drawn first with 1/101, second with 1/51 at most: last about 97 % of the time.
    assert last["spare"] / DRAWS > 0.95


def test_all_weights_zero_is_a_uniform_order() -> None:
    records = [rr(1, 0, t) for t in "abcd"]
    shares = first_shares(records)
    for target in "abcd":
        assert shares[target] == pytest.approx(0.25, abs=TOLERANCE)


def test_second_place_follows_the_weights_of_what_is_left() -> None:
    """After the first pick the rest is drawn again: b second when a went first, 70/(70+1)."""
    records = [rr(1, 10, "a"), rr(1, 20, "b"), rr(1, 70, "c")]
    rng = random.Random(9)
    orders = [tuple(r.target for r in order_srv(records, rng)) for _ in range(DRAWS)]
    after_a = [o[1] for o in orders if o[0] == "a"]
    # Left: b (20), c (70), b first in the list: b gets 21/91, c 70/91.
    assert after_a.count("b") / len(after_a) == pytest.approx(21 / 91, abs=0.04)
    assert all(len(set(o)) == 3 for o in orders)  # every record once


def test_every_record_exactly_once() -> None:
    records = [rr(p, w, f"h{p}{w}") for p in (1, 2) for w in (0, 1, 5)]
    order = order_srv(records, random.Random(3))
    assert sorted(order, key=lambda r: r.target) == sorted(records, key=lambda r: r.target)


def test_a_lone_dot_target_means_no_service() -> None:
    assert order_srv([rr(0, 0, ".")], random.Random(0)) == []


def test_values_beyond_16_bits_are_refused() -> None:
    with pytest.raises(ValueError):
        SrvRecord(1, 70000, 5060, "a")
