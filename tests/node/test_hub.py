"""Node core with a fake clock and recording sinks (no sockets)."""

import json

import pytest
from twisted.internet.task import Clock

from orbited.core.hashing import route_of
from orbited.core.keys import ConnectionKey
from orbited.core.speedups import native
from orbited.node import frames
from orbited.node.events import RequestLimits
from orbited.node.hub import SPREAD_MAX, Hub, HubConfig
from orbited.node.mailbox import MailboxLimits, Position
from tests.conftest import keys_on_routes

ALICE = ConnectionKey("alice", "s1", "/chat")
BOB = ConnectionKey("bob", "s2", "/chat")


class RecordingSink:
    wants_pings = True

    def __init__(self, accept: bool = True) -> None:
        self.frames: list[dict] = []
        self.accept = accept
        self.last_write = 0.0
        self.was_replaced = False
        self.reconnect_reason: str | None = None

    def deliver(self, out):
        if not self.accept:
            return False
        self.frames += [json.loads(f.data) for f in out]
        return True

    def replaced(self):
        self.was_replaced = True

    def reconnect(self, reason, route=None, spread=None):
        self.reconnect_reason = reason

    def closed(self, code, reason):
        self.closed_with = (code, reason)

    def events(self):
        return [(f["seq"], f["data"]) for f in self.frames if f["type"] == "event"]


def make_hub(**config) -> tuple[Hub, Clock]:
    clock = Clock()
    return Hub(clock, HubConfig(**config), epoch="ep"), clock


def send(hub, event_id, keys, data):
    body = json.dumps({"id": event_id, "to": [list(k) for k in keys], "data": data})
    return json.loads(hub.handle_request(body.encode()))


def test_attach_sends_hello_with_stream():
    hub, _ = make_hub(keepalive=10)
    sink = RecordingSink()
    hub.attach(ALICE, sink, None)
    assert sink.frames == [
        {"type": "hello", "stream": "ep.1", "keepalive": 10, "reset": False, "seq": 0,
         "spread": 0.001, "hash": 2}  # 1 mailbox at the default reconnect_rate, 3000/s
    ]  # fmt: skip


def test_statuses_per_recipient_in_request_order():
    hub, _ = make_hub()
    sink = RecordingSink()
    hub.attach(ALICE, sink, None)
    hub.attach(BOB, RecordingSink(), None)
    hub.detach(BOB, hub._slots[BOB].sink)
    reply = send(hub, "e1", [BOB, ConnectionKey("carol", "", ""), ALICE], {"m": 1})
    assert reply == {
        "id": "e1",
        "ok": True,
        "results": [
            {"status": "queued", "seq": 1},
            {"status": "no_connection"},
            {"status": "delivered", "seq": 1},
        ],
    }
    assert sink.events() == [(1, {"m": 1})]


def test_resent_request_is_not_delivered_twice():
    hub, clock = make_hub(dedup_window=60)
    sink = RecordingSink()
    hub.attach(ALICE, sink, None)
    first = send(hub, "e1", [ALICE], "x")
    again = send(hub, "e1", [ALICE], "x")
    assert again == {**first, "duplicate": True}
    assert sink.events() == [(1, "x")]
    assert hub.stats["duplicates"] == 1
    clock.advance(61)  # outside the window a resend is a new event
    assert send(hub, "e1", [ALICE], "x")["results"] == [{"status": "delivered", "seq": 2}]


def test_dedup_memory_is_bounded_by_count_and_bytes():
    hub, _ = make_hub(dedup_max=10)
    hub.attach(ALICE, RecordingSink(), None)
    for i in range(50):
        send(hub, f"e{i}", [ALICE], i)
    assert len(hub.dedup) == 10
    hub, _ = make_hub(dedup_max_bytes=1000)
    for i in range(50):
        send(hub, f"e{i}", [BOB] * 10, i)  # ~280-byte replies
    assert hub.dedup.size <= 1000 and len(hub.dedup) == 3


def test_same_key_twice_in_one_request_is_delivered_once():
    hub, _ = make_hub()
    sink = RecordingSink()
    hub.attach(ALICE, sink, None)
    reply = send(hub, "e1", [ALICE, ALICE], 1)
    assert reply["results"][0] == reply["results"][1] == {"status": "delivered", "seq": 1}
    assert sink.events() == [(1, 1)]


def test_reconnect_with_position_resumes_without_gap_or_duplicate():
    hub, _ = make_hub()
    first = RecordingSink()
    hub.attach(ALICE, first, None)
    for i in range(3):
        send(hub, f"a{i}", [ALICE], i)
    hub.detach(ALICE, first)
    for i in range(3, 6):
        assert send(hub, f"a{i}", [ALICE], i)["results"][0]["status"] == "queued"
    second = RecordingSink()
    hub.attach(ALICE, second, Position("ep.1", first.events()[-1][0]))
    assert second.events() == [(4, 3), (5, 4), (6, 5)]
    assert first.events() + second.events() == [(i + 1, i) for i in range(6)]


def test_linger_expiry_forgets_the_key():
    hub, clock = make_hub(linger=30)
    sink = RecordingSink()
    hub.attach(ALICE, sink, None)
    hub.detach(ALICE, sink)
    clock.advance(29)
    assert send(hub, "e1", [ALICE], 1)["results"][0]["status"] == "queued"
    clock.advance(2)
    assert send(hub, "e2", [ALICE], 1)["results"][0]["status"] == "no_connection"
    later = RecordingSink()
    hub.attach(ALICE, later, Position("ep.1", 0))
    assert later.frames[0]["stream"] == "ep.2" and later.frames[0]["reset"]


def test_reattach_within_linger_cancels_expiry():
    hub, clock = make_hub(linger=30)
    sink = RecordingSink()
    hub.attach(ALICE, sink, None)
    hub.detach(ALICE, sink)
    clock.advance(20)
    hub.attach(ALICE, RecordingSink(), None)
    clock.advance(100)
    assert hub.mailbox(ALICE) is not None


def test_newer_connection_replaces_older():
    hub, _ = make_hub()
    old, new = RecordingSink(), RecordingSink()
    hub.attach(ALICE, old, None)
    hub.attach(ALICE, new, None)
    assert old.was_replaced
    hub.detach(ALICE, old)  # the old transport closing later changes nothing
    assert hub.is_attached(ALICE, new)
    send(hub, "e", [ALICE], 1)
    assert new.events() == [(1, 1)] and old.events() == []


def test_overflow_tells_web_app_and_browser():
    hub, _ = make_hub(mailbox=MailboxLimits(max_events=2))
    sink = RecordingSink()
    hub.attach(ALICE, sink, None)
    hub.detach(ALICE, sink)
    results = [send(hub, f"e{i}", [ALICE], i)["results"][0] for i in range(4)]
    assert results[2] == {"status": "queued", "seq": 3, "dropped": 1}
    back = RecordingSink()
    hub.attach(ALICE, back, Position("ep.1", 0))
    assert back.frames[1] == {"type": "gap", "from": 1, "to": 2}
    assert back.events() == [(3, 2), (4, 3)]


def test_sink_that_cannot_take_frames_leaves_them_queued():
    hub, _ = make_hub()
    sink = RecordingSink(accept=False)
    hub.attach(ALICE, sink, None)
    assert send(hub, "e", [ALICE], 1)["results"][0]["status"] == "queued"


def test_keepalive_pings_only_idle_sinks():
    hub, clock = make_hub(keepalive=10)
    idle, busy = RecordingSink(), RecordingSink()
    hub.attach(ALICE, idle, None)
    hub.attach(BOB, busy, None)
    clock.advance(10)
    busy.last_write = clock.seconds()
    hub.keepalive_tick()
    assert idle.frames[-1] == {"type": "ping", "spread": 0.001}  # 2 mailboxes at 3000/s
    assert busy.frames[-1]["type"] == "hello"


def test_the_reconnect_spread_hint_follows_the_node_s_browsers():
    """The window browsers spread their first reconnect over (docs/protocol.md, "Frames"):
    mailboxes / reconnect_rate seconds, rounded up to the millisecond, at most
    SPREAD_MAX; sent in each hello and refreshed in each ping."""
    hub, clock = make_hub(reconnect_rate=400.0, keepalive=10)
    first = RecordingSink()
    hub.attach(ALICE, first, None)
    assert first.frames[0]["spread"] == 0.003  # 1 / 400 s = 2.5 ms, rounded up
    for i in range(999):
        hub.attach(ConnectionKey(f"u{i}", "", ""), RecordingSink(accept=False), None)
    later = RecordingSink()
    hub.attach(BOB, later, None)
    assert later.frames[0]["spread"] == 2.503  # 1001 / 400 s, rounded up
    # The first browser learns the node's size at the next ping; lingering mailboxes count
    # (their browsers come back too).
    clock.advance(10)
    hub.keepalive_tick()
    assert first.frames[-1] == {"type": "ping", "spread": 2.503}
    hub.detach(BOB, later)
    hub.keepalive_tick()
    assert first.frames[-1] == {"type": "ping", "spread": 2.503}
    # Bounded: a huge node does not send its browsers away for minutes.
    big, _ = make_hub(reconnect_rate=1.0)
    for i in range(40):
        big.attach(ConnectionKey(f"u{i}", "", ""), RecordingSink(accept=False), None)
    sink = RecordingSink()
    big.attach(ALICE, sink, None)
    assert sink.frames[0]["spread"] == SPREAD_MAX == 30.0


def test_the_spread_hint_is_zero_without_a_reconnect_rate():
    hub, _ = make_hub(reconnect_rate=0.0)
    sink = RecordingSink()
    hub.attach(ALICE, sink, None)
    assert sink.frames[0]["spread"] == 0


def test_shutdown_asks_every_browser_to_reconnect():
    hub, clock = make_hub()
    a, b = RecordingSink(), RecordingSink()
    hub.attach(ALICE, a, None)
    hub.attach(BOB, b, None)
    hub.shutdown("shutdown")
    assert a.reconnect_reason == b.reconnect_reason == "shutdown"
    assert hub.connections == 0 and clock.getDelayedCalls() == []


def test_bad_requests_get_error_replies():
    hub, _ = make_hub(requests=RequestLimits(max_recipients=1))
    reply = json.loads(hub.handle_request(b'{"id":"e","to":[["a","",""],["b","",""]],"data":1}'))
    assert reply["ok"] is False and reply["error"]["code"] == "too_many_recipients"
    assert reply["id"] == "e"
    assert json.loads(hub.handle_request(b"\x00garbage"))["error"]["code"] == "bad_json"


def test_ping_request():
    hub, _ = make_hub()
    assert json.loads(hub.handle_request(b'{"op":"ping","id":"p"}')) == {
        "id": "p",
        "ok": True,
        "results": [],
    }


# -- routes assigned by HaloD (docs/halod-protocol.md, "On the node") -------------------


def test_assignment_evicts_keys_of_lost_routes_only():
    hub, clock = make_hub()
    signals = []
    hub.presence = lambda kind, key: signals.append((kind, key))
    hub.assign(range(1, 25))
    keep, lose = keys_on_routes(range(1, 13))[0], keys_on_routes(range(13, 25))[0]
    lingering = keys_on_routes(range(13, 25), count=2)[1]
    sinks = {k: RecordingSink() for k in (keep, lose, lingering)}
    for key, sink in sinks.items():
        hub.attach(key, sink, None)
    hub.detach(lingering, sinks[lingering])
    assert hub.assign(range(1, 13)) == 2
    assert sinks[lose].reconnect_reason == "route_moved"
    assert sinks[keep].reconnect_reason is None and hub.mailbox(keep) is not None
    assert hub.mailbox(lose) is None and hub.mailbox(lingering) is None
    assert ("signoff", lose) in signals and ("signoff", lingering) in signals
    clock.advance(60)  # the cancelled linger does not fire twice
    assert signals.count(("signoff", lingering)) == 1


def test_keys_of_routes_not_served_are_refused_and_reported_moved():
    hub, _ = make_hub()
    hub.assign([1, 2, 3])
    other = keys_on_routes(range(4, 25))[0]
    sink = RecordingSink()
    assert hub.attach(other, sink, None) is None
    assert sink.reconnect_reason == "route_moved" and sink.frames == []
    reply = send(hub, "e1", [other], "x")
    from orbited.core.hashing import route_of

    assert reply["results"] == [{"status": "moved", "route": route_of(other), "hash": 2}]
    hub.route_moved({1: "tcp://127.0.0.9:9000"})
    moved = keys_on_routes([1])[0]
    assert send(hub, "e2", [moved], "x")["results"] == [
        {"status": "moved", "route": 1, "to": "tcp://127.0.0.9:9000", "hash": 2}
    ]
    assert hub.owned == frozenset({2, 3})
    hub.assign([1, 2, 3])  # back again: served, no longer reported moved
    assert send(hub, "e3", [moved], "x")["results"] == [{"status": "no_connection"}]


def test_a_reply_that_stored_nothing_is_not_remembered():
    """``moved``, ``full`` and ``limited`` store nothing and tell the web app to resend
    (docs/protocol.md): the same request sent again is dispatched again, not answered
    from the dedup memory. A spare answers ``moved``, then takes the route over (its
    owner died): the client's resend of that request must reach the browser, not get the
    remembered ``moved`` for dedup_window seconds."""
    hub, _ = make_hub()
    hub.assign([2, 3])
    key = keys_on_routes([1])[0]
    assert send(hub, "e1", [key], "x")["results"][0]["status"] == "moved"
    acked = json.loads(send_acked(hub, "e2", [key], "y"))  # acknowledged mode: likewise
    assert acked["results"][0]["status"] == "moved"
    hub.assign([1, 2, 3])  # the route is this node's now
    sink = RecordingSink()
    hub.attach(key, sink, None)
    again = send(hub, "e1", [key], "x")
    assert again["results"][0]["status"] == "delivered" and "duplicate" not in again
    d = hub.handle_request(json.dumps({"id": "e2", "to": [list(key)], "data": "y",
                                       "ack": 5}).encode())  # fmt: skip
    assert [f["type"] for f in sink.frames] == ["hello", "event", "event"]
    hub.ack(key, 2, hub.mailbox(key).stream)
    assert answer(d)[0]["results"][0]["status"] == "acked"
    # a reply that stored something is remembered as before
    assert send(hub, "e1", [key], "x")["duplicate"] is True
    assert [f["type"] for f in sink.frames] == ["hello", "event", "event"]


def test_standalone_hub_serves_every_route():
    hub, _ = make_hub()
    key = keys_on_routes([24])[0]
    assert hub.owned is None and hub.attach(key, RecordingSink(), None) is not None


# -- acknowledged mode (docs/protocol.md, "Acknowledged mode") ---------------------------


def send_acked(hub, event_id, keys, data, ack=5):
    body = json.dumps({"id": event_id, "to": [list(k) for k in keys], "data": data, "ack": ack})
    return hub.handle_request(body.encode())


def answer(d):
    got = []
    d.addCallback(lambda r: got.append(json.loads(r)))
    return got


def test_acknowledged_mode_replies_once_the_browser_confirms():
    hub, clock = make_hub()
    sink = RecordingSink()
    hub.attach(ALICE, sink, None)
    hub.attach(BOB, RecordingSink(), None)
    got = answer(send_acked(hub, "e1", [ALICE, BOB, ConnectionKey("nobody", "", "")], 1))
    assert got == [] and sink.events() == [(1, 1)]
    hub.ack(ALICE, 1)
    assert got == []  # bob has not confirmed yet
    stream = hub.mailbox(BOB).stream
    hub.attach(BOB, RecordingSink(), Position(stream, 1))  # resuming past 1 confirms it
    assert got == []  # nobody's browser has not come: the event waits in a new mailbox
    clock.advance(5)
    assert got[0]["results"] == [
        {"status": "acked", "seq": 1}, {"status": "acked", "seq": 1},
        {"status": "unacked", "seq": 1},
    ]  # fmt: skip


def test_acknowledged_mode_keeps_events_for_a_browser_not_yet_connected():
    hub, clock = make_hub(linger=10)
    notices: list = []
    hub.presence = lambda kind, key: notices.append((kind, key.user))
    got = answer(send_acked(hub, "e1", [ALICE, BOB], 1))
    assert notices == []  # nobody is online yet
    sink = RecordingSink()
    hub.attach(ALICE, sink, None)  # e.g. back from a crashed node, on the route's new owner
    assert notices == [("signon", "alice")] and sink.events() == [(1, 1)]
    hub.ack(ALICE, 1)
    clock.advance(10)  # bob never came: his mailbox expires without a signoff
    assert notices == [("signon", "alice")]
    assert got[0]["results"] == [{"status": "acked", "seq": 1}, {"status": "unacked", "seq": 1}]
    assert hub.mailbox(BOB) is None


def test_acknowledged_mode_times_out_as_unacked_and_resends_wait_for_the_first_reply():
    hub, clock = make_hub()
    hub.attach(ALICE, RecordingSink(), None)
    first = answer(send_acked(hub, "e1", [ALICE], 1, ack=2))
    again = answer(send_acked(hub, "e1", [ALICE], 1, ack=2))  # a resend while it waits
    clock.advance(2)
    assert first[0]["results"] == [{"status": "unacked", "seq": 1}]
    assert again[0]["duplicate"] is True and again[0]["results"] == first[0]["results"]
    assert len(hub.mailbox(ALICE)) == 1  # delivered once


def test_acknowledged_mode_limits():
    hub, _ = make_hub(requests=RequestLimits(max_ack_wait=10))
    for bad in (0, -1, 11, True, "5"):
        reply = json.loads(send_acked(hub, "e", [ALICE], 1, ack=bad))
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request"


def test_unconfirmed_events_of_a_moved_route_answer_moved_unless_handed_over():
    hub, _ = make_hub(routes=4)
    hub.assign([1, 2, 3, 4], 4)
    (a,) = keys_on_routes([1], 1, 4)
    (b,) = keys_on_routes([2], 1, 4)
    hub.attach(a, RecordingSink(), None)
    hub.attach(b, RecordingSink(), None)
    got_a = answer(send_acked(hub, "ea", [a], 1))
    got_b = answer(send_acked(hub, "eb", [b], 1))
    exports: list = []
    hub.route_moved({1: "tcp://n2:1", 2: "tcp://n2:1"}, handoff=[2], exports=exports)
    assert got_a[0]["results"] == [{"status": "moved", "route": 1, "to": "tcp://n2:1", "hash": 2}]
    assert got_b[0]["results"] == [{"status": "unacked", "seq": 1}]  # n2 has it
    assert [e["key"] for e in exports] == [list(b)]


# -- hand-off of a moved route's mailboxes (docs/halod-protocol.md, "Hand-off") ----------


def test_hand_off_resumes_the_same_stream_on_the_new_owner_in_order():
    old, _ = make_hub(routes=4)
    new, clock = make_hub(routes=4)
    old.assign([1, 2, 3, 4], 4)
    new.assign([], 4)
    key, other = keys_on_routes([3], 2, 4)
    browser = RecordingSink()
    old.attach(key, browser, None)
    old.attach(other, RecordingSink(), None)
    for n in range(1, 4):
        send(old, f"e{n}", [key, other], n)
    old.ack(key, 1)
    # HaloD: route 3 moves old → new, both alive
    new.assign([3], incoming=[3])
    exports: list = []
    old.route_moved({3: "tcp://new:1"}, handoff=[3], exports=exports)
    assert browser.reconnect_reason == "route_moved"
    assert send(old, "e4", [key], 4)["results"][0]["status"] == "moved"
    # the web app's resend and the browser's reconnect reach the new owner first: both wait
    pending = new.handle_request(json.dumps({"id": "e4", "to": [list(key)], "data": 4}).encode())
    resumed = RecordingSink()
    stream = old_stream = exports[0]["stream"]
    assert new.attach(key, resumed, Position(stream, 2)) is None and resumed.frames == []
    got = answer(pending)
    assert got == []
    new.handoff_received(exports, done=[3])
    assert got[0]["results"] == [{"status": "delivered", "seq": 4}] or got[0]["results"] == [
        {"status": "queued", "seq": 4}
    ]
    # spread: 2 mailboxes at 3000/s, rounded up to the millisecond
    assert resumed.frames[0] == {"type": "hello", "stream": old_stream, "keepalive": 25.0, "seq": 2,
                                 "reset": False, "spread": 0.001, "hash": 2}  # fmt: skip
    assert resumed.events() == [(3, 3), (4, 4)]  # nothing lost, nothing twice
    assert new.stats["handoff_in"] == 2 and old.stats["handoff_out"] == 2


def test_presence_is_continuous_across_a_hand_off():
    old, _ = make_hub(routes=4)
    new, clock = make_hub(routes=4, linger=5)
    notices: list = []
    old.presence = new.presence = lambda kind, k: notices.append(kind)
    old.assign([1, 2, 3, 4], 4)
    (key,) = keys_on_routes([2], 1, 4)
    old.attach(key, RecordingSink(), None)
    new.assign([], 4)  # a node in a cluster starts with nothing (orbited.node.link)
    new.assign([2], 4, incoming=[2])
    exports: list = []
    old.route_moved({2: None}, handoff=[2], exports=exports)
    new.handoff_received(exports, done=[2])
    assert notices == ["signon"]  # no signoff/signon flicker for a planned move
    clock.advance(5)  # the browser never came back
    assert notices == ["signon", "signoff"]


def test_a_held_route_is_served_afresh_after_the_hand_off_timeout():
    new, clock = make_hub(routes=4, handoff_timeout=3)
    new.assign([], 4)
    new.assign([1], 4, incoming=[1])
    (key,) = keys_on_routes([1], 1, 4)
    browser = RecordingSink()
    assert new.attach(key, browser, Position("gone.1", 7)) is None
    gone = RecordingSink()
    new.attach(key, gone, None)
    new.detach(key, gone)  # closed while it waited: must not be attached later
    clock.advance(3)
    assert new.stats["handoff_timeouts"] == 1
    assert browser.frames[0]["reset"] is True and not gone.frames
    late = [{"key": list(key), "route": 1, "stream": "old.1", "next_seq": 5, "acked": 0,
             "events": [[4, "4"]]}]  # fmt: skip
    assert new.handoff_received(late, done=[1]) == 0  # too late: the fresh mailbox stays
    assert new.mailbox(key).stream == "ep.1"


def test_malformed_hand_off_entries_are_skipped():
    new, _ = make_hub(routes=4)
    new.assign([], 4)
    new.assign([1], 4, incoming=[1])
    (key,) = keys_on_routes([1], 1, 4)
    bad = [{"key": "x"}, {"key": list(key), "stream": "no spaces allowed", "next_seq": 1,
            "acked": 0, "events": []}, {"key": list(key), "stream": "a.1", "next_seq": -1,
            "acked": 0, "events": []}]  # fmt: skip
    assert new.handoff_received(bad, done=[1]) == 0
    assert new.mailbox(key) is None


def test_hand_off_messages_split_large_mailboxes_and_name_the_done_routes():
    from orbited.core import control as p

    entries = [{"key": ["u", "", ""], "route": 1, "stream": "a.1", "next_seq": 101,
                "acked": 0, "events": [[n, "x" * 1000] for n in range(1, 101)]},
               {"key": ["v", "", ""], "route": 2, "stream": "a.2", "next_seq": 2,
                "acked": 0, "events": [[1, "1"]]}]  # fmt: skip
    messages = p.handoff_messages("n2", [2, 1], entries, chunk=10_000)
    assert len(messages) > 5 and list(messages[-1].done) == [1, 2]
    assert all(not m.done for m in messages[:-1])
    for m in messages:
        assert len(p.encode(m)) < 20_000
        p.decode(p.encode(m), p.FROM_HALOD)
    seqs = [e[0] for m in messages for b in m.mailboxes if b["key"] == ["u", "", ""]
            for e in b["events"]]  # fmt: skip
    assert seqs == list(range(1, 101))
    new, _ = make_hub(routes=4)
    keys = [ConnectionKey("u", "", ""), ConnectionKey("v", "", "")]
    from orbited.core.hashing import route_of

    routes = sorted({route_of(k, 4) for k in keys})
    new.assign([], 4)
    new.assign(routes, 4, incoming=routes)
    for m in messages:
        new.handoff_received(list(m.mailboxes), m.done and routes)
    assert len(new.mailbox(keys[0])) == 100 and len(new.mailbox(keys[1])) == 1


def test_a_fresh_connection_starts_after_what_was_acknowledged():
    hub, _ = make_hub()
    first = RecordingSink()
    hub.attach(ALICE, first, None)
    for n in (1, 2, 3):
        send(hub, f"e{n}", [ALICE], n)
    hub.ack(ALICE, 3)
    hub.detach(ALICE, first)
    page = RecordingSink()  # a reloaded page: no position
    hub.attach(ALICE, page, None)
    assert page.frames[0]["seq"] == 3 and page.events() == []
    hub.detach(ALICE, page)
    again = RecordingSink()  # it polls on from stream:3, as the hello said: no gap
    hub.attach(ALICE, again, Position(page.frames[0]["stream"], 3))
    assert [f["type"] for f in again.frames] == ["hello"]


def test_the_attached_count_is_kept_not_scanned():
    """Hub.attached (what the control heartbeat reports as live connections) follows
    every way a browser comes and goes, and equals the scanning gauge."""
    hub, clock = make_hub(linger=5, routes=4)

    def check(expected: int) -> None:
        assert hub.attached == hub.gauges()["attached"] == expected
        assert hub.mailboxes == hub.gauges()["mailboxes"]

    keys = [ConnectionKey(f"u{i}", "s", "/t") for i in range(8)]
    sinks = [RecordingSink() for _ in keys]
    for key, sink in zip(keys, sinks, strict=True):
        hub.attach(key, sink, None)
    check(8)
    newer = RecordingSink()
    hub.attach(keys[0], newer, None)  # replaces: still one per key
    check(8)
    hub.detach(keys[0], sinks[0])  # the replaced one going away changes nothing
    check(8)
    hub.detach(keys[0], newer)
    hub.detach(keys[1], sinks[1])
    hub.detach(keys[1], sinks[1])  # twice: once counted
    check(6)
    hub.attach(keys[1], sinks[1], None)  # back within linger
    check(7)
    clock.advance(6)  # keys[0]'s linger ends
    check(7)
    moved = {route_of(key, 4) for key in keys[2:]}
    hub.route_moved({route: None for route in moved})
    expected = sum(1 for key in keys[1:2] if route_of(key, 4) not in moved)
    check(expected)
    hub.shutdown("shutdown")
    check(0)


# -- event ids in frames: the page drops a resend it already has (docs/protocol.md) -------


def test_event_frames_carry_the_request_id_shared_by_all_recipients():
    hub, _ = make_hub()
    a, b = RecordingSink(), RecordingSink()
    hub.attach(ALICE, a, None)
    hub.attach(BOB, b, None)
    send(hub, 'evt-ü"1', [ALICE, BOB], {"n": 1})
    for sink in (a, b):
        assert sink.frames[-1] == {"type": "event", "seq": 1, "id": 'evt-ü"1', "data": {"n": 1}}
    # encoded once per request: both mailboxes hold the same bytes object
    ida, idb = hub.mailbox(ALICE).export()[0][2], hub.mailbox(BOB).export()[0][2]
    assert ida is idb and json.loads(ida) == 'evt-ü"1'
    # a replay (fresh connection) carries the id too
    again = RecordingSink()
    hub.attach(ALICE, again, None)
    assert again.frames[-1]["id"] == 'evt-ü"1'


def test_a_queued_acknowledged_event_replays_with_its_id():
    hub, _ = make_hub()
    hub.handle_request(json.dumps({"id": "e7", "to": [list(ALICE)], "data": 7, "ack": 5}).encode())
    sink = RecordingSink()
    hub.attach(ALICE, sink, None)
    assert sink.frames[-1] == {"type": "event", "seq": 1, "id": "e7", "data": 7}


def test_hand_off_carries_event_ids_and_accepts_the_old_two_element_form():
    old, _ = make_hub(routes=4)
    new, _ = make_hub(routes=4)
    old.assign([1, 2, 3, 4], 4)
    new.assign([], 4)
    key, other = keys_on_routes([3], 2, 4)
    old.attach(key, RecordingSink(), None)
    send(old, "e1", [key], 1)
    new.assign([3], 4, incoming=[3])
    exports: list = []
    old.route_moved({3: None}, handoff=[3], exports=exports)
    assert exports[0]["events"] == [[1, "1", "e1"]]
    # a node of the previous version sends [seq, payload]: its events come without an id
    exports.append({"key": list(other), "route": 3, "stream": "old.2", "next_seq": 2,
                    "acked": 0, "events": [[1, "2"]]})  # fmt: skip
    assert new.handoff_received(exports, done=[3]) == 2
    mine, theirs = RecordingSink(), RecordingSink()
    new.attach(key, mine, None)
    new.attach(other, theirs, None)
    assert mine.frames[-1] == {"type": "event", "seq": 1, "id": "e1", "data": 1}
    assert theirs.frames[-1] == {"type": "event", "seq": 1, "data": 2}


def test_hand_off_entries_with_a_bad_event_id_are_skipped():
    new, _ = make_hub(routes=4)
    new.assign([], 4)
    new.assign([1], 4, incoming=[1])
    (key,) = keys_on_routes([1], 1, 4)
    for bad_id in (7, "", "x" * 129, None):
        entry = {"key": list(key), "route": 1, "stream": "a.1", "next_seq": 2, "acked": 0,
                 "events": [[1, "1", bad_id]]}  # fmt: skip
        assert new.handoff_received([entry], done=[]) == 0
    assert new.mailbox(key) is None


def test_long_poll_cycles_arm_no_timer_each_and_the_mailbox_expires_once_idle():
    """The linger wheel (issue 20): a key that detaches and attaches again (a long-poll
    between polls) costs no timer each time; the slots whose linger ends in the same tenth
    of a second share one. A key that stays away expires at most 0.1 s after its linger."""
    hub, clock = make_hub(linger=5)
    key = ConnectionKey("poller", "s", "/p")
    others = [ConnectionKey(f"o{i}", "s", "/p") for i in range(50)]
    for k in others:
        hub.attach(k, RecordingSink(), None)
    clock.advance(0.01)
    for k in others:  # fifty keys leaving in the same tenth: one timer
        hub.detach(k, hub._slots[k].sink)
    assert len(clock.getDelayedCalls()) == 1
    for _ in range(200):  # polls: answered, the next one comes at once
        sink = RecordingSink()
        hub.attach(key, sink, None)
        hub.detach(key, sink)
    assert len(clock.getDelayedCalls()) == 1
    assert hub.gauges()["lingering"] == 51
    clock.advance(4.98)  # 4.99: nothing's linger has ended
    assert hub.mailbox(key) is not None and hub.mailbox(others[0]) is not None
    clock.advance(0.12)  # 5.11: every linger ended at 5.01, and 0.1 s has passed since
    assert hub.mailbox(key) is None and all(hub.mailbox(k) is None for k in others)
    assert hub.gauges()["mailboxes"] == 0 and clock.getDelayedCalls() == []


def test_a_key_that_came_back_or_left_again_is_not_expired_by_its_old_linger():
    hub, clock = make_hub(linger=5)
    back, again = ConnectionKey("back", "s", "/p"), ConnectionKey("again", "s", "/p")
    sinks = {k: RecordingSink() for k in (back, again)}
    for k in (back, again):
        hub.attach(k, sinks[k], None)
        hub.detach(k, sinks[k])
    clock.advance(3)
    hub.attach(back, RecordingSink(), None)  # attached when its first linger ends
    hub.attach(again, sinks[again], None)
    hub.detach(again, sinks[again])  # lingers again: until 8
    clock.advance(2.5)  # 5.5: the first lingers' bucket is past
    assert hub.mailbox(back) is not None and hub.mailbox(again) is not None
    assert hub.trace_answer("again")["keys"] == []  # (tracing off: nothing to show)
    clock.advance(2.45)  # 7.95
    assert hub.mailbox(again) is not None
    clock.advance(0.1)  # 8.05
    assert hub.mailbox(again) is None and hub.mailbox(back) is not None
    hub.shutdown("shutdown")
    assert clock.getDelayedCalls() == []


def test_a_linger_ending_one_ulp_past_a_tenth_still_expires():
    """(Review of ce429cd) with an epoch clock, now + linger can land one ulp above the
    tenth its bucket was computed from; the sweep must still expire it."""
    hub, clock = make_hub(linger=30)
    clock.advance(1796567202.8000002)
    key = ConnectionKey("late", "s", "/p")
    sink = RecordingSink()
    hub.attach(key, sink, None)
    hub.detach(key, sink)
    clock.advance(31)
    assert hub.mailbox(key) is None and hub.gauges()["lingering"] == 0
    assert clock.getDelayedCalls() == []


def test_a_polling_key_is_in_the_linger_wheel_once():
    """(Review of ce429cd) one wheel entry per slot however often it polls, and it still
    expires once it stops."""
    hub, clock = make_hub(linger=5)
    key = ConnectionKey("poller", "s", "/p")
    for _ in range(200):
        sink = RecordingSink()
        hub.attach(key, sink, None)
        hub.detach(key, sink)
        clock.advance(0.05)  # ten seconds of polls: buckets pass while it polls
    assert sum(len(v) for v in hub._wheel.values()) == 1
    assert hub.mailbox(key) is not None
    clock.advance(4.9)
    assert hub.mailbox(key) is not None
    clock.advance(0.25)
    assert hub.mailbox(key) is None and clock.getDelayedCalls() == []


def test_one_mailbox_whose_expiry_fails_does_not_strand_the_others_of_its_tenth():
    """The linger wheel expires a tenth's slots in one sweep: an exception from one
    (presence, offline hooks) is logged and the others still expire (review of 6a6509f:
    they kept a popped bucket and never expired, even after coming back and leaving)."""
    hub, clock = make_hub(linger=5)

    def presence(change: str, key: ConnectionKey) -> None:
        if key.user == "bad" and change == "signoff":
            raise RuntimeError("presence queue bug")

    hub.presence = presence
    bad, good = ConnectionKey("bad", "s", "/p"), ConnectionKey("good", "s", "/p")
    for k in (bad, good):
        sink = RecordingSink()
        hub.attach(k, sink, None)
        hub.detach(k, sink)
    clock.advance(5.1)
    assert hub.mailbox(good) is None and hub.mailbox(bad) is None
    assert hub.gauges()["lingering"] == 0 and not clock.getDelayedCalls()


def test_every_attach_s_hello_is_byte_identical_to_frames_hello():
    """The hub builds hello from a template per keepalive and hash version and keeps the
    spread's text while the number of mailboxes stays the same: the bytes stay exactly
    frames.hello's as mailboxes come and go, the hash version changes, and positions
    resume, reset or start fresh."""

    class RawSink(RecordingSink):
        def deliver(self, out):
            self.raw = [f.data for f in out]
            return True

    for keepalive, rate in ((25.0, 3000.0), (10, 400.0), (0.5, 0.0), (600, 7.0)):
        hub, clock = make_hub(keepalive=keepalive, reconnect_rate=rate)
        for i in range(40):
            key = ConnectionKey(f"u{i}", "s", "/x")
            if i == 20:
                hub.set_hash_version(1)
            sink = RawSink()
            after = None
            if i % 3 == 1:  # a position from a lost stream: reset
                after = Position("gone.1", 5)
            mailbox = hub.attach(key, sink, after)
            assert mailbox is not None
            expected = frames.hello(
                mailbox.stream, keepalive, after is not None, 0, hub.spread(), hub.hash_version
            )
            assert sink.raw[0] == expected, (keepalive, rate, i)
            if i % 4 == 0:  # a long-poll cycle: detach, an event, resume after it
                hub.detach(key, sink)
                send(hub, f"e{i}", [key], {"n": i})
                again = RawSink()
                hub.attach(key, again, Position(mailbox.stream, 0))
                assert again.raw[0] == frames.hello(
                    mailbox.stream, keepalive, False, 0, hub.spread(), hub.hash_version
                )
                hub.detach(key, again)
                clock.advance(hub.config.linger + 1)  # expires: fewer mailboxes


def each(reply_of):
    """Bodies handled one request at a time by ``reply_of(hub, body)``."""
    return lambda hub, bodies: [reply_of(hub, body) for body in bodies]


def in_one_read(hub, bodies):
    """Bodies handled as the SP server hands one read's requests over: together, in one
    delivery batch."""
    with hub.batch():
        return hub.handle_requests(bodies)


@pytest.mark.skipif(native is None, reason="the C reader of the common request is not built")
def test_one_read_s_common_requests_are_answered_without_handle_request(monkeypatch):
    """handle_requests answers the requests the C reader reads and Hub._one takes itself,
    and hands exactly the others to handle_request: another transport's key, no key
    attached, a latest-value event, a full mailbox, an eviction, a resend, an id with
    something to escape, another hash version; outside a delivery batch, every one."""
    hub, _ = make_hub(mailbox=MailboxLimits(max_events=2), mailbox_total_bytes=400)
    dave = ConnectionKey("dave", "s", "/")
    for key, sink in ((ALICE, RecordingSink()), (BOB, RecordingSink(accept=False)),
                      (dave, RecordingSink())):  # fmt: skip
        hub.attach(key, sink, None)
    handled = []
    real = hub.handle_request
    monkeypatch.setattr(hub, "handle_request", lambda body: handled.append(body) or real(body))
    bodies = {
        "a1": {"to": [list(ALICE)], "data": 1},
        "b1": {"to": [list(BOB)], "data": 1},  # queued behind unsent bytes
        "b2": {"to": [list(BOB)], "data": 2},
        "b3": {"to": [list(BOB)], "data": 3},  # evicts b1: _deliver decides
        "c1": {"to": [["carol", "s", "/"]], "data": 1},  # no mailbox
        "t1": {"to": [list(ALICE)], "data": 1, "latest": "x"},
        "a2": {"to": [list(ALICE)], "data": "x" * 400},  # over mailbox_total_bytes
        "a\\3": {"to": [list(ALICE)], "data": 3},  # an id with a backslash
        "a4": {"to": [list(ALICE)], "data": 4, "hash": 1},  # routed with version 1
        "d1": {"to": [list(dave)], "data": 1},
    }
    wire = [json.dumps({"id": i, **b}).encode() for i, b in bodies.items()]
    wire.append(wire[0])  # a resend of a1
    replies = [json.loads(r) for r in in_one_read(hub, wire)]
    assert [json.loads(b)["id"] for b in handled] == ["b3", "c1", "t1", "a2", "a\\3", "a4", "a1"]
    outcomes = [r["results"][0]["status"] if r["ok"] else r["error"]["code"] for r in replies]
    assert outcomes == [
        "delivered", "queued", "queued", "queued", "no_connection", "delivered", "full",
        "delivered", "hash_version_mismatch", "delivered", "delivered",
    ]  # fmt: skip
    assert replies[-1]["duplicate"] is True
    handled.clear()
    hub.handle_requests([json.dumps({"id": "a5", "to": [list(ALICE)], "data": 5}).encode()])
    assert len(handled) == 1  # outside a batch: handle_request


@pytest.mark.skipif(native is None, reason="the C reader of the common request is not built")
def test_a_bug_in_one_read_s_common_path_costs_that_request_only(monkeypatch):
    """A common request whose fast path raises before anything changed goes on to
    handle_request (here the same bug: its internal_error answer); the rest of the read
    is answered and delivered as usual, nothing dropped."""
    from orbited.node import events

    hub, _ = make_hub()
    sink = RecordingSink()
    hub.attach(ALICE, sink, None)
    real = events.parse_common

    def buggy(body, *limits):
        if b'"e2"' in body:
            raise RuntimeError("bug")
        return real(body, *limits)

    monkeypatch.setattr(events, "parse_common", buggy)
    wire = [json.dumps({"id": f"e{i}", "to": [list(ALICE)], "data": i}).encode() for i in (1, 2, 3)]
    replies = [json.loads(r) for r in in_one_read(hub, wire)]
    assert [r["results"][0]["status"] if r["ok"] else r["error"]["code"] for r in replies] == [
        "delivered", "internal_error", "delivered",
    ]  # fmt: skip
    assert [data for _, data in sink.events()] == [1, 3]


def test_the_sp_handler_answers_as_dispatch_does():
    """handle_request does and answers its most common request in one place (Hub._one)
    and formats a one-recipient reply itself (no DispatchResult), and handle_requests
    does so for one SP read's requests together: the same bytes, browser frames,
    mailboxes, counts and stats as answer()'s path through dispatch and _deliver and
    encode_reply, over delivered, dropped, queued, latest-value, no_connection, full,
    duplicate and a non-ASCII id."""
    from orbited.node.events import encode_reply, parse_request
    from orbited.node.hub import answer

    def run(reply_of):
        hub, _ = make_hub(mailbox=MailboxLimits(max_events=3), mailbox_total_bytes=300)
        sink = RecordingSink()
        hub.attach(ALICE, sink, None)
        hub.attach(BOB, RecordingSink(accept=False), None)
        bodies = [{"id": f"e{i}", "to": [list(ALICE)], "data": {"n": i}} for i in range(5)] + [
            *({"id": f"q{i}", "to": [list(BOB)], "data": i} for i in range(4)),  # dropped
            {"id": "t1", "to": [list(ALICE)], "data": 2, "latest": "x"},
            {"id": "t2", "to": [list(ALICE)], "data": 3, "latest": "x"},
            {"id": "none", "to": [["carol", "s", "/"]], "data": 4},
            {"id": "ünï\x7f", "to": [list(ALICE)], "data": 5},
            {"id": "big", "to": [list(BOB)], "data": "x" * 300},
            {"id": "e1", "to": [list(ALICE)], "data": {"n": 1}},  # a resend
        ]
        replies = reply_of(hub, [json.dumps(body).encode() for body in bodies])
        state = [
            (m.last_seq, m.delivered, m.acked, m.evicted, m.buffered_bytes, m.export())
            for m in (hub.mailbox(ALICE), hub.mailbox(BOB))
            if m is not None
        ]  # fmt: skip
        slots = [(s.counted, s.probe) for s in hub._slots.values()]
        return replies, sink.frames, state, slots, dict(hub.stats), hub.mailbox_bytes

    def reencoded(hub, body):  # dispatch's results, encoded by events (not the hub)
        outcome = hub.dispatch(parse_request(body, hub.config.requests))
        return encode_reply(outcome._replace(encoded=None))

    fast = run(each(lambda hub, body: hub.handle_request(body)))
    assert fast == run(in_one_read)
    assert fast == run(each(lambda hub, body: answer(hub, body)[1]))
    assert fast == run(each(reencoded))
    statuses = [json.loads(r)["results"][0]["status"] for r in fast[0]]
    assert statuses[:9] == ["delivered"] * 5 + ["queued"] * 4
    assert json.loads(fast[0][8])["results"][0]["dropped"] == 1
    assert "full" in statuses and "no_connection" in statuses
    assert json.loads(fast[0][-1])["duplicate"] is True


def test_the_sp_handler_s_one_key_path_writes_every_kind_of_id_as_dispatch_does():
    """The one-key request is answered in Hub._one with the id's JSON text made in place
    when it has nothing to escape (and by handle_requests, one read's together): the
    frames' and replies' bytes are answer()'s for ids that are plain, need escaping, hold
    DEL, a line separator, a tab or non-ASCII letters, to an attached key (delivered) and
    one that does not take frames (queued)."""
    from orbited.node.hub import answer

    class RawSink(RecordingSink):
        def deliver(self, out):
            if not self.accept:
                return False
            self.frames += [f.data for f in out]
            return True

    ids = ["plain-1", 'q"uote', "back\\slash", "del\x7f", "tab\t", "ünï", "ls\u2028", "~ok~"]

    def run(reply_of):
        hub, _ = make_hub()
        sinks = {ALICE: RawSink(), BOB: RawSink(accept=False)}
        for key, sink in sinks.items():
            hub.attach(key, sink, None)
        replies = reply_of(
            hub,
            [json.dumps({"id": i + k.user, "to": [list(k)], "data": [i]}).encode()
             for i in ids for k in sinks],
        )  # fmt: skip
        return replies, [s.frames for s in sinks.values()], dict(hub.stats)

    fast = run(each(lambda hub, body: hub.handle_request(body)))
    assert fast == run(in_one_read)
    assert fast == run(each(lambda hub, body: answer(hub, body)[1]))
    statuses = [json.loads(r)["results"][0]["status"] for r in fast[0]]
    assert statuses == ["delivered", "queued"] * len(ids)
    assert [json.loads(f)["id"] for f in fast[1][0][1:]] == [i + "alice" for i in ids]


def _counts_are_exact(hub: Hub) -> None:
    """The attached counts the hub keeps in step (hub, per user, per route) are what a
    scan of the slots finds."""
    slots = hub._slots.values()
    assert hub.attached == sum(1 for s in slots if s.sink is not None)
    by_route: dict[int, int] = {}
    for s in slots:
        if s.sink is not None:
            by_route[s.route] = by_route.get(s.route, 0) + 1
    assert {r: n for r, n in hub._route_attached.items() if n} == by_route
    for entry in hub._users.values():
        assert entry.attached == sum(1 for s in entry.keys.values() if s.sink is not None)


def test_a_poll_sink_object_reused_across_polls_is_attached_like_a_new_one():
    """A kept-alive poll connection may keep one sink object for its polls (the front's
    choice): detached when a poll is answered, attached again for the next. The hub holds
    no reference to a detached sink, so each attach is a plain attach: hello, what the
    position has not seen, the counts, the linger when it stops polling."""
    hub, clock = make_hub(linger=5, keepalive=10)
    key, other = ConnectionKey("poller", "s", "/p"), ConnectionKey("poller", "t", "/p")
    sink = RecordingSink()
    hub.attach(other, RecordingSink(), None)  # a second key of the user: attach order
    after = None
    for i in range(5):
        sink.frames = []
        mailbox = hub.attach(key, sink, after)
        assert mailbox is not None and hub.is_attached(key, sink)
        assert sink.frames[0]["type"] == "hello" and sink.frames[0]["reset"] is False
        assert sink.frames[0]["seq"] == (0 if after is None else after.seq)
        assert hub.user_keys("poller") == [other, key]  # attached last: newest
        _counts_are_exact(hub)
        assert hub.load_report(full=True)["routes"] == {
            str(route_of(key, hub.routes, hub.hash_version)): 2
        }
        assert send(hub, f"e{i}", [key], {"n": i})["results"] == [
            {"status": "delivered", "seq": i + 1}
        ]
        assert sink.events()[-1] == (i + 1, {"n": i})
        hub.detach(key, sink)
        assert not hub.is_attached(key, sink)
        _counts_are_exact(hub)
        assert mailbox.acked == i  # the position of the poll before it acknowledged
        after = Position(mailbox.stream, i + 1)
        clock.advance(1)
    assert send(hub, "between", [key], {"n": "q"})["results"] == [{"status": "queued", "seq": 6}]
    sink.frames = []
    hub.attach(key, sink, after)  # the event queued between two polls comes with hello
    assert [f["type"] for f in sink.frames] == ["hello", "event"]
    hub.detach(key, sink)
    hub.detach(key, sink)  # a second detach of the same object is ignored
    _counts_are_exact(hub)
    clock.advance(5.2)
    assert hub.mailbox(key) is None and hub.mailbox(other) is not None
    _counts_are_exact(hub)


def test_counts_stay_exact_through_attaches_detaches_and_replacements():
    """Attach (new keys, resumes, replacing a transport, the same object again after its
    detach), detach (current and stale sinks), expiry: after every step the hub's,
    users' and routes' attached counts match a scan (attach and detach keep them inline)."""
    import random

    rng = random.Random(20)
    hub, clock = make_hub(linger=3)
    keys = [ConnectionKey(f"u{i % 4}", f"s{i}", "/p") for i in range(12)]
    sinks = [RecordingSink() for _ in range(6)]
    for _ in range(2000):
        key = rng.choice(keys)
        sink = rng.choice(sinks)
        op = rng.random()
        if op < 0.45:
            mailbox = hub.mailbox(key)
            after = None
            if mailbox is not None and rng.random() < 0.7:
                after = Position(mailbox.stream, rng.randint(0, mailbox.last_seq))
            hub.attach(key, sink, after)
        elif op < 0.85:
            hub.detach(key, sink)
        elif op < 0.95:
            send(hub, f"e{rng.random()}", [key], {"x": 1})
        else:
            clock.advance(rng.random() * 2)
        _counts_are_exact(hub)


def test_a_resuming_attach_s_hello_is_byte_identical_to_frames_hello():
    """A long-poll's attach resumes its own mailbox (the number of mailboxes unchanged:
    the hello's template is used inline): the same bytes as frames.hello, for a stream
    that needs no escape and for one that does (an epoch with a quote)."""

    class RawSink(RecordingSink):
        def deliver(self, out):
            self.raw = [f.data for f in out]
            return True

    for epoch in ("ep", 'e"p'):
        clock = Clock()
        hub = Hub(clock, HubConfig(keepalive=7.5, reconnect_rate=3.0), epoch=epoch)
        keys = [ConnectionKey(f"u{i}", "s", "/x") for i in range(5)]
        for key in keys:
            hub.attach(key, RawSink(), None)
        for i in range(10):
            key = keys[i % 5]
            sink = RawSink()
            mailbox = hub.mailbox(key)
            assert mailbox is not None
            send(hub, f"e{i}", [key], {"i": i})
            after = Position(mailbox.stream, mailbox.last_seq - (i % 2))
            hub.attach(key, sink, after)
            expected = frames.hello(
                mailbox.stream, 7.5, False, after.seq, hub.spread(), hub.hash_version
            )
            assert sink.raw[0] == expected, (epoch, i)
            assert len(sink.raw) == 1 + i % 2  # the event the position had not seen


def test_a_resend_past_its_window_still_remembered_replaces_its_reply():
    """A remembered reply past its window that the oldest-first forgetting has not
    reached (the clock went back between two requests) is not a duplicate: the resend is
    delivered again and its new reply replaces the old one, counted once."""
    hub, clock = make_hub(dedup_window=10)
    sink = RecordingSink()
    hub.attach(ALICE, sink, None)
    clock.advance(1000)
    assert send(hub, "first", [ALICE], 1)["results"][0]["seq"] == 1  # expires at 1010
    clock.rightNow = 0.0  # the wall clock stepped back
    assert send(hub, "again", [ALICE], 2)["results"][0]["seq"] == 2  # expires at 10
    clock.rightNow = 20.0  # "again" is past its window, behind "first" in the memory
    reply = send(hub, "again", [ALICE], 2)
    assert reply["results"][0]["seq"] == 3 and "duplicate" not in reply
    assert len(hub.dedup) == 2
    assert hub.dedup.size == sum(len(r) for _, r in hub.dedup._recent.values())


def test_a_request_whose_parse_fails_unexpectedly_still_gets_an_answer(monkeypatch):
    # A bug in the parse (as RecursionError was) must not leave the web app without a
    # reply: over SP no reply means resends and a hang.
    from orbited.node import hub as hub_module

    def broken(body, limits):
        raise RuntimeError("a bug")

    hub, _ = make_hub()
    monkeypatch.setattr(hub_module, "_parse_request", broken)
    reply = json.loads(hub.handle_request(b'{"id":"e1","to":[["u","s","/l"]],"data":1}'))
    assert reply == {
        "id": None, "ok": False,
        "error": {"code": "internal_error", "message": "the node failed to read the request"},
    }  # fmt: skip
