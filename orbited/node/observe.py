"""The delivery observer contract: what the hub tells a tracer about each event.

The hub (orbited.node.hub) holds ``observer: DeliveryObserver | None``. It is None when
per-key tracing (orbited.node.trace) and OpenTelemetry (orbited.node.otel) are both
off, and then the hub's cost is one attribute test per dispatch. When one is on it is
that object; when both are, an ``Observers`` that passes every call to each.

Calls, in the order the hub makes them for one event request:

1. ``dispatched(request, now)`` once per request, after the dedup check (resends too).
   It returns a *token*, any object the observer wants back (the tracer's ``Dispatch``,
   an OTel span, a tuple of both in ``Observers``), or None. The hub keeps it for the
   request and hands it back to ``recipient`` and ``answered``; it never looks inside.
2. ``recipient(token, key, route, status, seq, stream, dropped, transport, now)`` once
   per key the event was meant for (a wildcard's keys each), with ``status`` one of
   ``RECIPIENT_STATUSES``. ``transport`` is the attached sink's ``kind`` ("ws", "sse",
   "poll", "iframe", "orbit") when ``status`` is "delivered" (the write happened at
   ``now``: the hub writes inside its delivery batch), else None. A key held for an
   incoming hand-off is reported "held" first and again, with the same token and its
   outcome then, when the held delivery runs.
3. ``answered(token, outcome, now)`` once, when the reply is ready: at once, or when the
   acknowledged-mode or hand-off wait ends. ``outcome.results`` are in request order
   (``token`` must remember the recipients if it needs them). ``outcome.duplicate``:
   a resend; nothing was delivered, and no ``recipient`` call came for it.

Calls not tied to a request:

- ``written(key, stream, first, last, transport, now)``: an attach replayed the events
  ``first..last`` of ``stream`` to a new transport (a reconnect).
- ``acked(key, stream, upto, now)``: the browser confirmed everything up to ``upto`` of
  ``stream`` (an ack, or the resume position of an attach in the same stream).
- ``noted(key, what, now, **detail)``: something happened to the key's mailbox or
  transport; ``what`` is one of ``NOTES`` (``detail``: small JSON values, see there).
- ``export(key)`` / ``import_(key, wire, origin, now)``: a hand-off carries the key's
  trace (JSON values) from the old owner to the new one; ``origin`` is the sender's
  name (None when unknown). An observer with nothing to carry returns ``[]``.

Observers must not raise: the hub does not guard the calls (a bug there is a bug in
delivery). Times are the hub's clock (``Hub.now()``), in seconds since the epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from orbited.core.keys import ConnectionKey

if TYPE_CHECKING:
    from orbited.node.events import DispatchResult, EventRequest

__all__ = ["NOTES", "RECIPIENT_STATUSES", "DeliveryObserver", "Observers", "build_observer"]

# ``recipient``'s statuses: delivered / queued (stored; the event got ``seq`` in
# ``stream``, ``dropped`` older undelivered events were evicted for it), no_connection
# (no mailbox here), moved (the route is another node's), full (mailbox_total_bytes),
# limited (user_rate), held (the route waits for an incoming hand-off).
RECIPIENT_STATUSES = frozenset({
    "delivered", "queued", "no_connection", "moved", "full", "limited", "held",
})  # fmt: skip

# ``noted``'s ``what`` and its ``detail`` keys:
#   attach (transport, last: the resume position or None), detach (reason), replaced (a
#   newer transport took over), reset (old: the stream the browser asked for, gone),
#   gap (first, last: seqs it will not get), expired (undelivered: events never
#   written), moved (route, to: new owner's SP address or None, owner: its name or
#   None, handed: bool),
#   handed_in (origin). Events the mailbox limits evicted show as the record's
#   ``dropped`` and, when the browser comes back, as a ``gap``.
NOTES = frozenset({
    "attach", "detach", "replaced", "reset", "gap", "expired", "moved", "handed_in",
})  # fmt: skip


class DeliveryObserver(Protocol):
    """What the hub calls (see the module doc for when and with what)."""

    def dispatched(self, request: EventRequest, now: float) -> Any: ...

    def recipient(
        self, token: Any, key: ConnectionKey, route: int, status: str, seq: int | None,
        stream: str | None, dropped: int, transport: str | None, now: float,
    ) -> None: ...  # fmt: skip

    def answered(self, token: Any, outcome: DispatchResult, now: float) -> None: ...

    def written(
        self, key: ConnectionKey, stream: str, first: int, last: int, transport: str, now: float
    ) -> None: ...

    def acked(self, key: ConnectionKey, stream: str, upto: int, now: float) -> None: ...

    def noted(self, key: ConnectionKey, what: str, now: float, **detail: Any) -> None: ...

    def export(self, key: ConnectionKey) -> list[dict[str, Any]]: ...

    def import_(
        self, key: ConnectionKey, wire: list[Any], origin: str | None, now: float
    ) -> None: ...


class Observers:
    """Several observers as one: every call goes to each, in order; the token is the
    tuple of theirs. Built by ``build_observer`` only when two or more are on."""

    __slots__ = ("parts",)

    def __init__(self, parts: Sequence[DeliveryObserver]) -> None:
        self.parts = tuple(parts)

    def dispatched(self, request: EventRequest, now: float) -> tuple[Any, ...]:
        return tuple(p.dispatched(request, now) for p in self.parts)

    def recipient(
        self, token: Any, key: ConnectionKey, route: int, status: str, seq: int | None,
        stream: str | None, dropped: int, transport: str | None, now: float,
    ) -> None:  # fmt: skip
        for part, own in zip(self.parts, token, strict=True):
            part.recipient(own, key, route, status, seq, stream, dropped, transport, now)

    def answered(self, token: Any, outcome: DispatchResult, now: float) -> None:
        for part, own in zip(self.parts, token, strict=True):
            part.answered(own, outcome, now)

    def written(
        self, key: ConnectionKey, stream: str, first: int, last: int, transport: str, now: float
    ) -> None:
        for part in self.parts:
            part.written(key, stream, first, last, transport, now)

    def acked(self, key: ConnectionKey, stream: str, upto: int, now: float) -> None:
        for part in self.parts:
            part.acked(key, stream, upto, now)

    def noted(self, key: ConnectionKey, what: str, now: float, **detail: Any) -> None:
        for part in self.parts:
            part.noted(key, what, now, **detail)

    def export(self, key: ConnectionKey) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for part in self.parts:
            out.extend(part.export(key))
        return out

    def import_(self, key: ConnectionKey, wire: list[Any], origin: str | None, now: float) -> None:
        for part in self.parts:
            part.import_(key, wire, origin, now)


def build_observer(
    tracer: DeliveryObserver | None, otel: DeliveryObserver | None
) -> DeliveryObserver | None:
    """The hub's ``observer``: None when both are off, the one that is on, or both."""
    parts = [p for p in (tracer, otel) if p is not None]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return Observers(parts)
