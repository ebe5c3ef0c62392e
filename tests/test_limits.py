"""Node limits and slow consumers (docs/operations.md, "Limits").

Sans-I/O parts with task.Clock; the rest against a real node over real sockets.
"""

from __future__ import annotations

import json

from twisted.internet.task import Clock

from orbited.hub import Hub, HubConfig
from orbited.keys import ConnectionKey
from orbited.mailbox import MailboxLimits, Position
from tests.test_hub import RecordingSink, send

ALICE = ConnectionKey("alice", "s", "/t")
BOB = ConnectionKey("bob", "s", "/t")


# -- node-wide mailbox bytes (sans-I/O) ---------------------------------------------------


def capped_hub(total: int) -> Hub:
    return Hub(
        Clock(),
        HubConfig(mailbox=MailboxLimits(100, 1000), mailbox_total_bytes=total, linger=5),
        epoch="ep",
    )


def test_mailbox_total_refuses_with_full_and_frees_on_ack():
    hub = capped_hub(total=30)
    alice, bob = RecordingSink(accept=False), RecordingSink(accept=False)
    hub.attach(ALICE, alice, None)
    hub.attach(BOB, bob, None)
    payload = "x" * 8  # 10 bytes of JSON
    assert send(hub, "1", [ALICE], payload)["results"] == [{"status": "queued", "seq": 1}]
    assert send(hub, "2", [BOB], payload)["results"] == [{"status": "queued", "seq": 1}]
    assert send(hub, "3", [ALICE], payload)["results"] == [{"status": "queued", "seq": 2}]
    assert hub.mailbox_bytes == 30
    # Full: refused for each recipient, nothing stored, counted.
    reply = send(hub, "4", [ALICE, BOB], payload)
    assert reply["results"] == [{"status": "full"}, {"status": "full"}]
    assert hub.stats["full"] == 2
    assert len(hub.mailbox(ALICE)) == 2 and len(hub.mailbox(BOB)) == 1
    # An ack frees room; the resent event goes in.
    hub.ack(ALICE, 2)
    assert hub.mailbox_bytes == 10
    assert send(hub, "5", [BOB], payload)["results"] == [{"status": "queued", "seq": 2}]
    assert hub.gauges()["mailbox_bytes"] == 20


def test_mailbox_total_follows_resume_expiry_and_shutdown():
    hub = capped_hub(total=1000)
    clock: Clock = hub.clock  # type: ignore[assignment]
    sink = RecordingSink()
    hub.attach(ALICE, sink, None)
    for i in range(3):
        send(hub, f"a{i}", [ALICE], "x" * 8)
    assert hub.mailbox_bytes == 30
    stream = hub.mailbox(ALICE).stream
    hub.attach(ALICE, RecordingSink(), Position(stream, 2))  # resuming acknowledges 1-2
    assert hub.mailbox_bytes == 10
    hub.attach(BOB, RecordingSink(), None)
    send(hub, "b", [BOB], "y" * 18)
    assert hub.mailbox_bytes == 30
    hub.detach(BOB, hub._slots[BOB].sink)
    clock.advance(6)  # BOB's mailbox expires
    assert hub.mailbox_bytes == 10
    hub.shutdown("shutdown")
    assert hub.mailbox_bytes == 0


def test_mailbox_total_acknowledged_mode_creates_no_mailbox_when_full():
    hub = capped_hub(total=5)
    reply = send(hub, "1", [ALICE], "x" * 8)  # no mailbox: no_connection, cap not involved
    assert reply["results"] == [{"status": "no_connection"}]
    body = json.dumps({"id": "2", "to": [list(ALICE)], "data": "x" * 8, "ack": 1})
    assert json.loads(hub.handle_request(body.encode()))["results"] == [{"status": "full"}]
    assert hub.mailbox(ALICE) is None
