"""Node limits and slow consumers (docs/operations.md, "Limits").

Sans-I/O parts with task.Clock; the rest against a real node over real sockets.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import struct
import urllib.request
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from websockets.exceptions import ConnectionClosed

from orbited.hub import Hub, HubConfig
from orbited.keys import ConnectionKey
from orbited.mailbox import MailboxLimits, Position
from orbited.sp.wire import REP, REQ, encode_header
from orbited.transports.gate import SocketGate, default_max_sockets
from orbited.transports.limits import (
    BrowserLimits,
    BrowserLimitsConfig,
    Overloaded,
    TokenBucket,
    WriteQueueWatch,
)
from tests.conftest import NodeProcess, send_event, wait_for
from tests.test_hub import RecordingSink, send

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


def limited_node(tmp_path: Path, *flags: str) -> NodeProcess:
    return NodeProcess(tmp_path, "--linger", "30", *flags).start()


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
def test_max_connections_503_and_4503_while_the_others_keep_working(tmp_path: Path):
    node = limited_node(tmp_path, "--max-connections", "2")
    try:
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
    finally:
        node.stop()


@pytest.mark.slow
def test_connect_rate_refuses_then_admits_again(tmp_path: Path):
    node = limited_node(tmp_path, "--connect-rate", "1", "--connect-burst", "3")
    try:
        token = node.token("rate")
        path = f"/orbited/poll?token={token}&timeout=0"
        statuses = [get(node, path)[0] for _ in range(3)]
        assert statuses == [200, 200, 200]
        status, headers, body = get(node, path)
        assert_overloaded(status, headers, body, "connect_rate")
        assert ws_close_code(node, token)[0] == 4503
        wait_for(lambda: get(node, path)[0] == 200, "a token to come back", timeout=15)
        assert health(node)["refused_rate"] >= 2
    finally:
        node.stop()


@pytest.mark.slow
def test_max_pending_polls(tmp_path: Path):
    node = limited_node(tmp_path, "--max-pending-polls", "2")
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
        node.stop()


@pytest.mark.slow
def test_max_sockets_closes_at_once_past_the_cap(tmp_path: Path):
    node = limited_node(tmp_path, "--max-connections", "2", "--max-sockets", "4")
    host, port = node.http.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(4)]
    try:
        wait_for(lambda: _closed_at_once(host, int(port)), "a socket past the cap to be closed")
        idle.pop().close()
        wait_for(lambda: _health_or_none(node) is not None, "room for a health request")
        counters = _health_or_none(node)
        assert counters["max_sockets"] == 4 and counters["refused_sockets"] >= 1
    finally:
        for s in idle:
            s.close()
        node.stop()


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
def test_sp_max_connections_closes_new_ones_and_nng_gets_in_later(tmp_path: Path):
    node = limited_node(tmp_path, "--sp-max-connections", "2")
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
        node.stop()


@pytest.mark.slow
def test_sp_peer_that_never_reads_is_paused_and_memory_stays_bounded(tmp_path: Path):
    node = limited_node(tmp_path)
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
        node.stop()


@pytest.mark.slow
def test_sp_max_inflight_pauses_reading_until_replies_complete(tmp_path: Path):
    node = limited_node(tmp_path, "--sp-max-inflight", "4")
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
        node.stop()
