"""Presence webhooks from a real node to a real HTTP receiver (docs/protocol.md)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from orbited.core.keys import ConnectionKey
from orbited.node.presence import sign
from tests.conftest import SECRET, NodeProcess, send_event

pytestmark = pytest.mark.slow


class Receiver:
    def __init__(self) -> None:
        self.batches: list[dict] = []
        self.bad_signatures = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
                if self.headers["x-orbited-signature"] != expected:
                    receiver.bad_signatures += 1
                receiver.batches.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[tuple[str, list[str]]]:
        return [(e["type"], e["key"]) for b in self.batches for e in b["events"]]

    def close(self) -> None:
        self.server.shutdown()


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_signon_and_signoff_once_per_key_without_flapping(tmp_path):
    receiver = Receiver()
    node = NodeProcess(tmp_path, "--presence-url", receiver.url, "--linger", "1").start()
    try:
        token = node.token("pres")
        key = ["pres", "s", "/t"]
        ws = node.ws(token)
        hello = json.loads(ws.recv(timeout=5))
        wait_for(lambda: receiver.events() == [("signon", key)])
        ws.close()
        time.sleep(0.3)  # reconnect within the linger time: no signoff, no second signon
        ws = node.ws(token, last=f"{hello['stream']}:0")
        ws.recv(timeout=5)
        time.sleep(1.5)
        assert receiver.events() == [("signon", key)]
        ws.close()
        wait_for(lambda: len(receiver.events()) == 2)  # gone for good after the linger time
        assert receiver.events() == [("signon", key), ("signoff", key)]
        assert receiver.bad_signatures == 0
        serials = [e["serial"] for b in receiver.batches for e in b["events"]]
        assert serials == sorted(serials) and receiver.batches[0]["node"] == "orbited"
        with urllib.request.urlopen(f"http://{node.http}/orbited/health", timeout=5) as r:
            limits = json.loads(r.read())["limits"]
        assert (limits["presence_sent"], limits["presence_dropped"], limits["presence_queue"]) == (
            2, 0, 0,
        )  # fmt: skip
    finally:
        node.stop()
        receiver.close()


def test_a_stalled_receiver_times_out_and_later_notices_still_arrive(tmp_path):
    """The receiver answers the first POST with headers and half a body, then stalls."""
    import socket as socketlib

    listener = socketlib.create_server(("127.0.0.1", 0))
    got: list[dict] = []

    def serve():
        first = True
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))  # fmt: skip
            while len(body) < length:
                body += conn.recv(65536)
            if first:
                first = False
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
                continue  # never finish this response
            got.extend(json.loads(body)["events"])
            conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    node = NodeProcess(tmp_path, "--presence-url", url, "--presence-timeout", "1",
                       "--linger", "30").start()  # fmt: skip
    try:
        ws = node.ws(node.token("stall"))
        ws.recv(timeout=5)
        wait_for(lambda: [e["key"][0] for e in got] == ["stall"], timeout=15)  # retried
        ws2 = node.ws(node.token("later"))
        ws2.recv(timeout=5)
        wait_for(lambda: [e["key"][0] for e in got] == ["stall", "later"], timeout=15)
        ws.close()
        ws2.close()
    finally:
        node.stop()
        listener.close()


def test_down_receiver_does_not_block_dispatch(tmp_path):
    node = NodeProcess(tmp_path, "--presence-url", "http://127.0.0.1:9/hook",
                       "--presence-timeout", "2").start()  # fmt: skip
    try:
        ws = node.ws(node.token("busy"))
        ws.recv(timeout=5)
        started = time.monotonic()
        with node.req() as req:
            for i in range(20):
                assert send_event(req, f"d{i}", [["busy", "s", "/t"]], i)["ok"]
        assert time.monotonic() - started < 2
        assert [json.loads(ws.recv(timeout=5))["seq"] for _ in range(20)] == list(range(1, 21))
        ws.close()
    finally:
        node.stop()


def test_signature_helper_matches_hmac_sha256():
    body = json.dumps({"events": [{"type": "signon", "key": list(ConnectionKey("a", "", ""))}]})
    expected = hmac.new(SECRET, body.encode(), hashlib.sha256).hexdigest()
    assert sign(SECRET, body.encode()) == f"sha256={expected}"


def test_queue_is_bounded_and_drops_the_oldest():
    from twisted.internet.task import Clock

    from orbited.node.presence import PresenceConfig, PresenceNotifier

    clock = Clock()
    notifier = PresenceNotifier(PresenceConfig("http://127.0.0.1:9/", max_queue=3), SECRET,
                                "n", clock)  # fmt: skip
    notifier._agent = None  # never reached: the clock is not advanced
    for i in range(5):
        notifier.notify("signon", ConnectionKey(f"u{i}", "", ""))
    assert [e["key"][0] for e in notifier.queue] == ["u2", "u3", "u4"]
    assert notifier.dropped == 2
