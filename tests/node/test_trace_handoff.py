"""A key's trace moves with its mailbox in a hand-off (orbited.node.handoff, trace.py)."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock

from orbited.core.hashing import route_of
from orbited.core.keys import ConnectionKey
from orbited.node.handoff import MailboxExport
from orbited.node.hub import Hub, HubConfig
from orbited.node.mailbox import Position
from orbited.node.observe import build_observer
from orbited.node.trace import TraceConfig, Tracer
from tests.node.test_trace import Sink, rows, send

ALICE = ConnectionKey("alice", "s1", "/chat")


def node(name: str, clock: Clock) -> Hub:
    hub = Hub(clock, HubConfig(handoff_timeout=5), epoch=f"ep{name}")
    tracer = Tracer(TraceConfig(), name)
    hub.observe(build_observer(tracer, None), tracer)
    return hub


def test_records_travel_with_the_mailbox_and_keep_their_node() -> None:
    clock = Clock()
    clock.advance(100)
    old, new = node("n1", clock), node("n2", clock)
    route = route_of(ALICE, old.routes, old.hash_version)
    everything = range(1, old.routes + 1)
    old.assign(everything)
    new.assign([r for r in everything if r != route])
    sink = Sink()
    old.attach(ALICE, sink, None)
    send(old, "41", [ALICE])
    old.ack(ALICE, 1)
    old.detach(ALICE, sink)
    send(old, "42", [ALICE])  # queued: the browser is away
    stream = old.mailbox(ALICE).stream
    clock.advance(1)
    new.assign(everything, incoming=[route])
    exports: list[dict[str, Any]] = []
    old.route_moved({route: "tcp://n2"}, handoff=[route], exports=exports, owners={route: "n2"})
    (entry,) = json.loads(json.dumps(exports))
    assert [t.get("event") for t in entry["trace"] if "request" in t] == ["41", "42"]
    assert new.handoff_received([entry], [route], sender="n1") == 1
    clock.advance(1)
    new.attach(ALICE, Sink(), Position(stream, 1))
    got = rows(new)
    assert [(r["event"], r["node"], r["status"]) for r in got] == [
        ("41", "n1", "delivered"), ("42", "n1", "queued"),
    ]  # fmt: skip
    assert got[1]["handed"] == "out:n2" and got[1]["written"] == 102.0
    assert got[0]["handed"] is None and got[0]["written"] == 100.0  # written on n1
    assert got[1]["transport"] == "ws" and got[0]["acked"] == 100.0
    whats = [n["what"] for n in new.trace_answer("alice")["keys"][0]["notes"]]
    assert whats == ["attach", "detach", "handed_in", "attach"]  # n1's two, then n2's
    # the old node still has its own trace, and says the mailbox is gone
    (key,) = old.trace_answer("alice")["keys"]
    assert not key["here"] and key["notes"][-1]["what"] == "moved"
    assert key["notes"][-1]["handed"] is True and key["notes"][-1]["owner"] == "n2"
    # 41 was written here before the move: its story is this node's; 42 went unwritten
    assert [r["handed"] for r in key["dispatches"]] == [None, "out:n2"]


def test_a_malformed_trace_member_still_installs_the_mailbox() -> None:
    clock = Clock()
    old, new = node("n1", clock), node("n2", clock)
    route = route_of(ALICE, old.routes, old.hash_version)
    everything = range(1, old.routes + 1)
    new.assign([r for r in everything if r != route])
    send(old, "1", [ALICE], ack=5)
    old.assign(everything)
    exports: list[dict[str, Any]] = []
    new.assign(everything, incoming=[route])
    old.route_moved({route: None}, handoff=[route], exports=exports)
    (entry,) = exports
    for bad in ("nope", [1, "x", {"t": "y"}], {"a": 1}):
        wire = {**entry, "trace": bad}
        assert MailboxExport.from_wire(wire, old.routes, old.hash_version).key == ALICE
    entry["trace"] = [1, {"t": "y"}, *entry["trace"]]
    assert new.handoff_received([entry], [route], sender="n1") == 1
    assert new.mailbox(ALICE) is not None
    assert [r["event"] for r in rows(new)] == ["1"]
    assert (
        new.tracer is not None and new.tracer.import_dropped == 1
    )  # {"t": "y"}; 1 is not an object


def test_an_export_without_trace_is_the_old_wire_form() -> None:
    hub = Hub(Clock(), HubConfig(), epoch="ep")
    send(hub, "1", [ALICE], ack=5)
    exports: list[dict[str, Any]] = []
    route = route_of(ALICE, hub.routes, hub.hash_version)
    hub.route_moved({route: None}, handoff=[route], exports=exports)
    assert "trace" not in exports[0]


def test_a_mailbox_in_several_entries_imports_its_trace_once() -> None:
    """handoff_messages splits a large mailbox into entries that each carry the trace."""
    clock = Clock()
    old, new = node("n1", clock), node("n2", clock)
    route = route_of(ALICE, old.routes, old.hash_version)
    everything = range(1, old.routes + 1)
    old.assign(everything)
    new.assign([r for r in everything if r != route])
    sink = Sink()
    old.attach(ALICE, sink, None)
    old.detach(ALICE, sink)
    for i in range(3):
        send(old, str(i), [ALICE])
    new.assign(everything, incoming=[route])
    exports: list[dict[str, Any]] = []
    old.route_moved({route: None}, handoff=[route], exports=exports, owners={route: "n2"})
    (entry,) = exports
    first = {**entry, "events": entry["events"][:2]}
    rest = {**entry, "events": entry["events"][2:]}
    assert new.handoff_received([first], [], sender="n1") == 1
    new.handoff_received([rest], [route], sender="n1")
    assert [r["event"] for r in rows(new)] == ["0", "1", "2"]
    (key,) = new.trace_answer("alice")["keys"]
    assert [n["what"] for n in key["notes"]] == ["attach", "detach", "handed_in"]


def test_a_hand_off_carries_a_bounded_trace_per_key() -> None:
    """However large trace_per_key is, a key's exported trace stays small (a hand-off
    message must fit the control protocol's limit); the old node keeps the rest."""
    from orbited.node.trace import EXPORT_NOTES, EXPORT_RECORDS

    clock = Clock()
    old = Hub(clock, HubConfig(), epoch="ep1")
    tracer = Tracer(TraceConfig(per_key=256, notes_per_key=256), "n1")
    old.observe(build_observer(tracer, None), tracer)
    sink = Sink()
    old.attach(ALICE, sink, None)
    for i in range(100):
        send(old, "e" * 125 + str(i), [ALICE])
        old.detach(ALICE, sink)
        old.attach(ALICE, sink, None)
    route = route_of(ALICE, old.routes, old.hash_version)
    exports: list[dict[str, Any]] = []
    old.route_moved({route: None}, handoff=[route], exports=exports, owners={route: "n2"})
    (entry,) = exports
    records = [t for t in entry["trace"] if "request" in t]
    notes = [t for t in entry["trace"] if "what" in t]
    assert len(records) == EXPORT_RECORDS and len(notes) == EXPORT_NOTES
    assert records[-1]["event"].endswith("99")  # the newest
    assert len(json.dumps(entry["trace"])) < 16 * 1024
    assert len(rows(old)) == 100  # the old node still answers with all it kept


def test_a_drain_of_many_traced_mailboxes_fits_the_control_messages() -> None:
    """Reviewer item A: 400 lingering mailboxes × 16 queued events, traced, handed over:
    every handoff message stays within half the control protocol's message limit."""
    from orbited.core.control import MAX_MESSAGE, encode, handoff_messages
    from tests.conftest import keys_on_routes

    clock = Clock()
    old = node("n1", clock)
    routes = old.routes
    keys = keys_on_routes([3], count=400, total=routes)
    for key in keys:
        sink = Sink()
        old.attach(key, sink, None)
        old.detach(key, sink)
    for i in range(16):
        for key in keys:
            send(old, f"event-{i}", [key], {"text": "x" * 40})
    exports: list[dict[str, Any]] = []
    old.route_moved({3: "tcp://n2"}, handoff=[3], exports=exports, owners={3: "n2"})
    assert len(exports) == 400 and any("trace" in e for e in exports)
    messages = handoff_messages("n2", [3], exports)
    sizes = [len(encode(m)) for m in messages]
    assert max(sizes) <= MAX_MESSAGE // 2, sizes
    carried = sum(len(e["events"]) for m in messages for e in m.mailboxes)
    assert carried == 400 * 16


def test_traces_past_the_hand_off_budget_stay_behind() -> None:
    from orbited.node.handoff import TRACE_HANDOFF_BYTES
    from tests.conftest import keys_on_routes

    clock = Clock()
    old = node("n1", clock)
    keys = keys_on_routes([3], count=100, total=old.routes)
    for key in keys:
        for i in range(16):
            send(old, "e" * 100 + str(i), [key], ack=5)  # big records: ~10 KB per key
    exports: list[dict[str, Any]] = []
    old.route_moved({3: None}, handoff=[3], exports=exports, owners={3: "n2"})
    sizes = [len(json.dumps(e["trace"], separators=(",", ":"))) if "trace" in e else 0
             for e in exports]  # fmt: skip
    assert 0 < sum(sizes) <= TRACE_HANDOFF_BYTES
    assert sizes[0] > 0 and sizes[-1] == 0  # the first keys carry theirs, the last do not
    assert len(exports) == 100  # every mailbox goes


def test_an_ack_reaches_records_imported_after_an_earlier_ack() -> None:
    """The browser acknowledged on the new owner before the hand-off's trace arrived (its
    ack comes every second, cumulative): the next ack still marks the imported records."""
    old, new = Tracer(TraceConfig(), "n1"), Tracer(TraceConfig(), "n2")

    def record(tracer: Tracer, event: str, seq: int, t: float) -> None:
        token = ((t, event, event.encode() * 8, None, None), (ALICE,))
        tracer.recipient(token, ALICE, 3, "delivered", seq, "st", 0, "ws", t)

    record(old, "e1", 1, 10.0)
    record(old, "e2", 2, 11.0)  # written by n1; the browser had it, then moved
    record(new, "e3", 3, 12.0)
    new.acked(ALICE, "st", 3, 13.0)  # before the import: only n2's own record
    new.import_(ALICE, old.export(ALICE), "n1", 13.5)
    new.acked(ALICE, "st", 3, 14.0)  # the next cumulative ack
    ((_, kt),) = new.keys_of("alice", None, None, 14.0)
    acked = {r["event"]: r["acked"] for r in new.key_json(kt, None, None)["dispatches"]}
    assert acked == {"e1": 14.0, "e2": 14.0, "e3": 13.0}
