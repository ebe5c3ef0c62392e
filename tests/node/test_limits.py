"""Node limits and slow consumers (docs/operations.md, "Limits").

Sans-I/O parts with task.Clock; the rest against a real node over real sockets.
"""

from __future__ import annotations

import http.client
import json
import re
import select
import socket
import struct
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from websockets.exceptions import ConnectionClosed

from orbited.core.keys import ConnectionKey
from orbited.node.hub import Hub, HubConfig
from orbited.node.mailbox import MailboxLimits, Position
from orbited.node.transports.gate import SocketGate, default_max_sockets
from orbited.node.transports.limits import (
    BrowserLimits,
    BrowserLimitsConfig,
    Overloaded,
    TokenBucket,
    WriteQueueWatch,
)
from orbited.sp.wire import REP, REQ, encode_header
from tests.conftest import NodeProcess, send_event, wait_for
from tests.node.test_hub import RecordingSink, send

ALICE = ConnectionKey("alice", "s", "/t")
BOB = ConnectionKey("bob", "s", "/t")


# -- node-wide mailbox bytes (sans-I/O) ---------------------------------------------------


def capped_hub(total: int) -> Hub:
    return Hub(
        Clock(),
        HubConfig(mailbox=MailboxLimits(100, 1000), mailbox_total_bytes=total, linger=5),
        epoch="ep",
    )


def test_mailbox_total_refuses_with_full_and_frees_on_ack():
    hub = capped_hub(total=30)
    alice, bob = RecordingSink(accept=False), RecordingSink(accept=False)
    hub.attach(ALICE, alice, None)
    hub.attach(BOB, bob, None)
    payload = "x" * 8  # 10 bytes of JSON
    assert send(hub, "1", [ALICE], payload)["results"] == [{"status": "queued", "seq": 1}]
    assert send(hub, "2", [BOB], payload)["results"] == [{"status": "queued", "seq": 1}]
    assert send(hub, "3", [ALICE], payload)["results"] == [{"status": "queued", "seq": 2}]
    assert hub.mailbox_bytes == 30
    # Full: refused for each recipient, nothing stored, counted.
    reply = send(hub, "4", [ALICE, BOB], payload)
    assert reply["results"] == [{"status": "full"}, {"status": "full"}]
    assert hub.stats["full"] == 2
    assert len(hub.mailbox(ALICE)) == 2 and len(hub.mailbox(BOB)) == 1
    # An ack frees room; the resent event goes in.
    hub.ack(ALICE, 2)
    assert hub.mailbox_bytes == 10
    assert send(hub, "5", [BOB], payload)["results"] == [{"status": "queued", "seq": 2}]
    assert hub.gauges()["mailbox_bytes"] == 20


def test_mailbox_total_follows_resume_expiry_and_shutdown():
    hub = capped_hub(total=1000)
    clock: Clock = hub.clock  # type: ignore[assignment]
    sink = RecordingSink()
    hub.attach(ALICE, sink, None)
    for i in range(3):
        send(hub, f"a{i}", [ALICE], "x" * 8)
    assert hub.mailbox_bytes == 30
    stream = hub.mailbox(ALICE).stream
    hub.attach(ALICE, RecordingSink(), Position(stream, 2))  # resuming acknowledges 1-2
    assert hub.mailbox_bytes == 10
    hub.attach(BOB, RecordingSink(), None)
    send(hub, "b", [BOB], "y" * 18)
    assert hub.mailbox_bytes == 30
    hub.detach(BOB, hub._slots[BOB].sink)
    clock.advance(6)  # BOB's mailbox expires
    assert hub.mailbox_bytes == 10
    hub.shutdown("shutdown")
    assert hub.mailbox_bytes == 0


def test_mailbox_total_acknowledged_mode_creates_no_mailbox_when_full():
    hub = capped_hub(total=5)
    reply = send(hub, "1", [ALICE], "x" * 8)  # no mailbox: no_connection, cap not involved
    assert reply["results"] == [{"status": "no_connection"}]
    body = json.dumps({"id": "2", "to": [list(ALICE)], "data": "x" * 8, "ack": 1})
    assert json.loads(hub.handle_request(body.encode()))["results"] == [{"status": "full"}]
    assert hub.mailbox(ALICE) is None


# -- browser limits, token bucket, slow-reader watch (sans-I/O) ---------------------------


def test_token_bucket_burst_then_rate():
    clock = Clock()
    bucket = TokenBucket(rate=2, burst=3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.wait() == 0.5
    clock.advance(0.5)
    assert bucket.take() and not bucket.take()
    clock.advance(100)  # saves up no more than the burst
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert TokenBucket(rate=0, burst=1, clock=clock).take()  # 0 = no limit


def test_browser_limits_refuse_with_overloaded_and_count():
    clock = Clock()
    limits = BrowserLimits(
        BrowserLimitsConfig(max_connections=3, max_pending_polls=1, connect_rate=1,
                            connect_burst=10),
        clock,
    )  # fmt: skip
    limits.check(poll=True)
    limits.opened(poll=True)
    with pytest.raises(Overloaded) as refused:
        limits.check(poll=True)
    assert (refused.value.status, refused.value.close_code) == (503, 4503)
    assert refused.value.code == "overloaded" and refused.value.retry_after == 5
    limits.check()
    limits.opened()
    limits.check()
    limits.opened()
    with pytest.raises(Overloaded, match="max_connections"):
        limits.check()
    limits.closed(poll=True)
    limits.check(poll=True)  # room again for both
    assert limits.snapshot() == {
        "connections": 2, "peak_connections": 3, "pending_polls": 0,
        "refused_connections": 1, "refused_rate": 0, "refused_polls": 1, "slow_closes": 0,
    }  # fmt: skip


def test_browser_limits_rate_gives_retry_after():
    clock = Clock()
    limits = BrowserLimits(BrowserLimitsConfig(connect_rate=0.25, connect_burst=1), clock)
    limits.check()
    with pytest.raises(Overloaded, match="connect_rate") as refused:
        limits.check()
    assert refused.value.retry_after == 4
    clock.advance(4)
    limits.check()
    assert limits.stats["refused_rate"] == 1


def test_write_queue_watch():
    clock = Clock()
    unsent = [0]
    slow: list[int] = []
    watch = WriteQueueWatch(100, clock, lambda: unsent[0], slow.append)
    unsent[0] = 1000  # the first write (a resume's replay) may be large
    assert not watch.wrote()
    unsent[0] = 50  # drained within the grace time: fine
    clock.advance(watch.GRACE)
    assert slow == []
    unsent[0] = 150
    assert not watch.wrote()
    clock.advance(watch.GRACE)  # still over after the grace time: slow
    assert slow == [150]
    assert watch.wrote()  # and stays so

    slow.clear()
    watch = WriteQueueWatch(100, clock, lambda: unsent[0], slow.append)
    watch.wrote()
    unsent[0] = 401  # over HARD times the limit after the first write: at once
    assert watch.wrote() and slow == [401]
    assert clock.getDelayedCalls() == []


def test_socket_gate_counts():
    gate = SocketGate(2)
    assert gate.admit()
    gate.open = 2
    assert not gate.admit() and gate.refused == 1
    assert default_max_sockets(20_000) == 18_976 and default_max_sockets(1024) == 768


# -- a real node over real sockets --------------------------------------------------------


def health(node: NodeProcess) -> dict:
    with urllib.request.urlopen(f"http://{node.http}/orbited/health", timeout=5) as r:
        return json.loads(r.read())["limits"]


@pytest.fixture
def limited_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start a node with extra flags; stopped after the test, whatever happened."""
    started: list[NodeProcess] = []

    def start(*flags: str) -> NodeProcess:
        node = NodeProcess(tmp_path, "--linger", "30", *flags).start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def get(node: NodeProcess, path: str) -> tuple[int, dict[str, str], bytes]:
    host, port = node.http.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def ws_close_code(node: NodeProcess, token: str) -> tuple[int | None, str | None]:
    ws = node.ws(token)
    try:
        while True:
            ws.recv(timeout=10)
    except ConnectionClosed as e:
        return (e.rcvd.code, e.rcvd.reason) if e.rcvd else (None, None)


def assert_overloaded(status: int, headers: dict[str, str], body: bytes, what: str) -> None:
    assert status == 503
    assert int(headers["retry-after"]) >= 1
    error = json.loads(body)["error"]
    assert error["code"] == "overloaded" and what in error["message"]


@pytest.mark.slow
def test_max_connections_503_and_4503_while_the_others_keep_working(limited_node):
    node = limited_node("--max-connections", "2")
    first, second = node.ws(node.token("a")), node.ws(node.token("b"))
    hello = json.loads(first.recv(timeout=5))
    json.loads(second.recv(timeout=5))
    code, reason = ws_close_code(node, node.token("c"))
    assert code == 4503 and reason.startswith("overloaded: node at max_connections")
    assert_overloaded(*get(node, f"/orbited/poll?token={node.token('d')}&timeout=0"),
                      "max_connections")  # fmt: skip
    assert_overloaded(*get(node, f"/orbited/sse?token={node.token('e')}"), "max_connections")
    # The connections inside the limit still work.
    with node.req() as req:
        reply = send_event(req, "m1", [["a", "s", "/t"]], "still here")
    assert reply["results"] == [{"status": "delivered", "seq": 1}]
    assert json.loads(first.recv(timeout=5)) == {
        "type": "event",
        "seq": 1,
        "id": "m1",
        "data": "still here",
    }
    assert hello["type"] == "hello"
    counters = health(node)
    assert counters["connections"] == 2 and counters["refused_connections"] == 3
    second.close()
    wait_for(lambda: health(node)["connections"] == 1, "the closed WebSocket to count out")
    third = node.ws(node.token("c"))
    assert json.loads(third.recv(timeout=5))["type"] == "hello"
    third.close()
    first.close()
    # Nothing leaks: every socket and connection counted out (the health request is one).
    wait_for(lambda: health(node)["connections"] == 0, "connections to count out")
    wait_for(lambda: health(node)["sockets"] == 1, "sockets to count out")


@pytest.mark.slow
def test_a_long_poll_session_goes_on_at_max_connections(limited_node):
    """Between two polls a session holds no connection: a node filled by WebSockets in
    that moment refused its next poll (503) and locked the session out."""
    node = limited_node("--max-connections", "2")
    token = node.token("poller")
    status, _, body = get(node, f"/orbited/poll?token={token}&timeout=0")
    assert status == 200
    position = f"{json.loads(body)[0]['stream']}:0"
    sockets = [node.ws(node.token("a")), node.ws(node.token("b"))]  # the node is full
    for ws in sockets:
        assert json.loads(ws.recv(timeout=5))["type"] == "hello"
    resumed = get(node, f"/orbited/poll?token={token}&timeout=0&last={position}")
    assert resumed[0] == 200 and json.loads(resumed[2])[0]["type"] == "hello"
    # A new poll (no position) is a new connection: refused.
    assert_overloaded(*get(node, f"/orbited/poll?token={node.token('new')}&timeout=0"),
                      "max_connections")  # fmt: skip
    for ws in sockets:
        ws.close()


@pytest.mark.slow
def test_connect_rate_refuses_then_admits_again(limited_node):
    node = limited_node("--connect-rate", "1", "--connect-burst", "3")
    token = node.token("rate")
    path = f"/orbited/poll?token={token}&timeout=0"
    first_poll = get(node, path)
    statuses = [first_poll[0]] + [get(node, path)[0] for _ in range(2)]
    assert statuses == [200, 200, 200]
    status, headers, body = get(node, path)
    assert_overloaded(status, headers, body, "connect_rate")
    assert ws_close_code(node, token)[0] == 4503
    # A session's next polls (from its position) are not new connections: they go on.
    _, _, body = first_poll
    position = f"{json.loads(body)[0]['stream']}:0"
    for _ in range(3):
        assert get(node, f"{path}&last={position}")[0] == 200
    wait_for(lambda: get(node, path)[0] == 200, "a token to come back", timeout=15)
    assert health(node)["refused_rate"] >= 2


@pytest.mark.slow
def test_only_a_real_resume_is_exempt_from_connect_rate(limited_node):
    # One token per 1000 s: the first poll takes it, so every later charge is refused.
    node = limited_node("--connect-rate", "0.001", "--connect-burst", "1")
    token = node.token("resume")
    status, _, body = get(node, f"/orbited/poll?token={token}&timeout=0")
    assert status == 200
    path = f"/orbited/poll?token={token}&timeout=0&last={json.loads(body)[0]['stream']}:0"
    assert get(node, path)[0] == 200  # goes on from its position: exempt
    # A garbage `last`, or a valid one with a token never seen (no crypto before the
    # check), is charged like a new connection, so a flood cannot claim the exemption.
    unseen = path.replace(token, node.token("unseen"))
    for forged in (path.replace(":0", "zz"), unseen, f"{path}&last=1:0"):
        assert_overloaded(*get(node, forged), "connect_rate")
    assert health(node)["refused_rate"] == 3


@pytest.mark.slow
def test_max_pending_polls(limited_node):
    node = limited_node("--max-pending-polls", "2")
    host, port = node.http.rsplit(":", 1)
    held = []
    try:
        for user in ("p1", "p2"):
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("GET", f"/orbited/poll?token={node.token(user)}&timeout=60")
            held.append(conn)
        wait_for(lambda: health(node)["pending_polls"] == 2, "two held polls")
        assert_overloaded(*get(node, f"/orbited/poll?token={node.token('p3')}&timeout=0"),
                          "max_pending_polls")  # fmt: skip
        # Streams are not polls: an SSE stream still opens.
        status, _, _ = get(node, f"/orbited/sse?token={node.token('bad')}&last=zz")
        assert status == 400  # got past the limits to the position check
        with node.req() as req:
            send_event(req, "pp", [["p1", "s", "/t"]], 1)  # answers p1's poll
        response = held[0].getresponse()
        assert [f["type"] for f in json.loads(response.read())] == ["hello", "event"]
        wait_for(lambda: health(node)["pending_polls"] == 1, "p1's poll to end")
        assert get(node, f"/orbited/poll?token={node.token('p3')}&timeout=0")[0] == 200
        assert health(node)["refused_polls"] == 1
    finally:
        for conn in held:
            conn.close()


@pytest.mark.slow
def test_max_sockets_closes_at_once_past_the_cap(limited_node):
    node = limited_node("--max-connections", "2", "--max-sockets", "4")
    host, port = node.http.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(4)]
    # Each sends the first byte of a request (a handshake in progress): the browser
    # port accepts a connection once bytes arrive (TCP_DEFER_ACCEPT); one that sends
    # nothing is accepted only after the kernel's defer timeout (tested in
    # tests/runtime/test_lean_connection.py), which would make this test's timing the
    # kernel's.
    for s in idle:
        s.sendall(b"G")
    try:
        wait_for(lambda: _closed_at_once(host, int(port)), "a socket past the cap to be closed")
        idle.pop().close()
        wait_for(lambda: _health_or_none(node) is not None, "room for a health request")
        counters = _health_or_none(node)
        assert counters["max_sockets"] == 4 and counters["refused_sockets"] >= 1
    finally:
        for s in idle:
            s.close()


def _closed_at_once(host: str, port: int) -> bool:
    """A new socket the node closes without reading it (EOF or reset, no HTTP answer)."""
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET /orbited/health HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            return s.recv(100) == b""
        except ConnectionResetError:
            return True


def _health_or_none(node: NodeProcess) -> dict | None:
    try:
        return health(node)
    except (OSError, http.client.HTTPException):
        return None


# -- SP limits ---------------------------------------------------------------------------


def sp_socket(node: NodeProcess, rcvbuf: int | None = None) -> socket.socket:
    host, port = node.sp.removeprefix("tcp://").rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)
    s.connect((host, int(port)))
    s.sendall(encode_header(REQ))
    assert recv_exactly(s, 8) == encode_header(REP)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def sp_request(request_id: int, body: dict) -> bytes:
    payload = struct.pack(">I", 0x80000000 | request_id) + json.dumps(body).encode()
    return struct.pack(">Q", len(payload)) + payload


def sp_reply(s: socket.socket) -> tuple[int, dict]:
    (length,) = struct.unpack(">Q", recv_exactly(s, 8))
    body = recv_exactly(s, length)
    return struct.unpack(">I", body[:4])[0] & 0x7FFFFFFF, json.loads(body[4:])


@pytest.mark.slow
def test_sp_max_connections_closes_new_ones_and_nng_gets_in_later(limited_node):
    node = limited_node("--sp-max-connections", "2")
    hogs = [sp_socket(node), sp_socket(node)]
    try:
        with pytest.raises((EOFError, ConnectionResetError)):
            sp_socket(node)  # closed before the node's SP header
        wait_for(lambda: health(node)["sp_refused"] >= 1, "the refusal to count")
        assert health(node)["sp_connections"] == 2
        hogs.pop().close()
        # pynng dials again on its own until a slot is free.
        with node.req() as req:
            req.send(b'{"op":"ping","id":"in"}')
            assert json.loads(req.recv_msg().bytes)["ok"] is True
        assert "sp_max_connections (2) reached" in node.log_file.read_text()
    finally:
        for s in hogs:
            s.close()


@pytest.mark.slow
def test_sp_peer_that_never_reads_is_paused_and_memory_stays_bounded(limited_node):
    node = limited_node()
    s = sp_socket(node, rcvbuf=4096)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    # Pings: ~12 MB of requests and of replies, more than the kernel buffers on the way
    # (the node's send buffer grows to tcp_wmem's 4 MiB) can absorb.
    count = 300_000
    stream = b"".join(sp_request(i, {"op": "ping", "id": str(i)}) for i in range(count))
    s.setblocking(False)
    sent = 0
    try:
        while sent < len(stream):  # send until the node stops reading
            _, writable, _ = select.select([], [s], [], 2)
            if not writable:
                break
            try:
                sent += s.send(stream[sent : sent + 65536])
            except BlockingIOError:
                continue
        assert sent < len(stream), "the node kept reading from a peer that reads nothing"
        counters = health(node)
        assert counters["sp_paused"] == 1
        # What the node holds for it: its send buffer (64 KiB) plus one read's replies.
        assert 0 < counters["sp_unsent_bytes"] < 512 * 1024
        # Now read: the node resumes and every request gets exactly one reply.
        s.setblocking(True)
        s.settimeout(10)
        received: set[int] = set()
        pending = b""
        while len(received) < count:
            readable, writable, _ = select.select([s], [s] if sent < len(stream) else [], [], 10)
            assert readable or writable, f"stalled at {len(received)} replies"
            if writable:
                sent += s.send(stream[sent : sent + 65536])
            if readable:
                pending += s.recv(1 << 20)
                while len(pending) >= 8:
                    (length,) = struct.unpack(">Q", pending[:8])
                    if len(pending) < 8 + length:
                        break
                    body, pending = pending[8 : 8 + length], pending[8 + length :]
                    request_id = struct.unpack(">I", body[:4])[0] & 0x7FFFFFFF
                    assert request_id not in received
                    received.add(request_id)
        assert received == set(range(count))
        assert health(node)["sp_paused"] == 0
    finally:
        s.close()


@pytest.mark.slow
def test_sp_max_inflight_pauses_reading_until_replies_complete(limited_node):
    node = limited_node("--sp-max-inflight", "4")
    token = node.token("ackme")
    status, _, body = get(node, f"/orbited/poll?token={token}&timeout=0")
    stream = json.loads(body)[0]["stream"]
    s = sp_socket(node)
    try:
        to = [["ackme", "s", "/t"]]
        s.sendall(b"".join(sp_request(i, {"id": f"e{i}", "to": to, "data": i, "ack": 30})
                           for i in range(6)))  # fmt: skip
        wait_for(lambda: health(node)["sp_inflight"] == 4, "four requests in flight")
        counters = health(node)
        assert counters["sp_paused"] == 1 and counters["sp_inflight"] == 4
        frames = json.loads(get(node, f"/orbited/poll?token={token}&last={stream}:0&timeout=0")[2])
        assert [f["seq"] for f in frames if f["type"] == "event"] == [1, 2, 3, 4]
        get(node, f"/orbited/poll?token={token}&last={stream}:4&timeout=0")  # acks 1-4
        replies = dict(sp_reply(s) for _ in range(4))
        assert sorted(replies) == [0, 1, 2, 3]
        assert all(r["results"][0]["status"] == "acked" for r in replies.values())
        # Reading resumed: the last two arrive, and are answered once acknowledged.
        wait_for(lambda: health(node)["sp_paused"] == 0, "reading to resume")
        frames = json.loads(get(node, f"/orbited/poll?token={token}&last={stream}:4&timeout=5")[2])
        assert [f["seq"] for f in frames if f["type"] == "event"] == [5, 6]
        get(node, f"/orbited/poll?token={token}&last={stream}:6&timeout=0")
        assert sorted(dict(sp_reply(s) for _ in range(2))) == [4, 5]
    finally:
        s.close()


# -- slow consumers ----------------------------------------------------------------------


def tiny_reader(node: NodeProcess, request: bytes) -> socket.socket:
    """A socket with a tiny receive buffer that sends ``request`` and reads nothing yet."""
    host, port = node.http.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect((host, int(port)))
    s.sendall(request)
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything until the node closes (or resets) the connection."""
    data = b""
    try:
        while chunk := s.recv(1 << 16):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def flood_until_slow(node: NodeProcess, user: str, size: int, limit: int = 3000) -> int:
    """Send events of ``size`` bytes to ``user`` until the node closed it as slow; the count."""
    data = "x" * size
    with node.req() as req:
        for n in range(1, limit + 1):
            send_event(req, f"{user}-{n}", [[user, "s", "/t"]], data)
            if n % 20 == 0 and health(node)["slow_closes"] >= 1:
                return n
    raise AssertionError(f"not closed as slow after {limit} events")


def ws_frames(data: bytes) -> tuple[list[bytes], tuple[int, str] | None]:
    """Server-to-client frames (unmasked): complete text messages, and the close frame."""
    messages, close, i = [], None, 0
    while i + 2 <= len(data):
        opcode, length, i = data[i] & 0x0F, data[i + 1] & 0x7F, i + 2
        if length == 126:
            length, i = struct.unpack(">H", data[i : i + 2])[0], i + 2
        elif length == 127:
            length, i = struct.unpack(">Q", data[i : i + 8])[0], i + 8
        if i + length > len(data):
            break  # cut off
        payload, i = data[i : i + length], i + length
        if opcode == 1:
            messages.append(payload)
        elif opcode == 8:
            close = (struct.unpack(">H", payload[:2])[0], payload[2:].decode())
    return messages, close


def resume_ws(node: NodeProcess, token: str, last: str, upto: int) -> list[dict]:
    ws = node.ws(token, last=last)
    frames = [json.loads(ws.recv(timeout=10))]
    while frames[-1].get("seq", 0) < upto or frames[-1]["type"] != "event":
        frames.append(json.loads(ws.recv(timeout=10)))
    ws.close()
    return frames


SLOW_FLAGS = ("--max-write-queue", "65536", "--mailbox-events", "10000",
              "--mailbox-bytes", "67108864")  # fmt: skip


@pytest.mark.slow
def test_slow_websocket_is_closed_4002_and_resumes_without_loss(limited_node):
    node = limited_node(*SLOW_FLAGS)
    token = node.token("slowws")
    s = tiny_reader(node, (
        f"GET /orbited/ws?token={token} HTTP/1.1\r\nHost: {node.http}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode())  # fmt: skip
    try:
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert head.startswith(b"HTTP/1.1 101")
        sent = flood_until_slow(node, "slowws", 2000)
        # Events after the close wait in the mailbox (the slow close may come with the
        # flood's last event: these make sure some are left for the resume).
        with node.req() as req:
            for n in range(sent + 1, sent + 6):
                send_event(req, f"slowws-{n}", [["slowws", "s", "/t"]], "after")
        sent += 5
        messages, close = ws_frames(read_all(s))  # the browser catches up, then sees 4002
    finally:
        s.close()
    assert close is not None and close[0] == 4002 and close[1].startswith("slow: ")
    frames = [json.loads(m) for m in messages]
    hello, events = frames[0], [f for f in frames[1:] if f["type"] == "event"]
    seen = [f["seq"] for f in events]
    assert seen == list(range(1, len(seen) + 1)) and len(seen) < sent
    # It reconnects from the last event it read: every missed one comes, in order, once.
    resumed = resume_ws(node, token, f"{hello['stream']}:{seen[-1]}", sent)
    assert resumed[0]["type"] == "hello" and resumed[0]["reset"] is False
    assert [f["seq"] for f in resumed[1:]] == list(range(seen[-1] + 1, sent + 1))
    counters = health(node)
    assert counters["slow_closes"] == 1 and counters["connections"] == 0


@pytest.mark.slow
def test_slow_websocket_with_overflowing_mailbox_gets_a_gap(limited_node):
    node = limited_node("--max-write-queue", "65536", "--mailbox-events", "50")
    token = node.token("gappy")
    s = tiny_reader(node, (
        f"GET /orbited/ws?token={token} HTTP/1.1\r\nHost: {node.http}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode())  # fmt: skip
    try:
        sent = flood_until_slow(node, "gappy", 2000)
        sent += 200  # more while it is away: the mailbox keeps only the last 50
        with node.req() as req:
            for n in range(200):
                send_event(req, f"more-{n}", [["gappy", "s", "/t"]], n)
        head, _, rest = read_all(s).partition(b"\r\n\r\n")
    finally:
        s.close()
    messages, close = ws_frames(rest)
    assert close is not None and close[0] == 4002
    frames = [json.loads(m) for m in messages]
    seen = [f["seq"] for f in frames if f["type"] == "event"]
    resumed = resume_ws(node, token, f"{frames[0]['stream']}:{seen[-1]}", sent)
    # Never silent: what the mailbox could not keep is announced as a gap.
    gap = resumed[1]
    assert gap["type"] == "gap" and gap["from"] == seen[-1] + 1
    assert [f["seq"] for f in resumed[2:]] == list(range(gap["to"] + 1, sent + 1))
    assert sent - gap["to"] == 50


@pytest.mark.slow
def test_slow_sse_reader_is_cut_and_resumes_with_last_event_id(limited_node):
    node = limited_node(*SLOW_FLAGS)
    token = node.token("slowsse")
    s = tiny_reader(node, f"GET /orbited/sse?token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    try:
        sent = flood_until_slow(node, "slowsse", 2000)
        data = read_all(s)
    finally:
        s.close()
    # What arrived before the cut: complete "id: ..." messages (chunked encoding aside).
    ids = re.findall(rb"id: ([^\r\n]+)\ndata: \{\"type\":\"event\",\"seq\":(\d+)", data)
    seqs = [int(seq) for _, seq in ids]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < sent
    last = ids[-1][0].decode() if ids else None
    host, port = node.http.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"Last-Event-ID": last} if last else {}
    conn.request("GET", f"/orbited/sse?token={token}", headers=headers)
    response = conn.getresponse()
    assert response.status == 200
    got: list[int] = []
    buffer = b""
    while not got or got[-1] < sent:
        buffer += response.read1(1 << 16)
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.startswith(b'data: {"type":"event"'):
                got.append(json.loads(line[6:])["seq"])
    conn.close()
    assert got == list(range(len(seqs) + 1, sent + 1))
    assert health(node)["slow_closes"] == 1


# -- configuration ------------------------------------------------------------------------


def test_limit_keys_are_flags_and_validated():
    import argparse

    from orbited.core.settings import ConfigError
    from orbited.node.config import NodeConfig

    parser = argparse.ArgumentParser()
    NodeConfig.add_flags(parser)
    flags = ["--max-connections", "5", "--connect-rate", "2.5",
             "--max-write-queue", "65536", "--sp-max-connections", "3"]  # fmt: skip
    args = parser.parse_args(flags)
    config = NodeConfig.load(None, {k: v for k, v in vars(args).items() if v is not None})
    limits = config.browser_limits()
    assert (limits.max_connections, limits.connect_rate, limits.max_write_queue) == (5, 2.5, 65536)
    assert config.rep_limits().max_connections == 3
    assert config.hub_config().mailbox_total_bytes == 512 * 1024 * 1024
    for bad, message in [
        ({"max_connections": 0}, "max_connections must be positive"),
        ({"connect_rate": -1.0}, "must not be negative"),
        ({"max_sockets": 10, "max_connections": 10}, "max_sockets must exceed"),
        ({"max_write_queue": 1000}, "at least 65536"),
        ({"mailbox_total_bytes": 1000}, "at least mailbox_bytes"),
        ({"sp_max_connections": 0}, "sp_max_connections must be positive"),
    ]:
        with pytest.raises(ConfigError, match=message):
            NodeConfig.load(None, bad)
