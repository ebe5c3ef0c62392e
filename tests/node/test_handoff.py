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
        '"events":[[2,"\\"two\\""],[3,"3","e3"]],"online":false}'
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
