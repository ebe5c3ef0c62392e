"""The 2007 Orbit 1.0 protocol: parser (sans-I/O) and a real node's legacy listener."""

from __future__ import annotations

import json
import socket

import pytest

from orbited.core.keys import ConnectionKey
from orbited.node.events import RequestLimits
from orbited.node.frames import Frame
from orbited.node.legacy.orbit import OrbitError, OrbitParser
from tests.conftest import NodeProcess

MODERN = (
    b"Orbit 1.0\r\nEvent\r\nid: 7\r\nrecipient: alice, 0, /cherrychat\r\n"
    b'recipient: bob, 0, /cherrychat\r\nlength: 17\r\n\r\n"<b>hi</b> there"'
)
DOCS_2007 = (
    b"Orbit/1.0\r\nAction: Event\r\nId: 8\r\nRecipient: (alice, 0, /cherrychat)\r\n"
    b"Length: 5\r\n\r\nhello"
)


def test_parser_reads_both_spellings_split_anywhere():
    parser = OrbitParser(RequestLimits())
    stream = MODERN + DOCS_2007
    requests = []
    for i in range(len(stream)):
        requests += parser.feed(stream[i : i + 1])
    assert [(r.event_id, len(r.recipients), r.body) for r in requests] == [
        ("7", 2, b'"<b>hi</b> there"'),
        ("8", 1, b"hello"),
    ]
    assert requests[1].recipients[0] == ("alice", "0", "/cherrychat")


@pytest.mark.parametrize(
    "head, message",
    [
        (b"GET / HTTP/1.1\r\n\r\n", "expected 'Orbit 1.0'"),
        (b"Orbit 1.0\r\nSubscribe\r\nid: 1\r\nlength: 0\r\n\r\n", "unsupported action"),
        (b"Orbit 1.0\r\nEvent\r\nrecipient: a, 0, /x\r\nlength: 0\r\n\r\n", "missing id"),
        (b"Orbit 1.0\r\nEvent\r\nid: 1\r\nrecipient: a, 0, /x\r\n\r\n", "missing length"),
        (b"Orbit 1.0\r\nEvent\r\nid: 1\r\nlength: 0\r\n\r\n", "no recipient"),
        (b"Orbit 1.0\r\nEvent\r\nid: 1\r\nrecipient: a\r\nlength: 0\r\n\r\n", "recipient"),
        (b"Orbit 1.0\r\nEvent\r\nid: 1\r\nrecipient: a,0,/\r\nlength: x\r\n\r\n", "number"),
        (
            b"Orbit 1.0\r\nEvent\r\nid: 1\r\nrecipient: a,0,/\r\nlength: 99999999\r\n\r\n",
            "length over",
        ),
    ],
)
def test_malformed_requests_are_clear_errors(head, message):
    with pytest.raises(OrbitError, match=message):
        OrbitParser(RequestLimits()).feed(head)


def test_bare_lf_line_ends_are_read_as_crlf_ones():
    """A request typed into netcat or a here-document ends its lines with LF alone: it is
    read, not left waiting for a CRLF blank line that never comes."""
    parser = OrbitParser(RequestLimits())
    (request,) = parser.feed(b"Orbit 1.0\nEvent\nid: 8\nrecipient: g, s, /a\nlength: 5\n\nhello")
    assert (request.event_id, request.recipients, request.body) == (
        "8", (("g", "s", "/a"),), b"hello",
    )  # fmt: skip


@pytest.mark.parametrize(
    "head, event_id, message",
    [
        (b"Orbit 1.0\r\nEvent\r\nid: 4\r\nrecipient: a, 0\r\nlength: 2\r\n\r\n", "4",
         "recipient must be"),
        (b"Orbit 1.0\r\nEvent\r\nrecipient: a, 0\r\nid: 5\r\nlength: 2\r\n\r\n", "5",
         "recipient must be"),  # the id after the bad line
        (b"Orbit 1.0\r\nEvent\r\nid: 6\r\nrecipient: \xff, 0, /x\r\nlength: 2\r\n\r\n", "6",
         "not UTF-8"),
        (b"Orbit 1.0\r\nEvent\r\nid: 7\r\nrecipient: alice, *, *\r\nlength: 2\r\n\r\n", "7",
         "reserved"),  # "*" addresses no key over this port: refused, not "not reached"
        (b"Orbit 1.0\r\nEvent\r\nid: 8\r\nrecipient: *, 0, /x\r\nlength: 2\r\n\r\n", "8",
         "reserved"),
        (b"Orbit 1.0\r\nEvent\r\nid: 9\r\nrecipient: a, 0, /x\r\nlength: 2\r\nlength: 3\r\n"
         b"\r\n", "9", "length given twice"),  # the last one would misframe the next request
        (b"Orbit 1.0\r\nEvent\r\nid: 10\r\nid: 11\r\nrecipient: a, 0, /x\r\nlength: 2\r\n\r\n",
         "10", "id given twice"),
    ],
)  # fmt: skip
def test_a_refused_request_echoes_its_id(head, event_id, message):
    """docs/legacy.md: the id is echoed back; a 2007 client reads it from every reply."""
    with pytest.raises(OrbitError, match=message) as e:
        OrbitParser(RequestLimits()).feed(head)
    assert e.value.event_id == event_id


@pytest.mark.parametrize("ending", [b"", b"\r\n\r\n"])
def test_endless_header_is_refused(ending):
    with pytest.raises(OrbitError, match="too long"):
        OrbitParser(RequestLimits()).feed(b"Orbit 1.0\r\n" + b"x" * 100_000 + ending)


@pytest.mark.parametrize("length", ["\u00b2", "1" * 5000, "-1", "1e3"])
def test_odd_lengths_are_clear_errors(length):
    head = f"Orbit 1.0\r\nEvent\r\nid: 1\r\nrecipient: a, 0, /x\r\nlength: {length}\r\n\r\n"
    with pytest.raises(OrbitError, match="length must be a number"):
        OrbitParser(RequestLimits()).feed(head.encode())


@pytest.fixture(scope="module")
def orbit_node(tmp_path_factory: pytest.TempPathFactory):
    node = NodeProcess(tmp_path_factory.mktemp("orbit"), "--orbit-legacy", "127.0.0.1:0")
    node.start()
    yield node
    node.stop()


def orbit_socket(node: NodeProcess) -> socket.socket:
    host, port = node.orbit.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5)


def read_replies(sock: socket.socket, count: int) -> list[bytes]:
    data = b""
    while data.count(b"\r\n\r\n") < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return [r + b"\r\n\r\n" for r in data.split(b"\r\n\r\n")[:count]]


@pytest.mark.slow
def test_2007_requests_pipelined_get_the_original_replies(orbit_node: NodeProcess):
    node = orbit_node
    with node.ws(node.token("alice", "0", "/cherrychat")) as ws:
        ws.recv(timeout=5)
        sock = orbit_socket(node)
        sock.sendall(MODERN + DOCS_2007)  # pipelined, both spellings
        replies = read_replies(sock, 2)
        assert replies == [
            b"Failure\r\nid: 7\r\nmsg: Failed to reach one or more recipients\r\n"
            b"recipient: (bob, 0, /cherrychat)\r\n\r\n",
            b"Success\r\nid: 8\r\n\r\n",
        ]
        got = [json.loads(ws.recv(timeout=5))["data"] for _ in range(2)]
        assert got == ["<b>hi</b> there", "hello"]  # JSON bodies stay JSON, text is text
        sock.close()


@pytest.mark.slow
def test_good_requests_before_a_bad_one_are_answered(orbit_node: NodeProcess):
    nested = b"[" * 5000 + b"]" * 5000  # valid bytes, too deep for a JSON parser: kept as text
    good = (b"Orbit 1.0\r\nEvent\r\nid: 1\r\nrecipient: nobody, 0, /x\r\nlength: %d\r\n\r\n"
            % len(nested)) + nested  # fmt: skip
    bad = b"Orbit 1.0\r\nEvent\r\nid: 2\r\nrecipient: a, 0, /x\r\nlength: \xc2\xb2\r\n\r\n"
    sock = orbit_socket(orbit_node)
    sock.sendall(good + bad)
    first, second = read_replies(sock, 2)
    assert first.startswith(b"Failure\r\nid: 1\r\nmsg: Failed to reach one or more recipients")
    assert second.startswith(b"Failure\r\nid: 2\r\nmsg: length must be a number")
    assert sock.recv(10) == b""


@pytest.mark.slow
def test_malformed_orbit_request_gets_failure_and_close(orbit_node: NodeProcess):
    sock = orbit_socket(orbit_node)
    sock.sendall(b"HELLO\r\n\r\n")
    reply = read_replies(sock, 1)[0]
    assert reply.startswith(b"Failure\r\nid: \r\nmsg: expected 'Orbit 1.0'")
    assert sock.recv(10) == b""


def test_recipients_moved_or_full_are_failures_not_success():
    """`Success` only when the event is stored for every recipient: a route moved away or
    the node's mailboxes full are listed like a recipient with no connection."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from orbited.node.hub import Hub, HubConfig
    from orbited.node.legacy.orbit import OrbitFactory
    from tests.conftest import keys_on_routes

    class Sink:
        def deliver(self, out: list[Frame]) -> bool:
            return True

    hub = Hub(Clock(), HubConfig(mailbox_total_bytes=64), epoch="ep")
    here, away = keys_on_routes([1]) + keys_on_routes([2])
    hub.assign([1])
    hub.attach(here, Sink(), None)
    proto = OrbitFactory(hub).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)

    def orbit(event_id: str, body: bytes, *keys: ConnectionKey) -> bytes:
        transport.clear()
        lines = [b"Orbit 1.0", b"Event", b"id: " + event_id.encode()]
        lines += [f"recipient: {k.user}, {k.session}, {k.location}".encode() for k in keys]
        proto.dataReceived(b"\r\n".join(lines) + b"\r\nlength: %d\r\n\r\n" % len(body) + body)
        return transport.value()

    assert orbit("1", b'"small"', here) == b"Success\r\nid: 1\r\n\r\n"
    moved = orbit("2", b'"small"', here, away)
    assert moved.startswith(b"Failure\r\nid: 2\r\n")
    assert moved.endswith(b"recipient: (%s, s, /t)\r\n\r\n" % away.user.encode())
    assert b"(%s," % here.user.encode() not in moved  # stored for the one served here
    full = orbit("3", b'"' + b"x" * 100 + b'"', here)
    assert full.startswith(b"Failure\r\nid: 3\r\n")
    assert b"recipient: (%s, s, /t)" % here.user.encode() in full


def test_full_send_buffer_stops_reading_requests():
    """Same backpressure as the SP port: the transport pausing us pauses reading."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from orbited.node.hub import Hub, HubConfig
    from orbited.node.legacy.orbit import OrbitFactory

    proto = OrbitFactory(Hub(Clock(), HubConfig())).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    assert transport.producer is proto
    proto.pauseProducing()
    assert transport.producerState == "paused"
    proto.resumeProducing()
    assert transport.producerState == "producing"


@pytest.mark.parametrize(
    "body", [b'"\\ud800"', b'{"a":"x\\udfff"}', b"NaN", b"[1e999]", b"-Infinity"]
)
def test_a_body_that_is_not_strict_json_is_delivered_as_text(body):
    """Lone surrogates, NaN and infinities are not JSON (docs/protocol.md): such a body
    is text like any other non-JSON body, never a "the node failed" and a traceback."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from fuzz.targets import no_logged_failures
    from orbited.node.hub import Hub, HubConfig
    from orbited.node.legacy.orbit import OrbitFactory

    got: list[bytes] = []

    class Sink:
        def deliver(self, out: list[Frame]) -> bool:
            got.extend(f.data for f in out)
            return True

    hub = Hub(Clock(), HubConfig(), epoch="ep")
    key = ConnectionKey("alice", "0", "/chat")
    hub.attach(key, Sink(), None)
    got.clear()
    proto = OrbitFactory(hub).buildProtocol(None)
    transport = StringTransport()
    with no_logged_failures():
        proto.makeConnection(transport)
        proto.dataReceived(b"Orbit 1.0\r\nEvent\r\nid: 1\r\nrecipient: alice, 0, /chat\r\n"
                           b"length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
    assert transport.value() == b"Success\r\nid: 1\r\n\r\n"
    assert [json.loads(frame)["data"] for frame in got] == [body.decode()]


@pytest.mark.slow
def test_a_request_followed_by_fin_is_answered_and_delivered_once(orbit_node: NodeProcess):
    """A client that sends its request and half-closes (shutdown(SHUT_WR)) gets its reply
    before the node closes, 20 times of 20; each event is delivered once. (It got no reply,
    though the event was delivered: a client that resends delivered it twice.)"""
    node = orbit_node
    with node.ws(node.token("finn", "0", "/fin")) as ws:
        ws.recv(timeout=5)
        replies = []
        for i in range(20):
            body = b'"fin %d"' % i
            sock = orbit_socket(node)
            sock.sendall(b"Orbit 1.0\r\nEvent\r\nid: %d\r\nrecipient: finn, 0, /fin\r\n"
                         b"length: %d\r\n\r\n%s" % (i, len(body), body))  # fmt: skip
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            sock.close()
            replies.append(data)
        assert replies == [b"Success\r\nid: %d\r\n\r\n" % i for i in range(20)]
        got = [json.loads(ws.recv(timeout=5))["data"] for _ in range(20)]
        assert got == [f"fin {i}" for i in range(20)]


def test_half_close_answers_pending_replies_then_closes():
    """The listener supports half-close: after the FIN, replies still waiting (a route
    being handed over) are written, then the connection is closed (not aborted)."""
    from twisted.internet import defer
    from twisted.internet.interfaces import IHalfCloseableProtocol
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from orbited.node.events import DispatchResult, EventRequest, RecipientResult, Status
    from orbited.node.hub import Hub, HubConfig
    from orbited.node.legacy.orbit import OrbitFactory

    hub = Hub(Clock(), HubConfig(), epoch="ep")
    waiting: list[defer.Deferred] = []

    def dispatch(request: EventRequest):
        d = defer.Deferred()
        waiting.append(d)
        return d

    hub.dispatch = dispatch  # type: ignore[method-assign]
    queued = DispatchResult("x", (RecipientResult(Status.QUEUED, 1),))
    proto = OrbitFactory(hub).buildProtocol(None)
    assert IHalfCloseableProtocol.providedBy(proto)
    transport = StringTransport()
    proto.makeConnection(transport)
    request = b'Orbit 1.0\r\nEvent\r\nid: %d\r\nrecipient: a, 0, /x\r\nlength: 2\r\n\r\n""'
    proto.dataReceived(request % 1 + request % 2 + request[:20])  # and a partial third
    proto.readConnectionLost()
    assert not transport.disconnecting
    waiting[1].callback(queued)
    assert transport.value() == b"" and not transport.disconnecting  # in request order
    waiting[0].callback(queued)
    assert transport.value() == b"Success\r\nid: 1\r\n\r\nSuccess\r\nid: 2\r\n\r\n"
    assert transport.disconnecting


@pytest.mark.parametrize(
    "head",
    [
        b"Orbit 1.0\r\n" + b"E" * 60_000 + b"\r\nid: 1\r\nlength: 1",
        b"Orbit 1.0\r\nEvent\r\nid: 1\r\nrecipient: " + b"x" * 60_000 + b"\r\nlength: 1",
    ],
)
def test_failure_messages_quote_a_bounded_part_of_the_request(head):
    with pytest.raises(OrbitError) as info:
        OrbitParser(RequestLimits()).feed(head + b"\r\n\r\n")
    assert len(info.value.message) < 200


def test_orbit_events_reach_the_page_with_ids_no_other_node_process_reuses(monkeypatch):
    """Event frames carry the event id and pages drop an id they already delivered
    (docs/protocol.md, "Frames"): the id an Orbit request gets must differ between node
    processes, or a page that moved from one node (or a restarted one) to another would
    drop a new event as a repeat."""
    import itertools

    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from orbited.node.hub import Hub, HubConfig
    from orbited.node.legacy.orbit import OrbitFactory, OrbitProtocol

    key = ConnectionKey("alice", "0", "/chat")

    class Sink:
        def __init__(self) -> None:
            self.frames: list[dict] = []

        def deliver(self, out: list[Frame]) -> bool:
            self.frames += [json.loads(f.data) for f in out]
            return True

    def frame_ids(epoch: str) -> list[str]:
        monkeypatch.setattr(OrbitProtocol, "_serials", itertools.count(1))  # a new process
        hub = Hub(Clock(), HubConfig(), epoch=epoch)
        sink = Sink()
        hub.attach(key, sink, None)
        ids = []
        for _ in range(2):  # two web-app connections, both sending their Orbit id 1
            proto = OrbitFactory(hub).buildProtocol(None)
            proto.makeConnection(StringTransport())
            proto.dataReceived(b"Orbit 1.0\r\nEvent\r\nid: 1\r\nrecipient: alice, 0, /chat\r\n"
                               b"length: 2\r\n\r\nhi")  # fmt: skip
            ids.append(sink.frames[-1]["id"])
        assert sink.frames[-1]["data"] == "hi"
        return ids

    first, restarted = frame_ids("nodeA"), frame_ids("nodeB")
    assert len(set(first + restarted)) == 4, (first, restarted)
