"""The node core: mailboxes by connection key, attached transports, linger, dispatch.

Transports attach a Sink for a key; the web app's event requests (decoded by
orbited.node.events) are appended to each recipient's mailbox and written to the attached
sink if there is one. Also owns the two waits that make delivery lossless
(docs/protocol.md): requests in the acknowledged mode are answered once the browser
acknowledged, and routes HaloD moves here from a live node are held until the old
owner's mailboxes arrive (the hand-off). Time comes from an injected IReactorTime so
tests drive it with twisted.internet.task.Clock; no sockets here.
"""

from __future__ import annotations

import json
import math
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from orbited.core.hashing import DEFAULT_ROUTES, route_of
from orbited.core.keys import ConnectionKey, KeyError_
from orbited.node import events, frames
from orbited.node.mailbox import _POSITION, Entry, Mailbox, MailboxLimits, Position


class Sink(Protocol):
    """A transport attached to one key (a WebSocket, a pending long-poll, ...)."""

    last_write: float
    wants_pings: bool  # streaming transports do; a held long-poll ends by its own timeout

    def deliver(self, frames: list[bytes]) -> bool:
        """Write frames to the browser; False if this transport cannot take them now."""

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
    dedup_window: float = 300.0  # seconds a request is remembered to ignore resends
    dedup_max: int = 100_000  # requests remembered at most
    dedup_max_bytes: int = 64 * 1024 * 1024  # bytes of remembered replies at most
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


SPREAD_MAX = 30.0  # seconds: the spread hint's bound, however many browsers a node has

FULL_RESULT = b'{"status":"full"}'  # the node's mailboxes hold mailbox_total_bytes


class _AckWait:
    """A request in the acknowledged mode waiting for the browser to confirm ``seq``."""

    __slots__ = ("seq", "deferred", "timer")

    def __init__(self, seq: int, deferred: defer.Deferred[bytes]) -> None:
        self.seq = seq
        self.deferred = deferred
        self.timer: IDelayedCall | None = None

    def resolve(self, result: bytes) -> None:
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


class _HeldAttach:
    __slots__ = ("key", "sink", "after", "gone")

    def __init__(self, key: ConnectionKey, sink: Sink, after: Position | None) -> None:
        self.key, self.sink, self.after = key, sink, after
        self.gone = False  # the transport closed while it waited


class _Incoming:
    """A route HaloD moved here from a live node: deliveries and attaches for its keys
    wait (each in arrival order) until the old owner's mailboxes arrive or time out."""

    __slots__ = ("deliveries", "attaches", "timer")

    def __init__(self, timer: IDelayedCall) -> None:
        self.timer = timer
        self.deliveries: list[Callable[[], Any]] = []
        self.attaches: list[_HeldAttach] = []


class Hub:
    log = Logger()

    def __init__(self, clock: IReactorTime, config: HubConfig, epoch: str | None = None) -> None:
        self.clock = clock
        self.config = config
        self.epoch = epoch or secrets.token_urlsafe(6)
        self._streams = 0
        self._slots: dict[ConnectionKey, _Slot] = {}
        self._attached = 0  # slots with a sink, kept by _set_sink (see ``attached``)
        self._recent: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        self._recent_bytes = 0
        self.stopped = False
        # Routes this node serves: None when standalone (every route); with HaloD, what it
        # assigned (nothing until it has). moved_to: new owners' SP addresses, for replies.
        self.routes = config.routes
        self.owned: frozenset[int] | None = None
        self.moved_to: dict[int, str | None] = {}
        # Called with ("signon" | "signoff", key): a key's mailbox created / expired.
        self.presence: Callable[[str, ConnectionKey], None] | None = None
        self._incoming: dict[int, _Incoming] = {}
        self._inflight: dict[bytes, list[defer.Deferred[bytes]]] = {}
        # Payload bytes of all mailboxes (the node-wide cap, mailbox_total_bytes); each
        # slot's share is recounted after the hub changes its mailbox (_recount).
        self.mailbox_bytes = 0
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
            incoming = self._incoming.get(route)
            if incoming is not None:  # its mailbox may be on the way: resume from it
                incoming.attaches.append(_HeldAttach(key, sink, after))
                return None
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
        out = [
            frames.hello(
                mailbox.stream, self.config.keepalive, replay.reset, replay.since, self.spread()
            )
        ]
        if replay.gap is not None:
            out.append(frames.gap(*replay.gap))
        out.extend(frames.event(seq, payload, eid) for seq, payload, eid in replay.events)
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
            for incoming in self._incoming.values():
                for held in incoming.attaches:
                    if held.sink is sink:  # closed while its route was held
                        held.gone = True
            return
        self._set_sink(slot, None)
        slot.linger_call = self.clock.callLater(self.config.linger, self._expire, key, slot)

    def _expire(self, key: ConnectionKey, slot: _Slot) -> None:
        slot.linger_call = None
        if self._slots.get(key) is slot and slot.sink is None:
            del self._slots[key]
            self._forget(slot)
            self._end_waits(slot, lambda wait: events.result(events.UNACKED, wait.seq))
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
            wait.resolve(events.result(events.ACKED, wait.seq))
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
        wait.resolve(events.result(events.UNACKED, wait.seq))

    def _end_waits(self, slot: _Slot, outcome: Callable[[_AckWait], bytes]) -> None:
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
            "dedup_entries": len(self._recent),
            "dedup_bytes": self._recent_bytes,
            "mailbox_bytes": self.mailbox_bytes,
            "inflight_requests": len(self._inflight),
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
        ping = frames.ping(self.spread())
        for slot in list(self._slots.values()):
            sink = slot.sink
            if sink is not None and sink.wants_pings and sink.last_write <= deadline:
                sink.deliver([ping])

    # -- routes (HaloD) -------------------------------------------------------------------

    def assign(
        self, routes: Iterable[int], total: int | None = None, incoming: Iterable[int] = ()
    ) -> int:
        """HaloD's assignment: serve exactly ``routes`` of ``total``. Browsers of keys on
        routes no longer served are told to reconnect and their mailboxes dropped.
        ``incoming`` routes come from a live node that hands their mailboxes over: their
        keys wait for it (``handoff_timeout`` at most). Returns how many keys were evicted."""
        new = frozenset(routes)
        if total is not None and total != self.routes:
            self.routes = total
            for key, slot in self._slots.items():
                slot.route = route_of(key, total)
            self.owned = None  # every slot is checked against the new assignment
        previous = frozenset(range(1, self.routes + 1)) if self.owned is None else self.owned
        self.owned = new
        for route in new:
            self.moved_to.pop(route, None)
        lost = previous - new
        for route in lost:
            self._complete(route, timed_out=False)
        for route in (new - previous) & frozenset(incoming):
            if route not in self._incoming:
                timer = self.clock.callLater(
                    self.config.handoff_timeout, self._complete, route, True
                )
                self._incoming[route] = _Incoming(timer)
        return self._evict(lost)

    def route_moved(
        self, moves: dict[int, str | None], handoff: Iterable[int] = (),
        exports: list[dict[str, Any]] | None = None,
    ) -> int:  # fmt: skip
        """'route moved': these routes now reach another node (SP address, if known).
        The mailboxes of ``handoff`` routes are appended to ``exports`` (the new owner
        resumes them) instead of being dropped."""
        self.moved_to.update(moves)
        owned = frozenset(range(1, self.routes + 1)) if self.owned is None else self.owned
        self.owned = owned - moves.keys()
        return self._evict(frozenset(moves), frozenset(handoff), exports)

    def _evict(
        self, routes: frozenset[int], handoff: frozenset[int] = frozenset(),
        exports: list[dict[str, Any]] | None = None,
    ) -> int:  # fmt: skip
        if not routes:
            return 0
        evicted = 0
        for key, slot in list(self._slots.items()):
            route = slot.route
            if route not in routes:
                continue
            del self._slots[key]
            self._forget(slot)
            evicted += 1
            handed = exports is not None and route in handoff
            if handed:
                assert exports is not None
                exports.append(export_entry(key, slot.mailbox, route, slot.online))
                self.stats["handoff_out"] += 1
                # The new owner has the events; what was not confirmed stays unconfirmed.
                self._end_waits(slot, lambda wait: events.result(events.UNACKED, wait.seq))
            else:  # the events are gone with the mailbox: the web app should resend
                to = self.moved_to.get(route)
                self._end_waits(slot, lambda wait, r=route, t=to: events.moved_result(r, t))
            self._release(slot, "route_moved")
            if not handed and slot.online and self.presence is not None:
                self.presence("signoff", key)  # handed over keys stay online, elsewhere
        if evicted:
            self.log.info("{n} keys of moved routes told to reconnect", n=evicted)
        return evicted

    def handoff_received(self, entries: list[dict[str, Any]], done: Iterable[int]) -> int:
        """Mailboxes from a moved route's old owner (docs/halod-protocol.md, "Hand-off"),
        then the routes whose hand-off is complete. Returns how many were installed."""
        installed = 0
        for entry in entries:
            try:
                key, route, mailbox = self._import_entry(entry)
            except (KeyError, TypeError, ValueError, KeyError_) as e:
                self.log.warn("ignoring a malformed hand-off entry: {e}", e=e)
                continue
            slot = self._slots.get(key)
            if slot is not None:  # a continuation of a large mailbox, or a late arrival
                have = slot.mailbox
                if route in self._incoming and have.stream == mailbox.stream:
                    slot.mailbox = Mailbox.restored(
                        have.stream, self.config.mailbox, max(have.next_seq, mailbox.next_seq),
                        max(have.acked, mailbox.acked), have.export() + mailbox.export(),
                    )  # fmt: skip
                    self._recount(slot)
                continue
            if route not in self._incoming:
                continue  # timed out, or not moved here: keep what this node has
            slot = self._slots[key] = _Slot(mailbox, route, entry.get("online") is not False)
            self._recount(slot)  # counted even past the cap: refusing it would lose events
            slot.linger_call = self.clock.callLater(self.config.linger, self._expire, key, slot)
            installed += 1
            self.stats["handoff_in"] += 1
        for route in done:
            self._complete(route, timed_out=False)
        return installed

    def _import_entry(self, entry: dict[str, Any]) -> tuple[ConnectionKey, int, Mailbox]:
        key = ConnectionKey.from_json(entry["key"])
        route = route_of(key, self.routes)
        stream, next_seq, acked = entry["stream"], entry["next_seq"], entry["acked"]
        if not isinstance(stream, str) or not _POSITION.match(f"{stream}:0"):
            raise ValueError("bad stream id")
        if not all(isinstance(n, int) and n >= 0 for n in (next_seq, acked)):
            raise ValueError("bad sequence numbers")
        imported = [_import_event(event) for event in entry["events"]]
        return key, route, Mailbox.restored(
            stream, self.config.mailbox, next_seq, acked, imported
        )  # fmt: skip

    def _complete(self, route: int, timed_out: bool) -> None:
        """A held route is ready: run its deliveries, then its attaches, in order."""
        incoming = self._incoming.pop(route, None)
        if incoming is None:
            return
        if timed_out:
            self.stats["handoff_timeouts"] += 1
            self.log.warn("no hand-off for route {route} in time; serving it afresh", route=route)
        elif incoming.timer.active():
            incoming.timer.cancel()
        for deliver in incoming.deliveries:
            deliver()
        for held in incoming.attaches:
            if not held.gone:
                self.attach(held.key, held.sink, held.after)

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
        for route in list(self._incoming):
            self._complete(route, timed_out=False)
        for slot in list(self._slots.values()):
            if self.owned is not None:  # in a cluster the route's next owner takes a resend
                self._end_waits(slot, lambda wait, r=slot.route: events.moved_result(r, None))
            else:
                self._end_waits(slot, lambda wait: events.result(events.UNACKED, wait.seq))
            self._release(slot, reason)
        self._slots.clear()
        self.mailbox_bytes = 0

    # -- web-app side -------------------------------------------------------------------

    def handle_request(self, body: bytes) -> bytes | defer.Deferred[bytes]:
        """One SP request body in, one reply body out (docs/protocol.md); a Deferred
        when the reply waits (acknowledged mode, or a route being handed over)."""
        out = self.handle(body)
        if isinstance(out, defer.Deferred):
            return out.addCallback(lambda answer: answer[1])
        return out[1]

    def handle(self, body: bytes) -> tuple[bool, bytes] | defer.Deferred[tuple[bool, bytes]]:
        """Like handle_request, also saying whether the reply is a success."""
        try:
            request = events.parse_request(body, self.config.requests)
        except events.RequestError as e:
            self.stats["bad_requests"] += 1
            return False, events.error_reply(e)
        if isinstance(request, events.PingRequest):
            return True, events.ok_reply(request.event_id, [])
        try:
            reply = self.dispatch(request)
        except Exception:
            return False, self._failed(request)
        if isinstance(reply, defer.Deferred):
            return reply.addCallbacks(
                lambda answer: (True, answer),
                lambda failure: (False, self._failed(request, failure)),
            )
        return True, reply

    def _failed(self, request: events.EventRequest, failure: Any = None) -> bytes:
        self.log.failure("dispatch of {event_id} failed", failure, event_id=request.event_id)
        error = events.RequestError("internal_error", "the node failed", request.event_id)
        return events.error_reply(error)

    def dispatch(self, request: events.EventRequest) -> bytes | defer.Deferred[bytes]:
        """Deliver one event and return the reply; a resend of a remembered request gets
        the first reply again, marked as a duplicate, and delivers nothing."""
        now = self.clock.seconds()
        self._forget_old(now)
        digest = request.digest
        remembered = self._recent.get(digest)
        if remembered is not None:
            self.stats["duplicates"] += 1
            return events.mark_duplicate(remembered[1])
        waiting_resends = self._inflight.get(digest)
        if waiting_resends is not None:  # the first one's reply is not ready yet
            self.stats["duplicates"] += 1
            resend: defer.Deferred[bytes] = defer.Deferred()
            waiting_resends.append(resend)
            return resend
        self.stats["events"] += 1
        results: list[bytes | defer.Deferred[bytes]] = []
        seen: dict[ConnectionKey, bytes | defer.Deferred[bytes]] = {}
        waits = False
        eid = frames.event_id(request.event_id)  # once per request, shared by the mailboxes
        for key in request.recipients:
            entry = seen.get(key)
            if entry is None:
                entry = seen[key] = self._deliver(key, request.payload, request.ack, eid)
                waits = waits or not isinstance(entry, bytes)
            results.append(entry)
        if not waits:
            reply = events.ok_reply(request.event_id, results)  # type: ignore[arg-type]
            self._remember(digest, now + self.config.dedup_window, reply)
            return reply
        self._inflight[digest] = []
        gathered = defer.gatherResults(
            [r if isinstance(r, defer.Deferred) else defer.succeed(r) for r in results],
            consumeErrors=True,
        )

        def answered(parts: list[bytes]) -> bytes:
            reply = events.ok_reply(request.event_id, parts)
            self._remember(digest, self.clock.seconds() + self.config.dedup_window, reply)
            for resend in self._inflight.pop(digest, ()):
                resend.callback(events.mark_duplicate(reply))
            return reply

        def failed(failure: Any) -> Any:
            for resend in self._inflight.pop(digest, ()):
                resend.errback(failure)
            return failure

        return gathered.addCallbacks(answered, failed)

    def _deliver(
        self, key: ConnectionKey, payload: bytes, ack: float | None = None,
        eid: bytes | None = None,
    ) -> bytes | defer.Deferred[bytes]:  # fmt: skip
        slot = self._slots.get(key)
        if slot is None:
            if self.owned is not None:
                route = route_of(key, self.routes)
                if route not in self.owned:
                    self.stats["moved"] += 1
                    return events.moved_result(route, self.moved_to.get(route))
                incoming = self._incoming.get(route)
                if incoming is not None:  # after the old owner's mailbox, in order
                    later: defer.Deferred[bytes] = defer.Deferred()
                    incoming.deliveries.append(
                        lambda: defer.maybeDeferred(
                            self._deliver, key, payload, ack, eid
                        ).chainDeferred(later)
                    )
                    return later
            if ack is None:
                self.stats["no_connection"] += 1
                return events.NO_CONNECTION_RESULT
            if self._full(payload):
                return FULL_RESULT
            # Acknowledged mode: keep it for the browser (e.g. one reconnecting after its
            # node crashed and this one took the route over); `unacked` if none comes.
            slot = self._new_slot(key, route_of(key, self.routes), online=False)
            slot.linger_call = self.clock.callLater(self.config.linger, self._expire, key, slot)
        if self._full(payload):
            return FULL_RESULT
        mailbox = slot.mailbox
        seq, dropped = mailbox.append(payload, eid)
        self._recount(slot)
        sink = slot.sink
        if sink is not None and sink.deliver([frames.event(seq, payload, eid)]):
            mailbox.mark_delivered(seq)
            self.stats["delivered"] += 1
            status = events.DELIVERED
        else:
            self.stats["queued"] += 1
            status = events.QUEUED
        if ack is None:
            return events.result(status, seq, dropped)
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

    def _remember(self, digest: bytes, expires: float, reply: bytes) -> None:
        recent = self._recent
        recent[digest] = (expires, reply)
        self._recent_bytes += len(reply)
        config = self.config
        while len(recent) > config.dedup_max or self._recent_bytes > config.dedup_max_bytes:
            _, (_, old) = recent.popitem(last=False)
            self._recent_bytes -= len(old)

    def _forget_old(self, now: float) -> None:
        recent = self._recent
        while recent:
            digest, (expires, reply) = next(iter(recent.items()))
            if expires > now:
                break
            del recent[digest]
            self._recent_bytes -= len(reply)


def export_entry(
    key: ConnectionKey, mailbox: Mailbox, route: int, online: bool = True
) -> dict[str, Any]:
    """A mailbox as the hand-off message carries it (docs/halod-protocol.md, "Hand-off"):
    payloads are JSON text already, so they travel as strings; an event is
    ``[seq, payload, id]`` (``[seq, payload]`` when it has no id)."""
    return {
        "key": key.to_json(),
        "route": route,
        "stream": mailbox.stream,
        "next_seq": mailbox.next_seq,
        "acked": mailbox.acked,
        "events": [
            [seq, payload.decode()] if eid is None else [seq, payload.decode(), json.loads(eid)]
            for seq, payload, eid in mailbox.export()
        ],
        "online": online,
    }


def _import_event(event: list[Any]) -> Entry:
    """A hand-off event, ``[seq, payload, id]`` or, from a node of the previous version,
    ``[seq, payload]`` (no id: its frames go out without one)."""
    if not isinstance(event, list) or len(event) not in (2, 3):
        raise ValueError("an event must be [seq, payload] or [seq, payload, id]")
    seq, payload = int(event[0]), event[1]
    if not isinstance(payload, str):
        raise ValueError("an event's payload must be a string")
    if len(event) == 2:
        return seq, payload.encode(), None
    eid = event[2]
    if not isinstance(eid, str) or not 0 < len(eid) <= events.MAX_EVENT_ID:
        raise ValueError(f"an event id must be a string of 1-{events.MAX_EVENT_ID} characters")
    return seq, payload.encode(), frames.event_id(eid)
