"""The node core: mailboxes by connection key, attached transports, linger, dispatch.

Transports attach a Sink for a key; the web app's event requests (decoded by
orbited.events) are appended to each recipient's mailbox and written to the attached
sink if there is one. Time comes from an injected IReactorTime so tests drive it with
twisted.internet.task.Clock; no sockets here.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from orbited import events, frames
from orbited.hashing import DEFAULT_ROUTES, route_of
from orbited.keys import ConnectionKey
from orbited.mailbox import Mailbox, MailboxLimits, Position


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


class _Slot:
    __slots__ = ("mailbox", "sink", "linger_call", "route")

    def __init__(self, mailbox: Mailbox, route: int) -> None:
        self.mailbox = mailbox
        self.route = route
        self.sink: Sink | None = None
        self.linger_call: IDelayedCall | None = None


class Hub:
    log = Logger()

    def __init__(self, clock: IReactorTime, config: HubConfig, epoch: str | None = None) -> None:
        self.clock = clock
        self.config = config
        self.epoch = epoch or secrets.token_urlsafe(6)
        self._streams = 0
        self._slots: dict[ConnectionKey, _Slot] = {}
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
        self.stats = {
            "events": 0,
            "delivered": 0,
            "queued": 0,
            "no_connection": 0,
            "duplicates": 0,
            "bad_requests": 0,
            "moved": 0,
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
            self._streams += 1
            mailbox = Mailbox(f"{self.epoch}.{self._streams:x}", self.config.mailbox)
            slot = self._slots[key] = _Slot(mailbox, route)
            if self.presence is not None:
                self.presence("signon", key)
        else:
            if slot.linger_call is not None:
                slot.linger_call.cancel()
                slot.linger_call = None
            previous, slot.sink = slot.sink, None
            if previous is not None and previous is not sink:
                previous.replaced()
        mailbox = slot.mailbox
        replay = mailbox.replay(after)
        out = [frames.hello(mailbox.stream, self.config.keepalive, replay.reset)]
        if replay.gap is not None:
            out.append(frames.gap(*replay.gap))
        out.extend(frames.event(seq, payload) for seq, payload in replay.events)
        slot.sink = sink
        if sink.deliver(out) and replay.events:
            mailbox.mark_delivered(replay.events[-1][0])
        return mailbox

    def detach(self, key: ConnectionKey, sink: Sink) -> None:
        slot = self._slots.get(key)
        if slot is None or slot.sink is not sink:
            return
        slot.sink = None
        slot.linger_call = self.clock.callLater(self.config.linger, self._expire, key, slot)

    def _expire(self, key: ConnectionKey, slot: _Slot) -> None:
        slot.linger_call = None
        if self._slots.get(key) is slot and slot.sink is None:
            del self._slots[key]
            if self.presence is not None:
                self.presence("signoff", key)
            if len(slot.mailbox) > slot.mailbox.acked:
                self.log.info("mailbox {key} expired", key=key)

    def ack(self, key: ConnectionKey, seq: int) -> None:
        slot = self._slots.get(key)
        if slot is not None:
            slot.mailbox.ack(seq)

    def is_attached(self, key: ConnectionKey, sink: Sink) -> bool:
        slot = self._slots.get(key)
        return slot is not None and slot.sink is sink

    def mailbox(self, key: ConnectionKey) -> Mailbox | None:
        slot = self._slots.get(key)
        return None if slot is None else slot.mailbox

    @property
    def connections(self) -> int:
        return len(self._slots)

    def keepalive_tick(self) -> None:
        """Ping every transport that has been silent for the keepalive interval."""
        deadline = self.clock.seconds() - self.config.keepalive
        for slot in list(self._slots.values()):
            sink = slot.sink
            if sink is not None and sink.wants_pings and sink.last_write <= deadline:
                sink.deliver([frames.PING])

    # -- routes (HaloD) -------------------------------------------------------------------

    def assign(self, routes: Iterable[int], total: int | None = None) -> int:
        """HaloD's assignment: serve exactly ``routes`` of ``total``. Browsers of keys on
        routes no longer served are told to reconnect and their mailboxes dropped.
        Returns how many keys were evicted."""
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
        return self._evict(lost)

    def route_moved(self, moves: dict[int, str | None]) -> int:
        """'route moved': these routes now reach another node (SP address, if known)."""
        self.moved_to.update(moves)
        owned = frozenset(range(1, self.routes + 1)) if self.owned is None else self.owned
        self.owned = owned - moves.keys()
        return self._evict(frozenset(moves))

    def _evict(self, routes: frozenset[int]) -> int:
        if not routes:
            return 0
        evicted = 0
        for key, slot in list(self._slots.items()):
            if slot.route not in routes:
                continue
            del self._slots[key]
            evicted += 1
            self._release(slot, "route_moved")
            if self.presence is not None:
                self.presence("signoff", key)
        if evicted:
            self.log.info("{n} keys of moved routes told to reconnect", n=evicted)
        return evicted

    def _release(self, slot: _Slot, reason: str) -> None:
        """End a slot's linger and tell its browser, if attached, to reconnect."""
        if slot.linger_call is not None:
            slot.linger_call.cancel()
            slot.linger_call = None
        sink, slot.sink = slot.sink, None
        if sink is not None:
            try:
                sink.reconnect(reason)
            except Exception:
                self.log.failure("telling a browser to reconnect failed")

    def shutdown(self, reason: str) -> None:
        """Tell every browser to reconnect; the node is going away."""
        self.stopped = True
        for slot in list(self._slots.values()):
            self._release(slot, reason)
        self._slots.clear()

    # -- web-app side -------------------------------------------------------------------

    def handle_request(self, body: bytes) -> bytes:
        """One SP request body in, one reply body out (docs/protocol.md)."""
        return self.handle(body)[1]

    def handle(self, body: bytes) -> tuple[bool, bytes]:
        """Like handle_request, also saying whether the reply is a success."""
        try:
            request = events.parse_request(body, self.config.requests)
        except events.RequestError as e:
            self.stats["bad_requests"] += 1
            return False, events.error_reply(e)
        if isinstance(request, events.PingRequest):
            return True, events.ok_reply(request.event_id, [])
        try:
            return True, self.dispatch(request)
        except Exception:
            self.log.failure("dispatch of {event_id} failed", event_id=request.event_id)
            error = events.RequestError("internal_error", "the node failed", request.event_id)
            return False, events.error_reply(error)

    def dispatch(self, request: events.EventRequest) -> bytes:
        """Deliver one event and return the reply; a resend of a remembered request gets
        the first reply again, marked as a duplicate, and delivers nothing."""
        now = self.clock.seconds()
        self._forget_old(now)
        remembered = self._recent.get(request.digest)
        if remembered is not None:
            self.stats["duplicates"] += 1
            return events.mark_duplicate(remembered[1])
        self.stats["events"] += 1
        results: list[bytes] = []
        seen: dict[ConnectionKey, bytes] = {}
        for key in request.recipients:
            entry = seen.get(key)
            if entry is None:
                entry = seen[key] = self._deliver(key, request.payload)
            results.append(entry)
        reply = events.ok_reply(request.event_id, results)
        self._remember(request.digest, now + self.config.dedup_window, reply)
        return reply

    def _deliver(self, key: ConnectionKey, payload: bytes) -> bytes:
        slot = self._slots.get(key)
        if slot is None:
            if self.owned is not None:
                route = route_of(key, self.routes)
                if route not in self.owned:
                    self.stats["moved"] += 1
                    return events.moved_result(route, self.moved_to.get(route))
            self.stats["no_connection"] += 1
            return events.NO_CONNECTION_RESULT
        mailbox = slot.mailbox
        seq, dropped = mailbox.append(payload)
        sink = slot.sink
        if sink is not None and sink.deliver([frames.event(seq, payload)]):
            mailbox.mark_delivered(seq)
            self.stats["delivered"] += 1
            return events.result(events.DELIVERED, seq, dropped)
        self.stats["queued"] += 1
        return events.result(events.QUEUED, seq, dropped)

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
