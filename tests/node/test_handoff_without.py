"""A route that leaves a live node WITHOUT a hand-off (its new owner is not connected,
or HaloD's assignment takes it): its mailboxes are dropped, and so is what the offline
hook and the user holds kept for them (docs/protocol.md, "Offline webhooks", "Moves and
crashes"). A waiting watch whose last mailbox went says ``needs_push`` ``expired`` at
once; a watch already pushed ends with no ``cancel``; a user hold ends, its
acknowledged-mode request answered ``no_connection`` with ``held``. Nothing is said
later for events the node no longer has."""

from __future__ import annotations

import json
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.task import Clock

from orbited.core.hashing import route_of, route_of_user
from orbited.core.keys import ConnectionKey
from orbited.node.hub import Hub, HubConfig
from orbited.node.offline import OfflineWatcher

ALICE = ConnectionKey("alice", "s1", "/t1")


class Queue:
    """The webhook queue the offline watcher pushes notices to (no HTTP here)."""

    def __init__(self) -> None:
        self.pushed: list[dict[str, Any]] = []

    def push(self, fields: dict[str, Any]) -> object:
        self.pushed.append(dict(fields))
        return object()

    def cancel(self, notice: object) -> bool:
        return False  # already sent


class Tab:
    wants_pings = True
    last_write = 0.0

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.told: tuple[str, int | None] | None = None

    def deliver(self, out: Any) -> bool:
        self.frames += [json.loads(f.data) for f in out]
        return True

    def replaced(self) -> None:
        pass

    def reconnect(self, reason: str, route: int | None = None, spread: float | None = None
                  ) -> None:  # fmt: skip
        self.told = (reason, route)

    def closed(self, code: int, reason: str) -> None:
        pass


def offline_hub(clock: Clock) -> tuple[Hub, OfflineWatcher, Queue]:
    hub = Hub(clock, HubConfig(routes=2), epoch="old")
    queue = Queue()
    watcher = OfflineWatcher(cast(Any, queue), clock)
    hub.offline = watcher
    hub.assign([1, 2], 2)
    return hub, watcher, queue


def request(hub: Hub, body: dict[str, Any]) -> Any:
    return hub.handle_request(json.dumps(body).encode())


def notices(queue: Queue) -> list[tuple[str, str | None]]:
    return [(n["type"], n.get("reason")) for n in queue.pushed]


def test_a_waiting_watch_says_expired_when_its_route_moves_without_hand_off():
    clock = Clock()
    hub, watcher, queue = offline_hub(clock)
    tab = Tab()
    hub.attach(ALICE, tab, None)
    request(hub, {"id": "m-1", "to": [list(ALICE)], "data": 1, "offline": 5})
    stream = hub.mailbox(ALICE).stream  # type: ignore[union-attr]
    route = route_of(ALICE, 2)
    clock.advance(1)
    hub.route_moved({route: "tcp://n2:1"})  # the new owner is not connected: no hand-off
    assert tab.told == ("route_moved", route)  # the key's route: the browser finds its port
    assert queue.pushed == [{"type": "needs_push", "key": list(ALICE), "id": "m-1",
                             "reason": "expired", "seq": 1, "stream": stream}]  # fmt: skip
    assert len(watcher) == 0
    clock.advance(10)  # no unacked for an event this node no longer has
    assert notices(queue) == [("needs_push", "expired")]


def test_a_pushed_watch_ends_with_no_cancel_when_assign_takes_its_route():
    clock = Clock()
    hub, watcher, queue = offline_hub(clock)
    hub.attach(ALICE, Tab(), None)
    request(hub, {"id": "m-1", "to": [list(ALICE)], "data": 1, "offline": 5})
    clock.advance(5)
    assert notices(queue) == [("needs_push", "unacked")]
    route = route_of(ALICE, 2)
    hub.assign([r for r in (1, 2) if r != route], 2)  # HaloD took the route away
    assert len(watcher) == 0
    clock.advance(60)
    assert notices(queue) == [("needs_push", "unacked")]


def test_a_wildcard_watch_says_expired_once_its_last_mailbox_moves_away():
    clock = Clock()
    hub, watcher, queue = offline_hub(clock)
    keys = [ConnectionKey("bob", "s", "/a"), ConnectionKey("bob", "s", "/b")]
    for key in keys:
        hub.attach(key, Tab(), None)
    request(hub, {"id": "m-2", "to": [["bob", "*", "*"]], "data": 1, "offline": 5})
    hub.route_moved({route_of_user("bob", 2): None})
    assert notices(queue) == [("needs_push", "expired")]
    assert queue.pushed[0]["keys"] in ([[key.to_json(), 1]] for key in keys)
    assert len(watcher) == 0
    clock.advance(10)
    assert len(queue.pushed) == 1


def test_a_hold_is_dropped_and_answered_held_when_its_route_moves_without_hand_off():
    clock = Clock()
    hub, watcher, queue = offline_hub(clock)
    body = {"id": "m-7", "to": [["carol", "*", "*"]], "data": {"t": 1}, "offline": 5, "ack": 20}
    reply = request(hub, body)
    assert isinstance(reply, defer.Deferred) and not reply.called
    assert notices(queue) == [("needs_push", "no_connection")]
    assert hub.gauges()["user_holds"] == 1
    hub.route_moved({route_of_user("carol", 2): "tcp://n2:1"})
    assert hub.gauges()["user_holds"] == 0 and hub.mailbox_bytes == 0
    answered: list[bytes] = []
    reply.addCallback(answered.append)
    assert [json.loads(a)["results"] for a in answered] == [
        [{"status": "no_connection", "keys": [], "held": True}]
    ]
    assert len(watcher) == 0
    clock.advance(40)
    assert notices(queue) == [("needs_push", "no_connection")]  # no cancel, nothing more


def test_a_route_handed_over_without_user_state_still_leaves_no_watch_behind():
    """A caller that hands the mailboxes over but not ``users`` (an older link): the
    watches go (the new owner has the events; this node must not say unacked)."""
    clock = Clock()
    hub, watcher, queue = offline_hub(clock)
    hub.attach(ALICE, Tab(), None)
    request(hub, {"id": "m-1", "to": [list(ALICE)], "data": 1, "offline": 5})
    route = route_of(ALICE, 2)
    exports: list[dict[str, Any]] = []
    hub.route_moved({route: "tcp://n2:1"}, handoff=[route], exports=exports)
    assert len(exports) == 1 and len(watcher) == 0
    clock.advance(10)
    assert queue.pushed == []


def test_a_rehash_key_whose_new_route_no_node_owns_is_dropped_as_expired():
    from orbited.core.control import RouteMove

    clock = Clock()
    hub = Hub(clock, HubConfig(routes=2, hash_version=1), epoch="old")
    queue = Queue()
    watcher = OfflineWatcher(cast(Any, queue), clock)
    hub.offline = watcher
    hub.assign([1], 2)
    # a key on route 1 by hash version 1 whose user is on route 2 by version 2
    key = next(
        k
        for k in (ConnectionKey(f"u{i}", "s", "/t") for i in range(200))
        if route_of(k, 2, 1) == 1 and route_of_user(k.user, 2) == 2
    )
    hub.attach(key, Tab(), None)
    request(hub, {"id": "m-3", "to": [list(key)], "data": 1, "offline": 5})
    owners = [RouteMove(1, "n1"), RouteMove(2, None)]  # route 2's owner is gone
    assert hub.rehash(2, owners, me="n1") == {}
    assert hub.mailbox(key) is None
    assert notices(queue) == [("needs_push", "expired")]
    assert len(watcher) == 0
    clock.advance(10)
    assert len(queue.pushed) == 1
