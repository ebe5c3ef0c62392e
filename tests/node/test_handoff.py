"""Mailbox exports for the hand-off (orbited.node.handoff; docs/halod-protocol.md,
"Hand-off"): the exact JSON entry, the round trip, and refusal of bad entries."""

from __future__ import annotations

import json

import pytest
from twisted.internet.task import Clock

from orbited.core.hashing import route_of
from orbited.core.keys import ConnectionKey
from orbited.node import frames
from orbited.node.handoff import HandoffError, MailboxExport
from orbited.node.hub import Hub, HubConfig
from orbited.node.mailbox import Mailbox, MailboxLimits

KEY = ConnectionKey("u", "s", "/l")
ROUTES = 24


def filled_mailbox() -> Mailbox:
    mailbox = Mailbox("ep.1", MailboxLimits())
    mailbox.append(b'{"a":1}', frames.event_id("e1"))
    mailbox.append(b'"two"', None)  # an event from a node before event ids
    mailbox.append(b"3", frames.event_id("e3"))
    mailbox.ack(1)
    return mailbox


def test_an_export_is_the_documented_json_entry():
    route = route_of(KEY, ROUTES)
    wire = MailboxExport.of(KEY, filled_mailbox(), route, online=False).to_wire()
    assert json.dumps(wire, separators=(",", ":")) == (
        '{"key":["u","s","/l"],"route":ROUTE,"stream":"ep.1","next_seq":4,"acked":1,'
        '"events":[[2,"\\"two\\""],[3,"3","e3"]],"online":false,"evicted":0}'
    ).replace("ROUTE", str(route))


def test_an_export_round_trips_through_json():
    route = route_of(KEY, ROUTES)
    export = MailboxExport.of(KEY, filled_mailbox(), route)
    again = MailboxExport.from_wire(json.loads(json.dumps(export.to_wire())), ROUTES)
    assert again == export
    restored = again.mailbox(MailboxLimits())
    assert (restored.stream, restored.next_seq, restored.acked) == ("ep.1", 4, 1)
    assert restored.export() == [(2, b'"two"', None), (3, b"3", b'"e3"')]


def test_the_route_comes_from_the_key_and_online_defaults_to_true():
    wire = MailboxExport.of(KEY, filled_mailbox(), 1).to_wire()
    wire["route"] = 999  # not taken on trust
    del wire["online"]  # an older node's entry
    export = MailboxExport.from_wire(wire, ROUTES)
    assert export.route == route_of(KEY, ROUTES) and export.online


GOOD = {"key": ["u", "s", "/l"], "route": 1, "stream": "ep.1", "next_seq": 2, "acked": 0,
        "events": [[1, "1", "e1"]], "online": True}  # fmt: skip


@pytest.mark.parametrize(
    "change",
    [
        {"key": ["u", "s"]},
        {"key": "u"},
        {"stream": "no dots or colons:"},
        {"stream": 5},
        {"next_seq": -1},
        {"acked": "0"},
        {"next_seq": True},
        {"events": "1"},
        {"events": [[1]]},
        {"events": [[1, 1]]},
        {"events": [["x", "1"]]},
        {"events": [[1, "1", ""]]},
        {"events": [[1, "1", "x" * 129]]},
        {"events": [[1, "1", 7]]},
    ],
)
def test_a_malformed_entry_is_refused(change: dict):
    with pytest.raises(HandoffError):
        MailboxExport.from_wire({**GOOD, **change}, ROUTES)


@pytest.mark.parametrize("entry", [None, [], "x", {"key": ["u", "s", "/l"]}])
def test_an_entry_that_is_not_an_export_is_refused(entry: object):
    with pytest.raises(HandoffError):
        MailboxExport.from_wire(entry, ROUTES)


def test_the_hub_installs_good_entries_and_skips_bad_ones():
    hub = Hub(Clock(), HubConfig(routes=ROUTES), epoch="new")
    route = route_of(KEY, ROUTES)
    hub.assign([], ROUTES)
    hub.assign([route], ROUTES, incoming=[route])
    good = MailboxExport.of(KEY, filled_mailbox(), route).to_wire()
    assert hub.handoff_received([{"key": 1}, good, "junk"], [route]) == 1
    mailbox = hub.mailbox(KEY)
    assert mailbox is not None and mailbox.stream == "ep.1" and mailbox.next_seq == 4
    assert hub.stats["handoff_in"] == 1


# -- rehash (docs/hashing.md, "Moving a cluster from version 1 to 2") -----------------------


class _Tab:
    wants_pings = True
    last_write = 0.0

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.told: tuple | None = None

    def deliver(self, out):
        self.frames += [json.loads(f.data) for f in out]
        return True

    def replaced(self):
        pass

    def reconnect(self, reason, route=None, spread=None):
        self.told = (reason, route)

    def closed(self, code, reason):
        pass


def _owners(table: dict[int, str]) -> list:
    from orbited.core.control import RouteMove

    return [RouteMove(r, name, f"b-{name}", f"tcp://{name}:1") for r, name in table.items()]


def test_rehash_exports_the_keys_whose_new_route_is_a_peers_and_holds_its_own_routes():
    from orbited.node.events import parse_request

    clock = Clock()
    hub = Hub(clock, HubConfig(routes=4, hash_version=1, handoff_timeout=5), epoch="ep")
    hub.assign([1, 2], 4)
    keys = [
        ConnectionKey(f"u{i}", "s", "/t") for i in range(40)
        if route_of(ConnectionKey(f"u{i}", "s", "/t"), 4, 1) in (1, 2)
    ][:12]  # fmt: skip
    tabs = {k: _Tab() for k in keys}
    for k, tab in tabs.items():
        hub.attach(k, tab, None)
        body = json.dumps({"id": f"e-{k.user}", "to": [list(k)], "data": 1}).encode()
        hub.dispatch(parse_request(body, hub.config.requests))
    owners = _owners({1: "n1", 2: "n1", 3: "n2", 4: "n3"})
    out = hub.rehash(2, owners, me="n1")
    assert hub.hash_version == 2 and set(out) == {"n2", "n3"}
    leaving = {k for k in keys if route_of(k, 4, 2) in (3, 4)}
    staying = set(keys) - leaving
    assert leaving and staying  # the fixture covers both
    sent = {tuple(e["key"]): name for name, entries in out.items() for e in entries}
    assert set(sent) == {tuple(k) for k in leaving}
    for k in leaving:
        assert sent[tuple(k)] == {3: "n2", 4: "n3"}[route_of(k, 4, 2)]
        assert tabs[k].told == ("rehash", route_of(k, 4, 2))
        assert k not in hub._slots and hub.user_keys(k.user) == []
    # Staying on this node: a key whose route changed is told to come back through the new
    # route's port (its mailbox stays, lingering), the others hear nothing.
    relocated = {k for k in staying if route_of(k, 4, 1) != route_of(k, 4, 2)}
    assert relocated and staying - relocated  # the fixture covers both
    for k in staying:
        slot = hub._slots[k]
        assert slot.route == route_of(k, 4, 2) and slot.mailbox.next_seq == 2  # its event
        if k in relocated:
            assert tabs[k].told == ("rehash", route_of(k, 4, 2)) and slot.sink is None
            assert slot.linger_at > 0
        else:
            assert tabs[k].told is None and slot.sink is tabs[k]
    # Its own routes wait for every peer's ``done`` (mailboxes may come from both).
    waiting = []
    newcomer = next(
        ConnectionKey(f"w{i}", "s", "/t") for i in range(100)
        if route_of(ConnectionKey(f"w{i}", "s", "/t"), 4, 2) == 1
    )  # fmt: skip
    reply = hub.handle_request(
        json.dumps({"id": "late", "to": [list(newcomer)], "data": 2, "ack": 9}).encode()
    )
    reply.addCallback(waiting.append)  # type: ignore[union-attr]
    peer = Hub(Clock(), HubConfig(routes=4, hash_version=1), epoch="p2")
    peer.assign([3, 4], 4)
    peer.attach(newcomer, _Tab(), None)
    peer_out = peer.rehash(2, owners, me="n2")
    hub.handoff_received(peer_out["n1"], done=[1, 2], sender="n2")
    assert 1 in hub._incoming and waiting == []  # n3 has not said done
    hub.handoff_received([], done=[1, 2], sender="n3")
    assert 1 not in hub._incoming
    assert newcomer in hub._slots and hub._slots[newcomer].mailbox.stream.startswith("p2.")
    hub.ack(newcomer, 1)
    assert json.loads(waiting[0])["results"][0]["status"] == "acked"


def test_a_browser_that_comes_back_after_a_rehash_gets_its_spread():
    """docs/protocol.md: a route_moved frame carries spread, counted over the browsers
    the move sent away; a long-poll between two polls that reaches the old node after a
    rehash gets the rehash's."""
    hub = Hub(Clock(), HubConfig(routes=4, hash_version=1, handoff_timeout=5), epoch="ep")
    hub.assign([1, 2], 4)
    keys = [ConnectionKey(f"u{i}", "s", "/t") for i in range(80)]
    attached = [k for k in keys if route_of(k, 4, 1) in (1, 2)][:12]
    for k in attached:
        hub.attach(k, _Tab(), None)
    hub.rehash(2, _owners({1: "n1", 2: "n1", 3: "n2", 4: "n3"}), me="n1")
    away = next(k for k in keys if k not in attached and route_of(k, 4, 2) in (3, 4))
    said: list[tuple] = []

    class Poll(_Tab):
        def reconnect(self, reason, route=None, spread=None):
            said.append((reason, route, spread))

    assert hub.attach(away, Poll(), None) is None
    ((reason, route, spread),) = said
    assert (reason, route) == ("route_moved", route_of(away, 4, 2))
    assert spread is not None and spread > 0  # 12 browsers' worth, counted by the rehash


def test_rehash_routes_held_are_served_afresh_after_the_timeout():
    clock = Clock()
    hub = Hub(clock, HubConfig(routes=2, hash_version=1, handoff_timeout=5), epoch="ep")
    hub.assign([1], 2)
    hub.rehash(2, _owners({1: "n1", 2: "n2"}), me="n1")
    assert 1 in hub._incoming
    clock.advance(5)
    assert hub._incoming == {} and hub.stats["handoff_timeouts"] == 1


def test_set_hash_version_recomputes_every_route():
    hub = Hub(Clock(), HubConfig(routes=24, hash_version=1), epoch="ep")
    k = ConnectionKey("alice", "s9", "/x")
    hub.attach(k, _Tab(), None)
    assert hub._slots[k].route == route_of(k, 24, 1)
    hub.set_hash_version(2)
    assert hub._slots[k].route == route_of(k, 24, 2) and hub.hash_version == 2


# -- per-user state in a hand-off: held wildcard events and offline watches ---------------


class _Queue:
    """The webhook queue the offline watcher pushes notices to (no HTTP here)."""

    def __init__(self) -> None:
        self.pushed: list[dict] = []

    def push(self, fields):
        self.pushed.append(dict(fields))
        return object()

    def cancel(self, notice) -> bool:
        return False  # already sent


def _offline_hub(name: str, clock: Clock) -> tuple[Hub, _Queue]:
    from orbited.node.offline import OfflineWatcher

    hub = Hub(clock, HubConfig(routes=2), epoch=name)
    queue = _Queue()
    hub.offline = OfflineWatcher(queue, clock)
    return hub, queue


def test_holds_and_watches_travel_with_the_hand_off_and_a_tab_there_cancels():
    from orbited.core.hashing import route_of_user

    clock = Clock()
    old, old_queue = _offline_hub("old", clock)
    new, new_queue = _offline_hub("new", clock)
    route = route_of_user("carol", 2)
    old.assign([1, 2], 2)
    new.assign([r for r in (1, 2) if r != route], 2)
    body = {"id": "m-7", "to": [["carol", "*", "*"]], "data": {"t": 1}, "offline": 5,
            "latest": "typing"}  # fmt: skip
    reply = json.loads(old.handle_request(json.dumps(body).encode()))  # type: ignore[arg-type]
    assert reply["results"] == [{"status": "no_connection", "keys": [], "held": True}]
    assert [n["type"] for n in old_queue.pushed] == ["needs_push"]
    clock.advance(4)
    new.assign([1, 2], 2, incoming=[route])
    exports: list = []
    users: list = []
    old.route_moved({route: "tcp://new:1"}, handoff=[route], exports=exports, users=users)
    assert old.gauges()["user_holds"] == 0 and old.mailbox_bytes == 0
    assert len(users) == 1 and users[0]["user"] == "carol" and users[0]["route"] == route
    (hold,) = users[0]["holds"]
    assert hold["selector"] == ["carol", "*", "*"] and hold["id"] == "m-7"
    assert hold["data"] == '{"t":1}' and hold["latest"] == "typing" and hold["left"] == 26.0
    assert [w["left"] for w in users[0]["watches"]] == [None]  # pushed already
    new.handoff_received(exports, done=[route], users=json.loads(json.dumps(users)))
    assert new.gauges()["user_holds"] == 1
    tab = _Tab()
    carol = ConnectionKey("carol", "s", "/t")
    new.attach(carol, tab, None)
    event = [f for f in tab.frames if f["type"] == "event"]
    assert event == [{"type": "event", "seq": 1, "id": "m-7", "latest": "typing",
                      "data": {"t": 1}}]  # fmt: skip
    new.ack(carol, 1)
    assert [(n["type"], n["id"]) for n in new_queue.pushed] == [("cancel", "m-7")]
    clock.advance(26)
    assert new.gauges()["user_holds"] == 0 and new.gauges()["users"] == 1


@pytest.mark.parametrize(
    "entry",
    [
        "x",
        {"holds": []},
        {"user": "carol", "holds": "no"},
        {
            "user": "carol",
            "holds": [{"selector": ["carol", "s", "/t"], "id": "m", "data": "1", "left": 3}],
        },  # fmt: skip
        {
            "user": "carol",
            "holds": [{"selector": ["dave", "*", "*"], "id": "m", "data": "1", "left": 3}],
        },  # fmt: skip
        {
            "user": "carol",
            "holds": [{"selector": ["carol", "*", "*"], "id": "", "data": "1", "left": 3}],
        },  # fmt: skip
        {
            "user": "carol",
            "holds": [{"selector": ["carol", "*", "*"], "id": "m", "data": 1, "left": 3}],
        },  # fmt: skip
        {
            "user": "carol",
            "holds": [{"selector": ["carol", "*", "*"], "id": "m", "data": "1", "left": -1}],
        },  # fmt: skip
        {
            "user": "carol",
            "holds": [
                {"selector": ["carol", "*", "*"], "id": "m", "data": "1", "left": 3, "latest": ""}
            ],
        },  # fmt: skip
    ],
)
def test_a_malformed_user_entry_is_skipped(entry):
    hub = Hub(Clock(), HubConfig(), epoch="ep")
    assert hub.import_users([entry]) == 0
    assert hub.gauges()["user_holds"] == 0
    good = {"user": "carol", "holds": [{"selector": ["carol", "*", "*"], "id": "m",
                                        "data": "1", "left": 3}]}  # fmt: skip
    assert hub.import_users([entry, good]) == 1


def test_a_mailbox_split_across_messages_keeps_its_tags_and_evicted():
    from orbited.core.control import handoff_messages

    old = Hub(Clock(), HubConfig(routes=2), epoch="old")
    tab = _Tab()
    old.attach(KEY, tab, None)
    tab.deliver = lambda out: False  # type: ignore[method-assign]  # a slow browser
    for i in range(1, 7):
        body = {"id": f"e{i}", "to": [list(KEY)], "data": "x" * 40, "latest": f"t{i % 2}"}
        old.handle_request(json.dumps(body).encode())
    route = old._slots[KEY].route
    before = old._slots[KEY].mailbox
    assert [e[0] for e in before.export()] == [5, 6] and before.export_tags() == [
        (5, b'"t1"', 2), (6, b'"t0"', 2),
    ]  # fmt: skip
    for i in range(7, 12):  # untagged ones, so the entry needs several messages
        old.handle_request(json.dumps({"id": f"e{i}", "to": [list(KEY)],
                                       "data": "y" * 40}).encode())  # fmt: skip
    exports: list = []
    old.route_moved({route: None}, handoff=[route], exports=exports)
    messages = handoff_messages("new", [route], exports, chunk=120)
    assert len(messages) > 2
    new = Hub(Clock(), HubConfig(routes=2), epoch="new")
    new.assign([r for r in (1, 2) if r != route], 2)
    new.assign([1, 2], 2, incoming=[route])
    for message in messages:
        new.handoff_received(json.loads(json.dumps(list(message.mailboxes))), message.done)
    mailbox = new._slots[KEY].mailbox
    assert [e[0] for e in mailbox.export()] == [5, 6, 7, 8, 9, 10, 11]
    assert mailbox.export_tags() == [(5, b'"t1"', 2), (6, b'"t0"', 2)]
    assert mailbox.evicted == 0
