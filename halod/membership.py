"""Who is in the cluster and whether they are alive (sans-I/O).

Owns node records (addresses, capacity, liveness), registration rules, heartbeat and grace
deadlines, and turning route-table changes into messages for the nodes concerned. Time is
passed in; nothing here touches a socket or a timer (halod.server does). Rules:
docs/halod-protocol.md.
"""

from __future__ import annotations

import hmac
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from halod.liveness import Cause, Finding, Outcome, Prober, ProbeRequest, ProbeSettings, Verdict
from halod.store.base import hash_version_field, snapshot_hash_version
from orbited.core.control import (
    Assign,
    ControlError,
    ErrorCode,
    Heartbeat,
    Register,
    Rehash,
    RouteMove,
    RouteMoved,
    Welcome,
)
from orbited.core.routes import Change, ChangeKind, Move, Role, RouteTable, RouteTableError

MAX_FAILED_SHOWN = 256  # failed nodes remembered for status pages
# Seconds after which a rehash counts as finished though some hand-offs never came (a
# node holds its routes for at most its handoff_timeout, 5 s by default).
REHASH_TIMEOUT = 30.0
# Paced planned moves (docs/halod.md, "Paced moves"): one step moves about MOVE_STEP
# seconds' worth of browsers at ``move_rate``; the next waits for the step's hand-offs,
# or MOVE_STEP_TIMEOUT if one never comes.
MOVE_STEP = 0.05
MOVE_STEP_TIMEOUT = 2.0


@dataclass(frozen=True)
class Timing:
    heartbeat_interval: float = 1.0  # seconds between a node's heartbeats
    missed_heartbeats: int = 3  # k: a connected node silent for k intervals has failed
    grace: float = 5.0  # seconds a disconnected node has to come back and keep its routes
    probe: ProbeSettings = ProbeSettings()  # telling a dead node from a control-link blip
    # Browsers per second a planned move (drain, undrain, join) sends to their new
    # owners; 0: every route at once. A crash is never paced. 500/s kept the longest
    # silence of a drained node's browsers at 0.26 s (nftables) where 2000/s gave 0.39 s
    # on the 2-core bench box (docs/performance.md, "Failover as users see it").
    move_rate: float = 500.0


@dataclass
class NodeRecord:
    name: str
    browser: str
    sp: str
    capacity: int
    connected: bool = False
    last_heartbeat: float = 0.0
    disconnected_at: float | None = None
    connections: int = 0  # browsers connected now (heartbeat `connections`)
    # A heartbeat (with ``connections``) came since this HaloD started: a paced move
    # planned by an earlier HaloD (restored) sizes its steps by it, so it waits for one.
    counted: bool = False
    mailboxes: int | None = None  # keys with a mailbox, lingering ones too (None: not sent)
    hashes: tuple[int, ...] | None = None  # hash versions it speaks (None: not registered yet)

    def address(self) -> dict[str, str]:
        return {"name": self.name, "browser": self.browser, "sp": self.sp}


# The ``state`` of /status and the operator endpoints: a member's role, or "failed".
NodeState = Role | Literal["failed"]


@dataclass(frozen=True)
class Suspicion:
    """Why a node is suspected, and the verdict of its last probe (None: none yet)."""

    cause: Cause
    probe: Verdict | None


@dataclass(frozen=True)
class Send:
    """Deliver ``message`` to the connected node ``name``."""

    name: str
    message: Welcome | Assign | RouteMoved | Rehash


@dataclass(frozen=True)
class Drop:
    """Send ``name`` an error and close its control connection."""

    name: str
    code: ErrorCode
    message: str


class Level(StrEnum):
    INFO = "info"
    WARN = "warn"


@dataclass(frozen=True)
class Notice:
    """A line for the operator's log."""

    level: Level
    text: str


@dataclass
class Effects:
    sends: list[Send] = field(default_factory=list)
    drops: list[Drop] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)  # table changes: persist, log
    probes: list[ProbeRequest] = field(default_factory=list)  # connects to start
    findings: list[Finding] = field(default_factory=list)  # probe verdicts: log
    notices: list[Notice] = field(default_factory=list)  # log lines (the spare situation)
    persist: bool = False  # save the table though no route changed (a rehash)

    def extend(self, other: Effects) -> None:
        self.persist = self.persist or other.persist
        self.sends += other.sends
        self.drops += other.drops
        self.changes += other.changes
        self.probes += other.probes
        self.findings += other.findings
        self.notices += other.notices


@dataclass
class PacedStep:
    """The step of a paced move that runs: its routes, when the next may start (its
    browsers' share of ``move_rate``), and the hand-offs it still waits for."""

    routes: tuple[int, ...]
    started: float
    due: float
    pending: set[int]

    def ready(self, now: float) -> bool:
        return now >= self.due and (not self.pending or now - self.started >= MOVE_STEP_TIMEOUT)

    def next_at(self) -> float:
        return self.due if not self.pending else max(self.due, self.started + MOVE_STEP_TIMEOUT)


@dataclass
class RehashRun:
    """A rehash whose hand-offs are not all done: every active node sends each other
    active node a ``handoff`` whose ``done`` names the receiver's routes."""

    hash_version: int
    started: float
    pending: set[tuple[str, str]]  # (sender, receiver) pairs whose `done` is still due

    def view(self) -> dict[str, Any]:
        return {
            "hash_version": self.hash_version,
            "pending": [[a, b] for a, b in sorted(self.pending)],
        }


class Membership:
    def __init__(self, table: RouteTable, timing: Timing, secret: str | None = None,
                 hash_version: int = 1) -> None:  # fmt: skip
        self.table = table
        self.timing = timing
        self.secret = secret
        # How keys map to routes (docs/hashing.md): persisted with the table; a table
        # saved without it is version 1. A new HaloD table takes halod.config's.
        self.hash_version = hash_version
        self.rehashing: RehashRun | None = None
        self.nodes: dict[str, NodeRecord] = {}
        self.failed: OrderedDict[str, tuple[float, str]] = OrderedDict()  # name → (when, why)
        self.drained: set[str] = set()  # registered, holding no routes, never promoted
        self.failovers = 0
        self.prober = Prober(timing.probe)
        # Paced moves: route → the machine still serving it though the table names
        # another (its planned move waits for a later step). Persisted with the table.
        self.holdover: dict[int, str] = {}
        self.step: PacedStep | None = None
        self._share: dict[int, float] = {}  # route → its browsers when its move was planned

    # -- node messages ------------------------------------------------------------------

    def register(self, msg: Register, now: float) -> Effects:
        """A validated ``register``. Raises ControlError (nothing changed) to refuse it."""
        if self.secret is not None and not hmac.compare_digest(
            (msg.secret or "").encode(), self.secret.encode()
        ):
            raise ControlError(ErrorCode.UNAUTHORIZED, "wrong or missing cluster secret")
        hashes = msg.hashes if msg.hashes is not None else (1,)  # an older node: 1
        if self.hash_version not in hashes:
            raise ControlError(
                ErrorCode.UNSUPPORTED_HASH,
                f"this cluster hashes keys with version {self.hash_version} (docs/hashing.md)"
                f"; the node speaks {', '.join(map(str, hashes)) or 'none'}: upgrade it",
            )
        name, claim = msg.name, msg.node_id
        record = self.nodes.get(name)
        held = self.table.node_id(name)
        if record is not None and record.connected:
            raise ControlError(ErrorCode.DUPLICATE_NAME, f"a node named {name!r} is connected")
        if record is not None:  # back within the grace period: keeps its id and routes
            if claim is not None and claim != held:
                raise ControlError(ErrorCode.ID_MISMATCH, f"{name!r} holds id {held}, not {claim}")
        elif claim is not None:
            owner = self.table.machines().get(claim)
            if owner is not None:
                raise ControlError(ErrorCode.ID_CLAIMED, f"node id {claim} belongs to {owner!r}")
            raise ControlError(ErrorCode.ID_CLAIMED, f"{name!r} no longer holds node id {claim}")
        effects = Effects()
        if record is None:
            record = self.nodes[name] = NodeRecord(name, msg.browser, msg.sp, 0)
            record.connected = True  # for the pacing below: it can take a hand-off
            self.failed.pop(name, None)
            spares = len(self.table.spares)
            before = self.effective_owners()
            change = self._effective(self.table.join(name), before, now, planned=True)
            effects.changes.append(change)
            effects.notices += self._spare_notices(spares, change)
        elif (record.browser, record.sp) != (msg.browser, msg.sp):
            effects.changes.append(Change(name, ChangeKind.READDRESSED, held))
        record.browser, record.sp, record.capacity = msg.browser, msg.sp, msg.capacity
        record.hashes = tuple(sorted(set(hashes)))
        record.connected, record.disconnected_at, record.last_heartbeat = True, None, now
        self.prober.clear(name)  # probes still in flight are for a connection now gone
        notices: list[Send] = []
        incoming: set[int] = set()
        for change in effects.changes:
            notices += self._notices(change, skip=name)
            incoming |= self._incoming(change, name)
        effects.sends.append(Send(name, self._welcome(name, incoming)))
        effects.sends += notices
        return effects

    def heartbeat(self, name: str, msg: Heartbeat, now: float) -> bool:
        """Note a heartbeat; False if ``name`` is no longer a member (it was just failed)."""
        record = self.nodes.get(name)
        if record is None:
            return False
        record.last_heartbeat = now
        record.counted = True  # (a node that sends no count never will: 0 it stays)
        if msg.connections is not None:
            record.connections = msg.connections
        if msg.mailboxes is not None:
            record.mailboxes = msg.mailboxes
        if self.prober.cause(name) is Cause.SILENT:  # it was only late
            self.prober.clear(name)
        return True

    def disconnected(self, name: str, now: float) -> Effects:
        """Its control connection closed: probe its ports now (docs/halod.md, "Detecting
        a dead node"); ``grace`` applies while it answers."""
        record = self.nodes.get(name)
        if record is None or not record.connected:
            return Effects()
        record.connected, record.disconnected_at = False, now
        return Effects(probes=self.prober.suspect(name, Cause.DISCONNECTED, _ports(record), now))

    def probe_restored(self, now: float) -> Effects:
        """A new leader took over a restored table (HaloD on etcd): probe every node that
        has not registered again, as if its control connection had just closed. A node
        whose ports refuse was lost with (or just before) the old leader and fails over
        now; one that answers keeps ``grace`` (docs/halod.md, "High availability").
        Not after a cold start: nodes may still be starting then."""
        effects = Effects()
        for record in self.nodes.values():
            if not record.connected and record.disconnected_at is not None:
                effects.probes += self.prober.suspect(
                    record.name, Cause.DISCONNECTED, _ports(record), now
                )
        return effects

    def probed(self, name: str, probe_id: int, port: str, outcome: Outcome, now: float
               ) -> Effects:  # fmt: skip
        """One port's probe outcome (halod.probe)."""
        return self._found(self.prober.result(name, probe_id, port, outcome, now), now)

    def probe_due(self) -> float | None:
        """When ``probe_tick`` should next run (sooner than the deadline tick)."""
        return self.prober.next_due()

    def probe_tick(self, now: float, timeouts: bool = True) -> Effects:
        """Time out probes and start the next ones (``tick`` does this too)."""
        effects = Effects()
        requests, findings = self.prober.tick(now, timeouts=timeouts)
        effects.probes += requests
        for finding in findings:
            effects.extend(self._found(finding, now))
        return effects

    def _found(self, finding: Finding | None, now: float) -> Effects:
        if finding is None:
            return Effects()
        if not finding.fail:
            return Effects(findings=[finding])
        if finding.cause is Cause.DISCONNECTED:
            why = f"disconnected, {finding.describe()}"
        else:
            silent = now - self.nodes[finding.name].last_heartbeat
            why = f"no heartbeat for {silent:.1f}s, {finding.describe()}"
        effects = Effects(findings=[finding])
        effects.extend(self.leave(finding.name, now, why))
        return effects

    def leave(self, name: str, now: float, why: str = "left") -> Effects:
        """The node is gone for good (said so, or failed): hand its routes over now."""
        record = self.nodes.pop(name, None)
        if record is None:
            return Effects()
        self.prober.clear(name)
        self._rehash_forget(name)
        self.failed[name] = (now, why)
        while len(self.failed) > MAX_FAILED_SHOWN:
            self.failed.popitem(last=False)
        before = self.effective_owners()
        if name in self.drained:  # in the table no more; perhaps still serving held routes
            self.drained.discard(name)
            change = self._effective(Change(name, ChangeKind.GONE, None), before, now)
            effects = Effects(changes=[change], sends=self._notices(change, skip=name))
        else:
            spares = len(self.table.spares)
            change = self._effective(self.table.leave(name), before, now)
            if change.moves:
                self.failovers += 1
            effects = Effects(changes=[change], sends=self._notices(change, skip=name))
            effects.notices += self._spare_notices(spares, change)
        if record.connected and why != "left":
            effects.drops.append(Drop(name, ErrorCode.FAILED, f"declared failed: {why}"))
        return effects

    def drain(self, name: str, now: float) -> Effects:
        """An operator takes ``name`` out of service: its routes move (to a spare, or per
        the policy; paced, see ``pace_tick``) while it stays connected, so it can hand
        over and be stopped."""
        if name not in self.nodes or name in self.drained:
            raise ControlError(ErrorCode.NOT_REGISTERED, f"{name!r} is not an active or spare node")
        if self.table.node_id(name) is not None and len(self.table.table()) == 1:
            if not self.table.spares:
                raise ControlError(ErrorCode.BAD_MESSAGE, "cannot drain the last active node")
        spares = len(self.table.spares)
        before = self.effective_owners()
        change = self.table.leave(name)
        self.drained.add(name)
        change = self._effective(change, before, now, planned=True)
        effects = Effects(changes=[change], sends=self._notices(change, skip=""))
        effects.notices += self._spare_notices(spares, change, drained=True)
        if not any(s.name == name and isinstance(s.message, Assign) for s in effects.sends):
            effects.sends.append(Send(name, self._assign(name)))  # it was a spare
        return effects

    def undrain(self, name: str, now: float) -> Effects:
        if name not in self.drained:
            raise ControlError(ErrorCode.NOT_REGISTERED, f"{name!r} is not drained")
        self.drained.discard(name)
        spares = len(self.table.spares)
        before = self.effective_owners()
        change = self._effective(self.table.join(name), before, now, planned=True)
        effects = Effects(changes=[change], sends=self._notices(change, skip=""))
        effects.notices += self._spare_notices(spares, change)
        return effects

    def tick(self, now: float, heartbeats_current: bool = True) -> Effects:
        """Fail nodes past their deadline, time out and repeat probes; call at least every
        heartbeat interval. ``heartbeats_current`` False: the caller was itself stalled,
        so heartbeats and probe answers may be waiting unread — only disconnection
        deadlines are applied this time."""
        timing = self.timing
        silent_after = timing.missed_heartbeats * timing.heartbeat_interval
        probing = self.prober.settings.enabled
        effects = self.probe_tick(now, timeouts=heartbeats_current)
        for record in list(self.nodes.values()):
            if record.name not in self.nodes:  # failed by a finding above
                continue
            silent = now - record.last_heartbeat
            if record.connected and heartbeats_current and silent > silent_after:
                if probing and silent <= silent_after + timing.grace:
                    # Late heartbeats (a busy node) must not fail it: probe first.
                    if self.prober.cause(record.name) is not Cause.SILENT:
                        effects.probes += self.prober.suspect(
                            record.name, Cause.SILENT, _ports(record), now
                        )
                    continue
                why = f"no heartbeat for {silent:.1f}s"
            elif (
                not record.connected
                and record.disconnected_at is not None  # 0.0 is a time (a test clock)
                and now - record.disconnected_at > timing.grace
            ):
                why = f"disconnected for more than {timing.grace:g}s"
            else:
                continue
            if self.prober.last_verdict(record.name) is Verdict.ALIVE:
                why += " (its ports still answered)"
            effects.extend(self.leave(record.name, now, why))
        effects.extend(self.pace_tick(now))  # a step whose node was away may go now
        return effects

    # -- paced planned moves (docs/halod.md, "Paced moves") --------------------------------

    def effective_owners(self) -> dict[int, str]:
        """route → the machine serving it now: the table's owner, unless a paced move
        still holds the route with its old owner."""
        owners = self.table.owners()
        owners.update(self.holdover)
        return owners

    def held_by(self, name: str) -> list[int]:
        """The routes ``name`` serves now (ascending)."""
        return sorted(r for r, owner in self.effective_owners().items() if owner == name)

    def pace_due(self) -> float | None:
        """When ``pace_tick`` should next run (None: no paced move waits)."""
        if self.step is not None:
            return self.step.next_at() if self.holdover else None
        # None while every held route waits for a node to come back or, restored, for
        # its old owner's first heartbeat (the deadline tick retries)
        return 0.0 if self._movable() else None

    def pace_tick(self, now: float) -> Effects:
        """Start the next step of a paced move when the last one is done: its routes
        (about MOVE_STEP seconds of browsers at ``move_rate``) reach their new owner,
        the old owner hands their mailboxes over."""
        if not self.holdover:
            self.step = None
            return Effects()
        before = self.effective_owners()
        self._take_step(now)
        after = self.effective_owners()
        moves = _diff(before, after, self.table.routes)
        if not moves:
            return Effects()
        change = Change(moves[0].old or "", ChangeKind.MOVED, None, moves)
        return Effects(changes=[change], sends=self._notices(change, skip=""))

    def _effective(self, change: Change, before: dict[int, str], now: float,
                   planned: bool = False) -> Change:  # fmt: skip
        """``change`` as the nodes see it: its moves from who served each route
        ``before`` to who serves it now. A planned change between two live nodes keeps
        the routes beyond its first step with their old owners (``holdover``)."""
        table = self.table.owners()
        for route, holder in list(self.holdover.items()):
            if table.get(route) == holder or holder not in self.nodes:
                del self.holdover[route]  # home again, or its holder is gone: moves now
                self._share.pop(route, None)
        if planned and self.timing.move_rate > 0:
            held = Counter(before.values())
            for route, new in table.items():
                old = before.get(route)
                if old is not None and old != new and self._handoff(old, new):
                    self.holdover.setdefault(route, old)
                    # Browsers a route has: its owner's over its routes (a heartbeat's
                    # count), taken now, before the owner's count starts to fall.
                    self._share[route] = self.nodes[old].connections / max(1, held[old])
            self._take_step(now)
        moves = _diff(before, self.effective_owners(), self.table.routes)
        return Change(change.name, change.role, change.node_id, moves)

    def _movable(self) -> list[int]:
        """Held routes whose step may come: both ends connected (a hand-off needs them;
        the others wait, and a failure moves them at once), and, for a move an earlier
        HaloD planned (restored: no share taken), the old owner's browsers counted by a
        heartbeat to this one (else every route would count 0 and go in one step)."""
        table = self.table.owners()
        movable = []
        for route in sorted(self.holdover):
            old, new = self.nodes.get(self.holdover[route]), self.nodes.get(table.get(route, ""))
            if (
                old is not None
                and new is not None
                and old.connected
                and new.connected
                and (route in self._share or old.counted)
            ):
                movable.append(route)
        return movable

    def _take_step(self, now: float) -> None:
        """Release the next routes of ``holdover``: whole routes, oldest route number
        first, up to MOVE_STEP seconds of browsers (each route counts its old owner's
        connections over its routes; at least one route), unless the step that runs is
        not done."""
        if self.step is not None and not self.step.ready(now):
            return
        self.step = None
        rate = self.timing.move_rate
        held = Counter(self.effective_owners().values())
        budget = rate * MOVE_STEP if rate > 0 else float("inf")
        taken: list[int] = []
        browsers = 0.0
        for route in self._movable():
            holder = self.holdover[route]
            old_record = self.nodes[holder]
            share = self._share.get(route)
            if share is None:  # planned by an earlier leader (restored): estimate now
                share = old_record.connections / max(1, held[holder])
            if taken and browsers + share > budget:
                break
            taken.append(route)
            browsers += share
        for route in taken:
            del self.holdover[route]
            self._share.pop(route, None)
        if taken:
            due = now + (browsers / rate if rate > 0 else 0.0)
            # A step that moved browsers waits for its hand-offs before the next starts.
            pending = set(taken) if browsers > 0 else set()
            self.step = PacedStep(tuple(taken), now, due, pending)

    # -- rehash (docs/halod.md, "Rehash") -------------------------------------------------

    def rehash(self, version: int, now: float) -> Effects:
        """Move the cluster to hash ``version``: the table (routes unchanged) is saved with
        it, then every member hears ``rehash`` with the owners of all routes. Raises
        ControlError: ``rehash_in_progress`` while one runs, ``rehash_unsupported`` if a
        member does not speak ``version`` or is not connected (it must hear the rehash).
        The same version: nothing to do."""
        running = self.rehash_running(now)
        if running is not None:
            raise ControlError(
                ErrorCode.REHASH_IN_PROGRESS,
                f"a rehash to version {running.hash_version} is running "
                f"({len(running.pending)} hand-offs to go)",
            )
        if self.holdover:
            raise ControlError(
                ErrorCode.REHASH_IN_PROGRESS,
                f"a paced move is running ({len(self.holdover)} routes to go); "
                "try again when it is done",
            )
        for name, record in sorted(self.nodes.items()):
            if not record.connected:
                why = f"node {name} is not connected; every member must hear the rehash"
                raise ControlError(ErrorCode.REHASH_UNSUPPORTED, why)
            speaks = record.hashes or (1,)
            if version not in speaks:
                why = (f"node {name} speaks hash versions {', '.join(map(str, speaks))}, "
                       f"not {version}: upgrade it first")  # fmt: skip
                raise ControlError(ErrorCode.REHASH_UNSUPPORTED, why)
        if version == self.hash_version:
            return Effects()
        self.hash_version = version
        records = self.owners()
        owners = tuple(
            RouteMove(r, records[r].name, records[r].browser, records[r].sp)
            if r in records else RouteMove(r, None)
            for r in range(1, self.table.routes + 1)
        )  # fmt: skip
        active = sorted({m.name for m in owners if m.name is not None})
        pending = {(a, b) for a in active for b in active if a != b}
        self.rehashing = RehashRun(version, now, pending) if pending else None
        message = Rehash(version, 0, owners)  # the table version is filled in once saved
        return Effects(persist=True, sends=[Send(name, message) for name in sorted(self.nodes)])

    def rehash_running(self, now: float) -> RehashRun | None:
        """The rehash whose hand-offs are still due (None: none runs). One counts as done
        REHASH_TIMEOUT seconds after it started (a node holds routes at most its
        handoff_timeout)."""
        run = self.rehashing
        if run is not None and (not run.pending or now - run.started > REHASH_TIMEOUT):
            self.rehashing = run = None
        return run

    def handoff_relayed(self, sender: str, receiver: str, done: tuple[int, ...]) -> None:
        """HaloD relayed a ``handoff``: one naming ``done`` routes completes its pair (a
        rehash) or those routes of a paced step."""
        if self.rehashing is not None and done:
            self.rehashing.pending.discard((sender, receiver))
        if self.step is not None and done:
            self.step.pending.difference_update(done)

    def _rehash_forget(self, name: str) -> None:
        """``name`` left: the rehash waits for none of its hand-offs."""
        run = self.rehashing
        if run is not None:
            run.pending = {p for p in run.pending if name not in p}

    # -- the spare situation -----------------------------------------------------------

    def _next_failure(self) -> str:
        return f"the next failure moves routes between live nodes (policy {self.table.policy})"

    def warnings(self) -> list[str]:
        """What an operator should know now (status pages): no spare though one is wanted."""
        wanted = self.table.spares_wanted
        if wanted and not self.table.spares:
            return [f"no spare left ({wanted} wanted): {self._next_failure()}"]
        return []

    def _spare_notices(self, before: int, change: Change, drained: bool = False
                       ) -> list[Notice]:  # fmt: skip
        """Log lines for a change of the spare count: the last spare used up (or gone),
        a failover that found none, a spare available again. Only when spares are wanted."""
        if not self.table.spares_wanted:
            return []
        after = len(self.table.spares)
        failover = change.role is ChangeKind.GONE and change.node_id is not None
        if failover and before == 0:
            what = "drain" if drained else "failover"
            return [
                Notice(
                    Level.WARN,
                    f"{what} of {change.name} found no spare: its routes moved "
                    f"between live nodes (policy {self.table.policy})",
                )
            ]
        if before and not after:
            if failover:
                assert change.node_id is not None  # failover
                taker = self.table.machines().get(change.node_id, "?")
                how = f"{taker} took over from {change.name}"
            elif change.role is ChangeKind.GONE:
                how = f"spare {change.name} {'was drained' if drained else 'is gone'}"
            else:
                how = f"{change.name} became {change.role}"
            return [Notice(Level.WARN, f"no spare left: {how}; {self._next_failure()}")]
        if after and not before:
            return [
                Notice(Level.INFO, f"a spare is available again: {', '.join(self.table.spares)}")
            ]
        return []

    # -- messages to nodes --------------------------------------------------------------

    def _assign(self, name: str, incoming: set[int] | None = None) -> Assign:
        """``name``'s complete assignment (a registered node)."""
        node_id = self.table.node_id(name)
        routes = self.held_by(name)  # a draining node keeps the routes not yet moved
        role = self.state_of(name)
        assert isinstance(role, Role), "only members get an assignment"
        return Assign(node_id, role, tuple(routes), tuple(sorted(incoming or ())),
                      hash_version=self.hash_version)  # fmt: skip

    def _welcome(self, name: str, incoming: set[int]) -> Welcome:
        a = self._assign(name, incoming)
        timing = self.timing
        return Welcome(a.node_id, a.role, a.routes, self.table.routes,
                       timing.heartbeat_interval, timing.missed_heartbeats, a.incoming,
                       hash_version=self.hash_version)  # fmt: skip

    def _handoff(self, old: str | None, new: str | None) -> bool:
        """A move between two live nodes: the old owner hands its mailboxes over."""
        if old is None or new is None:
            return False
        a, b = self.nodes.get(old), self.nodes.get(new)
        return a is not None and b is not None and a.connected and b.connected

    def _incoming(self, change: Change, name: str) -> set[int]:
        return {m.route for m in change.moves if m.new == name and self._handoff(m.old, m.new)}

    def _notices(self, change: Change, skip: str) -> list[Send]:
        """'route moved' to each former owner, then the new assignment of every member
        whose routes or role changed. Moves between live nodes carry a hand-off: the old
        owner sends its mailboxes, the new one holds the routes until they arrive."""
        moved: dict[str, list[RouteMove]] = {}
        touched: dict[str, None] = {}
        for move in change.moves:
            target = self.nodes.get(move.new) if move.new is not None else None
            handoff = self._handoff(move.old, move.new)
            entry = (
                RouteMove(move.route, target.name, target.browser, target.sp, handoff)
                if target is not None
                else RouteMove(move.route, None)
            )
            if move.old is not None:
                moved.setdefault(move.old, []).append(entry)
                touched[move.old] = None
            if move.new is not None:
                touched[move.new] = None
        if change.role in (ChangeKind.ACTIVE, ChangeKind.SPARE):
            touched[change.name] = None
        sends = [
            Send(old, RouteMoved(tuple(entries)))
            for old, entries in moved.items()
            if old in self.nodes and old != skip
        ]
        sends += [
            Send(name, self._assign(name, self._incoming(change, name)))
            for name in touched
            if name in self.nodes and name != skip
        ]
        return sends

    # -- views and persistence ----------------------------------------------------------

    def state_of(self, name: str) -> NodeState:
        if name in self.drained:
            return Role.DRAINED
        if name in self.nodes:
            return Role.ACTIVE if self.table.node_id(name) is not None else Role.SPARE
        return "failed"

    def suspicion(self, name: str) -> Suspicion | None:
        """For status pages: why ``name`` is suspected and the last probe's verdict."""
        cause = self.prober.cause(name)
        if cause is None:
            return None
        return Suspicion(cause, self.prober.last_verdict(name))

    def owners(self) -> dict[int, NodeRecord]:
        return {route: self.nodes[name] for route, name in self.effective_owners().items()}

    def snapshot(self) -> dict[str, Any]:
        return {
            "table": self.table.snapshot(),
            "nodes": {
                name: {"browser": r.browser, "sp": r.sp, "capacity": r.capacity}
                for name, r in self.nodes.items()
            },
            "failovers": self.failovers,
            "drained": sorted(self.drained),
            **hash_version_field(self.hash_version),
            **({"holdover": {str(r): n for r, n in sorted(self.holdover.items())}}
               if self.holdover else {}),
        }  # fmt: skip

    @classmethod
    def restore(
        cls, snapshot: dict[str, Any], timing: Timing, now: float, spares_wanted: int,
        secret: str | None = None,
    ) -> Membership:  # fmt: skip
        """Rebuild after a restart: every node counts as disconnected since ``now``, so
        each has the grace period to reconnect and keep its routes."""
        table = RouteTable.restore(snapshot["table"], spares_wanted)
        drained = set(snapshot.get("drained", []))
        members = set(table.machines().values()) | set(table.spares) | drained
        try:
            nodes = {
                name: NodeRecord(
                    name,
                    str(entry["browser"]),
                    str(entry["sp"]),
                    int(entry["capacity"]),
                    disconnected_at=now,
                )  # fmt: skip
                for name, entry in snapshot["nodes"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RouteTableError(f"not a membership snapshot: {e!r}") from None
        if set(nodes) != members:
            raise RouteTableError("snapshot: node records do not match the table")
        try:
            hash_version = snapshot_hash_version(snapshot)
        except ValueError as e:
            raise RouteTableError(f"snapshot: {e}") from None
        membership = cls(table, timing, secret, hash_version)
        membership.nodes = nodes
        membership.drained = drained
        membership.failovers = int(snapshot.get("failovers", 0))
        try:
            holdover = {int(r): str(n) for r, n in dict(snapshot.get("holdover", {})).items()}
        except (TypeError, ValueError) as e:
            raise RouteTableError(f"snapshot: holdover: {e!r}") from None
        if any(not 1 <= r <= table.routes or n not in nodes for r, n in holdover.items()):
            raise RouteTableError("snapshot: holdover names an unknown route or node")
        membership.holdover = holdover
        return membership


def _diff(before: dict[int, str], after: dict[int, str], routes: int) -> list[Move]:
    return [
        Move(r, before.get(r), after.get(r))
        for r in range(1, routes + 1)
        if before.get(r) != after.get(r)
    ]


def _ports(record: NodeRecord) -> dict[str, str]:
    """The addresses a probe connects to: the node's browser and SP listeners."""
    return {"browser": record.browser, "sp": record.sp.removeprefix("tcp://")}
