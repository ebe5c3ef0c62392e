"""HaloD's store: the time per table change on SQLite and on etcd, and a leader take-over.

    python -m bench store [--changes 200] [--routes 4096] [--nodes 8] [--ttl 2] [--takeovers 5]
                          [--quick] [--json FILE]

One run, one machine: a 3-member etcd cluster on loopback (halod.etcd.local, Debian's
etcd-server) and a SQLite file in a scratch directory. Each change is a whole table write
through the common interface (``TableStore.write``) of a table of ``--routes`` routes on
``--nodes`` nodes, alternating between the table before and after a failover (one node's
routes move to the spare, which also changes the registry): on SQLite one transaction with
``synchronous=FULL``; on etcd one fenced txn of the keys that changed, committed by a
majority of the 3 members (each fsyncs). Changes are sequential, as HaloD writes them.

Take-over: two candidates (halod.etcd.election) with a lease of ``--ttl`` s; the leader
freezes (no keepalive and no revoke: what kill -9 of its process looks like to etcd) and
the time until the other leads is measured, ``--takeovers`` times; then the same after a
clean stop, which revokes the lease.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

from bench.report import machine
from halod.etcd import election as el
from halod.etcd.client import EtcdClient
from halod.etcd.local import ETCD, EtcdCluster
from halod.store.etcd import EtcdSettings, EtcdStore
from halod.store.sqlite import SQLiteStore

PREFIX = "/bench/halod"


def table(routes: int, nodes: int, failed_over: bool) -> dict[str, Any]:
    names = [f"n{i}" for i in range(nodes)]
    active = names[:-1] + (["spare"] if failed_over else [names[-1]])
    per, extra = divmod(routes, len(active))
    owners, start = {}, 1
    for i, name in enumerate(active):
        count = per + (1 if i < extra else 0)
        owners[str(i + 1)] = {"name": name, "routes": list(range(start, start + count))}
        start += count
    registry = [*active, *([] if failed_over else ["spare"])]
    return {
        "table": {"routes": routes, "policy": "even", "spares_wanted": 1, "nodes": owners,
                  "spares": [] if failed_over else ["spare"]},
        "nodes": {n: {"browser": f"127.0.0.{i + 2}:8000", "sp": f"tcp://127.0.0.{i + 2}:9000",
                      "capacity": 10000} for i, n in enumerate(registry)},
        "failovers": int(failed_over),
        "drained": [],
    }  # fmt: skip


def summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {"n": len(ms), "mean_ms": round(statistics.fmean(ms), 2),
            "median_ms": round(statistics.median(ms), 2),
            "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2),
            "max_ms": round(ms[-1], 2)}  # fmt: skip


async def timed_writes(store: Any, tables: list[dict[str, Any]], changes: int) -> list[float]:
    times = []
    for i in range(changes):
        began = time.perf_counter()
        await store.write(tables[i % 2])
        times.append(time.perf_counter() - began)
    return times


async def until(reactor: Any, check: Any, timeout: float) -> None:
    deadline = reactor.seconds() + timeout
    while not check():
        if reactor.seconds() > deadline:
            raise RuntimeError("no leader within the timeout")
        await task.deferLater(reactor, 0.005, lambda: None)


async def takeover(reactor: Any, cluster: EtcdCluster, ttl: int, frozen: bool, n: int) -> float:
    settings = el.ElectionSettings(ttl, min(0.5, ttl / 4), 0.1)
    clients = [EtcdClient(reactor, cluster.endpoints, timeout=min(1.0, ttl / 2)) for _ in "ab"]
    prefix = f"{PREFIX}/takeover{n}".encode()
    a = el.Election(clients[0], prefix, "a", settings)
    b = el.Election(clients[1], prefix, "b", settings)
    try:
        a.start()
        await a.elected
        b.start()
        await until(reactor, lambda: b.state is el.State.FOLLOWER, 5)
        await task.deferLater(reactor, ttl / 2, lambda: None)  # mid-way between keepalives
        began = reactor.seconds()
        if frozen:
            a.abandon()
        else:
            await a.stop()
        await until(reactor, lambda: b.state is el.State.LEADER, 3 * ttl + 2)
        return float(reactor.seconds() - began)
    finally:
        for e in (a, b):
            if e.state is not el.State.STOPPED:
                await e.stop()
        for c in clients:
            await c.close()


async def run(reactor: Any, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    tables = [table(args.routes, args.nodes, False), table(args.routes, args.nodes, True)]
    result: dict[str, Any] = {"routes": args.routes, "nodes": args.nodes, "ttl": args.ttl}
    sqlite = SQLiteStore(tmp / "halod.sqlite3")
    result["sqlite"] = summary(await timed_writes(sqlite, tables, args.changes))
    await sqlite.shutdown()

    cluster = EtcdCluster(tmp / "etcd")
    (tmp / "etcd").mkdir()
    cluster.start()
    try:
        settings = EtcdSettings(
            tuple(cluster.endpoints),
            PREFIX,
            args.ttl,
            min(0.5, args.ttl / 4),
            min(1.0, args.ttl / 2),
        )
        client = EtcdClient(reactor, settings.endpoints, settings.timeout)
        leader = el.Election(client, settings.key_prefix, "bench", settings.election())
        store = EtcdStore(client, settings, leader.fence)
        leader.start()
        await leader.elected
        await store.read()
        result["etcd"] = summary(await timed_writes(store, tables, args.changes))
        await leader.stop()
        await client.close()
        frozen = [await takeover(reactor, cluster, args.ttl, True, i)
                  for i in range(args.takeovers)]  # fmt: skip
        clean = [await takeover(reactor, cluster, args.ttl, False, 100 + i)
                 for i in range(args.takeovers)]  # fmt: skip
        result["takeover_frozen_s"] = [round(s, 3) for s in frozen]
        result["takeover_clean_s"] = [round(s, 3) for s in clean]
    finally:
        cluster.stop()
    return result


def text(r: dict[str, Any]) -> str:
    lines = [
        f"table of {r['routes']} routes on {r['nodes']} nodes; each change one write",
        f"{'store':8} {'n':>5} {'mean ms':>9} {'median':>8} {'p99':>8} {'max':>8}",
    ]
    for name in ("sqlite", "etcd"):
        s = r[name]
        lines.append(f"{name:8} {s['n']:5d} {s['mean_ms']:9.2f} {s['median_ms']:8.2f} "
                     f"{s['p99_ms']:8.2f} {s['max_ms']:8.2f}")  # fmt: skip
    fr, cl = r["takeover_frozen_s"], r["takeover_clean_s"]
    lines.append(
        f"take-over, lease TTL {r['ttl']} s: leader frozen (as kill -9): "
        f"median {statistics.median(fr):.2f} s, max {max(fr):.2f} s"
    )
    lines.append(
        f"take-over after a clean stop (lease revoked): "
        f"median {statistics.median(cl):.3f} s, max {max(cl):.3f} s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--changes", type=int, default=200, help="table writes per store")
    p.add_argument("--routes", type=int, default=4096)
    p.add_argument("--nodes", type=int, default=8, help="active nodes (plus one spare)")
    p.add_argument("--ttl", type=int, default=2, help="lease TTL, seconds")
    p.add_argument("--takeovers", type=int, default=5, help="take-overs of each kind")
    p.add_argument("--quick", action="store_true", help="smoke: 20 changes, 1 take-over each")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.changes, args.takeovers = 20, 1
    if not Path(ETCD).exists():
        print(f"{ETCD} missing: apt-get install etcd-server", file=sys.stderr)
        return 2

    facts = machine()

    async def go(reactor: Any) -> None:
        with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
            out = await run(reactor, args, Path(tmp)) | {"machine": facts}
        print(text(out))
        if args.json:
            args.json.write_text(json.dumps(out, indent=1) + "\n")

    task.react(lambda reactor: defer.Deferred.fromCoroutine(go(reactor)))  # exits: 0 or 1
    return 0  # not reached
