"""HaloD's dashboard (docs/halod.md, "The dashboard"): the page, its JSON snapshot and
its live feed (server-sent events), served on the status port.

``snapshot`` and the event bodies are pure functions of a ``DashboardView`` (plain
values the shell collects). ``DashboardFeed`` keeps the open event streams: after a
change it pushes ``table`` (with ``summary`` if it changed), ``incident`` and (on a
change of node state) ``nodes`` in the
next reactor turn, at most once per ``COALESCE`` seconds; ``nodes`` and ``summary``
every ``NODES_EVERY`` seconds, a comment every ``KEEPALIVE`` seconds; and it closes a
stream whose connection has more than ``MAX_UNSENT`` bytes it could not send (a reader
that does not read). ``OperatorAuth`` is the rule for the operator requests (POSTs and
``/trace``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from halod.svg import PALETTE
from orbited import __version__
from orbited.runtime.web import send_error

COALESCE = 0.1  # seconds: at most one table/incident push per this long
NODES_EVERY = 1.0  # seconds between `nodes` events
KEEPALIVE = 15.0  # seconds between `:keepalive` comments
MAX_UNSENT = 1 << 20  # bytes a stream may have waiting to be sent; then it is closed
RETRY_MS = 1000  # the EventSource's reconnect delay
TIMELINE_SHOWN = 100  # incidents in a snapshot and diffed per push
DEFAULT_STREAMS = 32  # halod.config dashboard_streams

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
STATIC = {  # path below /dashboard → (package file, content type)
    "": ("dashboard.html", "text/html; charset=utf-8"),
    "app.js": ("app.js", "text/javascript; charset=utf-8"),
    "app.css": ("app.css", "text/css; charset=utf-8"),
}


def secure(request: Request, cache: bytes = b"no-store") -> None:
    """The headers of every dashboard response."""
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"referrer-policy", b"no-referrer")
    request.setHeader(b"cache-control", cache)
    request.setHeader(b"content-security-policy", CSP.encode())


# -- the view and its JSON ------------------------------------------------------------------


@dataclass(frozen=True)
class DashboardView:
    """What the dashboard shows, as plain values (built by the shell, halod.server)."""

    name: str  # this HaloD (etcd name; "" solo)
    status: Mapping[str, Any]  # halod.server.HaloD.status(): role, nodes, failed, …
    owners: Sequence[str | None]  # route r's owner at index r - 1
    in_flight: Mapping[int, float] = field(default_factory=dict)  # route → since
    loads: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # NodeLoad.to_json
    totals: Mapping[str, Any] = field(default_factory=dict)  # ClusterLoad.totals
    timeline: Sequence[Mapping[str, Any]] = ()  # Timeline.to_json, newest first
    live: bool = True  # leading: the nodes' figures are live (a follower has none)
    operator_required: bool = False  # an operator key is configured


def summary_json(view: DashboardView) -> dict[str, Any]:
    s = view.status
    return {
        "role": s.get("role"), "leader": s.get("leader"), "etcd": s.get("etcd"),
        "warnings": list(s.get("warnings", ())), "policy": s.get("policy"),
        "spares": s.get("spares"), "spares_wanted": s.get("spares_wanted"),
        "failovers": s.get("failovers"), "table_version": s.get("table_version"),
        "routes": s.get("routes"), "hash_version": s.get("hash_version"),
        "failed": list(s.get("failed", ())), "moving": list(s.get("moving", ())),
    }  # fmt: skip


def table_json(view: DashboardView) -> dict[str, Any]:
    return {
        "version": view.status.get("table_version"),
        "owners": list(view.owners),
        "in_flight": {str(r): round(t, 3) for r, t in sorted(view.in_flight.items())},
    }


def nodes_json(view: DashboardView, now: float) -> dict[str, Any]:
    rows = []
    connections = mailboxes = 0
    for n in view.status.get("nodes", ()):
        load = view.loads.get(n["name"], {}) if view.live else {}
        conns = n.get("connections") if view.live else None
        boxes = n.get("mailboxes") if view.live else None
        if n.get("connected") and conns is not None:
            connections += conns
        if n.get("connected") and boxes is not None:
            mailboxes += boxes
        rows.append({
            "name": n["name"], "id": n.get("id"), "state": n.get("state"),
            "connected": n.get("connected"), "ranges": n.get("ranges"),
            "routes_count": len(n.get("routes", ())), "connections": conns,
            "mailboxes": boxes,
            "lingering": None if conns is None or boxes is None else max(0, boxes - conns),
            "capacity": n.get("capacity"), "heartbeat_age": n.get("last_heartbeat_age"),
            "disconnected_for": n.get("disconnected_for"), "suspected": n.get("suspected"),
            "events_per_s": load.get("events_per_s"),
            "deliveries_per_s": load.get("deliveries_per_s"),
            "ack_p50_ms": load.get("ack_p50_ms"), "ack_p99_ms": load.get("ack_p99_ms"),
            "spark": list(load.get("spark", ())), "routes": dict(load.get("routes", {})),
        })  # fmt: skip
    t = view.totals if view.live else {}
    totals = {
        "connections": connections if view.live else None,
        "mailboxes": mailboxes if view.live else None,
        "lingering": max(0, mailboxes - connections) if view.live else None,
        "events_per_s": t.get("events_per_s"), "deliveries_per_s": t.get("deliveries_per_s"),
        "ack_p50_ms": t.get("ack_p50_ms"), "ack_p99_ms": t.get("ack_p99_ms"),
    }  # fmt: skip
    return {"at": round(now, 3), "live": view.live, "nodes": rows, "totals": totals}


def snapshot(view: DashboardView, now: float) -> dict[str, Any]:
    """``GET /dashboard/state``, and the event stream's ``snapshot``."""
    s = view.status
    return {
        "v": 1,
        "halod": {
            "name": view.name,
            "role": s.get("role"),
            "version": __version__,
            "uptime": s.get("uptime"),
        },  # fmt: skip
        "operator": {"required": view.operator_required},
        "palette": list(PALETTE),
        "routes": s.get("routes"),
        "summary": summary_json(view),
        "table": table_json(view),
        "nodes": nodes_json(view, now),
        "timeline": [dict(i) for i in view.timeline[:TIMELINE_SHOWN]],
        "dataplane": s.get("dataplane"),
    }


def sse(event: str | None, data: Any, event_id: int | None = None) -> bytes:
    """One server-sent event (``data`` as one JSON line), or a comment (``event`` None)."""
    if event is None:
        return f":{data}\n\n".encode()
    line = json.dumps(data, separators=(",", ":"), allow_nan=False)
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {line}\n\n".encode()


# -- the feed ------------------------------------------------------------------------------


@implementer(IPushProducer)
class _Stream:
    """One open ``/dashboard/events`` response; the connection's producer, so a reader
    that stops reading pauses it and what piles up meanwhile is counted."""

    def __init__(self, feed: DashboardFeed, request: Request) -> None:
        self.feed = feed
        self.request = request
        self.paused = False
        self.unsent = 0  # bytes written while the connection was paused
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if self.paused:
            self.unsent += len(data)
            if self.unsent > self.feed.max_unsent:
                self.feed.log.info("dashboard stream closed: its reader does not read")
                self.feed.stats["slow_closed"] += 1
                self.abort()
                return
        self.request.write(data)

    def abort(self) -> None:
        self.closed = True
        self.feed.drop(self)
        transport = getattr(self.request, "transport", None)
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()
        elif transport is not None:
            transport.loseConnection()

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False
        self.unsent = 0

    def stopProducing(self) -> None:  # noqa: N802
        self.closed = True
        self.feed.drop(self)


class DashboardFeed:
    """The open event streams of one HaloD and what they were last sent."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        view: Callable[[], DashboardView],
        max_streams: int = DEFAULT_STREAMS,
        max_unsent: int = MAX_UNSENT,
    ) -> None:
        self.clock = clock
        self.view = view
        self.max_streams = max_streams
        self.max_unsent = max_unsent
        self.streams: list[_Stream] = []
        self.stats = {"opened": 0, "refused": 0, "slow_closed": 0}
        self._id = 0
        self._push_call: IDelayedCall | None = None
        self._pushed_at: float | None = None  # the last push after a change
        self._nodes_call: IDelayedCall | None = None
        self._keepalive_call: IDelayedCall | None = None
        self._sent_role: tuple[Any, ...] | None = None
        self._sent_table: dict[str, Any] | None = None
        self._sent_incidents: dict[int, Mapping[str, Any]] = {}
        self._sent_states: list[tuple[Any, ...]] | None = None
        self._sent_summary: dict[str, Any] | None = None
        self._sent_routes: dict[str, dict[str, int]] = {}  # node → its routes last sent

    def subscribe(self, request: Request) -> bool:
        """Start streaming to ``request`` (headers already set); False: too many open."""
        if len(self.streams) >= self.max_streams:
            self.stats["refused"] += 1
            return False
        stream = _Stream(self, request)
        request.registerProducer(stream, True)
        self.streams.append(stream)
        self.stats["opened"] += 1
        request.notifyFinish().addBoth(self._finished, stream)
        view = self.view()
        if len(self.streams) == 1:
            self._remember(view)  # the state the streams start from
        stream.write(f"retry: {RETRY_MS}\n\n".encode())
        stream.write(self._event("snapshot", snapshot(view, self.clock.seconds())))
        self._start_timers()
        return True

    def changed(self) -> None:
        """Something shown may have changed: push what did in the next reactor turn, or,
        within COALESCE seconds of the last push, COALESCE after it (one push for all)."""
        if self.streams and self._push_call is None:
            wait = 0.0
            if self._pushed_at is not None:
                wait = max(0.0, self._pushed_at + COALESCE - self.clock.seconds())
            self._push_call = self.clock.callLater(wait, self._push)

    def drop(self, stream: _Stream) -> None:
        if stream in self.streams:
            self.streams.remove(stream)
        if not self.streams:
            self._stop_timers()

    def close(self) -> None:
        """HaloD stops: end every stream."""
        for stream in list(self.streams):
            stream.closed = True
            try:
                stream.request.unregisterProducer()
                stream.request.finish()
            except Exception:  # noqa: S110 - already gone
                pass
        self.streams.clear()
        self._stop_timers()

    # -- inside ----------------------------------------------------------------------------

    def _finished(self, result: None | Failure, stream: _Stream) -> None:
        stream.closed = True
        self.drop(stream)

    def _event(self, name: str, data: Any) -> bytes:
        self._id += 1
        return sse(name, data, self._id)

    def _broadcast(self, data: bytes) -> None:
        for stream in list(self.streams):
            stream.write(data)

    def _remember(self, view: DashboardView) -> None:
        s = view.status
        self._sent_role = (s.get("role"), json.dumps(s.get("leader"), sort_keys=True), view.live)
        self._sent_table = table_json(view)
        self._sent_incidents = {int(i["id"]): i for i in view.timeline[:TIMELINE_SHOWN]}
        self._sent_states = _states(view)
        self._sent_summary = summary_json(view)
        self._sent_routes = {
            row["name"]: row["routes"] for row in nodes_json(view, 0.0)["nodes"]
        }  # fmt: skip

    def _push(self) -> None:
        self._push_call = None
        if not self.streams:
            return
        self._pushed_at = self.clock.seconds()
        view = self.view()
        now = self.clock.seconds()
        s = view.status
        role = (s.get("role"), json.dumps(s.get("leader"), sort_keys=True), view.live)
        if role != self._sent_role:  # a change of leadership: everything again
            self._remember(view)
            self._broadcast(self._event("snapshot", snapshot(view, now)))
            return
        table = table_json(view)
        if table != self._sent_table:
            self._sent_table = table
            self._broadcast(self._event("table", table))
            self._summary(view)  # its ``moving``: what the legend and a cell's hover say
        fresh = view.timeline[:TIMELINE_SHOWN]
        for incident in reversed(fresh):  # oldest first
            sent = self._sent_incidents.get(int(incident["id"]))
            if sent is not incident and sent != incident:
                self._broadcast(self._event("incident", dict(incident)))
        self._sent_incidents = {int(i["id"]): i for i in fresh}
        if _states(view) != self._sent_states:
            self._nodes(view, now)

    def _nodes(self, view: DashboardView, now: float) -> None:
        self._sent_states = _states(view)
        body = nodes_json(view, now)
        for row in body["nodes"]:  # a node's routes only when they changed (they can be many)
            if self._sent_routes.get(row["name"]) == row["routes"]:
                del row["routes"]
            else:
                self._sent_routes[row["name"]] = row["routes"]
        self._broadcast(self._event("nodes", body))
        self._summary(view)

    def _summary(self, view: DashboardView) -> None:
        summary = summary_json(view)
        if summary != self._sent_summary:
            self._sent_summary = summary
            self._broadcast(self._event("summary", summary))

    def _nodes_tick(self) -> None:
        self._nodes_call = None
        if not self.streams:
            return
        self._nodes_call = self.clock.callLater(NODES_EVERY, self._nodes_tick)
        self._nodes(self.view(), self.clock.seconds())

    def _keepalive(self) -> None:
        self._keepalive_call = None
        if not self.streams:
            return
        self._keepalive_call = self.clock.callLater(KEEPALIVE, self._keepalive)
        self._broadcast(sse(None, "keepalive"))

    def _start_timers(self) -> None:
        if self._nodes_call is None:
            self._nodes_call = self.clock.callLater(NODES_EVERY, self._nodes_tick)
        if self._keepalive_call is None:
            self._keepalive_call = self.clock.callLater(KEEPALIVE, self._keepalive)

    def _stop_timers(self) -> None:
        for name in ("_push_call", "_nodes_call", "_keepalive_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)


def _states(view: DashboardView) -> list[tuple[Any, ...]]:
    """What makes a `nodes` event due at once: a node's state, connection or suspicion."""
    return [
        (n["name"], n.get("state"), n.get("connected"), json.dumps(n.get("suspected")))
        for n in view.status.get("nodes", ())
    ]


# -- operator requests ---------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str


class OperatorAuth:
    """Who may drain, undrain, rehash and trace (docs/halod.md, "Operator key").

    Without a key: requests from web pages (``Origin``, or a cross-site
    ``Sec-Fetch-Site``) are refused, as before. With a key: ``Authorization: Bearer
    <key>`` is required, and a request from a page must come from the dashboard itself
    (``Origin`` equal to the status port's own origin)."""

    def __init__(self, key: bytes | None) -> None:
        self.key = key

    @property
    def required(self) -> bool:
        return self.key is not None

    def refusal(self, request: Request) -> Refusal | None:
        if self.key is None:
            if from_web_page(request):
                return Refusal(403, "cross_site",
                               "operator requests are refused from web pages (Origin or "
                               "Sec-Fetch-Site sent); set operator_key_file to use the "
                               "dashboard")  # fmt: skip
            return None
        if not same_origin(request):
            return Refusal(403, "cross_site", "operator requests from another site are refused")
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
            return Refusal(401, "unauthorized", "this needs the operator key "
                           "(Authorization: Bearer <key>)")  # fmt: skip
        return None

    def refuse(self, request: Request) -> bytes | None:
        """The error body to answer with, or None when the request may proceed."""
        refusal = self.refusal(request)
        if refusal is None:
            return None
        if refusal.status == 401:
            request.setHeader(b"www-authenticate", b'Bearer realm="halod"')
        return send_error(request, refusal.status, refusal.code, refusal.message)


def from_web_page(request: Request) -> bool:
    """Browsers send Origin (or Sec-Fetch-Site) with every POST; the halod CLI and scripts
    do not (docs/security.md, "What HaloD trusts from nodes")."""
    if request.getHeader(b"origin") is not None:
        return True
    site = request.getHeader(b"sec-fetch-site")
    return site is not None and site != b"none"


def same_origin(request: Request) -> bool:
    """No ``Origin`` (a script, or a same-origin GET), or the status port's own origin;
    and no ``Sec-Fetch-Site`` naming another site."""
    site = request.getHeader(b"sec-fetch-site")
    if site is not None and site not in (b"none", b"same-origin"):
        return False
    origin = request.getHeader(b"origin")
    if origin is None:
        return True
    host = request.getHeader(b"host")
    if host is None:
        return False
    proto = (request.getHeader(b"x-forwarded-proto") or b"").strip().lower()
    scheme = b"https" if proto == b"https" else b"http"
    return origin.strip().lower() == scheme + b"://" + host.strip().lower()


# -- resources -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _File:
    body: bytes
    content_type: str
    etag: bytes


def _load_static() -> dict[str, _File]:
    base = resources.files("halod") / "static"
    files = {}
    for path, (name, content_type) in STATIC.items():
        body = (base / name).read_bytes()
        etag = b'"' + hashlib.sha256(body).hexdigest().encode() + b'"'
        files[path] = _File(body, content_type, etag)
    return files


class DashboardResource(Resource):
    """``/dashboard`` and below: the page and its files, ``state`` and ``events``; any
    other path 404, any method but GET and HEAD 405 (JSON errors)."""

    isLeaf = True

    def __init__(self, feed: DashboardFeed) -> None:
        super().__init__()
        self.feed = feed
        self.files = _load_static()

    def render(self, request: Request) -> bytes | int:
        secure(request)  # errors too
        parts = [p.decode("utf-8", "replace") for p in request.postpath or ()]
        path = "/".join(parts)
        if path not in STATIC and path not in ("state", "events"):
            return send_error(request, 404, "not_found", "no such resource")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            method = request.method.decode("ascii", "replace")[:32]
            return send_error(request, 405, "method_not_allowed", f"{method} is not supported here")
        head = request.method == b"HEAD"  # the headers only (twisted.web warns of a body)
        if path == "state":
            request.setHeader(b"content-type", b"application/json")
            if head:
                return b""
            view = self.feed.view()
            return json.dumps(snapshot(view, self.feed.clock.seconds())).encode()
        if path == "events":
            return self._events(request)
        file = self.files[path]
        secure(request, b"no-cache")
        request.setHeader(b"etag", file.etag)
        request.setHeader(b"content-type", file.content_type.encode())
        match = request.getHeader(b"if-none-match")
        if match is not None and file.etag in [m.strip() for m in match.split(b",")]:
            request.setResponseCode(304)
            return b""
        return b"" if head else file.body

    def _events(self, request: Request) -> bytes | int:
        if request.method == b"HEAD":
            request.setHeader(b"content-type", b"text/event-stream")
            return b""
        if len(self.feed.streams) >= self.feed.max_streams:
            self.feed.stats["refused"] += 1
            request.setHeader(b"retry-after", b"5")
            return send_error(request, 503, "too_many_streams",
                              f"{self.feed.max_streams} dashboard streams are open "
                              "(dashboard_streams)")  # fmt: skip
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"x-accel-buffering", b"no")  # nginx: do not buffer the stream
        self.feed.subscribe(request)
        return NOT_DONE_YET
