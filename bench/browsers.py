"""Simulated browsers: many Orbited page clients per process, on asyncio, with bookkeeping.

Owns the browser side of the end-to-end chaos test, the data-plane failover benchmark and
the soak test. Each simulated browser behaves like js/orbited.js (docs/client.md) on one
forced transport — ``ws`` (WebSocket), ``poll`` (XHR long-poll), ``sse`` or ``iframe`` —
connects with a token for its connection key, remembers its position (stream + seq),
acknowledges (WebSocket ``ack`` every second or 50 events; long-poll through ``last``;
SSE/iframe through ``POST /orbited/ack`` when the node has it), and on a ``reconnect``
frame, close, EOF, reset, refusal or silence reconnects with the client's backoff
(equal jitter, [c/2, c] with c = min(max, base·2^attempt)) and resumes with ``last``.

Every event the web app sends (bench/sender.py) is ``{"n": int, "t": send wall time,
"k": key id or "*"}``; each browser records which n it received (arrival order, run
length encoded), duplicates (an n its app layer saw twice), out-of-order arrivals,
resets, gaps, reconnects and outages ``[lost_at, receiving_again_at, reconnected_at]``
(wall times; None while not yet). On SIGTERM/SIGINT or after ``--duration`` the process
writes a JSON report (bench/chaos_report.py analyses it) and exits.

    python -m bench.browsers --secret-file S --url http://127.0.0.1:8000 \\
        --prefix b --count 250 [--offset 0] [--transports ws=2,poll=1,sse=1] \\
        [--duration 60] --report out.json [--ready-file ready.json] [--progress 5]
    python -m bench.browsers ... --halod-browser-base 127.0.0.1:30000 --routes 24

Keys are ``(f"{prefix}{i}", "s", "/bench")`` for i in [offset, offset + count) (or the
``--keys-file`` JSON list of [user, session, location]); the transport of key i is fixed
by i and the ratio, so several processes given disjoint slices make one consistent fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from bench.chaos_report import ArrivalRanges, spread
from bench.wire import HTTPConn, HTTPStatusError, WSClosed, WSConn, open_conn, run_loop
from orbited.core.hashing import DEFAULT_ROUTES, route_of
from orbited.core.keys import ConnectionKey
from orbited.core.tokens import issue_token, load_secret

try:  # the node's own fast JSON codec when it is there (a main dependency)
    from orjson import loads
except ImportError:  # pragma: no cover
    from json import loads

TRANSPORTS = ("ws", "poll", "sse", "iframe")
DEFAULT_LOCATION = "/bench"
LATENCY_SAMPLES = 20_000  # per transport and process: enough for a p99
BROADCAST = "*"  # the sender's "k" when one request carries many keys (bench/sender.py)
SLOW_SAMPLES = 300  # per browser: the last long gaps and late events (ring buffers)


# -- keys, transports, URLs: shared with bench/sender.py ---------------------------------


def make_keys(prefix: str, count: int, offset: int = 0) -> list[ConnectionKey]:
    """The deterministic key list sender and browsers agree on without sharing a file."""
    return [
        ConnectionKey(f"{prefix}{i}", "s", DEFAULT_LOCATION) for i in range(offset, offset + count)
    ]


def read_keys(path: Path) -> list[ConnectionKey]:
    """Keys from a JSON file: a list of [user, session, location]."""
    return [ConnectionKey(*k) for k in json.loads(Path(path).read_text())]


def key_id(key: ConnectionKey) -> str:
    """The key's name in payloads and reports (unique per key)."""
    return ":".join(key)


def transport_pattern(spec: str) -> list[str]:
    """``"ws=2,poll=1,sse=1"`` → ``["ws", "ws", "poll", "sse"]``; key i gets pattern[i % len]."""
    pattern: list[str] = []
    for part in spec.split(","):
        name, _, weight = part.strip().partition("=")
        if name not in TRANSPORTS:
            raise ValueError(f"unknown transport {name!r} (one of {', '.join(TRANSPORTS)})")
        pattern += [name] * int(weight or 1)
    if not pattern:
        raise ValueError("no transport given")
    return pattern


def single_node_urls(base: str) -> Callable[[ConnectionKey], str]:
    """Every key to one node's browser listener, ``http://host:port``."""
    base = base.rstrip("/")
    return lambda key: base


def halod_urls(
    browser_base: str, routes: int = DEFAULT_ROUTES, version: int = 2
) -> Callable[[ConnectionKey], str]:
    """Each key to its HaloD route port under hash ``version``: browser_port_base + route
    − 1 (docs/halod.md)."""
    at = route_urls(browser_base)
    return lambda key: at(route_of(key, routes, version))


def route_urls(browser_base: str) -> Callable[[int], str]:
    """A route's HaloD browser port as a base URL: what a ``reconnect`` frame's ``route``
    leads to (js/orbited.js's ``locate``)."""
    host, _, port = browser_base.rpartition(":")
    base_port = int(port)
    return lambda route: f"http://{host}:{base_port + route - 1}"


# js/orbited.js FIRST_RETRY, DEFAULT_SPREAD and STABLE (docs/client.md), in seconds.
FIRST_RETRY = 0.1
DEFAULT_SPREAD = 0.15
STABLE = 1.0


def spread_hint(value: object, cap: float) -> float | None:
    """js spreadHint: a hello or ping frame's spread (s), at most ``cap``; None if absent."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return min(float(value), cap)
    return None


def backoff_delay(
    attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """js/orbited.js backoffDelay: a random delay in [c/2, c], c = min(cap, base·2^attempt)."""
    ceiling = min(cap, base * 2 ** min(attempt, 30))
    return ceiling / 2 + rand() * ceiling / 2


# -- a minimal HTTP/1.1 client on asyncio streams ----------------------------------------


class HTTPError(Exception):
    def __init__(self, status: int, code: str) -> None:
        super().__init__(f"HTTP {status} {code}")
        self.status = status
        self.code = code


async def http_conn(host: str, port: int, timeout: float) -> HTTPConn:
    loop = asyncio.get_running_loop()
    conn: HTTPConn = await open_conn(lambda: HTTPConn(loop, host, port), host, port, timeout)
    return conn


def error_code(body: bytes) -> str:
    """The code of the node's JSON error body (docs/protocol.md, "Errors"), or ""."""
    try:
        return str(loads(body)["error"]["code"])
    except Exception:  # noqa: BLE001 - not JSON: the status will do
        return ""


async def http_failure(conn: HTTPConn, status: int) -> Exception:
    body = b""
    with contextlib.suppress(Exception):
        body = await asyncio.wait_for(conn.body(), 5.0)
    return _http_failure(HTTPError(status, error_code(body)))


# -- one simulated browser ---------------------------------------------------------------


@dataclass
class Options:
    backoff_base: float = 0.2  # s; the first delay is in [base/2, base]
    backoff_max: float = 2.0
    ack_interval: float = 1.0  # WebSocket and SSE/iframe acks, as js/orbited.js
    ack_every: int = 50
    poll_timeout: float = 25.0
    hello_timeout: float = 10.0  # no hello in time: drop and reconnect (js: 10 s)
    connect_timeout: float = 5.0
    token_ttl: float = 7 * 24 * 3600.0  # soak runs outlast the default hour
    http_ack: bool = True  # POST /orbited/ack for SSE/iframe while the node has it
    dedup_window: int = 1024  # delivered event ids remembered to drop resends (js: 1024)
    # Silences and late events worth keeping for the failover bench (bench/failover.py):
    # two arrivals further apart than this, or an event this late after its send time.
    slow_after: float = 0.15


class Fatal(Exception):
    """Reconnecting cannot help (replaced, bad request): the browser stops, as the JS does."""


class TokenRefused(Exception):
    pass


@dataclass
class Shared:
    """Per-process state the browsers share."""

    secret: bytes
    options: Options
    http_ack: bool = True  # turned off by the first 404 from /orbited/ack
    # A ``reconnect`` frame's ``route`` → the base URL to connect to next (js ``locate``);
    # None: one node, the same URL again.
    locate: Callable[[int], str] | None = None
    latencies: dict[str, list[float]] = field(default_factory=dict)
    latency_seen: dict[str, int] = field(default_factory=dict)
    events: int = 0

    def latency(self, transport: str, value: float) -> None:
        n = self.latency_seen[transport] = self.latency_seen.get(transport, 0) + 1
        samples = self.latencies.setdefault(transport, [])
        if len(samples) < LATENCY_SAMPLES:
            samples.append(value)
        elif (j := random.randrange(n)) < LATENCY_SAMPLES:  # reservoir: a uniform sample
            samples[j] = value


class Browser:
    def __init__(self, key: ConnectionKey, transport: str, base_url: str, shared: Shared) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}")
        self.key = key
        self.id = key_id(key)
        self.transport = transport
        self.base_url = base_url
        self.shared = shared
        self.opts = shared.options
        self.token = issue_token(shared.secret, key, self.opts.token_ttl)
        # resume state (js Resume)
        self.stream: str | None = None
        self.seq = 0
        self.keepalive = 25.0
        # bookkeeping
        self.arrivals = ArrivalRanges()
        self._seen = bytearray()  # bit n set: n was received (dups without a set of ints)
        self.max_n = 0
        self.dups = 0
        self.dup_sample: list[int] = []
        self.out_of_order = 0
        self.replayed = 0  # dropped by the resume filter (seq not above the position)
        # js Resume: ids of the last dedup_window events delivered; a resend after a node
        # crash (new stream, same id) is dropped and counted here, not in dups.
        self._ids: dict[str, None] = {}
        self.dup_dropped = 0
        self.foreign = 0  # events whose "k" names another key
        self.resets = 0
        # Churn: away, or living a fresh key's life meanwhile; what it misses waits in its
        # mailbox (or expires), so a run that ends now cannot count it as received.
        self.absent = False
        self.gaps: list[list[int]] = []
        self.reconnects = 0
        self.connects = 0
        self.outages: list[list[float | None]] = []
        self.last_event_at: float | None = None
        # [previous arrival, arrival] further apart than slow_after; [send time, latency]
        # of events later than slow_after. The last ones: an incident is near the end.
        self.long_gaps: deque[list[float]] = deque(maxlen=SLOW_SAMPLES)
        self.late: deque[list[float]] = deque(maxlen=SLOW_SAMPLES)
        self.errors: Counter[str] = Counter()
        self.fatal: str | None = None
        self.ready = asyncio.Event()
        self.stopping = False
        self._in_outage = False
        self._attempt = 0
        self._hello_this_session = False
        # js: the node's reconnect spread hint (s), when this connection's hello came, and
        # whether the last quick reconnect followed a connection shorter than STABLE.
        self.spread: float | None = None
        self._hello_at: float | None = None
        self._short_quick = False
        # churn mode (Churn): sessions begun per transport, how each one ended
        self.sessions: Counter[str] = Counter()
        self.resumed = 0  # sessions begun with a position (last=)
        self.churn: Counter[str] = Counter()

    # -- frames ------------------------------------------------------------------------

    def on_frame(self, frame: dict[str, Any]) -> str | None:
        """Digest one frame; returns "reconnect" when the session must end, else None."""
        kind = frame.get("type")
        if kind == "event":
            seq = frame.get("seq", 0)
            if seq <= self.seq:
                self.replayed += 1  # a replay of what we have: dropped, as the JS does
                return None
            self.seq = seq  # a dropped resend advances the position too: it gets acked
            eid = frame.get("id")
            if isinstance(eid, str) and self.opts.dedup_window > 0:
                if eid in self._ids:
                    self.dup_dropped += 1
                    return None
                self._ids[eid] = None
                if len(self._ids) > self.opts.dedup_window:
                    del self._ids[next(iter(self._ids))]
            self._event(frame.get("data"))
        elif kind == "hello":
            stream = frame.get("stream")
            reset = bool(frame.get("reset")) or (self.stream is not None and stream != self.stream)
            if reset or stream != self.stream:
                self.stream, self.seq = stream, int(frame.get("seq") or 0)
            self.resets += reset
            self.keepalive = float(frame.get("keepalive") or 25)
            self._attempt = 0
            self.spread = spread_hint(frame.get("spread"), self.opts.backoff_max)
            if self._hello_at is None:
                self._hello_at = time.monotonic()
            if not self._hello_this_session:
                self._hello_this_session = True
                self.connects += 1
                if self._in_outage and self.outages[-1][2] is None:
                    self.outages[-1][2] = time.time()
                self.ready.set()
        elif kind == "gap":
            self.gaps.append([frame.get("from", 0), frame.get("to", 0)])
        elif kind == "reconnect":
            self.errors[f"reconnect: {frame.get('reason')}"] += 1
            route, locate = frame.get("route"), self.shared.locate
            if locate is not None and isinstance(route, int) and not isinstance(route, bool):
                self.base_url = locate(route)  # the key's route now (a rehash, a move)
            spread = spread_hint(frame.get("spread"), self.opts.backoff_max)
            if spread is not None:  # a planned move's own hint (js: the same)
                self.spread = spread
            return "reconnect"
        elif kind == "replaced":
            raise Fatal("replaced")
        elif kind == "ping":
            spread = spread_hint(frame.get("spread"), self.opts.backoff_max)
            if spread is not None:
                self.spread = spread
        return None  # unknown frames: nothing to do

    def _event(self, data: object) -> None:
        now = time.time()
        if not isinstance(data, dict) or not isinstance(data.get("n"), int):
            self.errors["event without n"] += 1
            return
        n: int = data["n"]
        slow = self.opts.slow_after
        if self.last_event_at is not None and now - self.last_event_at > slow:
            self.long_gaps.append([self.last_event_at, now])
        self.last_event_at = now
        if self._in_outage:
            self.outages[-1][1] = now
            self._in_outage = False
        k = data.get("k")
        if k is not None and k != self.id and k != BROADCAST:
            self.foreign += 1
        byte, bit = divmod(n, 8)
        if byte >= len(self._seen):
            self._seen.extend(bytes(max(byte + 1 - len(self._seen), len(self._seen))))
        if self._seen[byte] >> bit & 1:
            self.dups += 1
            if len(self.dup_sample) < 20:
                self.dup_sample.append(n)
            return
        self._seen[byte] |= 1 << bit
        if n < self.max_n:
            self.out_of_order += 1
        self.max_n = max(self.max_n, n)
        self.arrivals.add(n)
        self.shared.events += 1
        if isinstance(data.get("t"), int | float):
            self.shared.latency(self.transport, now - data["t"])
            if now - data["t"] > slow:
                self.late.append([data["t"], now - data["t"]])

    def position(self) -> str | None:
        return None if self.stream is None else f"{self.stream}:{self.seq}"

    def _lost(self) -> None:
        """The link broke: an outage starts unless one is running (or we never had one)."""
        if self.connects and not self._in_outage:
            self.outages.append([time.time(), None, None])
            self._in_outage = True

    def _watchdog(self) -> float:
        # js: no hello within 10 s, or silence for 2 × keepalive, means the link is dead.
        return 2 * self.keepalive + 1 if self._hello_this_session else self.opts.hello_timeout

    # -- the reconnect loop ------------------------------------------------------------

    async def run(self) -> None:
        session = {"ws": self._ws, "poll": self._poll, "sse": self._stream, "iframe": self._stream}
        token_retried = False
        while not self.stopping:
            self._hello_this_session = False
            try:
                reason = await session[self.transport]()
            except Fatal as e:
                self.fatal = str(e)
                self.ready.set()  # counted, so a fleet's readiness does not wait forever
                return
            except TokenRefused as e:
                if token_retried:
                    self.fatal = f"token: {e}"
                    self.ready.set()
                    return
                token_retried = True  # js: one fresh token per failure streak
                self.token = issue_token(self.shared.secret, self.key, self.opts.token_ttl)
                reason = f"token: {e}"
            except (
                OSError,
                EOFError,
                TimeoutError,
                HTTPError,
                ValueError,
            ) as e:
                reason = _describe(e)
            except Exception as e:  # noqa: BLE001 - a bug here must show in the report, not kill
                reason = f"bug: {_describe(e)}"
            if self.stopping:
                return
            if self._hello_this_session:
                token_retried = False
            self.errors[reason] += 1
            self._lost()
            delay = self._retry_delay(worked=self._hello_this_session,
                                      planned=reason == "reconnect frame")  # fmt: skip
            self.reconnects += 1
            await asyncio.sleep(delay)

    def _quick(self) -> bool:
        """js _quick: a quick reconnect only after hello, and after a connection that
        lasted STABLE or followed one that did."""
        if self._hello_at is None:
            return False
        if time.monotonic() - self._hello_at >= STABLE:
            self._short_quick = False
            return True
        if self._short_quick:
            return False
        self._short_quick = True
        return True

    def _retry_delay(self, worked: bool, planned: bool) -> float:
        """js _retry: after losing a connection that worked, the first retry comes
        FIRST_RETRY + random × spread (at once, random × spread, after a ``reconnect``
        frame) and does not count as a backoff attempt; otherwise the backoff."""
        quick = worked and self._quick()
        self._hello_at = None
        spread = (
            self.spread if self.spread is not None else min(DEFAULT_SPREAD, self.opts.backoff_max)
        )
        if quick and planned:
            return random.random() * spread
        if quick:
            return FIRST_RETRY + random.random() * spread
        delay = backoff_delay(self._attempt, self.opts.backoff_base, self.opts.backoff_max)
        self._attempt += 1
        return delay

    def _params(self, **extra: object) -> str:
        params: dict[str, object] = {"token": self.token}
        if (last := self.position()) is not None:
            params["last"] = last
        params.update(extra)
        return urlencode(params)

    def _address(self) -> tuple[str, int]:
        parts = urlsplit(self.base_url)
        return parts.hostname or "127.0.0.1", parts.port or 80

    # -- WebSocket ---------------------------------------------------------------------

    async def _ws(self) -> str:
        host, port = self._address()
        loop = asyncio.get_running_loop()
        acked = [0]
        outcome: list[str] = []
        ws: WSConn | None = None

        def on_message(message: bytes) -> None:
            if outcome:
                return
            frame = loads(message)
            if self.on_frame(frame) == "reconnect":
                outcome.append("reconnect frame")
                assert ws is not None
                ws.fail(EOFError("reconnect frame"))
            elif frame.get("type") == "event" and self.seq - acked[0] >= self.opts.ack_every:
                acked[0] = self.seq
                assert ws is not None
                ws.send_text(b'{"type":"ack","seq":%d}' % self.seq)

        ws = await open_conn(lambda: WSConn(loop, on_message), host, port,
                             self.opts.connect_timeout)  # fmt: skip
        acker: asyncio.Task[None] | None = None
        try:
            ws.upgrade(host, port, "/orbited/ws?" + self._params())
            try:
                await asyncio.wait_for(ws.upgraded(), self.opts.connect_timeout)
            except HTTPStatusError as e:
                if e.status == 401:
                    raise TokenRefused(str(e.status)) from None
                if e.status in (400, 403):
                    raise Fatal(f"http {e.status}") from None
                raise HTTPError(e.status, "") from None
            ws.watch(self._watchdog)
            acker = asyncio.create_task(self._ws_acker(ws, acked))
            try:
                await ws.closed
            except WSClosed as e:
                if e.code == 4001:
                    raise Fatal("replaced") from None
                if e.code == 4401:
                    raise TokenRefused(e.reason) from None
                if e.code == 4400:
                    raise Fatal(f"closed 4400 {e.reason}") from None
                return f"ws closed {e.code}"
            except EOFError:
                if outcome:
                    return outcome[0]
                return "ws closed None"
            return "ws closed None"
        finally:
            if acker is not None:
                acker.cancel()
            ws.abort()  # the node is done with us, or we with it: no handshake

    async def _ws_acker(self, ws: WSConn, acked: list[int]) -> None:
        while True:
            await asyncio.sleep(self.opts.ack_interval)
            if self.seq > acked[0]:
                acked[0] = self.seq
                ws.send_text(b'{"type":"ack","seq":%d}' % self.seq)

    # -- long-poll ---------------------------------------------------------------------

    async def _poll(self) -> str:
        host, port = self._address()
        conn: HTTPConn | None = None
        first = True
        try:
            while True:
                # js: the first poll of a session answers at once (timeout=0) with hello.
                timeout = 0 if first else self.opts.poll_timeout
                target = "/orbited/poll?" + self._params(timeout=f"{timeout:g}")
                limit = timeout + self.opts.hello_timeout
                for fresh in (False, True):
                    if conn is None or not conn.reusable or conn.closed.done():
                        if conn is not None:
                            conn.abort()
                        conn = await http_conn(host, port, self.opts.connect_timeout)
                        fresh = True
                    conn.send("GET", target)
                    try:
                        status, _ = await asyncio.wait_for(conn.head(), limit)
                        break
                    except (ConnectionError, EOFError):
                        # The server closed the idle keep-alive connection: a browser's
                        # fetch retries on a fresh one without telling the page.
                        conn.abort()
                        conn = None
                        if fresh:
                            raise
                assert conn is not None
                if status != 200:
                    raise await http_failure(conn, status)
                frames = loads(await asyncio.wait_for(conn.body(), limit))
                first = False
                for frame in frames:
                    if self.on_frame(frame) == "reconnect":
                        return "reconnect frame"
        finally:
            if conn is not None:
                conn.abort()

    # -- SSE and iframe ----------------------------------------------------------------

    async def _stream(self) -> str:
        host, port = self._address()
        conn = await http_conn(host, port, self.opts.connect_timeout)
        acker: asyncio.Task[None] | None = None
        try:
            if self.transport == "sse":
                target = "/orbited/sse?" + self._params()
                headers = {"Accept": "text/event-stream"}
            else:  # the node's own origin is always allowed (same-origin)
                origin = self.base_url.rstrip("/")
                target = "/orbited/iframe?" + self._params(origin=origin)
                headers = {}
            conn.send("GET", target, headers)
            status, _ = await asyncio.wait_for(conn.head(), self.opts.hello_timeout)
            if status != 200:
                raise await http_failure(conn, status)
            if self.opts.http_ack and self.shared.http_ack:
                acker = asyncio.create_task(self._http_acker())
            parse = _SSEParser() if self.transport == "sse" else _IframeParser()
            outcome: list[str] = []

            def on_chunk(chunk: bytes) -> None:
                if outcome:
                    return
                for frame in parse.feed(chunk):
                    if self.on_frame(frame) == "reconnect":
                        outcome.append("reconnect frame")
                        conn.fail(EOFError("reconnect frame"))
                        return

            conn.watch(self._watchdog)
            conn.stream(on_chunk)
            try:
                await conn.body()
            except EOFError:
                if not outcome:
                    raise
            # A reconnect frame in the response's last chunk: the body ends cleanly, and
            # this is still a planned move (js drops the connection on the frame itself).
            return outcome[0] if outcome else f"{self.transport} stream ended"
        finally:
            if acker is not None:
                acker.cancel()
            conn.abort()

    async def _http_acker(self) -> None:
        """SSE/iframe have no way back: ack over POST /orbited/ack (204) once a second."""
        host, port = self._address()
        conn: HTTPConn | None = None
        acked = 0
        try:
            while self.shared.http_ack:
                await asyncio.sleep(self.opts.ack_interval)
                if self.seq <= acked:
                    continue
                seq, stream = self.seq, self.stream
                if stream is None:
                    continue
                try:
                    if conn is None or not conn.reusable or conn.closed.done():
                        if conn is not None:
                            conn.abort()
                        conn = await http_conn(host, port, self.opts.connect_timeout)
                    last = f"{stream}:{seq}"  # the stream, so a stale ack confirms nothing new
                    query = urlencode({"token": self.token, "last": last})
                    conn.send("POST", "/orbited/ack?" + query)
                    status, _ = await asyncio.wait_for(conn.head(), 5.0)
                    await asyncio.wait_for(conn.body(), 5.0)
                except (OSError, EOFError, TimeoutError, ValueError):
                    if conn is not None:
                        conn.abort()
                    conn = None
                    continue  # the stream's own failure handling will notice a dead node
                if status == 404:
                    self.shared.http_ack = False  # no endpoint on this node: rely on resume
                elif status < 300:
                    acked = seq
                else:
                    self.errors[f"ack HTTP {status}"] += 1
        finally:
            if conn is not None:
                conn.abort()

    # -- report ------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key": list(self.key),
            "transport": self.transport,
            "url": self.base_url,
            "received": self.arrivals.runs,
            "count": self.arrivals.count,
            "max_n": self.max_n,
            "dups": self.dups,
            "dup_dropped": self.dup_dropped,
            "dup_sample": self.dup_sample,
            "out_of_order": self.out_of_order,
            "replayed": self.replayed,
            "foreign": self.foreign,
            "resets": self.resets,
            "absent_at_end": self.absent,
            "gaps": self.gaps,
            "reconnects": self.reconnects,
            "connects": self.connects,
            "outages": self.outages,
            "long_gaps": list(self.long_gaps),
            "late": list(self.late),
            "fatal": self.fatal,
            "position": self.position(),
            "errors": dict(self.errors),
            "sessions": dict(self.sessions),
            "resumed": self.resumed,
            "churn": dict(self.churn),
        }


def _http_failure(error: HTTPError) -> Exception:
    if error.status == 401:
        return TokenRefused(error.code)
    if error.status in (400, 403, 404):
        return Fatal(str(error))
    return error  # 5xx, proxies: retry with backoff


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ConnectionResetError):
        return "connection reset"
    if isinstance(e, asyncio.IncompleteReadError | EOFError):
        return "EOF"
    return f"{type(e).__name__}: {e}"[:80]


class _SSEParser:
    """text/event-stream: ``data:`` lines up to a blank line make one frame."""

    def __init__(self) -> None:
        self.buffer = b""
        self.data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        frames = []
        for line in lines:
            line = line.rstrip(b"\r")
            if not line:
                if self.data:
                    frames.append(loads(b"\n".join(self.data)))
                    self.data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self.data.append(value[1:] if value.startswith(b" ") else value)
            # comments (":") and id: lines need nothing: the position comes from seq
        return frames


class _IframeParser:
    """The forever-frame document: each frame is ``<script>f("<JSON as a JS string>")</script>``."""

    PREFIX, SUFFIX = b"<script>f(", b")</script>"

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [
            json.loads(json.loads(line[len(self.PREFIX) : -len(self.SUFFIX)]))
            for line in lines
            if line.startswith(self.PREFIX) and line.endswith(self.SUFFIX)
        ]


# -- churn (the soak test) ---------------------------------------------------------------


@dataclass
class Churn:
    """Each browser's page lives a random time (exponential, mean ``life`` s), then:

    - ``switch``: reconnects at once on another transport, resuming with ``last``;
    - ``away``: goes away for uniform [away_min, away_max] s (its mailbox lingers and,
      past the node's linger, expires: the return gets ``hello.reset``), then resumes,
      maybe on another transport;
    - ``new``: a brand-new key (``(user, "x<pid>.<n>", location)``, never seen before and
      never sent to by the web app) lives one page life, then the browser goes back to
      its own key, resuming: per-key state on the node that is never deleted shows up.

    Weights choose between the three."""

    life: float = 45.0
    switch: float = 2.0
    away: float = 1.0
    new: float = 1.0
    away_min: float = 5.0
    away_max: float = 60.0
    seed: int | None = None

    @classmethod
    def parse(cls, spec: str) -> Churn:
        """``"life=45,switch=2,away=1,new=1,away_min=5,away_max=60"`` (any subset)."""
        churn = cls()
        for part in filter(None, (x.strip() for x in spec.split(","))):
            name, _, value = part.partition("=")
            if name not in cls.__dataclass_fields__ or not value:
                raise ValueError(f"bad churn option {part!r}")
            setattr(churn, name, int(value) if name == "seed" else float(value))
        if churn.life <= 0 or churn.away_max < churn.away_min:
            raise ValueError("churn: life > 0 and away_min <= away_max")
        if (
            min(churn.switch, churn.away, churn.new) < 0
            or churn.switch + churn.away + churn.new <= 0
        ):
            raise ValueError("churn: weights must be >= 0, one of them > 0")
        return churn


@dataclass
class ChurnStats:
    fresh_keys: int = 0
    fresh_connects: int = 0
    fresh_fatal: int = 0
    fresh_sessions: Counter[str] = field(default_factory=Counter)


async def churn_slot(
    browser: Browser,
    transports: Sequence[str],
    url_for: Callable[[ConnectionKey], str],
    churn: Churn,
    stats: ChurnStats,
    rng: random.Random,
) -> None:
    """Run ``browser`` under ``churn`` until cancelled (see Churn)."""
    current = browser
    fresh_serial = 0
    while True:
        current.sessions[current.transport] += 1
        current.resumed += current.position() is not None
        task = asyncio.create_task(current.run())
        try:
            await asyncio.wait([task], timeout=rng.expovariate(1 / churn.life))
        finally:
            # Until it is done: a cancel can be swallowed (asyncio.wait_for's race in 3.11)
            # and the session would go on, holding this slot (and the fleet's stop) for ever.
            current.stopping = True
            while not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=1.0)
        current.stopping = False
        browser.ready.set()  # a first life without a hello (too short): ready all the same
        if current is not browser:  # a fresh key's one life is over: back to our own
            stats.fresh_connects += current.connects
            stats.fresh_fatal += current.fatal is not None
            current = browser
            current.transport = rng.choice(transports)
            current.churn["back"] += 1
            browser.absent = False
            continue
        if browser.fatal is not None:  # replaced or refused: a new page load, same key
            browser.churn["fatal"] += 1
            browser.fatal = None
            browser.stream, browser.seq = None, 0
        others = [t for t in transports if t != browser.transport] or list(transports)
        action = rng.choices(("switch", "away", "new"), (churn.switch, churn.away, churn.new))[0]
        browser.churn[action] += 1
        if action == "switch":
            browser.transport = rng.choice(others)
        elif action == "away":
            browser.absent = True
            await asyncio.sleep(rng.uniform(churn.away_min, churn.away_max))
            browser.absent = False
            browser.transport = rng.choice(transports)
        else:
            browser.absent = True
            fresh_serial += 1
            user, _, location = browser.key
            key = ConnectionKey(user, f"x{os.getpid()}.{fresh_serial}", location)
            current = Browser(key, rng.choice(transports), url_for(key), browser.shared)
            stats.fresh_keys += 1
            stats.fresh_sessions[current.transport] += 1


# -- a fleet of browsers in this process -------------------------------------------------


class Fleet:
    def __init__(
        self,
        browsers: Sequence[Browser],
        shared: Shared,
        churn: Churn | None = None,
        transports: Sequence[str] = TRANSPORTS,
        url_for: Callable[[ConnectionKey], str] | None = None,
    ) -> None:
        self.browsers = list(browsers)
        self.shared = shared
        self.started = time.time()
        self.loop_lag: list[float] = []
        self.churn = churn
        self.churn_stats = ChurnStats()
        self.transports = list(dict.fromkeys(transports))
        self.url_for = url_for

    @classmethod
    def build(
        cls,
        keys: Sequence[ConnectionKey],
        indices: Sequence[int],
        pattern: Sequence[str],
        url_for: Callable[[ConnectionKey], str],
        secret: bytes,
        options: Options | None = None,
        churn: Churn | None = None,
    ) -> Fleet:
        """Browsers for ``keys``; key j's transport is pattern[indices[j] % len(pattern)]
        (at first: with ``churn`` a browser moves through every transport of ``pattern``)."""
        shared = Shared(secret, options or Options())
        shared.http_ack = shared.options.http_ack
        browsers = [
            Browser(k, pattern[i % len(pattern)], url_for(k), shared)
            for k, i in zip(keys, indices, strict=True)
        ]
        return cls(browsers, shared, churn, pattern, url_for)

    async def run(
        self,
        stop: asyncio.Event,
        ready_file: Path | None = None,
        ramp: float = 500.0,
        progress: float = 0.0,
    ) -> None:
        """Connect everyone (``ramp`` per second), run until ``stop`` is set, then stop."""
        tasks: list[asyncio.Task[None]] = []
        helpers = [asyncio.create_task(self._measure_lag())]
        if ready_file is not None:
            helpers.append(asyncio.create_task(self._write_ready(ready_file)))
        if progress > 0:
            helpers.append(asyncio.create_task(self._progress(progress)))
        for i, browser in enumerate(self.browsers):
            if stop.is_set():
                break
            if self.churn is None:
                tasks.append(asyncio.create_task(browser.run()))
            else:
                assert self.url_for is not None
                seed = None if self.churn.seed is None else self.churn.seed * 1_000_003 + i
                driver = churn_slot(browser, self.transports, self.url_for, self.churn,
                                    self.churn_stats, random.Random(seed))  # fmt: skip
                tasks.append(asyncio.create_task(driver))
            if ramp > 0 and i % 50 == 49:  # connect in waves: no SYN flood on the node
                await asyncio.sleep(50 / ramp)
        await stop.wait()
        for browser in self.browsers:
            browser.stopping = True
        for t in tasks + helpers:
            t.cancel()
        await asyncio.wait(tasks + helpers, timeout=5)

    async def _write_ready(self, path: Path) -> None:
        await asyncio.gather(*(b.ready.wait() for b in self.browsers))
        info = {
            "pid": os.getpid(),
            "browsers": len(self.browsers),
            "connected": sum(1 for b in self.browsers if b.connects),
            "fatal": sum(1 for b in self.browsers if b.fatal),
            "seconds": time.time() - self.started,
        }
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(path)  # atomically: a reader never sees half a file

    async def _measure_lag(self) -> None:
        """How late the loop wakes up: if this grows, the clients are the bottleneck."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.1)
            self.loop_lag.append(loop.time() - before - 0.1)
            if len(self.loop_lag) > 100_000:
                del self.loop_lag[:50_000]

    async def _progress(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            b = self.browsers
            print(
                f"browsers[{os.getpid()}] t={time.time() - self.started:.0f}s "
                f"ready={sum(1 for x in b if x.connects)}/{len(b)} events={self.shared.events} "
                f"dups={sum(x.dups for x in b)} reconnects={sum(x.reconnects for x in b)} "
                f"in_outage={sum(1 for x in b if x._in_outage)} "
                f"sessions={sum(sum(x.sessions.values()) for x in b)} "
                f"lag_max={max(self.loop_lag[-50:], default=0) * 1000:.0f}ms",
                file=sys.stderr,
                flush=True,
            )

    def report(self) -> dict[str, Any]:
        clients = [b.report() for b in self.browsers]
        totals: dict[str, dict[str, int]] = {}
        for c in clients:
            t = totals.setdefault(c["transport"], Counter())  # type: ignore[arg-type]
            t["clients"] += 1
            for field_name in ("count", "dups", "dup_dropped", "out_of_order", "resets",
                               "reconnects", "foreign"):  # fmt: skip
                t[field_name] += c[field_name]
            t["gaps"] += len(c["gaps"])
            t["fatal"] += c["fatal"] is not None
        return {
            "pid": os.getpid(),
            "started": self.started,
            "ended": time.time(),
            "cpu_seconds": time.process_time(),
            "options": asdict(self.shared.options),
            "http_ack": self.shared.http_ack,
            "loop_lag": spread(self.loop_lag),
            "latency": {t: spread(v) for t, v in self.shared.latencies.items()},
            "totals": {t: dict(v) for t, v in totals.items()},
            "churn": None if self.churn is None else self._churn_report(clients),
            "clients": clients,
        }

    def _churn_report(self, clients: list[dict[str, Any]]) -> dict[str, Any]:
        sessions: Counter[str] = Counter()
        actions: Counter[str] = Counter()
        for c in clients:
            sessions.update(c["sessions"])
            actions.update(c["churn"])
        fresh = self.churn_stats
        return {
            "options": asdict(self.churn) if self.churn else None,
            "sessions": dict(sessions),  # own keys, by transport
            "resumed": sum(c["resumed"] for c in clients),
            "connects": sum(c["connects"] for c in clients),
            "actions": dict(actions),
            "fresh_keys": fresh.fresh_keys,
            "fresh_sessions": dict(fresh.fresh_sessions),
            "fresh_connects": fresh.fresh_connects,
            "fresh_fatal": fresh.fresh_fatal,
        }


# -- processes ---------------------------------------------------------------------------


def write_json(path: Path, value: object) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(value, separators=(",", ":")))
    tmp.replace(path)


class BrowserProcesses:
    """For tests and benchmarks: ``procs`` subprocesses sharing ``count`` keys.

    ``args`` are the common CLI flags (--secret-file, --url or --halod-browser-base,
    --prefix, --transports, ...); each process gets its --offset/--count slice, its own
    ready and report file in ``folder``."""

    def __init__(
        self, folder: Path, count: int, procs: int, args: Sequence[str], offset: int = 0
    ) -> None:
        self.folder = Path(folder)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ready_files: list[Path] = []
        self.report_files: list[Path] = []
        per = -(-count // procs)
        for i in range(procs):
            start = offset + i * per
            n = min(per, offset + count - start)
            if n <= 0:
                break
            ready, report = self.folder / f"browsers-{i}.ready", self.folder / f"browsers-{i}.json"
            ready.unlink(missing_ok=True)
            report.unlink(missing_ok=True)
            self.ready_files.append(ready)
            self.report_files.append(report)
            log = (self.folder / f"browsers-{i}.log").open("ab")
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bench.browsers",
                        *args,
                        "--offset",
                        str(start),
                        "--count",
                        str(n),
                        "--ready-file",
                        str(ready),
                        "--report",
                        str(report),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

    def wait_ready(self, timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while not all(f.exists() for f in self.ready_files):
            dead = [p for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"browsers not ready: {self.logs()}")
            time.sleep(0.05)
        return [json.loads(f.read_text()) for f in self.ready_files]

    def stop(self, timeout: float = 20.0) -> list[dict]:
        """SIGTERM everyone; return their reports (one per process)."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        missing = [f for f in self.report_files if not f.exists()]
        if missing:
            raise RuntimeError(f"no report in {missing}: {self.logs()}")
        return [json.loads(f.read_text()) for f in self.report_files]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)

    def logs(self) -> str:
        return "\n".join(f.read_text()[-3000:] for f in sorted(self.folder.glob("browsers-*.log")))

    @staticmethod
    def clients(reports: Sequence[dict]) -> list[dict]:
        return [c for r in reports for c in r["clients"]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.browsers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="one node's browser listener, http://host:port")
    where.add_argument(
        "--halod-browser-base",
        metavar="HOST:PORT",
        help="HaloD's browser port for route 1 (route r at +r-1)",
    )
    p.add_argument("--routes", type=int, default=DEFAULT_ROUTES, help="HaloD's route count")
    p.add_argument("--hash-version", type=int, choices=(1, 2), default=2,
                   help="the cluster's hash version: each key's first route (a reconnect "
                   "frame's route is followed, as js/orbited.js's locate)")  # fmt: skip
    p.add_argument("--secret-file", type=Path, required=True)
    p.add_argument("--prefix", default="b", help="keys are (PREFIX<i>, 's', '/bench')")
    p.add_argument("--count", type=int, default=250, help="browsers in this process")
    p.add_argument("--offset", type=int, default=0, help="index of this process's first key")
    p.add_argument("--keys-file", type=Path, help="JSON [[user, session, location], ...] instead")
    p.add_argument("--transports", default="ws", help="ratio, e.g. ws=2,poll=1,sse=1,iframe=0")
    p.add_argument("--duration", type=float, default=0, help="seconds; 0 = until SIGTERM")
    p.add_argument("--report", type=Path, required=True)
    p.add_argument("--ready-file", type=Path, help="written once every browser had its hello")
    p.add_argument("--progress", type=float, default=0, help="a counter line to stderr every S")
    p.add_argument("--ramp", type=float, default=500, help="new connections per second")
    p.add_argument("--backoff-base", type=float, default=0.2)
    p.add_argument("--backoff-max", type=float, default=2.0)
    p.add_argument("--poll-timeout", type=float, default=25.0)
    p.add_argument("--no-http-ack", action="store_true", help="SSE/iframe: never POST acks")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                   help="event loop: uvloop (half the CPU per event; asyncio if it is not "
                   "installed) or asyncio")  # fmt: skip
    p.add_argument("--churn", metavar="SPEC", help="churn mode, e.g. life=45,switch=2,away=1,"
                   "new=1,away_min=5,away_max=60 (class Churn); '' = the defaults")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.keys_file:
        everyone = read_keys(args.keys_file)
        keys = everyone[args.offset : args.offset + args.count]
    else:
        keys = make_keys(args.prefix, args.count, args.offset)
    url_for = (
        single_node_urls(args.url)
        if args.url
        else halod_urls(args.halod_browser_base, args.routes, args.hash_version)
    )
    options = Options(
        backoff_base=args.backoff_base,
        backoff_max=args.backoff_max,
        poll_timeout=args.poll_timeout,
        http_ack=not args.no_http_ack,
    )
    pattern = [t for t in transport_pattern(args.transports)]
    indices = range(args.offset, args.offset + len(keys))
    churn = None if args.churn is None else Churn.parse(args.churn)
    fleet = Fleet.build(
        keys, indices, pattern, url_for, load_secret(args.secret_file), options, churn
    )
    if args.halod_browser_base:  # a reconnect frame's route leads to that route's port
        fleet.shared.locate = route_urls(args.halod_browser_base)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if args.duration > 0:
            loop.call_later(args.duration, stop.set)
        await fleet.run(stop, args.ready_file, args.ramp, args.progress)

    run_loop(run(), args.loop)
    write_json(args.report, fleet.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
