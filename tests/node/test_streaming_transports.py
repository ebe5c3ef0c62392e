"""SSE and iframe streaming against a real node (docs/protocol.md, "SSE", "iframe")."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
import urllib.request

import pynng
import pytest

from tests.conftest import NodeProcess, send_event

pytestmark = pytest.mark.slow

NASTY = {"text": "</script><script>alert(1)</script> \"q\" 'q' é ✓ \u2028 <!-- &amp;"}


class Lines:
    """Decoded (de-chunked) body of a streaming response, read line by line."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.response = response
        self.buffer = b""

    def readline(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.response.read1(65536)
            if not chunk:
                line, self.buffer = self.buffer, b""
                return line
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def rest(self) -> bytes:
        data = self.buffer + self.response.read()
        self.buffer = b""
        return data


def open_stream(node: NodeProcess, path: str, headers: dict[str, str] | None = None):
    host, port = node.http.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    response.lines = Lines(response)
    return conn, response


def sse_frames(response, count: int) -> list[tuple[str | None, dict]]:
    """Read ``count`` SSE messages as (id, frame)."""
    out, event_id, data = [], None, None
    while len(out) < count:
        line = response.lines.readline().decode("utf-8").rstrip("\n")
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
        elif line == "" and data is not None:
            out.append((event_id, data))
            event_id = data = None
    return out


def test_sse_delivers_and_resumes_with_last_event_id(node: NodeProcess):
    token = node.token("sse")
    to = [["sse", "s", "/t"]]
    conn, response = open_stream(node, f"/orbited/sse?token={token}")
    assert response.status == 200
    assert response.getheader("content-type") == "text/event-stream; charset=utf-8"
    [(_, hello)] = sse_frames(response, 1)
    assert hello["type"] == "hello"
    with node.req() as req:
        send_event(req, "s1", to, NASTY)
        send_event(req, "s2", to, 2)
        got = sse_frames(response, 2)
        assert got == [
            # the SSE id is the position; the frame's id is the event request's id
            (f"{hello['stream']}:1", {"type": "event", "seq": 1, "id": "s1", "data": NASTY}),
            (f"{hello['stream']}:2", {"type": "event", "seq": 2, "id": "s2", "data": 2}),
        ]
        conn.close()
        replies = [send_event(req, f"s{i}", to, i) for i in (3, 4)]
    # "delivered" if the node had not yet seen the close: those are replayed anyway,
    # since this client never acknowledged them.
    assert {r["results"][0]["status"] for r in replies} <= {"queued", "delivered"}
    conn, response = open_stream(node, f"/orbited/sse?token={token}", {"Last-Event-ID": got[-1][0]})
    frames = [f for _, f in sse_frames(response, 3)]
    assert frames[0]["type"] == "hello" and not frames[0]["reset"]
    assert [(f["seq"], f["data"]) for f in frames[1:]] == [(3, 3), (4, 4)]
    conn.close()


@pytest.mark.parametrize(
    "path", ["/orbited/sse", "/orbited/poll", "/orbited/iframe", "/orbited/ack"]
)
def test_head_is_refused_without_attaching(shared_node: NodeProcess, path: str):
    host, port = shared_node.http.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    token = shared_node.token("head-user")
    conn.request("HEAD", f"{path}?token={token}&timeout=0&origin=http://{shared_node.http}")
    response = conn.getresponse()
    assert response.status == 405 and b"HEAD" not in (response.getheader("allow") or "").encode()
    conn.close()
    health = json.loads(urllib.request.urlopen(f"http://{shared_node.http}/orbited/health").read())
    assert health["gauges"]["attached"] == 0


def test_sse_last_event_id_wins_over_last(shared_node: NodeProcess):
    token = shared_node.token("sse-pref")
    _, frames = shared_node.poll(f"token={token}&timeout=0")
    stream = frames[0]["stream"]
    conn, response = open_stream(
        shared_node, f"/orbited/sse?token={token}&last=garbage", {"Last-Event-ID": f"{stream}:0"}
    )
    assert response.status == 200
    [(_, hello)] = sse_frames(response, 1)
    assert hello["stream"] == stream and hello["reset"] is False
    conn.close()


def test_sse_bad_last_event_id(shared_node: NodeProcess):
    conn, response = open_stream(
        shared_node, f"/orbited/sse?token={shared_node.token('x')}", {"Last-Event-ID": "zz"}
    )
    assert response.status == 400
    assert json.loads(response.read())["error"]["code"] == "bad_position"


SCRIPT = re.compile(rb"<script>f\((.*?)\)</script>\n")


def iframe_frames(response, count: int) -> list[dict]:
    out: list[dict] = []
    buffer = b""
    while len(out) < count:
        buffer += response.lines.readline()
        for match in SCRIPT.finditer(buffer):
            literal = match.group(1)
            assert b"<" not in literal and b">" not in literal and b"&" not in literal
            out.append(json.loads(json.loads(literal)))
        buffer = SCRIPT.sub(b"", buffer)
    return out


def test_iframe_streams_escaped_frames_to_the_parent_origin(node: NodeProcess):
    origin = f"http://{node.http}"
    token = node.token("frame")
    conn, response = open_stream(node, f"/orbited/iframe?token={token}&origin={origin}")
    assert response.status == 200
    assert response.getheader("content-security-policy") == f"frame-ancestors {origin}"
    head = response.lines.readline() + response.lines.readline()
    assert b"parent.postMessage(s,t)" in head and json.dumps(origin).encode() in head
    assert len(head) > 2048  # prelude so browsers render incrementally
    assert iframe_frames(response, 1)[0]["type"] == "hello"
    with node.req() as req:
        send_event(req, "f1", [["frame", "s", "/t"]], NASTY)
    assert iframe_frames(response, 1) == [{"type": "event", "seq": 1, "id": "f1", "data": NASTY}]
    conn.close()


def test_iframe_ends_with_reconnect_after_its_byte_cap(tmp_path):
    node = NodeProcess(tmp_path, "--iframe-max-bytes", "3000").start()
    try:
        origin = f"http://{node.http}"
        conn, response = open_stream(
            node, f"/orbited/iframe?token={node.token('cap')}&origin={origin}"
        )
        response.lines.readline()
        response.lines.readline()
        with node.req() as req:
            for i in range(5):
                send_event(req, f"c{i}", [["cap", "s", "/t"]], "x" * 300)
        rest = response.lines.rest()  # the node ends the response itself
        frames = [json.loads(json.loads(m)) for m in SCRIPT.findall(rest)]
        assert frames[-1] == {"type": "reconnect", "reason": "response size limit"}
        seqs = [f["seq"] for f in frames if f["type"] == "event"]
        assert seqs and seqs == list(range(1, len(seqs) + 1)) and len(seqs) < 5
        conn.close()
        # The page reconnects from its position and gets the rest, nothing twice.
        _, polled = node.poll(
            f"token={node.token('cap')}&last={frames[0]['stream']}:{seqs[-1]}&timeout=0"
        )
        assert [f["seq"] for f in polled if f["type"] == "event"] == list(range(len(seqs) + 1, 6))
    finally:
        node.stop()


@pytest.mark.parametrize(
    "origin", ["", "http://evil.test", "ORIGIN/ https://evil.test", "ORIGIN https://evil.test"]
)
def test_iframe_needs_an_allowed_parent_origin(shared_node: NodeProcess, origin: str):
    from urllib.parse import quote

    origin = quote(origin.replace("ORIGIN", f"http://{shared_node.http}"), safe=":/")
    conn, response = open_stream(
        shared_node, f"/orbited/iframe?token={shared_node.token('o')}&origin={origin}"
    )
    assert response.status == 403
    assert json.loads(response.read())["error"]["code"] == "origin_not_allowed"


def post_ack(node: NodeProcess, query: str) -> tuple[int, bytes]:
    host, port = node.http.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request("POST", f"/orbited/ack?{query}")
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def test_sse_acknowledges_by_post_and_acknowledged_mode_replies_then(shared_node: NodeProcess):
    node = shared_node
    token = node.token("sse-ack")
    to = [["sse-ack", "s", "/t"]]
    conn, response = open_stream(node, f"/orbited/sse?token={token}")
    [(_, hello)] = sse_frames(response, 1)
    with node.req() as req:
        req.send(json.dumps({"id": "a1", "to": to, "data": 1, "ack": 10}).encode())
        [(_, event)] = sse_frames(response, 1)
        assert event["seq"] == 1
        with pytest.raises(pynng.TryAgain):  # no reply before the browser confirms
            req.recv_msg(block=False)
        assert post_ack(node, f"token={token}&last=gone.1:1") == (204, b"")  # a stale stream
        with pytest.raises(pynng.TryAgain):  # ... confirms nothing
            time.sleep(0.2)
            req.recv_msg(block=False)
        stream = hello["stream"]
        assert post_ack(node, f"token={token}&last={stream}:1") == (204, b"")
        reply = json.loads(req.recv_msg().bytes)
    assert reply["results"] == [{"status": "acked", "seq": 1}]
    conn.close()
    for query, status, code in [
        (f"token={token}&last={stream}:x", 400, "bad_position"),
        (f"token={token}&last={stream}:%C2%B2", 400, "bad_position"),  # a Unicode digit
        (f"token={token}", 400, "bad_position"),
        (f"token=forged&last={stream}:1", 401, None),
    ]:
        got, body = post_ack(node, query)
        assert got == status, query
        if code:
            assert json.loads(body)["error"]["code"] == code
    # No access log: tokens never reach the node's log.
    assert token not in node.log_file.read_text()


# -- a response carrying a reconnect frame ends its connection ----------------------------


def raw_get(node: NodeProcess, path: str) -> socket.socket:
    """An HTTP/1.1 request on a keep-alive connection, as a browser sends it."""
    host, port = node.http.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {node.http}\r\n\r\n".encode())
    return sock


def read_until_closed(sock: socket.socket, seconds: float = 3.0) -> bytes:
    """What the node sends until it closes the connection; fails if it keeps it open."""
    sock.settimeout(seconds)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except TimeoutError:
        pytest.fail(f"the node kept the connection open after: {out[-200:]!r}")
    finally:
        sock.close()
    return out


def test_a_reconnect_frame_ends_the_connection_not_only_the_response(tmp_path):
    """After a `reconnect` frame a browser's next request must go over a new TCP
    connection: one it reuses may be pinned (by an L4 data plane) to a node that no
    longer serves the route. So the node closes the connection after the frame, and a
    response whose headers are still unsent says `Connection: close`."""
    node = NodeProcess(tmp_path, "--iframe-max-bytes", "3000").start()
    try:
        origin = f"http://{node.http}"
        iframe = raw_get(node, f"/orbited/iframe?token={node.token('cap')}&origin={origin}")
        iframe.recv(1)  # the response has begun
        with node.req() as req:
            for i in range(5):
                send_event(req, f"c{i}", [["cap", "s", "/t"]], "x" * 300)
        out = read_until_closed(iframe)
        head, _, body = out.partition(b"\r\n\r\n")
        # Close-delimited (no chunks): the document ends where the connection does, so a
        # browser fires the iframe's load also when a killed node's connection ends.
        assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
        assert body.rstrip().endswith(b'response size limit\\"}")</script>'), out[-200:]

        poll = raw_get(node, f"/orbited/poll?token={node.token('lp')}&timeout=20")
        sse = raw_get(node, f"/orbited/sse?token={node.token('sse')}")
        assert sse.recv(1)
        time.sleep(0.3)  # both held
        node.stop()
        out = read_until_closed(poll)
        head, _, body = out.partition(b"\r\n\r\n")
        assert b'"reason":"shutdown"' in body and b"\r\nconnection: close" in head.lower(), out
        assert b'"reason":"shutdown"' in read_until_closed(sse)
    finally:
        node.stop()


# -- latest-value events and the per-user connection limit on every browser transport ---
# (docs/protocol.md, "Latest-value events", "Per-user limits"), against a real node.

BROWSER_TRANSPORTS = ["websocket", "sse", "poll", "iframe"]


def ws_frames_until_closed(ws) -> tuple[list[dict], int, str]:  # noqa: ANN001
    """Every frame of a node WebSocket until its close: (frames, close code, reason)."""
    from websockets.exceptions import ConnectionClosed

    frames = []
    try:
        while True:
            frames.append(json.loads(ws.recv(timeout=5)))
    except ConnectionClosed as e:
        assert e.rcvd is not None, "the node dropped the connection without a close frame"
        return frames, e.rcvd.code, e.rcvd.reason


def frames_over(node: NodeProcess, transport: str, query: str, count: int) -> list[dict]:
    """The first ``count`` frames a browser gets over ``transport`` (``query``: token,
    last); the connection is closed after."""
    if transport == "websocket":
        ws = node.ws(query.split("token=")[1].split("&")[0],
                     query.split("last=")[1] if "last=" in query else None)  # fmt: skip
        try:
            return [json.loads(ws.recv(timeout=5)) for _ in range(count)]
        finally:
            ws.close()
    if transport == "poll":
        status, frames = node.poll(f"{query}&timeout=0")
        assert status == 200, frames
        return frames[:count]  # type: ignore[index]
    extra = f"&origin=http://{node.http}" if transport == "iframe" else ""
    conn, response = open_stream(node, f"/orbited/{transport}?{query}{extra}")
    try:
        assert response.status == 200
        if transport == "sse":
            return [frame for _, frame in sse_frames(response, count)]
        response.lines.readline()  # the document's head
        response.lines.readline()
        return iframe_frames(response, count)
    finally:
        conn.close()


@pytest.mark.parametrize("transport", BROWSER_TRANSPORTS)
def test_a_resuming_browser_gets_the_newest_latest_value_event_and_no_gap(
    shared_node: NodeProcess, transport: str
):
    """Three events with one tag while the browser is away: it resumes to the newest,
    with ``latest`` and ``replaced`` (2), and no ``gap`` for the seqs it skips; an
    untagged event in between is kept."""
    user = f"latest-{transport}"
    token = shared_node.token(user)
    status, hello = shared_node.poll(f"token={token}&timeout=0")  # the mailbox, then away
    stream = hello[0]["stream"]  # type: ignore[index]
    to = [[user, "s", "/t"]]
    with shared_node.req() as req:
        for i, tag in enumerate(["price:AAPL", "price:AAPL", None, "price:AAPL"], 1):
            request = {"id": f"p{i}", "to": to, "data": i}
            if tag:
                request["latest"] = tag
            req.send(json.dumps(request).encode())
            reply = json.loads(req.recv_msg().bytes)
            assert reply["results"][0]["status"] == "queued", reply
    frames = frames_over(shared_node, transport, f"token={token}&last={stream}:0", 3)
    assert frames[0]["type"] == "hello"
    assert frames[1:] == [
        {"type": "event", "seq": 3, "id": "p3", "data": 3},
        {"type": "event", "seq": 4, "id": "p4", "latest": "price:AAPL", "replaced": 2, "data": 4},
    ]


@pytest.fixture(scope="module")
def limited_node(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    proc = NodeProcess(tmp_path_factory.mktemp("limited"), "--linger", "5",
                       "--user-max-connections", "2")  # fmt: skip
    proc.start()
    yield proc
    proc.stop()


@pytest.mark.parametrize("transport", BROWSER_TRANSPORTS)
def test_a_third_connection_of_a_user_limited_to_2_is_refused(
    limited_node: NodeProcess, transport: str
):
    """refuse policy: HTTP 429 ``user_limit`` (SSE, poll, iframe: before any stream) or
    WebSocket close 4429; the user's two connections go on, other users are not
    affected, and a new transport for an attached key is not refused."""
    node = limited_node
    user = f"limit-{transport}"
    first = node.ws(node.token(user, "s1"))
    second = node.ws(node.token(user, "s2"))
    try:
        assert json.loads(first.recv(timeout=5))["type"] == "hello"
        assert json.loads(second.recv(timeout=5))["type"] == "hello"
        token = node.token(user, "s3")
        if transport == "websocket":
            frames, code, reason = ws_frames_until_closed(node.ws(token))
            assert (frames, code) == ([], 4429)
            assert reason == "user_limit: at most 2 connections per user"
        else:
            extra = f"&origin=http://{node.http}" if transport == "iframe" else ""
            path = "poll" if transport == "poll" else transport
            conn, response = open_stream(node, f"/orbited/{path}?token={token}&timeout=0{extra}")
            assert response.status == 429
            assert response.getheader("content-type") == "application/json"
            assert json.loads(response.read()) == {
                "error": {"code": "user_limit", "message": "at most 2 connections per user"}
            }
            conn.close()
        status, frames = node.poll(f"token={node.token(user + '-other', 's3')}&timeout=0")
        assert status == 200
        again = node.ws(node.token(user, "s2"))  # the same key: replaces, not refused
        assert json.loads(again.recv(timeout=5))["type"] == "hello"
        again.close()
        with node.req() as req:  # the first is still there
            reply = send_event(req, f"after-{transport}", [[user, "s1", "/t"]], 1)
        assert reply["results"][0]["status"] == "delivered"
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("transport", BROWSER_TRANSPORTS)
def test_close_oldest_ends_the_users_oldest_connection_with_4003(tmp_path, transport: str):
    node = NodeProcess(tmp_path, "--user-max-connections", "1",
                       "--user-limit-policy", "close_oldest").start()  # fmt: skip
    try:
        closed = {"type": "closed", "code": 4003, "reason": "displaced"}
        token = node.token("old", "s1")
        if transport == "websocket":
            ws = node.ws(token)
            assert json.loads(ws.recv(timeout=5))["type"] == "hello"
            newer = node.ws(node.token("old", "s2"))
            frames, code, reason = ws_frames_until_closed(ws)
            assert (frames, code) == ([], 4003)
            assert reason == "displaced: a newer connection of this user took its place"
            newer.close()
        elif transport == "poll":
            held = raw_get(node, f"/orbited/poll?token={token}&timeout=20")
            time.sleep(0.3)  # held
            newer = node.ws(node.token("old", "s2"))
            out = b""
            while b"]" not in out:  # a JSON array, the whole answer
                out += held.recv(65536)
            head, _, body = out.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            frames = json.loads(body)
            assert frames[0]["type"] == "hello" and frames[1:] == [closed]
            held.close()
            newer.close()
        else:
            extra = f"&origin=http://{node.http}" if transport == "iframe" else ""
            conn, response = open_stream(node, f"/orbited/{transport}?token={token}{extra}")
            if transport == "sse":
                assert sse_frames(response, 1)[0][1]["type"] == "hello"
            else:
                response.lines.readline()
                response.lines.readline()
                assert iframe_frames(response, 1)[0]["type"] == "hello"
            newer = node.ws(node.token("old", "s2"))
            if transport == "sse":
                assert sse_frames(response, 1)[0][1] == closed
            else:
                assert iframe_frames(response, 1)[0] == closed
            assert response.lines.rest() == b""  # and the response ended
            conn.close()
            newer.close()
    finally:
        node.stop()
