"""The delivery batch (orbited.node.flush) alone, in the hub, and opened by the SP REP
server around one read: frames for one connection leave in one write when the batch
ends; outside a batch sinks write at once; nothing is lost when a connection goes away
between enlisting and the flush."""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from orbited.core.keys import ConnectionKey
from orbited.node.flush import DeliveryBatch
from orbited.node.hub import Hub, HubConfig
from orbited.node.mailbox import Position
from orbited.node.rep import RepFactory, RepLimits
from orbited.sp import wire

ALICE = ConnectionKey("alice", "s1", "/chat")
BOB = ConnectionKey("bob", "s2", "/chat")


class Recorder:
    def __init__(self, log: list[str], name: str, fail: bool = False) -> None:
        self.log, self.name, self.fail = log, name, fail

    def flush(self) -> None:
        self.log.append(self.name)
        if self.fail:
            raise RuntimeError("boom")


def test_outside_a_batch_nothing_is_enlisted():
    batch = DeliveryBatch()
    assert not batch.open and not batch.enlist(Recorder([], "a"))


def test_the_outermost_end_flushes_each_enlisted_sink_once_in_order():
    log: list[str] = []
    batch = DeliveryBatch()
    assert batch.begin(5.0) is True
    assert batch.enlist(Recorder(log, "a"))
    assert batch.begin(9.0) is False  # nested: same batch, same time
    assert batch.now == 5.0
    assert batch.enlist(Recorder(log, "b"))
    batch.end()
    assert log == [] and batch.open  # the inner end flushes nothing
    batch.end()
    assert log == ["a", "b"] and not batch.open
    batch.begin(6.0)
    batch.end()
    assert log == ["a", "b"]  # a flushed sink is not flushed again


def test_a_failing_flush_does_not_stop_the_others_and_late_enlists_write_at_once():
    log: list[str] = []
    batch = DeliveryBatch()
    late: list[bool] = []

    class Enlister(Recorder):
        def flush(self) -> None:
            super().flush()
            late.append(batch.enlist(Recorder(log, "late")))

    batch.begin(0.0)
    batch.enlist(Recorder(log, "a", fail=True))
    batch.enlist(Enlister(log, "b"))
    batch.end()
    assert log == ["a", "b"]
    assert late == [False]  # during the flush the batch is closed: write now


class BatchingSink:
    """A sink following the contract of orbited.node.flush: inside a batch it keeps the
    frames and enlists once; its flush is one write."""

    wants_pings = True

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.writes: list[list[dict]] = []
        self.pending: list[bytes] | None = None
        self.closed = False
        self.last_write = 0.0

    def deliver(self, out) -> bool:
        if self.closed:
            return False
        data = [f.data for f in out]
        if self.pending is not None:
            self.pending += data
        elif self.hub.enlist(self):
            self.pending = data
        else:
            self.writes.append([json.loads(d) for d in data])
        return True

    def flush(self) -> None:
        pending, self.pending = self.pending, None
        if pending and not self.closed:  # a closed connection drops them: see the mailbox
            self.writes.append([json.loads(d) for d in pending])

    def replaced(self) -> None:
        self.closed = True

    def reconnect(self, reason: str, route: int | None = None, spread=None) -> None:
        self.closed = True


def make_hub() -> tuple[Hub, Clock]:
    clock = Clock()
    return Hub(clock, HubConfig(), epoch="ep"), clock


def body(event_id: str, key: ConnectionKey, data: object) -> bytes:
    return json.dumps({"id": event_id, "to": [list(key)], "data": data}).encode()


def statuses(reply: bytes) -> list[str]:
    return [r["status"] for r in json.loads(reply)["results"]]


def test_deliveries_in_a_batch_leave_in_one_write_per_connection_when_it_ends():
    hub, _ = make_hub()
    alice, bob = BatchingSink(hub), BatchingSink(hub)
    hub.attach(ALICE, alice, None)
    hub.attach(BOB, bob, None)
    assert [len(w) for w in alice.writes] == [1]  # the hello: outside a batch, at once
    with hub.batch():
        replies = [hub.handle_request(body(f"e{i}", ALICE if i != 1 else BOB, i))
                   for i in range(3)]  # fmt: skip
        assert [len(w) for w in alice.writes] == [1] and len(bob.writes) == 1  # kept
    assert [statuses(r) for r in replies] == [["delivered"]] * 3
    assert [[f["data"] for f in w] for w in alice.writes[1:]] == [[0, 2]]  # one write
    assert [[f["data"] for f in w] for w in bob.writes[1:]] == [[1]]
    assert hub.mailbox(ALICE).delivered == 2  # type: ignore[union-attr]
    hub.handle_request(body("e3", ALICE, 3))  # no batch: at once
    assert [f["data"] for f in alice.writes[-1]] == [3]


def test_a_connection_lost_before_the_flush_loses_nothing():
    hub, _ = make_hub()
    sink = BatchingSink(hub)
    hub.attach(ALICE, sink, None)
    stream = hub.mailbox(ALICE).stream  # type: ignore[union-attr]
    with hub.batch():
        assert statuses(hub.handle_request(body("e1", ALICE, "x"))) == ["delivered"]
        sink.closed = True  # the browser went away before the flush
        hub.detach(ALICE, sink)
    assert sink.writes[1:] == []  # dropped with the connection ...
    again = BatchingSink(hub)
    hub.attach(ALICE, again, Position(stream, 0))  # ... and resumed from the mailbox
    assert [f["data"] for f in again.writes[0] if f["type"] == "event"] == ["x"]


def test_the_clock_is_read_once_per_batch_and_resends_are_still_recognised():
    hub, clock = make_hub()
    hub.attach(ALICE, BatchingSink(hub), None)
    clock.advance(100)
    with hub.batch():
        clock.advance(1)
        assert hub.now() == 100  # the batch's time
        first = hub.handle_request(body("e1", ALICE, 1))
        again = hub.handle_request(body("e1", ALICE, 1))
    assert json.loads(again)["duplicate"] is True
    assert json.loads(first)["results"] == json.loads(again)["results"]
    assert hub.now() == 101
    clock.advance(hub.config.dedup_window + 1)  # past the window: forgotten
    with hub.batch():
        assert statuses(hub.handle_request(body("e1", ALICE, 1))) == ["delivered"]
    assert len(hub.dedup) == 1


# -- the SP REP server opens the batch around one read ---------------------------------


def request(req_id: int, payload: bytes) -> bytes:
    return wire.encode_message(req_id.to_bytes(4, "big") + payload)


def test_the_rep_server_batches_the_requests_of_one_read():
    hub, clock = make_hub()
    sink = BatchingSink(hub)
    hub.attach(ALICE, sink, None)
    factory = RepFactory(hub.handle_request, RepLimits(), clock, batch=hub.batch)
    proto = factory.buildProtocol(None)
    assert proto is not None
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(
        wire.encode_header(wire.REQ)
        + b"".join(request(0x80000001 + i, body(f"e{i}", ALICE, i)) for i in range(3))
    )
    assert [[f["data"] for f in w] for w in sink.writes[1:]] == [[0, 1, 2]]  # one write
    replies = wire.SPConnection(wire.REQ, wire.REP).receive(transport.value())
    assert [statuses(r[4:]) for r in replies] == [["delivered"]] * 3
    proto.dataReceived(request(0x80000009, body("e9", ALICE, 9)))  # the next read
    assert [f["data"] for f in sink.writes[-1]] == [9]


def test_user_events_in_one_read_leave_in_one_write_per_tab():
    """A wildcard's keys are ordinary deliveries: two user-addressed events in one batch
    reach each of the user's three tabs in one write, in order."""
    hub, _ = make_hub()
    tabs = {ConnectionKey("alice", "s", f"/t{i}"): BatchingSink(hub) for i in range(3)}
    for key, sink in tabs.items():
        hub.attach(key, sink, None)
    flushes = {key: 0 for key in tabs}
    for key, sink in tabs.items():
        original = sink.flush

        def counted(key=key, original=original) -> None:
            flushes[key] += 1
            original()

        sink.flush = counted  # type: ignore[method-assign]
    user = ["alice", "*", "*"]
    with hub.batch():
        for i in range(2):
            hub.handle_request(json.dumps({"id": f"u{i}", "to": [user], "data": i}).encode())
    assert flushes == {key: 1 for key in tabs}
    for sink in tabs.values():
        assert [[(f["seq"], f["data"]) for f in w] for w in sink.writes[1:]] == [[(1, 0), (2, 1)]]
