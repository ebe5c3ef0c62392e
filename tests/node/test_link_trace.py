"""The node's link, issue 22 (orbited/node/link.py; docs/halod-protocol.md): ``register``
announces the ``trace`` and ``load`` features, every heartbeat carries the hub's load
report (all routes on the first beat, after an assignment and every 30th beat), and a
``trace_query`` is answered with the hub's trace answer, cut to half a control message.
Driven over a StringTransport with SP framing and a Clock."""

from __future__ import annotations

import json
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

from orbited.core.control import (
    CONTROL_PROTOCOL,
    FROM_NODE,
    MAX_MESSAGE,
    Assign,
    HaloDMessage,
    Heartbeat,
    HeartbeatAck,
    HeartbeatLoad,
    Register,
    TraceQuery,
    TraceReply,
    Welcome,
    decode,
    encode,
)
from orbited.core.keys import ConnectionKey
from orbited.core.routes import Role
from orbited.node.hub import Hub, HubConfig
from orbited.node.link import FULL_LOAD_EVERY, HaloDLink, LinkProtocol
from orbited.sp.wire import SPConnection, encode_message
from tests.node.test_link_handoff import Tab


class LoadHub:
    """What the link uses of the hub for heartbeats and trace queries; records calls."""

    def __init__(self) -> None:
        self.owned: frozenset[int] = frozenset()
        self.attached = 3
        self.mailboxes = 5
        self.reports: list[bool] = []  # ``full`` of each load_report call
        self.queries: list[dict[str, Any]] = []
        self.report: dict[str, Any] | None = None  # overrides the built report once
        self.answer: Any = {"node": "n1", "mode": "all", "keys": []}

    def set_hash_version(self, version: int) -> None:
        pass

    def assign(self, routes: Any, total: int | None = None, incoming: Any = ()) -> int:
        return 0

    def load_report(self, full: bool = False) -> dict[str, Any]:
        self.reports.append(full)
        if self.report is not None:
            report, self.report = self.report, None
            return report
        return {
            "events": 10 * len(self.reports), "recipients": 11, "delivered": 9, "queued": 2,
            "acked": 8, "full": 0, "moved": 0, "ack_hist": [[3, 2]],
            "routes": {"1": 3, "2": 0} if full else {"2": 1}, "routes_full": full,
        }  # fmt: skip

    def trace_answer(self, **query: Any) -> dict[str, Any]:
        self.queries.append(query)
        if isinstance(self.answer, Exception):
            raise self.answer
        return cast(dict[str, Any], self.answer)


class HaloDEnd:
    """HaloD's end of one link connection."""

    def __init__(self, hub: LoadHub) -> None:
        self.clock = MemoryReactorClock()
        self.link = HaloDLink(cast(Any, hub), "n1", "tcp://127.0.0.1:7600",
                              lambda: ("127.0.0.1:8000", "tcp://127.0.0.1:9000"), 10,
                              self.clock)  # fmt: skip
        self.proto = LinkProtocol(self.link)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.sp = SPConnection(CONTROL_PROTOCOL, CONTROL_PROTOCOL, MAX_MESSAGE)
        self.proto.dataReceived(self.sp.initial_bytes())

    def send(self, message: HaloDMessage) -> None:
        self.proto.dataReceived(encode_message(encode(message)))

    def received(self) -> list[Any]:
        data = self.transport.value()
        self.transport.clear()
        return [decode(body, FROM_NODE) for body in self.sp.receive(data)]

    def beats(self, n: int) -> list[Heartbeat]:
        """Let ``n`` heartbeat intervals pass (acking each beat); the beats sent."""
        out: list[Heartbeat] = []
        for _ in range(n):
            self.clock.advance(1.0)
            for m in self.received():
                assert isinstance(m, Heartbeat)
                out.append(m)
                self.send(HeartbeatAck(m.seq))
        return out


def welcomed(hub: LoadHub) -> HaloDEnd:
    halod = HaloDEnd(hub)
    halod.send(Welcome(1, Role.ACTIVE, (1, 2), 4, 1.0, 3))
    halod.received()
    return halod


def test_register_announces_trace_and_load():
    halod = HaloDEnd(LoadHub())
    (register,) = halod.received()
    assert isinstance(register, Register) and register.features == ("trace", "load")


def test_each_heartbeat_carries_the_hubs_load():
    hub = LoadHub()
    halod = welcomed(hub)
    first, second = halod.beats(2)
    assert (first.connections, first.mailboxes) == (3, 5)
    assert first.load == HeartbeatLoad(
        events=10, recipients=11, delivered=9, queued=2, acked=8, full=0, moved=0,
        ack_hist=((3, 2),), routes={1: 3, 2: 0}, routes_full=True,
    )  # fmt: skip
    assert second.load is not None and second.load.events == 20
    assert second.load.routes == {2: 1} and not second.load.routes_full


def test_every_route_is_sent_first_after_an_assign_and_every_30th_beat():
    hub = LoadHub()
    halod = welcomed(hub)
    halod.beats(3)
    halod.send(Assign(1, Role.ACTIVE, (1,)))
    halod.beats(FULL_LOAD_EVERY)
    seqs_full = [i + 1 for i, full in enumerate(hub.reports) if full]
    assert seqs_full == [1, 4, FULL_LOAD_EVERY]
    assert len(hub.reports) == 3 + FULL_LOAD_EVERY


def test_a_new_connection_starts_with_every_route():
    hub = LoadHub()
    welcomed(hub).beats(2)
    welcomed(hub).beats(1)  # a reconnect: a new protocol, a new welcome
    assert hub.reports == [True, False, True]


def test_a_malformed_report_still_beats_and_the_next_one_is_full():
    hub = LoadHub()
    halod = welcomed(hub)
    halod.beats(2)
    hub.report = {"events": -1}
    (bad,) = halod.beats(1)
    assert bad.load is None and bad.seq == 3  # the heartbeat itself still went
    (after,) = halod.beats(1)
    assert after.load is not None and after.load.routes_full
    assert not halod.transport.disconnecting


def test_a_trace_query_is_answered_with_the_hubs_answer():
    hub = LoadHub()
    hub.answer = {"node": "n1", "mode": "all", "keys": [{"key": ["alice", "s", "/"],
                  "dispatches": [{"t": 1.0, "event": "42"}], "notes": []}]}  # fmt: skip
    halod = welcomed(hub)
    halod.send(TraceQuery(17, "alice", None, "/", "42", 16))
    (reply,) = halod.received()
    assert reply == TraceReply(17, hub.answer)
    assert hub.queries == [
        {"user": "alice", "session": None, "location": "/", "event": "42", "limit": 16}
    ]


def test_a_large_answer_is_cut_to_half_a_control_message():
    rows = [{"t": float(i), "event": str(i), "pad": "x" * 1000} for i in range(1000)]
    hub = LoadHub()
    hub.answer = {"node": "n1", "keys": [{"key": ["alice", "", ""], "dispatches": rows}]}
    halod = welcomed(hub)
    halod.send(TraceQuery(1, "alice"))
    data = halod.transport.value()
    assert len(data) <= MAX_MESSAGE // 2 + 64  # the frame: SP length prefix + body
    (reply,) = halod.received()
    assert isinstance(reply, TraceReply) and reply.answer["truncated"] is True
    kept = reply.answer["keys"][0]["dispatches"]
    assert kept[-1]["event"] == "999" and len(kept) < 1000  # the newest kept


def test_a_failing_trace_answer_does_not_cost_the_connection():
    hub = LoadHub()
    hub.answer = RuntimeError("tracer bug")
    halod = welcomed(hub)
    halod.send(TraceQuery(5, "alice"))
    (reply,) = halod.received()
    assert reply == TraceReply(5, {"node": "n1", "keys": [], "error": "internal_error"})
    assert not halod.transport.disconnecting
    (beat,) = halod.beats(1)  # still beating
    assert beat.seq == 1


def test_a_real_hubs_deliveries_and_acks_reach_the_heartbeat():
    """End to end in one process: an event written to an attached browser and acked
    4 ms later shows in the next beat's counters, its ack-latency bucket (≤ 5 ms) and
    the route's attached count."""
    clock = Clock()
    clock.advance(1796540400.0)
    hub = Hub(clock, HubConfig(routes=2), epoch="e1")
    halod = welcomed(cast(Any, hub))
    key = ConnectionKey("alice", "s1", "/chat")
    tab = Tab()
    hub.attach(key, tab, None)
    route = hub._slots[key].route
    hub.handle_request(json.dumps({"id": "42", "to": [list(key)], "data": "hi"}).encode())
    (event,) = [f for f in tab.frames if f["type"] == "event"]
    clock.advance(0.004)
    hub.ack(key, event["seq"])
    (beat,) = halod.beats(1)
    assert beat.load is not None and beat.connections == 1
    # ``acked`` counts acknowledged-mode results; this request did not ask for one.
    assert beat.load.counters() == {"events": 1, "recipients": 1, "delivered": 1, "queued": 0,
                                    "acked": 0, "full": 0, "moved": 0}  # fmt: skip
    assert beat.load.ack_hist == ((2, 1),)
    assert beat.load.routes == {route: 1} and beat.load.routes_full
    hub.detach(key, tab)
    (later,) = halod.beats(1)
    assert later.load is not None and later.load.routes == {route: 0}
    assert later.load.ack_hist == () and not later.load.routes_full


def test_an_answer_that_is_not_json_is_answered_as_a_failure():
    hub = LoadHub()
    hub.answer = {"node": "n1", "keys": [], "t": float("nan")}
    halod = welcomed(hub)
    halod.send(TraceQuery(6, "alice"))
    (reply,) = halod.received()
    assert reply == TraceReply(6, {"node": "n1", "keys": [], "error": "internal_error"})


def test_a_real_hubs_trace_answers_haloDs_query():
    """HaloD's trace_query reaches the hub's tracer: the reply holds the key, the event's
    record written to the attached transport, and the tracer's mode."""
    from orbited.node.observe import build_observer
    from orbited.node.trace import TraceConfig, Tracer

    clock = Clock()
    clock.advance(1796540400.0)
    hub = Hub(clock, HubConfig(routes=2), epoch="e1")
    tracer = Tracer(TraceConfig(mode="all"), "n1")
    hub.observe(build_observer(tracer, None), tracer)
    halod = welcomed(cast(Any, hub))
    key = ConnectionKey("alice", "s1", "/chat")
    hub.attach(key, Tab(), None)
    hub.handle_request(json.dumps({"id": "42", "to": [list(key)], "data": "hi"}).encode())
    halod.send(TraceQuery(9, "alice", event="42"))
    (reply,) = halod.received()
    assert isinstance(reply, TraceReply) and reply.qid == 9
    assert reply.answer["mode"] == "all" and reply.answer["node"] == "n1"
    (entry,) = reply.answer["keys"]
    assert entry["key"] == ["alice", "s1", "/chat"] and entry["here"] is True
    (record,) = entry["dispatches"]
    assert (record["event"], record["status"], record["node"]) == ("42", "delivered", "n1")
    assert record["transport"] == "ws" and record["written"] == 1796540400.0
    halod.send(TraceQuery(10, "bob"))
    (none,) = halod.received()
    assert none == TraceReply(10, {**none.answer, "keys": []})


def test_a_planned_move_names_the_new_owner_in_the_old_owners_trace():
    """route_moved's names reach the hub: the old owner's record of an event that left
    with the mailbox says ``out:n2``, and its ``moved`` note names n2."""
    from orbited.core.control import RouteMove, RouteMoved
    from orbited.node.observe import build_observer
    from orbited.node.trace import TraceConfig, Tracer

    clock = Clock()
    clock.advance(1796540400.0)
    hub = Hub(clock, HubConfig(routes=2), epoch="e1")
    tracer = Tracer(TraceConfig(mode="all"), "n1")
    hub.observe(build_observer(tracer, None), tracer)
    halod = welcomed(cast(Any, hub))
    key = ConnectionKey("alice", "s1", "/chat")
    tab = Tab()
    hub.attach(key, tab, None)
    hub.detach(key, tab)  # the browser is away: the event waits in the mailbox
    hub.handle_request(json.dumps({"id": "42", "to": [list(key)], "data": "hi"}).encode())
    route = hub._slots[key].route
    halod.send(RouteMoved((RouteMove(route, "n2", "127.0.0.2:1", "tcp://127.0.0.2:2", True),)))
    halod.received()  # the hand-off
    halod.send(TraceQuery(3, "alice", event="42"))
    (reply,) = halod.received()
    (entry,) = reply.answer["keys"]
    (record,) = entry["dispatches"]
    assert record["status"] == "queued" and record["handed"] == "out:n2"
    (moved,) = [n for n in entry["notes"] if n["what"] == "moved"]
    assert moved["owner"] == "n2" and moved["handed"] is True
