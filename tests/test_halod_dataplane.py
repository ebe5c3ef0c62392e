"""The built-in data plane with real processes: route ports lead to the owner, follow a
move at once, cut the moved route's open connections, refuse unowned routes."""

from __future__ import annotations

import json
import signal
import socket

import pynng
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from orbited.client import BlockingClient, HaloDCluster
from orbited.hashing import route_of
from tests.conftest import SECRET, HaloDProcess, keys_on_routes, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def procs():
    started = []
    yield started
    for proc in reversed(started):
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop(signal.SIGKILL)


def browser(cluster, key):
    """A WebSocket to the key's route port (browser_url gives the ws:// URL)."""
    return connect(cluster.browser_url(key, SECRET), open_timeout=5, legacy=True)


def test_route_ports_follow_the_table(tmp_path, procs):
    halod = HaloDProcess(tmp_path, "--spares", "0", "--grace", "1", "--heartbeat-interval",
                         "0.2", "--move-close-delay", "1.5", proxy=True).start()  # fmt: skip
    procs.append(halod)
    # No node yet: a route port accepts and closes.
    with socket.create_connection(("127.0.0.1", halod.browser_base), timeout=5) as s:
        assert s.recv(10) == b""
    n1 = halod.node(tmp_path, "n1")
    procs.append(n1)
    cluster = HaloDCluster("127.0.0.1", halod.sp_base, halod.browser_base)
    early, late = keys_on_routes([20], count=2)  # one route: one SP connection
    ws = browser(cluster, early)
    assert json.loads(ws.recv(timeout=5))["type"] == "hello"
    app = BlockingClient(cluster, backoff=0.3)  # keeps its SP connection through route ports open
    assert app.send([early], {"n": 1}, "e1")[early]["status"] == "delivered"
    assert json.loads(ws.recv(timeout=5))["data"] == {"n": 1}
    status = halod.get("status")["dataplane"]
    assert status["routes"][str(route_of(early))]["browser"] == 1

    n2 = halod.node(tmp_path, "n2")  # takes routes 13-24
    procs.append(n2)
    assert json.loads(ws.recv(timeout=5)) == {"type": "reconnect", "reason": "route_moved"}
    with pytest.raises(ConnectionClosed):
        ws.recv(timeout=5)
    # The same port now leads to n2, for browsers and web apps.
    again = browser(cluster, late)
    assert json.loads(again.recv(timeout=5))["type"] == "hello"
    # The app's old connection still reaches n1, which answers `moved`; the client resends
    # through the route port once the data plane has cut that connection (1.5 s after the
    # move; the client's resends span 0.3 + 0.6 + 1.2 s).
    assert app.send([late], {"n": 2}, "e2")[late]["status"] == "delivered"
    assert json.loads(again.recv(timeout=5))["data"] == {"n": 2}
    app.close()
    again.close()


def test_moved_route_connections_are_cut_even_if_the_old_node_is_silent(tmp_path, procs):
    halod = HaloDProcess(tmp_path, "--spares", "1", "--grace", "0.5", "--heartbeat-interval",
                         "0.1", "--move-close-delay", "0.2", proxy=True).start()  # fmt: skip
    procs.append(halod)
    n1 = halod.node(tmp_path, "n1")
    spare = halod.node(tmp_path, "spare")
    procs += [n1, spare]
    route = 5
    # A web app's SP connection through route 5's port, then n1 freezes (SIGSTOP): the
    # kernel keeps its sockets open, so only the data plane can end the connection.
    req = pynng.Req0(dial=f"tcp://127.0.0.1:{halod.sp_base + route - 1}", recv_timeout=5000)
    key = keys_on_routes([route])[0]
    req.send(json.dumps({"id": "a", "to": [list(key)], "data": 1}).encode())
    assert json.loads(req.recv())["ok"] is True
    n1.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: halod.nodes().get("spare", {}).get("state") == "active", "failover")
        wait_for(lambda: halod.get("status")["dataplane"]["cut"] >= 1, "the cut")
        # nng redials the same port and reaches the spare.
        req.send(json.dumps({"id": "b", "to": [list(key)], "data": 2}).encode())
        assert json.loads(req.recv())["results"] == [{"status": "no_connection"}]
    finally:
        n1.proc.send_signal(signal.SIGCONT)
        req.close()
