"""The Twisted web-app client (pytest-twisted) against a real 3-node static cluster."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import reactor

from orbited.client import Cluster, Node
from orbited.client.twisted import TwistedClient
from orbited.hashing import route_of, static_node
from orbited.keys import ConnectionKey
from tests.test_client_blocking import keys_on_every_node, three_nodes  # noqa: F401

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
