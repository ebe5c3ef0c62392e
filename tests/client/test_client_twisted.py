"""The Twisted web-app client (pytest-twisted) against a real 3-node static cluster, and
through HaloD's route ports while a route moves and a node dies."""

from __future__ import annotations

import json
import signal

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from orbited.client import Cluster, Node, Selector
from orbited.client.twisted import TwistedClient
from orbited.core.hashing import route_of, static_node
from orbited.core.keys import ConnectionKey
from tests.client.test_client_blocking import (  # noqa: F401
    TABS,
    browser,
    events_of,
    halod_with_proxy,
    keys_on_every_node,
    open_tabs,
    procs,
    start_node,
    three_nodes,
)
from tests.conftest import keys_on_routes, wait_for

pytestmark = pytest.mark.slow


def cluster_of(nodes) -> Cluster:
    return Cluster([Node(n.sp, f"http://{n.http}") for n in nodes])


@pytest_twisted.inlineCallbacks
def test_events_land_where_the_hash_says(three_nodes):  # noqa: F811
    keys = keys_on_every_node()
    sockets = {}
    for key in keys:
        node = three_nodes[static_node(route_of(key), 3)]
        sockets[key] = node.ws(node.token(key.user, key.session, key.location))
        sockets[key].recv(timeout=5)
    client = TwistedClient(cluster_of(three_nodes), reactor, timeout=2)
    try:
        results = yield client.send(keys, {"via": "twisted"}, event_id="tw-1")
        assert all(r == {"status": "delivered", "seq": 1} for r in results.values()), results
        again = yield client.send(keys, {"via": "twisted"}, event_id="tw-1")  # a resend
        assert again == results
        lone = ConnectionKey("nobody", "", "")
        assert (yield client.send([lone], 1))[lone] == {"status": "no_connection"}
    finally:
        client.close()
    for ws in sockets.values():
        assert json.loads(ws.recv(timeout=5))["data"] == {"via": "twisted"}
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.2)  # the resend was not delivered twice
        ws.close()


@pytest_twisted.inlineCallbacks
def test_a_user_event_reaches_each_tab_once(node):
    sockets = open_tabs(node, TABS)
    client = TwistedClient(cluster_of([node]), reactor, timeout=2)
    try:
        results = yield client.send([["alice", "*", "*"]], "hi", offline=None, latest=None)
        assert results == {
            Selector("alice", None): {
                "status": "matched",
                "keys": {k: {"status": "delivered", "seq": 1} for k in TABS},
            }
        }
    finally:
        client.close()
    for ws in sockets.values():
        assert [e["data"] for e in events_of(ws)] == ["hi"]
        ws.close()


@pytest_twisted.inlineCallbacks
def test_a_request_over_the_nodes_limit_does_not_take_the_others_down(node):
    """A request over the node's sp_max_message would make it close the connection the
    other requests share, again on each resend: it is given up unsent, and the sends made
    beside it are delivered."""
    key = ConnectionKey("big", "s", "/t")
    ws = node.ws(node.token(key.user, key.session, key.location))
    ws.recv(timeout=5)
    client = TwistedClient(Cluster([Node(node.sp, f"http://{node.http}")]), reactor, timeout=2)
    try:
        huge = client.send([key], "x" * (5 << 20), event_id="huge")
        beside = [client.send([key], i, event_id=f"n{i}") for i in range(3)]
        result = (yield huge)[key]
        assert result["status"] == "error" and result["code"] == "payload_too_large", result
        for d in beside:
            assert (yield d)[key]["status"] == "delivered"
        assert [json.loads(ws.recv(timeout=5))["data"] for _ in range(3)] == [0, 1, 2]
    finally:
        client.close()
        ws.close()


@pytest_twisted.inlineCallbacks
def test_dead_node_is_reported_then_reached_again(three_nodes):  # noqa: F811
    key = keys_on_every_node()[0]
    node = three_nodes[static_node(route_of(key), 3)]
    client = TwistedClient(cluster_of(three_nodes), reactor, timeout=1, retries=2, backoff=0.1)
    try:
        ws = node.ws(node.token(key.user, key.session, key.location))
        ws.recv(timeout=5)
        assert (yield client.send([key], 1, event_id="k1"))[key]["status"] == "delivered"
        ws.close()
        node.stop()
        result = (yield client.send([key], 2, event_id="k2"))[key]
        assert result["status"] == "error" and result["code"] == "unreachable"
        node.start(http=node.http, sp=node.sp)
        ws = node.ws(node.token(key.user, key.session, key.location))
        ws.recv(timeout=5)
        assert (yield client.send([key], 3, event_id="k3"))[key]["status"] == "delivered"
        assert json.loads(ws.recv(timeout=5))["data"] == 3
        ws.close()
    finally:
        client.close()


@pytest_twisted.inlineCallbacks
def test_calls_given_up_on_a_hung_node_leave_one_connection_open():
    # A node that accepts and never answers (frozen). An app's next send made from the
    # last one's callback used to get a connection of its own while the given-up
    # call's retry dialled another: one socket left open per call, even after close().
    from twisted.internet.protocol import Factory, Protocol

    opened: list[Protocol] = []

    class Silent(Protocol):
        def connectionMade(self) -> None:  # noqa: N802
            opened.append(self)

    port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
    node = Node(f"tcp://127.0.0.1:{port.getHost().port}", "http://127.0.0.1:1")
    client = TwistedClient(Cluster([node]), reactor, timeout=0.2, retry_budget=0.3)
    key = ConnectionKey("alice", "s1", "/chat")
    try:
        for n in range(6):
            result = (yield client.send([key], n))[key]
            assert result["status"] == "error" and result["code"] == "unreachable"
        live = [p for p in opened if p.transport.connected]
        assert len(live) <= 1, f"{len(live)} connections open to one address"
        client.close()
        yield task.deferLater(reactor, 0.2, lambda: None)
        assert not [p for p in opened if p.transport.connected]
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_pipelined_sends_follow_a_move_in_order(tmp_path, procs):  # noqa: F811
    # Many events to one key in flight at once over the pooled connection, which still
    # leads to the route's old node (move_close_delay 30 s): it answers `moved`; the
    # client dials the route port again at once (a backoff of 3 s would show) and resends
    # them, in order, with the ones made meanwhile queued behind.
    halod, hx = halod_with_proxy(tmp_path, procs, "--grace", "1", "--move-close-delay", "30")
    start_node(halod, tmp_path, procs, "n1")
    key = keys_on_routes([20])[0]
    client = TwistedClient(hx, reactor, backoff=3.0)
    try:
        assert (yield client.send([key], 0))[key] == {"status": "no_connection"}  # to n1
        n2 = start_node(halod, tmp_path, procs, "n2")
        wait_for(lambda: halod.owners()[20] == "n2", "route 20 moved to n2")
        ws, epoch = browser(hx, key)
        assert epoch == n2.epoch
        began = reactor.seconds()
        sent = [client.send([key], i) for i in range(1, 21)]
        yield task.deferLater(reactor, 0.002, lambda: None)  # replies arriving meanwhile
        sent += [client.send([key], i) for i in range(21, 41)]
        results = yield defer.gatherResults(sent)
        assert reactor.seconds() - began < 2.5, "a moved reply was answered with a backoff"
    finally:
        client.close()
    assert [r[key]["status"] for r in results] == ["delivered"] * 40, results
    assert [json.loads(ws.recv(timeout=5))["data"] for _ in range(40)] == list(range(1, 41))
    ws.close()


@pytest_twisted.inlineCallbacks
def test_sends_in_flight_through_a_crash_keep_their_order(tmp_path, procs):  # noqa: F811
    # Events stream to keys on a node's routes, several in flight at any time; the node is
    # killed. None returns `error` (the retry budget spans HaloD's failover), and each
    # browser, reconnected to the new owner, receives what that node accepted in order.
    halod, hx = halod_with_proxy(tmp_path, procs, "--grace", "0.5")
    n1 = start_node(halod, tmp_path, procs, "n1")
    n2 = start_node(halod, tmp_path, procs, "n2")
    owned = [r for r, o in halod.owners().items() if o == "n1"][:3]
    keys = keys_on_routes(owned, count=6)
    client = TwistedClient(hx, reactor, timeout=2.0)
    sent: list[tuple[int, defer.Deferred]] = []
    browsers = {}
    try:
        for i in range(1000):
            if i == 20:
                n1.stop(signal.SIGKILL)
            if i > 20 and not browsers and halod.owners()[owned[0]] == "n2":
                for key in keys:  # the pages reconnect through the same route ports
                    browsers[key], epoch = browser(hx, key)
                    assert epoch == n2.epoch
            sent.append((i, client.send(keys, i)))
            if browsers and i >= 80:
                break
            yield task.deferLater(reactor, 0.005, lambda: None)  # not waiting for replies
        results = yield defer.gatherResults([d for _, d in sent])
    finally:
        client.close()
    assert browsers, "the routes never moved"
    numbers = [i for i, _ in sent]
    for key in keys:
        statuses = [(i, r[key]) for i, r in zip(numbers, results, strict=True)]
        assert {r["status"] for _, r in statuses} <= {"delivered", "no_connection"}, statuses
        delivered = [i for i, r in statuses if r["status"] == "delivered"]
        received = [json.loads(browsers[key].recv(timeout=5))["data"] for _ in delivered]
        assert received == delivered
        browsers[key].close()
