"""Per-source token buckets with a bounded number of sources (pure, time passed in).

Each source (an IP address) may send `rate` messages per second with bursts
of `burst`. The table of sources is bounded: when it is full, the source
heard from longest ago is forgotten (a forgotten source starts again with a
full bucket, which only ever errs towards letting a legitimate user in).
"""

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    def __init__(self, rate: float, burst: float, max_sources: int = 65536) -> None:
        if rate <= 0 or burst < 1 or max_sources < 1:
            raise ValueError("rate must be positive, burst and max_sources at least 1")
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.allowed = 0
        self.limited = 0

    def allow(self, source: str, now: float) -> bool:
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._buckets.popitem(last=False)
            bucket = _Bucket(self.burst, now)
            self._buckets[source] = bucket
        else:
            self._buckets.move_to_end(source)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            self.allowed += 1
            return True
        self.limited += 1
        return False

    def __len__(self) -> int:
        return len(self._buckets)
