"""Per-user state (orbited.node.users) and the hub's per-user index and limits."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from orbited.core.keys import ConnectionKey
from orbited.core.settings import FieldError
from orbited.node.hub import CYCLE_GRACE, Hub, HubConfig
from orbited.node.mailbox import Position
from orbited.node.users import UserLimits, gcra_take

# -- gcra_take -------------------------------------------------------------------------


def test_gcra_allows_a_burst_then_one_per_interval():
    tat, now = 0.0, 100.0
    allowed = 0
    for _ in range(10):
        ok, tat, retry = gcra_take(tat, now, rate=2.0, burst=4)
        allowed += ok
    assert allowed == 4
    ok, tat2, retry = gcra_take(tat, now, 2.0, 4)
    assert not ok and tat2 == tat and retry == pytest.approx(0.5)
    ok, tat, _ = gcra_take(tat, now + 0.5, 2.0, 4)  # after retry_after: one more
    assert ok
    assert not gcra_take(tat, now + 0.5, 2.0, 4)[0]


def test_gcra_refills_to_the_burst_and_no_further():
    ok, tat, _ = gcra_take(0.0, 10.0, 1.0, 3)
    for _ in range(2):
        ok, tat, _ = gcra_take(tat, 10.0, 1.0, 3)
        assert ok
    assert not gcra_take(tat, 10.0, 1.0, 3)[0]
    later = 1000.0  # a long idle time refills 3, not more
    results = []
    for _ in range(5):
        ok, tat, _ = gcra_take(tat, later, 1.0, 3)
        results.append(ok)
    assert results == [True, True, True, False, False]


def test_gcra_a_steady_rate_at_the_limit_is_never_refused():
    tat, now = 0.0, 0.0
    for _ in range(1000):
        ok, tat, _ = gcra_take(tat, now, 3.0, 1)
        assert ok
        now += 1 / 3


def test_gcra_burst_one_refuses_a_second_at_once_with_the_interval_as_retry():
    ok, tat, _ = gcra_take(0.0, 5.0, 4.0, 1)
    ok2, _, retry = gcra_take(tat, 5.0, 4.0, 1)
    assert ok and not ok2 and retry == pytest.approx(0.25)


# -- UserLimits ------------------------------------------------------------------------


def test_user_limits_defaults_are_off():
    limits = UserLimits()
    assert limits.max_connections == 0 and limits.rate == 0 and limits.policy == "refuse"
    assert limits.burst >= 1


@pytest.mark.parametrize(
    "args, message",
    [
        ({"max_connections": -1}, "max_connections must not be negative"),
        ({"rate": -0.5}, "rate must not be negative"),
        ({"rate": math.nan}, "rate must not be negative"),
        ({"rate": math.inf}, "rate must be finite"),
        ({"burst": 0}, "burst must be at least 1"),
        ({"burst": 0, "rate": 5.0}, "burst must be at least 1"),
        ({"policy": "close_newest"}, "policy must be refuse or close_oldest"),
        ({"hold": -1.0}, "hold must not be negative"),
    ],
)  # fmt: skip
def test_user_limits_refuse_bad_values(args, message):
    with pytest.raises(FieldError, match=message):
        UserLimits(**args)


# -- the hub's per-user index, limits and rate ---------------------------------------------


class Sink:
    wants_pings = True

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.last_write = 0.0
        self.closed_with: tuple[int, str] | None = None
        self.was_replaced = False
        self.reconnect_reason: str | None = None

    def deliver(self, out):
        self.frames += [json.loads(f.data) for f in out]
        return True

    def replaced(self):
        self.was_replaced = True

    def reconnect(self, reason, route=None, spread=None):
        self.reconnect_reason = reason

    def closed(self, code, reason):
        self.closed_with = (code, reason)

    def events(self):
        return [f["data"] for f in self.frames if f["type"] == "event"]


def hub_with(users: UserLimits | None = None, **config) -> tuple[Hub, Clock, list]:
    clock = Clock()
    clock.advance(1000)
    hub = Hub(clock, HubConfig(users=users or UserLimits(), **config), epoch="ep")
    presence: list = []
    hub.presence = lambda change, key: presence.append((change, key))
    return hub, clock, presence


def key(user: str, session: str = "s", location: str = "/t") -> ConnectionKey:
    return ConnectionKey(user, session, location)


def send(hub, event_id, to, data=1, **extra):
    body = json.dumps({"id": event_id, "to": to, "data": data, **extra}).encode()
    out = hub.handle_request(body)
    return json.loads(out) if isinstance(out, bytes) else out


def index_matches_slots(hub: Hub) -> None:
    scan: dict[str, dict] = {}
    for k, slot in hub._slots.items():
        scan.setdefault(k.user, {})[k] = slot
    indexed = {u: dict(e.keys) for u, e in hub._users.items() if e.keys}
    assert indexed == scan
    for user, entry in hub._users.items():
        assert entry.attached == sum(1 for s in entry.keys.values() if s.sink is not None), user
        assert entry.keys or entry.holds, f"{user}: an empty entry was kept"
        for slot in entry.keys.values():
            assert slot.entry is entry
    held = sum(len(h.payload) for e in hub._users.values() for h in e.holds or ())
    assert hub.mailbox_bytes == sum(s.counted for s in hub._slots.values()) + held


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                ["attach", "detach", "tick", "ack_event", "move", "back", "install", "hold"]
            ),
            st.integers(0, 5),
        ),  # fmt: skip
        max_size=40,
    ),
    st.sampled_from(["refuse", "close_oldest"]),
)
def test_the_user_index_is_always_a_scan_of_the_slots(ops, policy):
    hub, clock, _ = hub_with(
        UserLimits(max_connections=2, policy=policy, hold=4), routes=4, linger=5
    )
    keys = [key(f"u{i % 3}", f"s{i}") for i in range(6)]
    sinks: dict[ConnectionKey, Sink] = {}
    exports: list = []
    for op, i in ops:
        k = keys[i]
        if op == "attach":
            sinks[k] = Sink()
            hub.attach(k, sinks[k], None)
        elif op == "detach" and k in sinks:
            hub.detach(k, sinks.pop(k))
        elif op == "tick":
            clock.advance(3)
        elif op == "ack_event":
            send(hub, f"e{len(hub._slots)}-{clock.seconds()}", [list(k)], ack=1)
        elif op == "move":
            hub.route_moved({(i % 4) + 1: None}, handoff=[(i % 4) + 1], exports=exports)
        elif op == "back":
            hub.assign([1, 2, 3, 4], 4, incoming=[1, 2, 3, 4])
        elif op == "hold":  # a wildcard for a user with no key here: held for its next
            send(hub, f"h{clock.seconds()}-{i}", [[f"u{i % 3}", "*", "*"]], ack=1)
        elif op == "install":
            hub.handoff_received(exports, done=[1, 2, 3, 4])
            exports.clear()
        index_matches_slots(hub)
    hub.shutdown("shutdown")
    assert hub._users == {} and hub._slots == {}


def test_refuse_closes_the_new_connection_with_4429_and_creates_nothing():
    hub, _, presence = hub_with(UserLimits(max_connections=2))
    a, b, c = key("alice", "s1"), key("alice", "s2"), key("alice", "s3")
    hub.attach(a, Sink(), None)
    hub.attach(b, Sink(), None)
    assert not hub.admits(c) and hub.admits(a) and hub.admits(key("bob"))
    third = Sink()
    assert hub.attach(c, third, None) is None
    assert third.closed_with == (4429, "user_limit") and third.frames == []
    assert c not in hub._slots and ("signon", c) not in presence
    assert hub.stats["user_refused"] == 2  # the transports' pre-check counts too
    bob = Sink()
    assert hub.attach(key("bob"), bob, None) is not None  # other users are not affected


def test_replacing_the_transport_of_an_attached_key_is_never_refused():
    hub, _, _ = hub_with(UserLimits(max_connections=1))
    a = key("alice", "s1")
    first, second = Sink(), Sink()
    hub.attach(a, first, None)
    assert hub.admits(a)
    assert hub.attach(a, second, None) is not None
    assert first.was_replaced and second.closed_with is None


def test_a_long_poll_cycle_is_never_refused_and_counts_while_it_cycles():
    hub, clock, _ = hub_with(UserLimits(max_connections=1))
    a, b = key("alice", "s1"), key("alice", "s2")
    poll = Sink()
    hub.attach(a, poll, None)
    hub.detach(a, poll)  # the poll answered; the next one comes at once
    assert not hub.admits(b)  # the cycling poll still holds the user's one connection
    refused = Sink()
    assert hub.attach(b, refused, None) is None and refused.closed_with == (4429, "user_limit")
    assert hub.attach(a, Sink(), None) is not None  # the next poll of the same key
    hub.detach(a, hub._slots[a].sink)
    clock.advance(CYCLE_GRACE + 0.1)  # it stopped polling: the mailbox lingers, not counted
    assert hub.admits(b) and hub.attach(b, Sink(), None) is not None


def test_close_oldest_closes_the_longest_attached_with_4003_and_drops_its_mailbox():
    hub, _, presence = hub_with(UserLimits(max_connections=2, policy="close_oldest"))
    a, b, c = key("alice", "s1"), key("alice", "s2"), key("alice", "s3")
    sa, sb, sc = Sink(), Sink(), Sink()
    hub.attach(a, sa, None)
    hub.attach(b, sb, None)
    hub.attach(a, Sink(), None)  # a re-attaches: b is now the oldest in attach order
    assert hub.admits(c)  # close_oldest never refuses
    assert hub.attach(c, sc, None) is not None
    assert sb.closed_with == (4003, "displaced") and sc.closed_with is None
    assert b not in hub._slots and ("signoff", b) in presence
    assert hub.stats["user_displaced"] == 1
    assert hub.user_keys("alice") == [a, c]
    index_matches_slots(hub)


def test_close_oldest_answers_the_displaced_keys_ack_waits_unacked():
    hub, _, _ = hub_with(UserLimits(max_connections=1, policy="close_oldest"))
    a, b = key("alice", "s1"), key("alice", "s2")
    hub.attach(a, Sink(), None)
    got: list = []
    hub.handle_request(
        json.dumps({"id": "e1", "to": [list(a)], "data": 1, "ack": 5}).encode()
    ).addCallback(lambda body: got.append(json.loads(body)))
    hub.attach(b, Sink(), None)
    assert got[0]["results"] == [{"status": "unacked", "seq": 1}]


def test_a_limit_of_zero_is_no_limit():
    hub, _, _ = hub_with(UserLimits(max_connections=0))
    sinks = [Sink() for _ in range(50)]
    for i, sink in enumerate(sinks):
        assert hub.attach(key("alice", f"s{i}"), sink, None) is not None
    assert all(s.closed_with is None for s in sinks)


def test_rate_limit_answers_limited_for_every_recipient_of_the_user_and_stores_nothing():
    hub, clock, _ = hub_with(UserLimits(rate=1.0, burst=2))
    a1, a2, b = key("alice", "s1"), key("alice", "s2"), key("bob")
    sinks = {k: Sink() for k in (a1, a2, b)}
    for k, s in sinks.items():
        hub.attach(k, s, None)
    to = [list(a1), ["alice", "*", "*"], list(b), list(a2)]
    for n in range(2):  # the burst: one request counts once for alice
        results = send(hub, f"e{n}", to)["results"]
        assert results[0]["status"] == "delivered" and results[1]["status"] == "matched"
    reply = send(hub, "e2", to)
    limited = {"status": "limited", "retry_after": 1.0}
    assert reply["results"][0] == limited and reply["results"][1] == limited
    assert reply["results"][3] == limited
    assert reply["results"][2]["status"] == "limited"  # bob too: 3 requests, burst 2
    assert len(sinks[a1].events()) == 2 and len(sinks[a2].events()) == 2  # nothing stored
    assert hub._slots[a1].mailbox.last_seq == 2
    clock.advance(1.0)
    assert send(hub, "e3", [list(a1)])["results"][0]["status"] == "delivered"
    assert hub.stats["limited"] == 2


def test_a_user_with_nothing_here_is_not_rate_limited():
    hub, _, _ = hub_with(UserLimits(rate=1.0, burst=1))
    for n in range(5):
        assert send(hub, f"e{n}", [["carol", "s", "/t"]])["results"] == [
            {"status": "no_connection"}
        ]


def test_the_rate_counts_each_request_once_per_user_with_one_recipient_too():
    hub, _, _ = hub_with(UserLimits(rate=0.5, burst=1))
    hub.attach(key("alice"), Sink(), None)
    assert send(hub, "e1", [["alice", "*", "*"]])["results"][0]["status"] == "matched"
    assert send(hub, "e2", [["alice", "s", "/t"]])["results"][0] == {
        "status": "limited", "retry_after": 2.0,
    }  # fmt: skip


def test_resume_position_keeps_the_index_and_gauges_count_users():
    hub, _, _ = hub_with()
    a = key("alice")
    sink = Sink()
    hub.attach(a, sink, None)
    send(hub, "e1", [list(a)])
    hub.detach(a, sink)
    stream = hub._slots[a].mailbox.stream
    hub.attach(a, Sink(), Position(stream, 1))
    assert hub.gauges()["users"] == 1
    index_matches_slots(hub)


def test_a_transport_that_detaches_inside_closed_is_displaced_cleanly():
    """Transports may detach synchronously while closing: the displacement must not
    double-count or leave the slot behind."""
    hub, _, presence = hub_with(UserLimits(max_connections=1, policy="close_oldest"))
    a, b = key("alice", "s1"), key("alice", "s2")

    class Detaching(Sink):
        def closed(self, code, reason):
            super().closed(code, reason)
            hub.detach(a, self)

    first = Detaching()
    hub.attach(a, first, None)
    assert hub.attach(b, Sink(), None) is not None
    assert first.closed_with == (4003, "displaced")
    assert a not in hub._slots and hub.attached == 1 and presence.count(("signoff", a)) == 1
    index_matches_slots(hub)


def test_close_oldest_displaces_a_long_poll_between_polls_and_its_next_poll_gets_4003():
    hub, clock, presence = hub_with(UserLimits(max_connections=1, policy="close_oldest"))
    poll_key, ws_key = key("alice", "s", "/poll"), key("alice", "s", "/ws")
    poll = Sink()
    hub.attach(poll_key, poll, None)
    hub.detach(poll_key, poll)  # answered; the next poll comes at once
    ws = Sink()
    assert hub.attach(ws_key, ws, None) is not None
    assert poll_key not in hub._slots and ("signoff", poll_key) in presence
    next_poll = Sink()
    assert hub.attach(poll_key, next_poll, None) is None
    assert next_poll.closed_with == (4003, "displaced") and ws.closed_with is None
    assert hub.user_keys("alice") == [ws_key] and hub.stats["user_displaced"] == 1
    clock.advance(60)  # long after: the same key is a new connection again
    assert hub.attach(poll_key, Sink(), None) is not None
    assert ws.closed_with == (4003, "displaced")
    index_matches_slots(hub)
