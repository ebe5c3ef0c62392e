"""A planned move through the link (orbited/node/link.py; docs/halod-protocol.md,
"Hand-off"): a real hub hands its mailboxes over through ``route_moved``, the link turns
them into ``handoff`` messages, and a second real hub installs them. Events too large for
a control message are left out, and the browser resuming on the new owner must see a
``gap`` for them (step 3), not a seq jump that reads as a latest-value replacement."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock

from orbited.core.control import (
    MAX_MESSAGE,
    Handoff,
    RouteMove,
    RouteMoved,
    Welcome,
)
from orbited.core.keys import ConnectionKey
from orbited.core.routes import Role
from orbited.node.events import RequestLimits
from orbited.node.hub import Hub, HubConfig
from orbited.node.mailbox import Position
from tests.node.test_link_rehash import HaloDEnd as Link  # HaloD's end of the link

KEY = ConnectionKey("alice", "s1", "/chat")
BIG = MAX_MESSAGE // 2 + 10  # payload characters: more than half a control message


class Tab:
    """A browser's transport as the hub sees it."""

    kind = "ws"
    wants_pings = True
    last_write = 0.0

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def deliver(self, out: Any) -> bool:
        self.frames += [json.loads(f.data) for f in out]
        return True

    def replaced(self) -> None:
        pass

    def reconnect(self, reason: str, route: int | None = None, spread: float | None = None
                  ) -> None:  # fmt: skip
        pass

    def closed(self, code: int, reason: str) -> None:
        pass


def config() -> HubConfig:
    return HubConfig(routes=2, requests=RequestLimits(max_payload=BIG + 100))


def send_event(hub: Hub, eid: str, data: str) -> None:
    body = {"id": eid, "to": [list(KEY)], "data": data}
    hub.handle_request(json.dumps(body).encode())


def test_an_event_left_out_of_a_hand_off_is_a_gap_on_the_new_owner():
    old = Hub(Clock(), config(), epoch="old")
    halod = Link(old)
    halod.send(Welcome(1, Role.ACTIVE, (1, 2), 2, 1.0, 3, hash_version=2))
    tab = Tab()
    old.attach(KEY, tab, None)
    send_event(old, "e1", "a")
    tab.deliver = lambda out: False  # type: ignore[method-assign]  # the browser is away
    send_event(old, "e2", "b")
    send_event(old, "e3", "x" * BIG)  # too large for one control message
    send_event(old, "e4", "c")
    old.ack(KEY, 1)
    stream = old.mailbox(KEY).stream  # type: ignore[union-attr]
    route = old._slots[KEY].route
    halod.received()  # register
    new = Hub(Clock(), config(), epoch="new")
    new.assign([r for r in (1, 2) if r != route], 2)
    new.assign([1, 2], 2, incoming=[route])
    halod.send(RouteMoved((RouteMove(route, "n2", "b2", "tcp://n2:1", handoff=True),)))
    handoffs = [m for m in halod.received() if isinstance(m, Handoff)]
    assert handoffs and handoffs[-1].done == (route,)
    for message in handoffs:
        new.handoff_received(json.loads(json.dumps(list(message.mailboxes))), message.done)
    resumed = Tab()
    new.attach(KEY, resumed, Position(stream, 1))
    seen = [f for f in resumed.frames if f["type"] in ("gap", "event")]
    # 3 is left out, so 2 (before it) goes too: a gap is one range, up to the entry's
    # evicted (docs/halod-protocol.md, "Hand-off", step 3).
    assert seen == [{"type": "gap", "from": 2, "to": 3},
                    {"type": "event", "seq": 4, "id": "e4", "data": "c"}]  # fmt: skip


def test_a_hand_off_with_nothing_left_out_has_no_gap():
    old = Hub(Clock(), config(), epoch="old")
    halod = Link(old)
    halod.send(Welcome(1, Role.ACTIVE, (1, 2), 2, 1.0, 3, hash_version=2))
    old.attach(KEY, Tab(), None)
    old.detach(KEY, old._slots[KEY].sink)  # type: ignore[arg-type]
    for i in (1, 2, 3):
        send_event(old, f"e{i}", "x" * 100)
    stream = old.mailbox(KEY).stream  # type: ignore[union-attr]
    route = old._slots[KEY].route
    new = Hub(Clock(), config(), epoch="new")
    new.assign([r for r in (1, 2) if r != route], 2)
    new.assign([1, 2], 2, incoming=[route])
    halod.received()
    halod.send(RouteMoved((RouteMove(route, "n2", "b2", "tcp://n2:1", handoff=True),)))
    for message in [m for m in halod.received() if isinstance(m, Handoff)]:
        new.handoff_received(json.loads(json.dumps(list(message.mailboxes))), message.done)
    resumed = Tab()
    new.attach(KEY, resumed, Position(stream, 0))
    seen = [(f["type"], f.get("seq")) for f in resumed.frames if f["type"] in ("gap", "event")]
    assert seen == [("event", 1), ("event", 2), ("event", 3)]


def test_an_event_too_large_once_escaped_for_the_control_message_is_left_out_too():
    """Payloads are stored as UTF-8 JSON text, and the control message escapes every
    non-ASCII character (6 bytes for a 2-byte é): an event of fewer characters than half
    a message can still be too large for one. It is left out (a gap), not sent in a
    message HaloD must refuse."""
    old = Hub(Clock(), config(), epoch="old")
    halod = Link(old)
    halod.send(Welcome(1, Role.ACTIVE, (1, 2), 2, 1.0, 3, hash_version=2))
    old.attach(KEY, Tab(), None)
    old.detach(KEY, old._slots[KEY].sink)  # type: ignore[arg-type]
    wide = "é" * 200_000  # 200 002 characters of JSON text, 1.2 MB escaped
    text = json.dumps(wide, ensure_ascii=False)  # as the mailbox keeps it
    assert len(text) < MAX_MESSAGE // 2 and len(json.dumps(text)) > MAX_MESSAGE
    send_event(old, "e1", wide)
    send_event(old, "e2", "c")
    stream = old.mailbox(KEY).stream  # type: ignore[union-attr]
    route = old._slots[KEY].route
    new = Hub(Clock(), config(), epoch="new")
    new.assign([r for r in (1, 2) if r != route], 2)
    new.assign([1, 2], 2, incoming=[route])
    halod.received()
    halod.send(RouteMoved((RouteMove(route, "n2", "b2", "tcp://n2:1", handoff=True),)))
    handoffs = [m for m in halod.received() if isinstance(m, Handoff)]  # each one decodes
    for message in handoffs:
        new.handoff_received(json.loads(json.dumps(list(message.mailboxes))), message.done)
    resumed = Tab()
    new.attach(KEY, resumed, Position(stream, 0))
    seen = [f for f in resumed.frames if f["type"] in ("gap", "event")]
    assert seen == [{"type": "gap", "from": 1, "to": 1},
                    {"type": "event", "seq": 2, "id": "e2", "data": "c"}]  # fmt: skip


def test_the_hand_off_leaves_before_any_browser_is_told_to_reconnect():
    """The new owner holds a moved key's browser until its mailbox arrives: sending the
    hand-off first means a browser that comes back at once waits less."""
    old = Hub(Clock(), config(), epoch="old")
    halod = Link(old)
    halod.send(Welcome(1, Role.ACTIVE, (1, 2), 2, 1.0, 3, hash_version=2))
    halod.received()
    order: list[str] = []

    class Told(Tab):
        def reconnect(self, reason: str, route: int | None = None,
                      spread: float | None = None) -> None:  # fmt: skip
            sent = [m for m in halod.received() if isinstance(m, Handoff)]
            order.extend(["handoff"] * len(sent) + ["reconnect"])

    old.attach(KEY, Told(), None)
    send_event(old, "e1", "a")
    route = old._slots[KEY].route
    halod.send(RouteMoved((RouteMove(route, "n2", "b2", "tcp://n2:1", handoff=True),)))
    assert order == ["handoff", "reconnect"]
