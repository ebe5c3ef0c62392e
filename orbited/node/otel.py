"""OpenTelemetry spans for deliveries: a DeliveryObserver (orbited.node.observe).

On when the node's ``otel`` key is true (it needs ``pip install 'orbited[otel]'``). The
web app's span context comes in the event request's ``traceparent``/``tracestate``
(orbited.core.tracecontext); for each request the node then records (docs/operations.md,
"OpenTelemetry"):

- ``orbited.dispatch`` (SERVER, child of the web app's span): from the request's dispatch
  to its reply (at once, or when the acknowledged mode's or a hand-off's wait ends), with
  the event id, the request digest, the recipient count, a count per status and whether
  it was a resend (``orbited.duplicate``);
- ``orbited.deliver`` (INTERNAL, child of the dispatch) for the first
  ``otel_recipient_spans`` recipients: route, seq, status, transport, the key (a digest,
  or its parts with ``otel_key_attributes``); an event ``written`` when the event went
  to the browser's transport at once;
- ``orbited.ack`` (INTERNAL, child of its deliver) from the write (at once, or when the
  browser reconnected and the mailbox replayed it) to the browser's acknowledgement,
  ending with ``orbited.ack.outcome``: ``acked``, ``expired`` (the mailbox expired first),
  ``moved`` / ``handed_over`` (its route left this node), ``timeout`` / ``replaced``
  (acknowledged mode: the reply went without it). At most ``otel_pending_acks`` are open
  node-wide; past that none is started.

Sampling is parent-based: a request whose ``traceparent`` says sampled is traced, one
that says not sampled is not, and a request without one starts a trace with probability
``otel_sample`` (0 by default: then it costs one attribute test). A ``traceparent`` that
does not parse is ignored (counted in ``bad_traceparent``).

Nothing here imports opentelemetry at module level: ``build``/``observer`` import it, so
a node with ``otel`` off never loads it (tests/test_layout.py).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from orbited import __version__
from orbited.core.keys import ConnectionKey
from orbited.core.settings import ConfigError
from orbited.core.tracecontext import parse_traceparent, parse_tracestate

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

    from orbited.node.events import DispatchResult, EventRequest

__all__ = ["INSTALL", "OtelConfig", "OtelObserver", "build", "observer"]

INSTALL = "otel: install orbited[otel] (pip install 'orbited[otel]')"
Exporter = Literal["otlp", "discard", "memory"]
EXPORTERS: tuple[str, ...] = ("otlp", "discard", "memory")
SHUTDOWN_TIMEOUT = 5.0  # seconds a stopping node waits for its last spans' export


@dataclass(frozen=True)
class OtelConfig:
    """The node's ``otel_*`` keys (docs/operations.md; defaults defined here once)."""

    sample: float = 0.0  # ratio of requests without a traceparent that start a trace
    recipient_spans: int = 10  # orbited.deliver spans per request at most
    pending_acks: int = 10_000  # open orbited.ack spans at most, node-wide
    key_attributes: bool = False  # key parts on spans (else a 64-bit digest of the key)
    # "otlp": OTLP/HTTP, configured by the OTEL_EXPORTER_OTLP_* environment variables;
    # "discard" (bench) and "memory" (tests, in process): nothing leaves the process.
    exporter: Exporter = "otlp"

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample <= 1.0:
            raise ConfigError("otel_sample is a ratio, 0 <= otel_sample <= 1")
        if self.recipient_spans < 0 or self.pending_acks < 0:
            raise ConfigError("otel_recipient_spans and otel_pending_acks must be >= 0")
        if self.exporter not in EXPORTERS:
            raise ConfigError(f"otel_exporter is one of {', '.join(EXPORTERS)}")


def _disabled() -> bool:
    """OTEL_SDK_DISABLED=true (the OpenTelemetry SDK's switch) turns the spans off."""
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def build(config: Any, name: str) -> OtelObserver | None:
    """The node's OTel observer from its config (``otel``, ``otel_sample``,
    ``otel_recipient_spans``, ``otel_pending_acks``, ``otel_key_attributes``,
    ``otel_exporter``), or None when ``otel`` is off or OTEL_SDK_DISABLED is true.
    ConfigError (exit 2) when the opentelemetry packages are not installed."""
    if not getattr(config, "otel", False) or _disabled():
        return None
    settings = OtelConfig(
        sample=float(config.otel_sample),
        recipient_spans=int(config.otel_recipient_spans),
        pending_acks=int(config.otel_pending_acks),
        key_attributes=bool(config.otel_key_attributes),
        exporter=getattr(config, "otel_exporter", "otlp"),
    )
    return observer(settings, name)


def observer(config: OtelConfig, name: str, exporter: SpanExporter | None = None) -> OtelObserver:
    """An OTel observer with its own TracerProvider (resource ``service.name`` "orbited"
    unless OTEL_SERVICE_NAME says otherwise, ``service.instance.id`` the node's name) and
    a parent-based ratio sampler. ``exporter``: spans go to it synchronously (tests);
    else as ``config.exporter`` says, through a batch processor."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SimpleSpanProcessor,
            SpanExportResult,
        )
        from opentelemetry.sdk.trace.export import SpanExporter as _SpanExporter
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError:
        raise ConfigError(INSTALL) from None

    attributes: dict[str, str] = {"service.instance.id": name, "service.version": __version__}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = "orbited"
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(config.sample)),
        resource=Resource.create(attributes),
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif config.exporter == "memory":
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif config.exporter == "discard":

        class _Discard(_SpanExporter):
            def export(self, spans: Sequence[Any]) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        exporter = _Discard()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ConfigError(INSTALL) from None
        exporter = OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer("orbited.node", __version__)
    return OtelObserver(tracer, config, name, provider, exporter)


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class _Dispatch:
    """An observer token: one traced request. It keeps no payload: open acks refer to
    it until the reply, and the node may hold otel_pending_acks of them."""

    __slots__ = ("span", "context", "recipients", "counts", "delivers", "acks")

    def __init__(self, span: Span, context: Context, recipients: tuple[Any, ...]) -> None:
        self.span = span
        self.context = context  # the dispatch span's, for its children
        # Acknowledged mode: the request's recipients, to read the reply's statuses.
        self.recipients = recipients
        self.counts: dict[str, int] = {}
        self.delivers = 0  # deliver spans started
        self.acks: list[_Ack] = []  # open, until the reply (acknowledged mode)


class _Ack:
    """One awaited acknowledgement: the event at ``seq`` of ``stream`` for one key."""

    __slots__ = ("key", "stream", "seq", "parent", "span", "dispatch")

    def __init__(
        self, key: ConnectionKey, stream: str, seq: int, parent: Context, dispatch: _Dispatch
    ) -> None:
        self.key = key
        self.stream = stream
        self.seq = seq
        self.parent = parent  # the deliver span's context
        self.span: Span | None = None  # started when the event is written
        self.dispatch: _Dispatch | None = dispatch  # until the reply


class OtelObserver:
    """A DeliveryObserver recording OTel spans (the module doc)."""

    def __init__(
        self, tracer: Tracer, config: OtelConfig, node: str,
        provider: TracerProvider | None = None, exporter: SpanExporter | None = None,
    ) -> None:  # fmt: skip
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
        from opentelemetry.trace.span import TraceState

        self._trace = trace
        self._remote = NonRecordingSpan
        self._span_context = SpanContext
        self._flags = TraceFlags
        self._trace_state = TraceState
        self._server = SpanKind.SERVER
        self._internal = SpanKind.INTERNAL
        self.tracer = tracer
        self.config = config
        self.node = node
        self.provider = provider
        self.exporter = exporter
        self.bad_traceparent = 0  # requests whose traceparent did not parse
        self.untracked_acks = 0  # acks not followed: otel_pending_acks were open
        self._acks: dict[ConnectionKey, list[_Ack]] = {}
        self._open = 0  # entries in _acks

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Export what is buffered and stop, waiting at most ``timeout`` seconds (an
        unreachable collector must not hold the node's stop)."""
        if self.provider is not None:
            done = threading.Thread(target=self.provider.shutdown, daemon=True)
            done.start()
            done.join(timeout)

    @property
    def pending_acks(self) -> int:
        return self._open

    # -- per request --------------------------------------------------------------------

    def _parent(self, request: EventRequest) -> Context | None:
        value = request.traceparent
        if value is None:
            return None
        parent = parse_traceparent(value)
        if parent is None:
            self.bad_traceparent += 1
            return None
        state = None
        if request.tracestate is not None:
            members = parse_tracestate(request.tracestate)
            if members:
                state = self._trace_state(members)
        remote = self._span_context(
            int(parent.trace_id, 16), int(parent.span_id, 16), is_remote=True,
            trace_flags=self._flags(parent.flags), trace_state=state,
        )  # fmt: skip
        return self._trace.set_span_in_context(self._remote(remote))

    def dispatched(self, request: EventRequest, now: float) -> _Dispatch | None:
        if request.traceparent is None and not self.config.sample:
            return None  # unsampled: no span at all
        parent = self._parent(request)
        if parent is None and not self.config.sample:
            return None
        attributes: dict[str, Any] = {
            "orbited.event_id": request.event_id,
            "orbited.request": request.digest[:8].hex(),
            "orbited.recipients": len(request.recipients),
            "orbited.node": self.node,
        }
        if request.ack is not None:
            attributes["orbited.ack_wait"] = request.ack
        span = self.tracer.start_span(
            "orbited.dispatch", context=parent, kind=self._server, attributes=attributes,
            start_time=_ns(now),
        )  # fmt: skip
        if not span.is_recording():
            return None
        recipients = request.recipients if request.ack is not None else ()
        return _Dispatch(span, self._trace.set_span_in_context(span), recipients)

    def _key_attributes(self, key: ConnectionKey, attributes: dict[str, Any]) -> None:
        if self.config.key_attributes:
            attributes["orbited.key.user"] = key.user
            attributes["orbited.key.session"] = key.session
            attributes["orbited.key.location"] = key.location
        else:
            text = "\0".join(key).encode("utf-8", "surrogatepass")  # never raises
            digest = hashlib.blake2b(text, digest_size=8).hexdigest()
            attributes["orbited.key.digest"] = digest

    def recipient(
        self, token: Any, key: ConnectionKey, route: int, status: str, seq: int | None,
        stream: str | None, dropped: int, transport: str | None, now: float,
    ) -> None:  # fmt: skip
        if token is None:
            return
        d: _Dispatch = token
        d.counts[status] = d.counts.get(status, 0) + 1
        if status == "held" or d.delivers >= self.config.recipient_spans:
            return  # a held key is reported again when its delivery runs
        d.delivers += 1
        attributes: dict[str, Any] = {"orbited.route": route, "orbited.status": status}
        if seq is not None:
            attributes["orbited.seq"] = seq
        if stream is not None:
            attributes["orbited.stream"] = stream
        if dropped:
            attributes["orbited.dropped"] = dropped
        if transport is not None:
            attributes["orbited.transport"] = transport
        self._key_attributes(key, attributes)
        at = _ns(now)
        span = self.tracer.start_span(
            "orbited.deliver", context=d.context, kind=self._internal, attributes=attributes,
            start_time=at,
        )  # fmt: skip
        if transport is not None:
            span.add_event("written", {"orbited.transport": transport}, timestamp=at)
        span.end(end_time=at)
        if seq is None or stream is None or status not in ("delivered", "queued"):
            return
        if self._open >= self.config.pending_acks:
            self.untracked_acks += 1
            return
        ack = _Ack(key, stream, seq, self._trace.set_span_in_context(span), d)
        if transport is not None:
            self._start_ack(ack, transport, now, replay=False)
        self._acks.setdefault(key, []).append(ack)
        d.acks.append(ack)
        self._open += 1

    def _start_ack(self, ack: _Ack, transport: str | None, now: float, replay: bool) -> None:
        attributes: dict[str, Any] = {
            "orbited.seq": ack.seq, "orbited.stream": ack.stream, "orbited.replay": replay,
        }  # fmt: skip
        if transport is not None:
            attributes["orbited.transport"] = transport
        ack.span = self.tracer.start_span(
            "orbited.ack", context=ack.parent, kind=self._internal, attributes=attributes,
            start_time=_ns(now),
        )  # fmt: skip

    def _end_ack(self, ack: _Ack, outcome: str, now: float) -> None:
        """End one ack (its span, if the event was written) and forget it in its
        dispatch; the caller removes it from ``_acks``."""
        self._open -= 1
        span = ack.span
        if span is not None:
            span.set_attribute("orbited.ack.outcome", outcome)
            span.end(end_time=_ns(now))
        if ack.dispatch is not None:
            ack.dispatch.acks.remove(ack)
            ack.dispatch = None

    def answered(self, token: Any, outcome: DispatchResult, now: float) -> None:
        if token is None:
            return
        d: _Dispatch = token
        span = d.span
        counts = d.counts
        if outcome.duplicate:
            span.set_attribute("orbited.duplicate", True)
        elif d.recipients:
            # Acknowledged mode: the reply's statuses (acked/unacked/moved/replaced) are
            # the outcome; an ack still open is one the reply went without.
            final = self._final_statuses(d.recipients, outcome)
            counts = {}
            for status in final.values():
                counts[status] = counts.get(status, 0) + 1
            for ack in list(d.acks):
                status = final.get(ack.key, "unacked")
                self._drop(ack, "timeout" if status == "unacked" else status, now)
            d.recipients = ()
        for ack in d.acks:  # followed on, by key, without their dispatch
            ack.dispatch = None
        d.acks = []
        for status, n in counts.items():
            span.set_attribute(f"orbited.status.{status}", n)
        span.end(end_time=_ns(now))

    @staticmethod
    def _final_statuses(recipients: tuple[Any, ...], outcome: DispatchResult) -> dict[Any, str]:
        final: dict[Any, str] = {}
        for target, result in zip(recipients, outcome.results, strict=False):
            if result.keys:
                for key, key_result in result.keys:
                    final[key] = str(key_result.status)
            else:
                final[target] = str(result.status)
        return final

    def _drop(self, ack: _Ack, outcome: str, now: float) -> None:
        """End ``ack`` and remove it from the key's list."""
        self._end_ack(ack, outcome, now)
        acks = self._acks.get(ack.key)
        if acks is not None:
            try:
                acks.remove(ack)
            except ValueError:
                pass
            if not acks:
                del self._acks[ack.key]

    # -- not tied to a request ----------------------------------------------------------

    def written(
        self, key: ConnectionKey, stream: str, first: int, last: int, transport: str, now: float
    ) -> None:
        acks = self._acks.get(key)
        if acks is None:
            return
        for ack in acks:
            if ack.stream == stream and first <= ack.seq <= last:
                if ack.span is None:
                    self._start_ack(ack, transport, now, replay=True)
                else:  # written before, to a transport that went away: again
                    ack.span.add_event(
                        "rewritten", {"orbited.transport": transport}, timestamp=_ns(now)
                    )

    def acked(self, key: ConnectionKey, stream: str, upto: int, now: float) -> None:
        acks = self._acks.get(key)
        if acks is None:
            return
        keep: list[_Ack] = []
        for ack in acks:
            if ack.stream == stream and ack.seq <= upto:
                # Never seen written (evicted before it was, or written where this node
                # did not see it): forgotten without a span.
                self._end_ack(ack, "acked", now)
            else:
                keep.append(ack)
        if keep:
            self._acks[key] = keep
        else:
            del self._acks[key]

    def noted(self, key: ConnectionKey, what: str, now: float, **detail: Any) -> None:
        if what == "expired":
            outcome = "expired"
        elif what == "moved":
            outcome = "handed_over" if detail.get("handed") else "moved"
        else:
            return
        acks = self._acks.pop(key, None)
        for ack in acks or ():
            self._end_ack(ack, outcome, now)

    def export(self, key: ConnectionKey) -> list[dict[str, Any]]:
        return []

    def import_(self, key: ConnectionKey, wire: list[Any], origin: str | None, now: float) -> None:
        return None
