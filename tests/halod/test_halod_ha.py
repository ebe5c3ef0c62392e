"""HaloD on etcd, the daemon's side (halod/server.py with a Leadership; docs/halod.md, "High
availability"), with task.Clock, StringTransports and a store whose writes the test
completes by hand:

- a follower refuses nodes with ``not_leader`` and the leader's control address;
- the leader tells nodes of a change only after etcd took it (one write in flight, later
  changes queued), and the version of that write rides in ``welcome``/``assign``;
- a refused (fenced) write: the leader stops at once, drops its nodes, tells nobody.

And the node's side (orbited/node/link.py): it ignores an ``assign`` older than the table
version it holds, moves on from a stale ``welcome``, and follows a ``not_leader`` hint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock, StringTransport

from halod.config import HaloDConfig
from halod.etcd.election import Fence, NotLeader
from halod.ha import LeaderInfo, Leadership, Role
from halod.page import status_html
from halod.server import HaloD
from halod.store.base import Persisted
from halod.store.etcd import EtcdSettings, Fenced
from orbited.core.control import (
    CONTROL_PROTOCOL,
    MAX_MESSAGE,
    Assign,
    Error,
    ErrorCode,
    HaloDMessage,
    RouteMove,
    RouteMoved,
    Welcome,
    encode,
)
from orbited.core.routes import Role as NodeRole
from orbited.node.link import HaloDLink, LinkProtocol
from orbited.sp.wire import SPConnection, encode_message
from tests.halod.test_halod_liveness import Node

# -- HaloD with a hand-driven etcd -------------------------------------------------------


class HandStore:
    """An EtcdStore stand-in: ``write`` returns a Deferred the test fires."""

    def __init__(self) -> None:
        self.version = 0
        self.table: Persisted | None = None
        self.writes: list[tuple[dict[str, Any], defer.Deferred[Persisted]]] = []

    def read(self) -> defer.Deferred[Persisted | None]:
        self.version = self.table.version if self.table is not None else 0
        return defer.succeed(self.table)

    def write(self, snapshot: dict[str, Any]) -> defer.Deferred[Persisted]:
        d: defer.Deferred[Persisted] = defer.Deferred()
        self.writes.append((snapshot, d))
        return d

    def complete(self) -> Persisted:
        """etcd took the oldest write."""
        snapshot, d = self.writes.pop(0)
        self.version += 1
        self.table = Persisted.from_snapshot(snapshot, self.version)
        d.callback(self.table)
        return self.table


@dataclass
class Candidate:
    name: str = "h1"
    lease_ttl: int = 0  # the TTL etcd granted (0: none granted yet)


@dataclass
class HandElection:
    candidate: Candidate = field(default_factory=Candidate)
    info: dict[str, str] = field(default_factory=dict)
    deposed_count: int = 0
    leads: bool = False

    def fence(self) -> Fence:
        if not self.leads:
            raise NotLeader("h1 follows")
        return Fence(1, 2, "h1")

    def deposed(self) -> None:
        self.deposed_count += 1

    def stop(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class HandLeadership:
    """What halod.server uses of a Leadership, driven by the test."""

    def __init__(self) -> None:
        self.store = HandStore()
        self.election = HandElection()
        self.settings = EtcdSettings()
        self.health: dict[str, bool | None] = {"http://127.0.0.1:2379": True}
        self.leading = False
        self.seen_leader = False  # a leader was known before it leads (not a cold start)
        self.other = LeaderInfo("h2", "tcp://127.0.0.1:7700", "127.0.0.1:7701")
        self.follower = self
        self.on_lead: Any = None
        self.on_follow: Any = None
        self.on_table: Any = None

    @property
    def role(self) -> Role:
        return Role.LEADER if self.leading else Role.FOLLOWER

    def leader(self) -> LeaderInfo | None:
        return LeaderInfo("h1", "tcp://127.0.0.1:7600") if self.leading else self.other

    def table(self) -> Persisted | None:
        return self.store.table

    def lead(self) -> None:
        self.leading = self.election.leads = True
        self.on_lead()

    def lose(self) -> None:
        self.leading = self.election.leads = False
        self.on_follow()


def halod_on_hand_etcd(tmp_path: Path) -> tuple[HaloD, HandLeadership]:
    ha = HandLeadership()
    config = HaloDConfig(db=str(tmp_path / "unused.db"), dataplane="none", probe=False)
    halod = HaloD(config, task.Clock(), ha=cast(Leadership, ha))
    return halod, ha


def test_a_follower_sends_nodes_to_the_leader(tmp_path: Path) -> None:
    halod, ha = halod_on_hand_etcd(tmp_path)
    node = Node(halod, "n1")
    (error,) = node.received()
    assert error == Error(ErrorCode.NOT_LEADER, "this HaloD does not lead: h2 leads",
                          "tcp://127.0.0.1:7700")  # fmt: skip
    assert node.transport.disconnecting and halod.connections == {}
    status = halod.status()
    assert status["role"] == "follower" and status["leader"]["name"] == "h2"
    assert status["etcd"]["endpoints"] == [{"url": "http://127.0.0.1:2379", "healthy": True}]
    assert status["etcd"]["lease_ttl"] == ha.settings.lease_ttl  # none granted yet
    ha.election.candidate.lease_ttl = 5  # etcd raised the TTL asked for to its minimum
    assert halod.status()["etcd"]["lease_ttl"] == 5
    assert "\nhalod_leader 0\n" in halod.metrics()
    page = status_html(status)
    assert "is <b>follower</b> · leader <b>h2</b>" in page and "2379 up" in page
    assert not (tmp_path / "unused.db").exists()  # etcd only: no SQLite file


def test_nodes_hear_of_a_change_only_once_etcd_has_it(tmp_path: Path) -> None:
    halod, ha = halod_on_hand_etcd(tmp_path)
    ha.lead()
    assert halod.status()["role"] == "leader" and "\nhalod_leader 1\n" in halod.metrics()
    assert len(ha.store.writes) == 1  # the new table, written first
    n1 = Node(halod, "n1")
    assert n1.received() == []  # its registration waits behind the write in flight
    n2 = Node(halod, "n2")
    ha.store.complete()  # version 1: the empty table
    assert n1.received() == [] and n2.received() == []  # both joins: one write, in flight
    assert len(ha.store.writes) == 1
    table = ha.store.complete()  # version 2: n1 active, n2 spare
    assert table.version == 2 and [o.name for o in table.owners] == ["n1"]
    (w1,) = n1.received()
    (w2,) = n2.received()
    assert isinstance(w1, Welcome) and w1.version == 2 and len(w1.routes) == 24
    assert isinstance(w2, Welcome) and w2.version == 2 and w2.role is NodeRole.SPARE
    assert halod.status()["table_version"] == 2


def test_a_fenced_write_stops_the_leader_at_once(tmp_path: Path) -> None:
    halod, ha = halod_on_hand_etcd(tmp_path)
    ha.lead()
    ha.store.complete()
    n1 = Node(halod, "n1")
    ha.store.complete()
    n1.received()
    n2 = Node(halod, "n2")  # a change in flight when etcd refuses it
    _, d = ha.store.writes.pop(0)
    d.errback(Fenced("h1 no longer leads"))
    assert ha.election.deposed_count == 1 and not halod.leading
    for node in (n1, n2):  # dropped, n2 never welcomed: they go to the next HaloD
        (error,) = node.received()
        assert isinstance(error, Error) and error.code == ErrorCode.NOT_LEADER
        assert node.transport.disconnecting
    assert halod.connections == {}
    halod.tick()
    assert ha.store.writes == []  # no more writes, no failover of the dropped nodes


def test_a_write_etcd_could_not_take_is_retried_and_nodes_wait(tmp_path: Path) -> None:
    halod, ha = halod_on_hand_etcd(tmp_path)
    clock = cast(task.Clock, halod.clock)
    ha.lead()
    _, d = ha.store.writes.pop(0)
    d.errback(OSError("no etcd endpoint answered"))
    n1 = Node(halod, "n1")
    assert n1.received() == [] and ha.store.writes == []
    clock.advance(HaloD.WRITE_RETRY)
    assert len(ha.store.writes) == 1  # the table as it is now: n1 included
    ha.store.complete()
    (welcome,) = n1.received()
    assert isinstance(welcome, Welcome) and welcome.version == 1
    assert halod.stats["persist_errors"] == 1


def test_a_new_leader_restores_the_table_from_etcd(tmp_path: Path) -> None:
    halod, ha = halod_on_hand_etcd(tmp_path)
    ha.lead()
    ha.store.complete()
    a = Node(halod, "a")
    ha.store.complete()
    b = Node(halod, "b")  # written at once
    c = Node(halod, "c")  # queued: the next write
    ha.store.complete()
    ha.store.complete()
    assert ha.store.writes == []
    for node in (a, b, c):
        node.received()
    before = halod.routes_view()["owners"]
    ha.lose()
    # another HaloD of the same etcd (a fresh process) takes over
    successor, ha2 = halod_on_hand_etcd(tmp_path / "..")
    ha2.store.table, ha2.store.version = ha.store.table, ha.store.version
    successor_status = successor.status()
    assert successor_status["role"] == "follower"
    ha2.lead()
    assert successor.routes_view()["owners"] == before
    assert successor.routes_view()["version"] == 4
    back = [Node(successor, name) for name in ("a", "b", "c")]
    assert ha2.store.writes == []  # re-registering with the same addresses changes nothing
    for node in back:
        (welcome,) = node.received()
        assert isinstance(welcome, Welcome) and welcome.version == 4


# -- the node's side ---------------------------------------------------------------------


class HandHub:
    """What the link uses of the node's hub; records assignments."""

    def __init__(self) -> None:
        self.owned: frozenset[int] = frozenset()
        self.attached = 0
        self.mailboxes = 0
        self.assigned: list[tuple[int, ...]] = []

    def assign(self, routes: Any, total: int | None = None, incoming: Any = ()) -> int:
        self.assigned.append(tuple(routes))
        return 0

    def route_moved(
        self, moves: Any, handoff: Any, exports: Any, users: Any = None, exported: Any = None,
        owners: Any = None,
    ) -> int:  # fmt: skip
        if exported is not None:
            exported()
        return 0

    def set_hash_version(self, version: int) -> None:
        self.hash_version = version


ADDRESSES = "tcp://127.0.0.1:7600,tcp://127.0.0.1:7700"


def link_and_hub() -> tuple[HaloDLink, HandHub]:
    hub = HandHub()
    link = HaloDLink(cast(Any, hub), "n1", ADDRESSES,
                     lambda: ("127.0.0.1:8000", "tcp://127.0.0.1:9000"), 10,
                     MemoryReactorClock())  # fmt: skip
    return link, hub


class HaloDEnd:
    """HaloD's end of one link connection."""

    def __init__(self, link: HaloDLink) -> None:
        self.proto = LinkProtocol(link)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.proto.dataReceived(SPConnection(CONTROL_PROTOCOL, CONTROL_PROTOCOL,
                                             MAX_MESSAGE).initial_bytes())  # fmt: skip

    def send(self, message: HaloDMessage) -> None:
        self.proto.dataReceived(encode_message(encode(message)))


def welcome(version: int | None, routes: tuple[int, ...] = (1, 2)) -> Welcome:
    return Welcome(1, NodeRole.ACTIVE, routes, 4, 1.0, 3, version=version)


def test_a_node_ignores_an_assign_older_than_its_table() -> None:
    link, hub = link_and_hub()
    halod = HaloDEnd(link)
    halod.send(welcome(5))
    assert hub.assigned == [(1, 2)] and link.table_version == 5
    halod.send(RouteMoved((RouteMove(2, "n2"),)))
    halod.send(Assign(1, NodeRole.ACTIVE, (1,), version=7))
    halod.send(Assign(1, NodeRole.ACTIVE, (1, 2, 3, 4), version=6))  # late: a stale leader's
    assert hub.assigned == [(1, 2), (1,)] and link.table_version == 7
    halod.send(Assign(1, NodeRole.ACTIVE, (1, 3), version=7))  # same version: obeyed
    halod.send(Assign(1, NodeRole.ACTIVE, (1, 3, 4)))  # no version (an older HaloD): obeyed
    assert hub.assigned[-2:] == [(1, 3), (1, 3, 4)]
    assert not halod.transport.disconnecting


def test_a_stale_welcome_sends_the_node_to_the_next_halod() -> None:
    link, hub = link_and_hub()
    HaloDEnd(link).send(welcome(9))
    stale = HaloDEnd(link)
    stale.send(welcome(4, routes=(3, 4)))  # a HaloD that no longer leads
    assert stale.transport.disconnecting and hub.assigned == [(1, 2)]
    # every HaloD answers with the older table (etcd restored from a backup): obeyed
    again = HaloDEnd(link)
    again.send(welcome(4, routes=(3, 4)))
    assert not again.transport.disconnecting and hub.assigned[-1] == (3, 4)
    assert link.table_version == 4


def test_not_leader_sends_the_next_connection_to_the_leader() -> None:
    link, _ = link_and_hub()
    assert link.endpoints.next() == ("127.0.0.1", 7600)
    HaloDEnd(link).send(Error(ErrorCode.NOT_LEADER, "h2 leads", "tcp://127.0.0.1:7700"))
    assert link.endpoints.next() == ("127.0.0.1", 7700)
    HaloDEnd(link).send(Error(ErrorCode.NOT_LEADER, "no HaloD leads right now"))
    assert link.endpoints.next() == ("127.0.0.1", 7600)  # no hint: the next address
    # a leader outside the list (another advertised name) is tried too
    HaloDEnd(link).send(Error(ErrorCode.NOT_LEADER, "h3 leads", "tcp://127.0.0.9:7800"))
    assert link.endpoints.next() == ("127.0.0.9", 7800)
    assert link.endpoints.next() == ("127.0.0.1", 7700)
