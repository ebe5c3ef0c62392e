"""A real node process, the real nng (pynng) as web app, real WebSocket and HTTP clients."""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pynng
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from orbited.sp import wire
from tests.conftest import SECRET, NodeProcess, send_event

pytestmark = pytest.mark.slow


def frames_until(ws, count: int, kind: str = "event", timeout: float = 5) -> list[dict]:
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while len([f for f in got if f["type"] == kind]) < count:
        got.append(json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic()))))
    return got


def events_of(frames: list[dict]) -> list[tuple[int, object]]:
    return [(f["seq"], f["data"]) for f in frames if f["type"] == "event"]


def test_pynng_event_reaches_websocket_and_long_poll(shared_node: NodeProcess):
    node = shared_node
    ws = node.ws(node.token("ws-user"))
    hello = json.loads(ws.recv(timeout=5))
    assert hello["type"] == "hello" and hello["stream"].startswith(node.epoch)
    poll_token = node.token("poll-user")
    with ThreadPoolExecutor(1) as pool:
        polled = pool.submit(node.poll, f"token={poll_token}&timeout=10")
        deadline = time.monotonic() + 5
        to = [["ws-user", "s", "/t"], ["poll-user", "s", "/t"], ["nobody", "s", "/t"]]
        with node.req() as req:
            while True:  # wait until the poll is held by the node
                reply = send_event(req, f"probe-{time.monotonic()}", to[1:2], "probe")
                if reply["results"][0]["status"] != "no_connection" or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            reply = send_event(req, "evt-1", to, {"text": '</script>"é✓'})
        status, frames = polled.result(10)
    assert reply["ok"] and reply["id"] == "evt-1"
    assert [r["status"] for r in reply["results"]] == ["delivered", "queued", "no_connection"]
    assert status == 200 and frames[0]["type"] == "hello"
    assert events_of(frames) == [(1, "probe")]
    assert events_of(frames_until(ws, 1)) == [(1, {"text": '</script>"é✓'})]
    # The queued event is in the long-poll mailbox; the next poll gets it.
    _, frames = node.poll(f"token={poll_token}&last={frames[0]['stream']}:1&timeout=0")
    assert events_of(frames) == [(2, {"text": '</script>"é✓'})]
    ws.close()


def test_many_inflight_requests_from_nng_contexts_on_one_connection(shared_node: NodeProcess):
    node = shared_node
    ws = node.ws(node.token("ctx-user"))
    ws.recv(timeout=5)
    count = 64
    with node.req() as sock:
        contexts = [sock.new_context() for _ in range(count)]

        def one(i: int) -> dict:
            body = {"id": f"ctx-{i}", "to": [["ctx-user", "s", "/t"]], "data": i}
            contexts[i].send(json.dumps(body).encode())
            return json.loads(contexts[i].recv_msg().bytes)

        with ThreadPoolExecutor(count) as pool:
            replies = list(pool.map(one, range(count)))
        for ctx in contexts:
            ctx.close()
    assert [r["id"] for r in replies] == [f"ctx-{i}" for i in range(count)]
    assert all(r["results"][0]["status"] == "delivered" for r in replies)
    seqs = sorted(r["results"][0]["seq"] for r in replies)
    assert seqs == list(range(1, count + 1))
    got = events_of(frames_until(ws, count))
    assert sorted(data for _, data in got) == list(range(count))
    assert [seq for seq, _ in got] == list(range(1, count + 1))
    ws.close()


class ReplyDroppingProxy:
    """TCP proxy between nng and the node that swallows the first reply, so nng's REQ
    times out and resends the identical request (docs/sp.md)."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("tcp://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests_seen = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(self.upstream)
        threading.Thread(target=self._pump_requests, args=(client, server), daemon=True).start()
        threading.Thread(target=self._pump_replies, args=(server, client), daemon=True).start()

    def _pump_requests(self, src: socket.socket, dst: socket.socket) -> None:
        conn = wire.SPConnection(wire.REP, wire.REQ)
        while data := src.recv(65536):
            self.requests_seen += len(conn.receive(data))
            dst.sendall(data)

    @staticmethod
    def _pump_replies(src: socket.socket, dst: socket.socket) -> None:
        conn = wire.SPConnection(wire.REQ, wire.REP)
        dst.sendall(wire.encode_header(wire.REP))
        dropped = False
        while data := src.recv(65536):
            for body in conn.receive(data):
                if not dropped:
                    dropped = True
                    continue
                dst.sendall(wire.encode_message(body))


def test_nng_resend_does_not_deliver_twice(shared_node: NodeProcess):
    node = shared_node
    ws = node.ws(node.token("resend-user"))
    ws.recv(timeout=5)
    proxy = ReplyDroppingProxy(node.sp)
    with pynng.Req0(dial=proxy.address, resend_time=300, recv_timeout=5000) as req:
        reply = send_event(req, "once", [["resend-user", "s", "/t"]], "only once")
    assert proxy.requests_seen >= 2  # nng really did resend
    assert reply["duplicate"] is True
    assert reply["results"] == [{"status": "delivered", "seq": 1}]
    assert events_of(frames_until(ws, 1)) == [(1, "only once")]
    with pytest.raises(TimeoutError):
        ws.recv(timeout=0.5)
    ws.close()


def test_websocket_resume_gets_every_missed_event_once_in_order(node: NodeProcess):
    token = node.token("resumer")
    to = [["resumer", "s", "/t"]]
    ws = node.ws(token)
    hello = json.loads(ws.recv(timeout=5))
    with node.req() as req:
        for i in range(3):
            send_event(req, f"r{i}", to, i)
        first = events_of(frames_until(ws, 3))
        ws.close()
        time.sleep(0.2)
        replies = [send_event(req, f"r{i}", to, i) for i in range(3, 8)]
    # "delivered" if the node had not yet seen the close: those are replayed anyway,
    # since this client never acknowledged them.
    assert {r["results"][0]["status"] for r in replies} <= {"queued", "delivered"}
    ws = node.ws(token, last=f"{hello['stream']}:{first[-1][0]}")
    frames = frames_until(ws, 5)
    assert frames[0] == {**hello, "reset": False, "seq": 3}
    assert not [f for f in frames if f["type"] == "gap"]
    assert first + events_of(frames) == [(i + 1, i) for i in range(8)]
    with pytest.raises(TimeoutError):
        ws.recv(timeout=0.3)
    ws.close()


def test_long_poll_resume_and_ack(node: NodeProcess):
    token = node.token("poller")
    status, frames = node.poll(f"token={token}&timeout=0")
    assert status == 200 and frames == [frames[0]] and frames[0]["type"] == "hello"
    stream = frames[0]["stream"]
    with node.req() as req:
        for i in range(4):
            send_event(req, f"p{i}", [["poller", "s", "/t"]], i)
    _, frames = node.poll(f"token={token}&last={stream}:0")
    assert events_of(frames) == [(1, 0), (2, 1), (3, 2), (4, 3)]
    _, frames = node.poll(f"token={token}&last={stream}:2&timeout=0")
    assert events_of(frames) == [(3, 2), (4, 3)]
    _, frames = node.poll(f"token={token}&last={stream}:4&timeout=0.2")
    assert events_of(frames) == []


def test_reconnect_to_restarted_node_is_told_of_reset(node: NodeProcess):
    token = node.token("restart")
    _, frames = node.poll(f"token={token}&timeout=0")
    old_stream = frames[0]["stream"]
    node.stop()
    node.start()
    _, frames = node.poll(f"token={token}&last={old_stream}:3&timeout=0")
    assert frames[0]["reset"] is True and frames[0]["stream"] != old_stream


def test_sigterm_tells_browsers_to_reconnect(node: NodeProcess):
    ws = node.ws(node.token("bye"))
    ws.recv(timeout=5)
    assert node.stop(signal.SIGTERM) == 0
    assert json.loads(ws.recv(timeout=5)) == {"type": "reconnect", "reason": "shutdown"}
    with pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=5)
    assert info.value.rcvd.code == 4000


# -- bad input ---------------------------------------------------------------------------


def raw_sp(node: NodeProcess) -> socket.socket:
    host, port = node.sp.removeprefix("tcp://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    assert sock.recv(8) == wire.encode_header(wire.REP)
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        wire.encode_header(wire.PAIR_V0),
        wire.encode_header(wire.REQ) + struct.pack(">Q", 1 << 40),
        wire.encode_header(wire.REQ) + wire.encode_message(b"\x00\x00\x00\x01abc"),
        wire.encode_header(wire.REQ) + wire.encode_message(b"\x80"),
    ],
    ids=["http", "wrong-protocol", "oversize", "no-request-id", "short-backtrace"],
)
def test_bad_sp_input_closes_that_connection_only(shared_node: NodeProcess, garbage: bytes):
    with node_req(shared_node) as healthy:
        sock = raw_sp(shared_node)
        sock.sendall(garbage)
        assert closed_by_peer(sock)
        reply = send_event(healthy, f"after-{garbage[:6].hex()}", [["x", "", ""]], 1)
        assert reply["results"] == [{"status": "no_connection"}]


def node_req(node: NodeProcess) -> pynng.Req0:
    return node.req()


def test_pynng_with_wrong_protocol_is_refused(shared_node: NodeProcess):
    # nng itself drops the connection when the peer's protocol does not match, so a
    # Pair0 never gets a pipe to send on: its send times out.
    with pynng.Pair0(send_timeout=500, recv_timeout=500) as pair:
        pair.dial(shared_node.sp, block=False)
        with pytest.raises(pynng.Timeout):
            pair.send(b"x")
    with shared_node.req() as req:
        assert send_event(req, "still-ok", [["x", "", ""]], 1)["ok"]


def test_bad_event_requests_get_error_replies(shared_node: NodeProcess):
    with shared_node.req() as req:
        req.send(b"{nope")
        assert json.loads(req.recv_msg().bytes)["error"]["code"] == "bad_json"
        req.send(b'{"id":"e","to":[["only-two",""]],"data":1}')
        reply = json.loads(req.recv_msg().bytes)
        assert reply == {"id": "e", "ok": False, "error": reply["error"]}
        assert reply["error"]["code"] == "bad_key"


def ws_close_of(node: NodeProcess, query: str) -> tuple[int, str]:
    from websockets.sync.client import connect

    with connect(f"ws://{node.http}/orbited/ws?{query}", open_timeout=5) as ws:
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
    return info.value.rcvd.code, info.value.rcvd.reason


def test_forged_expired_and_malformed_tokens_are_refused(shared_node: NodeProcess):
    node = shared_node
    from orbited.core.keys import ConnectionKey
    from orbited.core.tokens import issue_token

    forged = issue_token(b"not-the-secret-" * 3, ConnectionKey("alice", "s", "/t"))
    expired = issue_token(SECRET, ConnectionKey("alice", "s", "/t"), ttl=1, now=time.time() - 600)
    for token, code in [
        (forged, "token_invalid"),
        (expired, "token_expired"),
        ("garbage", "token_malformed"),
        ("", "token_missing"),
    ]:
        close_code, reason = ws_close_of(node, f"token={token}")
        assert (close_code, reason.split(":")[0]) == (4401, code)
        status, body = node.poll(f"token={token}")
        assert status == 401 and body["error"]["code"] == code


@pytest.mark.parametrize(
    "extra, code",
    [("&last=nonsense", "bad_position"), ("&last=a.1:2&last=a.1:3", "bad_request")],
)
def test_bad_query_parameters(shared_node: NodeProcess, extra: str, code: str):
    token = shared_node.token("q")
    assert ws_close_of(shared_node, f"token={token}{extra}")[0] == 4400
    status, body = shared_node.poll(f"token={token}{extra}")
    assert status == 400 and body["error"]["code"] == code


@pytest.mark.parametrize("timeout", ["abc", "-1", "1e9", "nan"])
def test_bad_poll_timeout(shared_node: NodeProcess, timeout: str):
    status, body = shared_node.poll(f"token={shared_node.token('q')}&timeout={timeout}")
    assert status == 400 and body["error"]["code"] == "bad_timeout"


def test_websocket_client_sending_garbage_is_closed(shared_node: NodeProcess):
    ws = shared_node.ws(shared_node.token("chatty"))
    ws.recv(timeout=5)
    ws.send("not json")
    with pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=5)
    assert info.value.rcvd.code == 4400


def test_cross_origin_needs_the_allow_list(tmp_path):
    node = NodeProcess(tmp_path, "--cors-origin", "http://app.test:8080").start()
    try:
        token = node.token("cors")
        status, _ = node.poll(f"token={token}&timeout=0", {"Origin": "http://evil.test"})
        assert status == 403
        with pytest.raises(InvalidStatus) as info:
            node.ws(token, Origin="http://evil.test")
        assert info.value.response.status_code == 403
        import urllib.request

        request = urllib.request.Request(
            f"http://{node.http}/orbited/poll?token={token}&timeout=0",
            headers={"Origin": "http://app.test:8080"},
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "http://app.test:8080"
        ws = node.ws(token, Origin="http://app.test:8080")
        assert json.loads(ws.recv(timeout=5))["type"] == "hello"
        ws.close()
    finally:
        node.stop()


def test_token_cli_issues_tokens_the_node_accepts(shared_node: NodeProcess):
    token = subprocess.check_output(
        [
            sys.executable,
            "-m",
            "orbited.cli",
            "token",
            "--secret-file",
            str(shared_node.secret_file),
            "--user",
            "cli-user",
            "--ttl",
            "60",
        ],
        text=True,
    ).strip()
    status, frames = shared_node.poll(f"token={token}&timeout=0")
    assert status == 200 and frames[0]["type"] == "hello"


@pytest.mark.parametrize("size", [10, 125, 126, 200, 65_000])
def test_frames_of_every_length_class_reach_the_browser(shared_node: NodeProcess, size: int):
    node = shared_node
    with node.ws(node.token(f"len-{size}")) as ws:
        ws.recv(timeout=5)
        with node.req() as req:
            reply = send_event(req, f"len-{size}", [[f"len-{size}", "s", "/t"]], "x" * size)
        assert reply["results"][0]["status"] == "delivered"
        assert events_of(frames_until(ws, 1)) == [(1, "x" * size)]


def test_web_app_that_never_reads_replies_is_not_buffered_without_bound(
    shared_node: NodeProcess,
):
    """Each request gets a ~130 KB reply; a client that never reads them must see the node
    stop reading its requests (backpressure) instead of the node buffering replies."""
    body = json.dumps({"id": "big", "to": [["absent", "", ""]] * 5000, "data": 1}).encode()
    sock = raw_sp(shared_node)
    sock.sendall(wire.encode_header(wire.REQ))
    sock.setblocking(False)
    sent, request_id, deadline = 0, 0x80000000, time.monotonic() + 20
    limit = 256 * 1024 * 1024
    while sent < limit and time.monotonic() < deadline:
        message = wire.encode_message(request_id.to_bytes(4, "big") + body)
        request_id += 1
        try:
            view = memoryview(message)
            while view:
                n = sock.send(view)
                sent += n
                view = view[n:]
        except BlockingIOError:
            time.sleep(0.5)  # give the node every chance to read more
            try:
                sock.send(b"")
                n = sock.send(view)
                sent += n
                continue
            except BlockingIOError:
                break
    sock.close()
    assert sent < 64 * 1024 * 1024, f"node kept reading: {sent} bytes accepted"
    with shared_node.req() as req:
        assert send_event(req, "after-flood", [["x", "", ""]], 1)["ok"]
