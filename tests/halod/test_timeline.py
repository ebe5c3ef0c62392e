"""halod.timeline: incidents from first sign to settled, with plain numbers for time."""

from __future__ import annotations

from halod.timeline import QUIET, Kind, Timeline
from orbited.core.routes import Change, ChangeKind, Move


def gone(name: str, *moves: tuple[int, str | None, str | None]) -> Change:
    return Change(name, ChangeKind.GONE, None, [Move(*m) for m in moves])


def test_failover_to_a_spare_from_disconnect_to_browsers_back() -> None:
    t = Timeline()
    t.node_routes("n3", {5: 40, 17: 60}, 99.0)
    t.first_sign("n3", "disconnected", 100.0)
    change = gone("n3", (5, "n3", "n5"), (17, "n3", "n5"))
    loads = {"n3": {5: 40, 17: 60}, "n5": {}}
    incident = t.changed(change, 7, 100.2, loads, "ports refused", probe="dead")
    assert incident.kind is Kind.FAILOVER and incident.open
    assert t.in_flight() == {}  # no hand-off from a dead node
    t.node_routes("n5", {5: 30, 17: 20}, 100.5)
    assert [i.id for i in t.tick(100.5)] == [incident.id]
    assert incident.open  # 50 of 100 back
    t.node_routes("n5", {5: 40, 17: 56}, 100.6)
    t.tick(100.6)
    j = t.to_json(incident)
    assert not incident.open and j["settled"] is True
    assert j["detect_s"] == 0.2 and j["back_s"] == 0.4
    assert j["browsers_moved"] == 100 and j["browsers_back"] == 96
    assert j["handoff_s"] is None and j["mailboxes_handed"] == 0
    assert j["table_version"] == 7 and j["reason"] == "ports refused" and j["probe"] == "dead"
    assert [m["route"] for m in j["moves"]] == [5, 17]
    assert j["moves"][0] == {
        "route": 5, "old": "n3", "new": "n5", "handoff": False, "handoff_done": None,
        "mailboxes": 0, "browsers_before": 40, "browsers_back": 40,
    }  # fmt: skip


def test_silent_failure_starts_at_the_last_heartbeat() -> None:
    t = Timeline()
    t.node_routes("n1", {1: 3}, 50.0)
    incident = t.changed(gone("n1", (1, "n1", "n2")), 2, 53.1, {"n1": {1: 3}}, "silent")
    assert incident.first_sign == 50.0
    assert t.to_json(incident)["detect_s"] == 3.1


def test_a_sign_that_led_to_nothing_is_forgotten() -> None:
    t = Timeline()
    t.first_sign("n1", "disconnected", 10.0)
    t.recovered("n1")
    incident = t.changed(gone("n1", (1, "n1", "n2")), 2, 500.0, {}, "silent")
    assert incident.first_sign == 500.0


def test_seed_policy_failover_moves_to_several_nodes() -> None:
    t = Timeline()
    change = gone("n2", (3, "n2", "n1"), (4, "n2", "n3"), (9, "n2", "n1"))
    incident = t.changed(change, 4, 10.0, {"n2": {3: 10, 4: 10, 9: 10}}, "silent")
    t.node_routes("n1", {3: 10, 9: 10, 1: 500}, 10.3)  # its own route 1 does not count
    t.tick(10.3)
    assert incident.open
    t.node_routes("n3", {4: 9}, 10.4)
    t.tick(10.4)
    assert incident.settled and incident.browsers_back() == 29


def test_drain_waits_for_every_hand_off() -> None:
    t = Timeline()
    t.first_sign("n1", "drain", 20.0)
    change = gone("n1", (1, "n1", "n2"), (2, "n1", "n2"), (3, "n1", "n3"))
    incident = t.changed(change, 9, 20.01, {}, "operator", handoffs=[1, 2, 3])
    assert incident.kind is Kind.DRAIN
    assert t.in_flight() == {1: 20.01, 2: 20.01, 3: 20.01}
    t.handoff_relayed("n1", "n2", (), 30, 20.02)  # a chunk: nothing done yet
    t.handoff_relayed("n1", "n2", (1, 2), 12, 20.05)
    assert t.in_flight() == {3: 20.01}
    t.tick(20.05)
    assert incident.open
    t.handoff_relayed("n1", "n3", (3,), 5, 20.08)
    t.tick(20.08)
    j = t.to_json(incident)
    assert j["settled"] is True and j["ended"] == 20.08
    assert j["handoff_s"] == 0.07 and j["mailboxes_handed"] == 47
    assert j["detect_s"] == 0.01
    assert t.in_flight() == {}


def test_hand_off_for_an_unknown_pair_changes_nothing() -> None:
    t = Timeline()
    incident = t.changed(gone("n1", (1, "n1", "n2")), 1, 1.0, {}, "operator", handoffs=[1])
    t.tick(1.0)
    t.handoff_relayed("n2", "n1", (1,), 4, 1.1)  # the other direction
    assert t.tick(1.1) == [] and incident.open and t.in_flight() == {1: 1.0}


def test_browsers_that_stop_coming_back_settle_after_quiet() -> None:
    t = Timeline()
    incident = t.changed(gone("n1", (1, "n1", "n2")), 1, 0.0, {"n1": {1: 100}}, "silent")
    t.tick(QUIET + 1)
    assert incident.open  # none back yet: the browsers may still be reconnecting
    t.node_routes("n2", {1: 50}, 5.0)
    t.tick(5.0 + QUIET - 0.1)
    assert incident.open
    t.tick(5.0 + QUIET)
    assert incident.settled is True and incident.back_at is None
    assert t.to_json(incident)["back_s"] is None


def test_settle_timeout_ends_an_incident_unsettled() -> None:
    t = Timeline(settle_timeout=30.0)
    incident = t.changed(gone("n1", (1, "n1", "n2")), 1, 0.0, {}, "operator", handoffs=[1])
    t.tick(29.9)
    assert incident.open
    assert t.tick(30.0) == [incident]
    assert incident.settled is False and incident.ended == 30.0
    assert t.to_json(incident)["handoff_s"] is None
    assert t.in_flight() == {}


def test_change_without_moves_ends_at_once() -> None:
    t = Timeline()
    spare = t.changed(Change("n9", ChangeKind.SPARE, None), 3, 5.0, {}, "registered")
    assert spare.kind is Kind.SPARE and not spare.open and spare.settled
    t.first_sign("n4", "undrain", 6.0)
    back = t.changed(Change("n4", ChangeKind.ACTIVE, 4, [Move(2, "n1", "n4")]), 4, 6.1, {},
                     "operator", handoffs=[2])  # fmt: skip
    assert back.kind is Kind.UNDRAIN and back.open
    joined = t.changed(Change("n5", ChangeKind.ACTIVE, 5), 5, 7.0, {}, "registered")
    assert joined.kind is Kind.JOIN
    left = t.changed(gone("n6"), 6, 8.0, {}, "left")
    assert left.kind is Kind.LEAVE


def test_follower_builds_history_from_warm_copies() -> None:
    t = Timeline()
    assert t.warm_diff({1: "a", 2: "b"}, {1: "a", 2: "b"}, 3, 1.0) is None
    incident = t.warm_diff({1: "a", 2: "b", 3: "b"}, {1: "a", 2: "c", 3: "a"}, 4, 2.0)
    assert incident is not None and incident.kind is Kind.TABLE
    assert incident.node == "b" and incident.table_version == 4 and not incident.open
    j = t.to_json(incident)
    assert [(m["route"], m["old"], m["new"]) for m in j["moves"]] == [(2, "b", "c"), (3, "b", "a")]
    assert j["browsers_moved"] is None and j["detect_s"] == 0.0
    lead = t.leadership(Kind.LEAD, "h2", 3, 9.0)
    assert t.to_json(lead)["reason"] == "term 3"
    assert [i.id for i in t.last(5)] == [lead.id, incident.id]
    assert t.tick(9.0) == [incident, lead]


def test_ring_keeps_the_newest_incidents() -> None:
    t = Timeline(capacity=3)
    for n in range(5):
        t.changed(Change(f"s{n}", ChangeKind.SPARE, None), n, float(n), {}, "registered")
    assert [i.node for i in t.incidents] == ["s2", "s3", "s4"]
    assert [i.node for i in t.since(3)] == ["s3", "s4"]
    assert len(t.touching({1}, 0, 10)) == 0


def test_paced_steps_join_the_drain_that_started_them() -> None:
    t = Timeline()
    t.first_sign("n1", "drain", 0.0)
    drain = t.changed(gone("n1", (1, "n1", "n2")), 5, 0.01, {"n1": {1: 10, 2: 10}}, "operator",
                      handoffs=[1])  # fmt: skip
    t.handoff_relayed("n1", "n2", (1,), 3, 0.05)
    t.node_routes("n2", {1: 10}, 0.3)
    t.tick(0.3)
    assert not drain.open and drain.settled
    step = Change("n1", ChangeKind.MOVED, None, [Move(2, "n1", "n2")])
    again = t.changed(step, 6, 1.0, {"n1": {2: 10}}, "registered", handoffs=[2])
    assert again is drain and drain.open and drain.table_version == 6
    assert t.in_flight() == {2: 0.01}
    t.handoff_relayed("n1", "n2", (2,), 4, 1.05)
    t.node_routes("n2", {1: 10, 2: 10}, 1.3)
    t.tick(1.3)
    j = t.to_json(drain)
    assert j["settled"] is True and [m["route"] for m in j["moves"]] == [1, 2]
    assert j["mailboxes_handed"] == 7 and j["browsers_moved"] == 20 and j["browsers_back"] == 20
    assert j["handoff_s"] == 1.04


def test_a_paced_move_stays_one_open_incident_until_its_last_step() -> None:
    # An audit: between steps the drain's incident went out as ended and settled while
    # HaloD's /status still listed routes moving, then opened again at the next step.
    t = Timeline()
    t.first_sign("n1", "drain", 0.0)
    drain = t.changed(gone("n1", (1, "n1", "n2")), 5, 0.01, {"n1": {1: 10, 2: 10}}, "operator",
                      handoffs=[1])  # fmt: skip
    t.paced(True)  # route 2 is still to move
    t.handoff_relayed("n1", "n2", (1,), 3, 0.05)
    t.node_routes("n2", {1: 10}, 0.3)
    t.tick(0.3)
    t.tick(40.0)  # longer than settle_timeout: a finished step waits for the next
    assert drain.open and drain.settled is None and drain.ended is None
    step = Change("n1", ChangeKind.MOVED, None, [Move(2, "n1", "n2")])
    assert t.changed(step, 6, 41.0, {"n1": {2: 10}}, "registered", handoffs=[2]) is drain
    t.paced(False)  # that was the last
    t.handoff_relayed("n1", "n2", (2,), 4, 41.05)
    t.node_routes("n2", {1: 10, 2: 10}, 41.3)
    t.tick(41.3)
    assert not drain.open and drain.settled is True and drain.ended == 41.3


def test_a_rehash_is_an_incident_that_ends_at_once() -> None:
    t = Timeline()
    incident = t.rehashed(2, 1, 10, 5.0)
    j = t.to_json(incident)
    assert (j["kind"], j["reason"], j["table_version"]) == ("rehash", "hash version 2 -> 1", 10)
    assert j["open"] is False and j["settled"] is True and t.counts[Kind.REHASH] == 1


def test_a_step_without_its_start_is_a_move_incident() -> None:
    t = Timeline()
    step = Change("n1", ChangeKind.MOVED, None, [Move(2, "n1", "n2")])
    incident = t.changed(step, 6, 1.0, {}, "registered", handoffs=[2])
    assert incident.kind is Kind.MOVE and incident.open and t.counts[Kind.MOVE] == 1


def test_a_hand_off_from_a_node_that_fails_is_not_waited_for() -> None:
    t = Timeline()
    join = t.changed(Change("n2", ChangeKind.ACTIVE, 2, [Move(3, "n1", "n2")]), 2, 0.0, {},
                     "registered", handoffs=[3])  # fmt: skip
    assert t.in_flight() == {3: 0.0}
    t.changed(gone("n1", (1, "n1", "n2")), 3, 5.0, {}, "silent")
    assert t.in_flight() == {}
    t.tick(5.0)
    assert join.settled is True and t.to_json(join)["handoff_s"] is None


def test_node_routes_says_when_an_open_incident_changed() -> None:
    t = Timeline()
    t.changed(gone("n1", (1, "n1", "n2")), 1, 0.0, {"n1": {1: 4}}, "silent")
    assert t.node_routes("n3", {1: 9}, 0.1) is False  # not a new owner
    assert t.node_routes("n2", {1: 2}, 0.2) is True
    assert t.node_routes("n2", {1: 2}, 0.3) is False  # no change
