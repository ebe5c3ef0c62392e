"""The acknowledged mode's waits per request (issue 20): one timer for all of a
request's recipients, the outcome of each recipient exact (docs/protocol.md,
"Acknowledged mode")."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock

from orbited.core.keys import ConnectionKey
from orbited.node import events
from orbited.node.events import RequestLimits
from orbited.node.frames import Frame
from orbited.node.hub import Hub, HubConfig
from tests.node.test_fanout_path import FrameSink


def request(event_id: str, to: list[Any], ack: float) -> events.EventRequest:
    body = json.dumps({"id": event_id, "to": to, "data": event_id, "ack": ack}).encode()
    parsed = events.parse_request(body, RequestLimits())
    assert isinstance(parsed, events.EventRequest)
    return parsed


def hub_with(keys: list[ConnectionKey]) -> tuple[Hub, Clock]:
    clock = Clock()
    hub = Hub(clock, HubConfig(linger=30), epoch="ep")
    for key in keys:
        hub.attach(key, FrameSink(), None)
    return hub, clock


KEYS = [ConnectionKey(f"u{i}", "s", "/a") for i in range(40)]


def answer_of(outcome: Any) -> list[Any]:
    got: list[Any] = []
    outcome.addCallback(got.append)
    return got


def test_a_request_to_forty_keys_arms_one_timer_and_says_each_keys_outcome():
    hub, clock = hub_with(KEYS)
    got = answer_of(hub.dispatch(request("e1", [list(k) for k in KEYS], ack=5)))
    assert len(clock.getDelayedCalls()) == 1  # one timer for the forty waits
    assert hub.gauges()["ack_waits"] == 40
    for key in KEYS[:25]:  # these browsers confirm; the others do not
        hub.ack(key, hub.mailbox(key).last_seq)  # type: ignore[union-attr]
    assert got == []
    clock.advance(5)
    (outcome,) = got
    statuses = [r.status.value for r in outcome.results]
    assert statuses == ["acked"] * 25 + ["unacked"] * 15
    assert [r.seq for r in outcome.results] == [1] * 40
    assert hub.gauges()["ack_waits"] == 0 and clock.getDelayedCalls() == []
    assert hub.stats["acked"] == 25 and hub.stats["unacked"] == 15


def test_the_timer_goes_when_the_last_key_confirms():
    hub, clock = hub_with(KEYS[:3])
    got = answer_of(hub.dispatch(request("e1", [list(k) for k in KEYS[:3]], ack=5)))
    for key in KEYS[:3]:
        hub.ack(key, 1)
    assert [r.status.value for r in got[0].results] == ["acked"] * 3
    assert clock.getDelayedCalls() == []
    assert json.loads(events.encode_reply(got[0]))["results"] == [
        {"status": "acked", "seq": 1}
    ] * 3  # fmt: skip


def test_a_key_twice_a_wildcard_and_a_new_key_in_one_acknowledged_request():
    alice = [ConnectionKey("alice", "s", f"/t{i}") for i in range(2)]
    hub, clock = hub_with([KEYS[0], *alice])
    to = [list(KEYS[0]), ["alice", "*", "*"], list(KEYS[0]), list(KEYS[1]), list(alice[1])]
    got = answer_of(hub.dispatch(request("e1", to, ack=2)))
    # one timer for every wait (the wildcard's keys too); KEYS[1] had no mailbox: one is
    # kept for it, lingering (the linger wheel's timer)
    assert sorted(c.func.__name__ for c in clock.getDelayedCalls()) == ["_group_timeout", "_sweep"]
    hub.ack(KEYS[0], 1)
    hub.ack(alice[0], 1)
    clock.advance(2)
    (outcome,) = got
    first, wildcard, again, new, tab = outcome.results
    assert first == again == events.RecipientResult(events.Status.ACKED, 1)
    assert wildcard.status is events.Status.MATCHED
    assert [(k, r.status.value) for k, r in wildcard.keys] == [
        (alice[0], "acked"), (alice[1], "unacked"),
    ]  # fmt: skip
    assert new == events.RecipientResult(events.Status.UNACKED, 1)
    assert tab == events.RecipientResult(events.Status.UNACKED, 1)  # seen via the wildcard
    assert [c.func.__name__ for c in clock.getDelayedCalls()] == ["_sweep"]


def test_an_expiring_mailbox_and_a_resend_while_waiting():
    hub, clock = hub_with(KEYS[:2])
    hub.detach(KEYS[1], hub._slots[KEYS[1]].sink)  # type: ignore[arg-type]
    req = request("e1", [list(k) for k in KEYS[:2]], ack=60)
    got = answer_of(hub.dispatch(req))
    resent = answer_of(hub.dispatch(req))  # waits for the first one's reply
    hub.ack(KEYS[0], 1)
    clock.advance(30.1)  # KEYS[1]'s mailbox expires: its wait ends unacked
    assert [r.status.value for r in got[0].results] == ["acked", "unacked"]
    assert resent[0].duplicate and resent[0].results == got[0].results
    assert clock.getDelayedCalls() == []


def test_waits_made_before_a_failing_delivery_still_time_out():
    """(Review of 38d5eb7) a sink raising part-way through an acknowledged-mode request:
    the waits already made keep their timeout (none is left behind)."""

    class Broken(FrameSink):
        def deliver(self, out: list[Frame]) -> bool:
            if any(f.seq for f in out):  # events, not the hello
                raise RuntimeError("a transport bug")
            return super().deliver(out)

    hub, clock = hub_with(KEYS[:3])
    hub.attach(KEYS[1], Broken(), None)
    reply = hub.handle_request(
        json.dumps({"id": "e1", "to": [list(k) for k in KEYS[:3]], "data": 1, "ack": 5}).encode()
    )
    assert isinstance(reply, bytes) and json.loads(reply)["error"]["code"] == "internal_error"
    assert hub.gauges()["ack_waits"] == 1  # KEYS[0]'s, made before the failure
    clock.advance(5)
    assert hub.gauges()["ack_waits"] == 0 and hub.stats["unacked"] == 1
