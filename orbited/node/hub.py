"""The node core: mailboxes by connection key, attached transports, linger, dispatch.

Transports attach a Sink for a key; the web app's event requests (orbited.node.events
parses them into EventRequest) go to ``Hub.dispatch``, which appends the event to each
recipient's mailbox, writes it to the attached sink if there is one, and answers a
DispatchResult. Requests in the acknowledged mode are answered once the browser
acknowledged (the ack waits, here). Resends are recognised by orbited.node.dedup; route
ownership and the hand-off of mailboxes between nodes are orbited.node.handoff's
(RouteOwnership, which Hub extends). Bytes stay at the edge: ``Hub.handle_request`` (the
SP front end's) and ``answer`` (the HTTP publish API's) turn a request body into a reply
body; the most common request is delivered and answered in one place (in ``Hub._dispatch``).
Time comes from an injected
IReactorTime so tests drive it with twisted.internet.task.Clock; no sockets here.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from orbited.core.hashing import DEFAULT_HASH_VERSION, DEFAULT_ROUTES, route_of, route_of_user
from orbited.core.keys import ConnectionKey, KeyError_, Selector, parse_recipient
from orbited.core.latency import LatencyHistogram
from orbited.node import events, frames
from orbited.node.dedup import DedupLimits, DedupMemory
from orbited.node.events import DELIVERED, QUEUED, DispatchResult, RecipientResult, Status
from orbited.node.flush import DeliveryBatch, Flushable
from orbited.node.frames import Frame
from orbited.node.handoff import (
    SPREAD_MAX,
    PresenceChange,
    RouteOwnership,
    _moved_away,
    export_entry,
    spread_for,
)
from orbited.node.mailbox import Mailbox, MailboxLimits, Position
from orbited.node.observe import DeliveryObserver
from orbited.node.users import NullWatcher, UserEntry, UserHold, UserLimits, gcra_take

if TYPE_CHECKING:
    from orbited.node.trace import Tracer

__all__ = ["SPREAD_MAX", "Answer", "Hub", "HubConfig", "Sink", "answer", "export_entry"]


class Sink(Protocol):
    """A transport attached to one key (a WebSocket, a pending long-poll, ...)."""

    last_write: float
    wants_pings: bool  # streaming transports do; a held long-poll ends by its own timeout
    kind: str  # the transport's name in per-key traces: "ws", "sse", "poll" or "iframe"

    def deliver(self, out: list[Frame]) -> bool:
        """Write frames (their ``data``) to the browser, or keep them for the delivery
        batch's flush (``Hub.enlist``, orbited.node.flush: the contract); False if this
        transport cannot take them now. Event frames carry their position (``stream``,
        ``seq``)."""

    def replaced(self) -> None:
        """A newer connection for the same key took over: close without reconnecting."""

    def reconnect(self, reason: str, route: int | None = None, spread: float | None = None) -> None:
        """Tell the browser to reconnect (node shutting down, route moved, rehash) and
        close; ``route``: the key's route now, after a rehash (frames.reconnect)."""

    def closed(self, code: int, reason: str) -> None:
        """End the transport for good, the browser must not reconnect: ``code`` 4429
        ``user_limit`` (the user's connection limit, refuse policy) or 4003 ``displaced``
        (close_oldest). WebSocket: close ``code``; HTTP transports: 429 before anything
        was written, else the ``frames.closed`` frame (docs/protocol.md, "Per-user
        limits")."""


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
    # ping frames, docs/protocol.md). On the lean browser front a node keeps up with
    # 3 200 new WebSocket or SSE connections/s in the connect storm (docs/performance.md;
    # about 170-240 µs of CPU each); at 3 000/s the ~500 browsers of a node spread over
    # 0.17 s and 10 000 over 3.4 s. (At the earlier 1 000/s a drain of 500 browsers kept
    # the last of them waiting half a second for nothing.) The node's `reconnect_rate`
    # config key (docs/operations.md) sets it; this is its default. 0 = no spreading.
    reconnect_rate: float = 3000.0
    # Per-user limits and holds (orbited.node.users; docs/operations.md, "Limits").
    users: UserLimits = UserLimits()
    # The route hash version (docs/hashing.md): 2 hashes the user part only, so all of a
    # user's keys share one owner. HaloD's table's version wins when connected.
    hash_version: int = DEFAULT_HASH_VERSION

    @property
    def dedup(self) -> DedupLimits:
        return DedupLimits(self.dedup_window, self.dedup_max, self.dedup_max_bytes)


_new = tuple.__new__
FULL_RESULT = b'{"status":"full"}'  # the node's mailboxes hold mailbox_total_bytes
# Results that stored nothing and tell the web app to resend (docs/protocol.md): a reply
# made only of these is not remembered, so the resend is dispatched again (a spare that
# answered moved may own the route by then) instead of getting the same reply back.
RESEND = frozenset((Status.MOVED, Status.FULL, Status.LIMITED))

# Seconds after a transport left during which an attach of the same key counts as a
# long-poll cycle (or a quick reconnect): never refused by user_max_connections, and
# counted as attached when another key of the user asks.
CYCLE_GRACE = 2.0
# Seconds a key displaced between two long-polls (close_oldest) is remembered: its next
# poll gets the closed frame (4003) instead of a new mailbox, which would displace another.
DISPLACED_MEMORY = 10.0
LINGER_TICKS = 10  # buckets per second of the linger wheel: expiry at most 0.1 s late
_FLOAT_MAX = 1.7976931348623157e308  # the largest float: NaN and the infinities fail
_NEVER = -math.inf  # one float object shared by every slot that never had a transport leave


class _AckWait:
    """A request in the acknowledged mode waiting for the browser to confirm ``seq``.

    Resolved once (``resolve``; later calls are ignored): it tells the request's gather
    (``gather``, ``index``: the dispatch of plain keys, no Deferred per recipient) and its
    Deferred, if one was asked for (``as_deferred``: wildcards, holds, a hand-off). Its
    timeout is its group's timer (one per request: ``_AckGroup``) or its own ``timer``."""

    __slots__ = ("seq", "replaced", "timer", "group", "result", "gather", "index", "_deferred")

    def __init__(self, seq: int, replaced: int = 0) -> None:
        self.seq = seq
        self.replaced = replaced  # latest-value: events its event superseded (the reply says)
        self.timer: IDelayedCall | None = None
        self.group: _AckGroup | None = None
        self.result: RecipientResult | None = None
        self.gather: _Gather | None = None
        self.index = 0
        self._deferred: defer.Deferred[RecipientResult] | None = None

    def as_deferred(self) -> defer.Deferred[RecipientResult]:
        deferred = self._deferred
        if deferred is None:
            deferred = self._deferred = defer.Deferred()
            if self.result is not None:
                deferred.callback(self.result)
        return deferred

    def resolve(self, result: RecipientResult) -> None:
        if self.result is not None:
            return
        self.result = result
        timer = self.timer
        if timer is not None:
            self.timer = None
            if timer.active():
                timer.cancel()
        group = self.group
        if group is not None:
            group.pending -= 1
            if not group.pending and group.timer is not None:
                if group.timer.active():
                    group.timer.cancel()
                group.timer = None
        gather = self.gather
        if gather is not None:
            gather.settle(self.index, result)
        deferred = self._deferred
        if deferred is not None and not deferred.called:
            deferred.callback(result)


class _AckGroup:
    """The acknowledged-mode waits of one request: they share its ``ack`` timeout from
    the same moment, so one timer ends them all (``Hub._group_timeout``), cancelled when
    the last is resolved (issue 20: a timer per recipient was most of a node's CPU
    in the failover bench)."""

    __slots__ = ("waits", "timer", "pending")

    def __init__(self) -> None:
        self.waits: list[tuple[_Slot, _AckWait]] = []
        self.timer: IDelayedCall | None = None
        self.pending = 0  # waits not resolved yet


class _Gather:
    """A waiting request's results, filled in place; ``deferred`` fires with the list
    once the last is in, or fails with the first failure (``defer.gatherResults``'s
    work without a DeferredList and a Deferred per recipient)."""

    __slots__ = ("results", "left", "deferred")

    def __init__(self, results: list[Any]) -> None:
        self.results = results
        self.left = 0
        self.deferred: defer.Deferred[list[RecipientResult]] = defer.Deferred()

    def settle(self, index: int, result: RecipientResult) -> None:
        self.results[index] = result
        self.left -= 1
        if not self.left and not self.deferred.called:
            self.deferred.callback(self.results)

    def settled(self, result: RecipientResult, index: int) -> RecipientResult:
        self.settle(index, result)
        return result

    def fail(self, failure: Any) -> None:
        if not self.deferred.called:
            self.deferred.errback(failure)
        return None  # consumed, as gatherResults(consumeErrors=True) does


class _Slot:
    __slots__ = (
        "mailbox", "sink", "linger_at", "route", "waits", "online", "counted", "entry", "left",
        "probe", "probe_at", "fanned", "fanned_result", "linger_bucket",
    )  # fmt: skip

    def __init__(
        self, mailbox: Mailbox, route: int, online: bool = True, entry: UserEntry | None = None
    ) -> None:
        self.mailbox = mailbox
        self.route = route
        # Its user's entry in Hub._users (set by Hub._index; _set_sink keeps its count).
        self.entry = entry
        self.left = _NEVER  # hub clock when its last transport left (CYCLE_GRACE)
        self.sink: Sink | None = None
        # Lingering (no transport): when its mailbox expires (Hub._linger); 0.0 otherwise.
        self.linger_at = 0.0
        self.linger_bucket = 0  # the linger wheel's bucket it is filed in; 0: none
        self.waits: list[_AckWait] | None = None  # oldest first; None when none
        # Presence said signon. False for a mailbox an acknowledged-mode event created
        # before any browser came: the browser's first attach signs it on.
        self.online = online
        self.counted = 0  # this mailbox's bytes as last added to Hub.mailbox_bytes
        # The ack-latency probe (Hub.load_report's ack_hist): the seq of an event written
        # to the browser while no probe was pending, and when; 0: none pending.
        self.probe = 0
        self.probe_at = 0.0
        # Hub._fan_out: the mark of the last request that reached it, and its result there
        # (a key named twice in a request gets the event once and the same result).
        self.fanned = 0
        self.fanned_result: Any = None


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
        # Users with a mailbox or a hold here (orbited.node.users), kept in step with
        # _slots by _index / _unindex (and attach's inline copy of _index for a new key),
        # the only places that change either.
        self._users: dict[str, UserEntry] = {}
        self._rate = config.users.rate  # per-user dispatch rate; 0 = off (one test per request)
        self._cap = config.users.max_connections  # per-user connections; 0 = off (per attach)
        # Keys displaced (close_oldest) while between two long-polls -> when (DISPLACED_MEMORY).
        self._displaced: dict[ConnectionKey, float] = {}
        # Replies of recent requests; resends of one whose reply is pending wait for it.
        self.dedup: DedupMemory[defer.Deferred[DispatchResult]] = DedupMemory(config.dedup)
        self.stopped = False
        # Routes this node serves (RouteOwnership): None when standalone (every route);
        # with HaloD, what it assigned (nothing until it has).
        self._init_routes(config.routes, config.hash_version)
        if config.hash_version == 1 and (config.users.max_connections or config.users.rate):
            self.log.warn("user limits are per node with hash_version 1 (docs/hashing.md)")
        # Called with ("signon" | "signoff", key): a key's mailbox created / expired.
        self.presence: Callable[[PresenceChange, ConnectionKey], None] | None = None
        # The offline hook (orbited.node.offline.OfflineWatcher when offline_url is set):
        # told of every watched event's fate. NullWatcher: off (a request asking for it
        # is refused, events.check_node).
        self.offline: Any = NullWatcher()
        # Payload bytes of all mailboxes (the node-wide cap, mailbox_total_bytes); each
        # slot's share is recounted after the hub changes its mailbox (_recount).
        self.mailbox_bytes = 0
        # Frames for one connection coalesced per SP read (orbited.node.flush).
        self._batch = DeliveryBatch()
        self._scope = _BatchScope(self)
        # ``enlist`` is the batch's own (sinks call it once per delivery batch each).
        self.enlist = self._batch.enlist  # type: ignore[method-assign]
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
            "limited": 0,
            "replaced": 0,
            "held": 0,
            "user_refused": 0,
            "user_displaced": 0,
        }
        # Per-key tracing and OpenTelemetry (orbited.node.observe): None when both are off,
        # and then a dispatch costs one test of it (set with ``observe``).
        self.observer: DeliveryObserver | None = None
        self.tracer: Tracer | None = None  # the per-key tracer, for queries and gauges
        self.name: str | None = None  # the node's name (the service sets it), for answers
        self._token: Any = None  # the observer's token of the request being dispatched
        self._token_now = 0.0  # and its time (the hub's clock, read once per request)
        # The heartbeat's load (``load_report``): ack-latency samples since the last
        # report, and attached connections per route with the routes changed since.
        self._ack_hist = LatencyHistogram()
        self._route_attached: dict[int, int] = {}
        self._routes_dirty: set[int] = set()
        self._routes_full_due = True  # the next report sends every route
        self._attach_moved = 0  # stats["moved"] of attaches, not of recipients
        # The linger wheel (``_linger``): slots by the tenth of a second their linger ends
        # in, and the one timer of each such bucket.
        self._wheel: dict[int, list[tuple[ConnectionKey, _Slot]]] = {}
        self._wheel_calls: dict[int, IDelayedCall] = {}
        self._ack_group: _AckGroup | None = None  # the acknowledged-mode request in dispatch
        # ``_hello``'s template (for this config and hash version) and the spread's text
        # (for this many mailboxes; -1: none yet).
        self._hello_for: HubConfig | None = None
        self._hello_hash = 0
        self._hello_template = b""
        self._spread_for = -1
        self._spread_text = b""
        self._spread_value: float | None = None  # the spread _spread_text writes
        self._fan_mark = 0  # _fan_out's requests so far (each marks the slots it reached)

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
        return batch.now if batch._depth else self.clock.seconds()  # (a sink's, per frame)

    # -- browser side -------------------------------------------------------------------

    def attach(self, key: ConnectionKey, sink: Sink, after: Position | None) -> Mailbox | None:
        """Attach ``sink`` as the key's transport and send it what it has not seen yet.

        Returns None when the node is shutting down (the sink was told to reconnect),
        and when the user's connection limit refuses it (``sink.closed(4429, ...)``).
        """
        if self.stopped:
            sink.reconnect("shutdown")
            return None
        slot = self._slots.get(key)
        if slot is None:
            route = route_of(key, self.routes, self.hash_version)
            if self.owned is not None and route not in self.owned:
                # Not ours (any more): the browser retries and HaloD's port for the route
                # now leads to the owner.
                self.stats["moved"] += 1
                self._attach_moved += 1  # not a recipient's result (load_report)
                sink.reconnect("route_moved", route, self.moved_spread.get(route))
                return None
            if self._incoming and self._hold_attach(route, key, sink, after):
                return None  # its mailbox may be on the way: resume from it
            if self._displaced and self._was_displaced(key):
                self._close(sink, frames.DISPLACED, "displaced")
                return None
            if self._cap and not self._admit(key, None, sink):
                return None
            # _new_slot(key, route, online=True) and its _index, inline (every accept)
            self._streams = streams = self._streams + 1
            mailbox = Mailbox(f"{self.epoch}.{streams:x}", self.config.mailbox)
            slot = self._slots[key] = _Slot(mailbox, route, True)
            user = key[0]
            entry = self._users.get(user)
            if entry is None:
                entry = self._users[user] = UserEntry()
            entry.keys[key] = slot
            slot.entry = entry
            if entry.holds:
                self._take_holds(key, slot, entry)
            if self.presence is not None:
                self.presence("signon", key)
        else:
            previous = slot.sink
            if previous is None:
                if self._cap and not self._admit(key, slot, sink):
                    return None
            else:
                self._set_sink(slot, None)
            slot.linger_at = 0.0  # (its entry in the linger wheel is skipped when due)
            if not slot.online:
                slot.online = True
                if self.presence is not None:
                    self.presence("signon", key)
            if previous is not None and previous is not sink:
                previous.replaced()
                if self.observer is not None:
                    self.observer.noted(key, "replaced", self.now())
        mailbox = slot.mailbox
        acked = mailbox.acked
        replay = mailbox.replay(after)
        size = mailbox._bytes
        if slot.counted != size:  # _recount
            self.mailbox_bytes += size - slot.counted
            slot.counted = size
        stream = mailbox.stream
        replayed, gap, reset, since = replay
        # _hello's template as it stands (a long-poll's attach: as many mailboxes as before)
        if (
            self._spread_for == len(self._slots) and self._hello_for is self.config
            and self._hello_hash == self.hash_version and stream.isascii()
            and stream.isprintable() and '"' not in stream and "\\" not in stream
        ):  # fmt: skip
            text = self._hello_template % (
                stream.encode(), b"true" if reset else b"false", since, self._spread_text
            )  # fmt: skip
        else:
            text = self._hello(stream, reset, since)
        out = [_new(Frame, (text, None, None))]
        if gap is not None or replayed:  # more than the hello (most attaches have not)
            if gap is not None:
                out.append(Frame(frames.gap(*gap)))
            if not mailbox.tagged:
                out.extend(
                    _new(Frame, (frames.event(seq, payload, eid), seq, stream))
                    for seq, payload, eid in replayed
                )
            else:
                out.extend(
                    _new(Frame, (_event_frame(mailbox, seq, payload, eid), seq, stream))
                    for seq, payload, eid in replayed
                )
        entry = slot.entry
        if slot.sink is None:  # _set_sink(slot, sink), inline (a replaced one was unset)
            slot.sink = sink
            self._attached += 1
            route = slot.route
            counts = self._route_attached
            counts[route] = counts.get(route, 0) + 1
            self._routes_dirty.add(route)
            if entry is not None:
                entry.attached += 1
        else:
            self._set_sink(slot, sink)
        if entry is not None and len(entry.keys) > 1:  # attach order: oldest first
            keys = entry.keys
            keys[key] = keys.pop(key)
        written = sink.deliver(out)
        if written and replayed:
            last = replayed[-1][0]
            mailbox.mark_delivered(last)
            if not slot.probe:  # the ack-latency probe (load_report)
                slot.probe = last
                slot.probe_at = self.now()
        if mailbox.acked > acked:  # the resume position acknowledged events
            self.offline.acked(key, mailbox.acked)
            if slot.probe:
                self._probe_acked(slot)
        if slot.waits is not None and after is not None:
            self._acked(slot)
        if self.observer is not None:
            self._observe_attach(self.observer, key, mailbox, sink, after, replay, written, acked)
        return mailbox

    def _hello(self, stream: str, reset: bool, seq: int) -> bytes:
        """frames.hello for this node (its keepalive, spread and hash version), from a
        template built once per keepalive and hash version, and the spread's text kept
        while the number of mailboxes stays the same (every attach sends a hello: each
        accept, each long-poll). Byte-identical to frames.hello (tests/node/test_hub.py
        compares them)."""
        config, version = self.config, self.hash_version
        if self._hello_for is not config or self._hello_hash != version:
            keepalive = frames.whole_seconds(config.keepalive)  # as frames.hello writes it
            if not (type(keepalive) is float or type(keepalive) is int) or not (
                -_FLOAT_MAX <= keepalive <= _FLOAT_MAX
            ):  # a keepalive json would not write as repr does: frames.hello decides
                return frames.hello(stream, keepalive, reset, seq, self.spread(), version)
            self._hello_template = (
                b'{"type":"hello","stream":"%%s","keepalive":%s,"reset":%%s,"seq":%%d,'
                b'"spread":%%s,"hash":%d}' % (repr(keepalive).encode(), version)
            )  # fmt: skip
            self._hello_for, self._hello_hash, self._spread_for = config, version, -1
        mailboxes = len(self._slots)
        if mailboxes != self._spread_for:  # (each new WebSocket's attach)
            spread = spread_for(mailboxes, config.reconnect_rate)  # self.spread()
            if spread != self._spread_value:  # its text only when it changed
                if not -_FLOAT_MAX <= spread <= _FLOAT_MAX:  # (a float: 0 <= spread <= 30)
                    return frames.hello(stream, config.keepalive, reset, seq, spread, version)
                self._spread_text, self._spread_value = repr(spread).encode(), spread
            self._spread_for = mailboxes
        if stream.isascii() and stream.isprintable() and '"' not in stream and "\\" not in stream:
            return self._hello_template % (
                stream.encode(), b"true" if reset else b"false", seq, self._spread_text
            )  # fmt: skip
        return frames.hello(stream, config.keepalive, reset, seq, self.spread(), version)

    def _observe_attach(
        self, observer: DeliveryObserver, key: ConnectionKey, mailbox: Mailbox, sink: Sink,
        after: Position | None, replay: Any, written: bool, acked: int,
    ) -> None:  # fmt: skip
        now = self.now()
        stream = mailbox.stream
        last = None if after is None else str(after)
        observer.noted(key, "attach", now, transport=sink.kind, last=last)
        if replay.reset and after is not None:
            observer.noted(key, "reset", now, old=after.stream)
        if replay.gap is not None:
            observer.noted(key, "gap", now, first=replay.gap[0], last=replay.gap[1])
        if mailbox.acked > acked:
            observer.acked(key, stream, mailbox.acked, now)
        if written and replay.events:
            observer.written(key, stream, replay.events[0][0], replay.events[-1][0], sink.kind, now)

    def _probe_acked(self, slot: _Slot) -> None:
        """The browser's ack covers the probe's event: one ack-latency sample."""
        if slot.mailbox.acked >= slot.probe:
            self._ack_hist.observe(self.now() - slot.probe_at)
            slot.probe = 0

    # -- per-user limits (orbited.node.users; docs/protocol.md, "Per-user limits") --------

    def admits(self, key: ConnectionKey) -> bool:
        """Would an attach of ``key`` now pass the user's connection limit? False only
        under the ``refuse`` policy when the user has ``user_max_connections`` attached
        and ``key`` is not one of them: transports refuse it (HTTP 429 before starting a
        response, or close 4429), and it is counted as refused (``user_refused``).
        ``attach`` stays the authority."""
        limits = self.config.users
        cap = limits.max_connections
        if not cap or limits.policy != "refuse":
            return True
        entry = self._users.get(key[0])
        if entry is None:
            return True
        slot = entry.keys.get(key)
        if slot is not None and (slot.sink is not None or self._cycling(slot)):
            return True
        if self._in_use(entry) < cap:
            return True
        self.stats["user_refused"] += 1
        return False

    def _cycling(self, slot: _Slot) -> bool:
        """Did the slot's transport leave within CYCLE_GRACE (a long-poll between polls)?"""
        return slot.sink is None and self.now() - slot.left < CYCLE_GRACE

    def _in_use(self, entry: UserEntry) -> int:
        """The user's connections for the limit: attached, plus long-polls between polls."""
        used = entry.attached
        if len(entry.keys) > used:
            now = self.now()
            used += sum(
                1 for s in entry.keys.values() if s.sink is None and now - s.left < CYCLE_GRACE
            )
        return used

    def _admit(self, key: ConnectionKey, slot: _Slot | None, sink: Sink) -> bool:
        """The connection limit for an attach that is new for the user (``slot`` absent
        or without a transport): refuse it (False, ``sink.closed(4429)``) or close the
        user's oldest connection (close_oldest) to make room."""
        limits = self.config.users
        cap = limits.max_connections
        if not cap:
            return True
        entry = self._users.get(key[0])
        if entry is None or (slot is not None and self._cycling(slot)):
            return True
        if self._in_use(entry) < cap:
            return True
        if limits.policy == "refuse":
            self.stats["user_refused"] += 1
            self._close(sink, frames.USER_LIMIT, "user_limit")
            return False
        while self._in_use(entry) >= cap:
            oldest = self._oldest_in_use(entry)
            if oldest is None:
                break
            self._displace(*oldest)
        return True

    def _oldest_in_use(self, entry: UserEntry) -> tuple[ConnectionKey, _Slot] | None:
        """The user's longest-attached connection (attach order), a long-poll between
        two polls included."""
        now = self.now()
        for key, slot in entry.keys.items():
            if slot.sink is not None or now - slot.left < CYCLE_GRACE:
                return key, slot
        return None

    def _was_displaced(self, key: ConnectionKey) -> bool:
        """Was ``key`` displaced between two long-polls lately? (Forgotten once asked.)"""
        at = self._displaced.pop(key, None)
        return at is not None and self.now() - at < DISPLACED_MEMORY

    def _displace(self, key: ConnectionKey, slot: _Slot) -> None:
        """close_oldest: end the key's transport for good (4003) and drop its mailbox at
        once (its browser will not come back for it)."""
        self.stats["user_displaced"] += 1
        if slot.sink is None:  # a long-poll between polls: its next poll gets the 4003
            now = self.now()
            displaced = self._displaced
            for old, at in list(displaced.items()):  # oldest first: forget the stale ones
                if now - at < DISPLACED_MEMORY:
                    break
                del displaced[old]
            displaced[key] = now
        sink = self._set_sink(slot, None)
        slot.linger_at = 0.0
        if sink is not None:
            self._close(sink, frames.DISPLACED, "displaced")
        self._expire(key, slot)

    def _close(self, sink: Sink, code: int, reason: str) -> None:
        try:
            sink.closed(code, reason)
        except Exception:
            self.log.failure("closing a browser transport ({reason}) failed", reason=reason)

    def _rate_limited(
        self, recipients: tuple[ConnectionKey | Selector, ...]
    ) -> dict[str, RecipientResult]:
        """The per-user dispatch rate (user_rate): each user of the request with a mailbox
        or hold here takes one request from its budget; the users over it, with their
        ``limited`` result (every recipient of theirs in the request gets it)."""
        limits = self.config.users
        now = self.now()
        seen: set[str] = set()
        over: dict[str, RecipientResult] = {}
        for recipient in recipients:
            user = recipient[0]
            if user in seen:
                continue
            seen.add(user)
            entry = self._users.get(user)
            if entry is None:  # nothing here to deliver to: nothing to limit
                continue
            allowed, tat, retry_after = gcra_take(entry.tat, now, limits.rate, limits.burst)
            if allowed:
                entry.tat = tat
            else:
                self.stats["limited"] += 1
                over[user] = events.limited(math.ceil(retry_after * 1000) / 1000)
        return over

    # -- the per-user index ----------------------------------------------------------------

    def _index(self, key: ConnectionKey, slot: _Slot) -> UserEntry:
        """A slot entered _slots: index it under its user (and give it the user's holds)."""
        entry = self._users.get(key[0])
        if entry is None:
            entry = self._users[key[0]] = UserEntry()
        entry.keys[key] = slot
        slot.entry = entry
        if slot.sink is not None:
            entry.attached += 1
        if entry.holds:
            self._take_holds(key, slot, entry)
        return entry

    def _unindex(self, key: ConnectionKey, slot: _Slot) -> None:
        """A slot left _slots (expired, evicted, displaced)."""
        entry = slot.entry
        if entry is None:
            return
        if entry.keys.get(key) is slot:
            del entry.keys[key]
            if slot.sink is not None:
                entry.attached -= 1
        slot.entry = None
        if not entry.keys and not entry.holds and self._users.get(key[0]) is entry:
            del self._users[key[0]]

    def user_keys(self, user: str) -> list[ConnectionKey]:
        """The user's keys with a mailbox here, in attach order (oldest first)."""
        entry = self._users.get(user)
        return [] if entry is None else list(entry.keys)

    def _new_slot(self, key: ConnectionKey, route: int, online: bool) -> _Slot:
        self._streams += 1
        mailbox = Mailbox(f"{self.epoch}.{self._streams:x}", self.config.mailbox)
        slot = self._slots[key] = _Slot(mailbox, route, online)
        self._index(key, slot)
        if online and self.presence is not None:
            self.presence("signon", key)
        return slot

    def _install(self, key: ConnectionKey, mailbox: Mailbox, route: int, online: bool) -> None:
        """A handed-over mailbox: kept for ``linger`` until its browser comes."""
        slot = self._slots[key] = _Slot(mailbox, route, online)
        self._index(key, slot)
        self._recount(slot)  # counted even past the cap: refusing it would lose events
        self._linger(key, slot, self.now())

    def _recount(self, slot: _Slot) -> None:
        size = slot.mailbox.buffered_bytes
        self.mailbox_bytes += size - slot.counted
        slot.counted = size

    def _set_sink(self, slot: _Slot, sink: Sink | None) -> Sink | None:
        """Every change of a slot's transport goes here (it keeps ``attached``, the
        user's and the route's counts), but for ``attach`` from none and ``detach``,
        which do the same inline (tests/node/test_hub.py checks the counts against a
        scan); returns the one it replaces."""
        previous, slot.sink = slot.sink, sink
        change = (sink is not None) - (previous is not None)
        if change:
            self._attached += change
            entry = slot.entry
            if entry is not None:
                entry.attached += change
            route = slot.route
            counts = self._route_attached
            counts[route] = counts.get(route, 0) + change
            self._routes_dirty.add(route)
        return previous

    def _recount_routes(self) -> None:
        """Attached connections per route, counted afresh (after the slots' routes were
        recomputed: a new route count or hash version); the next report sends them all."""
        counts: dict[int, int] = {}
        for slot in self._slots.values():
            if slot.sink is not None:
                counts[slot.route] = counts.get(slot.route, 0) + 1
        self._route_attached = counts
        self._routes_dirty.clear()
        self._routes_full_due = True

    def _forget(self, slot: _Slot) -> None:
        """A slot left ``_slots``: its bytes no longer count."""
        self.mailbox_bytes -= slot.counted
        slot.counted = 0

    def detach(self, key: ConnectionKey, sink: Sink, reason: str | None = None) -> None:
        """The key's transport ``sink`` closed (``reason``, if the transport knows one:
        it goes to the key's trace, e.g. "slow")."""
        slot = self._slots.get(key)
        if slot is None or slot.sink is not sink:
            self._held_gone(sink)  # closed while its route was held, perhaps
            return
        # _set_sink(slot, None), inline (every long-poll's answer comes here)
        slot.sink = None
        self._attached -= 1
        entry = slot.entry
        if entry is not None:
            entry.attached -= 1
        route = slot.route
        counts = self._route_attached
        counts[route] = counts.get(route, 0) - 1
        self._routes_dirty.add(route)
        batch = self._batch
        slot.left = now = batch.now if batch._depth else self.clock.seconds()  # self.now()
        slot.probe = 0  # an ack after a reconnect is no latency sample
        # _linger, inline while the slot is filed in an earlier bucket (a long-poll's)
        due = slot.linger_at = now + self.config.linger
        bucket = math.ceil(due * LINGER_TICKS)
        filed = slot.linger_bucket
        if not filed or filed > bucket:
            self._file(key, slot, bucket)
        if self.observer is not None:
            self.observer.noted(key, "detach", now, reason=reason)

    def _linger(self, key: ConnectionKey, slot: _Slot, now: float) -> None:
        """The slot has no transport from ``now``: its mailbox expires ``linger`` seconds
        later unless one comes. No timer per slot (a long-poll leaves and comes back for
        every poll): the slot is filed in the linger wheel's bucket of its deadline, a
        tenth of a second; one timer per bucket expires the slots in it still lingering
        then (``_sweep``). So a mailbox expires at most 0.1 s after its linger ends. A
        slot is filed in one bucket at most: one filed in an earlier bucket (a poll that
        came and left again) only moves its deadline, and that bucket files it again."""
        due = now + self.config.linger
        slot.linger_at = due
        bucket = math.ceil(due * LINGER_TICKS)
        filed = slot.linger_bucket
        if filed and filed <= bucket:  # its bucket's sweep files it in its own bucket
            return
        self._file(key, slot, bucket)

    def _file(self, key: ConnectionKey, slot: _Slot, bucket: int) -> None:
        slot.linger_bucket = bucket
        entries = self._wheel.get(bucket)
        if entries is None:
            entries = self._wheel[bucket] = []
            delay = max(0.0, bucket / LINGER_TICKS - self.clock.seconds())
            self._wheel_calls[bucket] = self.clock.callLater(delay, self._sweep, bucket)
        entries.append((key, slot))

    def _sweep(self, bucket: int) -> None:
        """A linger bucket is due: expire its slots whose linger ends in it; a slot that
        lingers until later (it came back and left again) goes in that bucket; one with a
        transport now, or filed elsewhere since, is left alone. Buckets are compared as
        the integers they are filed by: never a float bound (a deadline one ulp past a
        tenth would otherwise never be due)."""
        self._wheel_calls.pop(bucket, None)
        for key, slot in self._wheel.pop(bucket, ()):
            if slot.linger_bucket != bucket:
                continue
            slot.linger_bucket = 0
            due = slot.linger_at
            if not due:
                continue
            own = math.ceil(due * LINGER_TICKS)
            if own > bucket:
                self._file(key, slot, own)
                continue
            try:
                self._expire(key, slot)
            except Exception:  # presence, offline hooks, observers: one slot's error only
                self.log.failure("expiring the mailbox of {key} failed", key=key)

    def _expire(self, key: ConnectionKey, slot: _Slot) -> None:
        slot.linger_at = 0.0
        if self._slots.get(key) is slot and slot.sink is None:
            del self._slots[key]
            self._forget(slot)
            self._unindex(key, slot)
            self._end_waits(slot, lambda wait: events.stored(Status.UNACKED, wait.seq))
            if slot.online and self.presence is not None:
                self.presence("signoff", key)
            if len(slot.mailbox) > slot.mailbox.acked:
                self.log.info("mailbox {key} expired", key=key)
            self.offline.expired(key)
            if self.observer is not None:
                mailbox = slot.mailbox
                self.observer.noted(
                    key, "expired", self.now(), undelivered=mailbox.last_seq - mailbox.delivered
                )

    def ack(self, key: ConnectionKey, seq: int, stream: str | None = None) -> None:
        """The browser has everything up to ``seq`` (of ``stream``, when the ack comes on
        its own request: an ack for a stream that is gone must not confirm a new one)."""
        slot = self._slots.get(key)
        if slot is not None and (stream is None or stream == slot.mailbox.stream):
            mailbox = slot.mailbox
            acked = mailbox.acked
            mailbox.ack(seq)
            if mailbox.acked > acked:
                self._recount(slot)
                self.offline.acked(key, mailbox.acked)
                if slot.probe:
                    self._probe_acked(slot)
                if self.observer is not None:
                    self.observer.acked(key, mailbox.stream, mailbox.acked, self.now())
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
            wait.resolve(events.stored(Status.ACKED, wait.seq, 0, wait.replaced))
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
        wait.resolve(events.stored(Status.UNACKED, wait.seq, 0, wait.replaced))

    def _group_timeout(self, group: _AckGroup) -> None:
        """A request's ``ack`` wait ended: its waits not resolved yet are ``unacked``."""
        group.timer = None
        for slot, wait in group.waits:
            if wait.result is None:
                self._ack_timeout(slot, wait)

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
            "lingering": sum(1 for s in self._slots.values() if s.linger_at),
            "queued_events": sum(len(s.mailbox) for s in self._slots.values()),
            "ack_waits": waits,
            "dedup_entries": len(self.dedup),
            "dedup_bytes": self.dedup.size,
            "mailbox_bytes": self.mailbox_bytes,
            "inflight_requests": self.dedup.inflight,
            "incoming_routes": len(self._incoming),
            "users": len(self._users),
            "user_holds": sum(len(e.holds) for e in self._users.values() if e.holds),
            **({} if self.tracer is None else self.tracer.gauges()),
        }

    def trace_answer(
        self, user: str, session: str | None = None, location: str | None = None,
        event: str | None = None, limit: int | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """The per-key trace of ``user``'s keys (those of ``session`` / ``location`` when
        given): the node's ``GET /orbited/trace`` and ``trace_reply`` answer
        (docs/operations.md, "Tracing a delivery"). Each key the tracer knows, and each of
        the user's mailboxes here, with its mailbox state and its records (of ``event``
        only, the newest ``limit``, when given)."""
        tracer = self.tracer
        now = self.now()
        out: dict[str, Any] = {
            "node": self.name if tracer is None else tracer.node, "epoch": self.epoch, "now": now,
            "mode": "off" if tracer is None else tracer.config.mode, "keys": [],
            "truncated": False, "gauges": {} if tracer is None else tracer.gauges(),
        }  # fmt: skip
        if tracer is None:
            return out
        traced = dict(tracer.keys_of(user, session, location, now))
        entry = self._users.get(user)
        for key in () if entry is None else entry.keys:
            if (session is None or key[1] == session) and (location is None or key[2] == location):
                traced.setdefault(key, None)  # type: ignore[arg-type]
        for key, kt in traced.items():
            slot = self._slots.get(key)
            head: dict[str, Any] = {
                "key": key.to_json(),
                "route": route_of(key, self.routes, self.hash_version),
                "here": slot is not None,
                "stream": None, "attached": None, "last_seq": None, "acked": None,
                "lingering_until": None,
            }  # fmt: skip
            if slot is not None:
                mailbox = slot.mailbox
                head["stream"] = mailbox.stream
                head["attached"] = None if slot.sink is None else slot.sink.kind
                head["last_seq"], head["acked"] = mailbox.last_seq, mailbox.acked
                if slot.linger_at:
                    head["lingering_until"] = slot.linger_at
            if kt is None:
                head.update(dispatches=[], notes=[])
            else:
                head.update(tracer.key_json(kt, event, limit))
            out["keys"].append(head)
        return out

    def load_report(self, full: bool = False) -> dict[str, Any]:
        """The heartbeat's ``load`` object (docs/halod-protocol.md, "Heartbeat"): counters
        since the node started, the ack-latency samples since the previous report
        (sparse ``[bucket, count]`` pairs, orbited.core.latency), and attached connections
        per route: the routes whose count changed since the previous report, or every
        route with one (``routes_full``) when ``full`` or after the routes were
        recomputed. ``recipients`` counts every recipient's result (stored or not)."""
        stats = self.stats
        full = full or self._routes_full_due
        counts = self._route_attached
        if full:
            for route in [r for r, n in counts.items() if n <= 0]:
                del counts[route]
            routes = {str(r): n for r, n in counts.items()}
            self._routes_full_due = False
        else:
            routes = {str(r): max(0, counts.get(r, 0)) for r in self._routes_dirty}
        self._routes_dirty.clear()
        return {
            "events": stats["events"],
            "recipients": stats["delivered"] + stats["queued"] + stats["no_connection"]
            + stats["moved"] - self._attach_moved + stats["full"] + stats["limited"]
            + stats["held"],
            "delivered": stats["delivered"],
            "queued": stats["queued"],
            "acked": stats["acked"],
            "full": stats["full"],
            "moved": stats["moved"] - self._attach_moved,
            "ack_hist": [list(pair) for pair in self._ack_hist.take()],
            "routes": routes,
            "routes_full": full,
        }  # fmt: skip

    def spread(self) -> float:
        """Seconds over which this node's browsers should spread their first reconnect
        when they lose it: mailboxes (attached and lingering browsers) / reconnect_rate,
        rounded up to the millisecond, at most SPREAD_MAX (docs/protocol.md, "Frames")."""
        return spread_for(len(self._slots), self.config.reconnect_rate)

    def keepalive_tick(self) -> None:
        """Ping every transport that has been silent for the keepalive interval; the ping
        carries the current spread hint (one frame built per tick)."""
        deadline = self.clock.seconds() - self.config.keepalive
        ping = Frame(frames.ping(self.spread()))
        for slot in list(self._slots.values()):
            sink = slot.sink
            if sink is not None and sink.wants_pings and sink.last_write <= deadline:
                sink.deliver([ping])

    def _release(
        self, slot: _Slot, reason: str, route: int | None = None, spread: float | None = None
    ) -> None:
        """End a slot's linger and tell its browser, if attached, to reconnect (with the
        key's ``route`` now, after a rehash; with a ``spread`` for the browsers of a
        planned move, counted over those that move)."""
        slot.linger_at = 0.0
        sink = self._set_sink(slot, None)
        if sink is not None:
            try:
                if route is None and spread is None:
                    sink.reconnect(reason)
                else:
                    sink.reconnect(reason, route, spread)
            except Exception:
                self.log.failure("telling a browser to reconnect failed")

    def shutdown(self, reason: str) -> None:
        """Tell every browser to reconnect; the node is going away."""
        self.stopped = True
        self._complete_all()
        for slot in list(self._slots.values()):
            if self.owned is not None:  # in a cluster the route's next owner takes a resend
                self._end_waits(slot, partial(_moved_away, slot.route, None, self.hash_version))
            else:
                self._end_waits(slot, lambda wait: events.stored(Status.UNACKED, wait.seq))
            self._release(slot, reason)
        self._slots.clear()
        for call in self._wheel_calls.values():
            if call.active():
                call.cancel()
        self._wheel_calls.clear()
        self._wheel.clear()
        for entry in self._users.values():
            for hold in entry.holds or ():
                self._end_hold(hold)
        self._users.clear()
        self.mailbox_bytes = 0

    # -- web-app side -------------------------------------------------------------------

    def handle_request(self, body: bytes) -> bytes | defer.Deferred[bytes]:
        """The SP front end's handler: one request body in, one reply body out
        (``answer`` without the success flag, and without its tuple: the same steps)."""
        try:
            request = _parse_request(body, self.config.requests)
        except events.RequestError as e:
            self.stats["bad_requests"] += 1
            return events.error_reply(e)
        except Exception:  # a bug: the web app still gets an answer (docs/protocol.md)
            self.log.failure("parsing a request failed")
            return events.error_reply(
                events.RequestError("internal_error", "the node failed to read the request")
            )
        if type(request) is not events.EventRequest:
            return events.ok_reply(request.event_id, [])  # a ping
        client_hash, version = request.hash, self.hash_version
        if (
            (client_hash is not None and client_hash != version) or request.offline is not None
            or version == 1
        ):  # fmt: skip
            refused = _refused(self, request)
            if refused is not None:
                return refused
        try:
            outcome = self._dispatch(request, True)
        except Exception:
            return _failed(self, request)
        if type(outcome) is bytes:  # the common case's reply, without a DispatchResult
            return outcome
        # isinstance(x, tuple), not isinstance(x, Deferred): Deferred is an ABC (Awaitable),
        # whose isinstance is a Python call; a builtin type's is not (per request).
        if isinstance(outcome, tuple):
            reply = outcome[3]  # encoded: what encode_reply returns unless a duplicate
            return reply if reply is not None and not outcome[2] else events.encode_reply(outcome)
        waiting: defer.Deferred[DispatchResult] = outcome  # type: ignore[assignment]
        return waiting.addCallbacks(events.encode_reply, partial(_failed, self, request))

    def _one(
        self, slot: _Slot, sink: Sink, payload: bytes, eid: bytes, digest: bytes, now: float
    ) -> bytes | None:
        """ "The one": an event for one key attached here, nothing but the event, that its
        mailbox takes without evicting; delivered (or queued behind unsent bytes),
        remembered, and its reply returned. ``eid``: the id's JSON text, printable ASCII
        (written into the reply as it is). None, with nothing changed, for anything else
        (full, evictions): _deliver decides those. _deliver's steps for that case, in its
        order (tests/node/test_hub.py runs the same requests both ways)."""
        size = len(payload)
        if self.mailbox_bytes + size > self.config.mailbox_total_bytes:
            return None
        mailbox = slot.mailbox
        pushed = mailbox.push(payload, eid)
        if not pushed:
            return None
        self.mailbox_bytes += size
        slot.counted += size
        frame = b'{"type":"event","seq":%d,"id":%s,"data":%s}' % (pushed, eid, payload)
        if sink.deliver([_new(Frame, (frame, pushed, mailbox.stream))]):
            mailbox.delivered = pushed
            self.stats["delivered"] += 1
            if not slot.probe:  # the ack-latency probe (load_report)
                slot.probe = pushed
                slot.probe_at = now  # (self.now(): the SP read's batch)
            one = b'{"status":"delivered","seq":%d}' % pushed
        else:
            self.stats["queued"] += 1
            one = b'{"status":"queued","seq":%d}' % pushed
        reply = b'{"id":%s,"ok":true,"results":[%s]}' % (eid, one)
        self.dedup.remember(digest, reply, now)
        return reply

    def handle_requests(self, bodies: list[bytes]) -> list[bytes | defer.Deferred[bytes]]:
        """``handle_request`` for each of ``bodies`` (one SP read's, inside its delivery
        batch), their replies in order. The request web apps send most, read in C
        (``events.parse_common``: one plain key, nothing but the event), goes to ``_one``
        from this loop, with what it needs looked up once per read; any other, and any
        that ``_one`` leaves, goes to ``handle_request``. Per event this saves a third of
        the node's own work (docs/performance.md, "The per-event path, seventh pass")."""
        batch = self._batch
        parse = events.parse_common
        if parse is None or not batch._depth:  # (no C reader; outside a batch: no "now")
            return [self.handle_request(body) for body in bodies]
        limits = self.config.requests
        max_payload, max_recipients = limits.max_payload, limits.max_recipients
        slots, dedup, stats, now = self._slots, self.dedup, self.stats, batch.now
        recent, inflight = dedup._recent, dedup._inflight
        version = self.hash_version
        plain = self.observer is None and not self._rate and version != 1
        out: list[bytes | defer.Deferred[bytes]] = []
        add = out.append
        for body in bodies:
            reply = None
            try:
                common = parse(body, max_payload, max_recipients) if plain else None
                if common is not None:
                    event_id, user, session, location, payload, digested, hash_ = common
                    slot = slots.get((user, session, location))  # type: ignore[call-overload]
                    if (
                        (hash_ is None or hash_ == version) and slot is not None
                        and (sink := slot.sink) is not None
                    ):  # fmt: skip
                        digest = _blake2b(digested, digest_size=DIGEST_SIZE).digest()
                        if digest not in recent and digest not in inflight:  # not a resend
                            # (parse_common's id: printable ASCII, no quote or backslash)
                            eid = b'"%s"' % event_id.encode()
                            try:
                                reply = self._one(slot, sink, payload, eid, digest, now)
                            except Exception:  # (as handle_request answers a failed dispatch)
                                reply = _failed(self, events.request_of(common, digest))
            except Exception:  # a bug before anything changed: handle_request's path decides
                self.log.failure("reading a common request failed")
            if reply is not None:
                stats["events"] += 1
                add(reply)
                continue
            add(self.handle_request(body))
            plain = self.observer is None and not self._rate and self.hash_version != 1
            version = self.hash_version
        return out

    def dispatch(
        self, request: events.EventRequest
    ) -> DispatchResult | defer.Deferred[DispatchResult]:
        """Deliver one event and say what became of it for each recipient; a Deferred
        when the outcome waits (acknowledged mode, or a route being handed over). A resend
        of a remembered request gets the first outcome again, marked as a duplicate, and
        delivers nothing."""
        return self._dispatch(request, False)  # type: ignore[return-value]

    def _dispatch(
        self, request: events.EventRequest, raw: bool
    ) -> DispatchResult | defer.Deferred[DispatchResult] | bytes:
        """``dispatch``; ``raw`` (handle_request's): a one-recipient request answered at
        once returns its reply's bytes only (no DispatchResult to build and drop)."""
        dedup = self.dedup
        batch = self._batch
        if batch._depth:  # forget_old ran when it began (the property costs a call)
            now = batch.now
        else:
            now = self.clock.seconds()
            dedup.forget_old(now)
        digest = request.digest
        observer = self.observer  # None unless tracing or OpenTelemetry is on
        # dedup.knows, inline (one test per table for a new request, the common case)
        if digest in dedup._recent or digest in dedup._inflight:
            remembered = dedup.reply(digest, now)
            if remembered is not None:
                self.stats["duplicates"] += 1
                again = events.decode_reply(remembered)._replace(duplicate=True)
                if observer is not None:
                    observer.answered(observer.dispatched(request, now), again, now)
                return again
            if dedup.pending(digest):  # the first one's outcome is not ready yet
                self.stats["duplicates"] += 1
                resend: defer.Deferred[DispatchResult] = defer.Deferred()
                dedup.wait(digest, resend)
                if observer is not None:
                    resend.addCallback(
                        self._observe_answer, observer, observer.dispatched(request, now)
                    )
                return resend
        self.stats["events"] += 1
        token: Any = None
        if observer is not None:
            self._token = token = observer.dispatched(request, now)
            self._token_now = now
        eid = frames.event_id(request.event_id)  # once per request, shared by the mailboxes
        recipients = request.recipients
        tag, offline = request.latest, request.offline
        if (
            raw and len(recipients) == 1 and tag is None and offline is None and observer is None
            and request.ack is None and not self._rate
        ):  # fmt: skip
            # The SP handler's most common request, done and answered here ("the one"):
            # one key, attached here, nothing but the event, that its mailbox takes
            # without evicting. Anything else (full, evictions, no transport, no mailbox)
            # changes nothing here and goes on to _deliver, which decides. _deliver's
            # steps for that case, in its order (tests/node/test_hub.py runs the same
            # requests both ways). An id whose JSON text is not printable ASCII (the
            # reply then needs events.ok_reply) goes on to _deliver too.
            slot = self._slots.get(recipients[0])  # type: ignore[arg-type]
            if (
                slot is not None and (sink := slot.sink) is not None and eid.isascii()
                and eid.find(b"\x7f") < 0
            ):  # fmt: skip
                reply = self._one(slot, sink, request.payload, eid, digest, now)
                if reply is not None:
                    return reply
        if len(recipients) == 1 and not self._rate and request.ack is None:  # the common case
            recipient = recipients[0]
            only: RecipientResult | defer.Deferred[RecipientResult]
            if type(recipient) is Selector:
                only = self._deliver_selector(
                    recipient, request.payload, request.ack, eid, tag, offline, {},
                    request.event_id,
                )  # fmt: skip
            else:
                only = self._deliver(
                    recipient,  # type: ignore[arg-type]
                    request.payload, request.ack, eid, tag, offline,
                )  # fmt: skip
            if isinstance(only, tuple):  # a RecipientResult, not a Deferred (see above)
                if observer is not None:
                    outcome = self._answered(request, now, [only])
                    observer.answered(token, outcome, now)
                    return outcome
                # One result: the reply formatted at once (events.ok_reply's, for one).
                # Delivered without a tag: _deliver's plain result (RecipientResult.encode's
                # bytes for it, formatted here).
                if only[0] is DELIVERED and tag is None:
                    seq, dropped = only[1], only[2]
                    one = (
                        b'{"status":"delivered","seq":%d}' % seq  # type: ignore[str-format]
                        if not dropped
                        else b'{"status":"delivered","seq":%d,"dropped":%d}' % (seq, dropped)  # type: ignore[str-format]
                    )  # fmt: skip
                else:
                    one = only.encode()
                reply = (
                    b'{"id":%s,"ok":true,"results":[%s]}' % (eid, one)
                    if eid.isascii() and eid.find(b"\x7f") < 0
                    else events.ok_reply(request.event_id, [one])
                )  # fmt: skip
                if only[0] not in RESEND:  # (a resend of "stored nothing" is sent again)
                    dedup.remember(digest, reply, now)
                if raw:
                    return reply
                return _new(DispatchResult, (request.event_id, (only,), False, reply))
            results: list[RecipientResult | defer.Deferred[RecipientResult]] = [only]
            waits = True
        elif (
            observer is None and not self._rate and tag is None and offline is None
            and request.ack is None
        ):  # fmt: skip
            # Several recipients, nothing but the event: the fan-out loop.
            results, encoded, waits = self._fan_out(request, eid, now)
            if not waits:
                return self._answered(request, now, results, encoded, eid)  # type: ignore[arg-type]
        else:
            results = []
            seen: dict[ConnectionKey, RecipientResult | defer.Deferred[RecipientResult]] = {}
            over = self._rate_limited(recipients) if self._rate else None
            ack = request.ack
            outer = self._ack_group
            group = self._ack_group = None if ack is None else _AckGroup()
            try:
                waits = self._deliver_all(
                    request, eid, now, results, seen, over, observer, token
                )  # fmt: skip
            finally:  # (the waits made before an exception time out too)
                self._ack_group = outer
                if group is not None and group.pending:
                    group.timer = self.clock.callLater(ack, self._group_timeout, group)  # type: ignore[arg-type]
        if not waits:
            if observer is not None:
                outcome = self._answered(request, now, results)  # type: ignore[arg-type]
                observer.answered(token, outcome, now)
                return outcome
            return self._answered(request, now, results)  # type: ignore[arg-type]
        dedup.begin(digest)
        gather = _Gather(results)
        gathered = gather.deferred
        gather.left = sum(1 for r in results if not isinstance(r, tuple))
        for i, entry in enumerate(results):
            if isinstance(entry, tuple):  # a RecipientResult
                continue
            if type(entry) is _AckWait:  # a plain key's wait in this request's group
                if entry.result is not None:
                    gather.settle(i, entry.result)
                elif entry.gather is None:
                    entry.gather, entry.index = gather, i
                else:  # the same key twice in the request
                    entry.as_deferred().addCallback(gather.settled, i)
            else:
                entry.addCallbacks(gather.settled, gather.fail, callbackArgs=(i,))

        def answered(parts: list[RecipientResult]) -> DispatchResult:
            outcome = self._answered(request, self.clock.seconds(), parts)
            if observer is not None:
                observer.answered(token, outcome, self.now())
            resent = outcome._replace(duplicate=True)
            for waiter in dedup.finish(digest):
                waiter.callback(resent)
            return outcome

        def failed(failure: Any) -> Any:
            for waiter in dedup.finish(digest):
                waiter.errback(failure)
            return failure

        return gathered.addCallbacks(answered, failed)

    def _deliver_all(
        self, request: events.EventRequest, eid: bytes, now: float, results: list[Any],
        seen: dict[ConnectionKey, Any], over: dict[str, RecipientResult] | None,
        observer: DeliveryObserver | None, token: Any,
    ) -> bool:  # fmt: skip
        """``dispatch``'s general loop: each recipient's result, a Deferred or (in the
        acknowledged mode) an _AckWait into ``results``; whether one waits."""
        payload, ack, tag, offline = request.payload, request.ack, request.latest, request.offline
        waits = False
        for recipient in request.recipients:
            if over and recipient[0] in over:
                results.append(over[recipient[0]])
                if observer is not None and type(recipient) is not Selector:
                    limited: ConnectionKey = recipient  # type: ignore[assignment]
                    route = route_of(limited, self.routes, self.hash_version)
                    status = over[limited[0]].status.value
                    observer.recipient(token, limited, route, status, None, None, 0, None, now)
                continue
            entry = self._deliver_to(
                recipient, payload, ack, eid, tag, offline, seen, request.event_id
            )  # fmt: skip
            waits = waits or not isinstance(entry, tuple)  # (an ABC's isinstance costs)
            results.append(entry)
        return waits

    def _observe_answer(
        self, outcome: DispatchResult, observer: DeliveryObserver, token: Any
    ) -> DispatchResult:
        observer.answered(token, outcome, self.now())
        return outcome

    def _deliver_to(
        self, recipient: ConnectionKey | Selector, payload: bytes, ack: float | None,
        eid: bytes, tag: bytes | None, offline: float | None,
        seen: dict[ConnectionKey, RecipientResult | defer.Deferred[RecipientResult]],
        event_id: str,
    ) -> RecipientResult | defer.Deferred[RecipientResult]:  # fmt: skip
        """One recipient of a request on the general path: a wildcard's keys, or a key
        (its first result again if the request named it before: ``seen``)."""
        if type(recipient) is Selector:
            return self._deliver_selector(
                recipient, payload, ack, eid, tag, offline, seen, event_id
            )  # fmt: skip
        key: ConnectionKey = recipient  # type: ignore[assignment]
        entry = seen.get(key)
        if entry is None:
            entry = seen[key] = self._deliver(key, payload, ack, eid, tag, offline)
        return entry

    def _fan_out(
        self, request: events.EventRequest, eid: bytes, now: float
    ) -> tuple[list[RecipientResult | defer.Deferred[RecipientResult]], list[bytes], bool]:
        """``dispatch`` of an event to several recipients with no acknowledged mode, no
        latest-value tag, no offline hook, no rate limit and no observer: each recipient's
        result, its encoding (when no result waits) and whether one waits (a Deferred).

        The same outcome as ``_deliver`` per key (which it calls for anything but a
        key with a mailbox that takes the event without evicting one), with the work
        per recipient cut down (issue 20, "Fan-out"): the frame, the result and its
        bytes built once per seq and shared by the recipients at that seq (a broadcast's
        keys are mostly at the same one), no result tuple from the mailbox, the stats
        counted once, a key seen twice told by its slot's mark (no dictionary of the
        request's keys until a wildcard needs one: ``_fan_out_rest``)."""
        payload = request.payload
        size = len(payload)
        cap = self.config.mailbox_total_bytes - size
        slots_get = self._slots.get
        deliver = self._deliver
        stats = self.stats
        self._fan_mark = mark = self._fan_mark + 1
        results: list[RecipientResult | defer.Deferred[RecipientResult]] = []
        encoded: list[bytes] = []
        missing: dict[ConnectionKey, RecipientResult | defer.Deferred[RecipientResult]] = {}
        last_seq = 0  # the frame, results and their bytes of the last seq (most keys')
        frame = b""
        done_ok = done_queued = None
        waits = False
        delivered = queued = 0
        recipients = request.recipients
        # self.mailbox_bytes is updated in place, never cached in a local: a sink's deliver
        # may call back into the hub (an ack recounts a mailbox), and an exception must
        # not leave the node-wide count behind the mailboxes.
        try:
            for recipient in recipients:
                if type(recipient) is not ConnectionKey:  # a wildcard: the rest by dictionary
                    waits = self._fan_out_rest(
                        request, eid, results, encoded, missing, mark, waits
                    )  # fmt: skip
                    break
                entry: RecipientResult | defer.Deferred[RecipientResult] | None
                slot = slots_get(recipient)
                if slot is None:  # no mailbox here (or a route held for a hand-off)
                    entry = missing.get(recipient)
                    if entry is None:
                        entry = deliver(recipient, payload, None, eid, None, None)
                        missing[recipient] = entry
                elif slot.fanned == mark:  # the key again in this request
                    entry = slot.fanned_result
                else:
                    seq = 0
                    if self.mailbox_bytes <= cap:
                        mailbox = slot.mailbox
                        seq = mailbox.push(payload, eid)
                    if not seq:  # the node's cap, an eviction: the general path
                        entry = deliver(recipient, payload, None, eid, None, None)
                    else:
                        self.mailbox_bytes += size
                        slot.counted += size
                        if seq != last_seq:
                            last_seq = seq
                            frame = frames.event(seq, payload, eid)
                            done_ok = done_queued = None
                        sink = slot.sink
                        if sink is not None and sink.deliver(
                            [_new(Frame, (frame, seq, mailbox.stream))]
                        ):
                            mailbox.delivered = seq  # (a new seq: past what was)
                            delivered += 1
                            if not slot.probe:
                                slot.probe = seq
                                slot.probe_at = now
                            if done_ok is None:
                                done_ok = _stored(DELIVERED, seq)
                            done = done_ok
                        else:
                            queued += 1
                            if done_queued is None:
                                done_queued = _stored(QUEUED, seq)
                            done = done_queued
                        slot.fanned = mark
                        slot.fanned_result = entry = done[0]
                        results.append(entry)
                        encoded.append(done[1])
                        continue
                    slot.fanned = mark
                    slot.fanned_result = entry
                if isinstance(entry, tuple):  # a RecipientResult (not an ABC's isinstance)
                    encoded.append(entry.encode())
                else:
                    waits = True
                results.append(entry)
        finally:
            stats["delivered"] += delivered
            stats["queued"] += queued
        return results, encoded, waits

    def _fan_out_rest(
        self, request: events.EventRequest, eid: bytes, results: list[Any], encoded: list[bytes],
        missing: dict[ConnectionKey, Any], mark: int, waits: bool,
    ) -> bool:  # fmt: skip
        """``_fan_out`` from its first wildcard on: the keys so far go in a dictionary
        (a wildcard's keys are delivered once whether named before or after it), then the
        rest as ``_deliver_all`` does it."""
        recipients = request.recipients
        done = len(results)
        seen: dict[ConnectionKey, Any] = dict(missing)
        for i in range(done):
            seen.setdefault(recipients[i], results[i])  # type: ignore[arg-type]
        payload = request.payload
        for recipient in recipients[done:]:
            entry = self._deliver_to(
                recipient, payload, None, eid, None, None, seen, request.event_id
            )  # fmt: skip
            if isinstance(entry, tuple):
                encoded.append(entry.encode())
            else:
                waits = True
            results.append(entry)
        return waits

    def _answered(
        self, request: events.EventRequest, now: float, results: list[RecipientResult],
        encoded: list[bytes] | None = None, eid: bytes | None = None,
    ) -> DispatchResult:  # fmt: skip
        """The outcome of a request, encoded once: the dedup memory keeps its bytes.
        ``encoded``: the results' encodings when the caller has them; ``eid``: the
        request's id as frames.event_id encoded it (the reply's id when it is ASCII)."""
        if encoded is None:
            encoded = [r.encode() for r in results]
        reply = events.ok_reply(request.event_id, encoded, eid)
        if not all(r[0] in RESEND for r in results):
            self.dedup.remember(request.digest, reply, now)
        return _new(DispatchResult, (request.event_id, tuple(results), False, reply))

    def _deliver(
        self, key: ConnectionKey, payload: bytes, ack: float | None = None,
        eid: bytes | None = None, tag: bytes | None = None, offline: float | None = None,
    ) -> RecipientResult | defer.Deferred[RecipientResult]:  # fmt: skip
        slot = self._slots.get(key)
        created = False
        if slot is None:
            if self.owned is not None:
                route = route_of(key, self.routes, self.hash_version)
                if route not in self.owned:
                    self.stats["moved"] += 1
                    return events.moved(route, self.moved_to.get(route), self.hash_version)
                incoming = self._incoming.get(route)
                if incoming is not None:  # after the old owner's mailbox, in order
                    return self._later(
                        incoming, partial(self._deliver, key, payload, ack, eid, tag, offline)
                    )
            if ack is None and offline is None:
                self.stats["no_connection"] += 1
                return events.NO_CONNECTION_RECIPIENT
            if self._full(payload):
                return events.FULL_RECIPIENT
            # Acknowledged mode (or the offline hook): keep it for the browser (e.g. one
            # reconnecting after its node crashed and this one took the route over);
            # `unacked` if none comes.
            slot = self._new_slot(key, route_of(key, self.routes, self.hash_version), False)
            self._linger(key, slot, self.now())
            created = True
        if self.mailbox_bytes + len(payload) > self.config.mailbox_total_bytes:
            self.stats["full"] += 1
            return events.FULL_RECIPIENT
        mailbox = slot.mailbox
        if tag is None:
            seq = mailbox.push(payload, eid)  # nothing evicted: its bytes are the payload's
            if seq:
                dropped = replaced = 0
                size = len(payload)
                self.mailbox_bytes += size
                slot.counted += size
            else:
                seq, dropped, replaced, _ = mailbox.append(payload, eid)
                self._recount(slot)
            frame = (
                b'{"type":"event","seq":%d,"id":%s,"data":%s}' % (seq, eid, payload)
                if eid is not None
                else frames.event(seq, payload, eid)
            )  # (frames.event's bytes, without the call: per recipient)
        else:
            seq, dropped, replaced, superseded = mailbox.append(payload, eid, tag)
            frame = frames.event(seq, payload, eid, tag, replaced)
            if superseded is not None:
                self._superseded(key, slot, superseded, seq, eid)
            self._recount(slot)
        sink = slot.sink
        # tuple.__new__: a NamedTuple's own __new__ is a Python call (per recipient).
        if sink is not None and sink.deliver([_new(Frame, (frame, seq, mailbox.stream))]):
            mailbox.delivered = seq  # a new seq: past what was delivered
            self.stats["delivered"] += 1
            status = DELIVERED
            if not slot.probe:  # the ack-latency probe (load_report)
                slot.probe = seq
                slot.probe_at = self.now()
        else:
            self.stats["queued"] += 1
            status = QUEUED
        if offline is not None and eid is not None:
            if created:  # no mailbox until now: no browser to wait for
                self.offline.no_connection(key, eid, [(key, seq)], stream=mailbox.stream)
            else:
                self.offline.watch(key, eid, offline, [(key, seq)], stream=mailbox.stream)
        if ack is None:
            if replaced:
                return events.stored(status, seq, dropped, replaced)
            # RecipientResult's defaults after dropped, spelled out (a tuple of constants);
            # tests/node/test_dispatch.py compares the result with RecipientResult(...).
            return _new(
                RecipientResult,
                (status, seq, dropped, None, None, None, None, 0, None, False, None),
            )
        wait = _AckWait(seq, replaced)
        if slot.waits is None:
            slot.waits = []
        slot.waits.append(wait)
        group = self._ack_group
        if group is not None:  # dispatch's loop: its request's timer and gather
            wait.group = group
            group.pending += 1
            group.waits.append((slot, wait))
            return wait  # type: ignore[return-value]
        wait.timer = self.clock.callLater(ack, self._ack_timeout, slot, wait)
        return wait.as_deferred()

    def _deliver_observed(
        self, key: ConnectionKey, payload: bytes, ack: float | None = None,
        eid: bytes | None = None, tag: bytes | None = None, offline: float | None = None,
    ) -> RecipientResult | defer.Deferred[RecipientResult]:  # fmt: skip
        """``_deliver`` while an observer is on (``observe`` installs it as the instance's
        ``_deliver``): the same, then the observer's ``recipient`` call for the key."""
        result = Hub._deliver(self, key, payload, ack, eid, tag, offline)
        observer = self.observer
        if observer is None:
            return result
        # Statuses go out as plain strings (an Enum member in a kept record would keep the
        # record in the garbage collector's sight: orbited.node.trace, "Dispatch").
        slot = self._slots.get(key)
        if type(result) is RecipientResult:
            status, seq = result[0], result[1]
            if seq is not None and slot is not None:  # stored: delivered or queued
                sink = slot.sink
                if status is DELIVERED and sink is not None:
                    plain, transport = "delivered", sink.kind
                else:
                    plain, transport = status.value, None
                observer.recipient(
                    self._token, key, slot.route, plain, seq, slot.mailbox.stream, result[2],
                    transport, self._token_now,
                )  # fmt: skip
                return result
            if status is Status.MOVED and result.route is not None:
                route = result.route
            else:
                route = route_of(key, self.routes, self.hash_version)
            observer.recipient(
                self._token, key, route, status.value, None, None, 0, None, self._token_now
            )
        elif slot is None or not slot.waits:  # held for an incoming hand-off (_later)
            route = route_of(key, self.routes, self.hash_version)
            observer.recipient(self._token, key, route, "held", None, None, 0, None, self.now())
        else:  # acknowledged mode: the wait _deliver just added
            seq = slot.waits[-1].seq
            sink = slot.sink
            delivered = slot.mailbox.delivered >= seq and sink is not None
            observer.recipient(
                self._token, key, slot.route, "delivered" if delivered else "queued", seq,
                slot.mailbox.stream, 0, sink.kind if delivered and sink is not None else None,
                self._token_now,
            )  # fmt: skip
        return result

    def observe(self, observer: DeliveryObserver | None, tracer: Tracer | None = None) -> None:
        """Turn tracing on (orbited.node.observe's ``build_observer``) or off (None)."""
        self.observer = observer
        self.tracer = tracer
        if observer is None:
            self.__dict__.pop("_deliver", None)
        else:
            self._deliver = self._deliver_observed  # type: ignore[method-assign]

    def _later(
        self,
        incoming: Any,
        deliver: Callable[[], RecipientResult | defer.Deferred[RecipientResult]],
    ) -> defer.Deferred[RecipientResult]:
        """A delivery to a route held for an incoming hand-off: run after it, in order."""
        later: defer.Deferred[RecipientResult] = defer.Deferred()
        token = self._token  # the observer's token of the request it belongs to

        def deliver_later() -> None:
            self._token = token
            self._token_now = self.now()
            outer, self._ack_group = self._ack_group, None  # its own timer, not a request's
            try:
                out = deliver()
            except Exception:
                later.errback()
                return
            finally:
                self._ack_group = outer
            if isinstance(out, defer.Deferred):
                out.chainDeferred(later)
            else:
                later.callback(out)

        incoming.deliveries.append(deliver_later)
        return later

    def _superseded(
        self, key: ConnectionKey, slot: _Slot, old: int, new: int, eid: bytes | None
    ) -> None:
        """Latest-value: the event at ``old`` left the key's mailbox for the one at
        ``new``; an acknowledged-mode request waiting on it is answered ``replaced``."""
        self.stats["replaced"] += 1
        waits = slot.waits
        if waits is not None:
            for wait in waits:
                if wait.seq == old:
                    waits.remove(wait)
                    if not waits:
                        slot.waits = None
                    wait.resolve(events.superseded(old, new))
                    break
        if eid is not None:
            self.offline.moved(key, old, new, eid)

    def _deliver_selector(
        self, selector: Selector, payload: bytes, ack: float | None, eid: bytes,
        tag: bytes | None, offline: float | None,
        seen: dict[ConnectionKey, RecipientResult | defer.Deferred[RecipientResult]],
        event_id: str,
    ) -> RecipientResult | defer.Deferred[RecipientResult]:  # fmt: skip
        """A wildcard: the event goes to each of the user's (or session's) keys here, once
        per key in the request (``seen``); the result lists each key's (``matched``)."""
        user = selector.user
        if self.owned is not None:
            route = route_of_user(user, self.routes)
            if route not in self.owned:
                self.stats["moved"] += 1
                return events.moved(route, self.moved_to.get(route), self.hash_version)
            incoming = self._incoming.get(route)
            if incoming is not None:
                return self._later(
                    incoming,
                    partial(self._deliver_selector, selector, payload, ack, eid, tag, offline,
                            seen, event_id),
                )  # fmt: skip
        entry = self._users.get(user)
        # A snapshot: deliveries do not change the index, but an ack-wait callback might.
        matches = [] if entry is None else [k for k in entry.keys if selector.matches(k)]
        if not matches:
            return self._no_match(selector, payload, ack, eid, tag, offline, event_id)
        parts: list[RecipientResult | defer.Deferred[RecipientResult]] = []
        reached: list[tuple[ConnectionKey, int]] = []
        waits = False
        for key in matches:
            part = seen.get(key)
            if part is None:
                part = seen[key] = self._deliver(key, payload, ack, eid, tag, None)
            assert part is not None
            if type(part) is _AckWait:  # (in the request's group: its timer)
                part = part.as_deferred()
            if isinstance(part, defer.Deferred):
                waits = True
                slot = self._slots.get(key)
                if slot is not None and offline is not None:
                    reached.append((key, slot.mailbox.last_seq))
            elif offline is not None and part.status.stored and part.seq is not None:
                reached.append((key, part.seq))
            parts.append(part)
        if offline is not None and reached:
            self.offline.watch(selector, eid, offline, reached)
        if not waits:
            return events.matched(tuple(zip(matches, parts, strict=True)))  # type: ignore[arg-type]
        gathered = defer.gatherResults(
            [p if isinstance(p, defer.Deferred) else defer.succeed(p) for p in parts],
            consumeErrors=True,
        )
        return gathered.addCallback(
            lambda done: events.matched(tuple(zip(matches, done, strict=True)))
        )

    # -- user holds (docs/protocol.md, "Addressing a user or a session") -------------------

    def _no_match(
        self, selector: Selector, payload: bytes, ack: float | None, eid: bytes,
        tag: bytes | None, offline: float | None, event_id: str,
    ) -> RecipientResult | defer.Deferred[RecipientResult]:  # fmt: skip
        """A wildcard that reached no key: ``no_connection`` with ``keys: []``; with
        ``offline`` or ``ack`` (and user_hold on) the event is held for the user's next
        matching mailbox (``held``)."""
        hold_for = self.config.users.hold
        if (ack is None and offline is None) or not hold_for:
            self.stats["no_connection"] += 1
            if offline is not None:
                self.offline.no_connection(selector, eid, [])
            return events.NO_KEYS
        entry = self._users.get(selector.user)
        if entry is not None and entry.holds and len(entry.holds) >= self.config.mailbox.max_events:
            self.stats["full"] += 1
            return events.FULL_RECIPIENT
        if self._full(payload):
            return events.FULL_RECIPIENT
        if entry is None:
            entry = self._users[selector.user] = UserEntry()
        now = self.now()
        hold = UserHold(selector, event_id, eid, payload, tag, now + hold_for)
        if entry.holds is None:
            entry.holds = []
        entry.holds.append(hold)
        self.mailbox_bytes += len(payload)
        self.stats["held"] += 1
        hold.timer = self.clock.callLater(hold_for, self._hold_expired, selector.user, hold)
        if offline is not None:
            hold.watch = self.offline.no_connection(selector, eid, [], held=True)
        if ack is None:
            return events.HELD
        answer: defer.Deferred[RecipientResult] = defer.Deferred()
        hold.answer = answer
        hold.ack_until = now + ack
        hold.ack_timer = self.clock.callLater(ack, self._hold_unanswered, hold)
        return answer

    def _take_holds(self, key: ConnectionKey, slot: _Slot, entry: UserEntry) -> None:
        """A new mailbox of a user with held wildcard events: the matching ones go in
        first, in order (the browser gets them in its hello batch)."""
        now = self.now()
        for hold in list(entry.holds or ()):
            if hold.until <= now or not hold.selector.matches(key):
                continue
            mailbox = slot.mailbox
            seq, _, _, superseded = mailbox.append(hold.payload, hold.eid, hold.tag)
            if superseded is not None:
                self._superseded(key, slot, superseded, seq, hold.eid)
            self._recount(slot)
            hold.reached += 1
            if hold.watch is not None:
                self.offline.add_key(hold.watch, key, seq)
            answer = hold.answer
            if answer is not None and not answer.called:
                wait = _AckWait(seq)
                wait.timer = self.clock.callLater(
                    max(0.0, hold.ack_until - now), self._ack_timeout, slot, wait
                )
                if slot.waits is None:
                    slot.waits = []
                slot.waits.append(wait)
                wait.as_deferred().addCallback(partial(_answer_hold, answer, key))

    def _hold_unanswered(self, hold: UserHold) -> None:
        """An acknowledged-mode hold's wait ended with no key reached: ``held``."""
        hold.ack_timer = None
        answer = hold.answer
        if answer is not None and not answer.called and not hold.reached:
            self.stats["unacked"] += 1
            answer.callback(events.HELD)

    def _hold_expired(self, user: str, hold: UserHold) -> None:
        hold.timer = None
        entry = self._users.get(user)
        if entry is not None and entry.holds and hold in entry.holds:
            entry.holds.remove(hold)
            if not entry.holds:
                entry.holds = None
            if not entry.keys and not entry.holds:
                del self._users[user]
        self._end_hold(hold)

    # -- per-user state in a hand-off (docs/halod-protocol.md, "Hand-off": ``users``) -----

    def export_users(self, routes: frozenset[int]) -> list[dict[str, Any]]:
        """The held wildcard events and offline watches of recipients whose route is in
        ``routes``, removed here, as the ``handoff`` message's ``users`` entries: one per
        (user, route), ``{"user", "route", "holds": [...], "watches": [...]}``. A moved
        hold's acknowledged-mode request is answered ``held`` (as if it timed out)."""
        if not routes:
            return []
        total, version = self.routes, self.hash_version
        groups: dict[tuple[str, int], dict[str, Any]] = {}

        def group(user: str, route: int) -> dict[str, Any]:
            found = groups.get((user, route))
            if found is None:
                found = groups[(user, route)] = {
                    "user": user, "route": route, "holds": [], "watches": [],
                }  # fmt: skip
            return found

        def route_of_target(target: ConnectionKey | Selector) -> int:
            if type(target) is Selector:
                return route_of_user(target.user, total)
            return route_of(target, total, version)  # type: ignore[arg-type]

        for watch in self.offline.export(lambda target: route_of_target(target) in routes):
            group(watch.target[0], route_of_target(watch.target))["watches"].append(watch.to_wire())
        now = self.now()
        for user, entry in list(self._users.items()):
            holds = entry.holds
            if not holds:
                continue
            route = route_of_user(user, total)
            if route not in routes:
                continue
            entry.holds = None
            for hold in holds:
                left = hold.until - now
                if left > 0:
                    group(user, route)["holds"].append({
                        "selector": hold.selector.to_json(),
                        "id": hold.event_id,
                        "data": hold.payload.decode(),
                        "latest": None if hold.tag is None else json.loads(hold.tag),
                        "left": left,
                        "reached": hold.reached,
                    })  # fmt: skip
                hold.watch = None  # exported above with the watches
                self._end_hold(hold)
            if not entry.keys:
                del self._users[user]
        return list(groups.values())

    def import_users(self, entries: Iterable[Any]) -> int:
        """A ``handoff`` message's ``users`` entries (``export_users``): holds go on for
        the time they had left, and their user's next matching mailboxes; watches are
        restored into the offline watcher. Malformed entries are logged and skipped.
        Returns how many holds were taken."""
        taken = 0
        now = self.now()
        for raw in entries:
            try:
                holds, watches = _import_user(raw)
            except (ValueError, TypeError, KeyError, KeyError_) as e:
                self.log.warn("ignoring a malformed hand-off user entry: {e}", e=e)
                continue
            restored: dict[tuple[Any, bytes], Any] = {}
            if watches and not isinstance(self.offline, NullWatcher):
                from orbited.node.offline import WatchExport

                try:
                    exported = [WatchExport.from_wire(w) for w in watches]
                except ValueError as e:
                    self.log.warn("ignoring malformed hand-off watches: {e}", e=e)
                    exported = []
                for export, watch in zip(
                    exported, self.offline.restore(exported), strict=True
                ):  # fmt: skip
                    restored[(export.target, export.eid)] = watch
            for selector, event_id, payload, tag, left, reached in holds:
                if self._full(payload):
                    continue
                entry = self._users.get(selector.user)
                if entry is None:
                    entry = self._users[selector.user] = UserEntry()
                eid = frames.event_id(event_id)
                hold = UserHold(selector, event_id, eid, payload, tag, now + left)
                hold.reached = reached
                hold.watch = restored.get((selector, eid))
                if entry.holds is None:
                    entry.holds = []
                entry.holds.append(hold)
                self.mailbox_bytes += len(payload)
                hold.timer = self.clock.callLater(left, self._hold_expired, selector.user, hold)
                taken += 1
        return taken

    def drop_holds(self, routes: frozenset[int]) -> int:
        """End the held wildcard events of users whose route is in ``routes`` (it left
        this node without a hand-off): their watches end with them (dropped), and an
        acknowledged-mode request waiting on one that reached no mailbox is answered
        ``held`` (docs/protocol.md, "Acknowledged mode"). Returns how many ended."""
        if not routes:
            return 0
        total = self.routes
        ended = 0
        for user, entry in list(self._users.items()):
            holds = entry.holds
            if not holds or route_of_user(user, total) not in routes:
                continue
            entry.holds = None
            for hold in holds:
                self._end_hold(hold)
                ended += 1
            if not entry.keys:
                del self._users[user]
        return ended

    def _end_hold(self, hold: UserHold) -> None:
        self.mailbox_bytes -= len(hold.payload)
        for timer in (hold.timer, hold.ack_timer):
            if timer is not None and timer.active():
                timer.cancel()
        hold.timer = hold.ack_timer = None
        if hold.watch is not None:  # the watcher goes on with the mailboxes it reached
            self.offline.dropped(hold.watch)
        answer = hold.answer
        if answer is not None and not answer.called and not hold.reached:
            answer.callback(events.HELD)

    def _full(self, payload: bytes) -> bool:
        """Would ``payload`` take the node's mailboxes past mailbox_total_bytes? Then it is
        refused (status "full"), not stored: the web app sees it and may resend later;
        evicting other keys' events to make room would lose them silently."""
        if self.mailbox_bytes + len(payload) <= self.config.mailbox_total_bytes:
            return False
        self.stats["full"] += 1
        return True


def _import_user(
    entry: Any,
) -> tuple[list[tuple[Selector, str, bytes, bytes | None, float, int]], list[Any]]:
    """A hand-off ``users`` entry's holds, checked, and its watches (as wire objects)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("user"), str):
        raise ValueError("a user entry is an object with a user")
    user = entry["user"]
    raw_holds, watches = entry.get("holds", []), entry.get("watches", [])
    if not isinstance(raw_holds, list) or not isinstance(watches, list):
        raise ValueError("holds and watches must be arrays")
    holds = []
    for h in raw_holds:
        if not isinstance(h, dict):
            raise ValueError("a hold is an object")
        selector = parse_recipient(h["selector"])
        if type(selector) is not Selector or selector.user != user:
            raise ValueError("a hold's selector must be a wildcard of its user")
        event_id, data, tag, left = h["id"], h["data"], h.get("latest"), h["left"]
        if not isinstance(event_id, str) or not 0 < len(event_id) <= events.MAX_EVENT_ID:
            raise ValueError("a hold's id must be a string of 1-128 characters")
        if not isinstance(data, str):
            raise ValueError("a hold's data must be JSON text")
        if tag is not None and (not isinstance(tag, str) or not 0 < len(tag) <= events.MAX_LATEST):
            raise ValueError("a hold's latest must be null or a string of 1-128 characters")
        if isinstance(left, bool) or not isinstance(left, int | float) or not 0 < left < 1e9:
            raise ValueError("a hold's left must be a positive number of seconds")
        reached = h.get("reached", 0)
        if isinstance(reached, bool) or not isinstance(reached, int) or reached < 0:
            raise ValueError("a hold's reached must be a count")
        holds.append((
            selector, event_id, data.encode(), None if tag is None else frames.event_id(tag),
            float(left), reached,
        ))  # fmt: skip
    return holds, watches


def _answer_hold(
    answer: defer.Deferred[RecipientResult], key: ConnectionKey, result: RecipientResult
) -> RecipientResult:
    """The first key a held acknowledged-mode event reached answers the request."""
    if not answer.called:
        answer.callback(events.matched(((key, result),)))
    return result


def _stored(status: Status, seq: int) -> tuple[RecipientResult, bytes]:
    """A stored event's result with nothing else to say, and its encoding (what
    ``RecipientResult.encode`` writes for it)."""
    result = _new(
        RecipientResult, (status, seq, 0, None, None, None, None, 0, None, False, None)
    )  # fmt: skip
    return result, b'{"status":"%s","seq":%d}' % (status.value.encode(), seq)


def _event_frame(mailbox: Mailbox, seq: int, payload: bytes, eid: bytes | None) -> bytes:
    """A buffered event's frame, with its latest-value tag if it has one."""
    tagged = mailbox.tag(seq)
    if tagged is None:
        return frames.event(seq, payload, eid)
    return frames.event(seq, payload, eid, tagged[0], tagged[1])


Answer = tuple[bool, bytes]  # (success, reply body): HTTP publish answers 400 on False


def answer(
    hub: Hub, body: bytes, traceparent: str | None = None, tracestate: str | None = None
) -> Answer | defer.Deferred[Answer]:
    """The bytes edge of the event protocol (docs/protocol.md): parse a request body,
    dispatch it and encode the reply, saying whether it is a success. The HTTP publish
    front end calls this (the SP's, ``Hub.handle_request``, runs the same steps without
    the flag); a Deferred when the reply waits. ``traceparent`` and ``tracestate``: the
    HTTP publish API's headers (the body's fields win)."""
    try:
        request = events.parse_request(body, hub.config.requests)
    except events.RequestError as e:
        hub.stats["bad_requests"] += 1
        return False, events.error_reply(e)
    if isinstance(request, events.PingRequest):
        return True, events.ok_reply(request.event_id, [])
    if traceparent is not None:
        request = events.with_trace_headers(request, traceparent, tracestate)
    # events.check_node only when it can refuse: clients send "hash" on every request.
    client_hash, version = request.hash, hub.hash_version
    if (
        (client_hash is not None and client_hash != version) or request.offline is not None
        or version == 1
    ):  # fmt: skip
        refused = _refused(hub, request)
        if refused is not None:
            return False, refused
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


def _refused(hub: Hub, request: events.EventRequest) -> bytes | None:
    """events.check_node's error reply for ``request`` on this node, or None."""
    try:
        events.check_node(request, hub.hash_version, not isinstance(hub.offline, NullWatcher))
    except events.RequestError as e:
        hub.stats["bad_requests"] += 1
        return events.error_reply(e)
    return None


_parse_request = events.parse_request
_blake2b = hashlib.blake2b
DIGEST_SIZE = events.DIGEST_SIZE


def _failed(hub: Hub, request: events.EventRequest, failure: Any = None) -> bytes:
    hub.log.failure("dispatch of {event_id} failed", failure, event_id=request.event_id)
    error = events.RequestError("internal_error", "the node failed", request.event_id)
    return events.error_reply(error)
