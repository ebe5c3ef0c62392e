"""The blocking web-app client against a real 3-node static cluster."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from orbited.client import BlockingClient, Cluster, Node
from orbited.hashing import route_of, static_node
from orbited.keys import ConnectionKey
from tests.conftest import SECRET, NodeProcess

pytestmark = pytest.mark.slow


@pytest.fixture
def three_nodes(tmp_path) -> Iterator[list[NodeProcess]]:
    nodes = []
    for i in range(3):
        (tmp_path / str(i)).mkdir()
        nodes.append(NodeProcess(tmp_path / str(i), "--linger", "30").start())
    yield nodes
    for n in nodes:
        n.stop()


def cluster_of(nodes: list[NodeProcess]) -> Cluster:
    return Cluster([Node(n.sp, f"http://{n.http}") for n in nodes])


def keys_on_every_node(count: int = 12) -> list[ConnectionKey]:
    keys = [ConnectionKey(f"user{i}", "s", "/t") for i in range(count)]
    assert {static_node(route_of(k), 3) for k in keys} == {0, 1, 2}
    return keys


def test_each_event_lands_on_the_node_its_hash_names(three_nodes):
    cluster = cluster_of(three_nodes)
    keys = keys_on_every_node()
    sockets = {}
    for key in keys:
        # Browsers connect where the hash says (as the JS client would be told).
        url = cluster.browser_url(key, SECRET)
        node = three_nodes[static_node(route_of(key), 3)]
        assert url.startswith(f"ws://{node.http}/orbited/ws?token=")
        ws = node.ws(node.token(key.user, key.session, key.location))
        ws.recv(timeout=5)
        sockets[key] = ws
    with BlockingClient(cluster) as client:
        results = client.send(keys, {"n": 1}, event_id="fan-1")
        assert all(r == {"status": "delivered", "seq": 1} for r in results.values()), results
        for ws in sockets.values():
            assert json.loads(ws.recv(timeout=5))["data"] == {"n": 1}
        # A key connected nowhere: its node answers no_connection.
        lone = ConnectionKey("nobody", "", "")
        assert client.send([lone], 1)[lone] == {"status": "no_connection"}
    for ws in sockets.values():
        ws.close()


def test_a_dead_node_is_retried_and_a_resend_is_not_delivered_twice(three_nodes):
    cluster = cluster_of(three_nodes)
    key = keys_on_every_node()[0]
    index = static_node(route_of(key), 3)
    node = three_nodes[index]
    ws = node.ws(node.token(key.user, key.session, key.location))
    ws.recv(timeout=5)
    with BlockingClient(cluster, timeout=1.0, retries=2, backoff=0.1) as client:
        assert client.send([key], "first", event_id="e1")[key]["status"] == "delivered"
        ws.close()
        node.stop()
        started = time.monotonic()
        result = client.send([key], "lost", event_id="e2")[key]
        assert result["status"] == "error" and time.monotonic() - started < 5
        node.start(http=node.http, sp=node.sp)
        ws = node.ws(node.token(key.user, key.session, key.location))
        ws.recv(timeout=5)
        assert client.send([key], "again", event_id="e3")[key]["status"] == "delivered"
        # The same event sent again (as a retry would) is answered, not delivered twice.
        assert client.send([key], "again", event_id="e3")[key]["status"] == "delivered"
    assert json.loads(ws.recv(timeout=5))["data"] == "again"
    with pytest.raises(TimeoutError):
        ws.recv(timeout=0.5)
    ws.close()


def test_acknowledged_mode_answers_when_the_browser_confirms(node: NodeProcess):
    import threading

    cluster = Cluster([Node(node.sp, f"http://{node.http}")])
    key = ConnectionKey("acker", "s", "/t")
    ws = node.ws(node.token(key.user, key.session, key.location))
    ws.recv(timeout=5)
    results: list[dict] = []
    with BlockingClient(cluster, timeout=10) as client:
        sender = threading.Thread(target=lambda: results.append(client.send([key], 1, ack=8)))
        sender.start()
        event = json.loads(ws.recv(timeout=5))
        time.sleep(0.3)
        assert results == []  # still waiting for the browser
        ws.send(json.dumps({"type": "ack", "seq": event["seq"]}))
        sender.join(5)
    assert results == [{key: {"status": "acked", "seq": 1}}]
    ws.close()
