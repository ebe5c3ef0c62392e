"""Route ownership and hand-off: which routes this node serves, and mailboxes moving
between nodes when HaloD moves a route from a live node (docs/halod-protocol.md,
"Hand-off"; docs/protocol.md).

- ``MailboxExport``: one mailbox as the ``handoff`` message carries it, typed, with
  ``to_wire`` / ``from_wire`` for its JSON form. The ``handoff`` envelope is
  orbited.core.control's; HaloD relays its entries without reading them.
- ``RouteOwnership``: the hub's part that follows HaloD (``assign``, ``route_moved``,
  ``handoff_received``): keys of routes that left are evicted (their mailboxes exported
  for a live new owner, or dropped), and routes moved here from a live node hold their
  deliveries and attaches (``_Incoming``) until the old owner's mailboxes arrive or
  ``handoff_timeout`` passes. orbited.node.hub.Hub is the class that uses it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from orbited.core.hashing import DEFAULT_HASH_VERSION, route_of
from orbited.core.keys import ConnectionKey, KeyError_
from orbited.node import events, frames
from orbited.node.mailbox import _POSITION, Entry, Mailbox, MailboxLimits, Position, TagEntry

if TYPE_CHECKING:
    from orbited.node.hub import HubConfig, Sink, _AckWait, _Slot
    from orbited.node.observe import DeliveryObserver


# What the hub tells presence (orbited.node.presence) about a key: its mailbox was created
# (a browser came) or expired (it is gone). Keys handed to another node stay online there.
PresenceChange = Literal["signon", "signoff"]


# Bytes of key traces (JSON) one hand-off carries at most, over all its mailboxes: with
# the hand-off's events chunked at 256 KiB (control.HANDOFF_CHUNK) a message stays within
# half of MAX_MESSAGE even if all the traces land in it. The keys past it go without
# their trace (the old owner keeps its own copy for queries).
TRACE_HANDOFF_BYTES = 192 * 1024


class _TraceBudget:
    """The key traces one hand-off exports, within TRACE_HANDOFF_BYTES."""

    __slots__ = ("observer", "left")

    def __init__(self, observer: DeliveryObserver | None) -> None:
        self.observer = observer
        self.left = TRACE_HANDOFF_BYTES if observer is not None else 0

    def export(self, key: ConnectionKey) -> list[dict[str, Any]]:
        if self.observer is None or self.left < 1024:  # spent: stop encoding to measure
            return []
        trace = self.observer.export(key)
        if not trace:
            return []
        cost = len(json.dumps(trace, separators=(",", ":")))  # ASCII, as the wire escapes
        if cost > self.left:
            return []
        self.left -= cost
        return trace


class HandoffError(ValueError):
    """A hand-off entry that is not a mailbox export (it is ignored and logged)."""


@dataclass(frozen=True)
class MailboxExport:
    """One key's mailbox as an old owner hands it to a route's new owner.

    ``events``: ``(seq, payload, id)`` with the payload as encoded JSON bytes and the id
    as the event frames carry it (frames.event_id), or None for an event handed over by
    a node of a version before event ids. ``evicted``: the highest seq the old owner's
    limits removed (None from a node without it); ``tags``: the latest-value tags of
    ``events``, ``(seq, tag, replaced)`` with the tag as encoded JSON. ``trace``: the
    key's per-key trace (orbited.node.trace's records and notes as JSON objects, checked
    by the receiving tracer), carried when tracing is on; ``()`` from older nodes."""

    key: ConnectionKey
    route: int
    stream: str
    next_seq: int
    acked: int
    events: tuple[Entry, ...]
    online: bool = True
    evicted: int | None = None
    tags: tuple[TagEntry, ...] = ()
    trace: tuple[dict[str, Any], ...] = ()

    @classmethod
    def of(
        cls, key: ConnectionKey, mailbox: Mailbox, route: int, online: bool = True,
        trace: Iterable[dict[str, Any]] = (),
    ) -> MailboxExport:  # fmt: skip
        return cls(
            key, route, mailbox.stream, mailbox.next_seq, mailbox.acked,
            tuple(mailbox.export()), online, mailbox.evicted, tuple(mailbox.export_tags()),
            tuple(trace),
        )  # fmt: skip

    def mailbox(self, limits: MailboxLimits) -> Mailbox:
        return Mailbox.restored(
            self.stream, limits, self.next_seq, self.acked, list(self.events), self.evicted,
            list(self.tags),
        )  # fmt: skip

    def to_wire(self) -> dict[str, Any]:
        """The entry as the ``handoff`` message's ``mailboxes`` carry it: payloads are JSON
        text already, so they travel as strings; an event is ``[seq, payload, id]``
        (``[seq, payload]`` when it has no id), a latest-value event ``[seq, payload, id,
        tag, replaced]`` (id null when it has none)."""
        tags = {seq: (tag, replaced) for seq, tag, replaced in self.tags}
        wire: list[list[Any]] = []
        for seq, payload, eid in self.events:
            tagged = tags.get(seq)
            if tagged is not None:
                wire.append([seq, payload.decode(), None if eid is None else json.loads(eid),
                             json.loads(tagged[0]), tagged[1]])  # fmt: skip
            elif eid is None:
                wire.append([seq, payload.decode()])
            else:
                wire.append([seq, payload.decode(), json.loads(eid)])
        out: dict[str, Any] = {
            "key": self.key.to_json(),
            "route": self.route,
            "stream": self.stream,
            "next_seq": self.next_seq,
            "acked": self.acked,
            "events": wire,
            "online": self.online,
        }
        if self.evicted is not None:
            out["evicted"] = self.evicted
        if self.trace:
            out["trace"] = list(self.trace)
        return out

    @classmethod
    def from_wire(
        cls, entry: object, routes: int, hash_version: int = DEFAULT_HASH_VERSION
    ) -> MailboxExport:
        """An entry of a ``handoff`` message; HandoffError if it is not one. The route is
        recomputed from the key with this node's route count (``routes``) and hash
        version, not taken on trust; a missing ``online`` (an older node) means online, a
        missing ``evicted`` is None (every seq before the first event is then a gap)."""
        try:
            if not isinstance(entry, dict):
                raise HandoffError("an entry must be an object")
            key = ConnectionKey.from_json(entry["key"])
            stream, next_seq, acked = entry["stream"], entry["next_seq"], entry["acked"]
            if not isinstance(stream, str) or not _POSITION.match(f"{stream}:0"):
                raise HandoffError("bad stream id")
            if not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (next_seq, acked)
            ):
                raise HandoffError("bad sequence numbers")
            raw = entry["events"]
            if not isinstance(raw, list):
                raise HandoffError("events must be an array")
            tags: list[TagEntry] = []
            imported = tuple(_import_event(event, tags) for event in raw)
            evicted = entry.get("evicted")
            if evicted is not None and (
                not isinstance(evicted, int) or isinstance(evicted, bool) or evicted < 0
            ):
                raise HandoffError("evicted must be a sequence number")
        except HandoffError:
            raise
        except (KeyError, TypeError, ValueError, KeyError_) as e:
            raise HandoffError(f"malformed entry: {e!r}") from None
        online = entry.get("online") is not False
        route = route_of(key, routes, hash_version)
        # The trace never costs a mailbox: anything but an array of objects is dropped.
        raw_trace = entry.get("trace")
        trace = (
            tuple(t for t in raw_trace if isinstance(t, dict))
            if isinstance(raw_trace, list) else ()
        )  # fmt: skip
        return cls(
            key, route, stream, next_seq, acked, imported, online, evicted, tuple(tags), trace
        )


def _import_event(event: object, tags: list[TagEntry]) -> Entry:
    """A hand-off event, ``[seq, payload, id]``, ``[seq, payload, id, tag, replaced]`` (a
    latest-value event; its tag goes to ``tags``) or, from a node of the previous
    version, ``[seq, payload]`` (no id: its frames go out without one)."""
    if not isinstance(event, list) or len(event) not in (2, 3, 5):
        raise HandoffError(
            "an event must be [seq, payload], [seq, payload, id] or [seq, payload, id, tag, "
            "replaced]"
        )
    seq, payload = event[0], event[1]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise HandoffError("an event's seq must be a positive integer")
    if not isinstance(payload, str):
        raise HandoffError("an event's payload must be a string")
    if len(event) == 2:
        return seq, payload.encode(), None
    eid = event[2]
    if len(event) == 5:
        tag, replaced = event[3], event[4]
        if not isinstance(tag, str) or not 0 < len(tag) <= events.MAX_LATEST:
            raise HandoffError(f"a tag must be a string of 1-{events.MAX_LATEST} characters")
        if not isinstance(replaced, int) or isinstance(replaced, bool) or replaced < 0:
            raise HandoffError("replaced must be a count")
        tags.append((seq, frames.event_id(tag), replaced))
        if eid is None:
            return seq, payload.encode(), None
    if not isinstance(eid, str) or not 0 < len(eid) <= events.MAX_EVENT_ID:
        raise HandoffError(f"an event id must be a string of 1-{events.MAX_EVENT_ID} characters")
    return seq, payload.encode(), frames.event_id(eid)


def export_entry(
    key: ConnectionKey, mailbox: Mailbox, route: int, online: bool = True
) -> dict[str, Any]:
    """A mailbox as the hand-off message carries it (MailboxExport.to_wire)."""
    return MailboxExport.of(key, mailbox, route, online).to_wire()


SPREAD_MAX = 30.0  # seconds: the spread hint's bound, however many browsers a node has


def spread_for(browsers: int, rate: float) -> float:
    """The reconnect spread hint (docs/protocol.md, "The reconnect spread hint"): seconds
    over which ``browsers`` coming back at once should spread their first reconnect so
    that a node taking ``rate`` new connections/s is not overrun; 0 when rate is 0."""
    if rate <= 0:
        return 0.0
    return min(SPREAD_MAX, math.ceil(browsers * 1000 / rate - 1e-9) / 1000)


def _moved_away(
    route: int, to: str | None, hash_version: int, wait: _AckWait
) -> events.RecipientResult:
    """What an acknowledged-mode request waiting on a mailbox that left with its route
    answers for that recipient: ``moved`` (the web app should resend)."""
    return events.moved(route, to, hash_version)


class _HeldAttach:
    __slots__ = ("key", "sink", "after", "gone")

    def __init__(self, key: ConnectionKey, sink: Sink, after: Position | None) -> None:
        self.key, self.sink, self.after = key, sink, after
        self.gone = False  # the transport closed while it waited


class _Incoming:
    """A route HaloD moved here from a live node: deliveries and attaches for its keys
    wait (each in arrival order) until the old owner's mailboxes arrive or time out."""

    __slots__ = ("deliveries", "attaches", "timer", "expect")

    def __init__(self, timer: IDelayedCall, expect: set[str] | None = None) -> None:
        self.timer = timer
        self.deliveries: list[Callable[[], Any]] = []
        self.attaches: list[_HeldAttach] = []
        # A rehash: the peers (names) whose ``done`` it waits for; None: the first done.
        self.expect = expect


class RouteOwnership:
    """The routes a hub serves, and the hand-off of its mailboxes (see the module doc).

    State: ``routes`` (N of the cluster's hashing), ``owned`` (None when standalone:
    every route; with HaloD, what it assigned), ``moved_to`` (new owners' SP addresses,
    for replies) and the routes held for an incoming hand-off."""

    log = Logger()

    # Provided by orbited.node.hub.Hub:
    clock: IReactorTime
    config: HubConfig
    stats: dict[str, int]
    presence: Callable[[PresenceChange, ConnectionKey], None] | None
    offline: Any  # orbited.node.offline.OfflineWatcher, or users.NullWatcher
    observer: DeliveryObserver | None  # per-key tracing / OpenTelemetry (orbited.node.observe)
    _slots: dict[ConnectionKey, _Slot]

    def now(self) -> float:
        raise NotImplementedError

    def _recount_routes(self) -> None:
        raise NotImplementedError

    def _init_routes(self, routes: int, hash_version: int = DEFAULT_HASH_VERSION) -> None:
        self.routes = routes
        self.hash_version = hash_version  # docs/hashing.md; HaloD's table's wins
        self.owned: frozenset[int] | None = None
        self.moved_to: dict[int, str | None] = {}
        self.moved_owner: dict[int, str] = {}  # new owners' names, when known (for traces)
        # The reconnect spread its browsers were told when a route left (``_evict``): a
        # browser that comes back here after it (a long-poll between two polls) gets the
        # same hint, not the whole node's from its hello.
        self.moved_spread: dict[int, float] = {}
        self._incoming: dict[int, _Incoming] = {}

    def _serves(self, route: int) -> bool:
        return self.owned is None or route in self.owned

    # -- hub parts the hand-off uses (orbited.node.hub.Hub) --------------------------------

    def attach(self, key: ConnectionKey, sink: Sink, after: Position | None) -> Mailbox | None:
        raise NotImplementedError

    def _install(self, key: ConnectionKey, mailbox: Mailbox, route: int, online: bool) -> None:
        raise NotImplementedError

    def _forget(self, slot: _Slot) -> None:
        raise NotImplementedError

    def _recount(self, slot: _Slot) -> None:
        raise NotImplementedError

    def _end_waits(
        self, slot: _Slot, outcome: Callable[[_AckWait], events.RecipientResult]
    ) -> None:
        raise NotImplementedError

    def _release(
        self, slot: _Slot, reason: str, route: int | None = None, spread: float | None = None
    ) -> None:
        raise NotImplementedError

    def _unindex(self, key: ConnectionKey, slot: _Slot) -> None:
        raise NotImplementedError

    def detach(self, key: ConnectionKey, sink: Sink, reason: str | None = None) -> None:
        raise NotImplementedError

    def export_users(self, routes: frozenset[int]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def import_users(self, entries: Iterable[Any]) -> int:
        raise NotImplementedError

    def drop_holds(self, routes: frozenset[int]) -> int:
        raise NotImplementedError

    # -- HaloD's messages ------------------------------------------------------------------

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
                slot.route = route_of(key, total, self.hash_version)
            self.owned = None  # every slot is checked against the new assignment
        previous = frozenset(range(1, self.routes + 1)) if self.owned is None else self.owned
        self.owned = new
        for route in new:
            self.moved_to.pop(route, None)
            self.moved_owner.pop(route, None)
            self.moved_spread.pop(route, None)
        lost = previous - new
        for route in lost:
            self._complete(route, timed_out=False)
        for route in (new - previous) & frozenset(incoming):
            if route not in self._incoming:
                timer = self.clock.callLater(
                    self.config.handoff_timeout, self._complete, route, True
                )
                self._incoming[route] = _Incoming(timer)
        evicted = self._evict(lost)
        self._recount_routes()  # the load report's per-route counts start afresh
        return evicted

    def route_moved(
        self, moves: dict[int, str | None], handoff: Iterable[int] = (),
        exports: list[dict[str, Any]] | None = None, users: list[dict[str, Any]] | None = None,
        exported: Callable[[], None] | None = None, owners: Mapping[int, str] | None = None,
    ) -> int:  # fmt: skip
        """'route moved': these routes now reach another node (SP address, if known;
        ``owners``: its name, when known, for the key traces' "handed out to").
        The mailboxes of ``handoff`` routes are appended to ``exports`` as wire entries
        (MailboxExport.to_wire; the new owner resumes them) instead of being dropped;
        their per-user state (held wildcard events, offline watches: ``export_users``) to
        ``users``, each entry with its ``route`` (the ``handoff`` message's ``users``);
        without ``users`` that state is dropped here, so no watch of a handed-over event
        stays behind. Routes not handed over lose their state (``_evict``). ``exported``
        is called once ``exports`` and ``users`` are complete and before any browser is
        told to reconnect, so the hand-off can leave first (a browser that comes back at
        once then waits less on its new owner)."""
        self.moved_to.update(moves)
        if owners:
            self.moved_owner.update(owners)
        owned = frozenset(range(1, self.routes + 1)) if self.owned is None else self.owned
        self.owned = owned - moves.keys()
        handed = frozenset(moves) & frozenset(handoff) if exports is not None else frozenset()
        per_user = self.export_users(handed)
        if users is not None:
            users.extend(per_user)
        return self._evict(frozenset(moves), handed, exports, exported)

    def _evict(
        self, routes: frozenset[int], handoff: frozenset[int] = frozenset(),
        exports: list[dict[str, Any]] | None = None, exported: Callable[[], None] | None = None,
    ) -> int:  # fmt: skip
        """Drop the keys of ``routes`` (exported instead for ``handoff`` routes). A route
        not handed over loses its per-user state too (docs/protocol.md, "Offline
        webhooks", "Moves and crashes"): each dropped mailbox counts as expired for the
        offline hook (a waiting watch whose last mailbox it was says ``expired``, a
        pushed one ends with no ``cancel``) and its users' holds end."""
        if not routes:
            return 0
        if exports is None:
            handoff = frozenset()
        self.drop_holds(routes - handoff)
        moving = [(key, slot) for key, slot in self._slots.items() if slot.route in routes]
        # Only these browsers go to the new owner(s), not all of this node's: their
        # reconnect frames carry a spread counted over them (docs/protocol.md).
        spread = spread_for(len(moving), self.config.reconnect_rate)
        self.moved_spread.update(dict.fromkeys(routes, spread))
        observer = self.observer
        if exports is not None:  # first what the new owner needs, then the browsers
            budget = _TraceBudget(observer)
            for key, slot in moving:
                if slot.route in handoff:
                    trace = budget.export(key)
                    mailbox = MailboxExport.of(key, slot.mailbox, slot.route, slot.online, trace)
                    exports.append(mailbox.to_wire())
        if exported is not None:
            exported()
        evicted = 0
        for key, slot in moving:
            route = slot.route
            del self._slots[key]
            self._forget(slot)
            self._unindex(key, slot)
            evicted += 1
            handed = exports is not None and route in handoff
            if exports is not None and handed:
                self.stats["handoff_out"] += 1
                # The new owner has the events; what was not confirmed stays unconfirmed.
                self._end_waits(slot, lambda wait: events.stored(events.Status.UNACKED, wait.seq))
            else:  # the events are gone with the mailbox: the web app should resend
                self._end_waits(
                    slot, partial(_moved_away, route, self.moved_to.get(route), self.hash_version)
                )
            self._release(slot, "route_moved", route, spread)
            if observer is not None:
                observer.noted(
                    key, "moved", self.now(), route=route, to=self.moved_to.get(route),
                    owner=self.moved_owner.get(route), handed=handed,
                )  # fmt: skip
            if not handed:
                if slot.online and self.presence is not None:
                    self.presence("signoff", key)  # handed over keys stay online, elsewhere
                self.offline.expired(key)  # its events are gone with it
        if evicted:
            self.log.info("{n} keys of moved routes told to reconnect", n=evicted)
        return evicted

    def handoff_received(
        self, entries: list[Any], done: Iterable[int], sender: str | None = None,
        users: Iterable[Any] = (),
    ) -> int:  # fmt: skip
        """Mailboxes from a moved route's old owner (wire entries, MailboxExport.from_wire;
        docs/halod-protocol.md, "Hand-off"), then the routes whose hand-off is complete.
        ``sender``: the sending node's name; a route held for a rehash completes when
        every peer it expects has sent ``done`` (or, without a name, on the first).
        ``users``: the message's per-user entries (``import_users``), taken after the
        mailboxes. Returns how many mailboxes were installed; malformed entries are
        logged and skipped."""
        installed = 0
        for entry in entries:
            try:
                export = MailboxExport.from_wire(entry, self.routes, self.hash_version)
            except HandoffError as e:
                self.log.warn("ignoring a malformed hand-off entry: {e}", e=e)
                continue
            if self._import(export, sender):
                installed += 1
        if users:
            self.import_users(users)
        for route in done:
            incoming = self._incoming.get(route)
            if incoming is not None and incoming.expect is not None and sender is not None:
                incoming.expect.discard(sender)
                if incoming.expect:
                    continue
            self._complete(route, timed_out=False)
        return installed

    # -- the hash version (docs/hashing.md, "Moving a cluster from version 1 to 2") ---------

    def set_hash_version(self, version: int) -> None:
        """The cluster's hash version (HaloD's welcome/assign; link.py): every slot's
        route follows it. A change without ``rehash`` (a node joining a cluster of the
        other version) recomputes routes; the assignment that follows evicts what is not
        served here."""
        if version == self.hash_version:
            return
        self.hash_version = version
        for key, slot in self._slots.items():
            slot.route = route_of(key, self.routes, version)
        self._recount_routes()
        users = self.config.users
        if version == 1 and (users.max_connections or users.rate):
            self.log.warn("user limits are per node with hash_version 1 (docs/hashing.md)")

    def rehash(
        self, version: int, owners: Iterable[Any], me: str | None = None,
        users: dict[str, list[dict[str, Any]]] | None = None,
    ) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
        """HaloD's ``rehash``: the cluster now hashes with ``version``; ``owners`` is every
        route's owner (control.RouteMove: ``route``, ``name``, ``sp``). This node keeps
        serving its routes. Keys whose route under the new version is another node's are
        evicted (their browsers told ``reconnect`` with reason ``rehash`` and the route)
        and exported, grouped by the owner's name: the return value, with an entry (maybe
        empty) for every other owner, each to be sent with ``done`` = that owner's
        routes. Every served route is held (as for a hand-off) until every peer has sent
        its ``done`` (handoff_received with ``sender``) or ``handoff_timeout``. ``users``:
        filled with the per-user entries (``export_users``) for each owner, by name."""
        owner_of: dict[int, str | None] = {}
        sp_of: dict[int, str | None] = {}
        for move in owners:
            owner_of[move.route] = move.name
            sp_of[move.route] = move.sp
        self.hash_version = version
        self.moved_spread.clear()  # counted over the old version's routes
        owned = frozenset(range(1, self.routes + 1)) if self.owned is None else self.owned
        if me is None:  # this node's name: the owner of its routes
            me = next((owner_of[r] for r in owned if owner_of.get(r) is not None), None)
        peers = {name for name in owner_of.values() if name is not None and name != me}
        out: dict[str, list[dict[str, Any]]] = {name: [] for name in peers}
        for route, name in owner_of.items():
            if route not in owned and name != me:
                self.moved_to[route] = sp_of.get(route)
        handed = frozenset(r for r, name in owner_of.items() if r not in owned and name in out)
        for user_entry in self.export_users(handed):
            name = owner_of[user_entry["route"]]
            if users is not None and name is not None:
                users.setdefault(name, []).append(user_entry)
        # Holds of routes no peer takes are dropped, like their mailboxes below.
        self.drop_holds(frozenset(range(1, self.routes + 1)) - owned - handed)
        moved = 0
        moving = []
        relocated = []  # a new route this node serves too: the browser moves to its port
        for key, slot in self._slots.items():
            old, slot.route = slot.route, route_of(key, self.routes, version)
            if slot.route not in owned:
                moving.append((key, slot))
            elif slot.route != old and slot.sink is not None:
                relocated.append((key, slot, slot.sink))
        spread = spread_for(len(moving) + len(relocated), self.config.reconnect_rate)
        # A browser that was not attached (a long-poll between two polls) and comes back
        # here on a route of the new version that is not ours gets this move's spread too.
        self.moved_spread.update(
            (route, spread) for route in range(1, self.routes + 1) if route not in owned
        )  # fmt: skip
        for key, slot, sink in relocated:
            # Its mailbox stays, lingering: the browser comes back through the new route's
            # port (the old route's next owner would not know the key) and resumes from it
            # here. A long-poll between two polls learns the route at the old route's next
            # move instead (route_moved carries it).
            self.detach(key, sink, "rehash")
            try:
                sink.reconnect("rehash", slot.route, spread)
            except Exception:
                self.log.failure("telling a browser to reconnect failed")
        budgets = {name: _TraceBudget(self.observer) for name in out}
        for key, slot in moving:
            route = slot.route
            name = owner_of.get(route)
            del self._slots[key]
            self._forget(slot)
            self._unindex(key, slot)
            moved += 1
            observer = self.observer
            if name is not None and name in out:
                trace = budgets[name].export(key)
                out[name].append(
                    MailboxExport.of(key, slot.mailbox, route, slot.online, trace).to_wire()
                )
                self.stats["handoff_out"] += 1
                self._end_waits(slot, lambda wait: events.stored(events.Status.UNACKED, wait.seq))
            else:
                self._end_waits(
                    slot, partial(_moved_away, route, self.moved_to.get(route), version)
                )
                if slot.online and self.presence is not None:
                    self.presence("signoff", key)
                self.offline.expired(key)
            self._release(slot, "rehash", route, spread)
            if observer is not None:
                observer.noted(
                    key, "moved", self.now(), route=route, to=self.moved_to.get(route),
                    owner=name, handed=name is not None and name in out,
                )  # fmt: skip
        self._recount_routes()
        if peers:
            for route in owned:
                if route not in self._incoming:
                    timer = self.clock.callLater(
                        self.config.handoff_timeout, self._complete, route, True
                    )
                    self._incoming[route] = _Incoming(timer, set(peers))
                else:
                    self._incoming[route].expect = set(peers)
        if moved:
            self.log.info("rehash to version {v}: {n} keys moved", v=version, n=moved)
        return out

    def _import(self, export: MailboxExport, sender: str | None = None) -> bool:
        key, route = export.key, export.route
        slot = self._slots.get(key)
        observer = self.observer
        if observer is not None and route in self._incoming:
            now = self.now()
            if export.trace:
                observer.import_(key, list(export.trace), sender, now)
            if slot is None:
                observer.noted(key, "handed_in", now, origin=sender)
        if slot is not None:  # a continuation of a large mailbox, or a late arrival
            have = slot.mailbox
            if route in self._incoming and have.stream == export.stream:
                evicted = have.evicted
                if export.evicted is not None:
                    evicted = max(evicted, export.evicted)
                slot.mailbox = Mailbox.restored(
                    have.stream, self.config.mailbox, max(have.next_seq, export.next_seq),
                    max(have.acked, export.acked), have.export() + list(export.events),
                    evicted, have.export_tags() + list(export.tags),
                )  # fmt: skip
                self._recount(slot)
            return False
        if route not in self._incoming:
            return False  # timed out, or not moved here: keep what this node has
        self._install(key, export.mailbox(self.config.mailbox), route, export.online)
        self.stats["handoff_in"] += 1
        return True

    def _hold_attach(
        self, route: int, key: ConnectionKey, sink: Sink, after: Position | None
    ) -> bool:
        """Hold an attach while its route's mailboxes may be on the way; False if the
        route is not held."""
        incoming = self._incoming.get(route)
        if incoming is None:
            return False
        incoming.attaches.append(_HeldAttach(key, sink, after))
        return True

    def _held_gone(self, sink: Sink) -> None:
        """A transport closed: if it waits for a hand-off, do not attach it later."""
        for incoming in self._incoming.values():
            for held in incoming.attaches:
                if held.sink is sink:
                    held.gone = True

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

    def _complete_all(self) -> None:
        for route in list(self._incoming):
            self._complete(route, timed_out=False)
