"""HaloD's stores behind one interface: SQLite and etcd (a real 3-member cluster on
loopback, tests/etcd_cluster.py); fencing of a deposed leader's writes, read back from
etcd's revision history; the follower's warm copy."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from halod.etcd import election as el
from halod.etcd import wire
from halod.etcd.client import EtcdClient, Unavailable
from halod.etcd.local import free_ports
from halod.membership import Membership, Timing
from halod.store import etcd as se
from halod.store.base import CorruptTable, Persisted
from halod.store.sqlite import SQLiteStore
from orbited.core.routes import RouteTable
from tests.etcd_cluster import etcd_cluster  # noqa: F401
from tests.halod.test_halod_membership import reg

PREFIX = "/test/halod"
TTL = 2


def snapshot(active=("a", "b"), spares=("c",), drained=(), routes=12, failovers=0):
    """A valid Membership.snapshot(): routes split evenly over ``active``."""
    per = routes // len(active)
    nodes = {
        str(i + 1): {"name": n, "routes": list(range(i * per + 1, (i + 1) * per + 1))}
        for i, n in enumerate(active)
    }
    names = [*active, *spares, *drained]
    return {
        "table": {
            "routes": routes,
            "policy": "even",
            "spares_wanted": 1,
            "nodes": nodes,
            "spares": list(spares),
        },
        "nodes": {
            n: {
                "browser": f"127.0.0.{i + 2}:8000",
                "sp": f"tcp://127.0.0.{i + 2}:9000",
                "capacity": 1000,
            }
            for i, n in enumerate(names)
        },
        "failovers": failovers,
        "drained": sorted(drained),
    }


# -- pure ------------------------------------------------------------------------------


def test_persisted_is_exactly_the_snapshot():
    s = snapshot(drained=("d",), failovers=3)
    p = Persisted.from_snapshot(s, 5)
    assert p.version == 5 and p.policy.name == "even" and p.spares == ("c",)
    assert [o.name for o in p.owners] == ["a", "b"] and p.drained == ("d",)
    assert p.snapshot() == s
    with pytest.raises(CorruptTable):
        Persisted.from_snapshot({"table": {}}, 1)


def test_a_real_membership_round_trips_through_etcds_keys():
    m = Membership(RouteTable(24, 1), Timing())
    for name in ("a", "b", "c", "d"):
        m.register(reg(name), 0.0)
    m.drain("d", 0.0)
    keys = se.encode(b"/p", Persisted.from_snapshot(m.snapshot(), 3), "h1", 5)
    restored = Membership.restore(se.decode(b"/p", keys).snapshot(), Timing(), 0.0, 1)
    assert restored.snapshot() == m.snapshot()
    assert {r: n.name for r, n in restored.owners().items()} == {
        r: n.name for r, n in m.owners().items()
    }


@pytest_twisted.inlineCallbacks
def test_unreachable_etcd_is_a_clear_error():
    closed = free_ports(2)  # nothing listens there: connections are refused
    client = EtcdClient(reactor, [f"http://127.0.0.1:{p}" for p in closed], timeout=1.5)
    try:
        with pytest.raises(Unavailable, match=f"127.0.0.1:{closed[1]}.*ConnectionRefused"):
            yield client.range(b"/x")
    finally:
        yield client.close()


def test_key_layout_round_trip():
    p = Persisted.from_snapshot(snapshot(), 4)
    keys = se.encode(b"/p", p, "h1", 17)
    assert sorted(keys) == [
        b"/p/meta",
        b"/p/policy",
        b"/p/registry/a",
        b"/p/registry/b",
        b"/p/registry/c",
        b"/p/spares",
        b"/p/table",
        b"/p/version",
    ]
    assert se.writer_of(keys[b"/p/version"]) == (4, "h1", 17)
    assert se.decode(b"/p", {**keys, b"/p/leader": b"{}"}) == p
    assert se.decode(b"/p", {}) is None
    broken = dict(keys)
    del broken[b"/p/table"]
    with pytest.raises(CorruptTable):
        se.decode(b"/p", broken)


def test_mirror_applies_puts_and_deletes():
    m = se.Mirror(b"/p")
    first = se.encode(b"/p", Persisted.from_snapshot(snapshot(), 1))
    m.reset(wire.RangeResult(10, tuple(wire.KeyValue(k, v, 5, 5) for k, v in first.items())))
    second = se.encode(b"/p", Persisted.from_snapshot(snapshot(active=("a", "c"), spares=()), 2))
    events = [
        wire.Event(wire.EventType.PUT, wire.KeyValue(k, v, 5, 11))
        for k, v in second.items()
        if first.get(k) != v
    ]
    events.append(wire.Event(wire.EventType.DELETE, wire.KeyValue(b"/p/registry/b", b"", 0, 11)))
    assert m.apply(wire.WatchMessage(11, events=tuple(events)))
    table = m.table()
    assert table is not None and table.version == 2
    assert table.snapshot() == snapshot(active=("a", "c"), spares=())
    # the leader key is not the table
    leader = wire.Event(wire.EventType.PUT, wire.KeyValue(b"/p/leader", b"x", 12, 12))
    assert not m.apply(wire.WatchMessage(12, events=(leader,)))


@pytest.mark.parametrize(
    "kw",
    [
        {"endpoints": ()},
        {"endpoints": ("127.0.0.1:2379",)},
        {"endpoints": ("http://h",)},
        {"endpoints": ("http://h:1/v3",)},
        {"prefix": "orbited"},
        {"prefix": "/orbited/"},
        {"lease_ttl": 0},
        {"lease_ttl": 2, "step_down_margin": 1.5},
        {"timeout": 0},
        {"timeout": 2.0, "lease_ttl": 2},
    ],
)
def test_etcd_settings_are_checked(kw):
    with pytest.raises(ValueError):
        se.EtcdSettings(**kw)


def test_etcd_settings_defaults():
    s = se.EtcdSettings()
    assert s.election() == el.ElectionSettings(2, 0.5)
    assert s.key_prefix == b"/orbited/halod"


# -- on etcd and SQLite ----------------------------------------------------------------


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.inlineCallbacks
def until(check, timeout, step=0.02):
    deadline = reactor.seconds() + timeout
    while not check():
        if reactor.seconds() > deadline:
            raise AssertionError(f"not within {timeout}s")
        yield sleep(step)


class Leader:
    """An elected HaloD's store on etcd: an election plus an EtcdStore fenced by it."""

    def __init__(self, cluster, name, endpoints=None):
        self.settings = se.EtcdSettings(tuple(endpoints or cluster.endpoints), PREFIX, TTL)
        self.client = EtcdClient(reactor, self.settings.endpoints, self.settings.timeout)
        self.election = el.Election(
            self.client, self.settings.key_prefix, name, self.settings.election()
        )
        self.store = se.EtcdStore(self.client, self.settings, self.election.fence)

    @pytest_twisted.inlineCallbacks
    def lead(self):
        self.election.start()
        yield self.election.elected
        yield self.store.read()

    @pytest_twisted.inlineCallbacks
    def close(self):
        if self.election.state is not el.State.STOPPED:
            yield self.election.stop()
        yield self.client.close()


@pytest.fixture(params=["sqlite", "etcd"])
def any_store(request, tmp_path):
    if request.param == "sqlite":

        def make():
            return SQLiteStore(tmp_path / "halod.sqlite3"), None
    else:
        cluster = request.getfixturevalue("etcd_cluster")

        @pytest_twisted.inlineCallbacks
        def make():
            leader = Leader(cluster, "h1")
            yield leader.lead()
            return leader.store, leader

    return make


@pytest_twisted.inlineCallbacks
def test_round_trip_through_the_interface(any_store):
    store, owner = yield any_store()
    try:
        assert (yield store.read()) is None and store.version == 0
        first = yield store.write(snapshot(drained=("d",)))
        assert first.version == 1 and store.version == 1
        second = yield store.write(snapshot(active=("a", "c"), spares=(), failovers=1))
        assert second.version == 2
        again = yield store.read()
        assert again == second
        assert again.snapshot() == snapshot(active=("a", "c"), spares=(), failovers=1)
    finally:
        yield store.shutdown() if owner is None else owner.close()
    # a new process reads the same table
    store, owner = yield any_store()
    try:
        assert (yield store.read()) == second and store.version == 2
    finally:
        yield store.shutdown() if owner is None else owner.close()


@pytest_twisted.inlineCallbacks
def test_a_deposed_leaders_writes_fail_and_never_interleave(etcd_cluster):  # noqa: F811
    a, b = Leader(etcd_cluster, "a"), Leader(etcd_cluster, "b")
    try:
        yield a.lead()
        yield a.store.write(snapshot())
        yield a.store.write(snapshot(failovers=1))
        b.election.start()
        yield until(lambda: b.election.state is el.State.FOLLOWER, 5)
        # a's process freezes: it sends no keepalive and does not know it was deposed
        stale = a.election.fence()
        a.election.abandon()
        a.store.fence = lambda: stale
        fenced = []
        a.store.on_fenced = lambda: fenced.append(True)
        yield b.election.elected
        assert (yield b.store.read()).version == 2
        for i in range(3):
            yield b.store.write(snapshot(failovers=10 + i))
            with pytest.raises(se.Fenced):
                yield a.store.write(snapshot(failovers=100 + i))
        assert (yield b.store.read()).failovers == 12 and len(fenced) == 3
        # the same from etcd's history: every table version was written by the candidate
        # whose leader key (lease, term) stood at that revision, and a's writes all come
        # before b's
        history = etcd_cluster.history(PREFIX.encode() + b"/")
        leader_key = PREFIX.encode() + b"/leader"
        holder = None  # (name, create revision) of the current leader key
        writers = []
        for change in history:
            if change["key"] == leader_key:
                name = json.loads(change["value"])["name"] if change["type"] == "PUT" else None
                holder = (name, change["revision"]) if name else None
            elif change["key"] == PREFIX.encode() + b"/version":
                version, writer, term = se.writer_of(change["value"])
                assert holder == (writer, term), (change, holder)
                writers.append((version, writer))
        assert writers == [(1, "a"), (2, "a"), (3, "b"), (4, "b"), (5, "b")]
    finally:
        yield a.close()
        yield b.close()


@pytest_twisted.inlineCallbacks
def test_killing_an_etcd_member_changes_nothing_and_followers_stay_warm(etcd_cluster):  # noqa: F811
    leader = Leader(etcd_cluster, "a")
    watcher = EtcdClient(reactor, etcd_cluster.endpoints, timeout=0.5)
    tables = []
    follower = se.Follower(watcher, PREFIX.encode(), tables.append, retry=0.1)
    try:
        yield leader.lead()
        follower.start()
        yield follower.ready
        changes = [
            snapshot(),
            snapshot(active=("a", "c"), spares=("b",)),
            snapshot(active=("a", "c"), spares=(), drained=("b",)),
        ]
        for s in changes:
            written = yield leader.store.write(s)
        yield until(lambda: follower.table() == written, 5)
        assert [t.version for t in tables if t is not None] == [1, 2, 3]
        etcd_cluster.kill(0)  # both clients were talking to member 0
        for i in range(6):  # 3 lease TTLs of writes
            written = yield leader.store.write(snapshot(failovers=i))
            yield sleep(TTL / 6)
        assert leader.election.state is el.State.LEADER and len(leader.election.terms) == 1
        yield until(lambda: follower.table() == written, 5)
        assert follower.resyncs >= 1
        assert follower.table().snapshot() == snapshot(failovers=5)
    finally:
        follower.stop()
        yield watcher.close()
        yield leader.close()


class _LostMemberClient:
    """An EtcdClient whose member dies with a write in flight: the txn applies but its
    reply is lost (Ambiguous), the next read finds no member answering yet (the others
    are electing etcd's leader: Unavailable), and a resent txn fails its compare because
    the first one applied."""

    endpoints = ("http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3")

    def __init__(self) -> None:
        self.kvs: dict[bytes, wire.KeyValue] = {}
        self.txns = self.ranges = 0

    def txn(self, compare, success, failure=()):
        from twisted.internet import defer

        from halod.etcd.client import Ambiguous

        self.txns += 1
        if self.txns == 1:  # applied, reply lost
            for op in success:
                if isinstance(op, wire.Put):
                    self.kvs[op.key] = wire.KeyValue(op.key, op.value, 5, 5)
            return defer.fail(Ambiguous("m0 died"))
        got = tuple(wire.RangeResult(6, tuple(kv for kv in [self.kvs.get(op.key)] if kv))
                    for op in failure)  # fmt: skip
        return defer.succeed(wire.TxnResult(False, 6, got))

    def range(self, key, range_end=None, revision=0):
        from twisted.internet import defer

        self.ranges += 1
        if self.ranges == 1:
            return defer.fail(Unavailable("no member answered within 1.0 s"))
        kv = self.kvs.get(key)
        return defer.succeed(wire.RangeResult(6, (kv,) if kv else ()))


@pytest_twisted.inlineCallbacks
def test_a_write_whose_member_died_is_found_applied_not_failed():
    client = _LostMemberClient()
    settings = se.EtcdSettings(client.endpoints, PREFIX, TTL)
    store = se.EtcdStore(client, settings, lambda: el.Fence(7, 3, "a"))  # type: ignore[arg-type]
    written = yield store.write(snapshot())
    assert written.version == 1 and store.version == 1
    assert client.txns == 2 and client.ranges == 1  # read failed, the resend told it
