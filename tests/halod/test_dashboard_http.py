"""The dashboard's HTTP side on the status port's Site: static files, state, the event
stream's refusals, the Host rule, the operator key, and ``/trace`` (raw HTTP through a
StringTransport, task.Clock)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, error, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from halod.config import HaloDConfig
from halod.dashboard import CSP, DashboardFeed, DashboardResource, OperatorAuth
from halod.server import ControlProtocol, HaloD, _StatusSite, status_site
from halod.tracefan import Busy, Gathered, TraceFanout, TraceResource, trace_answer
from orbited.core.control import (
    CONTROL_PROTOCOL,
    MAX_MESSAGE,
    ControlError,
    ErrorCode,
    Handoff,
    Heartbeat,
    HeartbeatLoad,
    TraceQuery,
    TraceReply,
)
from orbited.runtime.web import JSONDirectory
from orbited.sp.wire import SPConnection
from tests.halod.test_dashboard_feed import view
from tests.halod.test_halod_ha import halod_on_hand_etcd
from tests.halod.test_halod_liveness import Node
from tests.halod.test_halod_membership import reg

KEY = b"k" * 40
HOST = b"127.0.0.1:7601"


class Response:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if self.headers.get("transfer-encoding") == "chunked":
            self.body = _unchunk(self.body)

    def json(self) -> Any:
        return json.loads(self.body)


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, rest = data.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out += rest[:n]
        data = rest[n + 2 :]
    return out


def site_with(root: Resource) -> Callable[..., Response]:
    site = _StatusSite(root, frozenset())

    def request(path: str, method: str = "GET", **headers: str | bytes) -> Response:
        proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        transport = StringTransport()
        proto.makeConnection(transport)
        head = {"host": HOST, **headers}
        lines = [f"{method} {path} HTTP/1.1".encode()]
        for name, value in head.items():
            if value is not None:
                raw = value if isinstance(value, bytes) else value.encode()
                lines.append(name.replace("_", "-").encode() + b": " + raw)
        proto.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n")
        return Response(transport.value())

    return request


@pytest.fixture
def feed() -> DashboardFeed:
    return DashboardFeed(task.Clock(), view, max_streams=1)


@pytest.fixture
def get(feed: DashboardFeed) -> Callable[..., Response]:
    root = JSONDirectory()
    root.putChild(b"dashboard", DashboardResource(feed))
    return site_with(root)


def test_page_and_static_files(get: Callable[..., Response]) -> None:
    page = get("/dashboard")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert b'src="/dashboard/app.js"' in page.body
    assert page.headers["content-security-policy"] == CSP
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["cache-control"] == "no-cache"
    for path, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        r = get(f"/dashboard/{path}")
        assert r.status == 200 and r.headers["content-type"].startswith(kind)
        etag = '"' + hashlib.sha256(r.body).hexdigest() + '"'
        assert r.headers["etag"] == etag
        again = get(f"/dashboard/{path}", if_none_match=etag)
        assert again.status == 304 and again.body == b""
        assert get(f"/dashboard/{path}", if_none_match='"other"').status == 200


def test_head_answers_without_a_body(get: Callable[..., Response]) -> None:
    from twisted.logger import ILogObserver, globalLogPublisher
    from zope.interface import provider

    logged: list[dict[str, Any]] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        logged.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        for path in ("/dashboard", "/dashboard/app.js", "/dashboard/state"):
            r = get(path, "HEAD")
            assert r.status == 200 and r.body == b"" and r.headers["content-type"], path
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not [e for e in logged if "eat it" in str(e.get("log_format", ""))]


def test_state_and_errors(get: Callable[..., Response]) -> None:
    state = get("/dashboard/state")
    assert state.status == 200 and state.headers["cache-control"] == "no-store"
    assert state.json()["table"]["owners"] == ["n1", "n1", "n2", "n2"]
    assert state.headers["content-security-policy"] == CSP
    missing = get("/dashboard/nope")
    assert missing.status == 404 and missing.json()["error"]["code"] == "not_found"
    assert missing.headers["content-security-policy"] == CSP  # errors too
    post = get("/dashboard/state", "POST")
    assert post.status == 405 and post.headers["allow"] == "GET, HEAD"
    assert post.json()["error"]["code"] == "method_not_allowed"


def test_event_stream_and_its_cap(get: Callable[..., Response], feed: DashboardFeed) -> None:
    first = get("/dashboard/events")
    assert first.status == 200 and first.headers["content-type"] == "text/event-stream"
    assert first.body.startswith(b"retry: 1000\n\nid: 1\nevent: snapshot\ndata: {")
    second = get("/dashboard/events")  # max_streams=1
    assert second.status == 503 and second.json()["error"]["code"] == "too_many_streams"
    assert len(feed.streams) == 1


@pytest.mark.parametrize("path", ["/dashboard", "/dashboard/state", "/dashboard/events",
                                  "/dashboard/app.js"])  # fmt: skip
def test_the_host_rule(get: Callable[..., Response], path: str) -> None:
    r = get(path, host="rebind.example:7601")
    assert r.status == 403 and r.json()["error"]["code"] == "host_not_allowed"


def test_an_http_1_1_request_without_host_is_400_and_http_1_0_is_served(
    get: Callable[..., Response],
) -> None:
    # RFC 9112, 3.2 (a missing Host is no DNS-rebinding risk: browsers always send one).
    missing = get("/dashboard/state", host=None)
    assert missing.status == 400 and missing.json()["error"]["code"] == "bad_request"
    root = JSONDirectory()
    root.putChild(b"dashboard", DashboardResource(DashboardFeed(task.Clock(), view)))
    proto = _StatusSite(root, frozenset()).buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"GET /dashboard/state HTTP/1.0\r\n\r\n")
    assert Response(transport.value()).status == 200


# -- the operator rule -----------------------------------------------------------------------


class Probe(Resource):
    isLeaf = True

    def __init__(self, auth: OperatorAuth) -> None:
        super().__init__()
        self.auth = auth

    def render(self, request: Any) -> bytes:
        return self.auth.refuse(request) or b"ok"


def operator(key: bytes | None) -> Callable[..., Response]:
    root = JSONDirectory()
    root.putChild(b"op", Probe(OperatorAuth(key)))
    return site_with(root)


def test_without_a_key_only_requests_from_outside_pages() -> None:
    call = operator(None)
    assert call("/op", "POST").body == b"ok"
    assert call("/op", "POST", sec_fetch_site="none").body == b"ok"
    for headers in ({"origin": "http://127.0.0.1:7601"}, {"sec_fetch_site": "same-origin"},
                    {"sec_fetch_site": "cross-site"}):  # fmt: skip
        r = call("/op", "POST", **headers)
        assert r.status == 403 and r.json()["error"]["code"] == "cross_site"


def test_with_a_key() -> None:
    call = operator(KEY)
    bearer = "Bearer " + KEY.decode()
    for auth in (None, "Bearer wrong", "Basic " + KEY.decode(), bearer + "x"):
        r = call("/op", "POST", authorization=auth)
        assert r.status == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == 'Bearer realm="halod"'
    assert call("/op", "POST", authorization=bearer).body == b"ok"
    assert call("/op", "POST", authorization="bearer " + KEY.decode()).body == b"ok"
    own = {"origin": "http://127.0.0.1:7601", "sec_fetch_site": "same-origin"}
    assert call("/op", "POST", authorization=bearer, **own).body == b"ok"
    proxied = {"origin": "https://127.0.0.1:7601", "x_forwarded_proto": "https"}
    assert call("/op", "POST", authorization=bearer, **proxied).body == b"ok"
    for headers in (
        {"origin": "http://evil.example"}, {"origin": "null"},
        {"origin": "https://127.0.0.1:7601"},  # https without the proxy saying so
        {"origin": "http://127.0.0.1:7602"}, {"sec_fetch_site": "cross-site"},
        {"sec_fetch_site": "same-site"},
    ):  # fmt: skip
        r = call("/op", "POST", authorization=bearer, **headers)
        assert r.status == 403 and r.json()["error"]["code"] == "cross_site", headers


# -- /trace ------------------------------------------------------------------------------


def trace_site(start: Callable[[TraceQuery], defer.Deferred[dict[str, Any]]],
               key: bytes | None = None) -> Callable[..., Response]:  # fmt: skip
    root = JSONDirectory()
    leader = {"name": "h2", "control": "tcp://127.0.0.1:1", "status": "127.0.0.1:7611"}
    root.putChild(b"trace", TraceResource(OperatorAuth(key), start, lambda: leader))
    return site_with(root)


def test_trace_request_rules() -> None:
    asked: list[TraceQuery] = []

    def start(query: TraceQuery) -> defer.Deferred[dict[str, Any]]:
        asked.append(query)
        return defer.succeed({"keys": []})

    call = trace_site(start)
    ok = call("/trace?user=alice&event=42&limit=5")
    assert ok.status == 200 and ok.json() == {"keys": []}
    assert asked == [TraceQuery(0, "alice", None, None, "42", 5)]
    for path in ("/trace", "/trace?user=", "/trace?user=a&user=b", "/trace?user=a&x=1",
                 "/trace?user=a&limit=-1", "/trace?user=a&limit=0", "/trace?user=%ff",
                 "/trace?user=a&event="):  # fmt: skip
        r = call(path)
        assert r.status == 400 and r.json()["error"]["code"] == "bad_request", path
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-store"
    assert call("/trace?user=a", "POST").status == 405
    head = call("/trace?user=a", "HEAD")
    assert head.status == 200 and head.body == b""  # checked, but no node is asked
    assert call("/trace", "HEAD").status == 400  # the same checks
    page = call("/trace?user=a", origin="http://127.0.0.1:7601")
    assert page.status == 403
    assert len(asked) == 1


def test_trace_needs_the_key_when_one_is_set() -> None:
    call = trace_site(lambda q: defer.succeed({"keys": []}), KEY)
    assert call("/trace?user=a").status == 401
    ok = call("/trace?user=a", authorization="Bearer " + KEY.decode(),
              origin="http://127.0.0.1:7601")  # fmt: skip
    assert ok.status == 200


def test_trace_on_a_follower_and_when_busy() -> None:
    def follower(query: TraceQuery) -> defer.Deferred[dict[str, Any]]:
        raise ControlError(ErrorCode.NOT_LEADER, "this HaloD does not lead: h2 leads")

    r = trace_site(follower)("/trace?user=a")
    assert r.status == 409
    assert r.json()["error"] == {
        "code": "not_leader", "message": "this HaloD does not lead: h2 leads",
        "leader": {"name": "h2", "status": "127.0.0.1:7611"},
    }  # fmt: skip

    def busy(query: TraceQuery) -> defer.Deferred[dict[str, Any]]:
        raise Busy

    r = trace_site(busy)("/trace?user=a")
    assert r.status == 503 and r.json()["error"]["code"] == "busy"


def test_fan_out_waits_for_every_node_or_the_timeout() -> None:
    clock = task.Clock()
    fan = TraceFanout(clock, timeout=1.0, max_pending=2)
    sent: dict[str, list[TraceQuery]] = {"n1": [], "n2": [], "n3": []}
    targets = {name: sent[name].append for name in sent}
    results: list[Gathered] = []
    fan.ask(TraceQuery(0, "alice"), targets).addCallback(results.append)
    qid = sent["n1"][0].qid
    assert qid > 0 and all(q[0].qid == qid for q in sent.values())
    fan.reply("n1", TraceReply(qid, {"keys": [{"key": ["alice", "", ""]}]}))
    fan.reply("n2", TraceReply(qid + 1, {"keys": []}))  # another query's: ignored
    fan.lost("n3")
    assert results == []
    clock.advance(1.0)
    [got] = results
    assert got.asked == ["n1", "n2", "n3"] and list(got.replies) == ["n1"]
    assert got.missing == [{"name": "n2", "why": "no reply in 1 s"},
                           {"name": "n3", "why": "its control connection was lost"}]  # fmt: skip
    assert fan.pending == {} and clock.getDelayedCalls() == []
    # all answer: done at once; nobody to ask: done at once
    fan.ask(TraceQuery(0, "bob"), {"n1": sent["n1"].append}).addCallback(results.append)
    fan.reply("n1", TraceReply(sent["n1"][-1].qid, {"keys": []}))
    fan.ask(TraceQuery(0, "bob"), {}).addCallback(results.append)
    assert [r.missing for r in results[1:]] == [[], []]
    fan.ask(TraceQuery(0, "c"), targets)
    fan.ask(TraceQuery(0, "d"), targets)
    with pytest.raises(Busy):
        fan.ask(TraceQuery(0, "e"), targets)


def test_trace_answer_merges_nodes_and_names_lost_records() -> None:
    rec = {"t": 100.0, "event": "42", "request": "77aa", "route": 2, "status": "delivered",
           "seq": 42, "written": 100.001, "transport": "ws", "acked": 100.2}  # fmt: skip
    gathered = Gathered(
        ["n1", "n2"],
        {"n1": {"keys": [{"key": ["alice", "s", "/"], "route": 2, "here": False,
                          "dispatches": [rec], "notes": []}]},
         "n2": {"keys": []}},
        [],
    )  # fmt: skip
    seen: list[tuple[set[int], float, float]] = []

    def incidents(routes: set[int], start: float, end: float) -> list[dict[str, Any]]:
        seen.append((routes, start, end))
        return [{"id": 7}]

    failed = [{"name": "n3", "at": 90.0, "why": "ports refused"}]
    answer = trace_answer(TraceQuery(1, "alice", event="42"), gathered, failed,
                          ["n1", "n2", "n2"], incidents)  # fmt: skip
    assert answer["asked"] == ["n1", "n2"] and answer["answered"] == ["n1", "n2"]
    [key] = answer["keys"]
    assert key["owner_now"] == "n2" and key["dispatches"][0]["node"] == "n1"
    assert answer["incidents"] == [{"id": 7}] and seen[0][0] == {2}
    assert answer["failed_nodes"] == failed
    [verdict] = answer["verdicts"]
    assert verdict["event"] == "42" and "acknowledged" in verdict["text"]
    assert answer["query"] == {"user": "alice", "session": None, "location": None, "event": "42"}
    assert answer["truncated"] == []
    cut = Gathered(["n1", "n2"], {"n1": {"keys": [], "truncated": True},
                                  "n2": {"keys": [], "truncated": False}}, [])  # fmt: skip
    assert trace_answer(TraceQuery(1, "alice"), cut, [], [], incidents)["truncated"] == ["n1"]


# -- wired into HaloD (task.Clock, nodes over StringTransports) -------------------------------


def test_status_page_links_to_the_dashboard() -> None:
    from halod.page import status_html
    from tests.halod.test_halod_status import parsed, status_of

    tags, _ = parsed(status_html(status_of()))
    assert ("a", {"href": "/dashboard"}) in tags


class TracingNode(Node):
    """A node that announces the trace and load features (by default)."""

    def __init__(self, halod: HaloD, name: str, features: tuple[str, ...] = ("trace", "load")
                 ) -> None:  # fmt: skip
        self.proto = ControlProtocol(halod)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.sp = SPConnection(CONTROL_PROTOCOL, CONTROL_PROTOCOL, MAX_MESSAGE)
        self.proto.dataReceived(self.sp.initial_bytes())
        self.send(reg(name, features=list(features), hashes=[1, 2]))

    def beat(self, seq: int, events: int, routes: dict[int, int], **load: Any) -> None:
        self.send(Heartbeat(seq, sum(routes.values()), sum(routes.values()),
                            HeartbeatLoad(events=events, delivered=events, routes=routes,
                                          **load)))  # fmt: skip


def halod_with(tmp_path: Path, **config: Any) -> tuple[HaloD, task.Clock, Callable[..., Response]]:
    clock = task.Clock()
    halod = HaloD(HaloDConfig(db=str(tmp_path / "h.db"), dataplane="none", probe=False, **config),
                  clock)  # fmt: skip
    return halod, clock, site_with(status_site(halod).resource)


def test_the_dashboard_follows_load_failover_and_drain(tmp_path: Path) -> None:
    halod, clock, call = halod_with(tmp_path)
    n1, spare, n2 = (TracingNode(halod, name) for name in ("n1", "s", "n2"))
    routes1 = halod.membership.table.routes_of(1)
    for i, t in enumerate((0.5, 1.5)):
        clock.advance(t - clock.seconds())
        n1.beat(i, 100 * i, dict.fromkeys(routes1, 5), ack_hist=((3, 10),))
        n2.beat(i, 0, {})
    state = call("/dashboard/state").json()
    row = next(n for n in state["nodes"]["nodes"] if n["name"] == "n1")
    assert row["events_per_s"] == 100.0 and row["ack_p99_ms"] == 10.0
    assert state["nodes"]["totals"]["events_per_s"] == 100.0
    metrics = halod.metrics()
    assert 'halod_node_events_per_second{node="n1"} 100.000' in metrics
    assert 'halod_node_ack_seconds{node="n1",quantile="0.99"} 0.01' in metrics
    assert 'halod_cluster_ack_seconds_bucket{le="0.005"} 0' in metrics
    assert 'halod_cluster_ack_seconds_bucket{le="0.01"} 20' in metrics
    assert "halod_cluster_ack_seconds_count 20" in metrics
    assert "halod_cluster_ack_seconds_sum 0.2" in metrics  # at the buckets' upper bounds
    assert [i["kind"] for i in state["timeline"]] == ["join", "spare", "join"]
    events = call("/dashboard/events")  # a stream, open from here on
    assert events.status == 200 and len(halod.insight.feed.streams) == 1
    # n1 is lost: a failover to the spare, its browsers counted from its last beat
    clock.advance(0.1)
    lost_at = clock.seconds()
    n1.proto.connectionLost(Failure(error.ConnectionLost()))
    for seq in range(2, 2 + int(halod.config.grace) * 2 + 2):  # the others stay alive
        clock.advance(0.5)
        n2.beat(seq, 0, {})
        spare.beat(seq, 0, {})
        halod.tick()  # HaloDService's timer
    failover = halod.insight.timeline.last(1)[0]
    assert failover.kind.value == "failover" and failover.first_sign == lost_at
    assert failover.browsers_moved() == 5 * len(routes1)
    spare.beat(100, 0, dict.fromkeys(routes1, 5))
    clock.advance(halod.tick_period)
    halod.tick()
    j = halod.insight.timeline.to_json(failover)
    assert j["settled"] is True and j["browsers_back"] == 5 * len(routes1)
    assert j["detect_s"] == pytest.approx(halod.config.grace, abs=0.5)
    # drain n2 (no key configured: the CLI's request) with a hand-off to relay
    r = call("/nodes/n2/drain", "POST")
    assert r.status == 200
    drain = halod.insight.timeline.last(1)[0]
    assert drain.kind.value == "drain" and drain.open
    assert call("/dashboard/state").json()["timeline"][0]["open"] is True
    moved = [m.route for m in drain.moves]
    assert moved and set(halod.insight.timeline.in_flight()) == set(moved)
    table = halod.insight.view().owners
    assert all(table[r - 1] == "s" for r in moved)
    n2.send(Handoff("s", tuple(moved), ({"key": ["a", "", ""]},) * 3))
    clock.advance(halod.tick_period)
    halod.tick()
    j = halod.insight.timeline.to_json(drain)
    assert j["mailboxes_handed"] == 3 and j["handoff_s"] is not None
    assert j["settled"] is True and not halod.insight.timeline.in_flight()
    shown = call("/dashboard/state").json()["timeline"][0]  # not a stale copy
    assert shown["id"] == drain.id and shown["open"] is False and shown["mailboxes_handed"] == 3
    metrics = halod.metrics()
    assert 'halod_node_events_per_second{node="n2"} 0.000' in metrics
    # n1 is gone and its samples are out of the window: the histogram's counters stay
    assert "halod_cluster_ack_seconds_count 20" in metrics
    assert 'halod_incidents_total{kind="failover"} 1' in metrics
    assert 'halod_incidents_total{kind="drain"} 1' in metrics
    assert "halod_dashboard_streams 1" in metrics


def test_trace_asks_every_tracing_node(tmp_path: Path) -> None:
    key_file = tmp_path / "operator.key"
    key_file.write_bytes(KEY)
    halod, clock, call = halod_with(tmp_path, operator_key_file=str(key_file))
    n1, n2 = TracingNode(halod, "n1"), TracingNode(halod, "n2")
    old = TracingNode(halod, "n3", features=())  # an older node: never asked
    for node in (n1, n2, old):
        node.received()
    site = status_site(halod)
    proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"GET /trace?user=alice&event=42 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       b"Authorization: Bearer " + KEY + b"\r\n\r\n")  # fmt: skip
    (q1,), (q2,) = n1.received(), n2.received()
    assert isinstance(q1, TraceQuery) and q1.user == "alice" and q1.event == "42"
    assert isinstance(q2, TraceQuery) and q2.qid == q1.qid
    assert old.received() == [] and transport.value() == b""
    record = {"t": 5.0, "event": "42", "request": "ab", "route": 1, "status": "queued"}
    n1.send(TraceReply(q1.qid, {"node": "n1", "keys": [{"key": ["alice", "", ""], "route": 1,
                                                        "here": True, "dispatches": [record],
                                                        "notes": []}]}))  # fmt: skip
    assert transport.value() == b""
    n2.send(TraceReply(q2.qid, {"node": "n2", "keys": []}))
    answer = Response(transport.value()).json()
    assert answer["asked"] == ["n1", "n2"] and answer["missing"] == []
    assert answer["keys"][0]["dispatches"][0]["node"] == "n1"
    assert answer["verdicts"][0]["event"] == "42"
    assert call("/trace?user=alice").status == 401  # the key is set
    for path in ("/trace?user=alice", "/dashboard", "/dashboard/events"):  # the Host rule
        r = call(path, host="rebind.example", authorization="Bearer " + KEY.decode())
        assert r.status == 403 and r.json()["error"]["code"] == "host_not_allowed", path
    r = call("/nodes/n1/drain", "POST", origin="http://127.0.0.1:7601",
             authorization="Bearer " + KEY.decode())  # fmt: skip
    assert r.status == 200 and r.json() == {"name": "n1", "state": "drained"}
    state = call("/dashboard/state").json()
    assert state["operator"] == {"required": True}


def test_a_follower_serves_the_dashboard_and_points_at_the_leader(tmp_path: Path) -> None:
    halod, ha = halod_on_hand_etcd(tmp_path)
    call = site_with(status_site(halod).resource)
    state = call("/dashboard/state").json()
    assert state["summary"]["role"] == "follower"
    assert state["summary"]["leader"]["name"] == "h2" and state["nodes"]["live"] is False
    hint = {"name": "h2", "status": "127.0.0.1:7701"}
    for method, path in (("GET", "/trace?user=a"), ("POST", "/nodes/n1/drain"),
                         ("POST", "/nodes/n1/undrain")):  # fmt: skip
        r = call(path, method)
        assert r.status == 409 and r.json()["error"]["leader"] == hint, path
        assert r.json()["error"]["code"] == "not_leader"
    ha.lead()
    ha.store.complete()
    assert [i["kind"] for i in call("/dashboard/state").json()["timeline"]] == ["lead"]


def test_a_follower_keeps_its_own_timeline_from_warm_copies(tmp_path: Path) -> None:
    from halod.store.base import Persisted
    from tests.halod.test_halod_membership import cluster

    halod, ha = halod_on_hand_etcd(tmp_path)
    call = site_with(status_site(halod).resource)
    m = cluster(2)
    ha.on_table(Persisted.from_snapshot(m.snapshot(), 7))  # the first copy: nothing to compare
    assert call("/dashboard/state").json()["timeline"] == []
    m.leave("n2", 1.0, "silent")
    ha.on_table(Persisted.from_snapshot(m.snapshot(), 8))
    state = call("/dashboard/state").json()
    (table,) = state["timeline"]
    assert table["kind"] == "table" and table["node"] == "n2" and table["table_version"] == 8
    assert {(mv["old"], mv["new"]) for mv in table["moves"]} == {("n2", "n1")}
    assert state["table"]["version"] == 8 and set(state["table"]["owners"]) == {"n1"}
    ha.lead()  # promoted: it keeps what it saw
    ha.store.complete()
    ha.lose()
    kinds = [i["kind"] for i in call("/dashboard/state").json()["timeline"]]
    assert kinds == ["follow", "lead", "table"]


@pytest.mark.parametrize(("content", "why"), [(b"short\n", "at least 32 bytes"),
                                              (None, "No such file")])  # fmt: skip
def test_a_bad_operator_key_stops_halod(tmp_path: Path, content: bytes | None, why: str) -> None:
    key_file = tmp_path / "operator.key"
    if content is not None:
        key_file.write_bytes(content)
    config = HaloDConfig(db=str(tmp_path / "h.db"), dataplane="none",
                         operator_key_file=str(key_file))  # fmt: skip
    with pytest.raises(ValueError, match=f"operator_key_file {key_file}: .*{why}"):
        HaloD(config, task.Clock())
    assert not (tmp_path / "h.db").exists()  # before the store is opened


def test_stopping_halod_ends_open_streams_cleanly(tmp_path: Path) -> None:
    from twisted.logger import ILogObserver, globalLogPublisher
    from zope.interface import provider

    halod, _, _ = halod_with(tmp_path)
    proto = status_site(halod).buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"GET /dashboard/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert len(halod.insight.feed.streams) == 1
    failures: list[dict[str, Any]] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        halod.shutdown()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert failures == [] and halod.insight.feed.streams == []
    assert transport.value().endswith(b"\r\n0\r\n\r\n")  # the chunked response ended


def test_a_probe_verdict_reaches_the_stream_at_once(tmp_path: Path) -> None:
    from halod.liveness import Outcome, ProbeRequest

    asked: dict[str, defer.Deferred[Outcome]] = {}

    def fake_probe(request: ProbeRequest) -> defer.Deferred[Outcome]:
        asked[request.port] = defer.Deferred()
        return asked[request.port]

    clock = task.Clock()
    config = HaloDConfig(db=str(tmp_path / "h.db"), dataplane="none")
    halod = HaloD(config, clock, prober=fake_probe)
    n1, _ = TracingNode(halod, "n1"), TracingNode(halod, "n2")
    proto = status_site(halod).buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"GET /dashboard/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    n1.proto.connectionLost(Failure(error.ConnectionLost()))
    clock.advance(0.01)  # the disconnect's push is out; the next `nodes` tick is ~1 s away
    assert b'"probe":null' in transport.value()
    transport.clear()
    for d in asked.values():
        d.callback(Outcome.ANSWERED)  # alive: its connection blipped
    clock.advance(0.1)
    sent = _unchunk(transport.value()).decode()
    assert "event: nodes" in sent and '"probe":"alive"' in sent


def test_the_status_port_refuses_a_body_over_its_largest_request_at_the_head(
    tmp_path: Path,
) -> None:
    # Before: any body (50 MB to a drain) was spooled to a temporary file first.
    halod = HaloD(HaloDConfig(db=str(tmp_path / "h.db"), dataplane="none"), task.Clock())
    site = status_site(halod)
    proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(
        b"POST /rehash HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50000000\r\n\r\n"
    )
    r = Response(transport.value())
    assert r.status == 413 and r.json()["error"]["code"] == "body_too_large"
