"""The heartbeat's load report (Hub.load_report): ack-latency probe, per-route counts."""

from __future__ import annotations

from twisted.internet.task import Clock

from orbited.core.control import HeartbeatLoad
from orbited.core.hashing import route_of
from orbited.core.keys import ConnectionKey
from orbited.core.latency import LatencyHistogram, bucket_of
from orbited.node.hub import Hub, HubConfig
from orbited.node.mailbox import Position
from tests.conftest import keys_on_routes
from tests.node.test_trace import Sink, send

ALICE = ConnectionKey("alice", "s1", "/chat")


def hub() -> tuple[Hub, Clock]:
    clock = Clock()
    clock.advance(50)
    return Hub(clock, HubConfig(), epoch="ep"), clock


def test_the_probe_samples_write_to_covering_ack_once_per_ack() -> None:
    h, clock = hub()
    h.attach(ALICE, Sink(), None)
    send(h, "1", [ALICE])  # the probe: seq 1 at t=50
    clock.advance(0.004)
    send(h, "2", [ALICE])  # a probe is pending: not a new one
    clock.advance(0.003)
    h.ack(ALICE, 1)  # covers the probe: 7 ms
    clock.advance(0.5)
    h.ack(ALICE, 2)  # no probe pending: no sample
    report = h.load_report()
    assert report["ack_hist"] == [[bucket_of(0.007), 1]]
    assert h.load_report()["ack_hist"] == []  # taken: only the samples since the last report
    send(h, "3", [ALICE])
    clock.advance(1.5)
    h.ack(ALICE, 3)
    assert h.load_report()["ack_hist"] == [[bucket_of(1.5), 1]]
    assert LatencyHistogram(((bucket_of(1.5), 1),)).quantile(0.5) == 2000.0


def test_a_queued_event_is_not_probed_and_an_attach_resume_closes_a_probe() -> None:
    h, clock = hub()
    sink = Sink()
    h.attach(ALICE, sink, None)
    h.detach(ALICE, sink)
    send(h, "1", [ALICE])  # queued: not written, no probe
    clock.advance(1)
    stream = h.mailbox(ALICE).stream
    h.attach(ALICE, Sink(), Position(stream, 0))  # written now by the replay: the probe
    clock.advance(0.015)
    h.attach(ALICE, Sink(), Position(stream, 1))  # the resume position acknowledges it
    assert h.load_report()["ack_hist"] == [[bucket_of(0.015), 1]]


def test_counters_and_recipients() -> None:
    h, _ = hub()
    h.attach(ALICE, Sink(), None)
    send(h, "1", [ALICE, ConnectionKey("bob", "s", "/l")])
    report = h.load_report()
    assert report["events"] == 1 and report["delivered"] == 1 and report["recipients"] == 2
    assert report["queued"] == 0 and report["acked"] == 0 and report["moved"] == 0
    assert HeartbeatLoad.from_wire(report).counters()["recipients"] == 2


def test_per_route_counts_full_then_deltas() -> None:
    h, _ = hub()
    a, b = keys_on_routes([3], count=2, total=h.routes)
    (c,) = keys_on_routes([5], total=h.routes)
    sinks = {k: Sink() for k in (a, b, c)}
    for k, s in sinks.items():
        h.attach(k, s, None)
    first = h.load_report()
    assert first["routes_full"] and first["routes"] == {"3": 2, "5": 1}
    assert h.load_report() == {**first, "routes": {}, "routes_full": False, "ack_hist": []}
    h.detach(a, sinks[a])
    h.detach(c, sinks[c])
    delta = h.load_report()
    assert not delta["routes_full"] and delta["routes"] == {"3": 1, "5": 0}
    full = h.load_report(full=True)
    assert full["routes_full"] and full["routes"] == {"3": 1}
    loaded = HeartbeatLoad.from_wire(delta)
    assert dict(loaded.routes) == {3: 1, 5: 0}


def test_an_assign_recounts_and_sends_every_route() -> None:
    h, _ = hub()
    (a,) = keys_on_routes([3], total=h.routes)
    (b,) = keys_on_routes([5], total=h.routes)
    h.attach(a, Sink(), None)
    h.attach(b, Sink(), None)
    h.load_report()
    h.assign([3])  # route 5 left: its browser was told to reconnect
    report = h.load_report()
    assert report["routes_full"] and report["routes"] == {"3": 1}
    assert route_of(a, h.routes, h.hash_version) == 3


def test_attaches_refused_for_a_moved_route_are_not_recipients() -> None:
    h, _ = hub()
    (a,) = keys_on_routes([3], total=h.routes)
    (b,) = keys_on_routes([5], total=h.routes)
    h.assign([3])
    h.attach(b, Sink(), None)  # route 5 is not served: told to reconnect
    send(h, "1", [a, b])
    report = h.load_report()
    assert h.stats["moved"] == 2
    assert report["moved"] == 1 and report["recipients"] == 2


def test_a_reconnect_ends_the_probe_without_a_sample() -> None:
    h, clock = hub()
    sink = Sink()
    h.attach(ALICE, sink, None)
    send(h, "1", [ALICE])  # the probe
    h.detach(ALICE, sink)
    clock.advance(20)
    h.attach(ALICE, Sink(), Position(h.mailbox(ALICE).stream, 1))  # acks seq 1 on resume
    assert h.load_report()["ack_hist"] == []
