"""Ack-latency histograms (orbited/core/latency.py): the buckets the node records and
HaloD adds up, sparse take/add, and quantiles as bucket upper bounds."""

import math

import pytest

from orbited.core.latency import (
    BOUNDS_MS,
    BUCKETS,
    OVERFLOW,
    LatencyHistogram,
    bucket_of,
    upper_ms,
)


def test_the_bounds_are_the_documented_ones():
    assert BOUNDS_MS == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000)
    assert OVERFLOW == 14 and BUCKETS == 15


@pytest.mark.parametrize(
    ("seconds", "bucket"),
    [
        (-0.5, 0),  # a clock step backwards
        (0.0, 0),
        (0.001, 0),  # at most the bound: that bucket
        (0.0011, 1),
        (0.002, 1),
        (0.0049, 2),
        (0.1, 6),
        (0.1001, 7),
        (30.0, 13),
        (30.001, 14),
        (3600.0, 14),
    ],
)
def test_a_sample_goes_to_the_first_bucket_whose_bound_holds_it(seconds, bucket):
    assert bucket_of(seconds) == bucket
    h = LatencyHistogram()
    h.observe(seconds)
    assert h.pairs() == ((bucket, 1),)


def test_take_gives_the_sparse_pairs_and_starts_again():
    h = LatencyHistogram()
    for s in (0.004, 0.004, 0.04, 45.0):
        h.observe(s)
    assert h.count == 4
    assert h.take() == ((2, 2), (5, 1), (14, 1))
    assert h.count == 0 and h.take() == () and h.quantile(0.5) is None


def test_pairs_added_elsewhere_sum_with_local_samples():
    node_a, node_b = LatencyHistogram(), LatencyHistogram()
    for s in (0.003, 0.15):
        node_a.observe(s)
    node_b.observe(0.003)
    cluster = LatencyHistogram(node_a.take())
    cluster.add(node_b.take())
    assert cluster.pairs() == ((2, 2), (7, 1)) and cluster.count == 3
    merged = LatencyHistogram()
    merged.merge(cluster)
    merged.merge(cluster)
    assert merged.pairs() == ((2, 4), (7, 2)) and merged.count == 6


@pytest.mark.parametrize("pair", [(15, 1), (-1, 1), (3, -2)])
def test_adding_a_bucket_out_of_range_is_refused(pair):
    h = LatencyHistogram([(0, 1)])
    with pytest.raises(ValueError):
        h.add([pair])


def test_quantiles_are_the_upper_bound_of_the_bucket_holding_them():
    h = LatencyHistogram([(3, 98), (8, 1), (10, 1)])  # 98 at ≤10 ms, one ≤500, one ≤2000
    assert h.quantile(0.5) == 10.0
    assert h.quantile(0.98) == 10.0
    assert h.quantile(0.99) == 500.0
    assert h.quantile(1.0) == 2000.0
    one = LatencyHistogram([(6, 1)])
    assert one.quantile(0.01) == one.quantile(0.99) == 100.0


def test_the_overflow_bucket_reports_the_last_bound():
    h = LatencyHistogram([(OVERFLOW, 3)])
    assert h.quantile(0.5) == 30000.0 == upper_ms(OVERFLOW)


@pytest.mark.parametrize("q", [0.0, -0.1, 1.5])
def test_a_quantile_outside_0_1_is_refused(q):
    with pytest.raises(ValueError):
        LatencyHistogram([(1, 1)]).quantile(q)


def test_cumulative_counts_are_prometheus_le_buckets():
    h = LatencyHistogram([(0, 2), (2, 1), (14, 4)])
    buckets = h.cumulative()
    assert len(buckets) == BUCKETS
    assert buckets[0] == (0.001, 2) and buckets[1] == (0.002, 2) and buckets[2] == (0.005, 3)
    assert buckets[13] == (30.0, 3) and buckets[14] == (math.inf, 7)


def test_equality_is_by_counts():
    assert LatencyHistogram([(1, 2)]) == LatencyHistogram([(1, 1), (1, 1)])
    assert LatencyHistogram([(1, 2)]) != LatencyHistogram([(2, 2)])
