"""The dashboard's timeline: what happened to the cluster, when, and how long it took.

Sans-I/O (time is passed in, docs/halod.md "The dashboard"). HaloD's shell reports
what it sees (a lost connection, an operator request, a saved table change, a relayed
hand-off, each heartbeat's per-route counts, its own leadership) and the recorder turns
that into incidents: a failover from its first sign (disconnect seen, or the last
heartbeat before the silence) to the saved change (``decided``) to the end of its
hand-offs and the browsers' return to the new owners (``ended``).

An incident is *settled* when every move that carries a hand-off has had it relayed
(a ``handoff`` whose ``done`` names the route), and the new owners' attached count on
the moved routes has reached ``BACK_SHARE`` of what the old owners last reported, or has
stopped growing for ``QUIET`` seconds after it began to. When ``settle_timeout`` passes
first, it ends unsettled. Incidents live in a ring of ``capacity``; nothing is persisted.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from orbited.core.routes import Change, ChangeKind

BACK_SHARE = 0.95  # the browsers are back when this share of browsers_before is attached
QUIET = 2.0  # seconds without growth after which the count is taken as final
SIGN_MAX_AGE = 3600.0  # a first sign older than this is not the start of a later change
DEFAULT_CAPACITY = 500  # incidents kept (halod.config timeline_size)
DEFAULT_SETTLE_TIMEOUT = 30.0  # seconds an incident may stay open


class Kind(StrEnum):
    JOIN = "join"  # a node joined as active (its routes came from others)
    SPARE = "spare"  # a node joined as a spare
    FAILOVER = "failover"  # a node failed: its routes moved
    LEAVE = "leave"  # a node said it leaves
    DRAIN = "drain"  # an operator drained a node
    UNDRAIN = "undrain"  # an operator took a node back
    READDRESS = "readdress"  # a node came back with other addresses
    LEAD = "lead"  # this HaloD began to lead
    FOLLOW = "follow"  # this HaloD follows
    TABLE = "table"  # a follower saw the table change in its warm copy
    MOVE = "move"  # a step of a paced move whose start this HaloD did not record
    REHASH = "rehash"  # an operator moved the cluster to another hash version


@dataclass
class RouteMove:
    route: int
    old: str | None
    new: str | None
    handoff: bool
    handoff_done: float | None = None  # HaloD relayed the hand-off naming it in `done`
    mailboxes: int = 0  # mailbox entries relayed for it (per message: to its first route)
    browsers_before: int | None = None  # old owner's last reported attached count on it
    browsers_back: int | None = None  # new owner's attached count on it, as it grows
    abandoned: bool = False  # its hand-off will not come: one end left or failed

    @property
    def waiting(self) -> bool:
        """A hand-off is still due for it."""
        return self.handoff and self.handoff_done is None and not self.abandoned

    def to_json(self) -> dict[str, Any]:
        return {
            "route": self.route, "old": self.old, "new": self.new, "handoff": self.handoff,
            "handoff_done": _t(self.handoff_done), "mailboxes": self.mailboxes,
            "browsers_before": self.browsers_before, "browsers_back": self.browsers_back,
        }  # fmt: skip


@dataclass
class Incident:
    id: int  # grows per HaloD process; the SSE stream and the page use it
    kind: Kind
    node: str
    reason: str  # failed's why, "operator", "left", "registered", "warm copy", "term 3"
    first_sign: float
    decided: float | None
    ended: float | None = None
    table_version: int | None = None
    moves: list[RouteMove] = field(default_factory=list)
    probe: str | None = None
    open: bool = True
    settled: bool | None = None  # None while open
    back_at: float | None = None  # when the browsers counted as back
    grew_at: float | None = None  # the last time the new owners' count grew
    back_total: int = 0  # the new owners' count at grew_at
    step_at: float | None = None  # the latest paced step joined it (settle_timeout from it)
    rev: int = 0  # bumped on every change (a cache of its JSON can tell)

    def browsers_moved(self) -> int | None:
        known = [m.browsers_before for m in self.moves if m.browsers_before is not None]
        return sum(known) if known else None

    def browsers_back(self) -> int | None:
        known = [m.browsers_back for m in self.moves if m.browsers_back is not None]
        return sum(known) if known else None


def _t(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _d(end: float | None, start: float | None) -> float | None:
    return None if end is None or start is None else round(max(0.0, end - start), 3)


class Timeline:
    def __init__(self, capacity: int = DEFAULT_CAPACITY,
                 settle_timeout: float = DEFAULT_SETTLE_TIMEOUT) -> None:  # fmt: skip
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.settle_timeout = settle_timeout
        self.incidents: deque[Incident] = deque(maxlen=capacity)
        self._open: list[Incident] = []
        self._next_id = 1
        self._signs: dict[str, tuple[str, float]] = {}  # name → (cause, at): not acted on yet
        self._last_beat: dict[str, float] = {}  # name → time of its last heartbeat
        self._dirty: dict[int, Incident] = {}  # changed since the last tick
        self.counts: Counter[Kind] = Counter()  # incidents recorded, by kind
        self._planned: Incident | None = None  # the last planned change: paced steps join it
        # Steps of a paced move are still to come (the shell says, ``paced``): the planned
        # incident stays open between them instead of ending after each.
        self._steps_pending = False

    # -- what the shell reports ----------------------------------------------------------

    def first_sign(self, name: str, cause: str, at: float) -> None:
        """Something began that may change the table: a lost connection ("disconnected"),
        an operator request ("drain", "undrain"). The earliest unacted sign is kept."""
        sign = self._signs.get(name)
        if sign is None or at - sign[1] > SIGN_MAX_AGE:
            self._signs[name] = (cause, at)

    def recovered(self, name: str) -> None:
        """``name`` registered again or answered: an earlier sign led to nothing."""
        self._signs.pop(name, None)

    def changed(
        self,
        change: Change,
        version: int,
        now: float,
        routes_by_node: Mapping[str, Mapping[int, int]],
        reason: str,
        handoffs: Iterable[int] = (),
        probe: str | None = None,
    ) -> Incident:
        """A table change saved as ``version``; ``handoffs``: the moved routes whose old
        owner hands its mailboxes over (the ``route_moved`` entries with ``handoff``).
        A later step of a paced move (ChangeKind.MOVED) joins the drain, undrain or join
        incident that started it, which opens again until the step settles."""
        if change.role is ChangeKind.MOVED:
            return self._step(change, version, now, routes_by_node, set(handoffs))
        sign = self._signs.pop(change.name, None)
        cause = sign[0] if sign is not None else ""
        kind = _kind(change, cause, reason)
        if sign is not None and now - sign[1] <= SIGN_MAX_AGE:
            at = sign[1]
        else:  # a failure found by silence began at the last heartbeat; anything else now
            beat = self._last_beat.get(change.name)
            at = beat if kind is Kind.FAILOVER and beat is not None else now
        if change.role is ChangeKind.GONE:
            self._last_beat.pop(change.name, None)
            self._abandon(change.name)
        with_handoff = set(handoffs)
        moves = []
        for move in change.moves:
            before = routes_by_node.get(move.old, {}).get(move.route) if move.old else None
            moves.append(RouteMove(move.route, move.old, move.new, move.route in with_handoff,
                                   browsers_before=before))  # fmt: skip
        incident = Incident(self._next_id, kind, change.name, reason, min(at, now), now,
                            table_version=version, moves=moves, probe=probe)  # fmt: skip
        incident.grew_at = now
        incident.step_at = now
        self._next_id += 1
        self.counts[kind] += 1
        if kind in (Kind.DRAIN, Kind.UNDRAIN, Kind.JOIN):
            self._planned = incident  # later steps of its paced move join it
        self.incidents.append(incident)
        self._open.append(incident)
        self._settle(incident, now)  # a change without moves ends at once
        return incident

    def _touch(self, incident: Incident) -> None:
        incident.rev += 1
        self._dirty[incident.id] = incident

    def _abandon(self, name: str) -> None:
        """``name`` is gone: hand-offs from or to it will not come."""
        for incident in self._open:
            for move in incident.moves:
                if move.waiting and name in (move.old, move.new):
                    move.abandoned = True
                    self._touch(incident)

    def _step(
        self, change: Change, version: int, now: float,
        routes_by_node: Mapping[str, Mapping[int, int]], handoffs: set[int],
    ) -> Incident:  # fmt: skip
        planned = self._planned
        if planned is None or not self.incidents or planned.id < self.incidents[0].id:
            planned = Incident(self._next_id, Kind.MOVE, change.name, "paced move", now, now)
            self._next_id += 1
            self.counts[Kind.MOVE] += 1
            self.incidents.append(planned)
            self._planned = planned
        for move in change.moves:
            before = routes_by_node.get(move.old, {}).get(move.route) if move.old else None
            planned.moves.append(RouteMove(move.route, move.old, move.new, move.route in handoffs,
                                           browsers_before=before))  # fmt: skip
        planned.table_version = version
        planned.back_at = None  # the share is over more moves now
        planned.grew_at = now
        planned.step_at = now
        if not planned.open:
            planned.open, planned.ended, planned.settled = True, None, None
            self._open.append(planned)
        self._touch(planned)
        self._settle(planned, now)
        return planned

    def paced(self, pending: bool) -> None:
        """Whether routes of a paced move are still to move (HaloD's ``moving``)."""
        self._steps_pending = pending

    def rehashed(self, old: int, new: int, version: int | None, now: float) -> Incident:
        """An operator moved the cluster from hash version ``old`` to ``new``, saved as
        table ``version`` (None: not known yet, etcd's write in flight)."""
        return self._instant(Kind.REHASH, "", f"hash version {old} -> {new}", now, version, [])

    def handoff_relayed(self, src: str, dst: str, done: tuple[int, ...], mailboxes: int,
                        now: float) -> None:  # fmt: skip
        """HaloD relayed a ``handoff`` from ``src`` to ``dst`` with ``mailboxes`` entries;
        the routes in ``done`` are complete."""
        finished = set(done)
        for incident in self._open:
            pending = [m for m in incident.moves if m.waiting and m.old == src and m.new == dst]
            if not pending:
                continue
            target = next((m for m in pending if m.route in finished), pending[0])
            target.mailboxes += mailboxes
            mailboxes = 0
            for move in pending:
                if move.route in finished:
                    move.handoff_done = now
            self._touch(incident)
            if not finished:
                break  # the entries belong to the oldest incident still waiting

    def node_routes(self, name: str, routes: Mapping[int, int], now: float) -> bool:
        """A heartbeat from ``name`` with its attached count per route (merged); True when
        an open incident's counts changed."""
        self._last_beat[name] = now
        changed = False
        for incident in self._open:
            touched = False
            for move in incident.moves:
                if move.new == name:
                    count = routes.get(move.route, 0)
                    if count != move.browsers_back:
                        move.browsers_back = count
                        touched = True
            if touched:
                total = incident.browsers_back() or 0
                if total > incident.back_total:
                    incident.back_total, incident.grew_at = total, now
                moved = incident.browsers_moved()
                if incident.back_at is None and moved and total >= BACK_SHARE * moved:
                    incident.back_at = now
                self._touch(incident)
                changed = True
        return changed

    def leadership(self, kind: Kind, name: str, term: int, now: float) -> Incident:
        """This HaloD (``name``) began to lead (Kind.LEAD) or to follow (Kind.FOLLOW)."""
        return self._instant(kind, name, f"term {term}", now, None, [])

    def warm_diff(self, before: Mapping[int, str | None], after: Mapping[int, str | None],
                  version: int, now: float) -> Incident | None:  # fmt: skip
        """A follower's warm copy changed: one ``table`` incident with the moved routes
        (no durations, no browser counts: a follower gets no heartbeats)."""
        moves = [
            RouteMove(route, before.get(route), after.get(route), False)
            for route in sorted(set(before) | set(after))
            if before.get(route) != after.get(route)
        ]
        if not moves:
            return None
        olds = {m.old for m in moves if m.old is not None}
        news = {m.new for m in moves if m.new is not None}
        node = next(iter(olds)) if len(olds) == 1 else next(iter(news)) if len(news) == 1 else ""
        return self._instant(Kind.TABLE, node, "warm copy", now, version, moves)

    def tick(self, now: float) -> list[Incident]:
        """Close settled or timed-out incidents; the incidents changed since the last tick."""
        for incident in list(self._open):
            self._settle(incident, now)
        changed, self._dirty = list(self._dirty.values()), {}
        return changed

    # -- queries -----------------------------------------------------------------------

    def in_flight(self) -> dict[int, float]:
        """route → since when its hand-off has been waiting (the picture's outline)."""
        flying: dict[int, float] = {}
        for incident in self._open:
            for move in incident.moves:
                if move.waiting:
                    flying[move.route] = incident.decided or incident.first_sign
        return flying

    def since(self, after_id: int) -> list[Incident]:
        return [i for i in self.incidents if i.id > after_id]

    def last(self, n: int) -> list[Incident]:
        """The newest ``n`` incidents, newest first."""
        out: list[Incident] = []
        for incident in reversed(self.incidents):
            if len(out) >= n:
                break
            out.append(incident)
        return out

    def touching(self, routes: set[int], start: float, end: float) -> list[Incident]:
        """Incidents that moved one of ``routes`` between ``start`` and ``end``."""
        return [
            i for i in self.incidents
            if i.decided is not None and start <= i.decided <= end
            and any(m.route in routes for m in i.moves)
        ]  # fmt: skip

    def to_json(self, incident: Incident) -> dict[str, Any]:
        i = incident
        handoff_moves = [m for m in i.moves if m.handoff]
        done = [m.handoff_done for m in handoff_moves if m.handoff_done is not None]
        handoff_s = (
            _d(max(done), i.decided) if handoff_moves and len(done) == len(handoff_moves)
            else None
        )  # fmt: skip
        return {
            "id": i.id, "kind": i.kind.value, "node": i.node, "reason": i.reason,
            "first_sign": _t(i.first_sign), "decided": _t(i.decided), "ended": _t(i.ended),
            "open": i.open, "settled": i.settled, "table_version": i.table_version,
            "probe": i.probe, "detect_s": _d(i.decided, i.first_sign), "handoff_s": handoff_s,
            "back_s": _d(i.back_at, i.decided), "browsers_moved": i.browsers_moved(),
            "browsers_back": i.browsers_back(),
            "mailboxes_handed": sum(m.mailboxes for m in i.moves),
            "moves": [m.to_json() for m in i.moves],
        }  # fmt: skip

    # -- inside --------------------------------------------------------------------------

    def _instant(self, kind: Kind, node: str, reason: str, now: float, version: int | None,
                 moves: list[RouteMove]) -> Incident:  # fmt: skip
        incident = Incident(self._next_id, kind, node, reason, now, now, now, version, moves,
                            open=False, settled=True)  # fmt: skip
        self._next_id += 1
        self.counts[kind] += 1
        self.incidents.append(incident)
        self._touch(incident)
        return incident

    def _settle(self, incident: Incident, now: float) -> None:
        decided = incident.step_at or incident.decided or incident.first_sign
        handed = not any(m.waiting for m in incident.moves)
        moved = incident.browsers_moved()
        back = (
            not moved  # nobody to wait for (or no counts reported)
            or incident.back_at is not None
            # some came back, then no more for QUIET seconds
            or (incident.back_total > 0 and now - (incident.grew_at or decided) >= QUIET)
        )
        if handed and back:
            if incident is self._planned and self._steps_pending:
                return  # this step is over, not the move: open until its last step settles
            incident.settled = True
        elif now - decided >= self.settle_timeout:
            incident.settled = False
        else:
            return
        incident.open = False
        incident.ended = now
        self._open.remove(incident)
        self._touch(incident)


def _kind(change: Change, cause: str, reason: str) -> Kind:
    role = change.role
    if role is ChangeKind.GONE:
        if cause == "drain" or reason == "operator":
            return Kind.DRAIN
        return Kind.LEAVE if reason == "left" else Kind.FAILOVER
    if role is ChangeKind.READDRESSED:
        return Kind.READDRESS
    if cause == "undrain":
        return Kind.UNDRAIN
    return Kind.SPARE if role is ChangeKind.SPARE else Kind.JOIN
