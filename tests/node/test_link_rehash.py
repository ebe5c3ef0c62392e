"""The node's link and hash versions (orbited/node/link.py; docs/halod.md, "Rehash"):
``register`` names the versions the node speaks, ``welcome``/``assign`` set the hub's
version before its routes, ``rehash`` hands every peer its share (``done`` = the peer's
routes, even with nothing to hand), and a relayed ``handoff`` names its sender — the name
HaloD appends, which a node cannot forge. Driven over StringTransports with SP framing."""

from __future__ import annotations

import json
from typing import Any, cast

from twisted.internet.testing import MemoryReactorClock, StringTransport

from halod.server import with_sender
from orbited.core.control import (
    CONTROL_PROTOCOL,
    FROM_NODE,
    MAX_MESSAGE,
    Assign,
    HaloDMessage,
    Handoff,
    Rehash,
    RouteMove,
    Welcome,
    decode,
    encode,
)
from orbited.core.routes import Role
from orbited.node.link import HaloDLink, LinkProtocol, relayed_from
from orbited.sp.wire import SPConnection, encode_message


class RecordingHub:
    """What the link uses of the hub; records every call in order."""

    def __init__(self, exports: dict[str, list[dict[str, Any]]] | None = None) -> None:
        self.owned: frozenset[int] = frozenset()
        self.attached = 0
        self.mailboxes = 0
        self.calls: list[tuple[Any, ...]] = []
        self.exports = exports or {}
        self.users: dict[str, list[dict[str, Any]]] = {}  # what rehash hands out per owner
        self.users_received: list[Any] = []

    def set_hash_version(self, version: int) -> None:
        self.calls.append(("set_hash_version", version))

    def assign(self, routes: Any, total: int | None = None, incoming: Any = ()) -> int:
        self.calls.append(("assign", tuple(routes)))
        return 0

    def rehash(
        self, version: int, owners: Any, me: str | None = None, users: Any = None
    ) -> dict[str, Any]:
        self.calls.append(("rehash", version, tuple(owners), me))
        if users is not None:
            users.update(self.users)
        return self.exports

    def handoff_received(
        self, entries: Any, done: Any, sender: str | None = None, users: Any = ()
    ) -> int:
        self.calls.append(("handoff_received", list(entries), tuple(done), sender))
        self.users_received.extend(users)
        return len(entries)


class HaloDEnd:
    """HaloD's end of one link connection: sends bytes, reads what the node sent."""

    def __init__(self, hub: RecordingHub) -> None:
        self.link = HaloDLink(cast(Any, hub), "n1", "tcp://127.0.0.1:7600",
                              lambda: ("127.0.0.1:8000", "tcp://127.0.0.1:9000"), 10,
                              MemoryReactorClock())  # fmt: skip
        self.proto = LinkProtocol(self.link)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.sp = SPConnection(CONTROL_PROTOCOL, CONTROL_PROTOCOL, MAX_MESSAGE)
        self.proto.dataReceived(self.sp.initial_bytes())

    def send(self, message: HaloDMessage) -> None:
        self.send_body(encode(message))

    def send_body(self, body: bytes) -> None:
        self.proto.dataReceived(encode_message(body))

    def received(self) -> list[Any]:
        data = self.transport.value()
        self.transport.clear()
        return [decode(body, FROM_NODE) for body in self.sp.receive(data)]


OWNERS = (
    RouteMove(1, "n1", "127.0.0.1:8000", "tcp://127.0.0.1:9000"),
    RouteMove(2, "n2", "127.0.0.2:8000", "tcp://127.0.0.2:9000"),
    RouteMove(3, "n3", "127.0.0.3:8000", "tcp://127.0.0.3:9000"),
    RouteMove(4, "n2", "127.0.0.2:8000", "tcp://127.0.0.2:9000"),
)


def test_register_names_both_hash_versions():
    halod = HaloDEnd(RecordingHub())
    (register,) = halod.received()
    assert register.hashes == (1, 2)


def test_welcome_and_assign_set_the_hash_version_before_the_routes():
    hub = RecordingHub()
    halod = HaloDEnd(hub)
    halod.send(Welcome(1, Role.ACTIVE, (1, 2), 4, 1.0, 3, hash_version=2))
    halod.send(Assign(1, Role.ACTIVE, (1,)))  # no hash_version: an older HaloD, 1
    assert hub.calls == [("set_hash_version", 2), ("assign", (1, 2)),
                         ("set_hash_version", 1), ("assign", (1,))]  # fmt: skip


def test_rehash_hands_every_peer_its_share_with_done():
    entry = {"key": ["u", "s", "/l"], "route": 2, "events": [[1, "x", None]]}
    hub = RecordingHub({"n2": [entry]})
    halod = HaloDEnd(hub)
    halod.send(Welcome(1, Role.ACTIVE, (1,), 4, 1.0, 3, version=3))
    halod.received()
    hub.calls.clear()
    halod.send(Rehash(2, 4, OWNERS))
    assert hub.calls == [("rehash", 2, OWNERS, "n1")]
    assert halod.link.table_version == 4
    sent = {m.to: m for m in halod.received()}
    assert all(isinstance(m, Handoff) for m in sent.values())
    assert sent["n2"].done == (2, 4) and [dict(m) for m in sent["n2"].mailboxes] == [entry]
    assert sent["n3"].done == (3,) and sent["n3"].mailboxes == ()  # nothing, but done
    assert set(sent) == {"n2", "n3"}  # not to itself
    # A rehash of an older table (a replaced leader's) is not obeyed.
    hub.calls.clear()
    halod.send(Rehash(1, 2, OWNERS))
    assert hub.calls == [] and halod.received() == []


def test_per_user_entries_go_out_and_come_in_with_the_handoff():
    """Holds and offline watches (the hub's ``users`` entries) travel in the last
    ``handoff`` message to their new owner, and a received one reaches the hub."""
    hold = {"user": "u", "route": 2, "held": []}
    hub = RecordingHub({"n2": []})
    hub.users = {"n2": [hold]}
    halod = HaloDEnd(hub)
    halod.send(Welcome(1, Role.ACTIVE, (1,), 4, 1.0, 3, version=3))
    halod.received()
    halod.send(Rehash(2, 4, OWNERS))
    sent = {m.to: m for m in halod.received()}
    assert [dict(u) for u in sent["n2"].users] == [hold] and sent["n3"].users == ()
    halod.send(Handoff("n1", (1,), (), (hold,)))
    assert hub.users_received == [hold]


def test_a_spare_sends_only_what_it_has():
    entry = {"key": ["u", "s", "/l"], "route": 3, "events": []}
    spare_owners = tuple(m for m in OWNERS if m.name != "n1") + (RouteMove(1, "n2"),)
    for exports, expected in (({}, set()), ({"n3": [entry]}, {"n3"})):
        hub = RecordingHub(exports)
        halod = HaloDEnd(hub)
        halod.received()
        halod.send(Rehash(2, 4, spare_owners))
        assert hub.calls == [("rehash", 2, spare_owners, "n1")]
        assert {m.to for m in halod.received()} == expected


def test_a_relayed_handoff_names_its_sender_and_a_node_cannot_forge_it():
    hub = RecordingHub()
    halod = HaloDEnd(hub)
    entry = {"key": ["u", "s", "/l"], "route": 1, "events": []}
    forged = json.dumps({"type": "handoff", "to": "n1", "done": [1], "mailboxes": [entry],
                         "from": "n3"}).encode()  # fmt: skip
    relayed = with_sender(forged, "n2")  # what HaloD sends on
    assert json.loads(relayed)["from"] == "n2" and relayed_from(relayed) == "n2"
    halod.send_body(relayed)
    # Without a name (an older HaloD relays the body as is): the single-sender path.
    halod.send(Handoff("n1", (1,), ()))
    assert hub.calls == [("handoff_received", [entry], (1,), "n2"),
                         ("handoff_received", [], (1,), None)]  # fmt: skip


def test_relayed_from_reads_only_a_trailing_well_formed_name():
    body = encode(Handoff("n1", (1,), ({"data": ',"from":"x"}'},)))
    assert relayed_from(body) is None  # in a payload, not HaloD's member
    assert relayed_from(with_sender(body, "node-2.example:1")) == "node-2.example:1"
    assert relayed_from(b'{"type":"handoff","from":"bad name"}') is None


def test_the_assignment_log_line_names_a_spare_without_a_node_id():
    from twisted.logger import formatEvent, globalLogPublisher

    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        for welcome in (
            Welcome(None, Role.SPARE, (), 4, 1.0, 3),
            Welcome(2, Role.ACTIVE, (1, 2), 4, 1.0, 3),
        ):
            HaloDEnd(RecordingHub()).link.assigned(welcome, 4)
    finally:
        globalLogPublisher.removeObserver(observe)
    said = [line for line in lines if "keys told to reconnect" in line]
    assert said == [
        "HaloD: spare node (no id yet), 0 routes; 0 keys told to reconnect",
        "HaloD: active node 2, 2 routes; 0 keys told to reconnect",
    ]
