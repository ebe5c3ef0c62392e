"""OpenTelemetry spans of deliveries (orbited/node/otel.py; docs/operations.md,
"OpenTelemetry"): the real SDK with its in-memory exporter. The observer is driven with
the calls the hub makes (orbited/node/observe.py) and, further down, by a real Hub."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind  # noqa: E402

from orbited.core.keys import ConnectionKey  # noqa: E402
from orbited.core.settings import ConfigError  # noqa: E402
from orbited.node import events  # noqa: E402
from orbited.node.events import DispatchResult, RecipientResult, Status  # noqa: E402
from orbited.node.otel import OtelConfig, OtelObserver, build, observer  # noqa: E402

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
PARENT = f"00-{TRACE}-{PARENT_SPAN}-01"
ALICE = ConnectionKey("alice", "s1", "/chat")
BOB = ConnectionKey("bob", "s2", "/chat")
T0 = 1_796_540_400.0


def request(
    keys: tuple[ConnectionKey, ...] = (ALICE,), traceparent: str | None = PARENT, **extra: object
) -> events.EventRequest:
    doc: dict[str, object] = {"id": "42", "to": [list(k) for k in keys], "data": {"t": 1}}
    if traceparent is not None:
        doc["traceparent"] = traceparent
    doc.update(extra)
    parsed = events.parse_request(json.dumps(doc).encode(), events.RequestLimits())
    assert isinstance(parsed, events.EventRequest)
    return parsed


def make(**config: object) -> tuple[OtelObserver, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return observer(OtelConfig(**config), "n1", exporter), exporter  # type: ignore[arg-type]


def spans(exporter: InMemorySpanExporter, name: str) -> list:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def one(exporter: InMemorySpanExporter, name: str):  # noqa: ANN201
    found = spans(exporter, name)
    assert len(found) == 1, [s.name for s in exporter.get_finished_spans()]
    return found[0]


def ns(t: float) -> int:
    return int(t * 1e9)


def ok(*statuses: Status, seq: int = 7, duplicate: bool = False) -> DispatchResult:
    return DispatchResult("42", tuple(RecipientResult(s, seq) for s in statuses), duplicate)


def test_the_dispatch_span_continues_the_web_apps_trace():
    obs, exporter = make()
    req = request(tracestate="rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    token = obs.dispatched(req, T0)
    obs.recipient(token, ALICE, 13, "delivered", 7, "ep.1", 0, "ws", T0 + 0.001)
    obs.answered(token, ok(Status.DELIVERED), T0 + 0.002)
    dispatch = one(exporter, "orbited.dispatch")
    assert dispatch.kind == SpanKind.SERVER
    assert dispatch.context.trace_id == int(TRACE, 16)
    assert dispatch.parent.span_id == int(PARENT_SPAN, 16) and dispatch.parent.is_remote
    assert dispatch.context.trace_state.get("congo") == "t61rcWkgMzE"
    assert (dispatch.start_time, dispatch.end_time) == (ns(T0), ns(T0 + 0.002))
    assert dict(dispatch.attributes) == {
        "orbited.event_id": "42", "orbited.request": req.digest[:8].hex(),
        "orbited.recipients": 1, "orbited.node": "n1", "orbited.status.delivered": 1,
    }  # fmt: skip
    assert dispatch.resource.attributes["service.name"] == "orbited"
    assert dispatch.resource.attributes["service.instance.id"] == "n1"
    deliver = one(exporter, "orbited.deliver")
    assert deliver.kind == SpanKind.INTERNAL
    assert deliver.parent.span_id == dispatch.context.span_id
    assert deliver.context.trace_id == int(TRACE, 16)
    assert deliver.attributes["orbited.route"] == 13
    assert deliver.attributes["orbited.seq"] == 7
    assert deliver.attributes["orbited.status"] == "delivered"
    assert deliver.attributes["orbited.transport"] == "ws"
    assert [(e.name, e.timestamp) for e in deliver.events] == [("written", ns(T0 + 0.001))]


def test_the_key_is_a_digest_unless_key_attributes_is_on():
    for key_attributes in (False, True):
        obs, exporter = make(key_attributes=key_attributes)
        token = obs.dispatched(request(), T0)
        obs.recipient(token, ALICE, 13, "queued", 7, "ep.1", 0, None, T0)
        obs.answered(token, ok(Status.QUEUED), T0)
        attributes = one(exporter, "orbited.deliver").attributes
        values = [str(v) for v in attributes.values()]
        if key_attributes:
            assert attributes["orbited.key.user"] == "alice"
            assert attributes["orbited.key.session"] == "s1"
            assert attributes["orbited.key.location"] == "/chat"
        else:
            assert "alice" not in values and "s1" not in values
            assert len(attributes["orbited.key.digest"]) == 16
            other, _ = make()
            assert attributes["orbited.key.digest"] != _digest_of(other, BOB)


def _digest_of(obs: OtelObserver, key: ConnectionKey) -> str:
    attributes: dict[str, object] = {}
    obs._key_attributes(key, attributes)
    return str(attributes["orbited.key.digest"])


def test_the_ack_span_runs_from_the_write_to_the_browsers_ack():
    obs, exporter = make()
    token = obs.dispatched(request(), T0)
    obs.recipient(token, ALICE, 13, "delivered", 7, "ep.1", 0, "sse", T0)
    obs.answered(token, ok(Status.DELIVERED), T0)
    assert spans(exporter, "orbited.ack") == [] and obs.pending_acks == 1
    obs.acked(ALICE, "ep.1", 6, T0 + 0.5)  # an earlier event: not this one
    obs.acked(ALICE, "ep.0", 9, T0 + 0.6)  # another stream
    assert obs.pending_acks == 1
    obs.acked(ALICE, "ep.1", 8, T0 + 1.25)
    ack = one(exporter, "orbited.ack")
    assert ack.parent.span_id == one(exporter, "orbited.deliver").context.span_id
    assert (ack.start_time, ack.end_time) == (ns(T0), ns(T0 + 1.25))
    assert ack.attributes["orbited.ack.outcome"] == "acked"
    assert ack.attributes["orbited.transport"] == "sse"
    assert ack.attributes["orbited.replay"] is False
    assert obs.pending_acks == 0


def test_a_queued_event_is_timed_from_its_replay():
    obs, exporter = make()
    token = obs.dispatched(request(), T0)
    obs.recipient(token, ALICE, 13, "queued", 7, "ep.1", 0, None, T0)
    obs.answered(token, ok(Status.QUEUED), T0)
    deliver = one(exporter, "orbited.deliver")
    assert deliver.attributes["orbited.status"] == "queued" and deliver.events == ()
    assert deliver.end_time == ns(T0)
    obs.written(ALICE, "ep.1", 5, 7, "poll", T0 + 3)
    obs.written(ALICE, "ep.1", 7, 7, "ws", T0 + 4)  # its transport went away: again
    obs.acked(ALICE, "ep.1", 7, T0 + 4.5)
    ack = one(exporter, "orbited.ack")
    assert (ack.start_time, ack.end_time) == (ns(T0 + 3), ns(T0 + 4.5))
    assert ack.attributes["orbited.transport"] == "poll"
    assert ack.attributes["orbited.replay"] is True
    assert [(e.name, e.attributes["orbited.transport"]) for e in ack.events] == [
        ("rewritten", "ws")
    ]


def test_an_ack_of_an_event_never_seen_written_leaves_no_span():
    obs, exporter = make()
    token = obs.dispatched(request(), T0)
    obs.recipient(token, ALICE, 13, "queued", 7, "ep.1", 0, None, T0)
    obs.answered(token, ok(Status.QUEUED), T0)
    obs.acked(ALICE, "ep.1", 9, T0 + 1)
    assert spans(exporter, "orbited.ack") == [] and obs.pending_acks == 0


@pytest.mark.parametrize(
    "what, detail, outcome",
    [
        ("expired", {"undelivered": 1}, "expired"),
        ("moved", {"route": 13, "to": None, "handed": False}, "moved"),
        ("moved", {"route": 13, "to": "tcp://127.0.0.1:9", "handed": True}, "handed_over"),
    ],
)
def test_an_ack_that_cannot_come_ends_with_why(what, detail, outcome):
    obs, exporter = make()
    token = obs.dispatched(request((ALICE, BOB)), T0)
    obs.recipient(token, ALICE, 13, "delivered", 7, "ep.1", 0, "ws", T0)
    obs.recipient(token, BOB, 14, "queued", 3, "ep.2", 0, None, T0)
    obs.answered(token, ok(Status.DELIVERED, Status.QUEUED), T0)
    obs.noted(ALICE, "detach", T0 + 1, reason="closed")  # not an outcome
    assert obs.pending_acks == 2
    obs.noted(ALICE, what, T0 + 2, **detail)
    ack = one(exporter, "orbited.ack")
    assert ack.attributes["orbited.ack.outcome"] == outcome and ack.end_time == ns(T0 + 2)
    obs.noted(BOB, what, T0 + 2, **detail)  # never written: no span, nothing kept
    assert len(spans(exporter, "orbited.ack")) == 1 and obs.pending_acks == 0


def test_acknowledged_mode_ends_the_acks_the_reply_went_without():
    obs, exporter = make()
    token = obs.dispatched(request((ALICE, BOB), ack=2), T0)
    obs.recipient(token, ALICE, 13, "delivered", 7, "ep.1", 0, "ws", T0)
    obs.recipient(token, BOB, 14, "delivered", 3, "ep.2", 0, "ws", T0)
    obs.acked(ALICE, "ep.1", 7, T0 + 0.2)
    obs.answered(token, ok(Status.ACKED, Status.UNACKED), T0 + 2)
    by_outcome = {s.attributes["orbited.ack.outcome"]: s for s in spans(exporter, "orbited.ack")}
    assert by_outcome["acked"].end_time == ns(T0 + 0.2)
    assert by_outcome["timeout"].end_time == ns(T0 + 2)
    assert obs.pending_acks == 0
    dispatch = one(exporter, "orbited.dispatch")
    assert dispatch.attributes["orbited.ack_wait"] == 2.0
    assert dispatch.attributes["orbited.status.acked"] == 1
    assert dispatch.attributes["orbited.status.unacked"] == 1
    assert "orbited.status.delivered" not in dispatch.attributes


def test_recipient_spans_are_capped_and_the_rest_counted():
    obs, exporter = make(recipient_spans=2)
    keys = [ConnectionKey(f"u{i}", "s", "/") for i in range(5)]
    token = obs.dispatched(request(tuple(keys)), T0)
    for i, key in enumerate(keys):
        status = "delivered" if i % 2 else "no_connection"
        obs.recipient(token, key, 1, status, 1 if i % 2 else None, "e" if i % 2 else None, 0,
                      "ws" if i % 2 else None, T0)  # fmt: skip
    obs.answered(token, ok(*[Status.DELIVERED] * 5), T0)
    assert len(spans(exporter, "orbited.deliver")) == 2
    dispatch = one(exporter, "orbited.dispatch")
    assert dispatch.attributes["orbited.status.delivered"] == 2
    assert dispatch.attributes["orbited.status.no_connection"] == 3
    assert dispatch.attributes["orbited.recipients"] == 5


def test_open_acks_are_capped_node_wide():
    obs, exporter = make(pending_acks=2)
    for i in range(3):
        token = obs.dispatched(request(), T0)
        obs.recipient(token, ALICE, 13, "delivered", i, "ep.1", 0, "ws", T0)
        obs.answered(token, ok(Status.DELIVERED), T0)
    assert (obs.pending_acks, obs.untracked_acks) == (2, 1)
    obs.acked(ALICE, "ep.1", 5, T0 + 1)
    assert len(spans(exporter, "orbited.ack")) == 2 and obs.pending_acks == 0


def test_an_unsampled_parent_is_followed_not_traced():
    obs, exporter = make(sample=1.0)
    token = obs.dispatched(request(traceparent=f"00-{TRACE}-{PARENT_SPAN}-00"), T0)
    assert token is None
    obs.recipient(token, ALICE, 13, "delivered", 7, "ep.1", 0, "ws", T0)
    obs.answered(token, ok(Status.DELIVERED), T0)
    assert exporter.get_finished_spans() == () and obs.pending_acks == 0


def test_without_a_traceparent_the_sample_ratio_decides():
    obs, exporter = make(sample=0.0)
    assert obs.dispatched(request(traceparent=None), T0) is None
    obs, exporter = make(sample=1.0)
    token = obs.dispatched(request(traceparent=None), T0)
    obs.answered(token, ok(Status.QUEUED), T0)
    dispatch = one(exporter, "orbited.dispatch")
    assert dispatch.parent is None  # a new trace


@pytest.mark.parametrize(
    "value", ["", "garbage", PARENT.upper(), f"00-{'0' * 32}-{PARENT_SPAN}-01"]
)
def test_a_malformed_traceparent_is_ignored_and_counted(value):
    obs, exporter = make(sample=0.0)
    assert obs.dispatched(request(traceparent=value), T0) is None
    assert obs.bad_traceparent == 1
    obs, exporter = make(sample=1.0)  # then it is a request without one
    token = obs.dispatched(request(traceparent=value, tracestate="a=b"), T0)
    obs.answered(token, ok(Status.QUEUED), T0)
    assert one(exporter, "orbited.dispatch").parent is None


def test_a_malformed_tracestate_is_dropped_the_parent_kept():
    obs, exporter = make()
    token = obs.dispatched(request(tracestate="Not A State"), T0)
    obs.answered(token, ok(Status.QUEUED), T0)
    dispatch = one(exporter, "orbited.dispatch")
    assert dispatch.parent.span_id == int(PARENT_SPAN, 16)
    assert len(dispatch.context.trace_state) == 0


def test_a_resend_is_marked_duplicate():
    obs, exporter = make()
    token = obs.dispatched(request(), T0)
    obs.answered(token, ok(Status.DELIVERED, duplicate=True), T0)
    assert one(exporter, "orbited.dispatch").attributes["orbited.duplicate"] is True


def test_a_held_key_is_counted_when_its_delivery_runs():
    obs, exporter = make()
    token = obs.dispatched(request(), T0)
    obs.recipient(token, ALICE, 13, "held", None, None, 0, None, T0)
    obs.recipient(token, ALICE, 13, "delivered", 4, "ep.1", 0, "ws", T0 + 0.05)
    obs.answered(token, ok(Status.DELIVERED), T0 + 0.05)
    deliver = one(exporter, "orbited.deliver")
    assert deliver.start_time == ns(T0 + 0.05)
    assert one(exporter, "orbited.dispatch").attributes["orbited.status.held"] == 1


def test_config_limits():
    for bad in ({"sample": 1.5}, {"sample": -0.1}, {"recipient_spans": -1},
                {"pending_acks": -1}, {"exporter": "jaeger"}):  # fmt: skip
        with pytest.raises(ConfigError):
            OtelConfig(**bad)  # type: ignore[arg-type]


class _NodeConfig:
    otel = True
    otel_sample = 1.0
    otel_recipient_spans = 10
    otel_pending_acks = 100
    otel_key_attributes = False
    otel_exporter = "memory"


def test_build_from_the_node_config(monkeypatch):
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "push-eu")
    obs = build(_NodeConfig(), "n7")
    assert obs is not None and isinstance(obs.exporter, InMemorySpanExporter)
    token = obs.dispatched(request(traceparent=None), T0)
    obs.answered(token, ok(Status.QUEUED), T0)
    dispatch = one(obs.exporter, "orbited.dispatch")
    assert dispatch.resource.attributes["service.name"] == "push-eu"
    assert dispatch.attributes["orbited.node"] == "n7"
    obs.shutdown()


def test_build_is_none_when_off_or_disabled(monkeypatch):
    off = _NodeConfig()
    off.otel = False
    assert build(off, "n1") is None
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert build(_NodeConfig(), "n1") is None


def test_without_the_packages_the_config_error_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    for name in list(sys.modules):
        if name.startswith("opentelemetry.sdk"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk", None)  # import fails
    with pytest.raises(ConfigError) as e:
        build(_NodeConfig(), "n1")
    assert str(e.value) == "otel: install orbited[otel] (pip install 'orbited[otel]')"


# -- through a real Hub (its observer hooks, a Clock) -----------------------------------

from typing import Any  # noqa: E402

from twisted.internet.task import Clock  # noqa: E402
from twisted.web.test.requesthelper import DummyRequest  # noqa: E402

from orbited.core.hashing import route_of  # noqa: E402
from orbited.node.hub import Hub, HubConfig  # noqa: E402
from orbited.node.mailbox import Position  # noqa: E402
from orbited.node.observe import build_observer  # noqa: E402
from orbited.node.publish import PublishResource  # noqa: E402
from orbited.node.trace import TraceConfig, Tracer  # noqa: E402
from tests.node.test_hub import RecordingSink  # noqa: E402


class Sink(RecordingSink):
    kind = "ws"


def otel_hub(**config: object) -> tuple[Hub, Clock, OtelObserver, InMemorySpanExporter]:
    clock = Clock()
    clock.advance(T0)
    hub = Hub(clock, HubConfig(), epoch="ep")
    obs, exporter = make(**config)
    hub.observe(build_observer(None, obs))
    return hub, clock, obs, exporter


def send(hub: Hub, keys: tuple[ConnectionKey, ...] = (ALICE,), **fields: Any) -> Any:
    body = {"id": "42", "to": [list(k) for k in keys], "data": {"n": 1}, **fields}
    out = hub.handle_request(json.dumps(body).encode())
    if isinstance(out, bytes):
        return json.loads(out)
    got: list[Any] = []
    out.addCallback(lambda b: got.append(json.loads(b)))
    return got


def test_a_hub_dispatch_writes_and_the_ack_end_the_spans():
    hub, clock, obs, exporter = otel_hub()
    hub.attach(ALICE, Sink(), None)
    clock.advance(1)
    reply = send(hub, traceparent=PARENT)
    assert reply["results"] == [{"status": "delivered", "seq": 1}]
    dispatch = one(exporter, "orbited.dispatch")
    assert dispatch.parent.span_id == int(PARENT_SPAN, 16)
    assert dispatch.attributes["orbited.status.delivered"] == 1
    deliver = one(exporter, "orbited.deliver")
    assert deliver.attributes["orbited.route"] == route_of(ALICE, hub.routes, hub.hash_version)
    assert deliver.attributes["orbited.transport"] == "ws"
    assert deliver.attributes["orbited.stream"] == hub.mailbox(ALICE).stream
    clock.advance(0.25)
    hub.ack(ALICE, 1)
    ack = one(exporter, "orbited.ack")
    assert ack.end_time - ack.start_time == pytest.approx(250_000_000, abs=10_000)
    assert ack.attributes["orbited.ack.outcome"] == "acked"


def test_a_queued_event_is_acked_after_the_browser_comes_back():
    hub, clock, obs, exporter = otel_hub()
    first = Sink()
    hub.attach(ALICE, first, None)
    stream = hub.mailbox(ALICE).stream
    hub.detach(ALICE, first)
    assert send(hub, traceparent=PARENT)["results"] == [{"status": "queued", "seq": 1}]
    clock.advance(2)
    hub.attach(ALICE, Sink(), Position(stream, 0))  # replays seq 1
    clock.advance(0.5)
    hub.ack(ALICE, 1)
    ack = one(exporter, "orbited.ack")
    assert ack.start_time == pytest.approx(ns(T0 + 2), abs=10_000)
    assert ack.end_time == pytest.approx(ns(T0 + 2.5), abs=10_000)
    assert ack.attributes["orbited.replay"] is True


def test_a_resend_with_another_traceparent_is_still_a_duplicate():
    """The trace context is not in the dedup digest: the resend is answered, not
    delivered again, and its span says duplicate."""
    hub, _, obs, exporter = otel_hub()
    sink = Sink()
    hub.attach(ALICE, sink, None)
    send(hub, traceparent=PARENT)
    other = f"00-{TRACE}-b7ad6b7169203331-01"
    again = send(hub, traceparent=other, tracestate="a=b")
    assert again["duplicate"] is True and again["results"] == [{"status": "delivered", "seq": 1}]
    assert sink.events() == [(1, {"n": 1})]
    first, resend = sorted(spans(exporter, "orbited.dispatch"), key=lambda s: s.start_time)
    assert "orbited.duplicate" not in first.attributes
    assert resend.attributes["orbited.duplicate"] is True
    assert resend.parent.span_id == 0xB7AD6B7169203331
    assert len(spans(exporter, "orbited.deliver")) == 1


def test_acknowledged_mode_on_a_hub():
    hub, clock, obs, exporter = otel_hub()
    hub.attach(ALICE, Sink(), None)
    hub.attach(BOB, Sink(), None)
    got = send(hub, (ALICE, BOB), ack=5, traceparent=PARENT)
    clock.advance(0.1)
    hub.ack(ALICE, 1)
    assert spans(exporter, "orbited.dispatch") == []  # the reply waits for bob
    clock.advance(5)
    assert [r["status"] for r in got[0]["results"]] == ["acked", "unacked"]
    dispatch = one(exporter, "orbited.dispatch")
    assert dispatch.end_time == pytest.approx(ns(T0 + 5.1), abs=10_000)  # the wait ended
    assert (dispatch.attributes["orbited.status.acked"],
            dispatch.attributes["orbited.status.unacked"]) == (1, 1)  # fmt: skip
    outcomes = sorted(s.attributes["orbited.ack.outcome"] for s in spans(exporter, "orbited.ack"))
    assert outcomes == ["acked", "timeout"] and obs.pending_acks == 0


def test_an_expired_mailbox_ends_its_acks():
    clock = Clock()
    clock.advance(T0)
    hub = Hub(clock, HubConfig(linger=5), epoch="ep")
    obs, exporter = make()
    hub.observe(build_observer(None, obs))
    sink = Sink()
    hub.attach(ALICE, sink, None)
    send(hub, traceparent=PARENT)
    hub.detach(ALICE, sink)
    clock.advance(6)
    ack = one(exporter, "orbited.ack")
    assert ack.attributes["orbited.ack.outcome"] == "expired" and obs.pending_acks == 0


def test_with_the_delivery_tracer_too_both_see_the_request():
    clock = Clock()
    clock.advance(T0)
    hub = Hub(clock, HubConfig(), epoch="ep")
    obs, exporter = make()
    tracer = Tracer(TraceConfig(), "n1")
    hub.observe(build_observer(tracer, obs), tracer)
    hub.attach(ALICE, Sink(), None)
    send(hub, traceparent=PARENT)
    (key,) = hub.trace_answer("alice")["keys"]
    (record,) = key["dispatches"]
    assert record["trace_id"] == TRACE  # orbited trace names the OTel trace
    assert one(exporter, "orbited.dispatch").context.trace_id == int(TRACE, 16)


def publish(hub: Hub, body: dict[str, Any], headers: dict[bytes, list[bytes]]) -> DummyRequest:
    request = DummyRequest([b"publish"])
    request.method = b"POST"
    key = b"k" * 32
    request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + key])
    for name, values in headers.items():
        request.requestHeaders.setRawHeaders(name, values)
    from io import BytesIO

    request.content = BytesIO(json.dumps(body).encode())
    out = PublishResource(hub, key, 100_000).render_POST(request)
    assert json.loads(out)["ok"] is True
    return request


def test_the_publish_api_takes_the_trace_context_headers():
    hub, _, obs, exporter = otel_hub()
    body = {"id": "p1", "to": [list(ALICE)], "data": 1}
    publish(hub, body, {b"traceparent": [PARENT.encode()], b"tracestate": [b"a=1", b"b=2"]})
    dispatch = one(exporter, "orbited.dispatch")
    assert dispatch.parent.span_id == int(PARENT_SPAN, 16)
    assert list(dispatch.context.trace_state.items()) == [("a", "1"), ("b", "2")]


def test_the_publish_body_wins_over_the_headers():
    hub, _, obs, exporter = otel_hub()
    other = f"00-{TRACE}-b7ad6b7169203331-01"
    body = {"id": "p2", "to": [list(ALICE)], "data": 1, "traceparent": other}
    publish(hub, body, {b"traceparent": [PARENT.encode()]})
    assert one(exporter, "orbited.dispatch").parent.span_id == 0xB7AD6B7169203331


def test_a_key_with_a_lone_surrogate_does_not_break_the_observer():
    """Observers must not raise (the hub does not guard them); key parts are any text."""
    obs, exporter = make()
    odd = ConnectionKey("al\ud800ice", "s", "/")
    token = obs.dispatched(request(), T0)
    obs.recipient(token, odd, 1, "queued", 1, "ep.1", 0, None, T0)
    obs.answered(token, ok(Status.QUEUED), T0)
    assert len(one(exporter, "orbited.deliver").attributes["orbited.key.digest"]) == 16
