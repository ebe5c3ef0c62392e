"""The hub's typed API: EventRequest in, DispatchResult out, bytes only at the edge
(events.parse_request / encode_reply); frames reach sinks as objects carrying their
position, and SSE writes its ``id:`` lines from them (docs/protocol.md)."""

from __future__ import annotations

import json
import re

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from orbited.core.keys import ConnectionKey
from orbited.core.tokens import issue_token
from orbited.node import events
from orbited.node.events import DispatchResult, RecipientResult, RequestLimits, Status
from orbited.node.frames import Frame
from orbited.node.hub import Hub, HubConfig
from orbited.node.mailbox import MailboxLimits, Position
from orbited.node.transports.common import BrowserAuth
from orbited.node.web import browser_site
from tests.conftest import keys_on_routes

ALICE = ConnectionKey("alice", "s1", "/chat")
BOB = ConnectionKey("bob", "s2", "/chat")


class FrameSink:
    wants_pings = True
    last_write = 0.0

    def __init__(self) -> None:
        self.frames: list[Frame] = []

    def deliver(self, out: list[Frame]) -> bool:
        self.frames += out
        return True

    def replaced(self) -> None:
        pass

    def reconnect(self, reason: str, route: int | None = None, spread=None) -> None:
        pass


def request(event_id: str, keys: list[ConnectionKey], data: object, **extra: object):
    body = json.dumps({"id": event_id, "to": [list(k) for k in keys], "data": data, **extra})
    parsed = events.parse_request(body.encode(), RequestLimits())
    assert isinstance(parsed, events.EventRequest)
    return parsed


def test_the_wire_strings_of_the_statuses_are_unchanged():
    assert [s.value for s in Status] == [
        "delivered", "queued", "no_connection", "moved", "acked", "unacked", "full",
        "matched", "limited", "replaced",
    ]  # fmt: skip
    assert {s for s in Status if s.stored} == {
        Status.DELIVERED, Status.QUEUED, Status.ACKED, Status.UNACKED,
    }  # fmt: skip


def test_dispatch_answers_typed_results_and_encode_reply_the_documented_bytes():
    hub = Hub(Clock(), HubConfig(), epoch="ep")
    hub.attach(ALICE, FrameSink(), None)
    outcome = hub.dispatch(request("e1", [ALICE, BOB, ALICE], {"x": 1}))
    assert isinstance(outcome, DispatchResult)
    assert outcome.event_id == "e1" and not outcome.duplicate
    assert outcome.results == (
        RecipientResult(Status.DELIVERED, 1),
        RecipientResult(Status.NO_CONNECTION),
        RecipientResult(Status.DELIVERED, 1),  # the same key twice: delivered once
    )
    assert events.encode_reply(outcome) == (
        b'{"id":"e1","ok":true,"results":[{"status":"delivered","seq":1},'
        b'{"status":"no_connection"},{"status":"delivered","seq":1}]}'
    )
    # encode_reply without the hub's cached bytes gives the same reply
    fresh = DispatchResult(outcome.event_id, outcome.results)
    assert events.encode_reply(fresh) == events.encode_reply(outcome)


def test_a_resend_gets_the_first_results_marked_duplicate_and_delivers_nothing():
    hub = Hub(Clock(), HubConfig(), epoch="ep")
    sink = FrameSink()
    hub.attach(ALICE, sink, None)
    first = hub.dispatch(request("e1", [ALICE], 1))
    again = hub.dispatch(request("e1", [ALICE], 1))
    assert isinstance(first, DispatchResult) and isinstance(again, DispatchResult)
    assert again.duplicate and again.results == first.results
    assert events.encode_reply(again) == events.encode_reply(first)[:-1] + b',"duplicate":true}'
    assert [f.seq for f in sink.frames if f.seq is not None] == [1]


def test_acknowledged_mode_answers_later_and_a_pending_resend_waits_for_it():
    clock = Clock()
    hub = Hub(clock, HubConfig(), epoch="ep")
    hub.attach(ALICE, FrameSink(), None)
    pending = hub.dispatch(request("e1", [ALICE], 1, ack=5))
    resend = hub.dispatch(request("e1", [ALICE], 1, ack=5))
    assert isinstance(pending, defer.Deferred) and isinstance(resend, defer.Deferred)
    got: list[DispatchResult] = []
    pending.addCallback(got.append)
    resend.addCallback(got.append)
    mailbox = hub.mailbox(ALICE)
    assert mailbox is not None
    hub.ack(ALICE, 1, mailbox.stream)
    assert sorted((r.duplicate, r.results) for r in got) == [
        (False, (RecipientResult(Status.ACKED, 1),)),
        (True, (RecipientResult(Status.ACKED, 1),)),
    ]


def test_a_key_of_a_moved_route_is_answered_moved_with_the_new_owner():
    hub = Hub(Clock(), HubConfig(routes=4), epoch="ep")
    (key,) = keys_on_routes([1], total=4)
    hub.assign([1, 2, 3, 4], 4)
    hub.route_moved({1: "tcp://n2:9000"})
    outcome = hub.dispatch(request("e1", [key], 1))
    assert isinstance(outcome, DispatchResult)
    assert outcome.results == (RecipientResult(Status.MOVED, route=1, to="tcp://n2:9000", hash=2),)
    assert events.encode_reply(outcome).endswith(
        b'[{"status":"moved","route":1,"to":"tcp://n2:9000","hash":2}]}'
    )


def test_event_request_builds_what_parse_request_parses():
    """The Orbit 1.0 front end builds its EventRequest without JSON; it must be the
    request the JSON front ends would have parsed (same payload, same resend digest)."""
    parsed = request("e1", [ALICE, BOB], {"t": "é"})
    built = events.event_request("e1", (ALICE, BOB), {"t": "é"}, RequestLimits())
    assert built == parsed


@pytest.mark.parametrize(
    ("recipients", "data", "code"),
    [
        ((), 1, "bad_request"),
        ((ALICE,) * 3, 1, "too_many_recipients"),
        ((ALICE,), "x" * 100, "payload_too_large"),
        ((ALICE,), float("nan"), "bad_json"),
    ],
)
def test_event_request_refuses_what_parse_request_refuses(recipients, data, code):
    limits = RequestLimits(max_recipients=2, max_payload=50)
    with pytest.raises(events.RequestError) as e:
        events.event_request("e1", recipients, data, limits)
    assert e.value.code == code


def test_decode_reply_reads_back_what_the_dedup_memory_keeps():
    outcome = DispatchResult(
        "e1",
        (RecipientResult(Status.QUEUED, 3, 2), RecipientResult(Status.MOVED, route=2),
         RecipientResult(Status.FULL)),
    )  # fmt: skip
    back = events.decode_reply(events.encode_reply(outcome))
    assert back == outcome._replace(encoded=events.encode_reply(outcome))


def test_event_frames_carry_their_mailbox_position():
    hub = Hub(Clock(), HubConfig(), epoch="ep")
    sink = FrameSink()
    hub.attach(ALICE, sink, None)
    hub.dispatch(request("e1", [ALICE], "a"))
    hub.dispatch(request("e2", [ALICE], "b"))
    replay = FrameSink()
    hub.attach(ALICE, replay, Position("ep.1", 1))  # resumes after the first
    assert [(f.stream, f.seq) for f in sink.frames] == [(None, None), ("ep.1", 1), ("ep.1", 2)]
    assert [(f.stream, f.seq) for f in replay.frames] == [(None, None), ("ep.1", 2)]
    assert json.loads(replay.frames[1].data)["seq"] == 2


def test_sse_writes_each_event_frames_id_from_the_frame():
    """SSE's ``id:`` lines (EventSource's Last-Event-ID) are ``<stream>:<seq>`` of each
    event frame; other frames (hello, gap) carry none."""
    secret = b"s" * 32
    hub = Hub(Clock(), HubConfig(mailbox=MailboxLimits(max_events=2)), epoch="ep")
    site = browser_site(hub, BrowserAuth(secret), [], "t", 1 << 20)
    token = issue_token(secret, ALICE, 60)
    hub.dispatch(request("e0", [ALICE], 0, ack=5))  # a mailbox before the browser comes
    for n in range(1, 4):  # the mailbox keeps 2: event 1 is dropped, a gap on resume
        hub.dispatch(request(f"e{n}", [ALICE], n))
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    head = f"GET /orbited/sse?token={token}&last=ep.1:0 HTTP/1.1\r\nHost: h\r\n\r\n"
    channel.dataReceived(head.encode())
    hub.dispatch(request("e4", [ALICE], 4))
    body = transport.value().partition(b"\r\n\r\n")[2]
    # Each write is one chunk of whole SSE events; frames are one line of JSON.
    found = re.findall(rb"(?:id: (\S+)\n)?data: (\{[^\n]*\})\n\n", body)
    assert [(position, json.loads(data)["type"]) for position, data in found] == [
        (b"", "hello"),
        (b"", "gap"),
        (b"ep.1:3", "event"),
        (b"ep.1:4", "event"),
        (b"ep.1:5", "event"),
    ]
    assert [json.loads(data).get("seq") for _, data in found][2:] == [3, 4, 5]


def test_the_sse_id_line_comes_from_the_frame_object_not_its_bytes():
    """The position is the frame's ``stream`` and ``seq``, whatever the bytes look like
    and whether or not a hello frame came first on this response."""
    from orbited.node.transports.streaming import _SSEStream

    sse = object.__new__(_SSEStream)  # encode reads nothing of the response
    assert sse.encode(Frame(b'{"seq":1,"type":"event"}', 7, "ep.2")) == (
        b'id: ep.2:7\ndata: {"seq":1,"type":"event"}\n\n'
    )
    assert sse.encode(Frame(b'{"type":"gap","from":1,"to":2}')) == (
        b'data: {"type":"gap","from":1,"to":2}\n\n'
    )
