"""The web-app clients' user addressing, latest-value and offline options, and hash-version
following (docs/client-python.md), against fake nodes: the Twisted client over memory
connections and a clock, the blocking client over loopback sockets to an SP REP peer in a
thread. What each request carries, where it goes, and what ``send`` returns."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from twisted.internet.testing import MemoryReactorClock

from orbited.client import BlockingClient, Cluster, HaloDCluster, Node
from orbited.client.blocking import event_body, recipient_result
from orbited.client.cluster import recipient
from orbited.client.twisted import TwistedClient
from orbited.cluster import free_port_block
from orbited.core.hashing import WILDCARDS_NEED_V2, route_of, route_of_user
from orbited.core.keys import ConnectionKey, Selector
from orbited.sp import wire
from orbited.sp.reqrep import RequestIds
from tests.client.test_client_retry import Node as MemoryNode
from tests.client.test_client_retry import results

ALICE = [ConnectionKey("alice", "s1", "/t1"), ConnectionKey("alice", "s2", "/t9")]
EVERY_ALICE = Selector("alice", None)


def user_moving_between_versions(routes: int = 24, avoid: set[int] = set()) -> ConnectionKey:  # noqa: B006
    """A key whose route under version 1 differs from its user's route (version 2), both
    outside ``avoid``."""
    for i in range(1000):
        key = ConnectionKey(f"mover{i}", "s", "/t")
        v1, v2 = route_of(key, routes, version=1), route_of_user(key.user, routes)
        if v1 != v2 and not {v1, v2} & avoid:
            return key
    raise AssertionError("no such key")


# -- routing ---------------------------------------------------------------------------


def test_a_users_keys_and_selectors_share_one_route_under_version_2():
    cluster = HaloDCluster("127.0.0.1", 9000, 8000)
    assert cluster.hash_version == 2 and cluster.follows_hash
    route = route_of_user("alice", 24)
    for target in [*ALICE, EVERY_ALICE, Selector("alice", "s1"), ["alice", "*", "*"],
                   ("alice", "s1", "*"), ["alice", "", ""]]:  # fmt: skip
        assert cluster.route_of(target) == route, target
    grouped = cluster.group_by_route([ALICE[0], ["alice", "*", "*"], ALICE[1], EVERY_ALICE])
    assert grouped == {route: [ALICE[0], EVERY_ALICE, ALICE[1]]}  # one request, distinct


def test_version_1_hashes_whole_keys_and_cannot_route_a_selector():
    cluster = Cluster([Node("tcp://127.0.0.1:1", "http://x")], hash_version=1)
    key = user_moving_between_versions()
    assert cluster.route_of(key) == route_of(key, 24, version=1) != route_of_user(key.user, 24)
    with pytest.raises(ValueError, match="wildcards need hash_version 2"):
        cluster.route_of(EVERY_ALICE)
    assert Cluster([Node("tcp://127.0.0.1:1", "http://x")]).route_of(key) == route_of_user(
        key.user, 24
    )  # the default is version 2


@pytest.mark.parametrize("version", [0, 3, "2", True, None])
def test_a_bad_hash_version_is_refused(version):
    with pytest.raises(ValueError):
        Cluster([Node("tcp://127.0.0.1:1", "http://x")], hash_version=version)
    with pytest.raises(ValueError):
        HaloDCluster("127.0.0.1", 9000, 8000, hash_version=version)


@pytest.mark.parametrize("make", [
    lambda: Node("127.0.0.1:9000", "http://x"),  # no tcp://
    lambda: Node("http://127.0.0.1:9000", "http://x"),
    lambda: HaloDCluster("127.0.0.1", 65530, 8000),  # route 24's port past 65535
    lambda: HaloDCluster("127.0.0.1", 0, 8000),
])  # fmt: skip
def test_a_bad_address_is_refused_when_the_cluster_is_built(make):
    """Not at the first send, where it would read as an unreachable node."""
    with pytest.raises(ValueError):
        make()


def test_recipients_in_json_form_are_checked_like_the_node_does():
    assert recipient(["alice", "*", "*"]) == Selector("alice", None)
    assert recipient(["alice", "s1", "*"]) == Selector("alice", "s1")
    assert recipient(["alice", "s*", "/x"]) == ConnectionKey("alice", "s*", "/x")  # literal
    for bad in (["alice", "*", "/x"], ["*", "*", "*"], ["alice", "*"], ["a", "b", "c", "d"],
                ["alice", 1, "*"], "alice", 7):  # fmt: skip
        with pytest.raises(ValueError):
            recipient(bad)


def test_only_a_cluster_that_follows_switches_its_hash_version():
    fixed = HaloDCluster("127.0.0.1", 9000, 8000, hash_version=2)
    assert not fixed.follow_hash(1) and fixed.hash_version == 2
    auto = HaloDCluster("127.0.0.1", 9000, 8000)
    assert auto.follow_hash(1) and auto.hash_version == 1
    assert not auto.follow_hash(1)  # already there
    for junk in (3, "2", None, True, 2.0):
        assert not auto.follow_hash(junk) and auto.hash_version == 1
    static = Cluster([Node("tcp://127.0.0.1:1", "http://x")])
    assert not static.follow_hash(1) and static.hash_version == 2


# -- the request and the results ---------------------------------------------------------


def test_the_request_carries_selectors_options_and_the_hash_version():
    body = json.loads(event_body("e1", [EVERY_ALICE, Selector("bob", "s1"), ALICE[0]],
                                 {"n": 1}, latest="typing:lobby:alice", offline=True,
                                 hash_version=2))  # fmt: skip
    assert body == {"id": "e1", "to": [["alice", "*", "*"], ["bob", "s1", "*"],
                                       ["alice", "s1", "/t1"]],
                    "data": {"n": 1}, "latest": "typing:lobby:alice", "offline": True,
                    "hash": 2}  # fmt: skip
    plain = json.loads(event_body("e2", [ALICE[0]], 1))
    assert set(plain) == {"id", "to", "data"}  # nothing that was not asked for
    assert json.loads(event_body("e3", [ALICE[0]], 1, ack=2, offline=30))["offline"] == 30


def test_a_wildcard_result_maps_each_key_reached():
    raw = {"status": "matched", "keys": [
        {"key": ["alice", "s1", "/t1"], "status": "delivered", "seq": 7},
        {"key": ["alice", "s2", "/t9"], "status": "queued", "seq": 3, "dropped": 1}]}  # fmt: skip
    assert recipient_result(raw) == {"status": "matched", "keys": {
        ALICE[0]: {"status": "delivered", "seq": 7},
        ALICE[1]: {"status": "queued", "seq": 3, "dropped": 1}}}  # fmt: skip
    assert recipient_result({"status": "no_connection", "keys": [], "held": True}) == {
        "status": "no_connection", "keys": {}, "held": True}  # fmt: skip
    assert recipient_result({"status": "limited", "retry_after": 0.25}) == {
        "status": "limited", "retry_after": 0.25}  # fmt: skip
    odd = {"status": "matched", "keys": [{"no": "key"}]}
    assert recipient_result(odd) == odd  # not the documented form: kept as it came


# -- the Twisted client, over memory connections ---------------------------------------------


@pytest.fixture
def twisted_setup():
    reactor = MemoryReactorClock()
    cluster = HaloDCluster("127.0.0.1", 9000, 8000)
    client = TwistedClient(cluster, reactor, timeout=5.0, backoff=0.05, retry_budget=1.0)
    return reactor, cluster, client, MemoryNode(reactor)


def reply_with(node: MemoryNode, body: dict) -> None:
    proto = node.connections[-1][0]
    ((request_id, _),) = node.requests()
    proto.dataReceived(wire.encode_message(RequestIds.encode(request_id)
                                           + json.dumps(body).encode()))  # fmt: skip


def test_twisted_sends_a_user_event_and_returns_each_key_reached(twisted_setup):
    reactor, _, client, node = twisted_setup
    sending = client.send([EVERY_ALICE, ALICE[0]], {"text": "hi"}, "u1", latest="t", offline=5)
    assert node.dials() == 1
    assert reactor.tcpClients[0][1] == 9000 + route_of_user("alice", 24) - 1
    node.accept()
    ((request_id, request),) = node.requests()
    assert request == {"id": "u1", "to": [["alice", "*", "*"], ["alice", "s1", "/t1"]],
                       "data": {"text": "hi"}, "latest": "t", "offline": 5, "hash": 2}  # fmt: skip
    node.reply(request_id, [
        {"status": "matched", "keys": [{"key": ALICE[0], "status": "delivered", "seq": 4},
                                       {"key": ALICE[1], "status": "delivered", "seq": 2}]},
        {"status": "delivered", "seq": 4}])  # fmt: skip
    assert results(sending) == {
        EVERY_ALICE: {"status": "matched", "keys": {ALICE[0]: {"status": "delivered", "seq": 4},
                                                    ALICE[1]: {"status": "delivered", "seq": 2}}},
        ALICE[0]: {"status": "delivered", "seq": 4}}  # fmt: skip


def test_twisted_follows_a_mismatch_regroups_and_resends_at_once(twisted_setup):
    reactor, cluster, client, node = twisted_setup
    key = user_moving_between_versions(avoid={route_of_user("alice", 24)})
    sending = client.send([key, EVERY_ALICE], 1, "m1")
    v2_ports = {9000 + route_of_user(u, 24) - 1 for u in (key.user, "alice")}
    assert {c[1] for c in reactor.tcpClients} == v2_ports
    # The key's route's node runs version 1: it refuses the whole request.
    index = next(i for i, c in enumerate(reactor.tcpClients)
                 if c[1] == 9000 + route_of_user(key.user, 24) - 1)  # fmt: skip
    accept_dial(node, index)
    ((request_id, request),) = node.requests()
    assert request["hash"] == 2
    error_reply(node, request_id, {"code": "hash_version_mismatch", "message": "hash 1 here",
                                   "hash": 1})  # fmt: skip
    assert cluster.hash_version == 1
    # alice's route answers too (before the switch was known): the selector is refused.
    accept_dial(node, 1 - index)
    ((request_id, request),) = node.requests()
    refusal = {"code": "hash_version_mismatch", "message": WILDCARDS_NEED_V2, "hash": 1}
    error_reply(node, request_id, refusal)
    # At once, no clock advance: the key is resent to its version-1 route, same id, and
    # the selector probes its version-2 route again (the connection still open), which
    # the version-1 node refuses: no more resends.
    assert reactor.tcpClients[-1][1] == 9000 + route_of(key, 24, version=1) - 1
    ((probe_id, probe),) = node.requests()  # on alice's connection, the latest accepted
    assert (probe["id"], probe["to"], probe["hash"]) == ("m1", [["alice", "*", "*"]], 2)
    error_reply(node, probe_id, refusal)
    node.accept()
    ((request_id, request),) = node.requests()
    assert request == {"id": "m1", "to": [list(key)], "data": 1, "hash": 1}
    node.reply(request_id, [{"status": "delivered", "seq": 1}])
    got = results(sending)
    assert got[key] == {"status": "delivered", "seq": 1}
    assert got[EVERY_ALICE] == {"status": "error", "code": "hash_version_mismatch",
                                "error": "wildcards need hash_version 2"}  # fmt: skip


def accept_dial(node: MemoryNode, index: int) -> None:
    """Complete dial ``index`` (MemoryNode.accept completes the latest one)."""
    from twisted.internet.testing import StringTransport

    factory = node.reactor.tcpClients[index][2]
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(wire.encode_header(wire.REP))
    node.connections.append((proto, transport, wire.SPConnection(wire.REP, wire.REQ)))


def error_reply(node: MemoryNode, request_id: int, error: dict) -> None:
    proto = node.connections[-1][0]
    body = json.dumps({"id": "x", "ok": False, "error": error}).encode()
    proto.dataReceived(wire.encode_message(RequestIds.encode(request_id) + body))


def test_twisted_follows_moved_with_a_new_hash_to_the_users_route(twisted_setup):
    reactor, cluster, client, node = twisted_setup
    cluster.follow_hash(1)  # it had followed a version-1 cluster
    key = user_moving_between_versions()
    sending = client.send([key], "x", "r1")
    assert reactor.tcpClients[-1][1] == 9000 + route_of(key, 24, version=1) - 1
    node.accept()
    ((request_id, request),) = node.requests()
    assert request["hash"] == 1
    # HaloD rehashed to 2: this node no longer owns the key's (new) route.
    node.reply(request_id, [{"status": "moved", "route": 3, "hash": 2}])
    assert cluster.hash_version == 2
    assert node.dials() == 2 and reactor.tcpClients[-1][1] == 9000 + route_of_user(key.user) - 1
    node.accept()
    ((request_id, request),) = node.requests()
    assert (request["id"], request["hash"]) == ("r1", 2)
    node.reply(request_id, [{"status": "queued", "seq": 1}])
    assert results(sending) == {key: {"status": "queued", "seq": 1}}


def test_a_fixed_version_returns_a_mismatch_and_limited_as_they_are():
    reactor = MemoryReactorClock()
    cluster = HaloDCluster("127.0.0.1", 9000, 8000, hash_version=2)
    client = TwistedClient(cluster, reactor, timeout=5.0)
    node = MemoryNode(reactor)
    sending = client.send([ALICE[0]], 1, "f1")
    node.accept()
    ((request_id, _),) = node.requests()
    error_reply(node, request_id, {"code": "hash_version_mismatch", "message": "m", "hash": 1})
    assert node.dials() == 1 and cluster.hash_version == 2  # no resend, no switch
    assert results(sending)[ALICE[0]] == {"status": "error", "code": "hash_version_mismatch",
                                          "error": "m", "hash": 1}  # fmt: skip
    limited = client.send([EVERY_ALICE], 2, "f2")  # alice's route: the same connection
    ((request_id, _),) = node.requests()
    node.reply(request_id, [{"status": "limited", "retry_after": 0.5}])
    assert node.dials() == 1 and node.requests() == []  # `limited` is an answer: not resent
    assert results(limited) == {EVERY_ALICE: {"status": "limited", "retry_after": 0.5}}


# -- the blocking client, over loopback sockets --------------------------------------------


class FakeNode:
    """An SP REP peer on 127.0.0.1:``port`` in a thread: records each request body and
    answers ``answer(request)`` (a reply dict)."""

    def __init__(self, port: int, answer: Callable[[dict], dict]) -> None:
        self.answer = answer
        self.requests: list[dict] = []
        self.listener = socket.create_server(("127.0.0.1", port))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        sp = wire.SPConnection(wire.REP, wire.REQ)
        conn.sendall(wire.encode_header(wire.REP))
        with conn:
            while data := conn.recv(65536):
                for message in sp.receive(data):
                    request = json.loads(message[4:])
                    self.requests.append(request)
                    reply = json.dumps(self.answer(request)).encode()
                    conn.sendall(wire.encode_message(message[:4] + reply))

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def two_route_nodes() -> Iterator[tuple[int, dict[int, list[dict]], dict[int, int]]]:
    """Two routes behind HaloD-style ports; route r's node answers like a version
    ``versions[r]`` node would. Yields (port base, requests per route, versions)."""
    base = free_port_block(2)
    versions = {1: 2, 2: 2}
    seen: dict[int, list[dict]] = {1: [], 2: []}

    def answer_for(route: int) -> Callable[[dict], dict]:
        def answer(request: dict) -> dict:
            seen[route].append(request)
            if request.get("hash") != versions[route]:
                return {"id": request["id"], "ok": False, "error": {
                    "code": "hash_version_mismatch", "message": "hash differs",
                    "hash": versions[route]}}  # fmt: skip
            out = []
            for target in request["to"]:
                if target[2] == "*":
                    out.append(
                        {
                            "status": "matched",
                            "keys": [
                                {"key": [target[0], "s", "/a"], "status": "delivered", "seq": 1}
                            ],
                        }
                    )
                else:
                    out.append({"status": "delivered", "seq": 1})
            return {"id": request["id"], "ok": True, "results": out}

        return answer

    nodes = [FakeNode(base + r - 1, answer_for(r)) for r in (1, 2)]
    yield base, seen, versions
    for n in nodes:
        n.close()


def test_blocking_sends_wildcards_and_follows_a_rehash(two_route_nodes):
    base, seen, versions = two_route_nodes
    cluster = HaloDCluster("127.0.0.1", base, 8000, routes=2)
    key = user_moving_between_versions(routes=2)
    v1_route, v2_route = route_of(key, 2, version=1), route_of_user(key.user, 2)
    with BlockingClient(cluster, timeout=2.0) as client:
        got = client.send([["bob", "*", "*"], key], {"n": 1}, "b1", latest="members:lobby")
        assert got[Selector("bob", None)] == {"status": "matched", "keys": {
            ConnectionKey("bob", "s", "/a"): {"status": "delivered", "seq": 1}}}  # fmt: skip
        assert got[key] == {"status": "delivered", "seq": 1}
        assert all(r["latest"] == "members:lobby" and r["hash"] == 2
                   for rs in seen.values() for r in rs)  # fmt: skip
        # The cluster is moved back to version 1 (a roll-back): the key's v2 route
        # answers a mismatch; the client switches and resends to the key's v1 route.
        versions.update({1: 1, 2: 1})
        for rs in seen.values():
            rs.clear()
        got = client.send([key], {"n": 2}, "b2")
        assert got == {key: {"status": "delivered", "seq": 1}}
        assert cluster.hash_version == 1
        assert [r["hash"] for r in seen[v2_route]] == [2]
        assert [(r["id"], r["hash"]) for r in seen[v1_route]][-1] == ("b2", 1)
        # A selector cannot be routed under version 1: it goes once to its user's
        # version-2 route with "hash": 2 (a probe for a rehash), which is refused.
        for rs in seen.values():
            rs.clear()
        got = client.send([Selector("bob", None)], 3, "b3")
        refused = {"status": "error", "code": "hash_version_mismatch", "error": WILDCARDS_NEED_V2}
        assert got == {Selector("bob", None): refused}
        probes = [r for rs in seen.values() for r in rs]
        assert [(r["id"], r["hash"]) for r in probes] == [("b3", 2)]
        assert cluster.hash_version == 1


def test_an_auto_cluster_on_version_1_probes_version_2_with_a_selector(twisted_setup):
    # An app that only addresses users must still notice a rehash to 2: under version 1
    # an auto cluster sends a selector to its user's version-2 route with "hash": 2. A
    # node on 2 answers it (and the cluster switches); a node on 1 refuses it, and the
    # selector's result says wildcards need version 2 (nothing is resent).
    reactor, cluster, client, node = twisted_setup
    cluster.follow_hash(1)
    refused = client.send([EVERY_ALICE], 1, "p1")
    assert reactor.tcpClients[-1][1] == 9000 + route_of_user("alice", 24) - 1
    node.accept()
    ((request_id, request),) = node.requests()
    assert request["hash"] == 2
    error_reply(node, request_id, {"code": "hash_version_mismatch", "message": "m", "hash": 1})
    assert results(refused) == {EVERY_ALICE: {"status": "error", "code": "hash_version_mismatch",
                                              "error": WILDCARDS_NEED_V2}}  # fmt: skip
    assert cluster.hash_version == 1 and node.requests() == [] and node.dials() == 1
    accepted = client.send([EVERY_ALICE], 2, "p2")  # HaloD rehashed to 2 meanwhile
    ((request_id, request),) = node.requests()
    assert request["hash"] == 2
    node.reply(request_id, [{"status": "no_connection", "keys": []}])
    assert results(accepted) == {EVERY_ALICE: {"status": "no_connection", "keys": {}}}
    assert cluster.hash_version == 2


def test_a_fixed_version_1_cluster_never_sends_a_selector(twisted_setup):
    reactor = MemoryReactorClock()
    client = TwistedClient(HaloDCluster("127.0.0.1", 9000, 8000, hash_version=1), reactor)
    sending = client.send([EVERY_ALICE], 1, "f1")
    assert reactor.tcpClients == []
    assert results(sending)[EVERY_ALICE]["code"] == "hash_version_mismatch"
