"""The web-app clients' OpenTelemetry spans (orbited/client/otel.py; docs/client-python.md,
"OpenTelemetry"): the real SDK (in-memory exporter), the clients over TCP to nng's own
REP (pynng) in front of an in-process node core whose OTel observer records its spans,
so the node's dispatch span is checked as the child of the client's send span."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
pynng = pytest.importorskip("pynng")

import pytest_twisted  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402
from twisted.internet import reactor, threads  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from orbited.client import BlockingClient, Cluster, HaloDCluster, Node  # noqa: E402
from orbited.client.otel import ClientTracing  # noqa: E402
from orbited.client.twisted import TwistedClient  # noqa: E402
from orbited.core.hashing import route_of  # noqa: E402
from orbited.core.keys import ConnectionKey  # noqa: E402
from orbited.core.tracecontext import parse_traceparent  # noqa: E402
from orbited.node import events  # noqa: E402
from orbited.node.hub import Hub, HubConfig  # noqa: E402
from orbited.node.otel import OtelConfig, observer  # noqa: E402
from tests.node.test_hub import RecordingSink  # noqa: E402

ALICE = ConnectionKey("alice", "s1", "/chat")
ROUTES = 24
ROUTE = route_of(ALICE, ROUTES, 2)


class Sink(RecordingSink):
    kind = "ws"


class NodeCore:
    """nng's REP on a loopback port in a thread, answering with a node core (Hub) that
    has an OTel observer. ``drop``: requests to answer by closing their connection
    instead; ``ignore``: requests to leave unanswered (the client times out); ``moved``:
    requests to answer ``moved`` for every recipient (the route went to another node)."""

    def __init__(self, drop: int = 0, ignore: int = 0, moved: int = 0) -> None:
        clock = Clock()
        clock.advance(1_796_540_400)
        self.hub = Hub(clock, HubConfig(), epoch="ep")
        self.exporter = InMemorySpanExporter()
        self.otel = observer(OtelConfig(), "n1", self.exporter)
        self.hub.observe(self.otel)
        self.sink = Sink()
        self.hub.attach(ALICE, self.sink, None)
        self.bodies: list[bytes] = []
        self.drop, self.ignore, self.moved = drop, ignore, moved
        self.rep = pynng.Rep0(listen="tcp://127.0.0.1:0", recv_timeout=100)
        host, _, port = str(self.rep.listeners[0].local_address).rpartition(":")
        self.address = f"tcp://{host}:{port}"
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                msg = self.rep.recv_msg()
            except pynng.Timeout:
                continue
            except pynng.Closed:
                return
            self.bodies.append(msg.bytes)
            if self.drop:
                self.drop -= 1
                msg.pipe.close()
                continue
            if self.ignore:
                self.ignore -= 1
                continue
            if self.moved:
                self.moved -= 1
                request = json.loads(msg.bytes)
                moved = events.moved_result(ROUTE, None, 2)
                self.rep.send(events.ok_reply(request["id"], [moved] * len(request["to"])))
                continue
            reply = self.hub.handle_request(msg.bytes)
            assert isinstance(reply, bytes)
            self.rep.send(reply)

    def close(self) -> None:
        self.running = False
        self.rep.close()
        self.thread.join(5)
        self.otel.shutdown()

    def cluster(self) -> Cluster:
        return Cluster([Node(self.address, "http://127.0.0.1:1")])

    def halod_cluster(self) -> HaloDCluster:
        """HaloD's route ports, ALICE's route leading here."""
        port = int(self.address.rpartition(":")[2])
        return HaloDCluster("127.0.0.1", port - ROUTE + 1, 1000, routes=ROUTES)

    def dispatches(self) -> list[Any]:
        return [s for s in self.exporter.get_finished_spans() if s.name == "orbited.dispatch"]


@pytest.fixture
def app_tracing() -> Iterator[tuple[ClientTracing, InMemorySpanExporter, Any]]:
    """The web app's own tracer provider, as its OTel setup would make it."""
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield ClientTracing(provider), exporter, provider.get_tracer("webapp")
    provider.shutdown()


def send_spans(exporter: InMemorySpanExporter) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.name == "orbited.send"]


def check_linked(node: NodeCore, send_span: Any, parent_span_id: int) -> None:
    """The send span is the web app's span's child; the node's dispatch spans are the
    send span's children, and every request carried its traceparent, byte for byte."""
    assert send_span.kind == SpanKind.CLIENT
    assert send_span.parent.span_id == parent_span_id
    context = send_span.context
    for body in node.bodies:
        parent = parse_traceparent(json.loads(body)["traceparent"])
        assert parent is not None and parent.sampled
        assert (int(parent.trace_id, 16), int(parent.span_id, 16)) == (
            context.trace_id, context.span_id,
        )  # fmt: skip
    for dispatch in node.dispatches():
        assert dispatch.context.trace_id == context.trace_id
        assert dispatch.parent.span_id == context.span_id


def test_a_blocking_send_is_a_span_the_node_continues(app_tracing):
    tracing, exporter, webapp = app_tracing
    node = NodeCore()
    try:
        with BlockingClient(node.cluster(), otel=tracing) as client:
            with webapp.start_as_current_span("GET /chat") as request_span:
                results = client.send([ALICE], {"text": "hi"}, event_id="42")
        assert results == {ALICE: {"status": "delivered", "seq": 1}}
        (span,) = send_spans(exporter)
        check_linked(node, span, request_span.get_span_context().span_id)
        assert dict(span.attributes) == {
            "orbited.event_id": "42", "orbited.recipients": 1, "orbited.routes": 1,
            "orbited.status.delivered": 1,
        }  # fmt: skip
        assert span.status.status_code == StatusCode.UNSET and span.events == ()
        (dispatch,) = node.dispatches()
        assert dispatch.attributes["orbited.event_id"] == "42"
    finally:
        node.close()


@pytest.mark.parametrize("failure, reason", [("drop", "connection_lost"), ("ignore", "timeout")])
def test_a_blocking_resend_carries_the_same_bytes(app_tracing, failure, reason):
    tracing, exporter, webapp = app_tracing
    node = NodeCore(**{failure: 1})
    try:
        client = BlockingClient(node.cluster(), timeout=0.5, backoff=0.01, otel=tracing)
        with client, webapp.start_as_current_span("job") as job:
            results = client.send([ALICE], {"text": "again"}, event_id="43")
        assert results == {ALICE: {"status": "delivered", "seq": 1}}
        first, resent = node.bodies
        assert first == resent
        (span,) = send_spans(exporter)
        check_linked(node, span, job.get_span_context().span_id)
        assert [(e.name, e.attributes["reason"]) for e in span.events] == [("resend", reason)]
    finally:
        node.close()


def test_an_error_reply_is_an_error_status(app_tracing):
    tracing, exporter, _ = app_tracing
    node = NodeCore()
    try:
        with BlockingClient(node.cluster(), otel=tracing) as client:
            results = client.send([ALICE], "x" * 70_000, event_id="big")
        assert results[ALICE]["code"] == "payload_too_large"
        (span,) = send_spans(exporter)
        assert span.status.status_code == StatusCode.ERROR
        assert span.status.description == "payload_too_large"
        assert span.attributes["orbited.status.error"] == 1
        assert node.dispatches() == []  # refused before dispatch
    finally:
        node.close()


@pytest.mark.parametrize("client_class", [BlockingClient, TwistedClient])
def test_a_send_that_raises_on_a_recipient_ends_its_span_with_the_error(app_tracing, client_class):
    """docs/client-python.md: a send that raises ends its span with the exception
    recorded; a bad recipient raises before anything is sent."""
    tracing, exporter, _ = app_tracing
    client = client_class(Cluster([Node("tcp://127.0.0.1:1", "http://127.0.0.1:1")]),
                          otel=tracing)  # fmt: skip
    if client_class is BlockingClient:
        with pytest.raises(ValueError):
            client.send([["*", "*", "*"]], 1, event_id="bad")
    else:  # the Deferred has failed already
        failed: list[Any] = []
        client.send([["*", "*", "*"]], 1, event_id="bad").addErrback(failed.append)
        assert len(failed) == 1 and failed[0].check(ValueError)
    (span,) = send_spans(exporter)
    assert span.status.status_code == StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]
    client.close()


def test_without_otel_no_trace_context_is_sent(app_tracing):
    _, exporter, webapp = app_tracing
    node = NodeCore()
    try:
        with BlockingClient(node.cluster()) as client, webapp.start_as_current_span("GET /"):
            client.send([ALICE], 1, event_id="44")
        assert "traceparent" not in json.loads(node.bodies[0])
        assert send_spans(exporter) == [] and node.dispatches() == []
    finally:
        node.close()


@pytest.mark.parametrize("failure, reason", [("drop", "connection_lost"), ("ignore", "timeout")])
@pytest_twisted.inlineCallbacks
def test_a_twisted_send_is_a_span_the_node_continues_through_a_resend(app_tracing, failure, reason):
    tracing, exporter, webapp = app_tracing
    node = NodeCore(**{failure: 1})
    client = TwistedClient(node.cluster(), reactor, timeout=0.5, backoff=0.01, otel=tracing)
    try:
        with webapp.start_as_current_span("GET /chat") as request_span:
            results = yield client.send([ALICE], {"via": "twisted"}, event_id="45")
        assert results == {ALICE: {"status": "delivered", "seq": 1}}
        first, resent = node.bodies
        assert first == resent
        (span,) = send_spans(exporter)
        check_linked(node, span, request_span.get_span_context().span_id)
        assert [(e.name, e.attributes["reason"]) for e in span.events] == [("resend", reason)]
        assert span.attributes["orbited.status.delivered"] == 1
    finally:
        client.close()
        yield threads.deferToThread(node.close)


def test_otel_without_the_packages_says_what_to_install(monkeypatch):
    import sys

    for name in list(sys.modules):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import fails
    cluster = Cluster([Node("tcp://127.0.0.1:9", "http://127.0.0.1:1")])
    with pytest.raises(ImportError) as e:
        BlockingClient(cluster, otel=True)
    assert str(e.value) == "otel=True needs OpenTelemetry: pip install 'orbited[otel]'"
    BlockingClient(cluster).close()  # without otel: no import


def test_a_moved_answer_is_resent_with_the_same_bytes_and_said_why(app_tracing):
    tracing, exporter, _ = app_tracing
    node = NodeCore(moved=1)
    try:
        with BlockingClient(node.halod_cluster(), backoff=0.01, otel=tracing) as client:
            results = client.send([ALICE], {"text": "moved"}, event_id="46")
        assert results == {ALICE: {"status": "delivered", "seq": 1}}
        first, resent = node.bodies
        assert first == resent and "traceparent" in json.loads(first)
        (span,) = send_spans(exporter)
        assert [(e.name, e.attributes["reason"]) for e in span.events] == [("resend", "moved")]
    finally:
        node.close()


@pytest_twisted.inlineCallbacks
def test_a_twisted_moved_answer_is_resent_and_said_why(app_tracing):
    tracing, exporter, _ = app_tracing
    node = NodeCore(moved=1)
    client = TwistedClient(node.halod_cluster(), reactor, backoff=0.01, otel=tracing)
    try:
        results = yield client.send([ALICE], {"text": "moved"}, event_id="47")
        assert results == {ALICE: {"status": "delivered", "seq": 1}}
        first, resent = node.bodies
        assert first == resent
        (span,) = send_spans(exporter)
        assert [(e.name, e.attributes["reason"]) for e in span.events] == [("resend", "moved")]
    finally:
        client.close()
        yield threads.deferToThread(node.close)
