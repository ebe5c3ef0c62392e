"""HaloD's membership core with explicit times (no reactor): registration rules,
heartbeat and grace deadlines, the messages nodes get, restore after a restart."""

import json

import pytest

from halod.liveness import ProbeSettings
from halod.membership import Drop, Membership, Timing
from orbited.core.control import (
    FROM_NODE,
    Assign,
    ControlError,
    ErrorCode,
    Heartbeat,
    RouteMove,
    RouteMoved,
    Welcome,
    decode,
)
from orbited.core.routes import MINIMAL, ChangeKind, Role, RouteTable, canonical

TIMING = Timing(heartbeat_interval=1.0, missed_heartbeats=3, grace=5.0)
NO_PROBES = Timing(1.0, 3, 5.0, ProbeSettings(enabled=False))


def reg(name, **extra):
    msg = {"type": "register", "version": 1, "name": name, "browser": f"{name}:80",
           "sp": f"tcp://{name}:90", "capacity": 10}  # fmt: skip
    msg.update(extra)
    return decode(json.dumps(msg).encode(), FROM_NODE)


def cluster(n, spares=0, policy="seed", secret=None):
    m = Membership(RouteTable(24, spares, policy), TIMING, secret)
    for i in range(1, n + 1):
        m.register(reg(f"n{i}"), now=0.0)
    return m


def beat(m, now):
    for record in m.nodes.values():
        if record.connected:
            m.heartbeat(record.name, Heartbeat(1), now)


def sent(effects, name, kind):
    return [s.message for s in effects.sends if s.name == name and isinstance(s.message, kind)]


def test_welcome_carries_role_routes_and_timing():
    m = Membership(RouteTable(24, 1), TIMING)
    first = m.register(reg("a"), 0.0)
    (welcome,) = sent(first, "a", Welcome)
    assert welcome.role is Role.ACTIVE and welcome.routes == tuple(range(1, 25))
    assert welcome.total_routes == 24 and welcome.heartbeat_interval == 1.0
    assert welcome.missed_heartbeats == 3
    (spare,) = sent(m.register(reg("b"), 0.0), "b", Welcome)
    assert spare.role is Role.SPARE and spare.routes == () and spare.node_id is None


def test_join_sends_route_moved_with_the_new_owners_addresses_then_assign():
    m = cluster(1)
    effects = m.register(reg("n2"), 1.0)
    (moved,) = sent(effects, "n1", RouteMoved)
    assert [e.route for e in moved.moves] == list(range(13, 25))
    assert moved.moves[0] == RouteMove(13, "n2", "n2:80", "tcp://n2:90", handoff=True)
    (assign,) = sent(effects, "n1", Assign)
    assert assign.routes == tuple(range(1, 13)) and assign.incoming == ()
    assert [s.name for s in effects.sends].index("n1") < len(effects.sends)  # n1 told
    (welcome,) = sent(effects, "n2", Welcome)
    # both live: n1 hands the mailboxes of 13..24 over and n2 holds them until then
    assert welcome.routes == welcome.incoming == tuple(range(13, 25))


def test_hand_off_only_between_live_nodes():
    m = cluster(3, spares=1)  # n1 active, n2 spare, n3 active
    drained = m.drain("n1", 0.0)
    (moved,) = sent(drained, "n1", RouteMoved)
    assert all(e.handoff for e in moved.moves)
    (assign,) = sent(drained, "n2", Assign)
    assert list(assign.incoming) == list(assign.routes) == m.table.routes_of(1)
    crashed = set(m.table.routes_of(m.table.node_id("n3")))
    beat(m, 10.0)
    m.disconnected("n3", now=10.0)  # a crash: nothing to hand over, nothing to wait for
    beat(m, 15.9)
    effects = m.tick(16.0)
    assert {mv.route for c in effects.changes for mv in c.moves} >= crashed
    assert not sent(effects, "n3", RouteMoved)
    incoming = [set(a.incoming) for a in sent(effects, "n2", Assign)]
    assert incoming and not any(routes & crashed for routes in incoming)


def test_reconnect_within_grace_keeps_routes_and_later_fails_over_to_the_spare():
    m = cluster(3, spares=1)  # n1 active, n2 spare, n3 active
    table = m.table.table()
    beat(m, 10.0)
    m.disconnected("n3", now=10.0)
    beat(m, 14.9)
    assert m.tick(14.9).changes == []
    back = m.register(reg("n3", node_id=2), 15.0)
    assert back.changes == [] and m.table.table() == table
    assert list(sent(back, "n3", Welcome)[0].routes) == table[2]
    m.disconnected("n3", now=20.0)
    beat(m, 25.0)
    effects = m.tick(25.1)
    assert [c.name for c in effects.changes] == ["n3"]
    assert m.table.machines() == {1: "n1", 2: "n2"} and m.table.table() == table
    assert list(sent(effects, "n2", Assign)[0].routes) == table[2]
    assert m.state_of("n3") == "failed"


def test_missed_heartbeats_fail_a_connected_node_and_drop_its_connection():
    # Without probes (probe = false) silence alone decides; with them, see
    # tests/halod/test_halod_liveness.py.
    m = Membership(RouteTable(24, 0), NO_PROBES)
    for name in ("n1", "n2"):
        m.register(reg(name), now=0.0)
    for t in (1.0, 2.0):
        m.heartbeat("n1", Heartbeat(1), t)
        m.heartbeat("n2", Heartbeat(1), t)
    m.heartbeat("n1", Heartbeat(2), 4.5)
    assert m.tick(5.0).changes == []  # n2 silent 3.0 s: not more than k × interval yet
    effects = m.tick(5.1)
    assert effects.drops == [Drop("n2", ErrorCode.FAILED, effects.drops[0].message)]
    assert m.table.table() == canonical(24, 1)
    assert sent(effects, "n1", Assign)[0].routes == tuple(range(1, 25))


def test_without_spare_the_seed_replacement_happens():
    m = cluster(3)
    effects = m.leave("n1", 1.0, "test")
    assert m.table.machines() == {1: "n3", 2: "n2"} and m.table.table() == canonical(24, 2)
    moved = sent(effects, "n3", RouteMoved)[0].moves
    assert {e.route for e in moved} == {21, 22, 23, 24}  # its former routes go back
    assert sent(effects, "n3", Assign)[0].routes == tuple(range(1, 13))


def test_minimal_policy_moves_only_the_failed_routes():
    m = cluster(3, policy=MINIMAL)
    before = m.table.owners()
    effects = m.leave("n2", 1.0, "test")
    lost = {r for r, n in before.items() if n == "n2"}
    assert {mv.route for c in effects.changes for mv in c.moves} == lost
    assert not any(isinstance(s.message, RouteMoved) for s in effects.sends)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (reg("n1"), ErrorCode.DUPLICATE_NAME),  # n1 is connected
        (reg("n9", node_id=1), ErrorCode.ID_CLAIMED),  # id 1 is n1's
        (reg("n9", node_id=7), ErrorCode.ID_CLAIMED),  # no such id any more
    ],
)
def test_refused_registrations_change_nothing(message, code):
    m = cluster(2)
    snapshot = m.snapshot()
    with pytest.raises(ControlError) as e:
        m.register(message, 1.0)
    assert e.value.code == code and m.snapshot() == snapshot


def test_a_reconnecting_node_cannot_claim_another_id():
    m = cluster(2)
    m.disconnected("n2", 1.0)
    with pytest.raises(ControlError) as e:
        m.register(reg("n2", node_id=1), 2.0)
    assert e.value.code == ErrorCode.ID_MISMATCH and m.table.node_id("n2") == 2


def test_cluster_secret():
    m = cluster(0, secret="s3cret")
    with pytest.raises(ControlError) as e:
        m.register(reg("a", secret="wrong"), 0.0)
    assert e.value.code == ErrorCode.UNAUTHORIZED and m.nodes == {}
    m.register(reg("a", secret="s3cret"), 0.0)
    assert m.state_of("a") == "active"


def test_restore_gives_every_node_the_grace_period_and_keeps_the_table():
    m = cluster(4, spares=1)
    m.register(reg("n2b"), 0.0)
    snap = m.snapshot()
    again = Membership.restore(snap, TIMING, now=100.0, spares_wanted=1)
    assert again.table.table() == m.table.table() and again.snapshot() == snap
    assert not any(r.connected for r in again.nodes.values())
    assert again.tick(104.0).changes == []
    again.register(reg("n1", node_id=1), 104.0)
    beat(again, 105.0)
    failed = again.tick(105.5)
    assert {c.name for c in failed.changes} == set(m.nodes) - {"n1"}
    assert again.table.machines() == {1: "n1"}


def test_changed_addresses_are_saved_on_reregistration():
    m = cluster(1)
    m.disconnected("n1", 1.0)
    effects = m.register(reg("n1", browser="elsewhere:81"), 2.0)
    assert [c.role for c in effects.changes] == [ChangeKind.READDRESSED]
    assert m.snapshot()["nodes"]["n1"]["browser"] == "elsewhere:81"


def test_drain_moves_routes_keeps_the_node_and_undrain_returns_it():
    m = cluster(3, spares=1)  # n1, n3 active; n2 spare
    routes_n3 = m.table.table()[2]
    effects = m.drain("n3", 0.0)
    assert m.state_of("n3") == "drained" and m.state_of("n2") == "active"
    assert list(sent(effects, "n2", Assign)[0].routes) == routes_n3
    assert [e.route for e in sent(effects, "n3", RouteMoved)[0].moves] == routes_n3
    assert sent(effects, "n3", Assign) == [Assign(None, Role.DRAINED, ())]
    snap = m.snapshot()
    again = Membership.restore(snap, TIMING, now=0.0, spares_wanted=1)
    assert again.state_of("n3") == "drained"
    with pytest.raises(ControlError):
        m.drain("n3", 0.0)
    m.undrain("n3", 0.0)
    assert m.state_of("n3") == "spare"  # the spare slot was free again
    m.leave("n2", 1.0, "test")
    assert m.state_of("n3") == "active"


def test_the_last_active_node_cannot_be_drained_without_a_spare():
    m = cluster(1)
    with pytest.raises(ControlError):
        m.drain("n1", 0.0)
    assert m.state_of("n1") == "active"


def test_a_stalled_halod_does_not_fail_nodes_for_silence():
    m = cluster(2)
    beat(m, 0.0)
    m.disconnected("n2", now=0.0)
    effects = m.tick(10.0, heartbeats_current=False)  # HaloD itself was busy for 10 s
    assert [c.name for c in effects.changes] == ["n2"]  # the disconnected one still fails
    assert "n1" in m.nodes  # its heartbeats may be sitting unread: not failed
    assert [c.name for c in m.tick(10.0).changes] == ["n1"]


def notices(effects):
    return [(n.level, n.text) for n in effects.notices]


def test_a_warning_when_the_last_spare_is_used_and_when_a_failover_finds_none():
    m = cluster(0, spares=1)
    for name in ("n1", "s", "n3", "n4"):  # n1, n3 active; s spare; n4 active
        m.register(reg(name), now=0.0)
    assert m.table.spares == ["s"] and m.warnings() == []
    took = m.leave("n3", 1.0, "test")
    assert notices(took) == [
        (
            "warn",
            "no spare left: s took over from n3; the next failure "
            "moves routes between live nodes (policy seed)",
        )
    ]
    assert m.warnings() == ["no spare left (1 wanted): the next failure moves routes between "
                            "live nodes (policy seed)"]  # fmt: skip
    found_none = m.leave("n1", 2.0, "test")
    assert notices(found_none) == [("warn", "failover of n1 found no spare: its routes moved "
                                            "between live nodes (policy seed)")]  # fmt: skip
    back = m.register(reg("n5"), 3.0)  # becomes the spare
    assert notices(back) == [("info", "a spare is available again: n5")]
    assert m.warnings() == []
    assert notices(m.leave("n5", 4.0, "test")) == [  # the spare itself failed
        ("warn", "no spare left: spare n5 is gone; the next failure moves routes between "
                 "live nodes (policy seed)")]  # fmt: skip


def test_no_spare_warnings_when_none_is_wanted():
    m = cluster(3, spares=0)
    assert notices(m.leave("n1", 1.0, "test")) == [] and m.warnings() == []
