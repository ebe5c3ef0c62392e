"""HaloD's route table (sans-I/O): the 2007 algorithm exactly, plus spares.

Routes 1..N map to active node ids 1..M; each id is served by one machine (a registered
node, by name). Adding a node follows the seed's steps (docs/halod.md, "Adding a node");
losing one hands its id and routes to a spare, or, with no spare, to the machine with the
highest id, whose own routes go back by the reverse of the add. Under this policy (SEED)
the table (id → routes) always equals the canonical table for M nodes.

The MINIMAL policy differs only when an active node fails with no spare: its routes alone
move, one by one to the least-loaded active node, and its id stays free until a new node
takes it (docs/halod.md, "Failover policies").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

DEFAULT_ROUTES = 24  # N when nothing says otherwise: the node, HaloD, clients, the JS


class Policy(StrEnum):
    """How routes move when an active node fails with no spare (docs/halod.md)."""

    SEED = "seed"
    MINIMAL = "minimal"


SEED = Policy.SEED
MINIMAL = Policy.MINIMAL
POLICIES = tuple(Policy)


class Role(StrEnum):
    """A registered node's role: the ``role`` of welcome/assign, the ``state`` on status
    pages (docs/halod-protocol.md)."""

    ACTIVE = "active"  # holds a node id and routes
    SPARE = "spare"  # waits to take over a failed node's id
    DRAINED = "drained"  # taken out of service by an operator: no routes, never promoted


class ChangeKind(StrEnum):
    """What a membership event made of its node (``Change.role``)."""

    ACTIVE = "active"  # joined as an active node
    SPARE = "spare"  # joined as a spare
    GONE = "gone"  # left, failed or was drained: its routes moved
    READDRESSED = "readdressed"  # came back with other addresses: the data plane follows
    MOVED = "moved"  # a later step of a paced planned move (HaloD): more routes reach their owner


class Move(NamedTuple):
    """Route ``route`` now reaches ``new`` (a machine name) instead of ``old``."""

    route: int
    old: str | None
    new: str | None


class RouteTableError(ValueError):
    pass


def _donor_order(table: dict[int, list[int]]) -> list[int]:
    """Nodes by routes held, descending, then id ascending (the seed's step 3)."""
    counts = {node: len(held) for node, held in table.items()}
    high, low = max(counts.values()), min(counts.values())
    ids = sorted(table)
    if high - low <= 1:  # balanced, as every table HaloD builds: no sort by key needed
        return [n for n in ids if counts[n] == high] + [n for n in ids if counts[n] != high]
    return sorted(ids, key=lambda node: -counts[node])


def _take(table: dict[int, list[int]], quota: int) -> list[int]:
    """Move ``quota`` routes out of ``table`` (in place): each listed node's highest route
    in turn, wrapping around (steps 4-5). Returns them ascending."""
    order = _donor_order(table)
    taken: list[int] = []
    i = 0
    while len(taken) < quota:
        taken.append(table[order[i % len(order)]].pop())  # the donor's highest route id
        i += 1
    return sorted(taken)


def add_node(
    table: dict[int, list[int]], routes: int, new_id: int | None = None
) -> dict[int, list[int]]:
    """The seed's add: a new node id M+1 takes floor(N/(M+1)) routes. Pure.

    ``table`` maps node id → ascending route ids; returns the new table. ``new_id`` is
    M+1 unless given (the minimal policy reuses a freed id); the quota counts nodes.
    """
    if new_id is None:
        new_id = max(table, default=0) + 1
    if new_id in table or new_id < 1:
        raise RouteTableError(f"node id {new_id} is taken or invalid")
    nodes = len(table) + 1
    if nodes > routes:
        raise RouteTableError(f"{routes} routes cannot serve more than {routes} active nodes")
    if not table:
        return {new_id: list(range(1, routes + 1))}
    result = {node: list(held) for node, held in table.items()}
    result[new_id] = _take(result, routes // nodes)
    return result


class _Progression:
    """The canonical tables for one N, kept as what each added node took (≈ N·ln M route
    ids in all), grown on demand; a table for any M is rebuilt from them in O(N ln M)."""

    def __init__(self, routes: int) -> None:
        self.routes = routes
        self.running: dict[int, list[int]] = {}  # the table for len(taken) - 1 nodes
        self.taken: list[list[int]] = [[]]  # taken[m]: the routes node m got when added

    def table(self, nodes: int) -> dict[int, list[int]]:
        if nodes > self.routes:
            raise RouteTableError(
                f"{self.routes} routes cannot serve more than {self.routes} active nodes"
            )
        while len(self.taken) <= nodes:
            m = len(self.taken)
            if m == 1:
                got = list(range(1, self.routes + 1))
            else:
                got = _take(self.running, self.routes // m)
            self.running[m] = list(got)
            self.taken.append(got)
        owner = [0] * (self.routes + 1)
        for m in range(1, nodes + 1):
            for route in self.taken[m]:
                owner[route] = m
        table: dict[int, list[int]] = {m: [] for m in range(1, nodes + 1)}
        for route in range(1, self.routes + 1):
            table[owner[route]].append(route)
        return table


_progressions: dict[int, _Progression] = {}


def canonical(routes: int, nodes: int) -> dict[int, list[int]]:
    """The table built by adding ``nodes`` nodes one by one."""
    if nodes == 0:
        return {}
    progression = _progressions.get(routes)
    if progression is None:
        progression = _progressions[routes] = _Progression(routes)
    return progression.table(nodes)


@dataclass
class Change:
    """What one membership event did: the node's role and the routes that moved."""

    name: str
    role: ChangeKind
    node_id: int | None
    moves: list[Move] = field(default_factory=list)


class RouteTable:
    """Membership and routes of one cluster. Every change returns the moved routes."""

    def __init__(
        self, routes: int = DEFAULT_ROUTES, spares_wanted: int = 1, policy: str = Policy.SEED
    ) -> None:
        if routes < 1:
            raise RouteTableError("a cluster needs at least one route")
        if policy not in POLICIES:
            raise RouteTableError(f"policy must be one of {', '.join(POLICIES)}")
        if spares_wanted < 0:
            raise RouteTableError("spares_wanted must not be negative")
        self.routes = routes
        self.spares_wanted = spares_wanted
        self.policy = Policy(policy)
        self._table: dict[int, list[int]] = {}  # node id -> ascending routes
        self._machine: dict[int, str] = {}  # node id -> name
        self.spares: list[str] = []  # oldest first

    # -- queries ------------------------------------------------------------------------

    def table(self) -> dict[int, list[int]]:
        return {node: list(held) for node, held in sorted(self._table.items())}

    def machines(self) -> dict[int, str]:
        return dict(sorted(self._machine.items()))

    def owners(self) -> dict[int, str]:
        """route → machine name, for every route."""
        return {r: self._machine[n] for n, held in self._table.items() for r in held}

    def node_id(self, name: str) -> int | None:
        for node, machine in self._machine.items():
            if machine == name:
                return node
        return None

    def routes_of(self, node_id: int) -> list[int]:
        """A copy of one node's routes (cheaper than table() for one node)."""
        return list(self._table.get(node_id, ()))

    def __contains__(self, name: str) -> bool:
        return name in self.spares or self.node_id(name) is not None

    # -- changes ------------------------------------------------------------------------

    def join(self, name: str) -> Change:
        """A node registered: activate it, or keep it as a spare."""
        if name in self:
            raise RouteTableError(f"node {name!r} is already registered")
        active = len(self._table)
        if active and (active >= self.routes or len(self.spares) < self.spares_wanted):
            self.spares.append(name)
            return Change(name, ChangeKind.SPARE, None)
        before = self.owners()
        new_id = max(self._table, default=0) + 1
        if self.policy is Policy.MINIMAL:  # the lowest free id: ids stay within 1..N
            new_id = next(i for i in range(1, active + 2) if i not in self._table)
        self._table = add_node(self._table, self.routes, new_id)
        self._machine[new_id] = name
        return Change(name, ChangeKind.ACTIVE, new_id, self._moves(before))

    def leave(self, name: str) -> Change:
        """A node failed or was removed: its routes go to a spare, or the seed's
        replacement happens (the highest id takes over, its routes go back)."""
        if name in self.spares:
            self.spares.remove(name)
            return Change(name, ChangeKind.GONE, None)
        failed = self.node_id(name)
        if failed is None:
            raise RouteTableError(f"node {name!r} is not registered")
        before = self.owners()
        if self.spares:
            self._machine[failed] = self.spares.pop(0)
        elif self.policy is Policy.MINIMAL:
            del self._machine[failed]
            orphans = self._table.pop(failed)
            for route in orphans:
                if not self._table:
                    break
                target = min(self._table, key=lambda node: (len(self._table[node]), node))
                self._table[target].append(route)
            for held in self._table.values():
                held.sort()
        else:
            highest = max(self._table)
            if failed != highest:
                self._machine[failed] = self._machine[highest]
            del self._machine[highest]
            # The reverse of the add: the table becomes the canonical one for M-1 nodes,
            # which returns node M's routes to the nodes they came from.
            self._table = canonical(self.routes, highest - 1)
        return Change(name, ChangeKind.GONE, failed, self._moves(before))

    # -- persistence --------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """Everything needed to rebuild this table exactly (JSON-ready)."""
        return {
            "routes": self.routes,
            "policy": self.policy,
            "spares_wanted": self.spares_wanted,
            "nodes": {
                str(n): {"name": self._machine[n], "routes": self._table[n]}
                for n in sorted(self._table)
            },  # fmt: skip
            "spares": list(self.spares),
        }

    @classmethod
    def restore(cls, snapshot: dict[str, Any], spares_wanted: int | None = None) -> RouteTable:
        """Rebuild a table from ``snapshot()``; raise RouteTableError if it is not a valid
        table (a route without exactly one owner, a name twice, ...)."""
        try:
            table = cls(int(snapshot["routes"]), int(snapshot["spares_wanted"]),
                        str(snapshot["policy"]))  # fmt: skip
            if spares_wanted is not None:
                table.spares_wanted = spares_wanted
            for node, entry in snapshot["nodes"].items():
                table._table[int(node)] = sorted(int(r) for r in entry["routes"])
                table._machine[int(node)] = str(entry["name"])
            table.spares = [str(name) for name in snapshot["spares"]]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RouteTableError(f"not a route table snapshot: {e!r}") from None
        held = sorted(r for routes in table._table.values() for r in routes)
        if held != (list(range(1, table.routes + 1)) if table._table else []):
            raise RouteTableError("snapshot: every route needs exactly one owner")
        names = list(table._machine.values()) + table.spares
        if len(set(names)) != len(names) or any(not routes for routes in table._table.values()):
            raise RouteTableError("snapshot: a name twice or an active node without routes")
        return table

    def _moves(self, before: dict[int, str]) -> list[Move]:
        after = self.owners()
        return [
            Move(r, before.get(r), after.get(r))
            for r in range(1, self.routes + 1)
            if before.get(r) != after.get(r)
        ]


def format_ranges(routes: list[int]) -> str:
    """[1, 2, 3, 5, 7, 8] → "1-3,5,7-8" """
    parts: list[str] = []
    start = prev = None
    for r in routes:
        if prev is not None and r == prev + 1:
            prev = r
            continue
        if start is not None:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        start = prev = r
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ",".join(parts)
