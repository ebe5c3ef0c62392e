"""Latest-value events through the hub (docs/protocol.md, "Latest-value events"): frames,
replies, acknowledged mode, resume and the hand-off."""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet.task import Clock

from orbited.core.keys import ConnectionKey
from orbited.node.handoff import MailboxExport
from orbited.node.hub import Hub, HubConfig
from orbited.node.mailbox import Position
from tests.node.test_hub import RecordingSink

A = ConnectionKey("alice", "s1", "/t1")
A2 = ConnectionKey("alice", "s1", "/t2")


class Sink(RecordingSink):
    """tests/node/test_hub.py's recording sink, with this file's view of the events."""

    def events(self):
        return [f for f in self.frames if f["type"] == "event"]


def make_hub(**config) -> tuple[Hub, Clock]:
    clock = Clock()
    return Hub(clock, HubConfig(**config), epoch="ep"), clock


def send(hub, event_id, to, data, **extra):
    out = hub.handle_request(json.dumps({"id": event_id, "to": to, "data": data, **extra}).encode())
    if isinstance(out, bytes):
        return json.loads(out)
    got: list = []
    out.addCallback(lambda body: got.append(json.loads(body)))
    return got


def test_a_slow_browser_gets_the_newest_value_and_knows_what_was_replaced():
    hub, _ = make_hub()
    slow = Sink(accept=False)
    hub.attach(A, slow, None)
    replies = [send(hub, f"p{i}", [list(A)], {"px": i}, latest="price:AAPL") for i in range(4)]
    assert [r["results"] for r in replies] == [
        [{"status": "queued", "seq": 1}],
        [{"status": "queued", "seq": 2, "replaced": 1}],
        [{"status": "queued", "seq": 3, "replaced": 2}],
        [{"status": "queued", "seq": 4, "replaced": 3}],
    ]
    hub.detach(A, slow)
    fresh = Sink()
    hub.attach(A, fresh, Position(hub.mailbox(A).stream, 0))
    assert [f["type"] for f in fresh.frames] == ["hello", "event"]  # no gap: replaced, not lost
    assert fresh.events() == [
        {"type": "event", "seq": 4, "id": "p3", "latest": "price:AAPL", "replaced": 3,
         "data": {"px": 3}}
    ]  # fmt: skip


def test_a_live_browser_gets_every_value_with_its_tag():
    hub, _ = make_hub()
    sink = Sink()
    hub.attach(A, sink, None)
    send(hub, "p1", [list(A)], 1, latest="t")
    send(hub, "p2", [list(A)], 2, latest="t")  # replaces the delivered, unacknowledged 1
    assert [(e["seq"], e["latest"], e.get("replaced")) for e in sink.events()] == [
        (1, "t", None), (2, "t", 1),
    ]  # fmt: skip
    assert hub.stats["replaced"] == 1


def test_an_untagged_event_is_never_replaced_and_tags_are_per_key():
    hub, _ = make_hub()
    hub.attach(A, Sink(accept=False), None)
    hub.attach(A2, Sink(accept=False), None)
    send(hub, "e1", [list(A)], 1)
    send(hub, "e2", [list(A)], 2, latest="t")
    send(hub, "e3", [["alice", "*", "*"]], 3, latest="t")
    assert [e[0] for e in hub.mailbox(A).export()] == [1, 3]
    assert [e[0] for e in hub.mailbox(A2).export()] == [1]


def test_an_acknowledged_mode_wait_on_a_replaced_event_answers_replaced_at_once():
    hub, _ = make_hub()
    hub.attach(A, Sink(), None)
    first = send(hub, "p1", [list(A)], 1, latest="t", ack=10)
    second = send(hub, "p2", [list(A)], 2, latest="t", ack=10)
    assert first == [{"id": "p1", "ok": True,
                      "results": [{"status": "replaced", "seq": 1, "by": 2}]}]  # fmt: skip
    hub.ack(A, 2)
    assert second[0]["results"] == [{"status": "acked", "seq": 2, "replaced": 1}]


def test_an_acknowledged_event_is_not_replaced():
    hub, _ = make_hub()
    sink = Sink()
    hub.attach(A, sink, None)
    send(hub, "p1", [list(A)], 1, latest="t")
    hub.ack(A, 1)
    assert send(hub, "p2", [list(A)], 2, latest="t")["results"] == [
        {"status": "delivered", "seq": 2}
    ]


def test_a_resend_with_another_tag_is_another_request():
    hub, _ = make_hub()
    hub.attach(A, Sink(), None)
    send(hub, "p1", [list(A)], 1, latest="a")
    again = send(hub, "p1", [list(A)], 1, latest="b")
    assert "duplicate" not in again and again["results"] == [{"status": "delivered", "seq": 2}]


def test_the_hand_off_carries_tags_and_the_new_owner_keeps_replacing():
    old, _ = make_hub()
    old.attach(A, Sink(accept=False), None)
    send(old, "p1", [list(A)], 1, latest="t")
    send(old, "p2", [list(A)], 2, latest="t")
    send(old, "n3", [list(A)], 3)
    slot = old._slots[A]
    wire = json.loads(json.dumps(MailboxExport.of(A, slot.mailbox, slot.route).to_wire()))
    assert wire["events"] == [[2, "2", "p2", "t", 1], [3, "3", "n3"]]
    assert wire["evicted"] == 0
    new, _ = make_hub()
    new.assign([r for r in range(1, 25) if r != slot.route], 24)
    new.assign(range(1, 25), 24, incoming=[slot.route])
    new.handoff_received([wire], done=[slot.route])
    assert send(new, "p4", [list(A)], 4, latest="t")["results"] == [
        {"status": "queued", "seq": 4, "replaced": 2}
    ]
    sink = Sink()
    new.attach(A, sink, Position(slot.mailbox.stream, 1))
    assert [(e["seq"], e.get("latest"), e.get("replaced")) for e in sink.events()] == [
        (3, None, None), (4, "t", 2),
    ]  # fmt: skip
    assert not any(f["type"] == "gap" for f in sink.frames)


def test_a_malformed_tag_in_a_hand_off_entry_is_refused():
    import pytest

    from orbited.node.handoff import HandoffError

    base = {"key": list(A), "stream": "ep.1", "next_seq": 3, "acked": 0}
    for bad in ([1, "1", "e", "", 0], [1, "1", "e", 5, 0], [1, "1", "e", "t", -1],
                [1, "1", "e", "t" * 129, 0], [1, "1", "e", "t"]):  # fmt: skip
        with pytest.raises(HandoffError):
            MailboxExport.from_wire({**base, "events": [bad]}, 24)
    ok = MailboxExport.from_wire({**base, "events": [[1, "1", None, "t", 0]]}, 24)
    assert ok.events == ((1, b"1", None),) and ok.tags == ((1, b'"t"', 0),)
    assert ok.evicted is None


def test_a_wildcard_ack_wait_on_a_replaced_key_event_resolves_in_the_matched_result():
    hub, _ = make_hub()
    hub.attach(A, Sink(), None)
    first = hub.handle_request(
        json.dumps(
            {"id": "p1", "to": [["alice", "*", "*"]], "data": 1, "latest": "t", "ack": 10}
        ).encode()  # fmt: skip
    )
    assert isinstance(first, defer.Deferred)
    got: list = []
    first.addCallback(lambda body: got.append(json.loads(body)))
    send(hub, "p2", [list(A)], 2, latest="t")
    assert got[0]["results"] == [{"status": "matched", "keys": [
        {"key": list(A), "status": "replaced", "seq": 1, "by": 2}]}]  # fmt: skip
