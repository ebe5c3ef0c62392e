"""What HaloD persists, as typed values, and the interface every store implements.

``Persisted`` is one version of the table: the route table (owners of routes), the node
registry, the spares, the policy and the table version. It converts exactly to and from
``Membership.snapshot()`` (``from_snapshot(...).snapshot() == snapshot``). Owners are in
node-id order, the registry and the drained in name order (so equal tables compare equal);
the spares keep their order, which decides who is promoted first.

``hash_version`` (docs/hashing.md) is in the snapshot only when it is not 1: a table saved
before hash versions existed has none and reads as 1, and a version-1 table is saved
exactly as before (an older HaloD can still read it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from orbited.core.hashing import check_hash_version


class StoreError(Exception):
    """The store could not read or write the table (see the message)."""


class CorruptTable(StoreError):
    """What the store holds is not a valid table."""


@dataclass(frozen=True)
class Owner:
    node: int  # the node id of a slot of the route table
    name: str
    routes: tuple[int, ...]


@dataclass(frozen=True)
class NodeEntry:
    name: str
    browser: str
    sp: str
    capacity: int


@dataclass(frozen=True)
class Policy:
    name: str  # halod.routes policy ("even", ...)
    spares_wanted: int


@dataclass(frozen=True)
class Persisted:
    version: int
    routes: int
    policy: Policy
    owners: tuple[Owner, ...]
    spares: tuple[str, ...]
    registry: tuple[NodeEntry, ...]
    failovers: int = 0
    drained: tuple[str, ...] = ()
    hash_version: int = 1  # how keys map to routes (docs/hashing.md); absent: 1
    # Routes a paced planned move still leaves with their old owner: (route, name).
    holdover: tuple[tuple[int, str], ...] = ()

    @classmethod
    def from_snapshot(cls, snapshot: Mapping[str, Any], version: int) -> Persisted:
        """From ``Membership.snapshot()``; CorruptTable if it is not one."""
        try:
            table = snapshot["table"]
            owners = tuple(
                Owner(int(node), str(entry["name"]), tuple(int(r) for r in entry["routes"]))
                for node, entry in sorted(table["nodes"].items(), key=lambda i: int(i[0]))
            )
            registry = tuple(
                NodeEntry(str(name), str(r["browser"]), str(r["sp"]), int(r["capacity"]))
                for name, r in sorted(snapshot["nodes"].items())
            )
            return cls(
                version=version, routes=int(table["routes"]),
                policy=Policy(str(table["policy"]), int(table["spares_wanted"])),
                owners=owners, spares=tuple(str(s) for s in table["spares"]),
                registry=registry, failovers=int(snapshot.get("failovers", 0)),
                drained=tuple(sorted(str(d) for d in snapshot.get("drained", []))),
                hash_version=snapshot_hash_version(snapshot),
                holdover=tuple(sorted(
                    (int(r), str(n)) for r, n in dict(snapshot.get("holdover", {})).items()
                )),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CorruptTable(f"not a table snapshot: {e!r}") from None

    def snapshot(self) -> dict[str, Any]:
        """The ``Membership.snapshot()`` this was made from (what ``Membership.restore`` takes)."""
        return {
            "table": {
                "routes": self.routes,
                "policy": self.policy.name,
                "spares_wanted": self.policy.spares_wanted,
                "nodes": {
                    str(o.node): {"name": o.name, "routes": list(o.routes)}
                    for o in sorted(self.owners, key=lambda o: o.node)
                },  # fmt: skip
                "spares": list(self.spares),
            },
            "nodes": {
                n.name: {"browser": n.browser, "sp": n.sp, "capacity": n.capacity}
                for n in self.registry
            },  # fmt: skip
            "failovers": self.failovers,
            "drained": list(self.drained),
            **hash_version_field(self.hash_version),
            **({"holdover": {str(r): n for r, n in self.holdover}} if self.holdover else {}),
        }


def snapshot_hash_version(snapshot: Mapping[str, Any]) -> int:
    """A snapshot's ``hash_version``: 1 when absent (saved before hash versions);
    ValueError if it is not 1 or 2."""
    return check_hash_version(snapshot.get("hash_version", 1))


def hash_version_field(version: int) -> dict[str, int]:
    """What a snapshot holds for ``version``: nothing for 1 (the format before versions)."""
    return {} if version == 1 else {"hash_version": version}


class TableStore(Protocol):
    """A HaloD store (``halod.store.sqlite.SQLiteStore``, ``halod.store.etcd.EtcdStore``).

    ``write`` makes the next version durable and fires with it; it fails with StoreError
    (etcd: ``Fenced`` when this HaloD no longer leads), and then nothing was written.
    """

    @property
    def version(self) -> int:
        """The version last read or written (0: nothing yet)."""
        ...

    def read(self) -> Deferred[Persisted | None]: ...

    def write(self, snapshot: Mapping[str, Any]) -> Deferred[Persisted]: ...

    def shutdown(self) -> Deferred[None]: ...
