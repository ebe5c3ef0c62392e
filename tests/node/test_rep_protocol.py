"""The Twisted REP shell on an in-memory transport with a fake clock."""

from contextlib import contextmanager

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from orbited.node.rep import RepFactory, RepLimits
from orbited.sp import wire

REQ_HEADER = wire.encode_header(wire.REQ)


class TCPStringTransport(StringTransport):
    nodelay = False

    def setTcpNoDelay(self, enabled):  # noqa: N802
        self.nodelay = enabled


@pytest.fixture(autouse=True, params=["one", "many"])
def handed(request, monkeypatch):
    """Each test twice: requests handed to the handler one by one, and one read's at once
    (RepFactory's ``many``, as the node's hub takes them)."""
    monkeypatch.setattr(_HANDED, "many", request.param == "many")
    return request.param


class _HANDED:
    many = False


def connect(handler, **limits):
    clock = Clock()
    many = (lambda bodies: [handler(b) for b in bodies]) if _HANDED.many else None
    factory = RepFactory(handler, RepLimits(**limits), clock, many=many)
    proto = factory.buildProtocol(None)
    transport = TCPStringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock, factory


def request(req_id: int, payload: bytes, hops: bytes = b"") -> bytes:
    return wire.encode_message(hops + req_id.to_bytes(4, "big") + payload)


def replies(data: bytes) -> list[bytes]:
    conn = wire.SPConnection(wire.REQ, wire.REP)
    return conn.receive(data)


def deferred_handler():
    """A handler whose replies the test completes by hand, in any order."""
    pending: list[defer.Deferred] = []

    def handler(payload):
        d = defer.Deferred()
        pending.append(d)
        return d

    return handler, pending


def test_sends_header_and_sets_nodelay():
    proto, transport, _, factory = connect(lambda p: p)
    assert transport.value() == wire.encode_header(wire.REP)
    assert transport.nodelay
    assert proto in factory.connections


def test_pipelined_requests_are_answered_with_their_backtraces():
    proto, transport, _, _ = connect(lambda p: b"ok:" + p)
    hops = bytes.fromhex("000000070000abcd")
    proto.dataReceived(REQ_HEADER + request(0x80000001, b"a") + request(0x80000042, b"b", hops))
    assert replies(transport.value()) == [
        bytes.fromhex("80000001") + b"ok:a",
        hops + bytes.fromhex("80000042") + b"ok:b",
    ]


def test_replies_leave_after_the_deliveries_of_their_read():
    """docs/protocol.md: ``delivered`` means written to the browser's transport. The
    deliveries of one read leave when its batch ends; the replies only after that."""
    written_at_batch_end = []

    @contextmanager
    def batch():
        yield
        written_at_batch_end.append(transport.value())

    factory = RepFactory(lambda p: b"ok:" + p, RepLimits(), Clock(), batch=batch)
    proto = factory.buildProtocol(None)
    transport = TCPStringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(REQ_HEADER + request(0x80000001, b"a") + request(0x80000002, b"b"))
    assert written_at_batch_end == [wire.encode_header(wire.REP)]
    assert replies(transport.value()) == [b"\x80\x00\x00\x01ok:a", b"\x80\x00\x00\x02ok:b"]


def test_replies_still_leave_when_the_batch_end_fails():
    """A delivery batch whose end raises (a bug in a sink's flush) must not swallow the
    read's replies: they are written, then the error goes on to Twisted (which logs it
    and drops the connection)."""

    @contextmanager
    def batch():
        yield
        raise RuntimeError("flush failed")

    factory = RepFactory(lambda p: b"ok:" + p, RepLimits(), Clock(), batch=batch)
    proto = factory.buildProtocol(None)
    transport = TCPStringTransport()
    proto.makeConnection(transport)
    with pytest.raises(RuntimeError, match="flush failed"):
        proto.dataReceived(REQ_HEADER + request(0x80000001, b"a"))
    assert replies(transport.value()) == [b"\x80\x00\x00\x01ok:a"]


def test_deferred_replies_leave_in_completion_order():
    handler, pending = deferred_handler()
    proto, transport, _, _ = connect(handler)
    proto.dataReceived(REQ_HEADER + request(0x80000001, b"1") + request(0x80000002, b"2"))
    pending[1].callback(b"second")
    pending[0].callback(b"first")
    assert replies(transport.value()) == [
        bytes.fromhex("80000002") + b"second",
        bytes.fromhex("80000001") + b"first",
    ]


def test_too_many_inflight_pauses_reading_until_answers_leave():
    handler, pending = deferred_handler()
    proto, transport, _, _ = connect(handler, max_inflight=2)
    proto.dataReceived(REQ_HEADER + request(0x80000001, b"") + request(0x80000002, b""))
    assert transport.producerState == "paused"
    pending[0].callback(b"")
    assert transport.producerState == "producing"


def test_oversize_message_closes_connection():
    proto, transport, _, _ = connect(lambda p: p, max_message=16)
    proto.dataReceived(REQ_HEADER + (17).to_bytes(8, "big"))
    assert transport.disconnecting


def test_wrong_peer_protocol_closes_connection():
    proto, transport, _, _ = connect(lambda p: p)
    proto.dataReceived(wire.encode_header(wire.PAIR_V0))
    assert transport.disconnecting


def test_body_without_request_id_closes_connection():
    calls = []
    proto, transport, _, _ = connect(calls.append)
    proto.dataReceived(REQ_HEADER + wire.encode_message(b"\x00\x00\x00\x01"))
    assert transport.disconnecting
    assert calls == []


def test_too_many_hops_is_dropped_and_connection_kept():
    proto, transport, _, _ = connect(lambda p: p)
    deep = bytes.fromhex("00000001") * 9
    proto.dataReceived(REQ_HEADER + request(0x80000001, b"x", deep) + request(0x80000002, b"y"))
    assert replies(transport.value()) == [bytes.fromhex("80000002") + b"y"]
    assert not transport.disconnecting
    assert proto.dropped_requests == 1


def test_missing_header_times_out():
    proto, transport, clock, _ = connect(lambda p: p, header_timeout=10)
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


def test_header_cancels_timeout():
    proto, transport, clock, _ = connect(lambda p: p, header_timeout=10)
    proto.dataReceived(REQ_HEADER)
    clock.advance(60)
    assert not transport.disconnecting
    assert clock.getDelayedCalls() == []


def test_handler_exception_drops_request_but_keeps_connection(handed):
    if handed == "many":
        pytest.skip("a ManyHandler answers each request itself (next test)")

    def handler(payload):
        if payload == b"boom":
            raise RuntimeError("bug")
        return payload

    proto, transport, _, _ = connect(handler)
    proto.dataReceived(REQ_HEADER + request(0x80000001, b"boom") + request(0x80000002, b"ok"))
    assert replies(transport.value()) == [bytes.fromhex("80000002") + b"ok"]
    assert not transport.disconnecting


def test_a_many_handler_s_exception_drops_its_requests_but_keeps_connection():
    calls = []

    def many(bodies):
        calls.append(bodies)
        if b"boom" in bodies:
            raise RuntimeError("bug")
        return [b"ok:" + b for b in bodies]

    factory = RepFactory(lambda p: b"never", RepLimits(), Clock(), many=many)
    proto = factory.buildProtocol(None)
    transport = TCPStringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(REQ_HEADER + request(0x80000001, b"boom") + request(0x80000002, b"a"))
    proto.dataReceived(request(0x80000003, b"b"))
    assert calls == [[b"boom", b"a"], [b"b"]]
    assert replies(transport.value()) == [bytes.fromhex("80000003") + b"ok:b"]
    assert not transport.disconnecting


def test_a_many_handler_is_given_no_more_requests_than_free_inflight_slots():
    """Each request may take an in-flight slot (a Deferred reply): a read's requests go to
    the ManyHandler in groups no larger than the slots free, the rest held (reading
    paused) until replies free some, as one by one."""
    handler, pending = deferred_handler()
    sizes = []

    def many(bodies):
        sizes.append(len(bodies))
        return [handler(b) for b in bodies]

    factory = RepFactory(handler, RepLimits(max_inflight=2), Clock(), many=many)
    proto = factory.buildProtocol(None)
    transport = TCPStringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(REQ_HEADER + b"".join(request(0x80000001 + i, b"%d" % i)
                                             for i in range(5)))  # fmt: skip
    assert sizes == [2] and transport.producerState == "paused"
    pending[0].callback(b"r0")
    assert sizes == [2, 1] and proto.inflight == 2
    pending[1].callback(b"r1")
    pending[2].callback(b"r2")
    assert sizes == [2, 1, 1, 1] and proto.inflight == 2
    pending[3].callback(b"r3")
    pending[4].callback(b"r4")
    assert [r[4:] for r in replies(transport.value())] == [b"r%d" % i for i in range(5)]
    assert transport.producerState == "producing"


def test_full_send_buffer_stops_reading_requests():
    proto, transport, _, _ = connect(lambda p: p)
    assert transport.producer is proto  # registered as streaming producer
    proto.pauseProducing()  # what the transport does when its send buffer is full
    assert transport.producerState == "paused"
    proto.resumeProducing()
    assert transport.producerState == "producing"


# -- Half-close: a request followed by FIN (docs/sp.md, "Half-close") --------------------


def test_half_close_is_supported_so_twisted_does_not_close_at_the_fin():
    from twisted.internet.interfaces import IHalfCloseableProtocol

    proto, *_ = connect(lambda p: b"ok")
    assert IHalfCloseableProtocol.providedBy(proto)


def test_replies_pending_at_the_fin_are_written_then_the_connection_closes():
    handler, pending = deferred_handler()
    proto, transport, _, _ = connect(handler)
    proto.dataReceived(REQ_HEADER + request(0x80000001, b"a") + request(0x80000002, b"b"))
    proto.readConnectionLost()
    assert not transport.disconnecting  # two replies still to come
    pending[1].callback(b"B")
    assert not transport.disconnecting
    pending[0].callback(b"A")
    assert replies(transport.value()) == [b"\x80\x00\x00\x02B", b"\x80\x00\x00\x01A"]
    assert transport.disconnecting  # loseConnection: what was written is sent first
    assert not transport.disconnected  # (not aborted)


def test_fin_after_answered_requests_closes_at_once():
    proto, transport, _, _ = connect(lambda p: b"ok:" + p)
    proto.dataReceived(REQ_HEADER + request(0x80000001, b"a"))
    proto.readConnectionLost()
    assert replies(transport.value()) == [b"\x80\x00\x00\x01ok:a"]
    assert transport.disconnecting


def test_requests_held_over_max_inflight_at_the_fin_are_still_answered():
    handler, pending = deferred_handler()
    proto, transport, _, _ = connect(handler, max_inflight=1)
    proto.dataReceived(REQ_HEADER + b"".join(request(0x80000001 + i, b"%d" % i)
                                             for i in range(3)))  # fmt: skip
    proto.readConnectionLost()
    for i in range(3):
        assert not transport.disconnecting
        pending[i].callback(b"r%d" % i)
    assert [r[4:] for r in replies(transport.value())] == [b"r0", b"r1", b"r2"]
    assert transport.disconnecting


def test_fin_mid_message_or_before_the_header_closes():
    proto, transport, _, _ = connect(lambda p: b"ok")
    proto.dataReceived(REQ_HEADER + request(0x80000001, b"abc")[:-1])
    proto.readConnectionLost()
    assert transport.disconnecting and transport.value() == wire.encode_header(wire.REP)
    proto, transport, clock, _ = connect(lambda p: b"ok")
    proto.readConnectionLost()
    assert transport.disconnecting
    proto.connectionLost(None)
    assert not clock.getDelayedCalls()  # the header timer is gone


def test_a_connection_closed_after_its_fin_frees_its_slot_at_once():
    proto, transport, _, factory = connect(lambda p: b"ok", max_connections=1)
    proto.dataReceived(REQ_HEADER + request(0x80000001, b"a"))
    assert factory.buildProtocol(None) is None  # the one slot is taken
    proto.readConnectionLost()
    assert factory.buildProtocol(None) is not None
