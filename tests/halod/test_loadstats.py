"""halod.loadstats: rates, ack quantiles and per-route counts from heartbeat ``load``."""

from __future__ import annotations

import pytest

from halod.loadstats import ACK_WINDOW, SPARK, ClusterLoad, NodeLoad
from orbited.core.control import HeartbeatLoad
from orbited.core.latency import bucket_of


def beat(events: int, delivered: int = 0, **kw: object) -> HeartbeatLoad:
    return HeartbeatLoad(events=events, recipients=events, delivered=delivered, acked=0, **kw)  # type: ignore[arg-type]


def test_rates_from_consecutive_beats() -> None:
    node = NodeLoad("n1", 0.0)
    node.observe(beat(1000, 900), 10.0)
    assert node.rate("events") is None  # one beat: no rate yet
    node.observe(beat(1200, 1080), 11.0)
    assert node.rate("events") == 200.0 and node.rate("delivered") == 180.0
    for i in range(2, 60):
        node.observe(beat(1000 + 200 * i, 900 + 180 * i), 10.0 + i)
    assert node.rate("events") == pytest.approx(200.0)
    # the rate moves towards a new level, smoothed
    node.observe(beat(1000 + 200 * 59 + 400, 0 + 900 + 180 * 59), 70.0)
    assert 200.0 < node.rates["events"] < 400.0
    assert len(node.spark()) == SPARK


def test_counter_going_down_starts_a_new_baseline() -> None:
    node = NodeLoad("n1", 0.0)
    node.observe(beat(5000), 1.0)
    node.observe(beat(5100), 2.0)
    assert node.rate("events") == 100.0
    node.observe(beat(10), 3.0)  # the node restarted
    assert node.rate("events") is None
    node.observe(beat(60), 4.0)
    assert node.rate("events") == 50.0


def test_ack_quantiles_over_a_window() -> None:
    node = NodeLoad("n1", 0.0)
    fast, slow = bucket_of(0.004), bucket_of(0.180)
    node.observe(beat(1, ack_hist=((fast, 98), (slow, 2))), 1.0)
    assert node.ack_quantiles(1.0) == {"p50": 5.0, "p99": 200.0, "n": 100}
    node.observe(beat(2, ack_hist=((fast, 100),)), 2.0)
    assert node.ack_quantiles(2.0) == {"p50": 5.0, "p99": 5.0, "n": 200}
    assert node.ack_quantiles(1.0 + ACK_WINDOW + 0.5) == {"p50": 5.0, "p99": 5.0, "n": 100}
    assert node.ack_quantiles(2.0 + ACK_WINDOW + 0.5)["p50"] is None


def test_route_counts_merge_deltas_and_full_reports() -> None:
    node = NodeLoad("n1", 0.0)
    node.observe(beat(0, routes={1: 10, 2: 20, 3: 5}, routes_full=True), 1.0)
    node.observe(beat(0, routes={2: 25, 3: 0}), 2.0)  # deltas: 3 emptied
    assert node.routes == {1: 10, 2: 25}
    node.observe(beat(0, routes={7: 1}, routes_full=True), 3.0)
    assert node.routes == {7: 1}
    assert node.to_json(3.0)["routes"] == {"7": 1}


def test_cluster_totals_and_lifecycle() -> None:
    cluster = ClusterLoad()
    assert cluster.totals(0.0)["events_per_s"] is None
    for name, rate in (("n1", 100), ("n2", 50)):
        cluster.registered(name, 0.0)
        cluster.heartbeat(name, beat(0, 0, ack_hist=((bucket_of(0.01), 10),)), 1.0)
        cluster.heartbeat(name, beat(rate, rate, routes={1: 3}), 2.0)
    cluster.heartbeat("n1", None, 2.5)  # a node without load: nothing changes
    totals = cluster.totals(2.0)
    assert totals["events_per_s"] == 150.0 and totals["deliveries_per_s"] == 150.0
    assert totals["ack_p50_ms"] == 10.0 and totals["ack_samples"] == 20
    assert cluster.routes_by_node() == {"n1": {1: 3}, "n2": {1: 3}}
    cluster.registered("n1", 3.0)  # registered again: a new baseline
    assert cluster.nodes["n1"].rates == {} and cluster.nodes["n1"].routes == {}
    cluster.gone("n2")
    assert list(cluster.nodes) == ["n1"]


def test_cluster_ack_counters_since_start_never_go_down() -> None:
    cluster = ClusterLoad()
    cluster.registered("n1", 0.0)
    cluster.heartbeat("n1", beat(0, ack_hist=((bucket_of(0.004), 3), (bucket_of(0.1), 1))), 1.0)
    assert cluster.ack_total.count == 4
    assert cluster.ack_sum_s == pytest.approx(3 * 0.005 + 0.1)  # at the buckets' upper bounds
    cluster.gone("n1")
    assert cluster.histogram(100.0).count == 0  # the 30 s window: empty
    assert cluster.ack_total.count == 4  # the counters: unchanged
