"""The HaloD daemon's Twisted shell: control connections, deadlines, persistence, status.

Moves control messages between TCP (SP pair0 framing, orbited.sp.wire) and the sans-I/O
membership core, runs the deadline tick, saves the table before any node hears of a
change, and serves /status, /routes and /metrics over HTTP.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.application import internet, service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from halod import dataplane
from halod.config import HaloDConfig
from halod.dataplane.base import DataPlane, Owner
from halod.etcd.election import NotLeader
from halod.ha import Leadership, Role
from halod.insight import Insight
from halod.liveness import Cause, Finding, Outcome, ProbeRequest, Verdict
from halod.membership import Effects, Level, Membership, NodeState, Suspicion
from halod.page import CSP, status_html, wants_html
from halod.probe import probe
from halod.store import Persisted, Store, StoreError
from halod.store.etcd import Conflict
from halod.svg import table_svg
from halod.tracefan import not_leader
from orbited.core.control import (
    CONTROL_PROTOCOL,
    Assign,
    ControlError,
    Error,
    ErrorCode,
    HaloDMessage,
    Handoff,
    Heartbeat,
    Leave,
    Register,
    Rehash,
    TraceReply,
    Welcome,
    decode_from_node,
    encode,
    encode_heartbeat_ack,
)
from orbited.core.hashing import check_hash_version
from orbited.core.routes import (
    Change,
    ChangeKind,
    Policy,
    RouteTable,
    canonical,
    format_ranges,
)
from orbited.core.settings import parse_host_port, parse_sp_address
from orbited.core.tokens import load_secret
from orbited.runtime.twisted_compat import Ticker, listening_port
from orbited.runtime.web import HeadLimits, JSONDirectory, JSONResource, OrbitedSite, send_error
from orbited.sp.wire import SPConnection, SPProtocolError, encode_message

if TYPE_CHECKING:
    from halod.vip import VirtualAddress

ChangeListener = Callable[[Change, Membership], None]
Probe = Callable[[ProbeRequest], "defer.Deferred[Outcome]"]


class ControlProtocol(Protocol):
    """One node's control connection. Registration must arrive within the header timeout."""

    log = Logger()
    transport: ITCPTransport  # set by makeConnection

    def __init__(self, halod: HaloD) -> None:
        self.halod = halod
        self.name: str | None = None
        self.closed = False
        max_message = halod.config.control_max_message
        self._sp = SPConnection(CONTROL_PROTOCOL, CONTROL_PROTOCOL, max_message)
        self._register_timer: IDelayedCall | None = None

    def connectionMade(self) -> None:  # noqa: N802
        setnodelay = getattr(self.transport, "setTcpNoDelay", None)
        if setnodelay is not None:
            setnodelay(True)
        self.transport.write(self._sp.initial_bytes())
        self._register_timer = self.halod.clock.callLater(
            self.halod.config.control_header_timeout, self._no_register
        )

    def _no_register(self) -> None:
        self._register_timer = None
        if self.name is None:
            self.refuse(ErrorCode.NOT_REGISTERED, "no register message in time")

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.closed:
            return
        try:
            bodies = self._sp.receive(data)
        except SPProtocolError as e:
            self.log.warn("control connection from {peer} closed: {e}", peer=self.peer, e=e)
            self.closed = True
            self.transport.abortConnection()
            return
        for body in bodies:
            if self.closed:
                return
            self.halod.received(self, body)

    def registered(self, name: str) -> None:
        self.name = name
        if self._register_timer is not None:
            self._register_timer.cancel()
            self._register_timer = None

    def send(self, message: HaloDMessage) -> None:
        self.send_bytes(encode(message))

    def send_bytes(self, body: bytes) -> None:
        if not self.closed:
            self.transport.write(encode_message(body))

    def refuse(self, code: ErrorCode, message: str, leader: str | None = None) -> None:
        """Send an error (``leader``: the not_leader hint) and close once it is written."""
        if self.closed:
            return
        log = self.log.info if code is ErrorCode.NOT_LEADER else self.log.warn
        log(
            "control connection {who} refused: {code}: {message}",
            who=self.name or self.peer, code=code, message=message,
        )  # fmt: skip
        self.send(Error(code, message, leader))
        self.closed = True
        self.transport.loseConnection()

    @property
    def peer(self) -> str:
        peer = self.transport.getPeer()
        return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.closed = True
        if self._register_timer is not None:
            self._register_timer.cancel()
            self._register_timer = None
        self.halod.lost(self)


class HaloD:
    """Membership + persistence + the connections to nodes, by name.

    With SQLite (``ha`` None) this HaloD always acts and saves each change synchronously.
    With etcd (``ha`` a Leadership) it acts only while it leads and its table is restored
    from etcd (``leading``); each change is written through the fenced EtcdStore before
    any node or the data plane hears of it: one write in flight, later changes queued
    and written together (docs/halod.md, "High availability")."""

    log = Logger()
    WRITE_RETRY = 0.1  # seconds before a change etcd did not take is sent again

    def __init__(self, config: HaloDConfig, clock: IReactorTime, prober: Probe | None = None,
                 ha: Leadership | None = None) -> None:  # fmt: skip
        self.config = config
        self.clock = clock
        # Connects to a suspected node's port (halod.probe); tests pass their own.
        self.probe: Probe = prober or (
            lambda request: probe(clock, request.address, request.timeout)  # type: ignore[arg-type]
        )
        self.started = time.time()
        self.ha = ha
        self.solo_name = ""  # without etcd: the control host:port, once bound (_name)
        self.vip: VirtualAddress | None = None
        self.stopping = False  # shutdown() ran: control messages are ignored
        secret = None
        if config.secret_file:
            secret = load_secret(Path(config.secret_file)).decode("latin-1")
        self.secret = secret
        # The dashboard's load figures, timeline, live feed and trace queries (and the
        # operator key: a bad one stops HaloD before it opens its store).
        self.insight = Insight(self, config, clock)
        self.leading = ha is None  # acts on nodes (etcd: leads, table restored)
        self.warm: Persisted | None = None  # etcd, not leading: the follower's copy
        self._term = 0  # bumped on every change of leadership: stale callbacks see it
        self._queue: list[Effects] = []  # effects waiting for the write in flight
        self._writing = False
        self._dirty = False  # write even without a change (a new table)
        self._retry: IDelayedCall | None = None
        self._plane_started = False
        if ha is not None:
            # Until this HaloD leads: an empty table, replaced by the follower's copy.
            self.store: Store | None = None
            self.membership = self._fresh_membership()
        else:
            self.store = self._open_sqlite(config, clock, secret)
        # Build the canonical progression now (≈ 2 s for N = 4096) rather than inside the
        # first failover, where it would stall heartbeats.
        canonical(config.routes, config.routes)
        self.connections: dict[str, ControlProtocol] = {}
        self.listeners: list[ChangeListener] = []
        self.dataplane: DataPlane | None = None
        self.stats = {
            "messages": 0, "refused": 0, "persist_errors": 0, "changes": 0,
            "handoffs_relayed": 0, "handoffs_dropped": 0, "stalls": 0,
            "probes": 0, "probes_alive": 0, "probes_dead": 0, "probes_unknown": 0,
            "terms": 0,
        }  # fmt: skip
        timing = config.timing()
        self.tick_period = max(0.02, min(timing.heartbeat_interval, timing.grace) / 4)
        self._last_tick: float | None = None
        self._probe_timer: IDelayedCall | None = None  # probes run on their own times
        self._pace_timer: IDelayedCall | None = None  # a paced move's next step
        if ha is not None:
            ha.on_lead = self._lead
            ha.on_follow = self._follow
            ha.on_table = self._warm_copy

    def _fresh_membership(self) -> Membership:
        c = self.config
        return Membership(RouteTable(c.routes, c.spares, c.policy), c.timing(), self.secret,
                          c.hash_version)  # fmt: skip

    @property
    def table_version(self) -> int:
        """The version of the table this HaloD holds (a follower: its warm copy's)."""
        if self.store is not None:
            return self.store.version
        assert self.ha is not None
        if self.leading:
            return self.ha.store.version
        return self.warm.version if self.warm is not None else 0

    def _open_sqlite(self, config: HaloDConfig, clock: IReactorTime, secret: str | None
                     ) -> Store:  # fmt: skip
        store = Store(Path(config.db))
        saved = store.load()
        if saved is None:
            self.membership = self._fresh_membership()
            store.save(self.membership.snapshot())
        else:
            self.membership = self._restored(saved, clock.seconds(), str(config.db))
        return store

    def _restored(self, saved: dict[str, Any], now: float, where: str) -> Membership:
        """Membership from a saved snapshot; ValueError if its route count is not ours."""
        config = self.config
        membership = Membership.restore(saved, config.timing(), now, config.spares, self.secret)
        if membership.table.routes != config.routes:
            raise ValueError(
                f"{where} holds a table of {membership.table.routes} routes, "
                f"not {config.routes}: routes are fixed for the life of a cluster"
            )
        membership.table.policy = Policy(config.policy)
        self.log.info(
            "restored the route table of {db} ({nodes} nodes, hash version {hv}); they have "
            "{grace}s to reconnect", db=where, nodes=len(membership.nodes),
            hv=membership.hash_version, grace=config.grace,
        )  # fmt: skip
        if membership.hash_version != config.hash_version:
            self.log.info(
                "the table hashes keys with version {table} (hash_version {config} is for a "
                "new table; `halod rehash --to {config}` moves this one: docs/halod.md, "
                '"Rehash")', table=membership.hash_version, config=config.hash_version,
            )  # fmt: skip
        return membership

    # -- from control connections --------------------------------------------------------

    def received(self, conn: ControlProtocol, body: bytes) -> None:
        if self.stopping:  # nodes stopping with us: the saved table stays as it was
            return
        self.stats["messages"] += 1
        try:
            self._received(conn, body)
        except Exception:  # a bug must not take HaloD down: drop this connection only
            self.log.failure("handling a control message from {who} failed", who=conn.name)
            conn.refuse(ErrorCode.INTERNAL_ERROR, "HaloD failed on this message")

    def _received(self, conn: ControlProtocol, body: bytes) -> None:
        now = self.clock.seconds()
        if self.ha is not None and conn.name is None and self.leading:
            try:  # a leader whose lease may have ended (a frozen process) welcomes nobody
                self.ha.election.fence()
            except NotLeader:
                if self.leading:
                    self._follow()
        if not self.leading:  # a follower (store etcd): nodes go to the leader
            self.stats["refused"] += 1
            leader = self.ha.leader() if self.ha is not None else None
            me = leader is not None and leader.name == self._name()
            hint = leader.control if leader is not None and not me else None
            who = (
                "it is taking over (reading the table)" if me
                else f"{leader.name} leads" if leader is not None
                else "no HaloD leads right now"
            )  # fmt: skip
            conn.refuse(ErrorCode.NOT_LEADER, f"this HaloD does not lead: {who}", hint)
            return
        try:
            msg = decode_from_node(body)
            if conn.name is None:
                if not isinstance(msg, Register):
                    raise ControlError(ErrorCode.NOT_REGISTERED, "the first message is register")
                effects = self.membership.register(msg, now)
                conn.registered(msg.name)
                self.connections[msg.name] = conn
                self.insight.registered(msg.name, msg.features, now)
                self.log.info(
                    "node {name} registered (browser {browser}, sp {sp})",
                    name=msg.name, browser=msg.browser, sp=msg.sp,
                )  # fmt: skip
            elif isinstance(msg, Heartbeat):  # the hot path: no Effects, a preformatted ack
                if self.membership.heartbeat(conn.name, msg, now):
                    conn.send_bytes(encode_heartbeat_ack(msg.seq))
                    self.insight.heartbeat(conn.name, msg, now)
                return
            elif isinstance(msg, Handoff):  # relayed as is: nodes never talk to each other
                target = self.connections.get(msg.to)
                if target is None or target.closed:
                    self.stats["handoffs_dropped"] += 1
                    self.log.warn(
                        "hand-off from {src} to {dst} dropped: {dst} is not connected",
                        src=conn.name, dst=msg.to,
                    )  # fmt: skip
                else:
                    self.stats["handoffs_relayed"] += 1
                    self.membership.handoff_relayed(conn.name, msg.to, msg.done)
                    self.insight.handoff(conn.name, msg.to, msg.done, len(msg.mailboxes), now)
                    target.send_bytes(with_sender(body, conn.name))
                    if msg.done and self.membership.step is not None:
                        self._schedule_pace()  # the paced move's next step may go now
                return
            elif isinstance(msg, TraceReply):  # an answer to GET /trace's query
                self.insight.trace_reply(conn.name, msg)
                return
            elif isinstance(msg, Leave):
                effects = self.membership.leave(conn.name, now, "left")
                self.connections.pop(conn.name, None)
                conn.closed = True
                conn.transport.loseConnection()
            else:
                raise ControlError(ErrorCode.BAD_MESSAGE, "already registered")
        except ControlError as e:
            self.stats["refused"] += 1
            conn.refuse(e.code, e.message)
            return
        self.apply(effects)

    def lost(self, conn: ControlProtocol) -> None:
        name = conn.name
        if self.stopping or not self.leading:
            return
        if name is not None and self.connections.get(name) is conn:
            del self.connections[name]
            self.insight.lost(name, self.clock.seconds())
            effects = self.membership.disconnected(name, self.clock.seconds())
            grace = self.config.grace
            what = (
                f"probing its ports (dead: failover now; answering: {grace:g}s grace)"
                if effects.probes
                else f"failover after {grace:g}s without it"
            )
            self.log.info("node {name} disconnected; {what}", name=name, what=what)
            self.apply(effects)

    def _probe(self, request: ProbeRequest) -> None:
        term = self._term

        def done(outcome: Outcome) -> None:
            if term != self._term or not self.leading:
                return  # asked by an earlier leadership of this HaloD
            now = self.clock.seconds()
            self.apply(self.membership.probed(
                request.name, request.probe_id, request.port, outcome, now
            ))  # fmt: skip

        d = defer.maybeDeferred(self.probe, request)
        d.addCallback(done)
        d.addErrback(lambda f: self.log.failure("probe of {name} failed", f, name=request.name))

    def tick(self) -> None:
        self.insight.tick(self.clock.seconds())  # the timeline settles on a follower too
        if not self.leading:
            return
        now = self.clock.seconds()
        # A tick that comes a whole period late means this reactor was busy (e.g. the
        # built-in proxy under load): heartbeats may sit unread in socket buffers, so no
        # node is failed for silence this time. Counted: HaloD needs more CPU.
        late = self._last_tick is not None and now - self._last_tick > 2 * self.tick_period
        self._last_tick = now
        if late:
            self.stats["stalls"] += 1
        try:
            self.apply(self.membership.tick(now, heartbeats_current=not late))
        except Exception:  # keep the timer alive: the next tick retries
            self.log.failure("deadline check failed")

    def operator(self, action: str, name: str) -> NodeState:
        """``drain`` or ``undrain`` a node; returns its new state (ControlError if refused)."""
        if not self.leading:
            leader = self.ha.leader() if self.ha is not None else None
            where = f": {leader.name} leads" if leader is not None else ""
            raise ControlError(ErrorCode.NOT_LEADER, f"this HaloD does not lead{where}")
        m = self.membership
        now = self.clock.seconds()
        effects = m.drain(name, now) if action == "drain" else m.undrain(name, now)
        self.log.info("operator: {action} {name}", action=action, name=name)
        self.insight.operator(action, name, now)
        self.apply(effects)
        return self.membership.state_of(name)

    def rehash(self, version: int) -> dict[str, Any]:
        """``POST /rehash``: move the cluster to hash ``version`` (docs/halod.md,
        "Rehash"). The table is saved with it before any node hears ``rehash``. Raises
        ControlError (409: ``not_leader``, ``rehash_unsupported``, ``rehash_in_progress``)."""
        if not self.leading:
            leader = self.ha.leader() if self.ha is not None else None
            where = f": {leader.name} leads" if leader is not None else ""
            raise ControlError(ErrorCode.NOT_LEADER, f"this HaloD does not lead{where}")
        m = self.membership
        before = m.hash_version
        effects = m.rehash(version, self.clock.seconds())
        members = sorted(s.name for s in effects.sends)
        if effects.persist:
            self.log.info(
                "operator: rehash from hash version {old} to {new}; telling {n} nodes",
                old=before, new=version, n=len(members),
            )  # fmt: skip
            self.stats["changes"] += 1  # a table change saved (halod_table_changes_total)
        self.apply(effects)
        if effects.persist:
            saved = self.store.version if self.store is not None else None  # (etcd: later)
            self.insight.rehashed(before, version, saved, self.clock.seconds())
        return {"hash_version": m.hash_version, "previous": before, "nodes": members}

    # -- effects -------------------------------------------------------------------------

    def apply(self, effects: Effects) -> None:
        if self.store is None:  # etcd: written first, released once etcd has it
            if not self.leading:
                return
            self.stats["changes"] += len(effects.changes)
            self._queue.append(effects)
            self._flush()
            return
        if effects.changes or effects.persist:
            self.stats["changes"] += len(effects.changes)
            try:
                self.store.save(self.membership.snapshot())
            except Exception:
                self.stats["persist_errors"] += 1
                self.log.failure("saving the route table to {db} failed", db=self.config.db)
        self._release(effects, self.store.version)

    def _flush(self) -> None:
        """Write the table if queued effects changed it (one write in flight), then
        release them in order; effects without a change behind none are released now."""
        if self._writing or self._retry is not None or not self.leading:
            return  # the write in flight (or the retry) takes what is queued now
        if not (self._queue or self._dirty):
            return
        batch, self._queue = self._queue, []
        assert self.ha is not None
        if not self._dirty and not any(e.changes or e.persist for e in batch):
            for effects in batch:
                self._release(effects, self.ha.store.version)
            return
        self._writing, self._dirty = True, False
        term = self._term
        store = self.ha.store
        d = store.write(self.membership.snapshot())

        def written(table: Persisted) -> None:
            if term != self._term:
                return  # this HaloD stepped down meanwhile: nobody hears of it
            self._writing = False
            for effects in batch:
                self._release(effects, table.version)
            self._flush()

        def failed(failure: Failure) -> None:
            if term != self._term:
                return
            self._writing = False
            self.stats["persist_errors"] += 1
            if failure.check(NotLeader, Conflict):  # Fenced is a NotLeader
                self.log.warn("etcd refused the table change ({why}): this HaloD stops "
                              "leading", why=failure.getErrorMessage())  # fmt: skip
                assert self.ha is not None
                self.ha.election.deposed()
                if self.leading:  # known only here (e.g. a version conflict)
                    self._follow()
                return
            self.log.warn("writing the table to etcd failed ({why}); retrying in {s}s",
                          why=failure.getErrorMessage(), s=self.WRITE_RETRY)  # fmt: skip
            self._queue[:0] = batch
            self._retry = self.clock.callLater(self.WRITE_RETRY, self._retry_flush)

        d.addCallbacks(written, failed)

    def _retry_flush(self) -> None:
        self._retry = None
        if self.leading:
            self._dirty = True  # the snapshot moved on; write what it is now
            self._flush()

    def _release(self, effects: Effects, version: int) -> None:
        """Act on effects whose table change (if any) is saved as ``version``."""
        if effects.changes:
            for change in effects.changes:
                self._log_change(change)
                for listener in self.listeners:
                    try:
                        listener(change, self.membership)
                    except Exception:
                        self.log.failure("route change listener failed")
        self.insight.released(effects, version, self.membership, self.clock.seconds())
        for drop in effects.drops:
            conn = self.connections.pop(drop.name, None)
            if conn is not None:
                conn.refuse(drop.code, drop.message)
        for send in effects.sends:
            conn = self.connections.get(send.name)
            if conn is not None:
                message = send.message
                if isinstance(message, Welcome | Assign | Rehash):  # the version rides along
                    message = dataclasses.replace(message, version=version)
                conn.send(message)
        for finding in effects.findings:
            self._log_finding(finding)
        for notice in effects.notices:
            log = self.log.warn if notice.level is Level.WARN else self.log.info
            log("{text}", text=notice.text)
        for request in effects.probes:
            self.stats["probes"] += 1
            self._probe(request)
        self._schedule_probes()
        self._schedule_pace()

    def _schedule_pace(self) -> None:
        """Wake up when the next step of a paced move may start (docs/halod.md, "Paced
        moves"): its last step's browsers had their share of ``move_rate`` and its
        hand-offs came (the deadline tick also checks)."""
        due = self.membership.pace_due() if self.leading else None
        self._pace_timer = self._rearm(self._pace_timer, due, lambda at: self._pace_tick())

    def _pace_tick(self) -> None:
        self._pace_timer = None
        try:
            self.apply(self.membership.pace_tick(self.clock.seconds()))
        except Exception:
            self.log.failure("a paced move's step failed")
        self._schedule_pace()

    def _schedule_probes(self) -> None:
        """Wake up when the next probe times out or is due: the second probe of a node
        comes FIRST_GAP (50 ms) after the first, sooner than the deadline tick."""
        self._probe_timer = self._rearm(self._probe_timer, self.membership.probe_due(),
                                        self._probe_tick)  # fmt: skip

    def _rearm(
        self, timer: IDelayedCall | None, due: float | None, call: Callable[[float], None]
    ) -> IDelayedCall | None:
        """``timer`` made to run ``call(at)`` at ``due`` (at once if past; never: None),
        kept as it is if it already does."""
        now = self.clock.seconds()
        if timer is not None and timer.active():
            if due is not None and timer.getTime() == max(due, now):
                return timer
            timer.cancel()
        if due is None:
            return None
        at = max(due, now)
        return self.clock.callLater(at - now, call, at)

    def _probe_tick(self, at: float) -> None:
        self._probe_timer = None
        now = self.clock.seconds()
        # Woken a whole tick period late: this reactor was busy and answers may sit
        # unread, so no probe times out this time (the next wake-up, at once, does).
        late = now - at > self.tick_period
        try:
            self.apply(self.membership.probe_tick(now, timeouts=not late))
        except Exception:
            self.log.failure("probing failed")
            self._schedule_probes()

    def _log_finding(self, finding: Finding) -> None:
        self.stats[f"probes_{finding.verdict.value}"] += 1
        if finding.fail or not finding.changed:
            return  # a failure is logged with its change
        if finding.verdict is Verdict.ALIVE:
            deadline = (
                f"it has {self.config.grace:g}s to reconnect"
                if finding.cause is Cause.DISCONNECTED
                else f"failed if still silent {self.config.grace:g}s more"
            )
            self.log.info(
                "node {name} is {cause} but answers ({probe}): {deadline}",
                name=finding.name, cause=finding.cause.value, probe=finding.describe(),
                deadline=deadline,
            )  # fmt: skip
        else:
            self.log.warn(
                "node {name} is {cause} and does not answer ({probe}); it has {grace:g}s "
                "to reconnect", name=finding.name, cause=finding.cause.value,
                probe=finding.describe(), grace=self.config.grace,
            )  # fmt: skip

    def _log_change(self, change: Change) -> None:
        if change.role is ChangeKind.MOVED:
            self.log.info(
                "paced move: routes {routes} now reach {to}; {left} routes to go",
                routes=[m.route for m in change.moves],
                to=", ".join(sorted({m.new or "nobody" for m in change.moves})),
                left=len(self.membership.holdover),
            )  # fmt: skip
        elif change.role is ChangeKind.GONE and change.name in self.membership.drained:
            self.log.info(
                "node {name} drained; {n} routes moved", name=change.name, n=len(change.moves)
            )
        elif change.role is ChangeKind.GONE:
            why = self.membership.failed.get(change.name, (0, "left"))[1]
            self.log.warn(
                "node {name} (id {id}) removed: {why}; {n} routes moved",
                name=change.name, id=change.node_id, why=why, n=len(change.moves),
            )  # fmt: skip
        else:
            self.log.info(
                "node {name} is {role} (id {id}); {n} routes moved",
                name=change.name, role=change.role, id=change.node_id, n=len(change.moves),
            )  # fmt: skip

    def shutdown(self) -> defer.Deferred[None]:
        """Stop acting on nodes (their leave messages and closed connections during our own
        stop change nothing) and close the store (etcd: step down first, revoking the
        lease, so a follower leads at once)."""
        self.stopping = True
        self.insight.stop()
        if self._probe_timer is not None and self._probe_timer.active():
            self._probe_timer.cancel()
        self._probe_timer = None
        if self._pace_timer is not None and self._pace_timer.active():
            self._pace_timer.cancel()
        self._pace_timer = None
        if self.store is not None:
            self.store.close()
            return defer.succeed(None)
        assert self.ha is not None
        self._cancel_writes()
        return self.ha.stop()

    # -- leadership (store etcd) -----------------------------------------------------------

    def _name(self) -> str:
        """This HaloD's name: its etcd name, or alone its control host:port (as etcd_name
        defaults to), once the control port is bound."""
        return self.ha.election.candidate.name if self.ha is not None else self.solo_name

    def _cancel_writes(self) -> None:
        self._term += 1
        self._queue.clear()
        self._writing = self._dirty = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def _lead(self) -> None:
        """Elected: read the table from etcd (the leader's write path starts from it),
        restore it, then act. Nodes are refused until then."""
        assert self.ha is not None
        self._cancel_writes()
        term = self._term
        # A leader was known before: nodes that do not register again may have died with
        # it, so they are probed; after a cold start they may still be starting: grace.
        probe_absent = self.ha.seen_leader
        self.log.info("{name} is elected; reading the table from etcd", name=self._name())

        def restored(saved: Persisted | None) -> None:
            if term != self._term or self.stopping or self.ha is None or not self.ha.leading:
                return
            now = self.clock.seconds()
            where = f"etcd {self.ha.settings.prefix}"
            try:
                if saved is None:
                    membership = self._fresh_membership()
                    self._dirty = True  # the first leader writes the new table
                else:
                    membership = self._restored(saved.snapshot(), now, where)
            except ValueError as e:  # routes differ (or a broken table): never act on it
                self.log.critical("{name} cannot lead: {e}", name=self._name(), e=e)
                self.ha.election.stop()
                return
            self.membership = membership
            self.leading = True
            self.stats["terms"] += 1
            self.insight.leadership(True, self._name(), self.stats["terms"], now)
            self._drive_plane()
            if self.vip is not None:
                self._vip_call(self.vip.lead, "take the virtual address")
            self.log.info("{name} leads at table version {v}", name=self._name(),
                          v=self.ha.store.version)  # fmt: skip
            self._flush()
            if probe_absent and saved is not None:
                probes = self.membership.probe_restored(now)
                if probes.probes:
                    self.log.info(
                        "probing the {n} nodes of the table (dead: failover now; "
                        "answering: {grace:g}s to register)",
                        n=len(membership.nodes), grace=self.config.grace,
                    )  # fmt: skip
                self.apply(probes)

        def failed(failure: Failure) -> None:
            if term != self._term or self.ha is None:
                return
            self.log.warn("reading the table from etcd failed ({why}): stepping down",
                          why=failure.getErrorMessage())  # fmt: skip
            self.ha.election.deposed()

        self.ha.store.read().addCallbacks(restored, failed)

    def _follow(self) -> None:
        """Lost the lead (deposed, lease not renewed, stopping): stop acting at once —
        no write lands, no node hears another word; nodes are sent to the leader."""
        was_leading = self.leading
        self.leading = False
        self._cancel_writes()
        if self._probe_timer is not None and self._probe_timer.active():
            self._probe_timer.cancel()
        self._probe_timer = None
        for conn in list(self.connections.values()):
            conn.refuse(ErrorCode.NOT_LEADER, "this HaloD no longer leads")
        self.connections.clear()
        if not was_leading:
            return
        self.insight.leadership(False, self._name(), self.stats["terms"], self.clock.seconds())
        self.log.warn("{name} stopped leading; nodes go to the next leader", name=self._name())
        if self.vip is not None and not self.stopping:
            self._vip_call(self.vip.follow, "give the virtual address up")
        if self.ha is not None and not self.stopping:
            try:
                self._warm_copy(self.ha.follower.table())
            except StoreError as e:
                self.log.error("the table in etcd is not valid: {e}", e=e)

    def _warm_copy(self, table: Persisted | None) -> None:
        """A follower's copy of the table changed: show it, and drive the data plane with
        it, so this host forwards as the leader does."""
        if self.leading or self.stopping or table is None:
            return
        try:
            membership = Membership.restore(table.snapshot(), self.config.timing(),
                                            self.clock.seconds(), self.config.spares,
                                            self.secret)  # fmt: skip
        except Exception:
            self.log.failure("the table in etcd cannot be shown")
            return
        before = self.membership if self.warm is not None else None
        self.warm = table
        self.membership = membership
        self.insight.warm(before, membership, table.version, self.clock.seconds())
        self._drive_plane()

    def _drive_plane(self) -> None:
        if self.dataplane is None:
            return
        owners = owners_of(self.membership)
        if self._plane_started:
            self.dataplane.apply(owners)
        else:
            self._plane_started = True
            self.dataplane.start(owners)

    def _vip_call(self, call: Callable[[], defer.Deferred[None]], what: str) -> None:
        d = defer.maybeDeferred(call)
        d.addErrback(lambda f: self.log.error("could not {what}: {why}", what=what,
                                              why=f.getErrorMessage()))  # fmt: skip

    # -- views ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self.clock.seconds()
        m = self.membership
        rehash = m.rehash_running(now)
        ids = {name: node for node, name in m.table.machines().items()}
        nodes = []
        for name, record in sorted(m.nodes.items(), key=lambda i: (ids.get(i[0], 1 << 40), i[0])):
            node_id = ids.get(name)
            routes = m.held_by(name)  # what it serves now: a paced move's old owner too
            nodes.append({
                "name": name,
                "id": node_id,
                "state": m.state_of(name),
                "connected": record.connected,
                "routes": routes,
                "ranges": format_ranges(routes),
                "browser": record.browser,
                "sp": record.sp,
                "capacity": record.capacity,
                "connections": record.connections,
                "mailboxes": record.mailboxes,
                "last_heartbeat_age": round(now - record.last_heartbeat, 3)
                if record.connected else None,
                "disconnected_for": round(now - record.disconnected_at, 3)
                if record.disconnected_at is not None else None,
                "suspected": _suspected(m.suspicion(name)),
                "hashes": list(record.hashes) if record.hashes is not None else None,
            })  # fmt: skip
        return {
            "routes": m.table.routes,
            "policy": m.table.policy,
            "spares_wanted": m.table.spares_wanted,
            "spares": len(m.table.spares),
            "warnings": m.warnings(),
            "heartbeat_interval": m.timing.heartbeat_interval,
            "missed_heartbeats": m.timing.missed_heartbeats,
            "grace": m.timing.grace,
            "table_version": self.table_version,
            "hash_version": m.hash_version,
            "rehash": rehash.view() if rehash is not None else None,
            "moving": self._moving(),
            **self._ha_status(),
            "failovers": m.failovers,
            "uptime": round(time.time() - self.started, 1),
            "nodes": nodes,
            "failed": [{"name": n, "at": at, "why": why} for n, (at, why) in m.failed.items()],
            "dataplane": self.dataplane.stats() if self.dataplane is not None else None,
        }

    def _moving(self) -> list[dict[str, Any]]:
        """/status's ``moving``: the routes a paced move has still to move."""
        m = self.membership
        table = m.table.owners()
        return [{"route": r, "from": holder, "to": table.get(r)}
                for r, holder in sorted(m.holdover.items())]  # fmt: skip

    def _ha_status(self) -> dict[str, Any]:
        """/status's ``role``, ``leader`` and ``etcd`` (docs/halod-protocol.md)."""
        if self.ha is None:
            return {"role": Role.SOLO.value, "leader": None, "etcd": None}
        role = self.ha.role
        if role is Role.LEADER and not self.leading:
            role = Role.CANDIDATE  # elected, table not restored yet
        leader = self.ha.leader()
        return {
            "role": role.value,
            "leader": None if leader is None else {
                "name": leader.name, "control": leader.control, "status": leader.status,
            },
            "etcd": {
                "name": self._name(),
                "prefix": self.ha.settings.prefix,
                # what etcd granted (it raises a TTL under its minimum), else the config's
                "lease_ttl": self.ha.election.candidate.lease_ttl or self.ha.settings.lease_ttl,
                "endpoints": [{"url": url, "healthy": healthy}
                              for url, healthy in self.ha.health.items()],
                "terms": self.stats["terms"],
            },
        }  # fmt: skip

    def routes_view(self) -> dict[str, Any]:
        owners = self.membership.owners()
        return {
            "routes": self.membership.table.routes,
            "version": self.table_version,
            "hash_version": self.membership.hash_version,
            "owners": {
                str(r): owners[r].address() if r in owners else None
                for r in range(1, self.membership.table.routes + 1)
            },
        }

    def table_svg(self) -> str:
        """The live table, above the canonical one for as many active nodes."""
        table, names = self.membership.table.table(), self.membership.table.machines()
        routes = self.membership.table.routes
        rows = [("now", table, names)]
        if table:
            rows.append((f"plan {len(table)}", canonical(routes, len(table)), {}))
        return table_svg(routes, f"HaloD route table, {routes} routes", rows)

    def metrics(self) -> str:
        m = self.membership
        states = {"active": 0, "spare": 0, "drained": 0}
        for name in m.nodes:
            states[m.state_of(name)] += 1
        lines = [
            "# HELP halod_nodes Registered nodes by state.",
            "# TYPE halod_nodes gauge",
            *(f'halod_nodes{{state="{s}"}} {n}' for s, n in states.items()),
            "# HELP halod_leader 1 while this HaloD acts on nodes (always, with SQLite).",
            "# TYPE halod_leader gauge",
            f"halod_leader {int(self.leading)}",
            "# HELP halod_leader_terms_total Times this HaloD became leader (store etcd).",
            "# TYPE halod_leader_terms_total counter",
            f"halod_leader_terms_total {self.stats['terms']}",
            "# HELP halod_nodes_connected Nodes with a live control connection.",
            "# TYPE halod_nodes_connected gauge",
            f"halod_nodes_connected {len(self.connections)}",
            "# HELP halod_spares_wanted Spare nodes HaloD keeps when it can (spares).",
            "# TYPE halod_spares_wanted gauge",
            f"halod_spares_wanted {m.table.spares_wanted}",
            "# HELP halod_spares_missing Spares wanted but not there: alert when above 0.",
            "# TYPE halod_spares_missing gauge",
            f"halod_spares_missing {max(0, m.table.spares_wanted - len(m.table.spares))}",
            "# HELP halod_hash_version How keys map to routes (docs/hashing.md).",
            "# TYPE halod_hash_version gauge",
            f"halod_hash_version {m.hash_version}",
            "# HELP halod_routes Routes in the table.",
            "# TYPE halod_routes gauge",
            f"halod_routes {m.table.routes}",
            "# HELP halod_routes_unowned Routes without an active node.",
            "# TYPE halod_routes_unowned gauge",
            f"halod_routes_unowned {m.table.routes - len(m.table.owners())}",
            "# HELP halod_failovers_total Node removals that moved routes.",
            "# TYPE halod_failovers_total counter",
            f"halod_failovers_total {m.failovers}",
            "# HELP halod_table_changes_total Route table changes saved.",
            "# TYPE halod_table_changes_total counter",
            f"halod_table_changes_total {self.stats['changes']}",
            "# HELP halod_persist_errors_total Failed saves of the route table.",
            "# TYPE halod_persist_errors_total counter",
            f"halod_persist_errors_total {self.stats['persist_errors']}",
            "# HELP halod_handoffs_total Hand-off messages between nodes, by outcome.",
            "# TYPE halod_handoffs_total counter",
            f'halod_handoffs_total{{outcome="relayed"}} {self.stats["handoffs_relayed"]}',
            f'halod_handoffs_total{{outcome="dropped"}} {self.stats["handoffs_dropped"]}',
            "# HELP halod_stalls_total Deadline checks that came a period late (HaloD busy).",
            "# TYPE halod_stalls_total counter",
            f"halod_stalls_total {self.stats['stalls']}",
            "# HELP halod_probes_total Probes of suspected nodes' ports, by verdict.",
            "# TYPE halod_probes_total counter",
            *(
                f'halod_probes_total{{verdict="{v}"}} {self.stats["probes_" + v]}'
                for v in ("alive", "dead", "unknown")
            ),  # fmt: skip
            "# HELP halod_control_messages_total Control messages received from nodes.",
            "# TYPE halod_control_messages_total counter",
            f"halod_control_messages_total {self.stats['messages']}",
            "# HELP halod_control_refused_total Control messages or connections refused.",
            "# TYPE halod_control_refused_total counter",
            f"halod_control_refused_total {self.stats['refused']}",
            "# HELP halod_node_connections Browsers connected to each node now.",
            "# TYPE halod_node_connections gauge",
            *(
                f'halod_node_connections{{node="{name}"}} {r.connections}'
                for name, r in sorted(m.nodes.items())
            ),  # fmt: skip
            "# HELP halod_node_mailboxes Keys with a mailbox on each node (lingering ones too).",
            "# TYPE halod_node_mailboxes gauge",
            *(
                f'halod_node_mailboxes{{node="{name}"}} {r.mailboxes}'
                for name, r in sorted(m.nodes.items())
                if r.mailboxes is not None
            ),  # fmt: skip
        ]
        if self.dataplane is not None:
            stats = self.dataplane.stats()
            lines += [
                "# HELP halod_route_connections Open connections through each route port.",
                "# TYPE halod_route_connections gauge",
                *(f'halod_route_connections{{route="{r}",side="{side}"}} {n}'
                  for r, sides in stats["routes"].items() for side, n in sides.items()),
                "# HELP halod_dataplane_cut_total Cut because their route moved: connections "
                "(proxy, HAProxy) or (route port, old owner) pairs (nftables).",
                "# TYPE halod_dataplane_cut_total counter",
                f"halod_dataplane_cut_total {stats['cut']}",
                "# HELP halod_dataplane_refused_total Connections to a route without an owner.",
                "# TYPE halod_dataplane_refused_total counter",
                f"halod_dataplane_refused_total {stats['refused']}",
            ]  # fmt: skip
            if "worker" in stats:  # the built-in proxy (docs/halod.md, "The built-in proxy")
                lines += [
                    "# HELP halod_dataplane_worker_restarts_total Proxy workers lost and replaced.",
                    "# TYPE halod_dataplane_worker_restarts_total counter",
                    f"halod_dataplane_worker_restarts_total {stats['worker']['restarts']}",
                ]
        lines += self.insight.metrics()
        return "\n".join(lines) + "\n"


def _suspected(suspicion: Suspicion | None) -> dict[str, str | None] | None:
    """/status's ``suspected``: null or ``{"cause", "probe"}`` (docs/halod.md)."""
    if suspicion is None:
        return None
    probe = suspicion.probe
    return {"cause": suspicion.cause.value, "probe": None if probe is None else probe.value}


def with_sender(body: bytes, name: str) -> bytes:
    """A relayed ``handoff`` names its sender: ``"from"`` appended as the object's last
    member, so it wins over any ``from`` the node wrote itself (the last duplicate wins
    in JSON parsers; docs/halod.md, "Rehash"). ``body`` decoded as a JSON object, and
    ``name`` is a registered node name (NAME: no character JSON must escape)."""
    end = body.rstrip()
    assert end.endswith(b"}"), "a decoded handoff is a JSON object"
    return end[:-1] + b',"from":"' + name.encode() + b'"}'


class ControlFactory(Factory):
    def __init__(self, halod: HaloD) -> None:
        self.halod = halod

    def buildProtocol(self, addr: object) -> ControlProtocol:  # noqa: N802
        return ControlProtocol(self.halod)


class _View(JSONResource):
    """A GET (or HEAD) page; other methods get 405, paths below it 404 (JSON errors)."""

    def __init__(self, render: Callable[[], tuple[str, bytes]]) -> None:
        super().__init__()
        self._render = render

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        content_type, body = self._render()
        request.setHeader(b"content-type", content_type.encode())
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return body


class _Status(JSONResource):
    """GET /status: JSON for machines, HTML for a browser (docs/halod-protocol.md)."""

    def __init__(self, halod: HaloD) -> None:
        super().__init__()
        self.halod = halod

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        fmt = request.args.get(b"format", [b""])[0].decode("ascii", "replace") or None
        accept = request.getHeader(b"accept")
        status = self.halod.status()
        request.setHeader(b"vary", b"Accept")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        if wants_html(accept.decode("latin-1") if accept else None, fmt):
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            request.setHeader(b"content-security-policy", CSP.encode())
            request.setHeader(b"referrer-policy", b"no-referrer")
            return status_html(status).encode()
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(status, indent=1).encode()


class _Operator(Resource):
    """POST /nodes/<name>/drain | /nodes/<name>/undrain (docs/halod.md, "Draining"); any
    other path below /nodes is 404, another method 405 (JSON errors)."""

    isLeaf = True

    def __init__(self, halod: HaloD) -> None:
        super().__init__()
        self.halod = halod

    def render(self, request: Request) -> bytes:
        parts = [part.decode("utf-8", "replace") for part in request.postpath or ()]
        if len(parts) != 2 or parts[1] not in ("drain", "undrain"):
            return send_error(
                request, 404, "not_found", "POST /nodes/<name>/drain or /nodes/<name>/undrain"
            )
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            method = request.method.decode("ascii", "replace")[:32]
            return send_error(request, 405, "method_not_allowed", f"{method} is not supported here")
        # A page the operator visits could otherwise drain nodes: a body-less POST needs
        # no CORS preflight, and DNS rebinding reaches a loopback port too.
        refused = self.halod.insight.auth.refuse(request)
        if refused is not None:
            return refused
        try:
            state = self.halod.operator(parts[1], parts[0])
        except ControlError as e:
            if e.code == ErrorCode.NOT_LEADER:
                return not_leader(request, e.message, self.halod.status().get("leader"))
            return send_error(request, 409, e.code, e.message)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"name": parts[0], "state": state}).encode()


MAX_REHASH_BODY = 1024  # bytes: {"hash_version": 2} is 19


class _Rehash(JSONResource):
    """POST /rehash {"hash_version": 1|2} (docs/halod.md, "Rehash"): the operator rules of
    /nodes (no web page, the Host check); 400 for a bad body, 409 when refused."""

    def __init__(self, halod: HaloD) -> None:
        super().__init__()
        self.halod = halod

    def render_POST(self, request: Request) -> bytes:  # noqa: N802
        refused = self.halod.insight.auth.refuse(request)
        if refused is not None:
            return refused
        body = request.content.read(MAX_REHASH_BODY + 1) if request.content else b""
        try:
            if len(body) > MAX_REHASH_BODY:
                raise ValueError(f"the body is over {MAX_REHASH_BODY} bytes")
            parsed = json.loads(body)
            if not isinstance(parsed, dict) or set(parsed) != {"hash_version"}:
                raise ValueError('the body is {"hash_version": 1 or 2}')
            version = check_hash_version(parsed["hash_version"])
        except ValueError as e:  # json's errors are ValueErrors too
            return send_error(request, 400, "bad_request", str(e))
        try:
            answer = self.halod.rehash(version)
        except ControlError as e:
            if e.code == ErrorCode.NOT_LEADER:
                return not_leader(request, e.message, self.halod.status().get("leader"))
            return send_error(request, 409, e.code, e.message)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(answer).encode()


def host_allowed(host: bytes | None, names: frozenset[str]) -> bool:
    """May a request with this ``Host`` header read or drive the status port? An IP
    literal, ``localhost`` or a name in ``status_hosts``: a DNS-rebinding page reaches
    the port under its own host name, which is none of these (docs/security.md)."""
    if host is None:
        return True  # HTTP/1.0 tools (HTTP/1.1 requires Host); every browser sends it
    try:
        text = host.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return False
    if text.startswith("["):  # [IPv6]:port
        name = text[1 : text.find("]")] if "]" in text else ""
    else:
        name = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    name = name.rstrip(".")
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return name == "localhost" or name in names


class _WrongHost(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return send_error(request, 403, "host_not_allowed", "Host not allowed: use an IP "
                          "address or localhost, or add the name to status_hosts")  # fmt: skip


class _NoHost(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        # RFC 9112, 3.2: a server MUST answer an HTTP/1.1 request without Host with 400.
        return send_error(request, 400, "bad_request", "an HTTP/1.1 request needs a Host header")


class _StatusSite(OrbitedSite):
    """The status port's Site: requests under a foreign Host name are refused; every error
    (unknown path or method, a malformed or oversized request head, a bug) is answered
    with the JSON error body ``{"error": {"code", "message"}}`` as on a node's browser
    port, never with twisted.web's HTML pages."""

    def __init__(self, root: Resource, names: frozenset[str]) -> None:
        super().__init__(root)
        self.names = names

    def getResourceFor(self, request: Request) -> Resource:  # noqa: N802
        host = request.getHeader(b"host")
        if host is None and request.clientproto != b"HTTP/1.0":
            return _NoHost()
        if not host_allowed(host, self.names):
            return _WrongHost()
        return super().getResourceFor(request)


def status_site(halod: HaloD, hosts: list[str] | tuple[str, ...] = ()) -> Site:
    def as_json(view: Callable[[], Any]) -> Callable[[], tuple[str, bytes]]:
        return lambda: ("application/json", json.dumps(view(), indent=1).encode())

    root = JSONDirectory()  # any other path: 404
    root.putChild(b"status", _Status(halod))
    root.putChild(b"routes", _View(as_json(halod.routes_view)))
    root.putChild(b"nodes", _Operator(halod))
    root.putChild(b"rehash", _Rehash(halod))
    for name, child in halod.insight.resources().items():  # /dashboard, /trace
        root.putChild(name, child)
    root.putChild(b"table.svg", _View(lambda: ("image/svg+xml", halod.table_svg().encode())))
    root.putChild(
        b"metrics",
        _View(lambda: ("text/plain; version=0.0.4", halod.metrics().encode())),
    )
    # Quiet: monitoring polls these pages every few seconds.
    site = _StatusSite(root, frozenset(h.strip().lower().rstrip(".") for h in hosts))
    site.head_limits = HeadLimits(max_body=MAX_REHASH_BODY)  # the largest body it takes
    site.displayTracebacks = False
    site.noisy = False
    return site


def owners_of(membership: Membership) -> dict[int, Owner | None]:
    """route → where the data plane sends its traffic."""
    records = membership.owners()
    owners: dict[int, Owner | None] = {}
    for route in range(1, membership.table.routes + 1):
        record = records.get(route)
        owners[route] = (
            None
            if record is None
            else Owner(record.name, parse_host_port(record.browser), parse_sp_address(record.sp))
        )
    return owners


class HaloDService(service.MultiService):
    log = Logger()

    def __init__(self, config: HaloDConfig, reactor: IReactorTCP | None = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        clock: IReactorTime = reactor  # type: ignore[assignment]
        self.config = config
        self.reactor = reactor
        ha = None
        if config.store == "etcd":
            ha = Leadership(reactor, config.etcd_settings(), config.etcd_name)
        self.halod = HaloD(config, clock, ha=ha)
        if config.vip_address:
            self.halod.vip = virtual_address(config, reactor)
        host, port = parse_sp_address(config.control)
        self.control_server = internet.TCPServer(
            port, ControlFactory(self.halod), backlog=1024, interface=host, reactor=reactor
        )
        self.control_server.setServiceParent(self)
        self.status_server: internet.TCPServer | None = None
        if config.status_http:
            host, port = parse_host_port(config.status_http)
            self.status_server = internet.TCPServer(
                port, status_site(self.halod, config.status_hosts), interface=host, reactor=reactor
            )
            self.status_server.setServiceParent(self)
        self.dataplane = dataplane.build(config, reactor)
        if self.dataplane is not None:
            plane = self.dataplane
            # Called once a change is saved (etcd: written), only by a HaloD that acts.
            self.halod.listeners.append(lambda change, m: plane.apply(owners_of(m)))
            self.halod.dataplane = plane
        # Deadlines are checked a few times per heartbeat interval: detection takes at
        # most grace (or k intervals) plus one tick.
        ticker = Ticker(self.halod.tick_period, self.halod.tick)
        ticker.clock = clock
        ticker.setServiceParent(self)

    @staticmethod
    def _address(server: internet.TCPServer) -> str:
        host = listening_port(server).getHost()
        assert isinstance(host, IPv4Address | IPv6Address), host  # a TCP listener's
        return f"{host.host}:{host.port}"

    @property
    def control_address(self) -> str:
        return "tcp://" + self._address(self.control_server)

    @property
    def status_address(self) -> str | None:
        return self._address(self.status_server) if self.status_server else None

    def startService(self) -> None:  # noqa: N802
        ha = self.halod.ha
        if self.dataplane is not None and ha is None:
            # Restored routes are reachable before nodes return. With etcd the data plane
            # starts with the first table read from etcd (as follower or leader).
            self.halod._plane_started = True
            self.dataplane.start(owners_of(self.halod.membership))
        super().startService()
        control = self.config.control_advertise or self.control_address  # (bound now)
        self.halod.solo_name = control.removeprefix("tcp://")
        if self.halod.vip is not None:  # keepalived runs from the start, as a follower
            self.halod._vip_call(self.halod.vip.follow, "start keepalived")
        if ha is not None:  # the control port is bound: the leader key can name it
            info = {"control": control}
            if self.status_address:
                info["status"] = self.status_address
            ha.start(self.config.etcd_name or self.halod.solo_name, info)

    def stopService(self):  # noqa: ANN201, N802
        result = defer.maybeDeferred(super().stopService)
        if self.dataplane is not None:
            stopped = defer.maybeDeferred(self.dataplane.stop)
            result = defer.gatherResults([result, stopped], consumeErrors=True)
        parts = [result, self.halod.shutdown()]
        if self.halod.vip is not None:
            parts.append(defer.maybeDeferred(self.halod.vip.stop))
        return defer.gatherResults(parts, consumeErrors=True)


def virtual_address(config: HaloDConfig, reactor: Any) -> VirtualAddress:
    """The route address that follows the leader (halod.vip, imported only when used)."""
    from halod.vip import VirtualAddress

    return VirtualAddress(config.vip_settings(), reactor)
