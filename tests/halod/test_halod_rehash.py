"""HaloD's hash version and ``POST /rehash`` with a real HaloD process (docs/halod.md,
"Rehash"): a new table is version 2 and says so everywhere; a node that does not speak the
table's version is refused with ``unsupported_hash``; a rehash is refused (409) while a
member cannot take it or one runs, is saved before any node hears of it, and reaches every
member. Nodes here are real nng (pynng) control clients, so each step is seen on the wire."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import pynng
import pytest

from tests.conftest import HaloDProcess, moved_frame, next_frame, wait_for

pytestmark = pytest.mark.slow

# Long heartbeats: the pynng members below do not beat, and must stay members.
TIMING = ("--heartbeat-interval", "30", "--missed-heartbeats", "3", "--grace", "1")


@pytest.fixture
def procs():
    started: list[Any] = []
    yield started
    for proc in reversed(started):  # HaloD (--proxy-on-exit stop) ends its proxy worker
        if proc.alive():
            proc.stop(signal.SIGTERM if isinstance(proc, HaloDProcess) else signal.SIGKILL)


def start_halod(tmp_path, procs, *flags) -> HaloDProcess:
    halod = HaloDProcess(tmp_path, *TIMING, *flags).start()
    procs.append(halod)
    return halod


class Member:
    """A node's control connection, by hand: register, then read what HaloD sends."""

    def __init__(self, halod: HaloDProcess, name: str, hashes: list[int] | None = (1, 2)):
        self.pair = pynng.Pair0(dial=halod.control, recv_timeout=5000)
        msg = {"type": "register", "version": 1, "name": name, "browser": "127.0.0.1:1",
               "sp": "tcp://127.0.0.1:2", "capacity": 1}  # fmt: skip
        if hashes is not None:
            msg["hashes"] = list(hashes)
        self.pair.send(json.dumps(msg).encode())
        self.first = self.recv()

    def recv(self) -> dict:
        return json.loads(self.pair.recv())

    def next(self, kind: str) -> dict:
        while (msg := self.recv())["type"] != kind:
            pass
        return msg

    def close(self):
        self.pair.close()


def post(halod: HaloDProcess, path: str, body: object, **headers: str) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://{halod.status_http}{path}", data, headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def text(halod: HaloDProcess, page: str, accept: str = "") -> str:
    request = urllib.request.Request(f"http://{halod.status_http}/{page}",
                                     headers={"Accept": accept} if accept else {})  # fmt: skip
    with urllib.request.urlopen(request, timeout=5) as r:
        return r.read().decode()


def saved_hash_version(halod: HaloDProcess) -> int:
    db = sqlite3.connect(halod.db)
    try:
        body = json.loads(db.execute("SELECT body FROM snapshot").fetchone()[0])
    finally:
        db.close()
    return body.get("hash_version", 1)


def first_hello(open_ws) -> dict:
    """The hello of a key's owner, once it serves the key: a node hears its assignment a
    moment after HaloD's /status shows it (then it answers reconnect: try again)."""
    frames: list[dict] = []

    def hello() -> bool:
        with open_ws() as browser:
            frames.append(json.loads(browser.recv(timeout=5)))
        return frames[-1]["type"] == "hello"

    wait_for(hello, "the key's owner to serve it")
    return frames[-1]


def halod_cli(halod, *args):
    return subprocess.run(
        [sys.executable, "-m", "halod.cli", *args, "--url", f"http://{halod.status_http}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def table_changes(halod) -> int:
    with urllib.request.urlopen(f"http://{halod.status_http}/metrics", timeout=5) as r:
        text = r.read().decode()
    return int(next(line.split()[1] for line in text.splitlines()
                    if line.startswith("halod_table_changes_total ")))  # fmt: skip


def test_a_new_table_is_version_2_everywhere_and_refuses_nodes_without_it(tmp_path, procs):
    halod = start_halod(tmp_path, procs)
    old = Member(halod, "old", hashes=None)  # an older node: no `hashes`, version 1 only
    assert old.first["type"] == "error" and old.first["code"] == "unsupported_hash"
    assert "version 2" in old.first["message"]
    only1 = Member(halod, "only1", hashes=[1])
    assert only1.first["code"] == "unsupported_hash"
    a = Member(halod, "a")
    assert a.first["type"] == "welcome" and a.first["hash_version"] == 2
    assert set(halod.nodes()) == {"a"}
    status = halod.get("status")
    assert status["hash_version"] == 2 and status["rehash"] is None
    assert status["nodes"][0]["hashes"] == [1, 2]
    assert halod.get("routes")["hash_version"] == 2
    assert "\nhalod_hash_version 2\n" in text(halod, "metrics")
    assert "hash version <b>2</b>" in text(halod, "status", "text/html")
    table = halod_cli(halod, "status")
    assert "hash version 2" in table.stdout and "HASHES" in table.stdout
    assert saved_hash_version(halod) == 2
    # Already version 2: nothing to do, nobody is told.
    assert post(halod, "/rehash", {"hash_version": 2}) == (
        200,
        {"hash_version": 2, "previous": 2, "nodes": []},
    )
    assert "already hashes with version 2" in halod_cli(halod, "rehash", "--to", "2").stdout
    with pytest.raises(urllib.error.HTTPError) as get:  # an operator action: POST only
        urllib.request.urlopen(f"http://{halod.status_http}/rehash", timeout=5)
    assert get.value.code == 405 and get.value.headers["allow"] == "POST"
    for member in (old, only1, a):
        member.close()


def test_rehash_from_version_1_is_saved_then_sent_to_every_member(tmp_path, procs):
    halod = start_halod(tmp_path, procs, "--hash-version", "1", "--spares", "0")
    a, b = Member(halod, "a"), Member(halod, "b")
    assert "hash_version" not in a.first  # version 1: the wire of an older HaloD
    old = Member(halod, "old", hashes=None)  # an older node is welcome in a version-1 table
    assert old.first["type"] == "welcome"
    assert halod.get("status")["hash_version"] == 1 and saved_hash_version(halod) == 1

    # A member that speaks only version 1 blocks the move.
    code, body = post(halod, "/rehash", {"hash_version": 2})
    assert code == 409 and body["error"]["code"] == "rehash_unsupported"
    assert "old" in body["error"]["message"]
    refused = halod_cli(halod, "rehash", "--to", "2")
    assert refused.returncode == 1 and "old" in refused.stderr
    # Bad requests change nothing.
    for bad in ({"hash_version": 3}, {"hash_version": "2"}, {"to": 2}, [2], b"{", b"x" * 1024):
        code, body = post(halod, "/rehash", bad)
        assert code == 400 and body["error"]["code"] == "bad_request", bad
    code, body = post(halod, "/rehash", b"x" * 1025)  # over the port's body limit
    assert code == 413 and body["error"]["code"] == "body_too_large"
    for header in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        code, body = post(halod, "/rehash", {"hash_version": 2}, **header)
        assert code == 403 and body["error"]["code"] == "cross_site"
    assert halod.get("status")["hash_version"] == 1

    old.close()
    wait_for(lambda: "old" not in halod.nodes(), "old to be failed after it closed")
    version_before = halod.get("status")["table_version"]
    changes_before = table_changes(halod)
    done = halod_cli(halod, "rehash", "--to", "2")
    assert done.returncode == 0, done.stderr
    assert "hash version 1 -> 2: 2 nodes told to rehash" in done.stdout
    # A saved table change like any other (before, counted nowhere: an audit): the
    # counter and the dashboard's timeline have it.
    assert table_changes(halod) == changes_before + 1
    newest = halod.get("dashboard/state")["timeline"][0]
    assert (newest["kind"], newest["reason"]) == ("rehash", "hash version 1 -> 2")
    assert newest["table_version"] == halod.get("status")["table_version"] > version_before
    owners = {int(r): o["name"] for r, o in halod.get("routes")["owners"].items()}
    for member in (a, b):
        rehash = member.next("rehash")
        # Saved before any node heard of it: the database already holds version 2.
        assert saved_hash_version(halod) == 2
        assert rehash["hash_version"] == 2 and rehash["version"] > version_before
        assert {m["route"]: m["name"] for m in rehash["owners"]} == owners
        assert len(rehash["owners"]) == 24
    status = halod.get("status")
    assert status["hash_version"] == 2 and status["table_version"] == rehash["version"]
    # The hand-offs of a to b and b to a are due: a second rehash waits for them.
    assert status["rehash"] == {"hash_version": 2, "pending": [["a", "b"], ["b", "a"]]}
    code, body = post(halod, "/rehash", {"hash_version": 1})
    assert code == 409 and body["error"]["code"] == "rehash_in_progress"
    for sender, receiver in ((a, "b"), (b, "a")):
        routes = [r for r, name in owners.items() if name == receiver]
        sender.pair.send(json.dumps({"type": "handoff", "to": receiver, "done": routes,
                                     "mailboxes": []}).encode())  # fmt: skip
    assert a.next("handoff")["done"] == [r for r, n in owners.items() if n == "a"]
    wait_for(lambda: halod.get("status")["rehash"] is None, "the rehash to complete")
    # A node registering now gets version 2, and a restart keeps it.
    c = Member(halod, "c")
    assert c.first["hash_version"] == 2
    halod.stop()
    halod.start()
    assert halod.get("status")["hash_version"] == 2
    for member in (a, b, c):
        member.close()


# -- end to end: real nodes move their queued events to the version-2 owners ---------------


def test_rehash_moves_queued_events_to_the_new_owners_losing_nothing(tmp_path, procs):
    from websockets.sync.client import connect

    from orbited.core.hashing import route_of
    from orbited.core.keys import ConnectionKey
    from tests.conftest import send_event

    halod = HaloDProcess(tmp_path, "--hash-version", "1", "--spares", "1", "--grace", "2",
                         "--heartbeat-interval", "0.2").start()  # fmt: skip
    procs.append(halod)
    nodes = {}
    for name in ("a", "s", "b"):  # s: the spare, told too
        nodes[name] = halod.node(tmp_path, name, "--linger", "60")
        procs.append(nodes[name])
    owners = halod.owners()

    def owner(key, version):
        return owners[route_of(key, 24, version=version)]

    movers, stayers = [], []
    i = 0
    while len(movers) < 3 or len(stayers) < 1:
        key = ConnectionKey(f"user{i}", f"s{i % 2}", "/t")
        (movers if owner(key, 1) != owner(key, 2) else stayers).append(key)
        i += 1
    keys = movers[:3] + stayers[:1]

    def ws(node, key, last=None):
        url = f"ws://{node.http}/orbited/ws?token={node.token(*key)}"
        return connect(url + (f"&last={last}" if last else ""), open_timeout=5, legacy=True)

    streams = {}
    for key in keys:  # each key gets a mailbox on its version-1 owner, then goes offline
        streams[key] = first_hello(lambda key=key: ws(nodes[owner(key, 1)], key))["stream"]
    for n in (1, 2, 3):
        for key in keys:
            with nodes[owner(key, 1)].req() as req:
                reply = send_event(req, f"e{n}-{key.user}", [list(key)], {"n": n})
            assert reply["results"][0]["status"] == "queued", reply

    # One browser of a moving key stays connected through the rehash; it has seen 1..3.
    live = movers[0]
    browser = ws(nodes[owner(live, 1)], live, last=f"{streams[live]}:0")
    got = [json.loads(browser.recv(timeout=5)) for _ in range(4)]
    assert [f.get("seq") for f in got[1:]] == [1, 2, 3]
    browser.send(json.dumps({"type": "ack", "seq": 3}))

    code, body = post(halod, "/rehash", {"hash_version": 2})
    assert code == 200 and body["nodes"] == ["a", "b", "s"]
    # Told to reconnect, with the key's route under version 2 (to find its port).
    assert moved_frame(next_frame(browser)) == {
        "type": "reconnect",
        "reason": "rehash",
        "route": route_of(live, 24, version=2),
    }
    browser.close()
    wait_for(lambda: halod.get("status")["rehash"] is None, "every hand-off to be done")
    # The live browser resumes from what it saw, on the new owner: no reset, no gap.
    with ws(nodes[owner(live, 2)], live, last=f"{streams[live]}:3") as browser:
        hello = json.loads(browser.recv(timeout=5))
        assert (hello["type"], hello["stream"], hello["seq"]) == ("hello", streams[live], 3)
        assert hello["reset"] is False
        with nodes[owner(live, 2)].req() as req:
            reply = send_event(req, "after", [list(live)], {"n": 4})["results"][0]
        assert reply == {"status": "delivered", "seq": 4}
        assert json.loads(browser.recv(timeout=5))["data"] == {"n": 4}
    # The offline ones find their three queued events there.
    for key in keys[1:]:
        new = nodes[owner(key, 2)]
        with ws(new, key, last=f"{streams[key]}:0") as browser:
            got = [json.loads(browser.recv(timeout=5)) for _ in range(4)]
        assert got[0]["type"] == "hello" and got[0]["stream"] == streams[key], key
        assert got[0]["reset"] is False
        assert [(f["seq"], f["data"]["n"]) for f in got[1:]] == [(1, 1), (2, 2), (3, 3)], key
    # The old owner of a moved key answers `moved` and names the new one; the new one
    # continues the key's sequence.
    key = movers[1]
    with nodes[owner(key, 1)].req() as req:
        moved = send_event(req, "late", [list(key)], {"n": 4})["results"][0]
    assert moved["status"] == "moved" and moved["route"] == route_of(key, 24, version=2)
    assert moved["to"] == nodes[owner(key, 2)].sp
    with nodes[owner(key, 2)].req() as req:
        assert send_event(req, "late", [list(key)], {"n": 4})["results"][0]["seq"] == 4
    metrics = text(halod, "metrics")
    assert 'halod_handoffs_total{outcome="dropped"} 0' in metrics


def test_a_web_app_sending_through_a_rehash_loses_nothing(tmp_path, procs):
    """The Python client (HaloDCluster, hash_version "auto") sends to four offline keys
    before, during and after the rehash; each key then holds every event once, in order."""
    from websockets.sync.client import connect

    from orbited.client import BlockingClient, HaloDCluster
    from orbited.core.hashing import route_of
    from orbited.core.keys import ConnectionKey

    halod = HaloDProcess(tmp_path, "--hash-version", "1", "--spares", "0", "--grace", "2",
                         "--heartbeat-interval", "0.2", "--move-close-delay", "0.5",
                         "--proxy-on-exit", "stop", proxy=True).start()  # fmt: skip
    procs.append(halod)
    nodes = {}
    for name in ("a", "b"):
        nodes[name] = halod.node(tmp_path, name, "--linger", "60")
        procs.append(nodes[name])
    owners = halod.owners()
    keys = [ConnectionKey(f"app{i}", "s", "/t") for i in range(4)]

    def ws(node, key, last=None):
        url = f"ws://{node.http}/orbited/ws?token={node.token(*key)}"
        return connect(url + (f"&last={last}" if last else ""), open_timeout=5, legacy=True)

    streams = {}
    for key in keys:  # a mailbox on the version-1 owner, then offline
        node = nodes[owners[route_of(key, 24, version=1)]]
        streams[key] = first_hello(lambda node=node, key=key: ws(node, key))["stream"]
    app = BlockingClient(HaloDCluster("127.0.0.1", halod.sp_base, halod.browser_base),
                         backoff=0.2)  # fmt: skip
    try:
        for n in range(1, 5):
            results = app.send(keys, {"n": n}, f"e{n}")
            assert all(results[k]["status"] == "queued" for k in keys), results
        assert app.cluster.hash_version == 1  # followed the cluster's version
        assert post(halod, "/rehash", {"hash_version": 2})[0] == 200
        for n in range(5, 9):  # while mailboxes are on their way
            results = app.send(keys, {"n": n}, f"e{n}")
            assert all(results[k]["status"] == "queued" for k in keys), results
        assert app.cluster.hash_version == 2
    finally:
        app.close()
    for version in (2, 1):  # and back: `halod rehash --to 1` is the same procedure
        if version == 1:
            wait_for(lambda: halod.get("status")["rehash"] is None, "the rehash to end")
            assert halod_cli(halod, "rehash", "--to", "1").returncode == 0
            wait_for(lambda: halod.get("status")["rehash"] is None, "the way back to end")
        for key in keys:  # nothing was acknowledged: all eight are still there
            new = nodes[owners[route_of(key, 24, version=version)]]
            with ws(new, key, last=f"{streams[key]}:0") as browser:
                got = [json.loads(browser.recv(timeout=5)) for _ in range(9)]
            assert got[0]["stream"] == streams[key] and got[0]["reset"] is False, key
            assert [(f["seq"], f["data"]["n"]) for f in got[1:]] == [(n, n) for n in range(1, 9)], (
                key,
                version,
            )
