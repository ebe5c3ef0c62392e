"""Wildcard recipients in the hub: a user's or a session's keys (docs/protocol.md,
"Addressing a user or a session"), holds, and the offline hook's call points."""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet.task import Clock

from orbited.core.hashing import route_of_user
from orbited.core.keys import ConnectionKey, Selector
from orbited.node.hub import Hub, HubConfig
from orbited.node.mailbox import MailboxLimits
from orbited.node.users import UserLimits
from tests.node.test_hub import RecordingSink


class Sink(RecordingSink):
    """tests/node/test_hub.py's recording sink, with this file's view of the events."""

    def events(self):
        return [(f["seq"], f["id"]) for f in self.frames if f["type"] == "event"]


class Watcher:
    """Records the offline hook's calls (the interface /work/helpers/NOTES21.md lists)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def watch(self, target, eid, after, keys, stream=None):
        self.calls.append(("watch", target, eid, after, list(keys), stream))
        return "w"

    def no_connection(self, target, eid, keys=(), stream=None, held=False):
        self.calls.append(("no_connection", target, eid, list(keys), stream, held))
        return "nc"

    def add_key(self, watch, key, seq):
        self.calls.append(("add_key", watch, key, seq))

    def acked(self, key, seq_upto):
        self.calls.append(("acked", key, seq_upto))

    def expired(self, key):
        self.calls.append(("expired", key))

    def moved(self, key, old_seq, new_seq, new_eid):
        self.calls.append(("moved", key, old_seq, new_seq, new_eid))

    def dropped(self, watch):
        self.calls.append(("dropped", watch))

    def export(self, keys):
        return []

    def restore(self, entries):
        pass


A1 = ConnectionKey("alice", "s1", "/t1")
A2 = ConnectionKey("alice", "s1", "/t2")
A3 = ConnectionKey("alice", "s2", "/t1")
BOB = ConnectionKey("bob", "s1", "/t1")
ALL = ["alice", "*", "*"]


def make_hub(**config) -> tuple[Hub, Clock]:
    clock = Clock()
    return Hub(clock, HubConfig(**config), epoch="ep"), clock


def request(hub, event_id, to, data=1, **extra):
    body = json.dumps({"id": event_id, "to": to, "data": data, **extra}).encode()
    return hub.handle_request(body)


def send(hub, event_id, to, data=1, **extra):
    out = request(hub, event_id, to, data, **extra)
    assert isinstance(out, bytes), "the reply waits"
    return json.loads(out)


def later(hub, event_id, to, data=1, **extra) -> list:
    got: list = []
    out = request(hub, event_id, to, data, **extra)
    assert isinstance(out, defer.Deferred)
    out.addCallback(lambda body: got.append(json.loads(body)))
    return got


def three_tabs(hub) -> dict[ConnectionKey, Sink]:
    sinks = {A1: Sink(), A2: Sink(accept=False), A3: Sink(), BOB: Sink()}
    for k, s in sinks.items():
        hub.attach(k, s, None)
    return sinks


def test_a_user_wildcard_reaches_every_key_of_the_user_with_a_status_each():
    hub, _ = make_hub()
    sinks = three_tabs(hub)
    reply = send(hub, "e1", [ALL])
    assert reply == {"id": "e1", "ok": True, "results": [{"status": "matched", "keys": [
        {"key": list(A1), "status": "delivered", "seq": 1},
        {"key": list(A2), "status": "queued", "seq": 1},  # its transport could not take it
        {"key": list(A3), "status": "delivered", "seq": 1},
    ]}]}  # fmt: skip
    assert sinks[A1].events() == [(1, "e1")] and sinks[A3].events() == [(1, "e1")]
    assert sinks[BOB].events() == []


def test_a_session_wildcard_reaches_that_session_only():
    hub, _ = make_hub()
    sinks = three_tabs(hub)
    reply = send(hub, "e1", [["alice", "s2", "*"]])
    assert reply["results"] == [
        {"status": "matched", "keys": [{"key": list(A3), "status": "delivered", "seq": 1}]}
    ]
    assert sinks[A1].events() == []


def test_a_wildcard_with_no_key_is_no_connection_with_empty_keys():
    hub, _ = make_hub()
    three_tabs(hub)
    assert send(hub, "e1", [["carol", "*", "*"]])["results"] == [
        {"status": "no_connection", "keys": []}
    ]
    assert send(hub, "e2", [["alice", "s9", "*"]])["results"] == [
        {"status": "no_connection", "keys": []}
    ]


def test_a_key_listed_and_matched_gets_the_event_once_and_both_entries_show_it():
    hub, _ = make_hub()
    sinks = three_tabs(hub)
    reply = send(hub, "e1", [list(A1), ALL, ["alice", "s1", "*"]])
    first, wild, session = reply["results"]
    assert first == {"status": "delivered", "seq": 1}
    assert wild["keys"][0] == {"key": list(A1), "status": "delivered", "seq": 1}
    assert [k["seq"] for k in session["keys"]] == [1, 1]
    assert sinks[A1].events() == [(1, "e1")]  # once
    assert hub._slots[A2].mailbox.last_seq == 1


def test_a_lingering_key_is_matched_queued():
    hub, _ = make_hub()
    sinks = three_tabs(hub)
    hub.detach(A3, sinks[A3])
    keys = send(hub, "e1", [ALL])["results"][0]["keys"]
    assert keys[2] == {"key": list(A3), "status": "queued", "seq": 1}


def test_a_wildcard_of_a_route_not_served_is_moved_with_the_hash_version():
    hub, _ = make_hub(routes=4)
    route = route_of_user("alice", 4)
    hub.assign([r for r in range(1, 5) if r != route], 4)
    hub.route_moved({route: "tcp://n2:1"})
    assert send(hub, "e1", [ALL])["results"] == [
        {"status": "moved", "route": route, "to": "tcp://n2:1", "hash": 2}
    ]


def test_full_is_per_key():
    hub, _ = make_hub(mailbox=MailboxLimits(max_bytes=64), mailbox_total_bytes=64)
    three_tabs(hub)
    hub._slots[A1].mailbox.append(b"x" * 50)
    hub._recount(hub._slots[A1])
    keys = send(hub, "e1", [ALL], "y" * 10)["results"][0]["keys"]
    assert [k["status"] for k in keys] == ["delivered", "full", "full"]


def test_acknowledged_mode_wildcard_answers_per_key_acked_and_unacked():
    hub, clock = make_hub()
    three_tabs(hub)
    got = later(hub, "e1", [ALL], ack=5)
    hub.ack(A1, 1)
    hub.ack(A3, 1)
    assert got == []
    clock.advance(5)
    assert got[0]["results"] == [{"status": "matched", "keys": [
        {"key": list(A1), "status": "acked", "seq": 1},
        {"key": list(A2), "status": "unacked", "seq": 1},
        {"key": list(A3), "status": "acked", "seq": 1},
    ]}]  # fmt: skip


def test_a_resend_of_a_wildcard_gets_the_same_reply_as_a_duplicate():
    hub, _ = make_hub()
    sinks = three_tabs(hub)
    first = send(hub, "e1", [ALL])
    again = send(hub, "e1", [ALL])
    assert again == {**first, "duplicate": True}
    assert sinks[A1].events() == [(1, "e1")]
    typed = hub.dispatch(
        __import__("orbited.node.events", fromlist=["x"]).parse_request(
            json.dumps({"id": "e1", "to": [ALL], "data": 1}).encode(), hub.config.requests
        )
    )
    assert typed.duplicate and typed.results[0].keys[0][0] == A1


def test_a_wildcard_during_an_incoming_hand_off_waits_for_it():
    hub, _ = make_hub(routes=4)
    route = route_of_user("alice", 4)
    hub.assign([r for r in range(1, 5) if r != route], 4)
    hub.assign(range(1, 5), 4, incoming=[route])
    got = later(hub, "e1", [ALL, list(A1)])
    assert got == []
    old, _ = make_hub(routes=4)
    sink = Sink()
    old.attach(A1, sink, None)
    exports: list = []
    old.route_moved({route: None}, handoff=[route], exports=exports)
    hub.handoff_received(exports, done=[route])
    assert got[0]["results"] == [
        {"status": "matched", "keys": [{"key": list(A1), "status": "queued", "seq": 1}]},
        {"status": "queued", "seq": 1},  # the same key: once
    ]


def test_wildcards_on_a_hash_version_1_node_are_refused_with_the_nodes_hash():
    hub, _ = make_hub(hash_version=1)
    reply = send(hub, "e1", [ALL])
    assert reply["ok"] is False and reply["error"]["code"] == "hash_version_mismatch"
    assert reply["error"]["hash"] == 1


def test_a_request_routed_with_another_hash_version_is_refused():
    hub, _ = make_hub()
    hub.attach(A1, Sink(), None)
    reply = send(hub, "e1", [list(A1)], hash=1)
    assert reply["error"]["code"] == "hash_version_mismatch" and reply["error"]["hash"] == 2
    assert send(hub, "e2", [list(A1)], hash=2)["results"] == [{"status": "delivered", "seq": 1}]


def test_offline_without_a_hook_is_a_bad_request():
    hub, _ = make_hub()
    reply = send(hub, "e1", [ALL], offline=True)
    assert reply["error"] == {"code": "bad_request", "message": "offline hook not configured"}


# -- holds: a wildcard with ack or offline for a user with no key -------------------------


def test_a_held_event_goes_to_the_users_next_tab_in_its_hello_batch():
    hub, _ = make_hub(users=UserLimits(hold=10))
    got = later(hub, "e1", [ALL], {"m": 1}, ack=5)
    sink = Sink()
    hub.attach(A1, sink, None)
    assert [f["type"] for f in sink.frames] == ["hello", "event"]
    assert sink.events() == [(1, "e1")]
    hub.ack(A1, 1)
    assert got[0]["results"] == [
        {"status": "matched", "keys": [{"key": list(A1), "status": "acked", "seq": 1}]}
    ]


def test_an_unreached_hold_answers_held_at_its_ack_wait_and_is_dropped_later():
    hub, clock = make_hub(users=UserLimits(hold=10))
    got = later(hub, "e1", [ALL], ack=2)
    assert hub.mailbox_bytes == 1 and hub.gauges()["user_holds"] == 1
    clock.advance(2)
    assert got[0]["results"] == [{"status": "no_connection", "keys": [], "held": True}]
    sink = Sink()
    hub.attach(A1, sink, None)  # still held: the tab gets it
    assert sink.events() == [(1, "e1")]
    clock.advance(8)
    assert hub.gauges()["user_holds"] == 0 and hub.mailbox_bytes == 1  # the mailbox's copy
    hub.attach(A3, Sink(), None)
    assert hub._slots[A3].mailbox.last_seq == 0


def test_holds_off_give_plain_no_connection():
    hub, _ = make_hub(users=UserLimits(hold=0))
    assert send(hub, "e1", [ALL], ack=1) == {
        "id": "e1", "ok": True, "results": [{"status": "no_connection", "keys": []}],
    }  # fmt: skip


def test_offline_hook_call_points_for_wildcards_and_keys():
    hub, clock = make_hub(users=UserLimits(hold=10))
    watcher = Watcher()
    hub.offline = watcher
    three_tabs(hub)
    send(hub, "e1", [ALL], offline=7)
    eid = b'"e1"'
    assert watcher.calls == [("watch", Selector("alice", None), eid, 7.0,
                              [(A1, 1), (A2, 1), (A3, 1)], None)]  # fmt: skip
    watcher.calls.clear()
    hub.ack(A1, 1)
    assert watcher.calls == [("acked", A1, 1)]
    watcher.calls.clear()
    reply = send(hub, "e2", [["carol", "*", "*"]], offline=True)
    assert reply["results"] == [{"status": "no_connection", "keys": [], "held": True}]
    carol = ConnectionKey("carol", "s", "/x")
    hub.attach(carol, Sink(), None)
    assert watcher.calls == [
        ("no_connection", Selector("carol", None), b'"e2"', [], None, True),
        ("add_key", "nc", carol, 1),
    ]
    watcher.calls.clear()
    dave = ConnectionKey("dave", "s", "/x")
    assert send(hub, "e3", [list(dave)], offline=True)["results"] == [
        {"status": "queued", "seq": 1}
    ]  # an exact key with no mailbox: kept for it, pushed at once
    stream = hub.mailbox(dave).stream
    assert watcher.calls == [("no_connection", dave, b'"e3"', [(dave, 1)], stream, False)]
    watcher.calls.clear()
    send(hub, "e4", [list(dave)], offline=3)  # it has a mailbox now: watched
    assert watcher.calls == [("watch", dave, b'"e4"', 3.0, [(dave, 2)], stream)]
    watcher.calls.clear()
    clock.advance(hub.config.linger)
    assert ("expired", dave) in watcher.calls


def test_a_hold_that_reached_a_tab_hands_its_watch_back_when_it_ends():
    hub, clock = make_hub(users=UserLimits(hold=5))
    watcher = Watcher()
    hub.offline = watcher
    send(hub, "e1", [ALL], offline=60)
    hub.attach(A1, Sink(), None)
    watcher.calls.clear()
    clock.advance(5)
    assert watcher.calls == [("dropped", "nc")]  # the watcher goes on with A1's mailbox
