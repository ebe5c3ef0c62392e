"""docs/protocol.md's promises about user-addressed events are what the hub does: a held
acknowledged-mode wildcard ("Acknowledged mode": the doc's example reply, or `held`
after `ack` seconds) and the per-user connection limit's 2 s and 10 s ("Per-user
limits": a long-poll between polls counts and can be the one close_oldest displaces).
Hub with a Clock: the numbers are the doc's, not timing measurements."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

from orbited.core.keys import ConnectionKey
from orbited.node.hub import Hub, HubConfig
from orbited.node.users import UserLimits

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


def section(title: str) -> str:
    return DOC.split(f"\n### {title}\n", 1)[1].split("\n### ", 1)[0]


class Tab:
    """A browser transport: records frames and how it was ended."""

    wants_pings = True
    last_write = 0.0

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.ended: tuple[int, str] | None = None

    def deliver(self, out: list[Any]) -> bool:
        self.frames += [json.loads(f.data) for f in out]
        return True

    def replaced(self) -> None:
        pass

    def reconnect(self, reason: str, route: int | None = None, spread: float | None = None) -> None:
        pass

    def closed(self, code: int, reason: str) -> None:
        self.ended = (code, reason)


def results(reply: Any) -> list[dict[str, Any]]:
    """The results of a reply that may still be pending (a Deferred)."""
    got: list[bytes] = []
    if isinstance(reply, bytes):
        got.append(reply)
    else:

        def keep(body: bytes) -> bytes:
            got.append(body)
            return body

        reply.addCallback(keep)
    return json.loads(got[0])["results"] if got else []


def request(hub: Hub, **fields: Any) -> Any:
    body = {"id": "m-7", "to": [["alice", "*", "*"]], "data": {"text": "hi"}, **fields}
    return hub.handle_request(json.dumps(body).encode())


def test_a_held_acknowledged_wildcard_is_answered_by_the_first_key_as_the_doc_shows():
    text = section("Acknowledged mode")
    (example,) = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, re.S)]
    (shown,) = example["keys"]
    clock = Clock()
    hub = Hub(clock, HubConfig(), epoch="ep")
    reply = request(hub, ack=10)
    assert results(reply) == []  # waits for the hold's first mailbox
    key = ConnectionKey(*shown["key"])
    tab = Tab()
    clock.advance(1)
    hub.attach(key, tab, None)
    assert [f["seq"] for f in tab.frames if f["type"] == "event"] == [shown["seq"]]
    hub.attach(ConnectionKey("alice", "s9", "/other"), Tab(), None)  # reached second
    hub.ack(key, shown["seq"])
    assert results(reply) == [example]


def test_a_held_acknowledged_wildcard_no_tab_takes_is_held_after_ack_seconds():
    held = {"status": "no_connection", "keys": [], "held": True}
    assert '{"status": "no_connection", "keys": [], "held": true}' in section("Acknowledged mode")
    clock = Clock()
    hub = Hub(clock, HubConfig(), epoch="ep")
    reply = request(hub, ack=5)
    clock.advance(4.9)
    assert results(reply) == []
    clock.advance(0.1)
    assert results(reply) == [held]
    assert hub.gauges()["user_holds"] == 1  # held on for the rest of user_hold
    # user_hold = 0: nothing is held, no_connection at once.
    off = Hub(Clock(), HubConfig(users=UserLimits(hold=0)), epoch="ep")
    assert results(request(off, ack=5)) == [{"status": "no_connection", "keys": []}]


def _limited(policy: str) -> tuple[Clock, Hub]:
    clock = Clock()
    return clock, Hub(
        clock, HubConfig(users=UserLimits(max_connections=1, policy=policy)), epoch="ep"
    )


def test_a_connection_counts_for_2_seconds_after_its_transport_ended():
    assert "2 s after its transport ended" in section("Per-user limits")
    clock, hub = _limited("refuse")
    poll, other = ConnectionKey("alice", "s", "/a"), ConnectionKey("alice", "s", "/b")
    first = Tab()
    hub.attach(poll, first, None)
    hub.detach(poll, first)  # a long-poll between two polls
    clock.advance(1.9)
    assert not hub.admits(other)
    refused = Tab()
    assert hub.attach(other, refused, None) is None and refused.ended == (4429, "user_limit")
    assert hub.attach(poll, Tab(), None) is not None  # the poll cycle itself: never refused
    hub.detach(poll, hub._slots[poll].sink)  # type: ignore[arg-type]
    clock.advance(2.0)
    assert hub.admits(other) and hub.attach(other, Tab(), None) is not None


def test_close_oldest_displaces_a_poll_between_polls_and_its_next_poll_gets_4003():
    text = section("Per-user limits")
    assert "within 10 s" in text and "4003" in text
    clock, hub = _limited("close_oldest")
    poll, newer = ConnectionKey("alice", "s", "/a"), ConnectionKey("alice", "s", "/b")
    first = Tab()
    hub.attach(poll, first, None)
    hub.detach(poll, first)
    clock.advance(1)
    assert hub.attach(newer, Tab(), None) is not None
    assert poll not in hub._slots  # its mailbox dropped
    clock.advance(9.5)
    again = Tab()
    assert hub.attach(poll, again, None) is None
    assert again.ended == (4003, "displaced")
