"""What HaloD's dashboard knows beyond the table: node load, the timeline, the live feed
and the trace queries in flight, fed by one-line hooks in halod.server.

The shell (halod.server.HaloD) calls a method here at each point the plan names (a
register, a heartbeat, a lost connection, an operator request, a relayed hand-off, a
saved change, the deadline tick, a change of leadership, a follower's warm copy); the
decisions are in the sans-I/O halod.timeline and halod.loadstats, the HTTP side in
halod.dashboard and halod.tracefan (docs/halod.md, "The dashboard").
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource

from halod.dashboard import (
    TIMELINE_SHOWN,
    DashboardFeed,
    DashboardResource,
    DashboardView,
    OperatorAuth,
)
from halod.loadstats import ClusterLoad
from halod.timeline import Incident, Kind, Timeline
from halod.tracefan import TraceFanout, TraceResource, trace_answer
from orbited.core.control import (
    ControlError,
    ErrorCode,
    Heartbeat,
    RouteMoved,
    TraceQuery,
    TraceReply,
)
from orbited.core.routes import ChangeKind
from orbited.core.tokens import load_secret

if TYPE_CHECKING:
    from halod.config import HaloDConfig
    from halod.membership import Effects, Membership
    from halod.server import HaloD

TRACE_FEATURE = "trace"


class Insight:
    def __init__(self, halod: HaloD, config: HaloDConfig, clock: IReactorTime) -> None:
        self.halod = halod
        self.clock = clock
        self.auth = OperatorAuth(operator_key(config.operator_key_file))
        self.timeline = Timeline(config.timeline_size)
        self.load = ClusterLoad()
        self.features: dict[str, frozenset[str]] = {}  # connected node → what it announced
        self.feed = DashboardFeed(clock, self.view, config.dashboard_streams)
        self.traces = TraceFanout(clock, config.trace_timeout)
        self._in_flight: dict[int, float] = {}
        self._cache: dict[int, tuple[int, dict[str, Any]]] = {}  # id → (rev, JSON)
        # Each suspected node's latest probe finding: a node that still answers fails
        # after grace with no finding of its own in that change (silent, ports alive).
        self._probed: dict[str, str] = {}

    # -- hooks (halod.server) --------------------------------------------------------------

    def registered(self, name: str, features: tuple[str, ...], now: float) -> None:
        self.features[name] = frozenset(features)
        self.load.registered(name, now)
        self.timeline.recovered(name)
        self._probed.pop(name, None)
        self.feed.changed()

    def heartbeat(self, name: str, msg: Heartbeat, now: float) -> None:
        self.load.heartbeat(name, msg.load, now)
        node = self.load.nodes.get(name)
        if self.timeline.node_routes(name, node.routes if node is not None else {}, now):
            self.feed.changed()  # browsers coming back to moved routes

    def lost(self, name: str, now: float) -> None:
        self.features.pop(name, None)
        self.timeline.first_sign(name, "disconnected", now)
        self.traces.lost(name)
        self.feed.changed()

    def operator(self, action: str, name: str, now: float) -> None:
        self.timeline.first_sign(name, action, now)

    def handoff(self, src: str, dst: str, done: tuple[int, ...], mailboxes: int,
                now: float) -> None:  # fmt: skip
        self.timeline.handoff_relayed(src, dst, done, mailboxes, now)
        if done:
            self.feed.changed()

    def released(self, effects: Effects, version: int, membership: Membership,
                 now: float) -> None:  # fmt: skip
        """A change saved as ``version`` is being acted on (``HaloD._release``)."""
        if effects.findings or effects.drops or effects.probes:
            self.feed.changed()  # a suspicion or probe verdict the page shows
        for finding in effects.findings:
            self._probed[finding.name] = finding.describe()
        self.timeline.paced(bool(membership.holdover))
        if not effects.changes:
            return
        handoffs = {
            move.route
            for send in effects.sends if isinstance(send.message, RouteMoved)
            for move in send.message.moves if move.handoff
        }  # fmt: skip
        by_node = self.load.routes_by_node()
        for change in effects.changes:
            probe = next(
                (f.describe() for f in effects.findings if f.name == change.name and f.fail),
                None,
            )
            if change.role is ChangeKind.GONE:
                if change.name in membership.drained:
                    reason = "operator"
                else:
                    reason = membership.failed.get(change.name, (0.0, "left"))[1]
                    probe = probe or self._probed.get(change.name)
                self._probed.pop(change.name, None)
            else:
                reason = "registered"
            self.timeline.changed(change, version, now, by_node, reason, handoffs, probe)
            if change.role is ChangeKind.GONE and change.name not in membership.drained:
                self.load.gone(change.name)
        self.feed.changed()

    def tick(self, now: float) -> None:
        changed = self.timeline.tick(now)
        flying = self.timeline.in_flight()
        if changed or flying != self._in_flight:
            self._in_flight = flying
            self.feed.changed()

    def leadership(self, leading: bool, name: str, term: int, now: float) -> None:
        self.timeline.leadership(Kind.LEAD if leading else Kind.FOLLOW, name, term, now)
        if not leading:
            self.features.clear()
            self.load = ClusterLoad()
            self.traces.cancel()
        self.feed.changed()

    def warm(self, before: Membership | None, after: Membership, version: int,
             now: float) -> None:  # fmt: skip
        """A follower's copy of the table changed from ``before`` (None: its first copy,
        nothing to compare) to ``after``."""
        if before is not None:
            self.timeline.warm_diff(_owners(before), _owners(after), version, now)
        self.feed.changed()

    def rehashed(self, old: int, new: int, version: int | None, now: float) -> None:
        self.timeline.rehashed(old, new, version, now)
        self.feed.changed()

    def trace_reply(self, name: str, msg: TraceReply) -> None:
        self.traces.reply(name, msg)

    def stop(self) -> None:
        self.traces.cancel()
        self.feed.close()

    # -- views -------------------------------------------------------------------------------

    def view(self) -> DashboardView:
        halod = self.halod
        now = self.clock.seconds()
        m = halod.membership
        owners = m.effective_owners()  # a paced move's old owner serves its routes still
        return DashboardView(
            name=halod._name(),
            status=halod.status(),
            owners=tuple(owners.get(r) for r in range(1, m.table.routes + 1)),
            in_flight=self.timeline.in_flight() if halod.leading else {},
            loads={name: node.to_json(now) for name, node in self.load.nodes.items()},
            totals=self.load.totals(now),
            timeline=tuple(self._json(i) for i in self.timeline.last(TIMELINE_SHOWN)),
            live=halod.leading,
            operator_required=self.auth.required,
        )

    def _json(self, incident: Incident) -> dict[str, Any]:
        """An incident's JSON, rebuilt only when it changed (a move list can be long)."""
        cached = self._cache.get(incident.id)
        if cached is not None and cached[0] == incident.rev:
            return cached[1]
        body = self.timeline.to_json(incident)
        self._cache[incident.id] = (incident.rev, body)
        if len(self._cache) > 2 * TIMELINE_SHOWN:
            keep = {i.id for i in self.timeline.last(TIMELINE_SHOWN)}
            self._cache = {k: v for k, v in self._cache.items() if k in keep}
        return body

    def start_trace(self, query: TraceQuery) -> defer.Deferred[dict[str, Any]]:
        """``GET /trace``: ask every connected node that traces (raises ControlError
        ``not_leader`` on a follower, tracefan.Busy when MAX_PENDING run)."""
        halod = self.halod
        if not halod.leading:
            leader = halod.ha.leader() if halod.ha is not None else None
            where = f": {leader.name} leads" if leader is not None else ""
            raise ControlError(ErrorCode.NOT_LEADER, f"this HaloD does not lead{where}")
        targets = {
            name: conn.send
            for name, conn in halod.connections.items()
            if not conn.closed and TRACE_FEATURE in self.features.get(name, ())
        }
        d = self.traces.ask(query, targets)

        def answer(gathered: Any) -> dict[str, Any]:
            m = halod.membership
            owners = m.effective_owners()
            failed = [{"name": n, "at": at, "why": why} for n, (at, why) in m.failed.items()]
            table = [owners.get(r) for r in range(1, m.table.routes + 1)]
            return trace_answer(query, gathered, failed, table, self._incidents)

        return d.addCallback(answer)

    def _incidents(self, routes: set[int], start: float, end: float) -> list[dict[str, Any]]:
        return [self.timeline.to_json(i) for i in self.timeline.touching(routes, start, end)]

    def leader_view(self) -> dict[str, Any] | None:
        return self.halod.status().get("leader")

    def resources(self) -> dict[bytes, Resource]:
        """The status port's children: ``/dashboard`` and ``/trace``."""
        return {
            b"dashboard": DashboardResource(self.feed),
            b"trace": TraceResource(self.auth, self.start_trace, self.leader_view),
        }

    def metrics(self) -> list[str]:
        """Prometheus lines for halod.server.HaloD.metrics (docs/halod-protocol.md)."""
        now = self.clock.seconds()
        lines = [
            "# HELP halod_node_events_per_second Event requests each node dispatches.",
            "# TYPE halod_node_events_per_second gauge",
        ]
        nodes = sorted(self.load.nodes.items())
        lines += [
            f'halod_node_events_per_second{{node="{n}"}} {node.rates["events"]:.3f}'
            for n, node in nodes
            if "events" in node.rates
        ]
        lines += [
            "# HELP halod_node_deliveries_per_second Events written to browsers at once.",
            "# TYPE halod_node_deliveries_per_second gauge",
            *(
                f'halod_node_deliveries_per_second{{node="{n}"}} {node.rates["delivered"]:.3f}'
                for n, node in nodes
                if "delivered" in node.rates
            ),
            "# HELP halod_node_ack_seconds Ack latency over the last 30 s (bucket upper bound).",
            "# TYPE halod_node_ack_seconds gauge",
        ]
        for n, node in nodes:
            hist = node.ack_histogram(now)
            for q in (0.5, 0.99):
                value = hist.quantile(q)
                if value is not None:
                    lines.append(f'halod_node_ack_seconds{{node="{n}",quantile="{q}"}} '
                                 f"{value / 1000:g}")  # fmt: skip
        lines += [
            "# HELP halod_cluster_ack_seconds Ack latency of every node since HaloD started.",
            "# TYPE halod_cluster_ack_seconds histogram",
        ]
        total = 0
        for le, count in self.load.ack_total.cumulative():
            bound = "+Inf" if le == float("inf") else f"{le:g}"
            lines.append(f'halod_cluster_ack_seconds_bucket{{le="{bound}"}} {count}')
            total = count
        lines.append(f"halod_cluster_ack_seconds_sum {self.load.ack_sum_s:g}")
        lines.append(f"halod_cluster_ack_seconds_count {total}")
        kinds: dict[str, int] = dict.fromkeys((k.value for k in Kind), 0)
        for count_kind, count in self.timeline.counts.items():
            kinds[count_kind.value] = count
        lines += [
            "# HELP halod_incidents_total Timeline incidents by kind (since HaloD started).",
            "# TYPE halod_incidents_total counter",
            *(f'halod_incidents_total{{kind="{k}"}} {n}' for k, n in kinds.items()),
            "# HELP halod_dashboard_streams Open /dashboard/events streams.",
            "# TYPE halod_dashboard_streams gauge",
            f"halod_dashboard_streams {len(self.feed.streams)}",
        ]
        return lines


def operator_key(path: str) -> bytes | None:
    """The operator key in ``path`` (None: no path); ValueError names the file."""
    if not path:
        return None
    try:
        return load_secret(Path(path))
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(f"operator_key_file {path}: {why.replace('shared secret', 'key')}"
                         ) from None  # fmt: skip


def _owners(membership: Membership) -> dict[int, str | None]:
    owners = membership.effective_owners()
    return {r: owners.get(r) for r in range(1, membership.table.routes + 1)}
