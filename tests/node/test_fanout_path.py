"""The hub's fan-out loop (``Hub._fan_out``, issue 20) against the general per-recipient
path: one request to many keys must give the same results, reply bytes, frames, mailbox
contents, stats and byte counts whichever path runs it.

The general path is the one the hub takes while an observer is on (``Hub.observe``), so a
hub with an observer that records nothing is the reference."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock

from orbited.core.keys import ConnectionKey
from orbited.node import events
from orbited.node.events import RequestLimits, Status
from orbited.node.frames import Frame
from orbited.node.hub import Hub, HubConfig
from orbited.node.mailbox import Mailbox, MailboxLimits


class FrameSink:
    wants_pings = True
    last_write = 0.0
    kind = "ws"

    def __init__(self, accepts: bool = True) -> None:
        self.frames: list[Frame] = []
        self.accepts = accepts

    def deliver(self, out: list[Frame]) -> bool:
        if not self.accepts:
            return False
        self.frames += out
        return True

    def replaced(self) -> None:
        pass

    def reconnect(self, reason: str, route: int | None = None, spread: Any = None) -> None:
        pass

    def closed(self, code: int, reason: str) -> None:
        pass


class SilentObserver:
    """Turns the general path on; records nothing."""

    def dispatched(self, request: Any, now: float) -> None:
        return None

    def recipient(self, *args: Any) -> None:
        pass

    def answered(self, *args: Any) -> None:
        pass

    def noted(self, *args: Any, **detail: Any) -> None:
        pass

    def written(self, *args: Any) -> None:
        pass

    def acked(self, *args: Any) -> None:
        pass


def key(i: int, user: str | None = None) -> ConnectionKey:
    return ConnectionKey(user or f"u{i}", "s", f"/k{i}")


def body(event_id: str, to: list[Any], data: object = None) -> bytes:
    doc = {"id": event_id, "to": to, "data": {"n": event_id} if data is None else data}
    return json.dumps(doc).encode()


def build(observed: bool, config: HubConfig) -> tuple[Hub, dict[ConnectionKey, FrameSink]]:
    hub = Hub(Clock(), config, epoch="ep")
    if observed:
        hub.observe(SilentObserver())  # type: ignore[arg-type]
    sinks = {}
    # attached; attached but refusing frames (queued); lingering (queued); a full mailbox
    for i in range(6):
        sinks[key(i)] = sink = FrameSink()
        hub.attach(key(i), sink, None)
    sinks[key(6)] = FrameSink(accepts=False)
    hub.attach(key(6), FrameSink(), None)
    hub.attach(key(6), sinks[key(6)], None)  # replaced by a sink that takes nothing
    hub.attach(key(7), FrameSink(), None)
    hub.detach(key(7), hub._slots[key(7)].sink)  # type: ignore[arg-type]
    for i in range(3):  # alice's tabs, for a wildcard
        sinks[key(10 + i, "alice")] = sink = FrameSink()
        hub.attach(key(10 + i, "alice"), sink, None)
    return hub, sinks


def state(hub: Hub, sinks: dict[ConnectionKey, FrameSink]) -> dict[str, Any]:
    return {
        "frames": {str(k): list(s.frames) for k, s in sinks.items()},
        "mailboxes": {
            str(k): (
                s.mailbox.export(),
                s.mailbox.delivered,
                s.mailbox.evicted,
                s.counted,
                s.probe,
                s.mailbox.buffered_bytes,
            )
            for k, s in hub._slots.items()
        },  # fmt: skip
        "stats": dict(hub.stats),
        "mailbox_bytes": hub.mailbox_bytes,
    }


def run(observed: bool, bodies: list[bytes], config: HubConfig) -> tuple[list[bytes], dict]:
    hub, sinks = build(observed, config)
    assert (hub.observer is not None) is observed
    replies = []
    for b in bodies:
        with hub.batch():
            out = hub.handle_request(b)
        assert isinstance(out, bytes)
        replies.append(out)
    return replies, state(hub, sinks)


def requests() -> list[bytes]:
    many = [list(key(i)) for i in range(8)] + [list(key(99))]  # 99: no mailbox here
    return [
        body("e1", many),
        body("e2", many + [list(key(3)), list(key(0))]),  # duplicates: delivered once
        body("e3", [list(key(2)), ["alice", "*", "*"], list(key(11, "alice")), list(key(5))]),
        body("e4", list(reversed(many))),
        body("e2", many + [list(key(3)), list(key(0))]),  # a resend: the first reply again
        body("e5", many, data=["x" * 300]),
        # keys named before a wildcard that matches them, and again after it; a key with
        # no mailbox twice
        body(
            "e6",
            [
                list(key(10, "alice")),
                list(key(0)),
                list(key(99)),
                ["alice", "*", "*"],
                list(key(10, "alice")),
                list(key(0)),
                list(key(99)),
            ],
        ),  # fmt: skip
        body("e7", [list(key(1)), list(key(1)), list(key(6)), list(key(6))]),
    ]


def test_a_fan_out_gives_what_the_general_path_gives():
    config = HubConfig()
    fast = run(False, requests(), config)
    general = run(True, requests(), config)
    assert fast == general
    replies, after = fast
    first = json.loads(replies[0])["results"]
    assert [r["status"] for r in first] == ["delivered"] * 6 + ["queued"] * 2 + ["no_connection"]
    assert json.loads(replies[4]).get("duplicate") is True
    e6 = json.loads(replies[6])["results"]
    assert e6[4] == e6[0] and e6[5] == e6[1] and e6[6] == e6[2] == {"status": "no_connection"}
    assert [r["status"] for r in e6[3]["keys"]] == ["delivered"] * 3
    e7 = json.loads(replies[7])["results"]
    assert e7[0] == e7[1] and e7[2] == e7[3] and e7[2]["status"] == "queued"
    assert after["stats"]["delivered"] > 0 and after["stats"]["queued"] > 0


def test_evictions_and_the_node_cap_take_the_general_path_with_the_same_outcome():
    # 2 events per mailbox: the 3rd request evicts (dropped counts); the node's cap is
    # reached part-way through the last request, whose event is larger ("full" then).
    config = HubConfig(mailbox=MailboxLimits(max_events=2), mailbox_total_bytes=2_500)
    to = [list(key(i)) for i in range(8)]
    bodies = [body(f"e{n}", to, data=["y" * 120]) for n in range(4)]
    bodies.append(body("big", to, data=["z" * 400]))
    fast = run(False, bodies, config)
    general = run(True, bodies, config)
    assert fast == general
    results = [json.loads(r)["results"] for r in fast[0]]
    assert any(r.get("dropped") for rs in results for r in rs)
    assert any(r["status"] == "full" for r in results[-1])


def test_fan_out_results_are_the_typed_results():
    hub, _ = build(False, HubConfig())
    request = events.parse_request(body("t1", [list(key(0)), list(key(6)), list(key(99))]),
                                   RequestLimits())  # fmt: skip
    outcome = hub.dispatch(request)  # type: ignore[arg-type]
    assert isinstance(outcome, events.DispatchResult)
    seq0 = hub.mailbox(key(0)).last_seq  # type: ignore[union-attr]
    seq6 = hub.mailbox(key(6)).last_seq  # type: ignore[union-attr]
    assert outcome.results == (
        events.RecipientResult(Status.DELIVERED, seq0),
        events.RecipientResult(Status.QUEUED, seq6),
        events.NO_CONNECTION_RECIPIENT,
    )
    assert events.encode_reply(outcome) == events.ok_reply("t1", [
        b'{"status":"delivered","seq":%d}' % seq0, b'{"status":"queued","seq":%d}' % seq6,
        b'{"status":"no_connection"}',
    ])  # fmt: skip


def test_push_is_append_when_nothing_is_evicted_and_refuses_otherwise():
    limits = MailboxLimits(max_events=2, max_bytes=10)
    a, b = Mailbox("s.1", limits), Mailbox("s.1", limits)
    assert a.push(b"1234", b'"x"') == b.append(b"1234", b'"x"').seq == 1
    assert a.push(b"5678", b'"y"') == b.append(b"5678", b'"y"').seq == 2
    assert (a.export(), a.buffered_bytes, a.next_seq) == (b.export(), b.buffered_bytes, 3)
    assert a.push(b"9", b'"z"') == 0  # max_events: append would evict
    assert (a.export(), a.next_seq, a.evicted) == (b.export(), 3, 0)
    a.ack(2)
    assert a.push(b"12345678901", None) == 0  # over max_bytes alone: append raises
    assert a.push(b"1234567890", None) == 3 and a.buffered_bytes == 10
    assert a.push(b"1", None) == 0  # max_bytes: append would evict


class _CallbackSink:
    """A sink whose deliver calls back into the hub, or raises (a transport bug)."""

    wants_pings = True
    last_write = 0.0
    kind = "ws"

    def __init__(self, on_deliver: Any = None, boom: bool = False) -> None:
        self.on_deliver, self.boom = on_deliver, boom

    def deliver(self, out: list[Frame]) -> bool:
        if self.boom and any(f.seq for f in out):
            raise RuntimeError("transport bug")
        if self.on_deliver is not None:
            self.on_deliver()
        return True

    def replaced(self) -> None: ...
    def reconnect(self, *args: Any) -> None: ...
    def closed(self, *args: Any) -> None: ...


def _buffered(hub: Hub) -> int:
    return sum(slot.mailbox.buffered_bytes for slot in hub._slots.values())


def test_the_node_wide_byte_count_survives_a_sink_that_calls_back_into_the_hub():
    """A delivery that acknowledges another key's events (hub.ack recounts that mailbox)
    while a fan-out runs: the node-wide count the mailbox_total_bytes cap reads stays the
    sum of the mailboxes (review of c8e5e9c: the fan-out kept it in a local)."""
    hub = Hub(Clock(), HubConfig(), epoch="ep")
    a, b, c = key(1), key(2), key(3)
    hub.attach(a, _CallbackSink(), None)
    hub.attach(c, _CallbackSink(), None)
    mailbox_a = hub.mailbox(a)
    assert mailbox_a is not None
    hub.attach(b, _CallbackSink(lambda: hub.ack(a, mailbox_a.last_seq)), None)
    with hub.batch():
        hub.handle_request(body("e0", [list(a)], "x" * 1000))
        hub.handle_request(body("e1", [list(c), list(b)], "x" * 1000))
    assert hub.mailbox_bytes == _buffered(hub) == 2004


def test_the_node_wide_byte_count_survives_a_sink_that_raises_in_a_fan_out():
    hub = Hub(Clock(), HubConfig(), epoch="ep")
    a, bob = key(1), ConnectionKey("bob", "s", "/p")
    hub.attach(a, _CallbackSink(), None)
    hub.attach(bob, _CallbackSink(boom=True), None)
    with hub.batch():
        answer = hub.handle_request(body("e1", [list(a), ["bob", "*", "*"]], "x" * 1000))
    assert b"internal_error" in answer  # type: ignore[operator]
    assert hub.mailbox_bytes == _buffered(hub) == sum(s.counted for s in hub._slots.values())
