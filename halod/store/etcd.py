"""The etcd store: HaloD's table in etcd v3, written only by the elected leader.

Keys under ``prefix`` (docs/halod.md, "Store: SQLite or etcd"):

    <prefix>/leader            the leader's name, bound to its lease (halod.etcd.election)
    <prefix>/version           {"version": N, "writer": name, "term": leader key revision}
    <prefix>/table             {"routes", "spares_wanted", "nodes": {id: {name, routes}}}
    <prefix>/policy            the policy's name
    <prefix>/spares            the spares, in order (JSON list)
    <prefix>/registry/<name>   one node's record: {"browser", "sp", "capacity"}
    <prefix>/meta              {"failovers", "drained"[, "hash_version"][, "holdover"]}
                               (no hash_version: version 1; holdover: a paced move's
                               routes still with their old owner, {"route": name})

Each write is one txn: it succeeds only if the leader key still carries this HaloD's lease
and the create revision of its term (fencing), and ``version`` was not written by anyone
since this HaloD read it. Only keys whose value changed are put; registry entries of nodes
that left are deleted. A refused write raises :class:`Fenced` and writes nothing. A txn
whose reply was lost (a member died mid-request) is settled by reading ``version`` back:
its value names the writer and term, so a write that did apply is not sent twice. If no
member answers that read yet (the one that died led etcd, and the others are electing),
the txn is sent again: its compare on ``version``'s revision fails if the first send
applied, and the ``version`` it reads back then says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from halod.etcd import wire
from halod.etcd.client import Ambiguous, EtcdClient, Unavailable, Watch
from halod.etcd.election import ElectionSettings, Fence, NotLeader
from halod.store.base import CorruptTable, Persisted, StoreError, hash_version_field


class Fenced(NotLeader, StoreError):
    """etcd refused a write: this HaloD's leadership (lease/term) is no longer current."""


class Conflict(StoreError):
    """The table's version changed under this HaloD (read it again before writing)."""


@dataclass(frozen=True)
class EtcdSettings:
    """HaloD's etcd store settings (config keys etcd_endpoints, etcd_prefix,
    etcd_lease_ttl, etcd_step_down_margin, etcd_timeout)."""

    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    prefix: str = "/orbited/halod"
    lease_ttl: int = 2
    step_down_margin: float = 0.5
    timeout: float = 1.0

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("etcd_endpoints: at least one endpoint")
        for e in self.endpoints:
            url = urlsplit(e)
            try:
                port = url.port
            except ValueError:  # (not a number: "2379,http://b:2379", say)
                port = None
            if url.scheme not in ("http", "https") or not url.hostname or not port:
                one = " (one endpoint each: repeat --etcd-endpoint)" if "," in e else ""
                raise ValueError(f"etcd_endpoints: {e!r} is not http(s)://host:port{one}")
            if url.path not in ("", "/"):
                raise ValueError(f"etcd_endpoints: {e!r} has a path")
        if not self.prefix.startswith("/") or self.prefix.endswith("/") or "\0" in self.prefix:
            raise ValueError(f"etcd_prefix: {self.prefix!r} must start with / and not end with /")
        self.election()  # validates lease_ttl and step_down_margin (first: timeout needs it)
        if not 0 < self.timeout < self.lease_ttl:
            raise ValueError(f"etcd_timeout: must be > 0 and < etcd_lease_ttl, not {self.timeout}")

    def election(self) -> ElectionSettings:
        try:
            return ElectionSettings(self.lease_ttl, self.step_down_margin)
        except ValueError as e:
            raise ValueError(f"etcd_lease_ttl/etcd_step_down_margin: {e}") from None

    @property
    def key_prefix(self) -> bytes:
        return self.prefix.encode()


# -- the key layout (pure) -------------------------------------------------------------


def encode(prefix: bytes, table: Persisted, writer: str = "", term: int = 0) -> dict[bytes, bytes]:
    """The keys and values that hold ``table``."""
    snap = table.snapshot()

    def dump(obj: object) -> bytes:
        return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()

    t = snap["table"]
    keys = {
        prefix + b"/version": dump({"version": table.version, "writer": writer, "term": term}),
        prefix + b"/table": dump(
            {"routes": t["routes"], "spares_wanted": t["spares_wanted"], "nodes": t["nodes"]}
        ),  # fmt: skip
        prefix + b"/policy": table.policy.name.encode(),
        prefix + b"/spares": dump(t["spares"]),
        prefix + b"/meta": dump(
            {
                "failovers": table.failovers,
                "drained": list(table.drained),
                **hash_version_field(table.hash_version),
                **({"holdover": snap["holdover"]} if table.holdover else {}),
            }
        ),  # fmt: skip
    }
    for name, record in snap["nodes"].items():
        keys[prefix + b"/registry/" + name.encode()] = dump(record)
    return keys


def table_keys(prefix: bytes, values: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
    """The table's keys among ``values`` (leaves out the leader key and anything else)."""
    fixed = {prefix + k for k in (b"/version", b"/table", b"/policy", b"/spares", b"/meta")}
    registry = prefix + b"/registry/"
    return {k: v for k, v in values.items() if k in fixed or k.startswith(registry)}


def decode(prefix: bytes, values: Mapping[bytes, bytes]) -> Persisted | None:
    """The table held by ``values`` (None if there is none yet); CorruptTable if broken."""
    if prefix + b"/version" not in values:
        return None
    try:
        version = json.loads(values[prefix + b"/version"])
        table = json.loads(values[prefix + b"/table"])
        meta = json.loads(values[prefix + b"/meta"])
        registry = prefix + b"/registry/"
        snapshot = {
            "table": {
                **table,
                "policy": values[prefix + b"/policy"].decode(),
                "spares": json.loads(values[prefix + b"/spares"]),
            },  # fmt: skip
            "nodes": {
                k[len(registry) :].decode(): json.loads(v)
                for k, v in sorted(values.items())
                if k.startswith(registry)
            },  # fmt: skip
            "failovers": meta["failovers"],
            "drained": meta["drained"],
            **({"hash_version": meta["hash_version"]} if "hash_version" in meta else {}),
            **({"holdover": meta["holdover"]} if "holdover" in meta else {}),
        }
        return Persisted.from_snapshot(snapshot, int(version["version"]))
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise CorruptTable(f"etcd under {prefix!r}: {e!r}") from None


def writer_of(value: bytes) -> tuple[int, str, int]:
    """(version, writer, term) of a ``<prefix>/version`` value."""
    obj = json.loads(value)
    return int(obj["version"]), str(obj["writer"]), int(obj["term"])


class Mirror:
    """A follower's copy of the keys under a prefix, kept from a range plus watch events."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.values: dict[bytes, bytes] = {}
        self.revision = 0

    def reset(self, snapshot: wire.RangeResult) -> None:
        self.values = {kv.key: kv.value for kv in snapshot.kvs}
        self.revision = snapshot.revision

    def apply(self, message: wire.WatchMessage) -> bool:
        """Apply one watch message; True if the table's keys changed."""
        changed = False
        for event in message.events:
            if event.kv.mod_revision and event.kv.mod_revision <= self.revision:
                continue  # already in the range we started from
            in_table = bool(table_keys(self.prefix, {event.kv.key: b""}))
            if event.type is wire.EventType.PUT:
                self.values[event.kv.key] = event.kv.value
            else:
                self.values.pop(event.kv.key, None)
            changed = changed or in_table
        self.revision = max(self.revision, message.revision)
        return changed

    def table(self) -> Persisted | None:
        return decode(self.prefix, self.values)


# -- the store -------------------------------------------------------------------------


class EtcdStore:
    """The table in etcd. ``fence`` returns the current leader's Fence (or raises
    NotLeader); writes are conditioned on it (see the module docstring), and a refused one
    calls ``on_fenced`` before raising Fenced."""

    log = Logger()

    def __init__(self, client: EtcdClient, settings: EtcdSettings, fence: Callable[[], Fence],
                 on_fenced: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.client = client
        self.settings = settings
        self.prefix = settings.key_prefix
        self.fence = fence
        self.on_fenced = on_fenced  # e.g. Election.deposed: step down at once
        self._version = 0
        self._version_mod = 0  # mod revision of <prefix>/version as last read or written
        self._known: dict[bytes, bytes] = {}

    @property
    def version(self) -> int:
        return self._version

    def read(self) -> Deferred[Persisted | None]:
        """Read the table (and remember it as the base of the next write)."""
        return Deferred.fromCoroutine(self._read())

    async def _read(self) -> Persisted | None:
        under = self.prefix + b"/"
        result = await self.client.range(under, wire.prefix_end(under))
        values = table_keys(self.prefix, {kv.key: kv.value for kv in result.kvs})
        table = decode(self.prefix, values)
        self._known = values
        mods = [kv.mod_revision for kv in result.kvs if kv.key == self.prefix + b"/version"]
        self._version_mod = mods[0] if mods else 0
        self._version = table.version if table is not None else 0
        return table

    def write(self, snapshot: Mapping[str, Any]) -> Deferred[Persisted]:
        return Deferred.fromCoroutine(self._write(snapshot))

    async def _write(self, snapshot: Mapping[str, Any]) -> Persisted:
        fence = self.fence()  # NotLeader: this HaloD knows it does not lead
        table = Persisted.from_snapshot(snapshot, self._version + 1)
        values = encode(self.prefix, table, fence.name, fence.revision)
        leader = self.prefix + b"/leader"
        version_key = self.prefix + b"/version"
        puts = [wire.Put(k, v) for k, v in values.items() if self._known.get(k) != v]
        deletes = [wire.Delete(k) for k in self._known if k not in values]
        compare = [
            wire.Compare(leader, wire.Target.LEASE, fence.lease),
            wire.Compare(leader, wire.Target.CREATE, fence.revision),
            wire.Compare(version_key, wire.Target.MOD, self._version_mod),
        ]
        ours = values[version_key]  # names this writer, term and version
        for attempt in range(len(self.client.endpoints)):
            try:
                result = await self.client.txn(
                    compare, [*puts, *deletes], [wire.Get(leader), wire.Get(version_key)]
                )
                break
            except Ambiguous:
                # Sent, no reply: did it apply? Ask until a member answers; the member that
                # died may have been etcd's own leader, and the others answer only once they
                # have elected one (a read then takes up to an election, not a refusal).
                try:
                    now = await self.client.range(version_key)
                except Unavailable:
                    if attempt == len(self.client.endpoints) - 1:
                        raise
                    continue  # send again: the compare on the version's revision fences it
                if now.kvs and now.kvs[0].value == ours:
                    return self._written(table, values, now.kvs[0].mod_revision)
                if attempt == len(self.client.endpoints) - 1:
                    raise
        if not result.succeeded:
            mine = result.ranges[1].kvs if len(result.ranges) > 1 else ()
            if mine and mine[0].value == ours:  # an earlier, ambiguous send of this write
                return self._written(table, values, mine[0].mod_revision)
            held = result.ranges[0].kvs if result.ranges else ()
            term = (fence.lease, fence.revision)
            if not held or (held[0].lease, held[0].create_revision) != term:
                if self.on_fenced is not None:
                    self.on_fenced()
                raise Fenced(f"{fence.name} no longer leads: version {table.version} not written")
            raise Conflict(f"{version_key!r} changed since version {self._version} was read")
        return self._written(table, values, result.revision)

    def _written(self, table: Persisted, values: dict[bytes, bytes], revision: int) -> Persisted:
        self._known = values
        self._version = table.version
        self._version_mod = revision
        return table

    def shutdown(self) -> Deferred[None]:
        return self.client.close()


class Follower:
    """Keeps a warm copy of the table: a range of the prefix, then a watch from the next
    revision; when the watch ends (a member lost, the revision compacted) it ranges again
    and watches from there. ``on_table(table)`` is called after each change of the table."""

    log = Logger()

    def __init__(self, client: EtcdClient, prefix: bytes,
                 on_table: Callable[[Persisted | None], None] | None = None,
                 retry: float = 0.5) -> None:  # fmt: skip
        self.client = client
        self.mirror = Mirror(prefix)
        self.on_table = on_table
        self.retry = retry
        self.resyncs = 0
        self._watch: Watch | None = None
        self._stopped = False
        self._retry_call: Any = None
        self.ready: Deferred[None] = Deferred()  # the first copy is in

    def start(self) -> None:
        self._sync()

    def table(self) -> Persisted | None:
        return self.mirror.table()

    def _sync(self) -> None:
        self._retry_call = None
        if self._stopped:
            return
        prefix = self.mirror.prefix + b"/"
        d = self.client.range(prefix, wire.prefix_end(prefix))
        d.addCallbacks(self._synced, self._failed)

    def _synced(self, result: wire.RangeResult) -> None:
        if self._stopped:
            return
        self.mirror.reset(result)
        self._publish()
        if not self.ready.called:
            self.ready.callback(None)
        prefix = self.mirror.prefix + b"/"
        self._watch = self.client.watch(prefix, wire.prefix_end(prefix), result.revision + 1,
                                        self._changed)  # fmt: skip
        self._watch.done.addErrback(self._failed)

    def _changed(self, message: wire.WatchMessage) -> None:
        # etcd may send many revisions in one message (catching a watch up): publish
        # the table as of each revision — each a whole txn — in order.
        groups: dict[int, list[wire.Event]] = {}
        for event in message.events:
            groups.setdefault(event.kv.mod_revision, []).append(event)
        for revision, events in sorted(groups.items()):
            if self.mirror.apply(wire.WatchMessage(revision, events=tuple(events))):
                self._publish()
        self.mirror.revision = max(self.mirror.revision, message.revision)

    def _publish(self) -> None:
        if self.on_table is None:
            return
        try:
            table = self.mirror.table()
        except CorruptTable as e:
            self.log.error("the table in etcd is not valid: {e}", e=e)
            return
        self.on_table(table)

    def _failed(self, failure: Any) -> None:
        if self._stopped:
            return
        self.resyncs += 1
        self.log.info("follower: resync after {why}", why=str(failure.value))
        self._retry_call = self.client.reactor.callLater(self.retry, self._sync)

    def stop(self) -> None:
        self._stopped = True
        if self._watch is not None:
            self._watch.cancel()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
