"""The node core: mailboxes by connection key, attached transports, linger, dispatch.

Transports attach a Sink for a key; the web app's event requests (orbited.node.events
parses them into EventRequest) go to ``Hub.dispatch``, which appends the event to each
recipient's mailbox, writes it to the attached sink if there is one, and answers a
DispatchResult. Requests in the acknowledged mode are answered once the browser
acknowledged (the ack waits, here). Resends are recognised by orbited.node.dedup; route
ownership and the hand-off of mailboxes between nodes are orbited.node.handoff's
(RouteOwnership, which Hub extends). Bytes stay at the edge: ``answer`` turns a request
body into a reply body for the SP and HTTP front ends. Time comes from an injected
IReactorTime so tests drive it with twisted.internet.task.Clock; no sockets here.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from orbited.core.hashing import DEFAULT_ROUTES, route_of
from orbited.core.keys import ConnectionKey
from orbited.node import events, frames
from orbited.node.dedup import DedupLimits, DedupMemory
from orbited.node.events import DELIVERED, QUEUED, DispatchResult, RecipientResult, Status
from orbited.node.flush import DeliveryBatch, Flushable
from orbited.node.frames import Frame
from orbited.node.handoff import PresenceChange, RouteOwnership, _moved_away, export_entry
from orbited.node.mailbox import Mailbox, MailboxLimits, Position
from orbited.node.users import UserLimits

__all__ = ["SPREAD_MAX", "Answer", "Hub", "HubConfig", "Sink", "answer", "export_entry"]


class Sink(Protocol):
    """A transport attached to one key (a WebSocket, a pending long-poll, ...)."""

    last_write: float
    wants_pings: bool  # streaming transports do; a held long-poll ends by its own timeout

    def deliver(self, out: list[Frame]) -> bool:
        """Write frames (their ``data``) to the browser, or keep them for the delivery
        batch's flush (``Hub.enlist``, orbited.node.flush: the contract); False if this
        transport cannot take them now. Event frames carry their position (``stream``,
        ``seq``)."""

    def replaced(self) -> None:
        """A newer connection for the same key took over: close without reconnecting."""

    def reconnect(self, reason: str) -> None:
        """Tell the browser to reconnect (node shutting down, route moved) and close."""


@dataclass(frozen=True)
class HubConfig:
    mailbox: MailboxLimits = MailboxLimits()
    requests: events.RequestLimits = events.RequestLimits()
    linger: float = 30.0  # seconds a key's mailbox outlives its last transport
    keepalive: float = 25.0  # seconds of silence before a transport gets a ping frame
    dedup_window: float = DedupLimits.window  # seconds a request is remembered
    dedup_max: int = DedupLimits.max_entries  # requests remembered at most
    dedup_max_bytes: int = DedupLimits.max_bytes  # bytes of remembered replies at most
    routes: int = DEFAULT_ROUTES  # N of the cluster's hashing (docs/hashing.md)
    handoff_timeout: float = 5.0  # seconds a moved route waits for the old owner's mailboxes
    # Payload bytes in all mailboxes together; an event that would pass it is refused
    # for that recipient with status "full" (docs/protocol.md) instead of being stored.
    mailbox_total_bytes: int = 512 * 1024 * 1024
    # New browser connections per second a node is expected to take when a node's
    # browsers all come back at once (a crash, a drain): the browsers spread their first
    # reconnect over mailboxes / reconnect_rate seconds (the `spread` hint in hello and
    # ping frames, docs/protocol.md). A node accepts ≈ 600 WebSocket and ≈ 1 600 SSE
    # connects/s (docs/performance.md), a mix ≈ 1 000/s; at 1 000/s the ~500 browsers of
    # a node spread over 0.5 s, so they all receive again within the failover target
    # (p99 < 1 s), and 10 000 over 10 s. The node's `reconnect_rate` config key
    # (docs/operations.md) sets it; this is its default. 0 = no hint spreading (spread 0).
    reconnect_rate: float = 1000.0
    # Per-user limits and holds (orbited.node.users; docs/operations.md, "Limits").
    users: UserLimits = UserLimits()
    # The route hash version (docs/hashing.md): 2 hashes the user part only, so all of a
    # user's keys share one owner. HaloD's table's version wins when connected.
    hash_version: int = 2

    @property
    def dedup(self) -> DedupLimits:
        return DedupLimits(self.dedup_window, self.dedup_max, self.dedup_max_bytes)


_new = tuple.__new__

SPREAD_MAX = 30.0  # seconds: the spread hint's bound, however many browsers a node has

FULL_RESULT = b'{"status":"full"}'  # the node's mailboxes hold mailbox_total_bytes


class _AckWait:
    """A request in the acknowledged mode waiting for the browser to confirm ``seq``."""

    __slots__ = ("seq", "deferred", "timer")

    def __init__(self, seq: int, deferred: defer.Deferred[RecipientResult]) -> None:
        self.seq = seq
        self.deferred = deferred
        self.timer: IDelayedCall | None = None

    def resolve(self, result: RecipientResult) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if not self.deferred.called:
            self.deferred.callback(result)


class _Slot:
    __slots__ = ("mailbox", "sink", "linger_call", "route", "waits", "online", "counted")

    def __init__(self, mailbox: Mailbox, route: int, online: bool = True) -> None:
        self.mailbox = mailbox
        self.route = route
        self.sink: Sink | None = None
        self.linger_call: IDelayedCall | None = None
        self.waits: list[_AckWait] | None = None  # oldest first; None when none
        # Presence said signon. False for a mailbox an acknowledged-mode event created
        # before any browser came: the browser's first attach signs it on.
        self.online = online
        self.counted = 0  # this mailbox's bytes as last added to Hub.mailbox_bytes


class _BatchScope:
    """``Hub.batch()``'s context manager (one per hub, reused: no generator per read)."""

    __slots__ = ("_hub",)

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def __enter__(self) -> None:
        self._hub.begin_batch()

    def __exit__(self, *exc: object) -> None:
        self._hub.end_batch()


class Hub(RouteOwnership):
    log = Logger()

    def __init__(self, clock: IReactorTime, config: HubConfig, epoch: str | None = None) -> None:
        self.clock = clock
        self.config = config
        self.epoch = epoch or secrets.token_urlsafe(6)
        self._streams = 0
        self._slots: dict[ConnectionKey, _Slot] = {}
        self._attached = 0  # slots with a sink, kept by _set_sink (see ``attached``)
        # Replies of recent requests; resends of one whose reply is pending wait for it.
        self.dedup: DedupMemory[defer.Deferred[DispatchResult]] = DedupMemory(config.dedup)
        self.stopped = False
        # Routes this node serves (RouteOwnership): None when standalone (every route);
        # with HaloD, what it assigned (nothing until it has).
        self._init_routes(config.routes)
        # Called with ("signon" | "signoff", key): a key's mailbox created / expired.
        self.presence: Callable[[PresenceChange, ConnectionKey], None] | None = None
        # Payload bytes of all mailboxes (the node-wide cap, mailbox_total_bytes); each
        # slot's share is recounted after the hub changes its mailbox (_recount).
        self.mailbox_bytes = 0
        # Frames for one connection coalesced per SP read (orbited.node.flush).
        self._batch = DeliveryBatch()
        self._scope = _BatchScope(self)
        self.stats = {
            "events": 0,
            "delivered": 0,
            "queued": 0,
            "no_connection": 0,
            "duplicates": 0,
            "bad_requests": 0,
            "moved": 0,
            "acked": 0,
            "unacked": 0,
            "handoff_in": 0,
            "handoff_out": 0,
            "handoff_timeouts": 0,
            "full": 0,
        }

    # -- the delivery batch (orbited.node.flush) ----------------------------------------

    def batch(self) -> _BatchScope:
        """``with hub.batch():`` around the requests of one SP read: deliveries to one
        connection leave in one write when it ends (nestable; the SP REP server opens it).
        Inside it the hub reads the clock once."""
        return self._scope

    def begin_batch(self) -> None:
        if self._batch.begin(self.clock.seconds()):
            self.dedup.forget_old(self._batch.now)

    def end_batch(self) -> None:
        self._batch.end()

    def enlist(self, sink: Flushable) -> bool:
        """For a sink's ``deliver``: True inside a batch (keep the bytes; ``flush`` comes
        when the batch ends); False outside (write now). Call it once per batch, when
        the sink's pending bytes go from none to some (orbited.node.flush)."""
        return self._batch.enlist(sink)

    def now(self) -> float:
        """The clock, read once per batch."""
        batch = self._batch
        return batch.now if batch.open else self.clock.seconds()

    # -- browser side -------------------------------------------------------------------

    def attach(self, key: ConnectionKey, sink: Sink, after: Position | None) -> Mailbox | None:
        """Attach ``sink`` as the key's transport and send it what it has not seen yet.

        Returns None when the node is shutting down (the sink was told to reconnect).
        """
        if self.stopped:
            sink.reconnect("shutdown")
            return None
        slot = self._slots.get(key)
        if slot is None:
            route = route_of(key, self.routes)
            if self.owned is not None and route not in self.owned:
                # Not ours (any more): the browser retries and HaloD's port for the route
                # now leads to the owner.
                self.stats["moved"] += 1
                sink.reconnect("route_moved")
                return None
            if self._hold_attach(route, key, sink, after):
                return None  # its mailbox may be on the way: resume from it
            slot = self._new_slot(key, route, online=True)
        else:
            if slot.linger_call is not None:
                slot.linger_call.cancel()
                slot.linger_call = None
            if not slot.online:
                slot.online = True
                if self.presence is not None:
                    self.presence("signon", key)
            previous = self._set_sink(slot, None)
            if previous is not None and previous is not sink:
                previous.replaced()
        mailbox = slot.mailbox
        replay = mailbox.replay(after)
        self._recount(slot)
        stream = mailbox.stream
        hello = frames.hello(
            stream, self.config.keepalive, replay.reset, replay.since, self.spread()
        )
        out = [Frame(hello)]
        if replay.gap is not None:
            out.append(Frame(frames.gap(*replay.gap)))
        out.extend(
            Frame(frames.event(seq, payload, eid), seq, stream)
            for seq, payload, eid in replay.events
        )
        self._set_sink(slot, sink)
        if sink.deliver(out) and replay.events:
            mailbox.mark_delivered(replay.events[-1][0])
        if slot.waits is not None and after is not None:
            self._acked(slot)
        return mailbox

    def _new_slot(self, key: ConnectionKey, route: int, online: bool) -> _Slot:
        self._streams += 1
        mailbox = Mailbox(f"{self.epoch}.{self._streams:x}", self.config.mailbox)
        slot = self._slots[key] = _Slot(mailbox, route, online)
        if online and self.presence is not None:
            self.presence("signon", key)
        return slot

    def _install(self, key: ConnectionKey, mailbox: Mailbox, route: int, online: bool) -> None:
        """A handed-over mailbox: kept for ``linger`` until its browser comes."""
        slot = self._slots[key] = _Slot(mailbox, route, online)
        self._recount(slot)  # counted even past the cap: refusing it would lose events
        slot.linger_call = self.clock.callLater(self.config.linger, self._expire, key, slot)

    def _recount(self, slot: _Slot) -> None:
        size = slot.mailbox.buffered_bytes
        self.mailbox_bytes += size - slot.counted
        slot.counted = size

    def _set_sink(self, slot: _Slot, sink: Sink | None) -> Sink | None:
        """Every change of a slot's transport goes here (it keeps ``attached``);
        returns the one it replaces."""
        previous, slot.sink = slot.sink, sink
        self._attached += (sink is not None) - (previous is not None)
        return previous

    def _forget(self, slot: _Slot) -> None:
        """A slot left ``_slots``: its bytes no longer count."""
        self.mailbox_bytes -= slot.counted
        slot.counted = 0

    def detach(self, key: ConnectionKey, sink: Sink) -> None:
        slot = self._slots.get(key)
        if slot is None or slot.sink is not sink:
            self._held_gone(sink)  # closed while its route was held, perhaps
            return
        self._set_sink(slot, None)
        slot.linger_call = self.clock.callLater(self.config.linger, self._expire, key, slot)

    def _expire(self, key: ConnectionKey, slot: _Slot) -> None:
        slot.linger_call = None
        if self._slots.get(key) is slot and slot.sink is None:
            del self._slots[key]
            self._forget(slot)
            self._end_waits(slot, lambda wait: events.stored(Status.UNACKED, wait.seq))
            if slot.online and self.presence is not None:
                self.presence("signoff", key)
            if len(slot.mailbox) > slot.mailbox.acked:
                self.log.info("mailbox {key} expired", key=key)

    def ack(self, key: ConnectionKey, seq: int, stream: str | None = None) -> None:
        """The browser has everything up to ``seq`` (of ``stream``, when the ack comes on
        its own request: an ack for a stream that is gone must not confirm a new one)."""
        slot = self._slots.get(key)
        if slot is not None and (stream is None or stream == slot.mailbox.stream):
            slot.mailbox.ack(seq)
            self._recount(slot)
            if slot.waits is not None:
                self._acked(slot)

    def _acked(self, slot: _Slot) -> None:
        """Answer the acknowledged-mode requests the browser has now confirmed."""
        waits, acked = slot.waits, slot.mailbox.acked
        assert waits is not None
        done = 0
        for wait in waits:
            if wait.seq > acked:
                break
            done += 1
            self.stats["acked"] += 1
            wait.resolve(events.stored(Status.ACKED, wait.seq))
        del waits[:done]
        if not waits:
            slot.waits = None

    def _ack_timeout(self, slot: _Slot, wait: _AckWait) -> None:
        wait.timer = None
        if slot.waits is not None and wait in slot.waits:
            slot.waits.remove(wait)
            if not slot.waits:
                slot.waits = None
        self.stats["unacked"] += 1
        wait.resolve(events.stored(Status.UNACKED, wait.seq))

    def _end_waits(self, slot: _Slot, outcome: Callable[[_AckWait], RecipientResult]) -> None:
        waits, slot.waits = slot.waits, None
        for wait in waits or ():
            self.stats["unacked"] += 1
            wait.resolve(outcome(wait))

    def is_attached(self, key: ConnectionKey, sink: Sink) -> bool:
        slot = self._slots.get(key)
        return slot is not None and slot.sink is sink

    def mailbox(self, key: ConnectionKey) -> Mailbox | None:
        slot = self._slots.get(key)
        return None if slot is None else slot.mailbox

    @property
    def connections(self) -> int:
        return len(self._slots)

    @property
    def attached(self) -> int:
        """Keys with a browser transport attached now, in constant time (the control
        heartbeat's live connections); gauges() scans for the same number."""
        return self._attached

    @property
    def mailboxes(self) -> int:
        """Keys with a mailbox (attached, lingering, waiting for a browser)."""
        return len(self._slots)

    def gauges(self) -> dict[str, int]:
        """Sizes of the per-key and per-request state (/orbited/health): what a soak
        watches for growth (bench/README.md, "soak")."""
        waits = sum(len(s.waits) for s in self._slots.values() if s.waits)
        return {
            "mailboxes": len(self._slots),
            "attached": sum(1 for s in self._slots.values() if s.sink is not None),
            "lingering": sum(1 for s in self._slots.values() if s.linger_call is not None),
            "queued_events": sum(len(s.mailbox) for s in self._slots.values()),
            "ack_waits": waits,
            "dedup_entries": len(self.dedup),
            "dedup_bytes": self.dedup.size,
            "mailbox_bytes": self.mailbox_bytes,
            "inflight_requests": self.dedup.inflight,
            "incoming_routes": len(self._incoming),
        }

    def spread(self) -> float:
        """Seconds over which this node's browsers should spread their first reconnect
        when they lose it: mailboxes (attached and lingering browsers) / reconnect_rate,
        rounded up to the millisecond, at most SPREAD_MAX (docs/protocol.md, "Frames")."""
        rate = self.config.reconnect_rate
        if rate <= 0:
            return 0.0
        ms = math.ceil(len(self._slots) * 1000 / rate - 1e-9)
        return min(SPREAD_MAX, ms / 1000)

    def keepalive_tick(self) -> None:
        """Ping every transport that has been silent for the keepalive interval; the ping
        carries the current spread hint (one frame built per tick)."""
        deadline = self.clock.seconds() - self.config.keepalive
        ping = Frame(frames.ping(self.spread()))
        for slot in list(self._slots.values()):
            sink = slot.sink
            if sink is not None and sink.wants_pings and sink.last_write <= deadline:
                sink.deliver([ping])

    def _release(self, slot: _Slot, reason: str) -> None:
        """End a slot's linger and tell its browser, if attached, to reconnect."""
        if slot.linger_call is not None:
            slot.linger_call.cancel()
            slot.linger_call = None
        sink = self._set_sink(slot, None)
        if sink is not None:
            try:
                sink.reconnect(reason)
            except Exception:
                self.log.failure("telling a browser to reconnect failed")

    def shutdown(self, reason: str) -> None:
        """Tell every browser to reconnect; the node is going away."""
        self.stopped = True
        self._complete_all()
        for slot in list(self._slots.values()):
            if self.owned is not None:  # in a cluster the route's next owner takes a resend
                self._end_waits(slot, partial(_moved_away, slot.route, None))
            else:
                self._end_waits(slot, lambda wait: events.stored(Status.UNACKED, wait.seq))
            self._release(slot, reason)
        self._slots.clear()
        self.mailbox_bytes = 0

    # -- web-app side -------------------------------------------------------------------

    def handle_request(self, body: bytes) -> bytes | defer.Deferred[bytes]:
        """The SP front end's handler: one request body in, one reply body out
        (``answer`` without the success flag)."""
        out = answer(self, body)
        # isinstance(x, tuple), not isinstance(x, Deferred): Deferred is an ABC (Awaitable),
        # whose isinstance is a Python call; a builtin type's is not (per request).
        if isinstance(out, tuple):
            return out[1]
        return out.addCallback(lambda a: a[1])

    def dispatch(
        self, request: events.EventRequest
    ) -> DispatchResult | defer.Deferred[DispatchResult]:
        """Deliver one event and say what became of it for each recipient; a Deferred
        when the outcome waits (acknowledged mode, or a route being handed over). A resend
        of a remembered request gets the first outcome again, marked as a duplicate, and
        delivers nothing."""
        dedup = self.dedup
        batch = self._batch
        if batch.open:  # forget_old ran when it began
            now = batch.now
        else:
            now = self.clock.seconds()
            dedup.forget_old(now)
        digest = request.digest
        remembered = dedup.reply(digest, now)
        if remembered is not None:
            self.stats["duplicates"] += 1
            return events.decode_reply(remembered)._replace(duplicate=True)
        if dedup.pending(digest):  # the first one's outcome is not ready yet
            self.stats["duplicates"] += 1
            resend: defer.Deferred[DispatchResult] = defer.Deferred()
            dedup.wait(digest, resend)
            return resend
        self.stats["events"] += 1
        eid = frames.event_id(request.event_id)  # once per request, shared by the mailboxes
        recipients = request.recipients
        if len(recipients) == 1:  # the common case: no duplicate keys to look for
            only = self._deliver(recipients[0], request.payload, request.ack, eid)
            if isinstance(only, tuple):  # a RecipientResult, not a Deferred (see above)
                return self._answered(request, now, [only])
            results: list[RecipientResult | defer.Deferred[RecipientResult]] = [only]
            waits = True
        else:
            results = []
            seen: dict[ConnectionKey, RecipientResult | defer.Deferred[RecipientResult]] = {}
            waits = False
            for key in recipients:
                entry = seen.get(key)
                if entry is None:
                    entry = seen[key] = self._deliver(key, request.payload, request.ack, eid)
                    waits = waits or isinstance(entry, defer.Deferred)
                results.append(entry)
        if not waits:
            return self._answered(request, now, results)  # type: ignore[arg-type]
        dedup.begin(digest)
        gathered = defer.gatherResults(
            [r if isinstance(r, defer.Deferred) else defer.succeed(r) for r in results],
            consumeErrors=True,
        )

        def answered(parts: list[RecipientResult]) -> DispatchResult:
            outcome = self._answered(request, self.clock.seconds(), parts)
            resent = outcome._replace(duplicate=True)
            for waiter in dedup.finish(digest):
                waiter.callback(resent)
            return outcome

        def failed(failure: Any) -> Any:
            for waiter in dedup.finish(digest):
                waiter.errback(failure)
            return failure

        return gathered.addCallbacks(answered, failed)

    def _answered(
        self, request: events.EventRequest, now: float, results: list[RecipientResult]
    ) -> DispatchResult:
        """The outcome of a request, encoded once: the dedup memory keeps its bytes."""
        reply = events.ok_reply(request.event_id, [r.encode() for r in results])
        self.dedup.remember(request.digest, reply, now)
        return _new(DispatchResult, (request.event_id, tuple(results), False, reply))

    def _deliver(
        self, key: ConnectionKey, payload: bytes, ack: float | None = None,
        eid: bytes | None = None,
    ) -> RecipientResult | defer.Deferred[RecipientResult]:  # fmt: skip
        slot = self._slots.get(key)
        if slot is None:
            if self.owned is not None:
                route = route_of(key, self.routes)
                if route not in self.owned:
                    self.stats["moved"] += 1
                    return events.moved(route, self.moved_to.get(route))
                incoming = self._incoming.get(route)
                if incoming is not None:  # after the old owner's mailbox, in order
                    later: defer.Deferred[RecipientResult] = defer.Deferred()

                    def deliver_later() -> None:
                        try:
                            out = self._deliver(key, payload, ack, eid)
                        except Exception:
                            later.errback()
                            return
                        if isinstance(out, defer.Deferred):
                            out.chainDeferred(later)
                        else:
                            later.callback(out)

                    incoming.deliveries.append(deliver_later)
                    return later
            if ack is None:
                self.stats["no_connection"] += 1
                return events.NO_CONNECTION_RECIPIENT
            if self._full(payload):
                return events.FULL_RECIPIENT
            # Acknowledged mode: keep it for the browser (e.g. one reconnecting after its
            # node crashed and this one took the route over); `unacked` if none comes.
            slot = self._new_slot(key, route_of(key, self.routes), online=False)
            slot.linger_call = self.clock.callLater(self.config.linger, self._expire, key, slot)
        if self.mailbox_bytes + len(payload) > self.config.mailbox_total_bytes:
            self.stats["full"] += 1
            return events.FULL_RECIPIENT
        mailbox = slot.mailbox
        seq, dropped, _, _ = mailbox.append(payload, eid)
        self._recount(slot)
        sink = slot.sink
        # tuple.__new__: a NamedTuple's own __new__ is a Python call (per recipient).
        if sink is not None and sink.deliver(
            [_new(Frame, (frames.event(seq, payload, eid), seq, mailbox.stream))]
        ):
            mailbox.mark_delivered(seq)
            self.stats["delivered"] += 1
            status = DELIVERED
        else:
            self.stats["queued"] += 1
            status = QUEUED
        if ack is None:
            return _new(RecipientResult, (status, seq, dropped, None, None))
        wait = _AckWait(seq, defer.Deferred())
        wait.timer = self.clock.callLater(ack, self._ack_timeout, slot, wait)
        if slot.waits is None:
            slot.waits = []
        slot.waits.append(wait)
        return wait.deferred

    def _full(self, payload: bytes) -> bool:
        """Would ``payload`` take the node's mailboxes past mailbox_total_bytes? Then it is
        refused (status "full"), not stored: the web app sees it and may resend later;
        evicting other keys' events to make room would lose them silently."""
        if self.mailbox_bytes + len(payload) <= self.config.mailbox_total_bytes:
            return False
        self.stats["full"] += 1
        return True


Answer = tuple[bool, bytes]  # (success, reply body): HTTP publish answers 400 on False


def answer(hub: Hub, body: bytes) -> Answer | defer.Deferred[Answer]:
    """The bytes edge of the event protocol (docs/protocol.md): parse a request body,
    dispatch it and encode the reply, saying whether it is a success. The SP (REP) and
    HTTP publish front ends call this; a Deferred when the reply waits."""
    try:
        request = events.parse_request(body, hub.config.requests)
    except events.RequestError as e:
        hub.stats["bad_requests"] += 1
        return False, events.error_reply(e)
    if isinstance(request, events.PingRequest):
        return True, events.ok_reply(request.event_id, [])
    try:
        outcome = hub.dispatch(request)
    except Exception:
        return False, _failed(hub, request)
    if isinstance(outcome, tuple):  # a DispatchResult (Hub.handle_request: why not Deferred)
        return True, events.encode_reply(outcome)
    return outcome.addCallbacks(
        lambda done: (True, events.encode_reply(done)),
        lambda failure: (False, _failed(hub, request, failure)),
    )


def _failed(hub: Hub, request: events.EventRequest, failure: Any = None) -> bytes:
    hub.log.failure("dispatch of {event_id} failed", failure, event_id=request.event_id)
    error = events.RequestError("internal_error", "the node failed", request.event_id)
    return events.error_reply(error)
