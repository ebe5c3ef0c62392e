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
from types import SimpleNamespace
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
from orbited.node.frames import Frame
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
    query_params,
)
from orbited.node.transports.limits import BrowserLimits, BrowserLimitsConfig
from orbited.node.transports.wsframe import OP_CLOSE, OP_PING, OP_PONG, close_frame, mask_frame
from orbited.node.users import UserLimits
from orbited.node.web import browser_site
from tests.conftest import moved_frame

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


def decoded(args: dict[bytes, list[bytes]]) -> dict[str, list[str]] | None:
    try:
        return {k.decode(): [v.decode() for v in vs] for k, vs in args.items()}
    except UnicodeDecodeError:
        return None


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([b"token", b"last", b"=", b"&", b";", b"%41", b"%ff", b"+",
                                 b"\xc3\xa9", b"\xc3", b"\xff", b"a", b"1", b":"]),
                max_size=12).map(b"".join))  # fmt: skip
def test_query_params_are_the_query_args_decoded(query):
    # plan() decides on these: the same pieces as twisted.web's args, or not UTF-8 (None).
    try:
        params = query_params(query)
    except UnicodeDecodeError:
        params = None
    assert params == decoded(query_args(query))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([b"a.1:5", b"a.1:x", b"\xc3\xa9", b"", b"s_-.zz:0"]), max_size=2),
    st.lists(st.sampled_from([b"known", b"unknown", b"\xc3\xa9"]), max_size=2),
)
def test_resuming_a_session_is_decided_the_same_on_decoded_params(last, token):
    from orbited.core import tokens
    from orbited.node.transports.common import resumes_session, resumes_session_params

    known = issue_token(SECRET, KEY)
    tokens.verify_token(SECRET, known)
    args = {b"last": last, b"token": [known.encode() if t == b"known" else t for t in token]}
    args = {k: v for k, v in args.items() if v}
    params = decoded(args)
    assert params is not None
    assert resumes_session_params(AUTH, params) == resumes_session(AUTH, args)


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
        users = config.pop("users", UserLimits())
        # The node's timers (linger, held polls, the sweep) on a clock of the test's own:
        # none of them fire here, and none is left in the reactor after the test, even
        # for a connection that closes later.
        self.clock = Clock()
        self.hub = Hub(self.clock, HubConfig(keepalive=keepalive, users=users))
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


def open_websocket(front: BrowserFront, user: str) -> tuple[Any, FakeTransport]:
    p = front.buildProtocol(None)
    t = FakeTransport()
    p.makeConnection(t)
    token = issue_token(SECRET, ConnectionKey(user, "s1", "/chat")).encode()
    p.dataReceived(UPGRADE.replace(b"token=T", b"token=" + token))
    assert t.out.startswith(b"HTTP/1.1 101 ")
    return p, t


def test_a_sweep_visits_only_websockets_whose_deadline_has_come(monkeypatch):
    """An idle node's once-a-second sweep costs nothing per open WebSocket: it looks at
    the connections whose ping, pong or close deadline fell in the seconds gone by."""
    clock, hub, front, first, _ = clocked_websocket()  # opened at 0: its ping is due at 10
    clock.advance(0.5)
    others = [open_websocket(front, f"u{i}") for i in range(50)]  # pings due at 10.5
    visited: list[Any] = []
    tick = type(first).ws_tick
    monkeypatch.setattr(type(first), "ws_tick",
                        lambda self, now: (visited.append(self), tick(self, now))[1])  # fmt: skip
    for _ in range(9):
        clock.advance(1)  # sweeps at 1.5 … 9.5 s: nothing due
    assert visited == []
    clock.advance(1)  # 10.5: the first one's ping (10) and the others' (10.5)
    assert visited.count(first) == 1 and len(visited) == 51
    assert all(t.out.endswith(b"\x89\x00") for _, t in others)
    front.stopFactory()


def test_a_deadline_within_a_second_waits_for_the_sweep_after_it():
    """Opened at 0.5 s with keepalive 10: its ping is due at 10.5, so the sweep at 10 s
    (the front's, started at 0) leaves it and the one at 11 s sends it; the pong is then
    awaited until 21 s."""
    clock, hub, front, _, _ = clocked_websocket()
    clock.advance(0.5)
    p, t = open_websocket(front, "bob")
    clock.advance(9.5)  # 10.0
    assert not t.out.endswith(b"\x89\x00")
    clock.advance(1)  # 11.0
    assert t.out.endswith(b"\x89\x00")
    clock.advance(9)  # 20.0: the pong may still come
    assert not t.aborted
    clock.advance(1)  # 21.0
    assert t.aborted
    front.stopFactory()


def test_a_websocket_accept_keeps_no_verified_token_entry_and_a_poll_does():
    """A WebSocket presents its token once: it is verified but not kept in the
    verified-token cache (docs/security.md); a poll's token is kept for its next poll."""
    from orbited.core import tokens

    clock = Clock()
    hub, front = clocked_front(clock)
    ws_token = issue_token(SECRET, KEY).encode()
    p = front.buildProtocol(None)
    t = FakeTransport()
    p.makeConnection(t)
    p.dataReceived(UPGRADE.replace(b"token=T", b"token=" + ws_token))
    assert t.out.startswith(b"HTTP/1.1 101 ") and b'"type":"hello"' in t.out
    assert not tokens.verified_before(SECRET, ws_token.decode())
    poll_token = issue_token(SECRET, ConnectionKey("bob", "s", "/l")).encode()
    poller = front.buildProtocol(None)
    poller.makeConnection(FakeTransport())
    poller.dataReceived(b"GET /orbited/poll?token=%s&timeout=5 HTTP/1.1\r\nHost: h\r\n\r\n"
                        % poll_token)  # fmt: skip
    assert poller.sink is not None  # held
    assert tokens.verified_before(SECRET, poll_token.decode())


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


def clocked_front(clock: Clock) -> tuple[Hub, BrowserFront]:
    hub = Hub(clock, HubConfig())
    limits = BrowserLimits(BrowserLimitsConfig(), clock)
    site = browser_site(hub, AUTH, [], "t", 1 << 20, limits)
    return hub, BrowserFront(site, hub, AUTH, [], limits, clock)


def held_poll(front: BrowserFront, key: ConnectionKey, timeout: bytes) -> FakeTransport:
    p = front.buildProtocol(None)
    t = FakeTransport()
    p.makeConnection(t)
    p.dataReceived(b"GET /orbited/poll?token=%s&timeout=%s HTTP/1.1\r\nHost: h\r\n\r\n"
                   % (issue_token(SECRET, key).encode(), timeout))  # fmt: skip
    return t


def poll_frames(t: FakeTransport) -> list[dict[str, Any]] | None:
    if not t.out:
        return None
    ((head, body),) = responses(t.out)
    assert head.startswith(b"HTTP/1.1 200 OK")
    frames: list[dict[str, Any]] = json.loads(body)
    return frames


def test_held_polls_are_answered_after_their_timeout_within_a_tenth_of_a_second():
    """docs/protocol.md, "Long-poll": a held poll is answered when ``timeout`` seconds have
    passed (at most 0.1 s later: the polls whose timeout ends in the same tenth of a second
    share one timer), or at once when an event comes."""
    clock = Clock()
    clock.advance(1000.0)
    hub, front = clocked_front(clock)
    keys = [ConnectionKey(u, "s", "/c") for u in ("a", "b", "c", "d")]
    a = held_poll(front, keys[0], b"2")  # until 1002.0
    clock.advance(0.03)
    b = held_poll(front, keys[1], b"2")  # until 1002.03
    c = held_poll(front, keys[2], b"2")
    d = held_poll(front, keys[3], b"1.5")  # until 1001.53
    ticks = [call for call in clock.getDelayedCalls() if call.func == front._poll_tick]
    assert len(ticks) == 3  # b and c share one
    clock.advance(1.49)  # 1001.52
    assert not d.out
    clock.advance(0.01)
    clock.advance(0.1)  # 1001.63
    assert [f["type"] for f in poll_frames(d)] == ["hello"]
    clock.advance(0.36)  # 1001.99
    assert not (a.out or b.out or c.out)
    hub._slots[keys[2]].sink.deliver([Frame(b'{"type":"event","seq":1,"data":1}')])
    clock.advance(0)  # an event: c is answered at once, b still waits for its timeout
    assert [f["type"] for f in poll_frames(c)] == ["hello", "event"]
    clock.advance(0.01)  # 1002.0
    assert [f["type"] for f in poll_frames(a)] == ["hello"] and not b.out
    clock.advance(0.029)  # 1002.029
    assert not b.out
    clock.advance(0.1)
    assert [f["type"] for f in poll_frames(b)] == ["hello"]
    assert front.poll_ticks == {}


def test_a_poll_failing_at_its_timeout_does_not_keep_the_others_of_its_tick():
    clock = Clock()
    hub, front = clocked_front(clock)
    broken, fine = (
        held_poll(front, KEY, b"5"),
        held_poll(front, ConnectionKey("b", "s", "/c"), b"5"),
    )

    def fail(data: bytes) -> None:
        raise OSError("gone")

    broken.write = fail  # type: ignore[method-assign]
    clock.advance(5)
    assert [f["type"] for f in poll_frames(fine)] == ["hello"]
    assert front.poll_ticks == {}


def test_a_poll_answered_early_takes_its_tick_timer_along_if_it_was_the_last():
    clock = Clock()
    hub, front = clocked_front(clock)
    t = held_poll(front, KEY, b"20")
    (tick,) = [call for call in clock.getDelayedCalls() if call.func == front._poll_tick]
    hub._slots[KEY].sink.deliver([Frame(b'{"type":"event","seq":1,"data":1}')])
    clock.advance(0)
    assert [f["type"] for f in poll_frames(t)] == ["hello", "event"]
    assert front.poll_ticks == {} and not tick.active()
    assert [call for call in clock.getDelayedCalls() if call.func == front._poll_tick] == []


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


# -- the per-user connection limit (docs/protocol.md, "Per-user limits") -------------------

ALICE2 = ConnectionKey("alice", "s2", "/chat")
ALICE3 = ConnectionKey("alice", "s3", "/chat")


def front_on_clock(users: UserLimits) -> tuple[Clock, Hub, BrowserFront]:
    clock = Clock()
    hub = Hub(clock, HubConfig(users=users))
    limits = BrowserLimits(BrowserLimitsConfig(), clock)
    site = browser_site(hub, AUTH, [], "t", 1 << 20, limits)
    front = BrowserFront(site, hub, AUTH, [], limits, clock)
    return clock, hub, front


def ask(
    front: BrowserFront, key: ConnectionKey, route: str, extra: bytes = b"", timeout: int = 20
) -> FakeTransport:
    """One request of ``route`` (ws, sse, poll: held ``timeout`` s) for ``key`` on a fake
    transport."""
    token = issue_token(SECRET, key).encode()
    if route == "ws":
        data = UPGRADE.replace(b"token=T", b"token=" + token)
    else:
        query = b"&timeout=%d" % timeout if route == "poll" else b""
        data = b"GET /orbited/%s?token=%s%s HTTP/1.1\r\nHost: h\r\n%s\r\n" % (
            route.encode(), token, query, extra)  # fmt: skip
    p = front.buildProtocol(None)
    t = FakeTransport()
    p.makeConnection(t)
    p.dataReceived(data)
    return t


def user_limit_429(out: bytes, cors: bool = False) -> None:
    """``out`` is exactly the JSON 429 user_limit answer (and the connection stays)."""
    ((head, body),) = responses(out)
    assert head.startswith(b"HTTP/1.1 429 Too Many Requests\r\n"), head
    assert (b"Access-Control-Allow-Origin: http://h\r\n" in head) is cors
    assert json.loads(body) == {
        "error": {"code": "user_limit", "message": "at most 2 connections per user"}
    }


def sse_frames_of(out: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in out.split(b"\n") if line.startswith(b"data: ")]


def poll_frames_of(out: bytes) -> list[dict]:
    ((head, body),) = responses(out)
    assert head.startswith(b"HTTP/1.1 200 OK")
    return json.loads(body)


@pytest.mark.parametrize("check", ["pre-check", "attach"])
def test_past_the_user_limit_a_new_connection_is_refused_on_every_transport(check):
    """refuse policy, 2 per user: a third key of the user gets HTTP 429 ``user_limit``
    (SSE, poll: nothing of a stream is sent) or close 4429 (WebSocket: after the 101, so
    the page's script can read it). The pre-check (Hub.admits) answers before the
    attach; if it let one through (a race), the attach refuses it with Sink.closed and
    the answer is the same."""
    clock, hub, front = front_on_clock(UserLimits(max_connections=2))
    if check == "attach":
        hub.admits = lambda key: True  # type: ignore[method-assign]
    ask(front, KEY, "ws")
    ask(front, ALICE2, "sse")
    user_limit_429(ask(front, ALICE3, "poll").out)
    sse = ask(front, ALICE3, "sse", b"Origin: http://h\r\n")
    user_limit_429(sse.out, cors=True)
    assert not sse.lost  # keep-alive after the error, as after every error answer
    ws = ask(front, ALICE3, "ws")
    assert ws.out.startswith(b"HTTP/1.1 101 ")
    assert ws.out.endswith(close_frame(4429, "user_limit: at most 2 connections per user"))
    assert b'"type":"hello"' not in ws.out
    assert ALICE3 not in hub._slots
    # Two attached; a WebSocket the attach refused counts until its close handshake ends.
    assert front.limits.connections == (3 if check == "attach" else 2)
    # Another user, and a new transport for a key already attached, are not refused.
    bob = ask(front, ConnectionKey("bob", "s", "/c"), "poll", timeout=0)
    assert [f["type"] for f in poll_frames_of(bob.out)] == ["hello"]
    again = ask(front, ALICE2, "sse")
    assert [f["type"] for f in sse_frames_of(again.out)] == ["hello"]


def test_close_oldest_displaces_the_users_longest_attached_connection():
    """close_oldest policy, 2 per user: each new key of the user closes the connection
    attached longest: WebSocket close 4003, SSE and a held poll a ``closed`` frame
    (their response had begun), and the new one attaches."""
    clock, hub, front = front_on_clock(UserLimits(max_connections=2, policy="close_oldest"))
    ws = ask(front, KEY, "ws")
    sse = ask(front, ALICE2, "sse")
    poll_t = ask(front, ALICE3, "poll")
    assert ws.out.endswith(
        close_frame(4003, "displaced: a newer connection of this user took its place")
    )
    assert KEY not in hub._slots  # its mailbox is dropped: the page will not come back
    assert poll_t.out == b""  # held, attached
    closed = {"type": "closed", "code": 4003, "reason": "displaced"}
    ask(front, ConnectionKey("alice", "s4", "/chat"), "poll")
    assert [f["type"] for f in sse_frames_of(sse.out)] == ["hello", "closed"]
    assert sse_frames_of(sse.out)[-1] == closed
    assert sse.out.endswith(b"\r\n0\r\n\r\n")  # the response ended
    ask(front, ConnectionKey("alice", "s5", "/chat"), "sse")
    assert poll_frames_of(poll_t.out) == [poll_frames_of(poll_t.out)[0], closed]
    assert poll_frames_of(poll_t.out)[0]["type"] == "hello"
    assert front.limits.connections == 2 + 1  # s4, s5 and the WebSocket still closing


@pytest.mark.parametrize("check", ["pre-check", "attach"])
@pytest_twisted.inlineCallbacks
def test_twisted_webs_websocket_closes_4429_past_the_user_limit_and_4003_the_oldest(check):
    """The Site's WebSocket (autobahn: what the front hands a request to) keeps the same
    codes: refused 4429 (pre-check in onConnect, or the attach itself), displaced 4003."""
    served = Served(users=UserLimits(max_connections=1))
    site_port = reactor.listenTCP(0, served.front.site, interface="127.0.0.1")  # type: ignore[attr-defined]
    site: Any = SimpleNamespace(address=("127.0.0.1", site_port.getHost().port))
    try:
        if check == "attach":
            served.hub.admits = lambda key: True  # type: ignore[method-assign]
        first = connect(site, f"token={served.token(KEY)}")
        yield first.opened
        refused = connect(site, f"token={served.token(ALICE2)}")
        yield refused.opened
        _, code, reason = yield refused.closed
        assert (code, reason) == (4429, "user_limit: at most 1 connections per user")
        assert [json.loads(m)["type"] for m in refused.messages] == []
        assert ALICE2 not in served.hub._slots
    finally:
        yield site_port.stopListening()
        served.port.stopListening()
        served.front.stopFactory()
    displacing = Served(users=UserLimits(max_connections=1, policy="close_oldest"))
    site_port = reactor.listenTCP(0, displacing.front.site, interface="127.0.0.1")  # type: ignore[attr-defined]
    site.address = ("127.0.0.1", site_port.getHost().port)
    try:
        oldest = connect(site, f"token={displacing.token(KEY)}")
        yield oldest.opened
        newer = connect(site, f"token={displacing.token(ALICE2)}")
        yield newer.opened
        _, code, reason = yield oldest.closed
        assert code == 4003
        assert reason == "displaced: a newer connection of this user took its place"
        yield settle()
        assert [json.loads(m)["type"] for m in newer.messages] == ["hello"]
    finally:
        yield site_port.stopListening()
        displacing.port.stopListening()
        displacing.front.stopFactory()


def test_a_rehash_tells_each_transport_to_reconnect_with_the_keys_new_route():
    """Hub.rehash evicts a key whose route under the new version is another node's: its
    transport gets `reconnect` with reason `rehash` and the `route` (docs/protocol.md,
    "Frames"), so a client with `locate` finds the new node; the connection then ends."""
    from orbited.core.hashing import route_of

    clock, hub, front = front_on_clock(UserLimits())
    routes = {key: route_of(key, hub.routes, 1) for key in (KEY, ALICE2, ALICE3)}
    assert route_of(KEY, hub.routes, 2) not in routes.values()  # alice's (v2) route is kept
    hub.owned = frozenset(range(1, hub.routes + 1)) - set(routes.values())  # as HaloD assigned
    ws, sse, held = ask(front, KEY, "ws"), ask(front, ALICE2, "sse"), ask(front, ALICE3, "poll")
    owners = [SimpleNamespace(route=r, name="me" if r in hub.owned else "other", sp=None)
              for r in range(1, hub.routes + 1)]  # fmt: skip
    hub.rehash(1, owners, me="me")
    frame = {"type": "reconnect", "reason": "rehash"}
    text = ws.out[ws.out.index(b'{"type":"reconnect"') :]
    assert moved_frame(json.loads(text[: text.index(b"}") + 1])) == {**frame, "route": routes[KEY]}
    assert ws.out.endswith(close_frame(4000, "reconnect: rehash"))
    assert moved_frame(sse_frames_of(sse.out)[-1]) == {**frame, "route": routes[ALICE2]}
    assert sse.lost
    assert moved_frame(poll_frames_of(held.out)[-1]) == {**frame, "route": routes[ALICE3]}
    assert b"Connection: close\r\n" in held.out and held.lost


def test_every_browser_sink_names_its_transport_for_per_key_traces():
    # The per-key trace records the transport that wrote each event (sink.kind).
    from orbited.node.transports import httpfront, longpoll, streaming, websocket

    kinds = {
        httpfront.WSSink: "ws",
        httpfront.SSESink: "sse",
        httpfront.PollSink: "poll",
        websocket.BrowserWebSocket: "ws",
        longpoll._PendingPoll: "poll",
        streaming._SSEStream: "sse",
        streaming._IframeStream: "iframe",
    }
    assert {cls: cls.kind for cls in kinds} == kinds


# -- POST /orbited/ack, answered by the front --------------------------------------------


def ack(token: str, last: bytes | None, extra: bytes = b"") -> bytes:
    query = b"token=%s" % token.encode() + (b"" if last is None else b"&last=" + last)
    return b"POST /orbited/ack?%s HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n%s\r\n" % (
        query, extra)  # fmt: skip


def test_only_a_bodiless_http11_post_of_the_ack_url_is_read():
    got = read_head(b"POST /orbited/ack?token=a&last=s.1:2 HTTP/1.1\r\nHost: h\r\n"
                    b"Content-Length: 0\r\n\r\n")  # fmt: skip
    assert isinstance(got, Head) and got.route is Route.ACK and got.query == b"token=a&last=s.1:2"
    assert isinstance(read_head(b"POST /orbited/ack HTTP/1.1\r\nHost: h\r\n\r\n"), Head)
    for data in [
        b"GET /orbited/ack HTTP/1.1\r\nHost: h\r\n\r\n",  # 405, by twisted.web
        b"OPTIONS /orbited/ack HTTP/1.1\r\nHost: h\r\n\r\n",  # the preflight
        b"HEAD /orbited/ack HTTP/1.1\r\nHost: h\r\n\r\n",
        b"POST /orbited/ack HTTP/1.0\r\nHost: h\r\n\r\n",
        b"POST /orbited/ack HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nab",  # a body
        b"POST /orbited/poll HTTP/1.1\r\nHost: h\r\n\r\n",  # the other URLs: GET only
        b"POST /orbited/sse HTTP/1.1\r\nHost: h\r\n\r\n",
    ]:
        assert read_head(data) is HANDOFF, data
    expecting = head(Route.ACK, b"token=a", expect=b"100-continue")
    assert plan(expecting, [], AUTH) is None  # twisted.web's 100 Continue, then its answer
    assert plan(head(Route.ACK, b"token=a&last=1&last=2"), [], AUTH) is None  # repeated


@pytest_twisted.inlineCallbacks
def test_the_front_answers_an_ack_and_keeps_the_connection(served):
    f = connect(served)
    yield f.opened
    yield settle()
    stream = json.loads(f.messages[0])["stream"]
    for n in (1, 2):
        served.hub.handle_request(json.dumps(
            {"id": f"e{n}", "to": [list(KEY)], "data": n}).encode())  # fmt: skip
    yield settle()
    token = served.token()
    got = yield threads.deferToThread(
        _one_by_one, served.address, token,
        (ack(token, b"%s:1" % stream.encode(), b"Origin: http://h\r\n"),
         ack(token, b"other.1:2"),  # another stream: ignored
         ack(token, None), ack("x", b"%s:2" % stream.encode()), HEALTH),
    )  # fmt: skip
    (done, _), (ignored, _), (no_last, no_last_body), (bad_token, bad_body), health = got
    assert done.startswith(b"HTTP/1.1 204 No Content\r\n")
    assert b"Server:" not in done  # the front's answer, on a kept-alive connection
    assert b"Access-Control-Allow-Origin: http://h\r\nVary: Origin\r\n" in done
    assert b"Cache-Control: no-store" in done and b"Connection: close" not in done
    assert ignored.startswith(b"HTTP/1.1 204 ")
    assert served.hub._slots[KEY].mailbox.acked == 1
    assert no_last.startswith(b"HTTP/1.1 400 ")
    assert json.loads(no_last_body)["error"] == {
        "code": "bad_position", "message": "last=<stream>:<seq> is required"}  # fmt: skip
    assert bad_token.startswith(b"HTTP/1.1 401 ")
    assert json.loads(bad_body)["error"]["code"] == "token_malformed"
    assert json.loads(health[1])["ok"] is True
    closing = yield threads.deferToThread(
        exchange, served.address, ack(token, b"%s:2" % stream.encode(), b"Connection: close\r\n")
    )
    ((closed_head, _),) = responses(closing)
    assert not closing.endswith(b"<open>") and b"Connection: close" in closed_head
    assert served.hub._slots[KEY].mailbox.acked == 2


def test_a_request_head_leaves_no_reference_cycle_for_the_collector():
    """httptools' parser holds its reader's bound methods: the reader drops the parser
    once a head is read (or the connection is lost in the middle of one), so no cycle is
    left per request for the garbage collector to find."""
    import gc

    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    clock = Clock()
    hub, front = clocked_front(clock)
    token = issue_token(SECRET, KEY).encode()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        p = front.buildProtocol(None)
        p.makeConnection(FakeTransport())
        p.dataReceived(UPGRADE.replace(b"token=T", b"token=" + token))
        q = front.buildProtocol(None)
        q.makeConnection(FakeTransport())
        q.dataReceived(
            b"GET /orbited/poll?token=" + token + b"&timeout=0 HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        half = front.buildProtocol(None)
        half.makeConnection(FakeTransport())
        half.dataReceived(b"GET /orbited/sse?token=" + token + b" HTTP/1.1\r\nHost:")
        half.connectionLost(Failure(ConnectionDone()))
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert "HeadReader" not in left and "HttpRequestParser" not in left, left


def test_a_kept_alive_connection_reads_its_requests_with_one_parser():
    """One reader per connection, not per request: a poll's connection reads its next
    request with the same HeadReader (and its llhttp parser, once a head needed one); the
    next head has its own 10 s from its first byte; the connection's end drops the parser
    (no cycle left for the collector)."""
    import gc

    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    clock = Clock()
    hub, front = clocked_front(clock)
    front.startFactory()
    token = issue_token(SECRET, KEY).encode()
    request = b"GET /orbited/poll?token=" + token + b"&timeout=0 HTTP/1.1\r\nHost: h\r\n\r\n"
    p = front.buildProtocol(None)
    transport = FakeTransport()
    p.makeConnection(transport)
    p.dataReceived(request)
    reader = p.reader
    assert reader is not None and not reader.released
    p.dataReceived(request)
    assert p.reader is reader
    bodies = [json.loads(body) for _, body in responses(transport.out)]
    assert [b[0]["type"] for b in bodies] == ["hello", "hello"]
    clock.advance(30)
    p.dataReceived(b"GET /orbited/poll?tok")  # the third head begins: 10 s for the rest
    clock.advance(9)
    assert not transport.aborted
    clock.advance(1)
    assert transport.aborted
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        p.connectionLost(Failure(ConnectionDone()))
        del p, reader
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    front.stopFactory()
    assert "HeadReader" not in left and "HttpRequestParser" not in left, left


_POLL_HEADS = [
    b"GET /orbited/poll?token=t&last=s:1 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /orbited/poll?token=t HTTP/1.1\r\nHost: h:1\r\nOrigin: http://h:1\r\n"
    b"User-Agent: Mozilla/5.0 (X11)\r\nCookie: a=b; c=d\r\nConnection: keep-alive\r\n\r\n",
    b"GET /orbited/poll?a HTTP/1.1\r\nhost:   h \t\r\nX-Forwarded-Proto: https\r\n\r\n\r\n",
    b"GET /orbited/poll? HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n",
]


@given(
    st.sampled_from(_POLL_HEADS),
    st.binary(max_size=40) | st.text("ab=&:%+;#?/\"<>{}|\\^`~ \r\n\t\x7f\x80é", max_size=40)
    .map(lambda t: t.encode("utf-8")),
    st.sampled_from([b"", b" ", b"x", b"\r\n", b"GET / HTTP/1.1\r\n\r\n"]),
    st.sampled_from([16384, 120]),
)  # fmt: skip
@settings(max_examples=600)
def test_a_polls_head_again_with_a_new_query_is_read_as_in_full(first, query, extra, small):
    """PollMemo: a kept-alive poll connection's next head that is its last head with
    another query is taken without reading it; whenever it takes one, it is the Head
    HeadReader reads from those bytes."""
    from orbited.node.transports.httpfront import PollMemo

    head = HeadReader(16384, 100).feed(first)
    tail = PollMemo.tail_of(first, head)
    assert tail is not None and first.endswith(tail)
    memo = PollMemo(tail, head.headers, b"", None)  # type: ignore[arg-type]
    data = b"GET /orbited/poll?" + query + tail + extra
    again = memo.head(data, small)
    if again is not None:
        assert again == HeadReader(small, 100).feed(data)
    if not extra and (query.isascii() and b" " not in query and b"#" not in query
                      and query.isalnum() and len(data) <= small):  # fmt: skip
        assert again is not None  # (the common query is taken)


def test_a_kept_alive_polls_next_poll_checks_only_the_expiry_of_the_same_token(monkeypatch):
    """The next poll on a connection with the same head and token: no signature check
    again (PollMemo), the expiry still checked (401 token_expired past exp + leeway); a
    new token on it is verified in full (a bad one refused)."""
    from orbited.core import tokens as token_module
    from orbited.node.transports import common

    clock = Clock()
    hub, front = clocked_front(clock)
    front.startFactory()
    now = time.time()
    token = issue_token(SECRET, KEY, ttl=60, now=now).encode()
    p = front.buildProtocol(None)
    transport = FakeTransport()
    p.makeConnection(transport)

    def poll(tok: bytes, last: bytes = b"") -> dict[str, Any]:
        transport.out = b""
        p.dataReceived(b"GET /orbited/poll?token=%s%s&timeout=0 HTTP/1.1\r\nHost: h\r\n\r\n"
                       % (tok, last))  # fmt: skip
        ((status, body),) = responses(transport.out)
        return {"status": status, "body": json.loads(body)}

    verified: list[str] = []
    real = common.verify_token
    monkeypatch.setattr(common, "verify_token", lambda *a: verified.append(a[1]) or real(*a))
    assert poll(token)["body"][0]["type"] == "hello"
    assert verified == [token.decode()] and p.memo is not None
    stream = hub.mailbox(KEY).stream.encode()
    assert poll(token, b"&last=" + stream + b":0")["body"][0]["type"] == "hello"
    assert verified == [token.decode()]  # not verified again
    monkeypatch.setattr(token_module, "time", SimpleNamespace(time=lambda: now + 60 + 31))
    expired = poll(token, b"&last=" + stream + b":0")
    assert expired["body"]["error"]["code"] == "token_expired"
    assert expired["status"].startswith(b"HTTP/1.1 401 ")
    monkeypatch.undo()
    forged = token[:-2] + (b"AA" if token[-2:] != b"AA" else b"EA")  # (no stray bits)
    assert poll(forged, b"&last=" + stream + b":0")["body"]["error"]["code"] == "token_invalid"
    front.stopFactory()


def test_a_poll_head_split_over_reads_is_not_remembered_for_the_next_poll():
    """PollMemo keeps only a head that came whole in one read: a head whose last read
    starts like a poll's request line (an earlier read ended inside a header value) must
    not lend the earlier reads' headers (here an Origin, hence CORS headers) to the next
    poll on the connection, which carries none."""
    clock = Clock()
    hub, front = clocked_front(clock)
    front.startFactory()
    token = issue_token(SECRET, KEY, ttl=60).encode()
    p = front.buildProtocol(None)
    transport = FakeTransport()
    p.makeConnection(transport)
    line = b"GET /orbited/poll?token=%s&timeout=0 HTTP/1.1\r\n" % token
    p.dataReceived(line + b"Origin: http://h\r\nX-A: ")
    p.dataReceived(line + b"Host: h\r\n\r\n")  # the rest of X-A's value, then the end
    ((status, _),) = responses(transport.out)
    assert status.startswith(b"HTTP/1.1 200 ") and b"Access-Control-Allow-Origin" in status
    stream = hub.mailbox(KEY).stream.encode()
    transport.out = b""
    p.dataReceived(b"GET /orbited/poll?token=%s&timeout=0&last=%s:0 HTTP/1.1\r\nHost: h\r\n\r\n"
                   % (token, stream))  # fmt: skip
    ((status, body),) = responses(transport.out)
    assert status.startswith(b"HTTP/1.1 200 ") and json.loads(body)[0]["type"] == "hello"
    assert b"Access-Control-Allow-Origin" not in status and b"Vary: Origin" not in status
    front.stopFactory()


@pytest.mark.parametrize("path", [b"poll", b"sse"])
def test_a_request_behind_a_held_one_in_the_same_bytes_ends_it_at_once(path: bytes):
    # docs/protocol.md, "Errors (browser side)": a poll was held its whole timeout and an
    # SSE stream went on when the request behind it came in the same read.
    clock = Clock()
    hub, front = clocked_front(clock)
    front.startFactory()
    p = front.buildProtocol(None)
    t = FakeTransport()
    p.makeConnection(t)
    p.dataReceived(
        b"GET /orbited/%s?token=%s&timeout=20 HTTP/1.1\r\nHost: h\r\n\r\n"
        b"GET /orbited/health HTTP/1.1\r\nHost: h\r\n\r\n"
        % (path, issue_token(SECRET, KEY).encode())
    )
    assert t.out.count(b"HTTP/1.1 ") == 1  # the held one only, answered at once
    if path == b"sse":
        assert t.out.endswith(b"0\r\n\r\n")  # the stream's last chunk (then the close)
    else:
        assert b"connection: close" in t.out.lower()
        assert [f["type"] for f in poll_frames(t)] == ["hello"]
    assert t.lost or t.aborted
