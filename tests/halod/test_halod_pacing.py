"""Paced planned moves (docs/halod.md, "Paced moves"): a drain, undrain or join moves
its routes a step at a time, each step about MOVE_STEP seconds of browsers at
``move_rate``, the next once the step's hand-offs came; a crash is never paced."""

import pytest

from halod.liveness import ProbeSettings
from halod.membership import MOVE_STEP, MOVE_STEP_TIMEOUT, Membership, Timing
from halod.store.base import Persisted
from halod.store.etcd import decode, encode
from orbited.core.control import Assign, ControlError, ErrorCode, Heartbeat, Register, RouteMoved
from orbited.core.routes import ChangeKind, RouteTable

TIMING = Timing(1.0, 3, 5.0, ProbeSettings(enabled=False), move_rate=2000.0)
STEP = TIMING.move_rate * MOVE_STEP  # browsers a step moves
FOUR_A_STEP = round(12 * STEP / 4)  # n1's browsers when 4 of its 12 routes make a step


def reg(name):
    return Register(name, f"{name}:80", f"tcp://{name}:90", capacity=10)


def sent(effects, name, kind):
    return [s.message for s in effects.sends if s.name == name and isinstance(s.message, kind)]


def moved_routes(effects, name):
    return [e.route for msg in sent(effects, name, RouteMoved) for e in msg.moves]


def cluster(timing=TIMING, connections=FOUR_A_STEP):
    """n1 active (routes 1-12), n2 spare, n3 active (13-24); n1 reports ``connections``
    browsers (by default, a step takes 4 routes)."""
    m = Membership(RouteTable(24, 1), timing)
    for name in ("n1", "n2", "n3"):
        m.register(reg(name), 0.0)
    m.heartbeat("n1", Heartbeat(1, connections=connections), 0.0)
    m.heartbeat("n3", Heartbeat(1, connections=connections), 0.0)
    return m


def test_a_drain_moves_one_step_and_keeps_the_rest_with_the_old_owner():
    m = cluster()
    effects = m.drain("n1", 1.0)
    assert moved_routes(effects, "n1") == [1, 2, 3, 4]
    (assign,) = sent(effects, "n2", Assign)
    assert assign.routes == assign.incoming == (1, 2, 3, 4)
    (old,) = sent(effects, "n1", Assign)  # drained, still serving what has not moved
    assert old.role == "drained" and old.routes == tuple(range(5, 13))
    assert m.state_of("n1") == "drained"
    assert m.held_by("n1") == list(range(5, 13)) and m.held_by("n2") == [1, 2, 3, 4]
    owners = m.owners()
    assert owners[5].name == "n1" and owners[1].name == "n2"
    assert m.table.owners()[5] == "n2"  # the table is the move's end


def test_the_next_step_waits_for_its_share_of_the_rate_and_the_hand_offs():
    m = cluster()
    m.drain("n1", 1.0)
    assert m.pace_due() == 1.0 + MOVE_STEP_TIMEOUT  # until the hand-offs come
    assert not m.pace_tick(1.5).changes  # the step's share of the rate is over, not its hand-offs
    m.handoff_relayed("n1", "n2", (1, 2))
    assert not m.pace_tick(1.5).changes  # 3 and 4 still due
    m.handoff_relayed("n1", "n2", (3, 4))
    assert m.pace_due() == pytest.approx(1.0 + MOVE_STEP)
    assert not m.pace_tick(1.0 + MOVE_STEP / 2).changes
    effects = m.pace_tick(1.0 + MOVE_STEP)
    (change,) = effects.changes
    assert change.role is ChangeKind.MOVED
    assert [mv.route for mv in change.moves] == [5, 6, 7, 8]
    assert all(mv.old == "n1" and mv.new == "n2" for mv in change.moves)
    (routes_moved,) = sent(effects, "n1", RouteMoved)
    assert all(e.handoff and e.name == "n2" for e in routes_moved.moves)
    (assign,) = sent(effects, "n2", Assign)
    assert assign.routes == tuple(range(1, 9)) and assign.incoming == (5, 6, 7, 8)


def test_a_step_whose_hand_off_never_comes_goes_after_the_timeout():
    m = cluster()
    m.drain("n1", 1.0)
    assert not m.pace_tick(1.0 + MOVE_STEP_TIMEOUT - 0.01).changes
    assert moved_routes(m.pace_tick(1.0 + MOVE_STEP_TIMEOUT), "n1") == [5, 6, 7, 8]


def test_every_route_arrives_and_the_old_owner_ends_with_none():
    m = cluster()
    now = 1.0
    effects = m.drain("n1", now)
    steps = [moved_routes(effects, "n1")]
    while m.pace_due() is not None:
        m.handoff_relayed("n1", "n2", m.step.routes)
        now = m.pace_due()
        effects = m.pace_tick(now)
        steps.append(moved_routes(effects, "n1"))
    assert steps == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    assert now == pytest.approx(1.0 + 2 * MOVE_STEP)
    assert m.held_by("n1") == [] and not m.holdover
    (assign,) = sent(effects, "n1", Assign)
    assert assign.routes == ()


def test_without_browsers_or_with_rate_zero_everything_moves_at_once():
    for m in (cluster(connections=0),
              cluster(Timing(1.0, 3, 5.0, ProbeSettings(enabled=False), move_rate=0))):  # fmt: skip
        effects = m.drain("n1", 1.0)
        assert moved_routes(effects, "n1") == list(range(1, 13))
        assert not m.holdover and m.pace_due() is None


def test_a_join_is_paced_too():
    m = Membership(RouteTable(24, 0), TIMING)
    for name in ("n1", "n2"):
        m.register(reg(name), 0.0)  # no browsers yet: the first join is not paced
    for name in ("n1", "n2"):
        m.heartbeat(name, Heartbeat(1, connections=round(12 * STEP / 2)), 0.0)  # 2 a step
    effects = m.register(reg("n3"), 1.0)
    first = moved_routes(effects, "n1") + moved_routes(effects, "n2")
    assert len(first) == 2 and len(m.holdover) == 6
    (welcome,) = [s.message for s in effects.sends if s.name == "n3"]
    assert welcome.routes == welcome.incoming == tuple(sorted(first))
    assert set(m.table.routes_of(m.table.node_id("n3"))) == set(first) | set(m.holdover)


def test_the_old_owner_failing_moves_its_held_routes_at_once():
    m = cluster()
    m.drain("n1", 1.0)
    effects = m.leave("n1", 1.05, "crashed")
    (change,) = effects.changes
    assert [mv.route for mv in change.moves] == list(range(5, 13))
    assert all(mv.new == "n2" for mv in change.moves)
    (assign,) = sent(effects, "n2", Assign)
    assert assign.routes == tuple(range(1, 13)) and assign.incoming == ()  # no hand-off
    assert not m.holdover


def test_the_new_owner_failing_leaves_held_routes_with_the_old_owner():
    m = cluster()
    m.drain("n1", 1.0)  # n2 took id 1: 1-4 now, 5-12 later
    effects = m.leave("n2", 1.05, "crashed")  # no spare: the seed policy's path
    moved = {mv.route: (mv.old, mv.new) for c in effects.changes for mv in c.moves}
    assert {r for r, (old, _) in moved.items() if old == "n2"} == {1, 2, 3, 4}
    assert not any(old == "n1" for old, _ in moved.values())  # 5-12: still n1's
    assert m.held_by("n1") == list(range(5, 13))
    assert set(m.holdover) == set(range(5, 13))
    assert all(m.table.owners()[r] == "n3" for r in range(5, 13))


def test_a_step_waits_while_an_end_is_away_without_spinning():
    m = cluster()
    m.drain("n1", 1.0)
    m.handoff_relayed("n1", "n2", (1, 2, 3, 4))
    m.disconnected("n1", 1.01)  # a control-link blip: it has `grace` to come back
    assert not m.pace_tick(1.5).changes
    assert m.pace_due() is None  # nothing to wake up for: the tick looks again
    m.register(reg("n1"), 2.0)  # back within grace, still serving 5-12
    assert m.held_by("n1") == list(range(5, 13))
    assert moved_routes(m.tick(2.1), "n1") == [5, 6, 7, 8]


def test_rehash_waits_for_a_paced_move():
    m = cluster()
    for name in m.nodes:
        m.nodes[name].hashes = (1, 2)
    m.drain("n1", 1.0)
    with pytest.raises(ControlError) as e:
        m.rehash(2, 1.05)
    assert e.value.code is ErrorCode.REHASH_IN_PROGRESS


def test_the_holdover_is_saved_with_the_table_and_restored():
    m = cluster()
    m.drain("n1", 1.0)
    snapshot = m.snapshot()
    assert snapshot["holdover"] == {str(r): "n1" for r in range(5, 13)}
    persisted = Persisted.from_snapshot(snapshot, 7)
    assert persisted.holdover == tuple((r, "n1") for r in range(5, 13))
    via_etcd = decode(b"/p", encode(b"/p", persisted))
    assert via_etcd == persisted
    restored = Membership.restore(via_etcd.snapshot(), TIMING, 2.0, 1)
    assert restored.holdover == m.holdover
    assert restored.held_by("n1") == list(range(5, 13))


def test_a_restored_paced_move_waits_for_the_browser_count_then_paces():
    """A HaloD restarted mid-drain restores the rest of the move (holdover) but no count
    of the old owner's browsers: it must not move every held route in one step (each
    counting 0 browsers) but wait for the old owner's first heartbeat, then step as
    before (4 routes of n1's 12 a step)."""
    m = cluster()
    m.drain("n1", 1.0)
    restored = Membership.restore(m.snapshot(), TIMING, 2.0, 1)
    for name in ("n1", "n2", "n3"):
        restored.register(reg(name), 2.0)
    assert not restored.pace_tick(2.1).changes  # nobody counted yet: no step
    assert restored.pace_due() is None  # (and no spinning: the heartbeat wakes it)
    restored.heartbeat("n2", Heartbeat(1, connections=0), 2.2)
    restored.heartbeat("n1", Heartbeat(1, connections=FOUR_A_STEP * 8 // 12), 2.2)
    assert moved_routes(restored.pace_tick(2.3), "n1") == [5, 6, 7, 8]
    assert restored.held_by("n1") == [9, 10, 11, 12]


def test_a_restored_holdover_naming_a_stranger_is_refused():
    m = cluster()
    m.drain("n1", 1.0)
    snapshot = m.snapshot()
    snapshot["holdover"] = {"5": "nobody"}
    with pytest.raises(ValueError, match="holdover"):
        Membership.restore(snapshot, TIMING, 2.0, 1)
