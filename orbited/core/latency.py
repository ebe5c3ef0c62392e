"""Ack-latency histograms with fixed buckets, shared by the node and HaloD (pure).

A node samples the time from writing an event to the browser's ack that covers it and
records it here; each heartbeat carries the samples since the previous one as sparse
``[bucket, count]`` pairs (``load.ack_hist``, docs/halod-protocol.md), and HaloD adds
them up with the same class, so both ends use the same bounds.

Bucket ``i`` (0..13) holds the samples of at most ``BOUNDS_MS[i]`` milliseconds (and more
than the bound before it); bucket ``OVERFLOW`` (14) holds everything above 30 s.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable

BOUNDS_MS: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000)
OVERFLOW = len(BOUNDS_MS)  # the last bucket's index: above BOUNDS_MS[-1]
BUCKETS = OVERFLOW + 1
MAX_COUNT = 2**40  # a count in one heartbeat's pair (the wire's limit)

Pairs = tuple[tuple[int, int], ...]


def bucket_of(seconds: float) -> int:
    """The bucket of a sample of ``seconds`` (a negative one, from a clock step, is 0)."""
    return bisect_left(BOUNDS_MS, seconds * 1000.0)


def upper_ms(bucket: int) -> float:
    """The upper bound of ``bucket`` in milliseconds; the overflow bucket has none and
    reports ``BOUNDS_MS[-1]`` (read: "at least 30 s")."""
    return float(BOUNDS_MS[min(bucket, OVERFLOW - 1)])


class LatencyHistogram:
    """Counts per bucket. ``observe`` a sample, ``take`` the sparse pairs (and start
    again), ``add`` pairs from elsewhere, ``quantile`` for p50/p99."""

    __slots__ = ("counts", "count")

    def __init__(self, pairs: Iterable[tuple[int, int]] = ()) -> None:
        self.counts = [0] * BUCKETS
        self.count = 0
        self.add(pairs)

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BOUNDS_MS, seconds * 1000.0)] += 1
        self.count += 1

    def add(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Add sparse ``(bucket, count)`` pairs (a heartbeat's ``ack_hist``, already
        checked by orbited.core.control); ValueError names a bucket out of range."""
        for bucket, n in pairs:
            if not 0 <= bucket < BUCKETS or n < 0:
                raise ValueError(f"no bucket {bucket} (0..{OVERFLOW}) or a negative count")
            self.counts[bucket] += n
            self.count += n

    def merge(self, other: LatencyHistogram) -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.count += other.count

    def pairs(self) -> Pairs:
        """The non-empty buckets as ``(bucket, count)``, ascending."""
        return tuple((i, n) for i, n in enumerate(self.counts) if n)

    def take(self) -> Pairs:
        """``pairs()``, then empty the histogram (what one heartbeat sends)."""
        out = self.pairs()
        if self.count:
            self.counts = [0] * BUCKETS
            self.count = 0
        return out

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0 < q ≤ 1) in milliseconds, as the upper bound of the
        bucket that holds it (see ``upper_ms``); None without samples."""
        if not 0.0 < q <= 1.0:
            raise ValueError("a quantile is in (0, 1]")
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return upper_ms(i)
        return upper_ms(OVERFLOW)  # not reached: the counts add up to count

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound in seconds, samples at or below it)`` per bucket, the last
        bound ``math.inf``: a Prometheus histogram's ``le`` buckets."""
        out: list[tuple[float, int]] = []
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            out.append((BOUNDS_MS[i] / 1000.0 if i < OVERFLOW else math.inf, seen))
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LatencyHistogram) and self.counts == other.counts

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"LatencyHistogram({self.pairs()!r})"
