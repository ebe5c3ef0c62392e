"""A node that dies just before or during a change of HaloD leader (docs/halod.md,
"High availability", "Detecting a dead node"): the new leader probes each restored node
that has not registered again, and fails over at once a node whose ports refuse — as for
a control connection that closes — instead of waiting ``grace``. A node that answers
keeps ``grace``; after a cold start (no leader known before) only ``grace`` applies."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock

from halod.config import HaloDConfig
from halod.etcd.election import Fence, State
from halod.ha import Leadership
from halod.liveness import Outcome, ProbeRequest
from halod.membership import Membership
from halod.server import HaloD
from halod.store.etcd import EtcdSettings
from orbited.core.control import Assign, Welcome
from tests.halod.test_halod_ha import HandLeadership
from tests.halod.test_halod_liveness import TIMING, Node, answer, cluster, reg

R, A = Outcome.REFUSED, Outcome.ANSWERED


def test_a_new_leader_fails_a_restored_node_whose_ports_refuse_at_once():
    before = cluster()  # n1 active (id 1), s spare, n3 active (id 2)
    routes = before.table.routes_of(2)
    m = Membership.restore(before.snapshot(), TIMING, now=100.0, spares_wanted=1)
    effects = m.probe_restored(now=100.0)
    assert {(r.name, r.port) for r in effects.probes} == {
        (name, port) for name in ("n1", "s", "n3") for port in ("browser", "sp")
    }
    m.register(reg("n1"), now=100.01)  # back: its probe's answer no longer counts
    probes = {name: [r for r in effects.probes if r.name == name] for name in ("n1", "s", "n3")}
    assert answer(m, probes["n1"], {"browser": R, "sp": R}, now=100.02).changes == []
    assert answer(m, probes["s"], {"browser": A}, now=100.02).changes == []
    failed = answer(m, probes["n3"], {"browser": R, "sp": R}, now=100.02)
    assert [c.name for c in failed.changes] == ["n3"]  # now, not grace (5 s) later
    assert m.table.routes_of(2) == routes and m.table.machines()[2] == "s"
    assert m.failed["n3"] == (100.02, "disconnected, probe: browser refused, sp refused")
    # the spare answered but never registers: grace still ends it
    assert m.tick(104.9).changes == [] and [c.name for c in m.tick(105.1).changes] == ["s"]


def hand_leader(tmp_path: Path, asked: dict[tuple[str, str], defer.Deferred[Outcome]]
                ) -> tuple[HaloD, HandLeadership, task.Clock]:  # fmt: skip
    def fake_probe(request: ProbeRequest) -> defer.Deferred[Outcome]:
        d: defer.Deferred[Outcome] = defer.Deferred()
        asked[(request.name, request.port)] = d
        return d

    ha = HandLeadership()
    clock = task.Clock()
    config = HaloDConfig(db=str(tmp_path / "unused.db"), dataplane="none", grace=5.0)
    halod = HaloD(config, clock, prober=fake_probe, ha=cast(Leadership, ha))
    return halod, ha, clock


def test_a_new_leader_moves_a_dead_nodes_routes_well_before_grace(tmp_path: Path):
    old, ha, _ = hand_leader(tmp_path, {})
    ha.lead()
    ha.store.complete()
    nodes = [Node(old, name) for name in ("a", "s", "c")]
    while ha.store.writes:
        ha.store.complete()
    for node in nodes:
        node.received()
    routes = old.membership.table.routes_of(old.membership.table.node_id("c") or 0)
    ha.lose()  # the leader is gone; c dies with it
    asked: dict[tuple[str, str], defer.Deferred[Outcome]] = {}
    new, ha2, clock = hand_leader(tmp_path / "..", asked)
    ha2.store.table, ha2.store.version = ha.store.table, ha.store.version
    ha2.seen_leader = True  # it followed h1: a change of leader, not a cold start
    ha2.lead()
    assert {name for name, _ in asked} == {"a", "s", "c"}  # probed at once
    a, s = Node(new, "a"), Node(new, "s")
    for node in (a, s):
        (welcome,) = node.received()
        assert isinstance(welcome, Welcome)
    clock.advance(0.01)
    asked.pop(("c", "browser")).callback(Outcome.REFUSED)
    asked.pop(("c", "sp")).callback(Outcome.REFUSED)
    assert new.membership.state_of("c") == "failed"  # 0.01 s after taking over
    ha2.store.complete()  # etcd took the failover: the spare hears
    (assign,) = s.received()
    assert isinstance(assign, Assign) and list(assign.routes) == routes


def test_after_a_cold_start_restored_nodes_are_not_probed(tmp_path: Path):
    old, ha, _ = hand_leader(tmp_path, {})
    ha.lead()
    ha.store.complete()
    Node(old, "a")
    while ha.store.writes:
        ha.store.complete()
    asked: dict[tuple[str, str], defer.Deferred[Outcome]] = {}
    new, ha2, clock = hand_leader(tmp_path / "..", asked)
    ha2.store.table, ha2.store.version = ha.store.table, ha.store.version
    ha2.lead()  # no leader known before: the cluster may be booting
    clock.advance(1.0)
    assert asked == {} and new.membership.state_of("a") == "active"


def test_leadership_knows_whether_a_leader_was_known_before_it_led():
    def leadership() -> tuple[Leadership, list[bool]]:
        ha = Leadership(MemoryReactorClock(), EtcdSettings(), "h1")
        seen: list[bool] = []
        ha.on_lead = lambda: seen.append(ha.seen_leader)
        return ha, seen

    cold, seen = leadership()
    cold._changed(State.LEADER, Fence(1, 2, "h1"))  # elected with no leader known
    assert seen == [False]
    cold._changed(State.CAMPAIGNING, None)  # lost it, then elected again
    cold._changed(State.LEADER, Fence(3, 4, "h1"))
    assert seen == [False, True]
    after, seen = leadership()
    after._changed(State.FOLLOWER, None)  # another HaloD led
    after._changed(State.LEADER, Fence(1, 5, "h1"))
    assert seen == [True]
