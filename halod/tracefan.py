"""``GET /trace``: ask every connected node that traces for a user's keys, and merge.

HaloD sends ``trace_query`` to each node that announced the ``trace`` feature (active,
spare and drained alike: a drained node still holds lingering mailboxes) and answers when
all have replied or after ``trace_timeout`` seconds, whichever is first; a node whose
connection is lost meanwhile counts as missing at once. At most ``MAX_PENDING`` queries
run at a time (then 503 ``busy``). Merging and the verdicts are orbited.core.traceview's,
so HaloD, ``orbited trace`` and the dashboard say the same (docs/halod.md, "Tracing").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from halod.dashboard import OperatorAuth, secure
from orbited.core.control import MAX_QID, ControlError, TraceQuery, TraceReply, trace_query
from orbited.core.traceview import merge_keys, verdicts
from orbited.runtime.web import JSONResource, send_error

TRACE_TIMEOUT = 1.0  # seconds /trace waits for the nodes (halod.config trace_timeout)
MAX_PENDING = 8  # trace queries in flight at once; more: 503 busy
INCIDENT_MARGIN = 60.0  # seconds after a key's last record an incident still explains it


class Busy(Exception):
    """MAX_PENDING queries are running."""


@dataclass(frozen=True)
class Gathered:
    asked: list[str]
    replies: dict[str, dict[str, Any]]
    missing: list[dict[str, str]]


@dataclass
class _Wait:
    query: TraceQuery
    asked: list[str]
    deferred: defer.Deferred[Gathered]
    timer: IDelayedCall | None = None
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)


class TraceFanout:
    """Trace queries in flight, by ``qid``."""

    def __init__(self, clock: IReactorTime, timeout: float = TRACE_TIMEOUT,
                 max_pending: int = MAX_PENDING) -> None:  # fmt: skip
        self.clock = clock
        self.timeout = timeout
        self.max_pending = max_pending
        self.pending: dict[int, _Wait] = {}
        self._qid = 0

    def ask(self, query: TraceQuery, targets: Mapping[str, Callable[[TraceQuery], None]]
            ) -> defer.Deferred[Gathered]:  # fmt: skip
        """Send ``query`` (its qid replaced) to each target; raises Busy."""
        if len(self.pending) >= self.max_pending:
            raise Busy
        self._qid = self._qid + 1 if self._qid < MAX_QID else 1
        qid = self._qid
        query = TraceQuery(qid, query.user, query.session, query.location, query.event,
                           query.limit)  # fmt: skip
        wait = _Wait(query, sorted(targets), defer.Deferred())
        self.pending[qid] = wait
        for name in wait.asked:
            try:
                targets[name](query)
            except Exception as e:  # a connection closing under us: missing, not an error
                wait.missing[name] = f"could not be asked ({e})"
        wait.timer = self.clock.callLater(self.timeout, self._timeout, qid)
        self._maybe_done(qid)
        return wait.deferred

    def reply(self, name: str, msg: TraceReply) -> None:
        """A node's ``trace_reply``; one for an unknown query or node is dropped."""
        wait = self.pending.get(msg.qid)
        if wait is None or name not in wait.asked or name in wait.missing:
            return
        wait.replies[name] = msg.answer
        self._maybe_done(msg.qid)

    def lost(self, name: str) -> None:
        """``name``'s control connection is gone: every query waiting for it gives up on it."""
        for qid, wait in list(self.pending.items()):
            if name in wait.asked and name not in wait.replies and name not in wait.missing:
                wait.missing[name] = "its control connection was lost"
                self._maybe_done(qid)

    def cancel(self) -> None:
        """This HaloD stops leading or stops: every waiting query answers with what it has."""
        for qid in list(self.pending):
            self._finish(qid, "this HaloD stopped leading")

    def _timeout(self, qid: int) -> None:
        wait = self.pending.get(qid)
        if wait is not None:
            wait.timer = None
            self._finish(qid, f"no reply in {self.timeout:g} s")

    def _maybe_done(self, qid: int) -> None:
        wait = self.pending[qid]
        if all(n in wait.replies or n in wait.missing for n in wait.asked):
            self._finish(qid, "")

    def _finish(self, qid: int, why: str) -> None:
        wait = self.pending.pop(qid)
        if wait.timer is not None and wait.timer.active():
            wait.timer.cancel()
        for name in wait.asked:
            if name not in wait.replies and name not in wait.missing:
                wait.missing[name] = why
        missing = [{"name": n, "why": wait.missing[n]} for n in wait.asked if n in wait.missing]
        wait.deferred.callback(Gathered(wait.asked, wait.replies, missing))


def trace_answer(
    query: TraceQuery,
    gathered: Gathered,
    failed_nodes: Sequence[Mapping[str, Any]],
    owners: Sequence[str | None],
    incidents: Callable[[set[int], float, float], list[dict[str, Any]]],
) -> dict[str, Any]:
    """``/trace``'s JSON (docs/halod-protocol.md, "Status endpoints"): the nodes' answers
    merged per key (``owner_now`` from the table when the route is known), the incidents
    that moved those routes while the records span, and a verdict per event and key."""
    keys = merge_keys(gathered.replies)
    routes: set[int] = set()
    times: list[float] = []
    for entry in keys:
        route = entry.get("route")
        if isinstance(route, int) and 1 <= route <= len(owners):
            entry["owner_now"] = owners[route - 1]
            routes.add(route)
        for row in entry["dispatches"] + entry["notes"]:
            t = row.get("t")
            if isinstance(t, int | float) and not isinstance(t, bool):
                times.append(float(t))
    failed = [dict(f) for f in failed_nodes]
    return {
        "query": {"user": query.user, "session": query.session, "location": query.location,
                  "event": query.event},  # fmt: skip
        "asked": gathered.asked,
        "answered": sorted(gathered.replies),
        "missing": gathered.missing,
        # nodes whose answer was cut to fit a control message (the oldest records left out)
        "truncated": sorted(n for n, a in gathered.replies.items() if a.get("truncated") is True),
        "failed_nodes": failed,
        "keys": keys,
        "incidents": incidents(routes, min(times), max(times) + INCIDENT_MARGIN)
        if routes and times else [],
        "verdicts": verdicts(keys, query.event, failed),
    }  # fmt: skip


def query_from(request: Request) -> TraceQuery:
    """The query of ``GET /trace?user=U[&session=S&location=L][&event=E][&limit=N]``;
    ValueError (400 bad_request) names what is wrong."""
    allowed = {b"user", b"session", b"location", b"event", b"limit"}
    args = request.args or {}
    unknown = sorted(k.decode("latin-1") for k in args if k not in allowed)
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r}")
    values: dict[str, str | None] = {}
    for name in allowed:
        given = args.get(name, [])
        if len(given) > 1:
            raise ValueError(f"{name.decode()} is given twice")
        try:
            values[name.decode()] = given[0].decode("utf-8") if given else None
        except UnicodeDecodeError:
            raise ValueError(f"{name.decode()} is not UTF-8") from None
    if not values["user"]:
        raise ValueError("user is required")
    limit = values["limit"]
    if limit is not None and not (limit.isascii() and limit.isdigit()):
        raise ValueError("limit must be a positive integer")
    # session and location: empty means any; an empty event is refused (1-128 characters)
    return trace_query(0, values["user"], values["session"] or None,
                       values["location"] or None, values["event"],
                       int(limit) if limit is not None else None)  # fmt: skip


def not_leader(request: Request, message: str, leader: Mapping[str, Any] | None) -> bytes:
    """409 ``not_leader`` with the leader's name and status address, when known."""
    request.setResponseCode(409)
    request.setHeader(b"content-type", b"application/json")
    error: dict[str, Any] = {"code": "not_leader", "message": message}
    if leader is not None:
        error["leader"] = {"name": leader.get("name"), "status": leader.get("status")}
    return json.dumps({"error": error}).encode()


TraceStart = Callable[[TraceQuery], "defer.Deferred[dict[str, Any]]"]


class TraceResource(JSONResource):
    """``GET /trace``: operator requests only (``OperatorAuth``). ``start`` raises
    ControlError ``not_leader`` (409) or Busy (503)."""

    def __init__(self, auth: OperatorAuth, start: TraceStart,
                 leader: Callable[[], Mapping[str, Any] | None]) -> None:  # fmt: skip
        super().__init__()
        self.auth = auth
        self.start = start
        self.leader = leader

    def render(self, request: Request) -> bytes | int:
        secure(request)  # errors too
        return super().render(request)

    def render_HEAD(self, request: Request) -> bytes:  # noqa: N802
        """The GET's checks and status, without asking the nodes (and without a body)."""
        if self.auth.refuse(request) is None:
            try:
                query_from(request)
                request.setHeader(b"content-type", b"application/json")
            except ValueError as e:
                send_error(request, 400, "bad_request", str(e))
        return b""

    def render_GET(self, request: Request) -> bytes | int:  # noqa: N802
        refused = self.auth.refuse(request)
        if refused is not None:
            return refused
        try:
            query = query_from(request)
        except ValueError as e:
            return send_error(request, 400, "bad_request", str(e))
        try:
            d = self.start(query)
        except ControlError as e:
            return not_leader(request, e.message, self.leader())
        except Busy:
            request.setHeader(b"retry-after", b"1")
            return send_error(request, 503, "busy", f"{MAX_PENDING} trace queries are running")

        gone: list[Failure] = []  # the client went away while the nodes answered
        request.notifyFinish().addErrback(gone.append)

        def answer(body: dict[str, Any]) -> None:
            if request.finished or gone:
                return
            request.setHeader(b"content-type", b"application/json")
            request.write(json.dumps(body, indent=1).encode())
            request.finish()

        def failed(failure: Failure) -> None:
            if request.finished or gone:
                return
            request.write(send_error(request, 500, "internal_error", "the trace failed"))
            request.finish()

        d.addCallbacks(answer, failed)
        return NOT_DONE_YET
