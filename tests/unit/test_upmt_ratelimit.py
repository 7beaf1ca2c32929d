"""Per-source rate limiting: bursts, refill, independence of sources, bounded table."""

import pytest

from upmt.ratelimit import RateLimiter


def test_burst_then_refill_at_the_rate() -> None:
    rl = RateLimiter(rate=10, burst=5)
    assert [rl.allow("a", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert rl.allow("a", 0.05) is False  # half a token
    assert rl.allow("a", 0.1) is True
    assert rl.allow("a", 10.0) and rl.allow("a", 10.0)
    assert rl.limited == 3


def test_sources_are_independent() -> None:
    rl = RateLimiter(rate=1, burst=1)
    assert rl.allow("a", 0.0) and not rl.allow("a", 0.0)
    assert rl.allow("b", 0.0)


def test_table_stays_bounded_and_forgets_the_oldest() -> None:
    rl = RateLimiter(rate=1, burst=1, max_sources=100)
    for i in range(10_000):
        rl.allow(f"10.0.{i // 256}.{i % 256}", float(i))
    assert len(rl) == 100


@pytest.mark.parametrize("args", [(0, 1, 1), (1, 0, 1), (1, 1, 0)])
def test_bad_parameters(args: tuple[float, float, int]) -> None:
    with pytest.raises(ValueError):
        RateLimiter(*args)
