"""OpenTelemetry for the web-app clients: one CLIENT span ``orbited.send`` per ``send``.

``BlockingClient(..., otel=True)`` and ``TwistedClient(..., otel=True)`` open the span
under the current context (so a web request an OTel instrumentation traces becomes its
parent) and put its W3C ``traceparent`` (and ``tracestate``) into every request of that
send: each route's, and each resend, byte for byte (the node ignores both fields in its
dedup digest). The node continues the trace (its ``orbited.dispatch`` spans are children
of this one, docs/operations.md "OpenTelemetry"). A resend adds a span event ``resend``
with the reason; the span ends when every route has answered, with a count per status
(``orbited.status.queued``...), and with status ERROR when any recipient's result is an
error.

Needs the ``otel`` extra (``pip install 'orbited[otel]'``, or at least
opentelemetry-api); nothing here imports it before a ClientTracing is made, so
``import orbited.client`` stays light (tests/test_layout.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from orbited import __version__
from orbited.core.tracecontext import format_traceparent

if TYPE_CHECKING:
    from opentelemetry.trace import Span, TracerProvider

__all__ = ["RESEND_REASONS", "ClientTracing", "SendSpan", "tracing"]

# Why a request was sent again: a node answered `moved` (its route went elsewhere), the
# connection was lost (or could not be made), no reply came within the client's timeout.
RESEND_REASONS = frozenset({"moved", "connection_lost", "timeout"})


class ClientTracing:
    """Spans for a client's sends, from ``tracer_provider`` (default: the global one the
    web app configured with the OpenTelemetry SDK; with the API alone no span is
    recorded, but a current trace context is still passed on to the node)."""

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.trace import SpanKind, Status, StatusCode
        except ImportError:
            raise ImportError(
                "otel=True needs OpenTelemetry: pip install 'orbited[otel]'"
            ) from None
        self._tracer = trace.get_tracer("orbited.client", __version__, tracer_provider)
        self._client_kind = SpanKind.CLIENT
        self._status = Status
        self._error = StatusCode.ERROR

    def start(self, event_id: str, recipients: int) -> SendSpan:
        """The span of one ``send``, started now under the current context."""
        span = self._tracer.start_span(
            "orbited.send", kind=self._client_kind,
            attributes={"orbited.event_id": event_id, "orbited.recipients": recipients},
        )  # fmt: skip
        return SendSpan(self, span)


class SendSpan:
    """One ``send``'s span and the trace context its requests carry."""

    __slots__ = ("_tracing", "span", "traceparent", "tracestate", "routes")

    def __init__(self, tracing: ClientTracing, span: Span) -> None:
        self._tracing = tracing
        self.span = span
        self.routes = 0
        context = span.get_span_context()
        self.traceparent: str | None = None
        self.tracestate: str | None = None
        if context.is_valid:  # also when not sampled: the node then follows, not traces
            self.traceparent = format_traceparent(
                f"{context.trace_id:032x}", f"{context.span_id:016x}", int(context.trace_flags)
            )
            state = context.trace_state.to_header()
            if state:
                self.tracestate = state

    def requests(self, routes: int) -> None:
        """``routes`` route groups were sent (a rehash during the call sends more)."""
        self.routes += routes
        self.span.set_attribute("orbited.routes", self.routes)

    def resend(self, reason: str, route_requests: int = 1) -> None:
        """Requests are sent again, for ``reason`` (one of RESEND_REASONS)."""
        self.span.add_event("resend", {"reason": reason, "orbited.requests": route_requests})

    def finish(self, results: Mapping[Any, Mapping[str, Any]]) -> None:
        """End the span with the send's results (recipient → result)."""
        counts: dict[str, int] = {}
        errors: list[str] = []
        for result in results.values():
            status = str(result.get("status"))
            counts[status] = counts.get(status, 0) + 1
            if status == "error":
                errors.append(str(result.get("code") or result.get("error")))
        for status, n in counts.items():
            self.span.set_attribute(f"orbited.status.{status}", n)
        if errors:
            description = ", ".join(sorted(set(errors)))
            self.span.set_status(self._tracing._status(self._tracing._error, description))
        self.span.end()

    def fail(self, error: BaseException) -> None:
        """End the span for a send that raised."""
        self.span.record_exception(error)
        self.span.set_status(self._tracing._status(self._tracing._error, type(error).__name__))
        self.span.end()


def tracing(otel: bool | ClientTracing) -> ClientTracing | None:
    """A client's ``otel`` argument: False (no spans), True (the global tracer
    provider) or a ClientTracing (its own provider, e.g. in tests)."""
    if isinstance(otel, ClientTracing):
        return otel
    return ClientTracing() if otel else None
