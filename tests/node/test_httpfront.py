"""The browser port's lean front (orbited.node.transports.httpfront).

The request-head reader and the plan as plain values; then the front on real loopback
sockets in this process's reactor (pytest-twisted), with autobahn's WebSocket client as
the RFC 6455 oracle and raw sockets (in a thread) for keep-alive, pipelining and the
errors the front answers itself. Everything else of the browser port is tested against a
real node in tests/node/test_browser_port.py and friends."""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock

from orbited.core.keys import ConnectionKey
from orbited.core.tokens import issue_token
from orbited.node.hub import Hub, HubConfig
from orbited.node.transports.common import BrowserAuth
from orbited.node.transports.httpfront import (
    HANDOFF,
    BrowserFront,
    Head,
    HeadReader,
    Route,
    plan,
    query_args,
)
from orbited.node.transports.limits import BrowserLimits, BrowserLimitsConfig
from orbited.node.transports.wsframe import OP_CLOSE, OP_PING, OP_PONG, close_frame, mask_frame
from orbited.node.web import browser_site

SECRET = b"front-test-secret-0123456789-abcdefghijklmnop"
AUTH = BrowserAuth(SECRET)
KEY = ConnectionKey("alice", "s1", "/chat")
UPGRADE = (b"GET /orbited/ws?token=T HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n")  # fmt: skip


def read_head(data: bytes, small: int = 16384, max_headers: int = 100) -> Any:
    return HeadReader(small, max_headers).feed(data)


def test_the_hot_requests_are_read():
    head = read_head(b"GET /orbited/poll?token=a&last=b HTTP/1.1\r\nHost: h\r\n"
                     b"Origin: http://h\r\nX-Other: 1\r\n\r\n")  # fmt: skip
    assert isinstance(head, Head)
    assert head.route is Route.POLL and head.query == b"token=a&last=b"
    assert head.headers == {b"host": b"h", b"origin": b"http://h"}
    assert head.keep_alive and not head.pipelined
    closing = read_head(b"GET /orbited/sse HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert not closing.keep_alive
    ws = read_head(UPGRADE + b"\x81\x80abcd")
    assert ws.route is Route.WS and ws.rest == b"\x81\x80abcd"


@given(st.lists(st.integers(0, len(UPGRADE) + 6), max_size=6))
@settings(max_examples=50)
def test_a_head_read_in_pieces_is_the_same(cuts):
    data = UPGRADE + b"\x81\x80abcd"
    reader = HeadReader(16384, 100)
    last, got = 0, None
    for cut in sorted(cuts) + [len(data)]:
        if cut > last and got is None:
            got = reader.feed(data[last:cut])
            last = cut
    if got is not None and last < len(data):
        got = None  # the upgrade head came before the rest: compared below
    assert got is None or got == read_head(data)


@pytest.mark.parametrize(
    "data",
    [
        b"HEAD /orbited/poll HTTP/1.1\r\nHost: h\r\n\r\n",
        b"POST /orbited/poll HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx",
        b"GET /orbited/poll HTTP/1.0\r\n\r\n",
        b"GET /orbited/health HTTP/1.1\r\n\r\n",
        b"GET /orbited/poll/x HTTP/1.1\r\n\r\n",
        b"GET /orbited/%70oll HTTP/1.1\r\n\r\n",
        b"GET /orbited/poll HTTP/1.1\r\nContent-Length: 2\r\n\r\nab",
        b"GET /orbited/poll HTTP/1.1\r\nBad header\r\n\r\n",
        b"NOT HTTP\r\n\r\n",
        b"GET /orbited/sse HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
        b"GET /orbited/poll?" + b"a" * 200 + b" HTTP/1.1\r\n\r\n",  # over `small`
        b"GET /orbited/poll HTTP/1.1\r\n" + b"A: b\r\n" * 5 + b"\r\n",  # over max_headers
        b"HEAD /orbited/poll HTTP/1.1\r\n\r\nGET /orbited/poll HTTP/1.1\r\n\r\n",  # pipelined
    ],
)
def test_what_twisted_web_answers_is_handed_off(data):
    assert read_head(data, small=150, max_headers=4) is HANDOFF


def test_an_unfinished_long_head_is_handed_off_before_it_ends():
    assert read_head(b"GET /orbited/poll?" + b"a" * 100, small=50) is HANDOFF
    assert read_head(b"GET /orbited/poll?a", small=50) is None


def test_query_args_equal_twisted_webs():
    from twisted.web.http import parse_qs

    for q in [b"token=a&last=b", b"a=1&&a=2&b", b"=x&y=", b"t=%41+b", b"t=%c3%a9;u=1",
              b"x=\xc3\xa9&y", b""]:  # fmt: skip
        assert query_args(q) == parse_qs(q, 1)


def head(route: Route, query: bytes, **headers: bytes) -> Head:
    h = {k.replace("_", "-").encode(): v for k, v in headers.items()}
    return Head(route, query, h, b"", True, False)


def test_plan_hands_off_what_the_site_refuses_without_side_effects():
    assert plan(head(Route.POLL, b"token=a&token=b"), [], AUTH) is None  # repeated
    assert plan(head(Route.POLL, b"token=%ff"), [], AUTH) is None  # not UTF-8
    assert plan(head(Route.POLL, b"timeout=121"), [], AUTH) is None
    assert plan(head(Route.POLL, b"timeout=nan"), [], AUTH) is None
    assert plan(head(Route.POLL, b"", origin=b"http://evil", host=b"h"), [], AUTH) is None
    assert plan(head(Route.SSE, b"", last_event_id=b"nope"), [], AUTH) is None
    assert plan(head(Route.WS, b""), [], AUTH) is None  # not an upgrade: 426 by the Site
    ok = plan(head(Route.POLL, b"timeout=0&x=1", origin=b"http://h", host=b"h"), [], AUTH)
    assert ok is not None and ok.timeout == 0 and ok.new
    assert ok.cors.startswith(b"Access-Control-Allow-Origin: http://h\r\n")
    sse = plan(head(Route.SSE, b"last=a.1:3", last_event_id=b"b.2:4"), [], AUTH)
    assert sse is not None and str(sse.after) == "b.2:4" and "last" not in sse.params


# -- the front on real sockets ---------------------------------------------------------


class Served:
    def __init__(self, **config: Any) -> None:
        keepalive = config.pop("keepalive", 25.0)
        # The node's timers (linger, held polls, the sweep) on a clock of the test's own:
        # none of them fire here, and none is left in the reactor after the test, even
        # for a connection that closes later.
        self.clock = Clock()
        self.hub = Hub(self.clock, HubConfig(keepalive=keepalive))
        self.limits = BrowserLimits(BrowserLimitsConfig(**config), self.clock)
        site = browser_site(self.hub, AUTH, [], "t", 1 << 20, self.limits)
        self.front = BrowserFront(site, self.hub, AUTH, [], self.limits, self.clock)
        self.port = reactor.listenTCP(0, self.front, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.address = ("127.0.0.1", self.port.getHost().port)

    def token(self, key: ConnectionKey = KEY) -> str:
        return issue_token(SECRET, key)


@pytest.fixture
def served() -> Generator[Served, None, None]:
    s = Served()
    yield s
    s.port.stopListening()
    s.front.stopFactory()


def exchange(address: tuple[str, int], data: bytes, wait: float = 1.0) -> bytes:
    """Send ``data``, read until the node closes or ``wait`` seconds of silence."""
    sock = socket.create_connection(address, timeout=wait)
    sock.sendall(data)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except TimeoutError:
        out += b"<open>"
    sock.close()
    return out


def responses(data: bytes) -> list[tuple[bytes, bytes]]:
    """(head, body) of each Content-Length response in ``data``."""
    out = []
    while data.startswith(b"HTTP/1.1"):
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        out.append((head, rest[:length]))
        data = rest[length:]
    return out


def poll(token: str, extra: bytes = b"") -> bytes:
    return (b"GET /orbited/poll?token=%s&timeout=0 HTTP/1.1\r\nHost: h\r\n%s\r\n"
            % (token.encode(), extra))  # fmt: skip


@pytest_twisted.inlineCallbacks
def test_keep_alive_then_a_handed_off_request(served):
    token = served.token()
    data = yield threads.deferToThread(
        exchange, served.address,
        poll(token) + poll(token) + b"GET /orbited/health HTTP/1.1\r\nHost: h\r\n\r\n",
    )  # fmt: skip
    # Pipelined in one write: the first poll is answered and the connection closed.
    (first,) = responses(data.removesuffix(b"<open>"))
    assert b"Connection: close" in first[0]
    assert json.loads(first[1])[0]["type"] == "hello"
    sock_data = yield threads.deferToThread(_one_by_one, served.address, token)
    first_head = sock_data[0][0]
    assert first_head.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" not in first_head
    assert json.loads(sock_data[1][1])[0]["type"] == "hello"
    assert json.loads(sock_data[2][1])["ok"] is True  # /orbited/health, by twisted.web


HEALTH = b"GET /orbited/health HTTP/1.1\r\nHost: h\r\n\r\n"


@pytest_twisted.inlineCallbacks
def test_the_front_takes_a_connection_back_after_a_handed_off_request(served):
    token = served.token()
    got = yield threads.deferToThread(
        _one_by_one, served.address, token, (HEALTH, poll(token), HEALTH, poll(token))
    )
    assert [json.loads(body) and head.split(b" ")[1] for head, body in got] == [b"200"] * 4
    for head, body in got[1::2]:  # the polls: the front's answer (twisted.web's is chunked)
        assert b"Content-Length" in head and json.loads(body)[0]["type"] == "hello"
    assert b"Server: TwistedWeb" in got[2][0]  # twisted.web's
    assert not served.front.site.channels  # none left behind


def _one_by_one(
    address: tuple[str, int], token: str, requests: tuple[bytes, ...] = ()
) -> list[tuple[bytes, bytes]]:
    sock = socket.create_connection(address, timeout=2)
    got = []
    for request in requests or (poll(token), poll(token), HEALTH):
        sock.sendall(request)
        data = b""
        while not responses(data):
            data += sock.recv(65536)
        got += responses(data)
    sock.close()
    return got


@pytest_twisted.inlineCallbacks
def test_connection_close_from_the_browser_is_honoured(served):
    data = yield threads.deferToThread(
        exchange, served.address, poll(served.token(), b"Connection: close\r\n"), 2.0
    )
    assert not data.endswith(b"<open>")  # the node closed it
    ((head, body),) = responses(data)
    assert b"Connection: close" in head and json.loads(body)[0]["type"] == "hello"


@pytest_twisted.inlineCallbacks
def test_bytes_while_a_poll_is_held_answer_it_and_close(served):
    token = served.token()
    request = (b"GET /orbited/poll?token=%s&timeout=30 HTTP/1.1\r\nHost: h\r\n\r\n"
               % token.encode())  # fmt: skip

    def run() -> tuple[bytes, float]:
        sock = socket.create_connection(served.address, timeout=5)
        sock.sendall(request)
        time.sleep(0.3)
        start = time.monotonic()
        sock.sendall(b"GET /orbited/health HTTP/1.1\r\n\r\n")
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out, time.monotonic() - start

    data, took = yield threads.deferToThread(run)
    ((head, body),) = responses(data)
    assert b"Connection: close" in head and json.loads(body)[0]["type"] == "hello"
    assert took < 3
    assert served.limits.pending_polls == 0 and served.limits.connections == 0


@pytest_twisted.inlineCallbacks
def test_the_front_answers_token_and_limit_errors(served):
    data = yield threads.deferToThread(
        exchange, served.address,
        b"GET /orbited/sse?token=bad HTTP/1.1\r\nHost: h\r\nOrigin: http://h\r\n\r\n", 0.5,
    )  # fmt: skip
    ((head, body),) = responses(data.removesuffix(b"<open>"))
    assert head.startswith(b"HTTP/1.1 401 Unauthorized")
    assert b"Access-Control-Allow-Origin: http://h" in head
    assert json.loads(body)["error"]["code"].startswith("token_")
    assert data.endswith(b"<open>")  # keep-alive after an error
    served.limits.connections = served.limits.config.max_connections  # a full node
    data = yield threads.deferToThread(exchange, served.address, poll(served.token()), 0.5)
    ((head, body),) = responses(data.removesuffix(b"<open>"))
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable")
    assert b"Retry-After: 5\r\n" in head
    assert json.loads(body)["error"]["code"] == "overloaded"
    served.limits.connections = 0


# -- WebSocket, with autobahn's client as the oracle -------------------------------------


class Oracle(WebSocketClientProtocol):
    def onOpen(self) -> None:  # noqa: N802
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
        self.factory.messages.append(payload)

    def onPong(self, payload: bytes) -> None:  # noqa: N802
        self.factory.pongs.append(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802, N803
        self.factory.closed.callback((wasClean, code, reason))


def connect(served: Served, query: str | None = None) -> WebSocketClientFactory:
    query = query if query is not None else f"token={served.token()}"
    url = f"ws://{served.address[0]}:{served.address[1]}/orbited/ws?{query}"
    factory = WebSocketClientFactory(url)
    factory.protocol = Oracle
    factory.opened, factory.closed = defer.Deferred(), defer.Deferred()
    factory.messages, factory.pongs = [], []
    reactor.connectTCP(served.address[0], served.address[1], factory)  # type: ignore[attr-defined]
    return factory


def settle(seconds: float = 0.2) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)  # type: ignore[attr-defined]
    return d


@pytest_twisted.inlineCallbacks
def test_websocket_hello_fragmented_ack_ping_and_a_clean_close(served):
    f = connect(served)
    client = yield f.opened
    yield settle()
    hello = json.loads(f.messages[0])
    assert hello["type"] == "hello"
    served.hub.handle_request(json.dumps(
        {"id": "e1", "to": [list(KEY)], "data": {"x": "é"}}).encode())  # fmt: skip
    yield settle()
    assert json.loads(f.messages[1])["data"] == {"x": "é"}
    client.sendMessage(b'{"type":"ack","seq":1}', fragmentSize=3)
    client.sendPing(b"hi")
    yield settle()
    assert f.pongs == [b"hi"]
    assert served.hub._slots[KEY].mailbox.acked == 1
    client.sendClose(1000, "bye")
    clean, code, _ = yield f.closed
    assert clean and code == 1000
    yield settle()
    assert served.limits.connections == 0


@pytest.mark.parametrize(
    ("send", "code"),
    [
        (lambda c: c.sendMessage(b"x" * 4097), 1009),
        (lambda c: c.sendMessage(b'{"type":"ack","seq":1}' + b" " * 4100, fragmentSize=1000), 1009),
        (lambda c: c.sendMessage(b"\xc3\x28"), 1007),
        (lambda c: c.sendMessage(b"\x00", isBinary=True), 4400),
        (lambda c: c.sendMessage(b'{"type":"nope"}'), 4400),
    ],
)
@pytest_twisted.inlineCallbacks
def test_websocket_violations_close_with_the_documented_code(served, send, code):
    f = connect(served)
    client = yield f.opened
    send(client)
    _, got, _ = yield f.closed
    assert got == code


@pytest_twisted.inlineCallbacks
def test_a_refused_token_completes_the_upgrade_and_closes_4401(served):
    f = connect(served, "token=nope")
    yield f.opened
    clean, code, reason = yield f.closed
    assert clean and code == 4401 and reason.startswith("token_")
    assert served.limits.connections == 0


class FakeTransport:
    def __init__(self) -> None:
        self.out = b""
        self.aborted = self.lost = False

    def write(self, data: bytes) -> None:
        self.out += data

    def setTcpNoDelay(self, on: bool) -> None:  # noqa: N802
        pass

    def loseConnection(self) -> None:  # noqa: N802
        self.lost = True

    def abortConnection(self) -> None:  # noqa: N802
        self.aborted = True


def clocked_websocket() -> tuple[Clock, Hub, BrowserFront, Any, FakeTransport]:
    clock = Clock()
    hub = Hub(clock, HubConfig(keepalive=10))
    limits = BrowserLimits(BrowserLimitsConfig(), clock)
    site = browser_site(hub, AUTH, [], "t", 1 << 20, limits)
    front = BrowserFront(site, hub, AUTH, [], limits, clock)
    front.startFactory()
    p = front.buildProtocol(None)
    t = FakeTransport()
    p.makeConnection(t)
    p.dataReceived(UPGRADE.replace(b"token=T", b"token=" + issue_token(SECRET, KEY).encode()))
    assert t.out.startswith(b"HTTP/1.1 101 ")
    return clock, hub, front, p, t


def test_websocket_pings_and_the_pong_timeout_in_one_sweep():
    clock, hub, front, p, t = clocked_websocket()
    clock.advance(9)
    assert b"\x89\x00" not in t.out
    clock.advance(1)
    assert t.out.endswith(b"\x89\x00")  # a ping at keepalive
    p.dataReceived(mask_frame(OP_PONG, b""))
    clock.advance(10)
    assert t.out.count(b"\x89\x00") == 2 and not t.aborted
    clock.advance(9)
    assert not t.aborted
    clock.advance(1)  # this one was not answered within keepalive
    assert t.aborted
    front.stopFactory()


def test_the_close_handshake_waits_at_most_5_seconds():
    clock, hub, front, p, t = clocked_websocket()
    hub._slots[KEY].sink.replaced()
    assert t.out.endswith(close_frame(4001, "replaced: a newer connection took this key"))
    clock.advance(3.5)
    p.dataReceived(mask_frame(OP_PING, b""))  # still read, not answered
    assert not t.aborted and not t.out.endswith(b"\x8a\x00")
    clock.advance(1.5)
    assert t.aborted  # within CLOSE_TIMEOUT, no close frame came back
    front.stopFactory()


def test_the_browsers_close_ends_the_handshake_at_once():
    clock, hub, front, p, t = clocked_websocket()
    p.dataReceived(mask_frame(OP_CLOSE, struct.pack(">H", 1001)))
    assert t.out.endswith(close_frame(1001)) and t.lost
    front.stopFactory()


# -- the node's browser port is the front ------------------------------------------------


@pytest.mark.slow
def test_the_nodes_browser_port_ends_a_held_sse_stream_on_pipelined_bytes(node):
    """docs/protocol.md, "Errors (browser side)": a request sent while a response is held
    ends that response and closes the connection (twisted.web queued it instead)."""
    host, port = node.http.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(b"GET /orbited/sse?token=%s HTTP/1.1\r\nHost: h\r\n\r\n"
                 % node.token("pipe").encode())  # fmt: skip
    data = b""
    while b'"type":"hello"' not in data:
        data += sock.recv(65536)
    sock.sendall(b"GET /orbited/health HTTP/1.1\r\nHost: h\r\n\r\n")
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    assert data.endswith(b"\r\n0\r\n\r\n")  # the stream's last chunk, then the close
    assert b'"ok": true' not in data and data.count(b"HTTP/1.1 ") == 1


def test_a_connection_waits_60_s_for_a_request_and_10_s_for_its_head():
    clock = Clock()
    hub = Hub(clock, HubConfig())
    limits = BrowserLimits(BrowserLimitsConfig(), clock)
    site = browser_site(hub, AUTH, [], "t", 1 << 20, limits)
    front = BrowserFront(site, hub, AUTH, [], limits, clock)
    front.startFactory()
    idle, slow = front.buildProtocol(None), front.buildProtocol(None)
    t_idle, t_slow = FakeTransport(), FakeTransport()
    idle.makeConnection(t_idle)
    slow.makeConnection(t_slow)
    clock.advance(30)
    slow.dataReceived(b"GET /orbited/poll?tok")  # a head begins: 10 s for the rest
    clock.advance(9)
    assert not t_slow.aborted
    clock.advance(1)
    assert t_slow.aborted and not t_idle.aborted
    clock.advance(20)
    assert t_idle.aborted  # twisted.web's idle timeout (60 s)
    front.stopFactory()
