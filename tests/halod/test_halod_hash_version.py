"""HaloD's hash version (docs/halod.md, "Rehash"; docs/hashing.md): persisted with the
table (SQLite and etcd; a table saved without it is version 1), carried in welcome and
assign, checked at registration (``unsupported_hash``), and the membership core's side
of a rehash (explicit times, no reactor)."""

from __future__ import annotations

import json
import sqlite3
from typing import cast

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.testing import StringTransport

from halod.config import HaloDConfig
from halod.ha import Leadership
from halod.membership import REHASH_TIMEOUT, Membership
from halod.server import ControlProtocol, HaloD
from halod.store import etcd as se
from halod.store.base import CorruptTable, Persisted
from halod.store.sqlite import SQLiteStore
from orbited.core.control import (
    CONTROL_PROTOCOL,
    MAX_MESSAGE,
    Assign,
    ControlError,
    ErrorCode,
    Rehash,
    RouteMove,
    Welcome,
)
from orbited.core.routes import RouteTable, RouteTableError
from orbited.core.settings import ConfigError
from orbited.sp.wire import SPConnection
from tests.etcd_cluster import etcd_cluster  # noqa: F401
from tests.halod.test_halod_ha import HandLeadership
from tests.halod.test_halod_liveness import Node
from tests.halod.test_halod_membership import TIMING, reg, sent
from tests.halod.test_store_etcd import Leader, snapshot

BOTH = [1, 2]


def table(version: int, names=("a", "b"), hashes=BOTH) -> Membership:
    m = Membership(RouteTable(12, 0), TIMING, hash_version=version)
    for name in names:
        m.register(reg(name, hashes=hashes), 0.0)
    return m


# -- the table and its stores ---------------------------------------------------------------


def test_a_snapshot_without_hash_version_is_version_1_and_stays_in_the_old_format():
    old = table(1).snapshot()
    assert "hash_version" not in old
    p = Persisted.from_snapshot(old, 3)
    assert p.hash_version == 1 and p.snapshot() == old  # an older HaloD reads it as before
    m = Membership.restore(old, TIMING, 0.0, 1)
    assert m.hash_version == 1 and "hash_version" not in m.snapshot()


def test_a_version_2_table_round_trips():
    m = table(2)
    snap = m.snapshot()
    assert snap["hash_version"] == 2
    p = Persisted.from_snapshot(snap, 7)
    assert p.hash_version == 2 and p.snapshot() == snap
    assert Membership.restore(snap, TIMING, 0.0, 0).hash_version == 2


@pytest.mark.parametrize("bad", [0, 3, "2", True, None, 2.0])
def test_a_table_with_an_unknown_hash_version_is_corrupt(bad):
    broken = {**snapshot(), "hash_version": bad}
    with pytest.raises(CorruptTable, match="hash_version"):
        Persisted.from_snapshot(broken, 1)
    with pytest.raises(RouteTableError, match="hash_version"):
        Membership.restore({**table(1).snapshot(), "hash_version": bad}, TIMING, 0.0, 1)


def test_etcd_keeps_the_version_in_meta_and_reads_its_absence_as_1():
    p = Persisted.from_snapshot({**snapshot(), "hash_version": 2}, 4)
    keys = se.encode(b"/p", p, "h1", 9)
    assert json.loads(keys[b"/p/meta"])["hash_version"] == 2
    assert se.decode(b"/p", keys) == p
    old = se.encode(b"/p", Persisted.from_snapshot(snapshot(), 4))
    assert "hash_version" not in json.loads(old[b"/p/meta"])
    assert se.decode(b"/p", old).hash_version == 1
    broken = {**keys, b"/p/meta": b'{"failovers":0,"drained":[],"hash_version":5}'}
    with pytest.raises(CorruptTable):
        se.decode(b"/p", broken)


def test_sqlite_keeps_the_version_and_an_old_database_reads_as_1(tmp_path):
    path = tmp_path / "halod.sqlite3"
    store = SQLiteStore(path)
    store.save(table(2).snapshot())
    store.close()
    again = SQLiteStore(path)
    assert Membership.restore(again.load(), TIMING, 0.0, 0).hash_version == 2
    again.close()
    # A database written before hash versions: the same body without the field.
    db = sqlite3.connect(path)
    body = json.loads(db.execute("SELECT body FROM snapshot").fetchone()[0])
    del body["hash_version"]
    db.execute("UPDATE snapshot SET body = ?", (json.dumps(body),))
    db.commit()
    db.close()
    old = SQLiteStore(path)
    assert Membership.restore(old.load(), TIMING, 0.0, 0).hash_version == 1
    old.close()


@pytest_twisted.inlineCallbacks
def test_etcd_store_round_trips_the_version(etcd_cluster):  # noqa: F811
    leader = Leader(etcd_cluster, "h1")
    yield leader.lead()
    try:
        first = yield leader.store.write({**snapshot(), "hash_version": 2})
        assert first.hash_version == 2
        second = yield leader.store.write(snapshot())  # rolled back to 1
        assert second.hash_version == 1
        assert (yield leader.store.read()).hash_version == 1
        yield leader.store.write({**snapshot(), "hash_version": 2})
    finally:
        yield leader.close()
    reader = Leader(etcd_cluster, "h2")
    yield reader.lead()
    try:
        assert (yield reader.store.read()).hash_version == 2
    finally:
        yield reader.close()


def test_config_default_and_validation():
    assert HaloDConfig().hash_version == 2
    HaloDConfig(hash_version=1).validate()
    for bad in (0, 3):
        with pytest.raises(ConfigError, match="hash_version"):
            HaloDConfig(hash_version=bad).validate()


# -- registration, welcome and assign --------------------------------------------------------


def test_welcome_and_assign_carry_the_tables_version():
    m = table(2, names=("a",))
    (welcome,) = sent(m.register(reg("b", hashes=BOTH), 0.0), "b", Welcome)
    assert welcome.hash_version == 2
    (assign,) = sent(m.drain("a", 0.0), "b", Assign)
    assert assign.hash_version == 2
    m1 = table(1, names=("a",))
    (welcome,) = sent(m1.register(reg("b", hashes=BOTH), 0.0), "b", Welcome)
    assert welcome.hash_version == 1


def test_a_node_that_does_not_speak_the_tables_version_is_refused():
    m = table(2, names=("a",))
    for extra in ({}, {"hashes": [1]}):  # no hashes: an older node, version 1 only
        with pytest.raises(ControlError) as refused:
            m.register(reg("old", **extra), 0.0)
        assert refused.value.code is ErrorCode.UNSUPPORTED_HASH
        assert "version 2" in refused.value.message
    assert set(m.nodes) == {"a"}  # nothing changed
    # A version-1 table takes it, and a node speaking only 2 is refused there.
    m1 = table(1, names=("a",))
    m1.register(reg("old"), 0.0)
    with pytest.raises(ControlError) as refused:
        m1.register(reg("new", hashes=[2]), 0.0)
    assert refused.value.code is ErrorCode.UNSUPPORTED_HASH
    assert m1.nodes["old"].hashes == (1,) and m1.nodes["a"].hashes == (1, 2)


# -- rehash -------------------------------------------------------------------------------


def test_rehash_tells_every_member_the_owners_of_all_routes():
    m = Membership(RouteTable(12, 1), TIMING, hash_version=1)
    for name in ("a", "b", "s"):  # s: the spare
        m.register(reg(name, hashes=BOTH), 0.0)
    routes_before = m.table.snapshot()
    effects = m.rehash(2, 1.0)
    assert effects.persist and not effects.changes and m.hash_version == 2
    assert m.table.snapshot() == routes_before  # routes do not move
    assert m.snapshot()["hash_version"] == 2
    messages = {s.name: s.message for s in effects.sends}
    assert set(messages) == {"a", "b", "s"}
    (message,) = set(messages.values())
    assert isinstance(message, Rehash) and message.hash_version == 2
    owners = m.owners()
    assert message.owners == tuple(
        RouteMove(r, owners[r].name, owners[r].browser, owners[r].sp) for r in range(1, 13)
    )
    # Welcomes and assigns from now on carry 2.
    (assign,) = sent(m.drain("a", 0.0), "b", Assign)
    assert assign.hash_version == 2


def test_rehash_is_refused_while_a_member_cannot_take_it():
    m = table(1, names=("a",))
    m.register(reg("old"), 0.0)  # speaks 1 only
    with pytest.raises(ControlError) as refused:
        m.rehash(2, 1.0)
    assert refused.value.code is ErrorCode.REHASH_UNSUPPORTED and "old" in refused.value.message
    assert m.hash_version == 1
    m.leave("old", 1.0)
    m.disconnected("a", 1.0)  # within its grace period: it would miss the rehash
    with pytest.raises(ControlError) as refused:
        m.rehash(2, 1.0)
    assert (
        refused.value.code is ErrorCode.REHASH_UNSUPPORTED
        and "not connected" in refused.value.message
    )
    assert m.hash_version == 1


def test_one_rehash_at_a_time_until_every_pair_is_done():
    m = table(1, names=("a", "b", "c"))
    m.rehash(2, 10.0)
    run = m.rehash_running(10.0)
    assert run is not None and len(run.pending) == 6  # each active node to each other
    with pytest.raises(ControlError) as refused:
        m.rehash(1, 11.0)
    assert refused.value.code is ErrorCode.REHASH_IN_PROGRESS and m.hash_version == 2
    m.handoff_relayed("a", "b", ())  # a chunk without `done`: not yet
    assert ("a", "b") in m.rehash_running(11.0).pending
    for a, b in [("a", "b"), ("a", "c"), ("b", "a"), ("b", "c")]:
        m.handoff_relayed(a, b, (1,))
    m.leave("c", 12.0)  # gone: nobody waits for its hand-offs
    assert m.rehash_running(12.0) is None
    assert m.rehash(1, 12.0).persist and m.hash_version == 1  # the way back


def test_a_rehash_whose_handoffs_never_come_ends_after_the_timeout():
    m = table(1)
    m.rehash(2, 0.0)
    assert m.rehash_running(REHASH_TIMEOUT) is not None
    assert m.rehash_running(REHASH_TIMEOUT + 0.1) is None


def test_rehash_to_the_current_version_changes_nothing():
    m = table(2)
    effects = m.rehash(2, 0.0)
    assert not effects.persist and not effects.sends and m.rehash_running(0.0) is None


# -- the daemon's side on etcd: saved (etcd took it) before any node hears ------------------


class HashNode(Node):
    """A control connection (StringTransport) of a node speaking hash versions 1 and 2."""

    def __init__(self, halod: HaloD, name: str) -> None:
        self.proto = ControlProtocol(halod)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.sp = SPConnection(CONTROL_PROTOCOL, CONTROL_PROTOCOL, MAX_MESSAGE)
        self.proto.dataReceived(self.sp.initial_bytes())
        self.send(reg(name, hashes=BOTH))


def test_on_etcd_nodes_hear_the_rehash_only_once_etcd_has_the_table(tmp_path):
    ha = HandLeadership()
    config = HaloDConfig(db=str(tmp_path / "unused.db"), dataplane="none", probe=False,
                         hash_version=1)  # fmt: skip
    halod = HaloD(config, task.Clock(), ha=cast(Leadership, ha))
    ha.lead()
    ha.store.complete()  # the new, empty table
    a, b = HashNode(halod, "a"), HashNode(halod, "b")
    while ha.store.writes:  # a's join, then b's
        ha.store.complete()
    for node in (a, b):
        (welcome,) = node.received()
        assert isinstance(welcome, Welcome) and welcome.hash_version == 1
    answer = halod.rehash(2)
    assert answer == {"hash_version": 2, "previous": 1, "nodes": ["a", "b"]}
    assert a.received() == [] and b.received() == []  # the write is in flight
    ((snapshot, _),) = ha.store.writes
    assert snapshot["hash_version"] == 2
    table = ha.store.complete()
    assert table.hash_version == 2
    for node in (a, b):
        (rehash,) = node.received()
        assert isinstance(rehash, Rehash) and rehash.hash_version == 2
        assert rehash.version == table.version
        # b is the spare: it owns nothing, but hears it too (it may own routes later).
        assert {m.name for m in rehash.owners} == {"a"} and len(rehash.owners) == 24
    # A successor restores version 2 from etcd.
    ha.lose()
    successor = HaloD(config, task.Clock(), ha=cast(Leadership, ha))
    ha.lead()
    assert successor.status()["hash_version"] == 2
    assert "\nhalod_hash_version 2\n" in successor.metrics()
