"""OfflineWatcher (orbited.node.offline), sans-I/O on a task.Clock, with a real
WebhookQueue whose HTTP POST is a recorder (test_webhook.py's Receiver): which notices
leave, when, and which never do (docs/protocol.md, "Offline webhooks")."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from orbited.core.keys import ConnectionKey, Selector
from orbited.core.settings import FieldError
from orbited.node.frames import event_id
from orbited.node.offline import OfflineConfig, OfflineWatcher, WatchExport
from orbited.node.webhook import WebhookConfig, WebhookQueue
from tests.node.test_webhook import SECRET, Receiver

A1 = ConnectionKey("alice", "s1", "/t1")
A2 = ConnectionKey("alice", "s1", "/t2")
A3 = ConnectionKey("alice", "s2", "/t3")
ALICE = Selector("alice", None)
M7 = event_id("m-7")
M8 = event_id("m-8")


class Setup:
    def __init__(self, limit: int = 100, *answers: bool | None) -> None:
        self.clock = Clock()
        self.receiver = Receiver(*answers)
        self.receiver.clock = self.clock
        config = WebhookConfig("http://127.0.0.1:9/offline")
        self.queue = WebhookQueue(config, SECRET, "node-1", self.clock, "offline", self.receiver)
        self.watcher = OfflineWatcher(self.queue, self.clock, limit)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.clock.advance(0)  # the queue's send

    def sent(self) -> list[dict]:
        """Every notice POSTed so far, serial and time left out."""
        out = []
        for body in self.receiver.bodies:
            for e in body["events"]:
                out.append({k: v for k, v in e.items() if k not in ("serial", "time")})
        return out


def push(key, id_, reason, **extra):
    return {"type": "needs_push", "key": key, "id": id_, "reason": reason, **extra}


def cancel(key, id_):
    return {"type": "cancel", "key": key, "id": id_}


def test_unacked_after_t_sends_needs_push_once_with_seq_and_stream():
    s = Setup()
    assert s.watcher.watch(A1, M7, 30, [(A1, 12)], stream="kQ3v_x9A.1f") is not None
    s.advance(29.9)
    assert s.sent() == []
    s.advance(0.1)
    assert s.sent() == [push(A1.to_json(), "m-7", "unacked", seq=12, stream="kQ3v_x9A.1f")]
    s.advance(100)
    assert len(s.sent()) == 1
    assert s.watcher.stats["offline_push"] == 1


def test_an_ack_before_t_sends_nothing_ever():
    s = Setup()
    s.watcher.watch(A1, M7, 30, [(A1, 12)])
    s.watcher.acked(A1, 11)  # not yet: 12 is still unacknowledged
    s.advance(10)
    s.watcher.acked(A1, 12)
    s.advance(100)
    assert s.sent() == [] and len(s.watcher) == 0


def test_an_ack_after_the_push_sends_a_cancel():
    s = Setup()
    s.watcher.watch(A1, M7, 5, [(A1, 3)])
    s.advance(5)
    s.watcher.acked(A1, 7)
    s.advance(0)
    assert s.sent() == [push(A1.to_json(), "m-7", "unacked", seq=3), cancel(A1.to_json(), "m-7")]
    s.watcher.acked(A1, 8)  # nothing more for it
    s.advance(100)
    assert len(s.sent()) == 2 and s.watcher.stats["offline_cancel"] == 1


def test_a_cancel_while_the_needs_push_still_waits_withdraws_both():
    s = Setup(100, None)  # the receiver holds the first POST: later notices wait
    s.watcher.watch(A2, M8, 1, [(A2, 1)])
    s.advance(1)  # m-8's needs_push is in flight
    s.watcher.watch(A1, M7, 1, [(A1, 4)])
    s.advance(1)  # m-7's needs_push is queued behind it
    s.watcher.acked(A1, 4)
    s.receiver.pending[0].callback(True)
    s.advance(10)
    assert s.sent() == [push(A2.to_json(), "m-8", "unacked", seq=1)]
    assert s.watcher.stats["offline_withdrawn"] == 1
    assert s.watcher.stats["offline_cancel"] == 0


def test_a_wildcard_gets_one_notice_for_its_keys_and_one_cancel():
    s = Setup()
    keys = [(A1, 4), (A2, 9), (A3, 1)]
    s.watcher.watch(ALICE, M7, 10, keys)
    s.advance(10)
    wire = [[k.to_json(), seq] for k, seq in keys]
    assert s.sent() == [push(["alice", "*", "*"], "m-7", "unacked", keys=wire)]
    s.watcher.acked(A2, 9)  # any key's ack cancels
    s.watcher.acked(A1, 4)
    s.watcher.acked(A3, 1)
    s.advance(0)
    assert s.sent()[1:] == [cancel(["alice", "*", "*"], "m-7")]


def test_a_wildcard_acked_on_one_key_before_t_sends_nothing():
    s = Setup()
    s.watcher.watch(Selector("alice", "s1"), M7, 10, [(A1, 4), (A2, 9)])
    s.watcher.acked(A1, 4)
    s.advance(20)
    assert s.sent() == []


def test_no_connection_is_sent_at_once_and_cancelled_by_a_later_ack():
    s = Setup()
    s.watcher.no_connection(A1, M7, [(A1, 1)], stream="st.1")
    s.advance(0)
    assert s.sent() == [push(A1.to_json(), "m-7", "no_connection", seq=1, stream="st.1")]
    s.watcher.acked(A1, 1)
    s.advance(0)
    assert s.sent()[1:] == [cancel(A1.to_json(), "m-7")]


def test_a_wildcard_with_no_key_and_no_hold_is_pushed_and_forgotten():
    s = Setup()
    assert s.watcher.no_connection(ALICE, M7) is None
    s.advance(0)
    assert s.sent() == [push(["alice", "*", "*"], "m-7", "no_connection", keys=[])]
    assert len(s.watcher) == 0  # nothing left to cancel: nothing was kept


def test_a_user_hold_gains_a_key_and_its_ack_cancels():
    s = Setup()
    w = s.watcher.no_connection(ALICE, M7, held=True)
    assert w is not None
    s.advance(0)
    assert s.sent() == [push(["alice", "*", "*"], "m-7", "no_connection", keys=[])]
    s.watcher.add_key(w, A1, 1)  # a tab opened: the held event is its seq 1
    s.watcher.acked(A1, 1)
    s.advance(0)
    assert s.sent()[1:] == [cancel(["alice", "*", "*"], "m-7")]


def test_a_hold_outlives_its_first_mailbox_and_a_dropped_hold_says_nothing():
    s = Setup()
    w = s.watcher.no_connection(ALICE, M7, held=True)
    assert w is not None
    s.watcher.add_key(w, A1, 1)
    s.watcher.expired(A1)  # that tab's mailbox expired: the hold still waits for a tab
    s.watcher.dropped(w)  # the hold expired with no mailbox holding the event
    s.watcher.add_key(w, A3, 1)
    s.watcher.acked(A3, 1)
    s.advance(100)
    assert [e["type"] for e in s.sent()] == ["needs_push"] and len(s.watcher) == 0


def test_a_hold_that_reached_a_tab_ends_with_that_mailbox():
    s = Setup()
    w = s.watcher.no_connection(ALICE, M7, held=True)
    assert w is not None
    s.advance(0)  # the needs_push left
    s.watcher.add_key(w, A1, 1)
    s.watcher.dropped(w)  # the hold expired, but A1's mailbox still has the event
    assert len(s.watcher) == 1
    s.watcher.acked(A1, 1)
    s.advance(0)
    assert [e["type"] for e in s.sent()] == ["needs_push", "cancel"]
    w2 = s.watcher.no_connection(ALICE, M8, held=True)
    assert w2 is not None
    s.watcher.add_key(w2, A2, 1)
    s.watcher.dropped(w2)
    s.watcher.expired(A2)  # ... or its mailbox expires: then it is gone, quietly
    assert len(s.watcher) == 0


def test_a_mailbox_expiring_before_t_sends_expired_and_no_cancel_after():
    s = Setup()
    s.watcher.watch(A1, M7, 30, [(A1, 2)], stream="st.1")
    s.advance(5)
    s.watcher.expired(A1)
    s.advance(0)
    assert s.sent() == [push(A1.to_json(), "m-7", "expired", seq=2, stream="st.1")]
    s.watcher.acked(A1, 2)  # (a new mailbox of the same key: not this event)
    s.advance(100)
    assert len(s.sent()) == 1


def test_a_wildcard_expires_only_when_its_last_mailbox_does():
    s = Setup()
    s.watcher.watch(ALICE, M7, 30, [(A1, 2), (A2, 5)])
    s.watcher.expired(A1)
    s.advance(1)
    assert s.sent() == []
    s.watcher.expired(A2)
    s.advance(0)
    assert s.sent() == [push(["alice", "*", "*"], "m-7", "expired", keys=[[A2.to_json(), 5]])]
    s.advance(100)
    assert len(s.sent()) == 1


def test_an_expired_mailbox_of_a_pushed_watch_ends_it_quietly():
    s = Setup()
    s.watcher.watch(A1, M7, 1, [(A1, 2)])
    s.advance(1)
    s.watcher.expired(A1)
    assert len(s.watcher) == 0
    s.advance(100)
    assert [e["reason"] for e in s.sent()] == ["unacked"]


def test_the_watch_limit_drops_the_oldest_which_then_never_fires():
    s = Setup(2)
    s.watcher.watch(A1, M7, 10, [(A1, 1)])
    s.watcher.watch(A2, M7, 10, [(A2, 1)])
    s.watcher.watch(A3, M7, 10, [(A3, 1)])
    assert len(s.watcher) == 2 and s.watcher.stats["offline_watches_dropped"] == 1
    s.advance(10)
    assert sorted(e["key"][2] for e in s.sent()) == ["/t2", "/t3"]


def test_at_most_one_watch_per_recipient_and_event():
    s = Setup()
    assert s.watcher.watch(A1, M7, 5, [(A1, 1)]) is not None
    assert s.watcher.watch(A1, M7, 5, [(A1, 2)]) is None  # a resend that missed dedup
    assert s.watcher.no_connection(A1, M7) is None
    assert s.watcher.watch(A1, M8, 5, [(A1, 3)]) is not None  # another event
    assert s.watcher.watch(ALICE, M7, 5, [(A1, 1)]) is not None  # another recipient
    s.advance(5)
    assert len(s.sent()) == 3


def test_one_timer_serves_every_watch():
    s = Setup(10_000)
    for i in range(500):
        s.watcher.watch(ConnectionKey("u", "", f"/{i}"), M7, 30 - i * 0.01, [(A1, i + 1)])
    assert len(s.clock.getDelayedCalls()) == 1
    for i in range(500):
        s.watcher.acked(A1, i + 1)
    s.advance(60)
    assert s.sent() == [] and s.clock.getDelayedCalls() == []


def test_acked_watches_do_not_pile_up_in_the_deadline_heap():
    s = Setup(100_000)
    for i in range(5000):
        s.watcher.watch(A1, event_id(f"e{i}"), 30, [(A1, i + 1)])
        s.watcher.acked(A1, i + 1)
    s.watcher.watch(A2, M7, 30, [(A2, 1)])
    assert len(s.watcher._heap) <= 2 * 1 + 64 + 1


def test_export_moves_watches_with_their_time_left_and_restore_keeps_one_per_pair():
    old, new = Setup(), Setup()
    old.watcher.watch(A1, M7, 30, [(A1, 12)], stream="st.1")
    old.watcher.watch(ALICE, M8, 3, [(A1, 13), (A2, 4)])
    old.advance(10)  # m-8 pushed (unacked), m-7 has 20 s left
    bob = ConnectionKey("bob", "", "")
    old.watcher.watch(bob, M7, 30, [(bob, 1)])
    moving = old.watcher.export(lambda target: target[0] == "alice")
    assert len(old.watcher) == 1  # bob's stays
    wires = [m.to_wire() for m in moving]
    assert sorted(w["id"] for w in wires) == ["m-7", "m-8"]
    by_id = {w["id"]: w for w in wires}
    assert by_id["m-7"]["left"] == 20 and by_id["m-7"]["stream"] == "st.1"
    assert by_id["m-8"]["left"] is None
    assert by_id["m-8"]["keys"] == [[A1.to_json(), 13], [A2.to_json(), 4]]
    restored = new.watcher.restore([WatchExport.from_wire(w) for w in wires])
    assert all(w is not None for w in restored)
    assert new.watcher.restore([WatchExport.from_wire(w) for w in wires]) == [None, None]
    new.watcher.acked(A2, 4)  # the new owner sends the cancel of the pushed one
    new.advance(20)
    assert new.sent() == [
        cancel(["alice", "*", "*"], "m-8"),
        push(A1.to_json(), "m-7", "unacked", seq=12, stream="st.1"),
    ]
    old.watcher.acked(A1, 13)  # the old owner forgot them
    old.advance(100)
    assert [e["key"][0] for e in old.sent()] == ["alice", "bob"]


@pytest.mark.parametrize(
    "wire",
    [
        None,
        {"target": ["a", "", ""], "id": "x"},
        {"target": ["*", "*", "*"], "id": "x", "left": 1},
        {"target": ["a", "", ""], "id": "", "left": 1},
        {"target": ["a", "", ""], "id": "x", "left": -1},
        {"target": ["a", "", ""], "id": "x", "left": True},
        {"target": ["a", "", ""], "id": "x", "left": 1, "keys": [[["a", "", ""], 0]]},
        {"target": ["a", "", ""], "id": "x", "left": 1, "keys": [["a", "", ""]]},
        {"target": ["a", "", ""], "id": "x", "left": 1, "keys": [[["a", ""], 1]]},
        {"target": ["a", "", ""], "id": "x", "left": 1, "stream": 5},
    ],
)
def test_a_bad_exported_watch_is_a_value_error(wire):
    with pytest.raises(ValueError):
        WatchExport.from_wire(wire)


def test_a_replaced_event_moves_its_waiting_watch_to_the_newest():
    s = Setup()
    s.watcher.watch(A1, M7, 10, [(A1, 3)])
    s.watcher.moved(A1, 3, 5, M8)  # m-8 (seq 5) replaced m-7 (seq 3)
    assert s.watcher.watch(A1, M8, 10, [(A1, 5)]) is None  # one watch for the newest
    s.watcher.acked(A1, 4)
    s.advance(10)
    assert s.sent() == [push(A1.to_json(), "m-8", "unacked", seq=5)]


def test_a_replaced_event_already_pushed_is_cancelled_and_the_newest_watched():
    s = Setup()
    s.watcher.watch(A1, M7, 10, [(A1, 3)])
    s.advance(10)
    s.watcher.moved(A1, 3, 5, M8)
    s.advance(10)
    assert s.sent() == [
        push(A1.to_json(), "m-7", "unacked", seq=3),
        cancel(A1.to_json(), "m-7"),
        push(A1.to_json(), "m-8", "unacked", seq=5),
    ]


def test_a_replaced_no_connection_event_is_cancelled_and_the_newest_pushed_at_once():
    s = Setup()
    s.watcher.no_connection(A1, M7, [(A1, 1)])
    s.advance(0)
    s.watcher.moved(A1, 1, 2, M8)
    s.advance(0)
    assert s.sent() == [
        push(A1.to_json(), "m-7", "no_connection", seq=1),
        cancel(A1.to_json(), "m-7"),
        push(A1.to_json(), "m-8", "no_connection", seq=2),
    ]
    s.watcher.acked(A1, 2)
    s.advance(0)
    assert s.sent()[3:] == [cancel(A1.to_json(), "m-8")]


def test_a_replaced_event_watched_on_its_own_ends_the_old_watch():
    s = Setup()
    s.watcher.watch(A1, M7, 10, [(A1, 3)])
    s.watcher.watch(A1, M8, 10, [(A1, 5)])
    s.watcher.moved(A1, 3, 5, M8)
    s.advance(10)
    assert s.sent() == [push(A1.to_json(), "m-8", "unacked", seq=5)]


def test_a_wildcard_replaced_on_one_key_keeps_watching_the_others():
    s = Setup()
    s.watcher.watch(ALICE, M7, 10, [(A1, 3), (A2, 1)])
    s.watcher.moved(A1, 3, 4, M8)
    s.watcher.acked(A1, 4)  # acks the replacement, not m-7
    s.advance(10)
    assert s.sent() == [push(["alice", "*", "*"], "m-7", "unacked", keys=[[A2.to_json(), 1]])]


def test_config_watches_must_be_positive_and_presence_keys_stay_apart():
    with pytest.raises(FieldError) as e:
        OfflineConfig("http://x/", watches=0)
    assert e.value.owner is OfflineConfig
    assert OfflineConfig("http://x/").max_queue == WebhookConfig.max_queue
