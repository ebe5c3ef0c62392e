"""halod.dashboard: the snapshot from a view, and the event feed's pushes (task.Clock)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from twisted.internet import defer, task

from halod.dashboard import (
    COALESCE,
    KEEPALIVE,
    NODES_EVERY,
    DashboardFeed,
    DashboardView,
    snapshot,
    summary_json,
)
from halod.svg import PALETTE


def node(name: str, nid: int | None, state: str = "active", **kw: Any) -> dict[str, Any]:
    row = {"name": name, "id": nid, "state": state, "connected": True, "routes": [1, 2],
           "ranges": "1-2", "capacity": 1000, "connections": 10, "mailboxes": 14,
           "last_heartbeat_age": 0.1, "disconnected_for": None, "suspected": None}  # fmt: skip
    row.update(kw)
    return row


def view(**kw: Any) -> DashboardView:
    status = {"role": "solo", "leader": None, "etcd": None, "routes": 4, "policy": "seed",
              "spares": 1, "spares_wanted": 1, "warnings": [], "failovers": 0,
              "table_version": 3, "uptime": 5.0, "hash_version": 1, "dataplane": None,
              "failed": [],
              "nodes": [node("n1", 1), node("n2", 2, routes=[3, 4], ranges="3-4",
                                            connections=5, mailboxes=5),
                        node("n3", None, "spare", routes=[], ranges="", connections=0,
                             mailboxes=0)]}  # fmt: skip
    status.update(kw.pop("status", {}))
    base = DashboardView(
        name="h1", status=status, owners=("n1", "n1", "n2", "n2"),
        loads={"n1": {"events_per_s": 20.0, "deliveries_per_s": 18.0, "ack_p50_ms": 5.0,
                      "ack_p99_ms": 50.0, "spark": [19.0, 20.0], "routes": {"1": 6, "2": 4}}},
        totals={"events_per_s": 20.0, "deliveries_per_s": 18.0, "ack_p50_ms": 5.0,
                "ack_p99_ms": 50.0},
    )  # fmt: skip
    return replace(base, **kw)


def test_snapshot_carries_every_part_of_the_page() -> None:
    snap = snapshot(view(in_flight={3: 10.5}, operator_required=True), 100.0)
    assert snap["v"] == 1 and snap["routes"] == 4 and snap["palette"] == PALETTE
    assert snap["halod"]["name"] == "h1" and snap["halod"]["role"] == "solo"
    assert snap["operator"] == {"required": True}
    assert snap["table"] == {"version": 3, "owners": ["n1", "n1", "n2", "n2"],
                             "in_flight": {"3": 10.5}}  # fmt: skip
    nodes = snap["nodes"]
    n1 = nodes["nodes"][0]
    assert (n1["connections"], n1["mailboxes"], n1["lingering"]) == (10, 14, 4)
    assert n1["events_per_s"] == 20.0 and n1["routes"] == {"1": 6, "2": 4}
    assert n1["routes_count"] == 2 and nodes["nodes"][2]["events_per_s"] is None
    assert nodes["totals"]["connections"] == 15 and nodes["totals"]["lingering"] == 4
    assert snap["summary"]["spares"] == 1 and snap["summary"]["table_version"] == 3
    assert snap["summary"]["moving"] == []
    moving = [{"route": 4, "from": "n2", "to": "n1"}]
    assert snapshot(view(status={"moving": moving}), 1.0)["summary"]["moving"] == moving


def test_a_follower_shows_no_live_figures() -> None:
    snap = snapshot(view(live=False), 1.0)
    row = snap["nodes"]["nodes"][0]
    assert row["connections"] is None and row["lingering"] is None
    assert row["events_per_s"] is None and snap["nodes"]["totals"]["connections"] is None


class FakeRequest:
    """What the feed uses of a twisted.web Request, with the bytes it was sent."""

    def __init__(self) -> None:
        self.data = b""
        self.producer: Any = None
        self.finished = defer.Deferred[None]()
        self.aborted = False
        self.transport = self

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        assert streaming
        self.producer = producer

    def write(self, data: bytes) -> None:
        self.data += data

    def notifyFinish(self) -> defer.Deferred[None]:  # noqa: N802
        return self.finished

    def unregisterProducer(self) -> None:  # noqa: N802
        self.producer = None

    def finish(self) -> None:
        assert self.producer is None, "twisted.web logs a producer left registered"

    def abortConnection(self) -> None:  # noqa: N802
        self.aborted = True

    def events(self) -> list[tuple[str, Any]]:
        out = []
        for block in self.data.decode().split("\n\n"):
            fields = dict(
                line.split(": ", 1) for line in block.splitlines() if ": " in line
            )  # fmt: skip
            if "event" in fields:
                out.append((fields["event"], json.loads(fields["data"])))
        self.data = b""
        return out


class Holder:
    def __init__(self) -> None:
        self.view = view()

    def __call__(self) -> DashboardView:
        return self.view


def subscribed(max_streams: int = 32) -> tuple[task.Clock, Holder, DashboardFeed, FakeRequest]:
    clock, holder = task.Clock(), Holder()
    feed = DashboardFeed(clock, holder, max_streams=max_streams, max_unsent=4000)
    request = FakeRequest()
    assert feed.subscribe(request)  # type: ignore[arg-type]
    assert request.data.startswith(b"retry: 1000\n\n")
    assert [name for name, _ in request.events()] == ["snapshot"]
    return clock, holder, feed, request


def test_a_change_goes_out_at_once_and_later_ones_are_coalesced() -> None:
    """The first change is pushed in the next reactor turn (a hand-off takes longer, so
    the page sees the routes in flight); changes in the next COALESCE seconds go out
    together, COALESCE after that push."""
    clock, holder, feed, request = subscribed()
    status = holder.view.status
    holder.view = replace(holder.view, owners=("n1", "n2", "n2", "n2"), in_flight={2: 5.0},
                          status={**status, "table_version": 4})  # fmt: skip
    for _ in range(5):
        feed.changed()
    clock.advance(0)
    assert request.events() == [
        ("table", {"version": 4, "owners": ["n1", "n2", "n2", "n2"], "in_flight": {"2": 5.0}}),
        ("summary", summary_json(holder.view)),  # its table_version changed
    ]
    clock.advance(0.01)
    holder.view = replace(holder.view, in_flight={})  # the hand-off came
    feed.changed()
    holder.view = replace(holder.view, status={**status, "table_version": 5})
    feed.changed()
    clock.advance(COALESCE - 0.02)
    assert request.events() == []
    clock.advance(0.02)
    assert request.events() == [
        ("table", {"version": 5, "owners": ["n1", "n2", "n2", "n2"], "in_flight": {}}),
        ("summary", summary_json(holder.view)),
    ]
    clock.advance(1.0)
    request.events()
    feed.changed()
    clock.advance(0)
    assert request.events() == []  # nothing new: nothing sent


def test_a_paced_step_sends_the_summary_with_the_table() -> None:
    """The legend and a cell's hover read ``summary.moving``: a step of a paced move must
    not leave them saying "waiting to move" for up to a second after the map moved."""
    clock, holder, feed, request = subscribed()
    status = holder.view.status
    waiting = [{"route": 3, "from": "n2", "to": "n1"}, {"route": 4, "from": "n2", "to": "n1"}]
    holder.view = replace(holder.view, status={**status, "moving": waiting})
    clock.advance(NODES_EVERY)
    assert dict(request.events())["summary"]["moving"] == waiting
    holder.view = replace(holder.view, owners=("n1", "n2", "n1", "n2"),
                          status={**status, "table_version": 4, "moving": waiting[1:]})  # fmt: skip
    feed.changed()
    clock.advance(0)
    events = dict(request.events())
    assert events["table"]["owners"] == ["n1", "n2", "n1", "n2"]
    assert events["summary"]["moving"] == waiting[1:]


def test_incidents_are_pushed_when_new_or_changed() -> None:
    clock, holder, feed, request = subscribed()
    first = {"id": 1, "kind": "drain", "open": True}
    holder.view = replace(holder.view, timeline=(first,))
    feed.changed()
    clock.advance(COALESCE)
    assert request.events() == [("incident", first)]
    closed = {"id": 1, "kind": "drain", "open": False}
    second = {"id": 2, "kind": "spare", "open": False}
    holder.view = replace(holder.view, timeline=(second, closed))
    feed.changed()
    clock.advance(COALESCE)
    assert request.events() == [("incident", closed), ("incident", second)]


def test_nodes_every_second_and_at_once_on_a_change_of_state() -> None:
    clock, holder, feed, request = subscribed()
    clock.advance(NODES_EVERY)
    assert [name for name, _ in request.events()] == ["nodes"]
    nodes = [dict(n) for n in holder.view.status["nodes"]]
    nodes[1]["connected"] = False
    holder.view = replace(holder.view, status={**holder.view.status, "nodes": nodes,
                                               "warnings": ["no spare"]})  # fmt: skip
    feed.changed()
    clock.advance(COALESCE)
    events = dict(request.events())
    assert events["nodes"]["nodes"][1]["connected"] is False
    assert events["summary"]["warnings"] == ["no spare"]


def test_a_change_of_leadership_sends_a_new_snapshot() -> None:
    clock, holder, feed, request = subscribed()
    leader = {"name": "h2", "control": "tcp://127.0.0.1:1", "status": "127.0.0.1:2"}
    status = {**holder.view.status, "role": "follower", "leader": leader}
    holder.view = replace(holder.view, live=False, status=status)
    feed.changed()
    clock.advance(COALESCE)
    [(name, snap)] = request.events()
    assert name == "snapshot" and snap["summary"]["leader"] == leader


def test_keepalive_comments() -> None:
    clock, _, _, request = subscribed()
    clock.advance(KEEPALIVE)
    assert b":keepalive\n\n" in request.data


def test_stream_cap() -> None:
    _, _, feed, _ = subscribed(max_streams=1)
    assert not feed.subscribe(FakeRequest())  # type: ignore[arg-type]
    assert feed.stats["refused"] == 1 and len(feed.streams) == 1


def test_a_reader_that_does_not_read_is_closed() -> None:
    clock, holder, feed, request = subscribed()
    request.producer.pauseProducing()  # the connection's buffer is full
    clock.advance(NODES_EVERY)  # one `nodes` event: under the limit
    assert not request.aborted and feed.streams
    clock.pump([NODES_EVERY] * 5)
    assert request.aborted and feed.streams == [] and feed.stats["slow_closed"] == 1
    assert clock.getDelayedCalls() == []  # no stream: no timers


def test_a_reader_that_catches_up_stays() -> None:
    clock, _, feed, request = subscribed()
    for _ in range(20):
        request.producer.pauseProducing()
        clock.advance(NODES_EVERY)
        request.producer.resumeProducing()
    assert not request.aborted and len(feed.streams) == 1


def test_a_closed_stream_is_forgotten() -> None:
    clock, _, feed, request = subscribed()
    request.finished.callback(None)
    assert feed.streams == [] and clock.getDelayedCalls() == []


def test_a_nodes_routes_are_sent_when_they_change() -> None:
    clock, holder, feed, request = subscribed()  # the snapshot had them all
    clock.advance(NODES_EVERY)
    [(_, nodes)] = request.events()
    assert all("routes" not in row for row in nodes["nodes"])  # as in the snapshot
    loads = dict(holder.view.loads)
    loads["n1"] = {**loads["n1"], "routes": {"1": 7, "2": 4}}
    holder.view = replace(holder.view, loads=loads)
    clock.advance(NODES_EVERY)
    [(_, nodes)] = request.events()
    assert {row["name"]: row.get("routes") for row in nodes["nodes"]} == {
        "n1": {"1": 7, "2": 4}, "n2": None, "n3": None}  # fmt: skip
