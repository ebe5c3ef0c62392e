"""The browser port's lean front (issue 20): one plain Twisted protocol per browser
connection, HTTP/1.1 request heads parsed by httptools (llhttp, in C).

The front serves the hot requests itself — ``GET /orbited/ws`` (the upgrade, then
RFC 6455 framed by orbited.node.transports.wsframe), ``GET /orbited/sse``,
``GET /orbited/poll`` and ``POST /orbited/ack`` without a body (as ack.py answers it) —
and keeps no twisted.web ``Request`` for them. **Every other request is handed, with all
bytes read so far, to the twisted.web Site** (``web.py``): health, client.js, iframe,
OPTIONS, HEAD, 404/405, an ack with a body or ``Expect``, and also every hot request whose
answer is an error the Site decides without side effects (a refused origin, a bad
upgrade, a query not UTF-8 or with a repeated parameter, a bad ``timeout`` or
``Last-Event-ID``, a request head near a limit or one llhttp refuses: 400/403/414/426/431).
So those answers stay twisted.web's, byte for byte. Once handed off, a connection stays
with twisted.web. The front itself answers only what needs the node's state: 503
``overloaded`` (limits), 401 ``token_*``, 400 ``bad_position`` (``last``) and an ack's 204.

- ``HeadReader`` (sans-I/O): bytes in; ``None`` (need more), ``HANDOFF``, or a ``Head``;
  one per connection, its parser reused for each kept-alive poll or ack (``next``).
  ``PollMemo``: a kept-alive poll connection's next head that is its last one but for
  the query, taken without reading it again (and the same token's expiry checked only).
- ``plan`` (pure): a ``Head`` → a ``Plan`` (what to serve) or None (hand off).
- ``FrontProtocol``: the thin shell; ``WSSink``, ``SSESink``, ``PollSink``: the hub's
  sinks, slotted, written through (orbited.runtime.twisted_compat) and batched
  (orbited.node.flush); ``BrowserFront``: the factory, with one sweep timer (1 s) for
  WebSocket pings and pong/close timeouts and for request heads that do not come, and
  one timer per tenth of a second for the held polls whose timeout ends in it.

Keep-alive: after a complete response the connection reads the next request. Pipelining
(a request sent before the previous response is complete; browsers never do it) is not
served: bytes arriving while a response is held (SSE, a held poll) end that response
and close the connection (docs/protocol.md, "Errors (browser side)"); reading goes on
while a response is held, so a browser that goes away is detached at once.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, Final, NamedTuple

import httptools
from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.http import parse_qs

from orbited.core import speedups
from orbited.core.keys import ConnectionKey
from orbited.core.tokens import verified_expiry
from orbited.node import frames
from orbited.node.frames import USER_LIMIT, Frame
from orbited.node.hub import Hub
from orbited.node.mailbox import Position, PositionError
from orbited.node.transports import wsframe
from orbited.node.transports.common import (
    BAD_ACK,
    BrowserAuth,
    BrowserRequestError,
    KnownToken,
    authenticate,
    check_admitted,
    closed_reason,
    origin_allowed,
    parse_ack,
    request_scheme,
    resume_position,
    user_limit_error,
)
from orbited.node.transports.http import status_phrase
from orbited.node.transports.limits import BrowserLimits, Overloaded, QueueWatch
from orbited.node.transports.longpoll import DEFAULT_TIMEOUT, MAX_TIMEOUT
from orbited.runtime.twisted_compat import LeanConnection, unsent_bytes, write_through
from orbited.runtime.web import HeadLimits, OrbitedSite, error_json

log = Logger()


class Route(Enum):
    WS = "ws"
    SSE = "sse"
    POLL = "poll"
    ACK = "ack"


HOT: Final = {b"/orbited/ws": Route.WS, b"/orbited/sse": Route.SSE, b"/orbited/poll": Route.POLL,
              b"/orbited/ack": Route.ACK}  # fmt: skip
# The method each hot URL is served for (any other goes to twisted.web: 405, preflight).
METHOD: Final = {Route.WS: b"GET", Route.SSE: b"GET", Route.POLL: b"GET", Route.ACK: b"POST"}
_PATH_METHOD: Final = {path: METHOD[route] for path, route in HOT.items()}  # (bytes keys)
# Headers the front reads (lower case); the last value of a repeated one wins, as in
# twisted.web's getHeader.
WANTED: Final = frozenset((b"host", b"origin", b"x-forwarded-proto", b"upgrade",
                           b"connection", b"sec-websocket-key", b"sec-websocket-version",
                           b"last-event-id", b"expect"))  # fmt: skip
# Seconds from a request's first byte to its whole head (autobahn's openHandshakeTimeout;
# the Site's rule for a whole request); a connection between requests waits the Site's
# timeOut (60 s).
HEAD_TIMEOUT = HeadLimits.request_timeout
CLOSE_TIMEOUT = 5.0  # seconds the node waits for the browser's close frame
SWEEP = 1.0  # the sweep timer's period
POLL_TICKS = 10  # per second: a held poll's timeout ends at the next tenth of a second


class _Handoff:
    __slots__ = ()


HANDOFF: Final = _Handoff()
# The common GET head read in C where orbited.core._speedups is built (HeadReader.feed;
# 0.7 against ≈ 8 µs through llhttp's callbacks in an accept): the same Head or hand-off,
# and None for any other head, which llhttp reads (tests/core/test_speedups.py compares
# the two on generated heads).
_read_get_head: Any = None if speedups.native is None else speedups.native.read_get_head
_new = tuple.__new__  # a NamedTuple built without its Python-level __new__ (per request)


class Head(NamedTuple):
    """One complete request head the front may serve (HTTP/1.1: GET of a hot URL, or
    POST of /orbited/ack with no body)."""

    route: Route
    query: bytes
    headers: dict[bytes, bytes]
    rest: bytes  # bytes after an upgrade request's head (early WebSocket frames)
    keep_alive: bool  # the client did not say Connection: close
    pipelined: bool  # another request followed in the same bytes


class HeadReader:
    """Reads one request head with httptools. Hands off (``HANDOFF``) whatever the front
    does not serve or whose answer twisted.web must give: another method or path (each hot
    URL has its method, ``METHOD``), a body, HTTP/1.0, a head httptools refuses, and a
    head larger than ``small`` bytes or with more than ``max_headers`` lines (twisted.web
    then applies the 414/431 limits exactly).
    ``raw``: every byte read, for the hand-off."""

    __slots__ = ("parser", "released", "small", "max_headers", "raw", "url", "headers",
                 "count", "state", "upgrade_at", "refuse", "keep_alive", "method",
                 "headed")  # fmt: skip

    def __init__(self, small: int, max_headers: int) -> None:
        # llhttp's parser, made at the first head the C reader leaves to it (_feed)
        self.parser: Any = None
        self.released = False
        self.small = small
        self.max_headers = max_headers
        self.raw = b""
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.count = 0
        self.state = 0  # 0 head, 1 complete, 2 another request began
        self.upgrade_at = -1
        self.refuse = False  # something twisted.web must answer
        self.keep_alive = True
        self.method = b""  # of an HTTP/1.1 request (b"" for another version)
        self.headed = False  # the head is complete (then, if the message is not, a body)

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.state:
            self.state = 2

    def on_url(self, url: bytes) -> None:
        if self.state == 0:
            self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.state:
            return
        self.count += 1
        name = name.lower()
        if name in WANTED:
            self.headers[name] = value

    def on_headers_complete(self) -> None:
        if self.state == 0:  # llhttp forgets these when the next message begins
            self.headed = True
            parser = self.parser
            self.keep_alive = parser.should_keep_alive()
            if parser.get_http_version() == "1.1":
                self.method = parser.get_method()

    def on_body(self, body: bytes) -> None:
        if self.state == 0:
            self.refuse = True

    def on_message_complete(self) -> None:
        if self.state == 0:
            self.state = 1

    def feed(self, data: bytes) -> Head | _Handoff | None:
        """``None`` (more bytes needed), or the outcome. After ``HANDOFF``, or a head
        that ends the connection's HTTP (an upgrade, a pipelined request, no keep-alive),
        the reader is done (released); after another ``Head`` its parser stays, for the
        connection's next request (``next``) unless the caller ``release``s it."""
        fast = None
        if not self.raw and _read_get_head is not None:  # a request's first bytes
            fast = _read_get_head(data, WANTED, self.max_headers, self.small)
        result = self._feed(data) if fast is None else self._read(data, *fast)
        if result is not None and (
            isinstance(result, _Handoff) or result.pipelined or not result.keep_alive
            or self.upgrade_at >= 0
        ):  # fmt: skip
            self.release()
        return result

    def next(self) -> bool:
        """Ready the reader for the connection's next request head, with the same
        parser (llhttp reads a keep-alive connection's requests one after another):
        no parser and no reader per request. False if released (make a new one)."""
        if self.released:
            return False
        self.raw = self.url = b""
        self.headers = {}
        self.count = self.state = 0
        self.upgrade_at = -1
        self.refuse = False
        self.keep_alive = True
        self.method = b""
        self.headed = False
        return True

    def release(self) -> None:
        """Drop the parser: it holds this reader's bound methods (a reference cycle, left
        to the garbage collector otherwise: ≈ 4 µs of its time per request). The reader
        is not fed again."""
        self.parser = None
        self.released = True

    def _read(self, data: bytes, url: bytes, headers: dict[bytes, bytes], end: int,
              upgrade: bool) -> Head | _Handoff:  # fmt: skip
        """A whole GET head the C reader read (``_read_get_head``): the state llhttp's
        callbacks would have left, then the outcome ``_feed`` gives for it."""
        self.raw = data
        self.url = url
        self.headers = headers
        self.state = 1
        self.headed = True
        self.method = b"GET"
        if upgrade:
            self.upgrade_at = end
        return self._outcome()

    def _feed(self, data: bytes) -> Head | _Handoff | None:
        self.raw += data
        if self.parser is None:
            self.parser = httptools.HttpRequestParser(self)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.upgrade_at = len(self.raw) - len(data) + e.args[0]
            if self.state == 0:  # llhttp completes an upgrade request's head first
                self.state = 1
        except httptools.HttpParserError:
            return HANDOFF
        if self.state == 0:
            # A body to come: twisted.web reads it (413 past its limit, the request's
            # deadline), not this reader, which would wait for it within the head's.
            if self.headed or len(self.raw) > self.small or self.count > self.max_headers:
                return HANDOFF
            return None
        head_size = self.upgrade_at if self.upgrade_at >= 0 else len(self.raw)
        if (
            self.refuse
            or self.count > self.max_headers
            or (self.state == 1 and head_size > self.small)
        ):
            return HANDOFF
        return self._outcome()

    def _outcome(self) -> Head | _Handoff:
        """A whole head's: a ``Head`` of a hot URL with its method, else HANDOFF."""
        path, _, query = self.url.partition(b"?")
        route = HOT.get(path)
        if route is None or b"#" in query or _PATH_METHOD[path] != self.method:
            return HANDOFF
        rest = b""
        if self.upgrade_at >= 0:
            if route is not Route.WS:
                return HANDOFF
            rest = self.raw[self.upgrade_at :]
        head: Head = _new(Head, (route, query, self.headers, rest, self.keep_alive,
                                 self.state == 2))  # fmt: skip
        return head


def query_args(query: bytes) -> dict[bytes, list[bytes]]:
    """``request.args`` exactly as twisted.web computes it (its ``parse_qs``: pairs split
    at ``&`` and ``;``, a pair without ``=`` skipped, blank values kept), with a straight
    path for the common query (no escapes)."""
    if b"%" in query or b"+" in query or b";" in query:
        result: dict[bytes, list[bytes]] = parse_qs(query, 1)
        return result
    args: dict[bytes, list[bytes]] = {}
    for pair in query.split(b"&"):
        name, eq, value = pair.partition(b"=")
        if eq:
            args.setdefault(name, []).append(value)
    return args


def query_params(query: bytes) -> dict[str, list[str]]:
    """``query_args`` decoded as UTF-8 (UnicodeDecodeError if a name or value is not),
    the common query (no escapes, all UTF-8) decoded once and split as text: ``&`` and
    ``=`` are ASCII, never part of a UTF-8 sequence, so the pieces are the same."""
    if b"%" not in query and b"+" not in query and b";" not in query:
        try:
            text = query.decode("utf-8")
        except UnicodeDecodeError:
            pass  # maybe only in a piece without "=", which does not count
        else:
            params: dict[str, list[str]] = {}
            for pair in text.split("&"):
                name, eq, value = pair.partition("=")
                if eq:
                    values = params.get(name)
                    if values is None:
                        params[name] = [value]
                    else:
                        values.append(value)
            return params
    return {k.decode("utf-8"): [v.decode("utf-8") for v in vs]
            for k, vs in query_args(query).items()}  # fmt: skip


class Plan(NamedTuple):
    """What the front does with a ``Head``: its decoded query, the CORS headers of its
    answers, and per route: ``after`` (SSE: Last-Event-ID, which wins over ``last``;
    poll: ``last``, when it parses),
    ``timeout`` and ``new`` (poll: not resuming a session, so charged to connect_rate),
    ``key`` (WebSocket: Sec-WebSocket-Key)."""

    head: Head
    params: dict[str, list[str]]
    cors: bytes
    after: Position | None = None
    timeout: float = DEFAULT_TIMEOUT
    new: bool = True
    ws_key: bytes = b""


_SINGLE = ("token", "last", "timeout")


def plan(head: Head, cors_origins: list[str], auth: BrowserAuth) -> Plan | None:
    """The checks that have no side effect; None: hand the request to twisted.web, which
    answers it as it always did (in the same order, with its own checks first)."""
    headers = head.headers
    try:
        origin_raw = headers.get(b"origin")
        cors = b""
        if origin_raw is not None:
            origin = origin_raw.decode("utf-8")
            host = headers.get(b"host")
            proto = headers.get(b"x-forwarded-proto")
            scheme = request_scheme(False, None if proto is None else proto.decode("utf-8"))
            if not origin_allowed(
                origin, None if host is None else host.decode("utf-8"), cors_origins, scheme
            ):
                return None
            if head.route is not Route.WS:  # autobahn's 101 never carried them
                cors = (b"Access-Control-Allow-Origin: %s\r\nVary: Origin\r\n"
                        b"Access-Control-Expose-Headers: Retry-After\r\n" % origin_raw)  # fmt: skip
        params = query_params(head.query)
    except (UnicodeDecodeError, ValueError):
        return None
    return _plan_route(head, params, cors, auth)


def _plan_route(
    head: Head, params: dict[str, list[str]], cors: bytes, auth: BrowserAuth,
    known: str | None = None,
) -> Plan | None:  # fmt: skip
    """``plan`` after the origin's check and the query's decoding. ``known``: a token
    that verified on this connection (resume_position)."""
    headers = head.headers
    for name in _SINGLE:
        values = params.get(name)
        if values is not None and len(values) > 1:
            return None
    route = head.route
    if route is Route.ACK:
        # twisted.web answers "Expect: 100-continue" with a 100 first: its answer then.
        if b"expect" in headers:
            return None
        done: Plan = _new(Plan, (head, params, cors, None, DEFAULT_TIMEOUT, True, b""))
        return done
    if route is Route.WS:
        try:
            key = wsframe.check_handshake(headers)
        except wsframe.HandshakeError:
            return None
        upgrade: Plan = _new(Plan, (head, params, cors, None, DEFAULT_TIMEOUT, True, key))
        return upgrade
    if route is Route.SSE:
        lei = headers.get(b"last-event-id")
        after = None
        if lei:
            try:
                after = Position.parse(lei.decode("ascii"))
            except (UnicodeDecodeError, PositionError):
                return None
            params.pop("last", None)  # Last-Event-ID, the newer position, wins
        stream: Plan = _new(Plan, (head, params, cors, after, DEFAULT_TIMEOUT, True, b""))
        return stream
    timeout = DEFAULT_TIMEOUT
    if "timeout" in params:
        try:
            timeout = float(params["timeout"][0])
        except ValueError:
            return None
        if not 0 <= timeout <= MAX_TIMEOUT:  # also refuses nan
            return None
    resumes, after = resume_position(auth, params, known)
    poll: Plan = _new(Plan, (head, params, cors, after, timeout, not resumes, b""))
    return poll


POLL_PREFIX: Final = b"GET /orbited/poll?"
# Query bytes a PollMemo reads itself: printable ASCII but space and "#" (llhttp takes
# them all in a URL; the front hands off a fragment).
_QUERY_BYTES: Final = bytes(range(0x21, 0x7F)).replace(b"#", b"")


class PollMemo:
    """What a kept-alive poll connection's last poll left to its next one: a browser
    polls with the same head every time but for the query (its ``last``), so a head that
    is ``POLL_PREFIX``, a query of ``_QUERY_BYTES`` and this ``tail`` (from the request
    line's `` HTTP/1.1`` to the end: the headers llhttp read last time, byte for byte) is
    that head again with a new query: not read again (no parser, no header callback, no
    origin check: they depend on the headers only), and its token, if the same, checked
    for expiry only (``known``). tests/node/test_httpfront.py checks it against reading
    the head in full."""

    __slots__ = ("tail", "headers", "cors", "known")

    def __init__(self, tail: bytes, headers: dict[bytes, bytes], cors: bytes,
                 known: KnownToken) -> None:  # fmt: skip
        self.tail = tail
        self.headers = headers
        self.cors = cors
        self.known = known

    @staticmethod
    def tail_of(data: bytes, head: Head) -> bytes | None:
        """The tail of ``data`` (the whole of one poll's head, kept alive, nothing after
        it) when its request line is ``POLL_PREFIX``, its query and `` HTTP/1.1``."""
        if head.pipelined or not head.keep_alive or not data.startswith(POLL_PREFIX):
            return None
        end = data.find(b" HTTP/1.1\r\n")
        if data[len(POLL_PREFIX) : end] != head.query:
            return None
        return data[end:]

    def head(self, data: bytes, small: int) -> Head | None:
        """``data``'s head if it is the last one with a new query, else None."""
        tail = self.tail
        end = len(data) - len(tail)
        if (
            end < len(POLL_PREFIX)
            or len(data) > small
            or not data.endswith(tail)
            or not data.startswith(POLL_PREFIX)
        ):  # fmt: skip
            return None
        query = data[len(POLL_PREFIX) : end]
        if query.translate(None, _QUERY_BYTES):
            return None
        head: Head = _new(Head, (Route.POLL, query, self.headers, b"", True, False))
        return head


def error_response(error: BrowserRequestError, cors: bytes, close: bool = False) -> bytes:
    """The JSON error answer twisted.web gives for ``error`` (send_json_error)."""
    body = error_json(error.code, error.message)
    retry = b"Retry-After: %d\r\n" % error.retry_after if isinstance(error, Overloaded) else b""
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n"
        b"%s%sContent-Length: %d\r\n%s\r\n%s"
        % (error.status, status_phrase(error.status), cors, retry, len(body),
           b"Connection: close\r\n" if close else b"", body)
    )  # fmt: skip


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-store\r\nX-Accel-Buffering: no\r\n%sTransfer-Encoding: chunked\r\n\r\n"
)
SSE_OPEN = b": orbited\n\n"
POLL_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n"
    b"%sContent-Length: %d\r\n%s\r\n"
)
# A poll's whole answer, head and ``[frames]`` body, formatted in one step.
POLL_ANSWER = POLL_HEAD + b"[%s]"
ACK_DONE = b"HTTP/1.1 204 No Content\r\nCache-Control: no-store\r\n%sContent-Length: 0\r\n%s\r\n"
CLOSE_HEADER = b"Connection: close\r\n"


class BrowserFront(Factory):
    """The browser listener's factory (behind the socket gate, gate.py). ``site``: the
    twisted.web Site every other request is handed to."""

    noisy = False
    # Its protocols run on a LeanConnection (orbited.runtime.twisted_compat) when the
    # listener offers one (gate.GatedTCPServer), and build no peer address.
    lean_transport = True

    def __init__(
        self,
        site: OrbitedSite,
        hub: Hub,
        auth: BrowserAuth,
        cors_origins: list[str],
        limits: BrowserLimits,
        clock: IReactorTime | None = None,
    ) -> None:
        self.site = site
        self.hub = hub
        self.auth = auth
        self.cors_origins = cors_origins
        self.limits = limits
        self.clock = clock or hub.clock
        config = limits.config
        self.max_client_message = config.max_client_message
        self.max_write_queue = config.max_write_queue
        self.max_headers = config.max_headers
        # A head at most this long cannot reach a limit; a longer one goes to twisted.web.
        self.small = min(config.max_request_line, config.max_header_bytes)
        self.keepalive = hub.config.keepalive
        self.idle_timeout = float(site.timeOut or 60)  # twisted.web's, for kept-alive connections
        self.waiting: set[FrontProtocol] = set()  # no request head yet (or between requests)
        # Held polls by the tick (1/POLL_TICKS s) their timeout ends in: one timer each.
        self.poll_ticks: dict[int, tuple[Any, set[PollSink]]] = {}
        # Open WebSockets by the whole second of their one deadline (a ping due, a pong
        # awaited, a close handshake's end; FrontProtocol.due_at): a sweep visits the
        # seconds gone by, not every connection (an idle node costs no CPU per socket).
        self.ws_due: dict[int, set[FrontProtocol]] = {}
        self.ws_swept = int(self.clock.seconds()) - 1  # every second before it is visited
        self.sweeper = task.LoopingCall(self.sweep)
        self.sweeper.clock = self.clock

    def buildProtocol(self, addr: Any) -> FrontProtocol:  # noqa: N802
        p = FrontProtocol()
        p.front = self
        return p

    def startFactory(self) -> None:  # noqa: N802
        if not self.sweeper.running:
            self.sweeper.start(SWEEP, now=False)

    def stopFactory(self) -> None:  # noqa: N802
        if self.sweeper.running:
            self.sweeper.stop()

    def sweep(self) -> None:
        """Once a second: heads that did not come in HEAD_TIMEOUT, WebSocket pings, pongs
        not answered within keepalive, close handshakes not answered within CLOSE_TIMEOUT."""
        now = self.clock.seconds()
        for p in [p for p in self.waiting if p.deadline <= now]:
            p.abort()
        wheel = self.ws_due
        last = int(now)
        first = self.ws_swept + 1
        # (the clock moved far, as a test's may: the seconds that hold WebSockets only)
        seconds = range(first, last + 1) if last - first < 64 else sorted(
            k for k in wheel if k <= last
        )  # fmt: skip
        # Seconds before ``last`` are over; ``last`` itself is visited again next time,
        # for its deadlines later in that second (ws_tick files them back).
        self.ws_swept = last - 1
        for second in seconds:
            due = wheel.pop(second, None)
            if due is not None:
                for p in due:
                    p.due_at = -1
                    p.ws_tick(now)

    def ws_deadline(self, p: FrontProtocol, when: float) -> None:
        """File open WebSocket ``p`` under its one deadline, ``when`` (its last, if any,
        is replaced)."""
        self.ws_forget(p)
        wheel = self.ws_due
        second = max(int(when), self.ws_swept + 1)
        bucket = wheel.get(second)
        if bucket is None:
            wheel[second] = {p}
        else:
            bucket.add(p)
        p.due_at = second

    def ws_forget(self, p: FrontProtocol) -> None:
        """``p`` has no deadline any more (its connection is gone, or a new one comes)."""
        old = p.due_at
        if old >= 0:
            p.due_at = -1
            bucket = self.ws_due.get(old)
            if bucket is not None:
                bucket.discard(p)
                if not bucket:
                    del self.ws_due[old]

    def hold_poll(self, sink: PollSink, timeout: float) -> int:
        """Answer ``sink`` when ``timeout`` has passed, at the end of that tick (at most
        1/POLL_TICKS s later): the polls of one tick share one timer. Its tick."""
        now = self.clock.seconds()
        tick = math.ceil((now + timeout) * POLL_TICKS)
        entry = self.poll_ticks.get(tick)
        if entry is None:
            call = self.clock.callLater(max(0.0, tick / POLL_TICKS - now), self._poll_tick, tick)
            self.poll_ticks[tick] = (call, {sink})
        else:
            entry[1].add(sink)
        return tick

    def release_poll(self, sink: PollSink, tick: int) -> None:
        """``sink`` was answered before its tick (the tick's timer goes with its last)."""
        entry = self.poll_ticks.get(tick)
        if entry is not None:
            held = entry[1]
            held.discard(sink)
            if not held:
                del self.poll_ticks[tick]
                entry[0].cancel()

    def _poll_tick(self, tick: int) -> None:
        entry = self.poll_ticks.pop(tick, None)
        if entry is not None:
            for sink in list(entry[1]):
                try:
                    sink.answer()
                except Exception:  # one poll's failure must not leave the others held
                    log.failure("answering a timed-out poll failed")

    def close_idle_connections(self) -> None:
        """Close every connection with no request in progress (node shutdown), here and
        in the Site."""
        for p in list(self.waiting):
            p.close()
        self.site.close_idle_connections()


# FrontProtocol.mode
IDLE, HELD, WS_OPEN, WS_CLOSING, CLOSED = 0, 1, 2, 3, 4


def _set_protocol(transport: Any, protocol: Any) -> None:
    """Make ``protocol`` the one ``transport`` feeds (as autobahn's WebSocketResource does
    when it takes a connection over from twisted.web)."""
    if isinstance(transport, ProtocolWrapper):  # the socket gate
        transport.wrappedProtocol = protocol
    else:
        transport.protocol = protocol  # tcp.Connection


def _protocol_of(transport: Any) -> Any:
    return (
        transport.wrappedProtocol if isinstance(transport, ProtocolWrapper) else transport.protocol
    )


class FrontProtocol(Protocol):
    __slots__ = ("front", "transport", "connected", "mode", "reader", "sink", "deadline",
                 "frames", "ping_due", "pong_by", "close_by", "due_at", "pipelined",
                 "memo")  # fmt: skip

    def __init__(self) -> None:
        self.mode = IDLE
        self.reader: HeadReader | None = None
        self.sink: _Sink | None = None
        self.deadline = 0.0  # IDLE: when the next request head must have come
        self.frames: wsframe.ClientFrames | None = None
        self.ping_due = self.pong_by = self.close_by = 0.0
        self.due_at = -1  # the second the front files this WebSocket under (ws_deadline)
        self.pipelined = False
        self.memo: PollMemo | None = None  # a poll connection's last poll (PollMemo)

    front: BrowserFront

    def connectionMade(self) -> None:  # noqa: N802
        transport: Any = self.transport
        transport.setTcpNoDelay(True)  # frames leave at once, not after the peer's ACK
        front = self.front
        self.deadline = front.clock.seconds() + front.idle_timeout
        front.waiting.add(self)

    # -- bytes in ---------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        mode = self.mode
        if mode == WS_OPEN or mode == WS_CLOSING:
            self._ws_data(data)
        elif mode == IDLE:
            self._head_data(data)
        elif mode == HELD:
            # A request while a response is held: end it, close (module docstring).
            sink = self.sink
            self.pipelined = True
            if sink is not None:
                sink.interrupt()
            else:
                self.close()

    def _head_data(self, data: bytes) -> None:
        front = self.front
        reader = self.reader
        memo = self.memo
        if memo is not None and (reader is None or not reader.raw):
            again = memo.head(data, front.small)
            if again is not None and self._poll_again(memo, again):
                return
        if reader is None:
            reader = self.reader = HeadReader(front.small, front.max_headers)
        fresh = not reader.raw  # this request's first bytes
        head = reader.feed(data)
        if head is None:
            if fresh:  # (a head that came whole in one read needs no deadline)
                self.deadline = front.clock.seconds() + HEAD_TIMEOUT
            return
        if isinstance(head, _Handoff):
            # One whole request (no more bytes, no upgrade): lend the connection for it.
            self._handoff(reader.raw, reader.state == 1 and reader.upgrade_at < 0)
            return
        todo = plan(head, front.cors_origins, front.auth)
        if todo is None:
            reader.release()
            self._handoff(reader.raw, not head.pipelined and head.route is not Route.WS)
            return
        # A poll's or ack's connection comes back at once: its reader is kept, with its
        # parser, for the next request (released in connectionLost; ≈ 1 KB). An SSE
        # stream's (a hand-off's, an upgrade's) is dropped.
        if head.route is Route.SSE or not reader.next():
            reader.release()
            self.reader = None
        self.deadline = 0.0
        front.waiting.discard(self)
        self.pipelined = head.pipelined or not head.keep_alive  # then close after it
        route = head.route
        if route is Route.WS:
            self._start_ws(todo)
        elif route is Route.SSE:
            self._start_sse(todo)
        elif route is Route.POLL:  # only a head whole in one read is remembered (PollMemo)
            self._start_poll(todo, data if fresh else b"")
        else:
            self._ack(todo)

    def _poll_again(self, memo: PollMemo, head: Head) -> bool:
        """Serve ``head``, the connection's last poll head with a new query (PollMemo);
        False if its plan hands it off (then it is read again in full, and handed off)."""
        try:
            params = query_params(head.query)
        except (UnicodeDecodeError, ValueError):
            return False
        front = self.front
        todo = _plan_route(head, params, memo.cors, front.auth, memo.known.token)
        if todo is None:
            return False
        self.deadline = 0.0
        front.waiting.discard(self)
        self.pipelined = False
        self._start_poll(todo, None)
        return True

    def _handoff(self, raw: bytes, once: bool) -> None:
        """twisted.web's Site takes this connection over, from the request's first byte.
        ``once`` (``raw`` is exactly one whole request): the front takes the connection
        back when that response is complete and the connection is kept alive, so a
        browser's next request on it (a poll after client.js) is the front's again."""
        front = self.front
        front.waiting.discard(self)
        self.mode = CLOSED
        self.reader = None
        transport: Any = self.transport
        if type(transport) is LeanConnection:  # twisted.web needs a whole tcp.Server
            transport = self.transport = transport.to_twisted()
        channel = front.site.buildProtocol(transport.getPeer())
        _set_protocol(transport, channel)
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        if not once:
            return
        if channel.requests:  # answered later: take it back then
            channel.requests[-1].notifyFinish().addBoth(lambda _: self._take_back(channel))
        else:
            self._take_back(channel)

    def _take_back(self, channel: Any) -> None:
        transport: Any = self.transport
        if (
            channel.requests
            or not channel.persistent
            or not transport.connected
            or transport.disconnecting
            or _protocol_of(transport) is not channel
        ):
            return  # closing, or more came (it stays twisted.web's), or a WebSocket now
        # The channel paused reading while it answered and holds the transport as its
        # producer: drop it (no timeout left behind) and read on, as the front.
        channel.setTimeout(None)
        self.front.site.channels.discard(channel)
        transport.unregisterProducer()
        _set_protocol(transport, self)
        transport.resumeProducing()
        self.idle()

    def next_request(self, close: bool) -> None:
        """A response is complete: read the next request, or close."""
        self.sink = None
        if close or self.pipelined:
            self.close()
            return
        self.idle()

    def idle(self) -> None:
        """Between requests: wait for the next one at most the idle timeout."""
        front = self.front
        self.mode = IDLE
        self.deadline = front.clock.seconds() + front.idle_timeout
        front.waiting.add(self)

    def close(self) -> None:
        self.mode = CLOSED
        self.front.waiting.discard(self)
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        self.mode = CLOSED
        self.front.waiting.discard(self)
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.mode = CLOSED
        front = self.front
        front.waiting.discard(self)
        front.ws_forget(self)
        reader = self.reader
        if reader is not None:  # lost in the middle of a request head
            self.reader = None
            reader.release()
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink.end()

    def write(self, data: bytes) -> bool:
        """True when the kernel took all of ``data`` at once (nothing queued here)."""
        return write_through(self.transport, data)

    # -- answers --------------------------------------------------------------------

    def _refuse(self, error: BrowserRequestError, cors: bytes) -> None:
        close = self.pipelined
        self.write(error_response(error, cors, close))
        self.next_request(close)

    def _authenticate(
        self, todo: Plan, poll: bool = False, known: KnownToken | None = None,
        remember: bool = True,
    ) -> tuple[ConnectionKey, Position | None]:  # fmt: skip
        front = self.front
        front.limits.check(poll=poll, new=todo.new)  # before the token: no work if overloaded
        attach = authenticate(front.auth, todo.params, todo.after, known, remember)
        check_admitted(front.hub, attach.key)  # 429 / 4429: the user's connection limit
        return attach.key, attach.after

    def _ack(self, todo: Plan) -> None:
        """``POST /orbited/ack`` (SSE and iframe have no way back): as AckResource (ack.py)
        answers it, 204, or 400 ``bad_position`` / 401 ``token_*``."""
        front = self.front
        try:
            attach = authenticate(front.auth, todo.params)  # parses last=<stream>:<seq> too
            if attach.after is None:
                raise BrowserRequestError(400, "bad_position", "last=<stream>:<seq> is required")
        except BrowserRequestError as e:
            self._refuse(e, todo.cors)
            return
        front.hub.ack(attach.key, attach.after.seq, attach.after.stream)
        close = self.pipelined
        self.write(ACK_DONE % (todo.cors, CLOSE_HEADER if close else b""))
        self.next_request(close)

    def _start_sse(self, todo: Plan) -> None:
        try:
            key, after = self._authenticate(todo)
        except BrowserRequestError as e:
            self._refuse(e, todo.cors)
            return
        self.mode = HELD
        sink = self.sink = SSESink(self, key, SSE_HEAD % todo.cors + b"%x\r\n" % len(SSE_OPEN)
                                   + SSE_OPEN + b"\r\n", todo.cors)  # fmt: skip
        self.front.hub.attach(key, sink, after)
        sink.send_head()
        if todo.head.pipelined:  # a request came behind it: the stream ends at once
            sink.interrupt()

    def _start_poll(self, todo: Plan, data: bytes | None) -> None:
        """``data``: the whole head, read in full in one read (b"": in several, so not
        remembered; None: PollMemo's)."""
        memo = self.memo
        try:
            key, after = self._authenticate(todo, True, None if memo is None else memo.known)
        except BrowserRequestError as e:
            self._refuse(e, todo.cors)
            return
        token = todo.params["token"][0]  # (authenticate refuses a request without one)
        if memo is None or memo.known.token != token or data is not None:
            self._remember(todo, data, key, token)
        self.mode = HELD
        sink = self.sink = PollSink(self, key, todo.cors)
        self.front.hub.attach(key, sink, after)
        if len(sink.frames) > 1 or todo.timeout == 0 or todo.head.pipelined:
            sink.answer()  # more than the hello frame, or a request behind it: at once
        else:
            sink.hold(todo.timeout)

    def _remember(self, todo: Plan, data: bytes | None, key: ConnectionKey, token: str) -> None:
        """Keep what the next poll on this connection may reuse (PollMemo)."""
        exp = verified_expiry(self.front.auth.secret, token)
        memo = self.memo
        if exp is None:
            self.memo = None
        elif data is None:  # the same head as the last: a new token
            if memo is not None:
                memo.known = KnownToken(token, key, exp)
        else:
            tail = PollMemo.tail_of(data, todo.head)
            self.memo = (
                None if tail is None
                else PollMemo(tail, todo.head.headers, todo.cors, KnownToken(token, key, exp))
            )  # fmt: skip

    # -- WebSocket ------------------------------------------------------------------

    def _start_ws(self, todo: Plan) -> None:
        front = self.front
        try:
            # A WebSocket presents its token once: not kept in the verified-token cache.
            key, after = self._authenticate(todo, remember=False)
            error = None
        except BrowserRequestError as e:
            # Accept, then close with a code the page's script can read (an HTTP refusal
            # of the upgrade is invisible to it).
            error = e
        self.mode = WS_OPEN
        now = front.clock.seconds()
        self.ping_due = now + front.keepalive
        front.ws_deadline(self, self.ping_due)
        response = wsframe.handshake_response(todo.ws_key)
        if error is not None:
            self.write(response)
            self.ws_close(error.close_code, error.close_reason)
        else:
            sink = self.sink = WSSink(self, key, response)
            front.hub.attach(key, sink, after)
            sink.send_head()
        if todo.head.rest and self.mode != CLOSED:
            self._ws_data(todo.head.rest)

    def _ws_data(self, data: bytes) -> None:
        parser = self.frames
        if parser is None:
            parser = self.frames = wsframe.ClientFrames(self.front.max_client_message)
        error = None
        try:
            messages = parser.feed(data)
        except wsframe.WSError as e:
            messages, error = e.messages, e
        for m in messages:
            op = m.opcode
            if op == wsframe.OP_TEXT:
                if self.mode == WS_OPEN:
                    self._ws_text(m.payload)
            elif op == wsframe.OP_BINARY:
                if self.mode == WS_OPEN:
                    self.ws_close(4400, "bad_frame: binary messages are not accepted")
            elif op == wsframe.OP_PING:
                if self.mode == WS_OPEN:
                    self.write(wsframe.frame(wsframe.OP_PONG, m.payload))
            elif op == wsframe.OP_PONG:
                if self.pong_by:
                    front = self.front
                    self.pong_by = 0.0
                    self.ping_due = front.clock.seconds() + front.keepalive
                    if self.mode == WS_OPEN:
                        front.ws_deadline(self, self.ping_due)
            elif op == wsframe.OP_CLOSE:
                if self.mode == WS_OPEN:  # the browser's close: echo its code, then drop
                    code = wsframe.close_code(m.payload)
                    self.write(wsframe.close_frame(code) if code is not None
                               else wsframe.frame(wsframe.OP_CLOSE, b""))  # fmt: skip
                self.close()
                return
            if self.mode == CLOSED:
                return
        if error is not None:
            self.frames = None
            if self.mode == WS_OPEN:
                self.ws_close(error.code, error.reason)
            else:
                self.abort()

    def _ws_text(self, payload: bytes) -> None:
        sink = self.sink
        try:
            seq = parse_ack(payload)
        except ValueError:
            self.ws_close(4400, BAD_ACK)
            return
        if sink is not None:
            self.front.hub.ack(sink.key, seq)

    def ws_close(self, code: int, reason: str) -> None:
        """Start the close handshake: the browser has CLOSE_TIMEOUT to answer."""
        if self.mode != WS_OPEN:
            return
        sink = self.sink
        if sink is not None:
            sink.flush()
        self.mode = WS_CLOSING
        self.write(wsframe.close_frame(code, reason))
        # The sweep runs every SWEEP seconds: the drop comes at most CLOSE_TIMEOUT after.
        self.close_by = self.front.clock.seconds() + CLOSE_TIMEOUT - SWEEP
        self.front.ws_deadline(self, self.close_by)

    def ws_tick(self, now: float) -> None:
        """The sweep found this WebSocket's second gone by: act on its deadline if due,
        else file it again (its deadline is later in that second)."""
        mode = self.mode
        front = self.front
        if mode == WS_CLOSING:
            if now >= self.close_by:
                self.abort()
            else:
                front.ws_deadline(self, self.close_by)
        elif mode == WS_OPEN:
            if self.pong_by:
                if now >= self.pong_by:
                    self.abort()  # not listening: no close frame (docs/protocol.md)
                else:
                    front.ws_deadline(self, self.pong_by)
            elif now >= self.ping_due:
                self.write(wsframe.frame(wsframe.OP_PING, b""))
                self.pong_by = now + front.keepalive
                front.ws_deadline(self, self.pong_by)
            else:
                front.ws_deadline(self, self.ping_due)


class _Sink(QueueWatch):
    """What the three sinks share: the key, the connection, the hub's Sink attributes,
    the slow-reader watch (QueueWatch: this object is its own watch) and the bytes kept
    for the delivery batch (orbited.node.flush)."""

    __slots__ = ("proto", "key", "last_write", "finished", "pending")
    kind: str  # the transport's name in per-key traces: "ws", "sse", "poll"
    wants_pings = True
    is_poll = False

    def __init__(self, proto: FrontProtocol, key: ConnectionKey) -> None:
        super().__init__()
        self.proto = proto
        self.key = key
        front = proto.front
        self.last_write = front.hub.now()
        self.finished = False
        self.pending: list[bytes] | bytes | None = None  # head first, then batched bytes
        front.limits.opened(self.is_poll)

    # QueueWatch
    @property
    def max_bytes(self) -> int:  # type: ignore[override]
        return self.proto.front.max_write_queue

    @property
    def clock(self) -> IReactorTime:  # type: ignore[override]
        return self.proto.front.clock

    def measure(self) -> int | None:
        transport = self.proto.transport
        return None if transport is None else unsent_bytes(transport)

    def end(self) -> bool:
        """Detach (once) and stop counting this connection."""
        if self.finished:
            return False
        self.finished = True
        self.stop()
        front = self.proto.front
        front.limits.closed(self.is_poll)
        front.hub.detach(self.key, self)
        return True

    def send(self, data: bytes) -> bool:
        """Write ``data`` now, or keep it for the batch; False if found slow."""
        pending = self.pending
        if isinstance(pending, list):
            pending.append(data)
            return not self.fired
        if pending is None and self.proto.front.hub.enlist(self):
            self.pending = [data]
            return not self.fired
        if pending is not None:  # the response head, not sent yet
            self.pending = None
            data = pending + data
        if self.proto.write(data):  # all sent: nothing queued, so not over max_bytes
            self.first = False  # (what wrote() would find)
            return not self.fired
        return not self.wrote()

    def send_head(self) -> None:
        """After the attach: the response head (if the hello did not take it) leaves."""
        pending = self.pending
        if isinstance(pending, bytes):
            self.pending = None
            self.proto.write(pending)

    def flush(self) -> None:
        pending = self.pending
        if not isinstance(pending, list):
            return
        self.pending = None
        proto = self.proto
        if proto.transport is None or proto.mode == CLOSED:
            return
        if proto.write(pending[0] if len(pending) == 1 else b"".join(pending)):
            self.first = False  # all sent: what wrote() would find
        else:
            self.wrote()

    def interrupt(self) -> None:
        """Bytes came from the browser while this response is held."""
        raise NotImplementedError

    # orbited.node.hub.Sink
    def deliver(self, out: list[Frame]) -> bool:
        raise NotImplementedError

    def replaced(self) -> None:
        raise NotImplementedError

    def reconnect(self, reason: str, route: int | None = None, spread: float | None = None) -> None:
        raise NotImplementedError

    def closed(self, code: int, reason: str) -> None:
        raise NotImplementedError

    def refuse(self, cors: bytes) -> None:
        """Sink.closed(4429) before anything of the response was written: HTTP 429
        ``user_limit`` (the JSON error answer) instead of a stream."""
        self.end()
        self.pending = None
        proto = self.proto
        proto._refuse(user_limit_error(proto.front.hub.config.users.max_connections), cors)


class WSSink(_Sink):
    __slots__ = ()
    kind = "ws"

    def __init__(self, proto: FrontProtocol, key: ConnectionKey, head: bytes) -> None:
        super().__init__(proto, key)
        self.pending = head

    def deliver(self, out: list[Frame]) -> bool:
        if self.finished or self.proto.mode != WS_OPEN:
            return False
        if len(out) == 1:
            data = out[0].data
            data = wsframe.text_header(len(data)) + data
        else:
            data = b"".join(wsframe.text_header(len(f.data)) + f.data for f in out)
        self.last_write = self.proto.front.hub.now()
        return self.send(data)

    def on_slow(self, unsent: int) -> None:
        self.proto.front.limits.slow()
        log.info("closing a slow WebSocket reader: {n} bytes unsent", n=unsent)
        # The close frame waits behind the unsent bytes; the close timeout drops the
        # connection (and frees them) if the browser does not read that far in time.
        self.proto.ws_close(4002, f"slow: {unsent} bytes unsent, over max_write_queue")

    def replaced(self) -> None:
        if self.proto.mode == WS_OPEN:
            self.deliver([Frame(frames.REPLACED)])
            self.proto.ws_close(4001, "replaced: a newer connection took this key")

    def reconnect(self, reason: str, route: int | None = None, spread: float | None = None) -> None:
        if self.proto.mode == WS_OPEN:
            self.deliver([Frame(frames.reconnect(reason, route, spread))])
            self.proto.ws_close(4000, f"reconnect: {reason}"[:123])

    def closed(self, code: int, reason: str) -> None:
        proto = self.proto
        if proto.mode == WS_OPEN:
            self.send_head()  # refused in the attach: the 101 has not left yet
            users = proto.front.hub.config.users
            proto.ws_close(code, closed_reason(code, reason, users.max_connections))


class SSESink(_Sink):
    __slots__ = ("cors",)
    kind = "sse"

    def __init__(self, proto: FrontProtocol, key: ConnectionKey, head: bytes, cors: bytes) -> None:
        super().__init__(proto, key)
        self.pending = head
        self.cors = cors

    @staticmethod
    def encode(frame: Frame) -> bytes:
        seq, stream = frame.seq, frame.stream
        if seq is not None and stream is not None:
            return b"id: %s:%d\ndata: %s\n\n" % (stream.encode(), seq, frame.data)
        return b"data: %s\n\n" % frame.data

    def deliver(self, out: list[Frame]) -> bool:
        if self.finished:
            return False
        encode = self.encode
        chunk = b"".join([encode(f) for f in out]) if len(out) > 1 else encode(out[0])
        self.last_write = self.proto.front.hub.now()
        return self.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))

    def on_slow(self, unsent: int) -> None:
        self.proto.front.limits.slow()
        log.info("closing a slow SSE reader: {n} bytes unsent", n=unsent)
        if self.end():
            self.proto.abort()

    def finish(self, last: Frame | None, close: bool) -> None:
        """End the response (after ``last``): the terminating chunk; then the next
        request, or close."""
        if self.finished:
            return
        self.end()
        chunk = b"" if last is None else self.encode(last)
        pending = self.pending
        self.pending = None
        if isinstance(pending, list):
            pending = b"".join(pending)
        data = (pending or b"") + (b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunk else b"")
        self.proto.write(data + b"0\r\n\r\n")
        self.proto.next_request(close)

    def replaced(self) -> None:
        self.finish(Frame(frames.REPLACED), False)

    def reconnect(self, reason: str, route: int | None = None, spread: float | None = None) -> None:
        self.finish(Frame(frames.reconnect(reason, route, spread)), True)

    def closed(self, code: int, reason: str) -> None:
        if self.finished:
            return
        if code == USER_LIMIT and isinstance(self.pending, bytes):  # the head has not left
            self.refuse(self.cors)
        else:
            self.finish(Frame(frames.closed(code, reason)), False)

    def interrupt(self) -> None:
        self.finish(None, True)


class PollSink(_Sink):
    """One held poll: frames collect until the answer (``answer``): at once if the
    attach brought more than hello, else at the first delivery (when the delivery batch
    ends, or a reactor turn later, so what arrives in the same moment shares the
    response) or when ``timeout`` has passed (BrowserFront.hold_poll)."""

    __slots__ = ("frames", "cors", "tick", "later")
    kind = "poll"
    wants_pings = False  # a held poll ends by its own timeout
    is_poll = True

    def __init__(self, proto: FrontProtocol, key: ConnectionKey, cors: bytes) -> None:
        super().__init__(proto, key)
        self.frames: list[bytes] = []
        self.cors = cors
        self.tick: int | None = None  # held: the tick of its timeout
        self.later: Any = None  # the answer a reactor turn later (outside a batch)

    def hold(self, timeout: float) -> None:
        if not self.finished:
            self.tick = self.proto.front.hold_poll(self, timeout)

    def deliver(self, out: list[Frame]) -> bool:
        if self.finished:
            return False
        if len(out) == 1:
            self.frames.append(out[0].data)
        else:
            self.frames.extend([f.data for f in out])
        if self.tick is not None and self.pending is None:
            # Answer when this batch ends (orbited.node.flush), or a reactor turn later.
            front = self.proto.front
            if not front.hub.enlist(self):
                self.later = front.clock.callLater(0, self.answer)
            self.pending = b""  # answer scheduled
        return True

    def flush(self) -> None:
        self.answer()

    def answer(self, close: bool = False) -> None:
        if self.finished:
            return
        self.end()
        proto = self.proto
        if proto.transport is not None and proto.mode != CLOSED:
            close = close or proto.pipelined
            frames_ = self.frames
            inner = frames_[0] if len(frames_) == 1 else b",".join(frames_)
            proto.write(POLL_ANSWER % (self.cors, len(inner) + 2,
                                       CLOSE_HEADER if close else b"", inner))  # fmt: skip
            proto.next_request(close)

    def end(self) -> bool:
        tick = self.tick
        if tick is not None:
            self.tick = None
            self.proto.front.release_poll(self, tick)
        later = self.later
        if later is not None:
            self.later = None
            if later.active():
                later.cancel()
        return super().end()

    def replaced(self) -> None:
        # A newer poll for the same key: answer this one, telling it to stop polling.
        self.frames.append(frames.REPLACED)
        self.answer()

    def reconnect(self, reason: str, route: int | None = None, spread: float | None = None) -> None:
        if not self.finished:
            self.frames.append(frames.reconnect(reason, route, spread))
            self.answer(close=True)

    def closed(self, code: int, reason: str) -> None:
        if self.finished:
            return
        if code == USER_LIMIT and not self.frames:  # nothing to answer yet: a plain 429
            self.refuse(self.cors)
        else:
            self.frames.append(frames.closed(code, reason))
            self.answer()

    def interrupt(self) -> None:
        self.answer(close=True)
