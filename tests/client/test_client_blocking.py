"""The blocking web-app client against a real 3-node static cluster, and through HaloD's
route ports while routes move and nodes die."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from orbited.client import BlockingClient, Cluster, HaloDCluster, Node, Selector
from orbited.core.hashing import route_of, static_node
from orbited.core.keys import ConnectionKey
from tests.conftest import (
    SECRET,
    DaemonProcess,
    HaloDProcess,
    NodeProcess,
    keys_on_routes,
    wait_for,
)

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


def test_a_request_over_the_nodes_limit_is_given_up_unsent(node: NodeProcess):
    """A request larger than a node reads (sp_max_message, 4 MiB by default) would make
    the node close the connection, again on every resend: the client gives it up at once
    with payload_too_large and the node never sees it."""
    cluster = Cluster([Node(node.sp, f"http://{node.http}")])
    key = ConnectionKey("big", "s", "/t")
    ws = node.ws(node.token(key.user, key.session, key.location))
    ws.recv(timeout=5)
    with BlockingClient(cluster, timeout=2) as client:
        result = client.send([key], "x" * (5 << 20), event_id="huge")[key]
        assert result["status"] == "error" and result["code"] == "payload_too_large", result
        assert "max_message" in result["error"]
        assert client.send([key], "small", event_id="next")[key]["status"] == "delivered"
    assert json.loads(ws.recv(timeout=5))["data"] == "small"
    assert "exceeds limit" not in node.log_file.read_text()
    ws.close()


def test_an_empty_event_id_is_sent_as_it_is_and_refused(node: NodeProcess):
    """event_id="" is not replaced by a random id (a web app retrying with its own id
    must not get a fresh one each time): the node refuses it."""
    key = ConnectionKey("noid", "s", "/t")
    with BlockingClient(Cluster([Node(node.sp, f"http://{node.http}")])) as client:
        result = client.send([key], 1, event_id="")[key]
    assert result["status"] == "error" and result["code"] == "bad_request", result


def test_one_client_serves_calls_from_several_threads(node: NodeProcess):
    # A threaded web app shares one client. Before, the threads shared each connection
    # unlocked: they read each other's replies and split each other's frames, and calls
    # on a healthy node took 5-10 s and ended in "timed out" or "Bad file descriptor".
    import threading

    cluster = Cluster([Node(node.sp, f"http://{node.http}")])
    results: list[dict] = []
    took: list[float] = []
    with BlockingClient(cluster, timeout=2, retry_budget=2) as client:

        def work(t: int) -> None:
            for n in range(10):
                keys = [ConnectionKey(f"t{t}-{k}", "s", "/t") for k in range(6)]
                started = time.monotonic()
                answer = client.send(keys, n)
                took.append(time.monotonic() - started)
                results.extend(answer.values())

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert len(results) == 8 * 10 * 6
    assert {r["status"] for r in results} == {"no_connection"}, [
        r for r in results if r["status"] != "no_connection"
    ][:3]
    assert max(took) < 2  # no call waited for a reply another thread took


def test_threads_do_not_wait_for_each_other_on_a_hung_node():
    # A node that accepts and never answers. With one lock per connection, threads
    # sharing the client queued behind it: the k-th call took k timeouts (an audit: 5,
    # 10, ... 30 s with 6 threads). Each call now has its own connection and budget.
    import socket
    import threading

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    node = Node(f"tcp://127.0.0.1:{hung.getsockname()[1]}", "http://127.0.0.1:1")
    took: list[float] = []
    try:
        with BlockingClient(Cluster([node]), timeout=0.5, retry_budget=0.5) as client:

            def call() -> None:
                started = time.monotonic()
                result = client.send([ConnectionKey("h", "s", "/t")], 1)
                took.append(time.monotonic() - started)
                assert next(iter(result.values()))["status"] == "error"

            threads = [threading.Thread(target=call) for _ in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
    finally:
        hung.close()
    assert len(took) == 6
    assert max(took) < 2.0, took  # about budget + timeout each (+ backoff), not 6 of them


def test_close_while_other_threads_send_lets_their_calls_finish(three_nodes):
    # An audit: close() shut the thread pool a running call was about to use, and its
    # send() raised RuntimeError("cannot schedule new futures after shutdown").
    import threading

    keys = keys_on_every_node(6)  # several addresses: the pool is used
    client = BlockingClient(cluster_of(three_nodes), timeout=2)
    raised: list[BaseException] = []
    answered: list[int] = []
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                answer = client.send(keys, 1)
            except BaseException as e:  # noqa: BLE001 (what the test looks for)
                raised.append(e)
                return
            answered.append(len(answer))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(100):
            client.close()
            time.sleep(0.005)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        client.close()
    assert not raised, raised[:3]
    assert answered and set(answered) == {len(keys)}


def test_a_forked_child_sends_on_connections_of_its_own(node: NodeProcess):
    # (gunicorn --preload: the client connected in the parent before the fork)
    cluster = Cluster([Node(node.sp, f"http://{node.http}")])
    key = ConnectionKey("fork", "s", "/t")
    with BlockingClient(cluster, timeout=2) as client:
        assert client.send([key], 0)[key]["status"] == "no_connection"
        child = os.fork()
        if child == 0:  # the child: one call, then out without pytest's teardown
            status = client.send([key], 1)[key]["status"]
            os._exit(0 if status == "no_connection" else 1)
        _, code = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(code) == 0
        assert client.send([key], 2)[key]["status"] == "no_connection"  # the parent's still


def test_a_hash_switch_does_not_start_the_retry_budget_again(node: NodeProcess, monkeypatch):
    # The second round of a call (its keys regrouped under the cluster's new hash
    # version) used to get a retry budget of its own: ≈ 2 x (budget + timeout) in all.
    from orbited.client import blocking

    cluster = Cluster([Node(node.sp, f"http://{node.http}")])
    starts: list[float] = []  # each round's requests' start, as the budget reads it
    real = blocking.BlockingClient._exchange_all

    def exchange_all(self, pending):  # noqa: ANN001, ANN202
        real(self, pending)
        requests = [r for rs in pending.values() for r in rs]
        starts.append(requests[0].started)
        if len(starts) == 1:  # the first round: as if the node said "another version"
            time.sleep(0.05)
            for request in requests:
                request.regroup.append(ConnectionKey("sw", "s", "/t"))

    monkeypatch.setattr(blocking.BlockingClient, "_exchange_all", exchange_all)
    with BlockingClient(cluster, timeout=1) as client:
        client.send([ConnectionKey("sw", "s", "/t")], 1)
    assert len(starts) == 2 and starts[0] == starts[1]


def test_addresses_are_talked_to_at_the_same_time(tmp_path):
    """A call's routes on several addresses: the acknowledged-mode wait (and a dead
    address's retry budget) is paid once, not once per address."""
    nodes = []
    try:
        for i in range(3):
            (tmp_path / str(i)).mkdir()
            nodes.append(NodeProcess(tmp_path / str(i)).start())
        keys = keys_on_every_node()  # no browser: each node waits out the ack time
        with BlockingClient(cluster_of(nodes), timeout=5) as client:
            started = time.monotonic()
            results = client.send(keys, 1, ack=1.0)
            took = time.monotonic() - started
        assert {r["status"] for r in results.values()} == {"unacked"}
        assert took < 2.0, took  # one wait of 1 s; one after another it was 3 s
    finally:
        for n in nodes:
            n.stop()


# -- users and sessions (hash version 2) -----------------------------------------------------

TABS = [ConnectionKey("alice", "s1", "/t1"), ConnectionKey("alice", "s1", "/t2"),
        ConnectionKey("alice", "s2", "/d1")]  # fmt: skip


def open_tabs(
    node: NodeProcess, keys: list[ConnectionKey]
) -> dict[ConnectionKey, ClientConnection]:
    sockets = {}
    for key in keys:
        sockets[key] = node.ws(node.token(key.user, key.session, key.location))
        assert json.loads(sockets[key].recv(timeout=5))["type"] == "hello"
    return sockets


def events_of(ws: ClientConnection, wait: float = 0.3) -> list[dict]:
    """Every frame ``ws`` has received until nothing comes for ``wait`` seconds."""
    frames = []
    while True:
        try:
            frames.append(json.loads(ws.recv(timeout=wait)))
        except TimeoutError:
            return [f for f in frames if f["type"] == "event"]


def test_a_user_event_reaches_each_tab_once_and_says_which(node: NodeProcess):
    cluster = Cluster([Node(node.sp, f"http://{node.http}")])
    sockets = open_tabs(node, TABS)
    every_alice = Selector("alice", None)
    with BlockingClient(cluster) as client:
        # Alice as a user, and one of her keys listed too: that tab gets it once.
        results = client.send([["alice", "*", "*"], TABS[0]], {"n": 1}, event_id="user-1")
        assert results == {
            every_alice: {"status": "matched",
                          "keys": {k: {"status": "delivered", "seq": 1} for k in TABS}},
            TABS[0]: {"status": "delivered", "seq": 1},
        }  # fmt: skip
        for ws in sockets.values():
            assert [e["data"] for e in events_of(ws)] == [{"n": 1}]
        # One session: its two tabs, not the other device; a latest-value tag on the frame.
        results = client.send([Selector("alice", "s1")], "typing", latest="typing:alice")
        assert set(results[Selector("alice", "s1")]["keys"]) == {TABS[0], TABS[1]}
        for key, ws in sockets.items():
            got = events_of(ws)
            if key.session == "s1":
                assert [(e["data"], e["seq"], e.get("latest")) for e in got] == [
                    ("typing", 2, "typing:alice")]  # fmt: skip
            else:
                assert got == []
        nobody = client.send([["nobody", "*", "*"]], 3)
        assert nobody == {Selector("nobody", None): {"status": "no_connection", "keys": {}}}
        with pytest.raises(ValueError, match="wildcard"):
            client.send([["alice", "*", "/t1"]], 4)  # refused before anything is sent
    for ws in sockets.values():
        ws.close()


def test_a_static_cluster_on_another_hash_version_is_told_so(tmp_path):
    (tmp_path / "v1").mkdir()
    node = NodeProcess(tmp_path / "v1", "--hash-version", "1").start()
    try:
        key = ConnectionKey("alice", "s1", "/t1")
        ws = node.ws(node.token(*key))
        ws.recv(timeout=5)
        with BlockingClient(Cluster([Node(node.sp, f"http://{node.http}")])) as client:
            result = client.send([key], 1)[key]  # this client routes with version 2
            assert (result["status"], result["code"], result["hash"]) == (
                "error", "hash_version_mismatch", 1)  # fmt: skip
        v1 = Cluster([Node(node.sp, f"http://{node.http}")], hash_version=1)
        with BlockingClient(v1) as client:
            assert client.send([key], 2)[key] == {"status": "delivered", "seq": 1}
            refused = client.send([Selector("alice", None)], 3)[Selector("alice", None)]
            assert refused["code"] == "hash_version_mismatch"  # never sent under version 1
        assert [e["data"] for e in events_of(ws)] == [2]
        ws.close()
    finally:
        node.stop()


# -- through HaloD's route ports (the built-in proxy data plane) ---------------------------


@pytest.fixture
def procs() -> Iterator[list[DaemonProcess]]:
    """Processes to stop after the test: HaloD with SIGTERM (its proxy worker ends with
    it), nodes with SIGKILL."""
    started: list[DaemonProcess] = []
    yield started
    for proc in reversed(started):
        if proc.alive():
            proc.stop(signal.SIGTERM if isinstance(proc, HaloDProcess) else signal.SIGKILL)


def halod_with_proxy(tmp_path, procs, *flags: str) -> tuple[HaloDProcess, HaloDCluster]:
    halod = HaloDProcess(tmp_path, "--spares", "0", "--heartbeat-interval", "0.2", *flags,
                         proxy=True).start()  # fmt: skip
    procs.append(halod)
    return halod, HaloDCluster("127.0.0.1", halod.sp_base, halod.browser_base)


def start_node(halod: HaloDProcess, tmp_path, procs, name: str) -> NodeProcess:
    node = halod.node(tmp_path, name)
    procs.append(node)
    return node


def browser(cluster: HaloDCluster, key: ConnectionKey) -> tuple[ClientConnection, str]:
    """A WebSocket through the key's route port, and the epoch of the node it reached."""
    ws = connect(cluster.browser_url(key, SECRET), open_timeout=5, legacy=True)
    hello = json.loads(ws.recv(timeout=5))
    assert hello["type"] == "hello"
    return ws, hello["stream"].split(".")[0]


def test_a_moved_reply_redials_the_route_at_once(tmp_path, procs):
    # The old node's connection stays open for move_close_delay (30 s here): resending
    # over it only gets `moved` again. The client must dial the route port afresh at once
    # (no backoff: 3 s here would show), which leads to the new owner.
    halod, hx = halod_with_proxy(tmp_path, procs, "--grace", "1", "--move-close-delay", "30")
    start_node(halod, tmp_path, procs, "n1")
    key = keys_on_routes([20])[0]  # n2 will take routes 13-24
    with BlockingClient(hx, backoff=3.0) as app:
        assert app.send([key], 0)[key] == {"status": "no_connection"}  # pooled, to n1
        n2 = start_node(halod, tmp_path, procs, "n2")
        wait_for(lambda: halod.owners()[20] == "n2" and halod.synced(), "route 20 moved to n2")
        ws, epoch = browser(hx, key)
        assert epoch == n2.epoch
        began = time.monotonic()
        results = [app.send([key], i)[key] for i in range(1, 6)]
        assert time.monotonic() - began < 2.5, "a moved reply was answered with a backoff"
    assert [r["status"] for r in results] == ["delivered"] * 5, results
    assert [json.loads(ws.recv(timeout=5))["data"] for _ in range(5)] == [1, 2, 3, 4, 5]
    ws.close()


def test_sends_through_a_crash_reach_the_new_owner_in_order(tmp_path, procs):
    # A node is killed while the web app sends to keys on its routes: no send returns
    # `error` (the retry budget spans HaloD's failover), and the browsers, reconnected to
    # the new owner, receive what it accepted in the order it was sent.
    halod, hx = halod_with_proxy(tmp_path, procs, "--grace", "0.5")
    n1 = start_node(halod, tmp_path, procs, "n1")
    n2 = start_node(halod, tmp_path, procs, "n2")
    owned = [r for r, o in halod.owners().items() if o == "n1"][:3]
    keys = keys_on_routes(owned, count=6)
    results: dict[ConnectionKey, list[tuple[int, dict]]] = {k: [] for k in keys}
    browsers: dict[ConnectionKey, ClientConnection] = {}
    with BlockingClient(hx, timeout=2.0) as app:
        for i in range(400):
            if i == 20:
                n1.stop(signal.SIGKILL)
            if i > 20 and not browsers and halod.owners()[owned[0]] == "n2" and halod.synced():
                for key in keys:  # the pages reconnect, through the same route ports
                    browsers[key], epoch = browser(hx, key)
                    assert epoch == n2.epoch
            for key, result in app.send(keys, i).items():
                results[key].append((i, result))
            if browsers and i >= 60:
                break
            time.sleep(0.01)
    assert browsers, "the routes never moved"
    for key in keys:
        statuses = {r["status"] for _, r in results[key]}
        assert statuses <= {"delivered", "no_connection"}, results[key]
        delivered = [i for i, r in results[key] if r["status"] == "delivered"]
        received = []
        while len(received) < len(delivered):
            received.append(json.loads(browsers[key].recv(timeout=5))["data"])
        assert received == delivered
        browsers[key].close()


def test_an_auto_cluster_follows_halods_hash_version_and_a_rehash(tmp_path, procs):
    # HaloD's table says version 1; the client starts at 2 ("auto"): the node's
    # hash_version_mismatch switches it and the event is resent at once, same id, to the
    # key's version-1 route. `halod rehash --to 2` then switches it back the same way.
    import subprocess
    import sys

    from tests.client.test_client_users import user_moving_between_versions

    halod, hx = halod_with_proxy(tmp_path, procs, "--hash-version", "1")
    node = start_node(halod, tmp_path, procs, "n1")  # one node: every route port leads to it
    key = user_moving_between_versions()
    ws = node.ws(node.token(*key))
    stream = json.loads(ws.recv(timeout=5))["stream"]
    with BlockingClient(hx) as app:
        assert hx.hash_version == 2 and hx.follows_hash
        assert app.send([key], "first", event_id="auto-1") == {
            key: {"status": "delivered", "seq": 1}}  # fmt: skip
        assert hx.hash_version == 1
        assert [e["data"] for e in events_of(ws)] == ["first"]  # once, not per attempt
        done = subprocess.run([sys.executable, "-m", "halod.cli", "rehash", "--to", "2",
                               "--url", f"http://{halod.status_http}"],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert done.returncode == 0, done.stderr
        # The key's route changed but stays on this node: its browser is told to come back
        # through the new route's port (docs/hashing.md, "Rehash"), its mailbox kept.
        seen = []
        with pytest.raises(ConnectionClosed):  # closed (4000) after the frame
            while True:
                seen.append(json.loads(ws.recv(timeout=5)))
        (told,) = [f for f in seen if f["type"] == "reconnect"]
        assert told["reason"] == "rehash" and told["route"] == route_of(key, 24, 2)
        # An app that addresses only users finds out too: its selectors probe version 2.
        user = Selector(key.user, None)
        wait_for(lambda: app.send([user], "probe")[user]["status"] == "matched",
                 "the node to route with 2")  # fmt: skip
        assert hx.hash_version == 2
        assert app.send([key], "after", event_id="auto-2")[key]["status"] == "queued"
        back = node.ws(node.token(*key), last=f"{stream}:1")
        hello = json.loads(back.recv(timeout=5))
        assert hello["stream"] == stream and not hello["reset"]  # the same mailbox
        *probes, last = [e["data"] for e in events_of(back)]  # the probes waited there too
        assert last == "after" and set(probes) <= {"probe"}
        back.close()
    ws.close()
