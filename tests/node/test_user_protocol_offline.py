"""The offline hook end to end (docs/protocol.md, "Offline webhooks"): a real node
process, the web app a real nng REQ socket (pynng), a local HTTP receiver for the
webhook that checks each signature, and browsers on real transports (WebSocket acks,
long-poll `last`) acknowledging or not."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.conftest import SECRET, NodeProcess

pytestmark = pytest.mark.slow


class Receiver:
    """The web app's webhook endpoint: records every batch and whether it was signed."""

    def __init__(self, refuse: int = 0) -> None:
        self.batches: list[dict[str, Any]] = []
        self.bad = 0  # unsigned, wrongly signed, or not JSON
        self.refuse = refuse  # the first POSTs answered 503 (and not recorded)
        self.refused: list[bytes] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
                signature = self.headers.get("x-orbited-signature", "")
                if not hmac.compare_digest(signature, expected) or (
                    self.headers.get("content-type") != "application/json"
                ):
                    receiver.bad += 1
                if len(receiver.refused) < receiver.refuse:
                    receiver.refused.append(body)
                    self.send_response(503)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                receiver.batches.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/offline"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[dict[str, Any]]:
        return [e for b in self.batches for e in b["events"]]

    def kinds(self) -> list[tuple[str, str]]:
        """(type, id) of every notice, in the order they came."""
        return [(e["type"], e["id"]) for e in self.events()]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def request(node: NodeProcess, doc: dict[str, Any]) -> dict[str, Any]:
    with node.req() as req:
        req.send(json.dumps(doc).encode())
        return json.loads(req.recv_msg().bytes)


@pytest.fixture
def hooked(tmp_path):
    receiver = Receiver()
    node = NodeProcess(tmp_path, "--offline-url", receiver.url, "--linger", "3").start()
    yield node, receiver
    node.stop()
    receiver.close()


def frames_until_event(ws) -> list[dict[str, Any]]:
    """hello (and anything else) up to and including the first event frame."""
    out: list[dict[str, Any]] = []
    while not out or out[-1]["type"] != "event":
        out.append(json.loads(ws.recv(timeout=5)))
    return out


def test_offline_no_connection_then_cancel_when_a_tab_opens_and_acks(hooked):
    node, receiver = hooked
    carol = ["carol", "s", "/t"]
    reply = request(node, {"id": "m-1", "to": [carol], "data": {"n": 1}, "offline": 2})
    assert reply["ok"] and reply["results"][0]["status"] == "queued"
    wait_for(lambda: len(receiver.events()) == 1)
    notice = receiver.events()[0]
    assert notice["type"] == "needs_push" and notice["reason"] == "no_connection"
    assert notice["key"] == carol and notice["id"] == "m-1" and notice["seq"] == 1
    assert receiver.batches[0]["node"] == "orbited"
    ws = node.ws(node.token("carol"))
    event = frames_until_event(ws)[-1]
    assert event["id"] == "m-1" and event["seq"] == 1 and event["data"] == {"n": 1}
    ws.send(json.dumps({"type": "ack", "seq": 1}))
    wait_for(lambda: len(receiver.events()) == 2)
    assert receiver.kinds() == [("needs_push", "m-1"), ("cancel", "m-1")]
    assert receiver.events()[1]["key"] == carol
    time.sleep(2.5)  # past the 2 s: nothing more
    assert len(receiver.events()) == 2 and receiver.bad == 0
    serials = [e["serial"] for e in receiver.events()]
    assert serials == sorted(serials) and len(set(serials)) == 2
    ws.close()
    with urllib.request.urlopen(f"http://{node.http}/orbited/health", timeout=5) as r:
        health = json.loads(r.read())
    assert (health["stats"]["offline_push"], health["stats"]["offline_cancel"]) == (1, 1)
    limits = health["limits"]
    assert (limits["offline_sent"], limits["offline_dropped"], limits["offline_watches"]) == (
        2, 0, 0,
    )  # fmt: skip


def test_offline_unacked_after_t_then_cancel_on_a_later_ack(hooked):
    node, receiver = hooked
    ws = node.ws(node.token("dave"))
    hello = json.loads(ws.recv(timeout=5))
    dave = ["dave", "s", "/t"]
    reply = request(node, {"id": "m-2", "to": [dave], "data": "x", "offline": 1})
    assert reply["results"][0]["status"] == "delivered"
    assert json.loads(ws.recv(timeout=5))["seq"] == 1  # the browser has it, but says nothing
    wait_for(lambda: len(receiver.events()) == 1)
    notice = receiver.events()[0]
    assert (notice["type"], notice["reason"], notice["seq"]) == ("needs_push", "unacked", 1)
    assert notice["stream"] == hello["stream"]
    ws.send(json.dumps({"type": "ack", "seq": 1}))
    wait_for(lambda: len(receiver.events()) == 2)
    assert receiver.kinds() == [("needs_push", "m-2"), ("cancel", "m-2")]
    ws.close()


def test_offline_acked_in_time_sends_nothing_over_long_poll(hooked):
    node, receiver = hooked
    token = node.token("erin")
    status, first = node.poll(f"token={token}&timeout=0")
    assert status == 200
    stream = first[0]["stream"]
    reply = request(node, {"id": "m-3", "to": [["erin", "s", "/t"]], "data": 3, "offline": 1.5})
    assert reply["results"][0]["status"] == "queued"  # no poll is held
    status, frames = node.poll(f"token={token}&timeout=0&last={stream}:0")
    assert [f["seq"] for f in frames if f["type"] == "event"] == [1]
    node.poll(f"token={token}&timeout=0&last={stream}:1")  # acknowledges seq 1
    time.sleep(2.5)
    assert receiver.events() == []


def test_a_wildcard_gets_one_needs_push_for_all_tabs_and_one_cancel(hooked):
    node, receiver = hooked
    tabs = [node.ws(node.token("frank", "s", f"/t{i}")) for i in (1, 2, 3)]
    for ws in tabs:
        json.loads(ws.recv(timeout=5))
    reply = request(node, {"id": "m-4", "to": [["frank", "*", "*"]], "data": 4, "offline": 1})
    result = reply["results"][0]
    assert result["status"] == "matched" and len(result["keys"]) == 3
    for ws in tabs:
        assert json.loads(ws.recv(timeout=5))["id"] == "m-4"
    wait_for(lambda: len(receiver.events()) == 1)
    notice = receiver.events()[0]
    assert notice["key"] == ["frank", "*", "*"] and notice["reason"] == "unacked"
    assert sorted(k[0][2] for k in notice["keys"]) == ["/t1", "/t2", "/t3"]
    tabs[1].send(json.dumps({"type": "ack", "seq": 1}))
    tabs[0].send(json.dumps({"type": "ack", "seq": 1}))
    wait_for(lambda: len(receiver.events()) == 2)
    time.sleep(0.5)
    assert receiver.kinds() == [("needs_push", "m-4"), ("cancel", "m-4")]
    for ws in tabs:
        ws.close()


def test_a_user_with_no_tab_is_held_pushed_and_cancelled_when_a_tab_acks(hooked):
    node, receiver = hooked
    reply = request(node, {"id": "m-5", "to": [["gina", "*", "*"]], "data": 5, "offline": 2})
    assert reply["results"][0] == {"status": "no_connection", "keys": [], "held": True}
    wait_for(lambda: len(receiver.events()) == 1)
    notice = receiver.events()[0]
    assert (notice["key"], notice["reason"], notice["keys"]) == (
        ["gina", "*", "*"], "no_connection", [],
    )  # fmt: skip
    ws = node.ws(node.token("gina", "phone", "/app"))
    event = frames_until_event(ws)[-1]
    assert event["id"] == "m-5"
    ws.send(json.dumps({"type": "ack", "seq": event["seq"]}))
    wait_for(lambda: len(receiver.events()) == 2)
    assert receiver.kinds() == [("needs_push", "m-5"), ("cancel", "m-5")]
    ws.close()


def test_a_resend_fires_nothing_twice(hooked):
    node, receiver = hooked
    doc = {"id": "m-6", "to": [["hank", "s", "/t"]], "data": 6, "offline": 1}
    first = request(node, doc)
    again = request(node, doc)
    assert again["results"] == first["results"] and again.get("duplicate") is True
    time.sleep(2)
    assert receiver.kinds() == [("needs_push", "m-6")]


def test_a_mailbox_expiring_unacknowledged_sends_expired(hooked):
    node, receiver = hooked
    ws = node.ws(node.token("ivy"))
    json.loads(ws.recv(timeout=5))
    request(node, {"id": "m-7", "to": [["ivy", "s", "/t"]], "data": 7, "offline": 60})
    json.loads(ws.recv(timeout=5))
    ws.close()  # gone: the mailbox expires after linger (3 s), long before 60 s
    wait_for(lambda: len(receiver.events()) == 1, timeout=10)
    assert receiver.events()[0]["reason"] == "expired"
    time.sleep(0.5)
    assert len(receiver.events()) == 1


def test_offline_needs_the_hook_configured(tmp_path):
    node = NodeProcess(tmp_path).start()
    try:
        reply = request(node, {"id": "x", "to": [["a", "", ""]], "data": 1, "offline": True})
        assert not reply["ok"] and reply["error"]["code"] == "bad_request"
        assert "offline hook not configured" in reply["error"]["message"]
    finally:
        node.stop()


def test_bad_offline_values_are_bad_request(hooked):
    node, receiver = hooked
    for bad in (0, -1, False, None, "30", 86401, [1]):
        reply = request(node, {"id": "b", "to": [["a", "", ""]], "data": 1, "offline": bad})
        assert not reply["ok"] and reply["error"]["code"] == "bad_request", bad
    time.sleep(0.3)
    assert receiver.events() == []


def test_a_refused_post_is_retried_with_the_same_signed_batch(tmp_path):
    receiver = Receiver(refuse=2)
    node = NodeProcess(
        tmp_path, "--offline-url", receiver.url, "--offline-backoff", "0.2",
        "--offline-retries", "3",
    ).start()  # fmt: skip
    try:
        request(node, {"id": "r-1", "to": [["jo", "", ""]], "data": 1, "offline": True})
        wait_for(lambda: len(receiver.events()) == 1)
        assert receiver.kinds() == [("needs_push", "r-1")] and receiver.bad == 0
        assert [json.loads(b) for b in receiver.refused] == receiver.batches * 2
    finally:
        node.stop()
        receiver.close()


def test_offline_true_waits_the_nodes_offline_after(tmp_path):
    receiver = Receiver()
    node = NodeProcess(tmp_path, "--offline-url", receiver.url, "--offline-after", "1").start()
    try:
        ws = node.ws(node.token("max"))
        json.loads(ws.recv(timeout=5))
        sent = time.monotonic()
        request(node, {"id": "n-1", "to": [["max", "s", "/t"]], "data": 1, "offline": True})
        json.loads(ws.recv(timeout=5))  # delivered, never acknowledged
        wait_for(lambda: len(receiver.events()) == 1, timeout=10)
        assert time.monotonic() - sent >= 1  # not before offline_after (not the 30 s default)
        assert receiver.events()[0]["reason"] == "unacked"
        ws.close()
    finally:
        node.stop()
        receiver.close()


def test_a_replaced_event_hands_its_push_to_the_newest(hooked):
    """Latest-value: p-2 replaces p-1 in a mailbox nobody reads. p-1's needs_push is
    cancelled and p-2 is the one that needs a push; a tab then gets only p-2, and its
    ack cancels p-2."""
    node, receiver = hooked
    key = ["lee", "s", "/t"]
    request(node, {"id": "p-1", "to": [key], "data": 1, "latest": "px", "offline": 1})
    wait_for(lambda: len(receiver.events()) == 1)
    request(node, {"id": "p-2", "to": [key], "data": 2, "latest": "px", "offline": 1})
    wait_for(lambda: len(receiver.events()) == 3)
    assert receiver.kinds() == [("needs_push", "p-1"), ("cancel", "p-1"), ("needs_push", "p-2")]
    assert receiver.events()[2]["seq"] == 2
    ws = node.ws(node.token("lee"))
    event = frames_until_event(ws)[-1]
    assert (event["id"], event["seq"]) == ("p-2", 2)
    ws.send(json.dumps({"type": "ack", "seq": 2}))
    wait_for(lambda: len(receiver.events()) == 4)
    assert receiver.kinds()[3] == ("cancel", "p-2")
    ws.close()


def test_a_held_event_whose_tab_left_unacknowledged_leaves_no_watch_behind(tmp_path):
    """The hold reached a tab, which closed without acknowledging: once its mailbox and
    the hold are gone, nothing is watched any more (and nothing more is sent)."""
    receiver = Receiver()
    node = NodeProcess(
        tmp_path, "--offline-url", receiver.url, "--linger", "1", "--user-hold", "2"
    ).start()
    try:
        request(node, {"id": "h-1", "to": [["kim", "*", "*"]], "data": 1, "offline": 60})
        ws = node.ws(node.token("kim"))
        assert frames_until_event(ws)[-1]["id"] == "h-1"
        ws.close()  # no ack
        time.sleep(3.5)  # the mailbox (1 s) and the hold (2 s) are gone
        with urllib.request.urlopen(f"http://{node.http}/orbited/health", timeout=5) as r:
            limits = json.loads(r.read())["limits"]
        assert limits["offline_watches"] == 0
        assert receiver.kinds() == [("needs_push", "h-1")]
    finally:
        node.stop()
        receiver.close()


def test_a_planned_move_hands_the_watch_over_and_the_new_owner_cancels(tmp_path):
    """n1 sent needs_push for an event of a key nobody reads; n2 joins and takes the
    key's route (a planned move, mailboxes handed over). The browser resumes on n2 and
    acknowledges: the cancel comes from n2, and n1 says nothing more."""
    import pynng
    from websockets.sync.client import connect

    from orbited.client import HaloDCluster
    from tests.conftest import HaloDProcess, keys_on_routes

    receiver = Receiver()
    halod = HaloDProcess(tmp_path, "--spares", "0", "--grace", "2", "--heartbeat-interval",
                         "0.2", "--move-close-delay", "0.5", "--proxy-on-exit", "stop",
                         proxy=True).start()  # fmt: skip
    nodes = []
    try:
        nodes.append(halod.node(tmp_path, "n1", "--offline-url", receiver.url))
        cluster = HaloDCluster("127.0.0.1", halod.sp_base, halod.browser_base)
        (key,) = keys_on_routes([20])  # route 20 goes to n2 when it joins
        ws = connect(cluster.browser_url(key, SECRET), open_timeout=5, legacy=True)
        stream = json.loads(ws.recv(timeout=5))["stream"]
        ws.close()  # the key's mailbox lingers on n1
        host, port = cluster.sp_address(20)
        with pynng.Req0(dial=f"tcp://{host}:{port}", recv_timeout=5000) as req:
            doc = {"id": "mv-1", "to": [key.to_json()], "data": 1, "offline": 1}
            req.send(json.dumps(doc).encode())
            assert json.loads(req.recv_msg().bytes)["results"][0]["status"] == "queued"
        wait_for(lambda: len(receiver.events()) == 1)
        assert receiver.batches[0]["node"] == "n1"
        assert receiver.events()[0]["reason"] == "unacked"
        nodes.append(halod.node(tmp_path, "n2", "--offline-url", receiver.url))
        wait_for(lambda: halod.owners().get(20) == "n2")
        ws = None
        deadline = time.monotonic() + 10
        while ws is None:  # until the route port leads to n2 with the mailbox
            try:
                url = cluster.browser_url(key, SECRET) + f"&last={stream}:0"
                ws = connect(url, open_timeout=5, legacy=True)
                hello = json.loads(ws.recv(timeout=5))
                if hello.get("type") != "hello" or hello["stream"] != stream:
                    ws.close()
                    ws = None
            except Exception:
                ws = None
            if ws is None:
                assert time.monotonic() < deadline, "no resume on n2"
                time.sleep(0.2)
        event = json.loads(ws.recv(timeout=5))
        assert (event["id"], event["seq"]) == ("mv-1", 1)
        ws.send(json.dumps({"type": "ack", "seq": 1}))
        wait_for(lambda: len(receiver.events()) == 2)
        assert receiver.kinds() == [("needs_push", "mv-1"), ("cancel", "mv-1")]
        assert receiver.batches[-1]["node"] == "n2"
        time.sleep(1.5)
        assert len(receiver.events()) == 2 and receiver.bad == 0
        ws.close()
    finally:
        for proc in reversed(nodes):
            proc.stop()
        halod.stop()
        receiver.close()
