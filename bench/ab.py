"""A/B of the node's hot path between commits, with Nchan as the yardstick, in one run.

    .venv/bin/python -m bench.ab --variants before=HEAD~3,after=.,nchan \\
        --transport ws --clients 1000 --rate 5000 --seconds 4 --reps 3 [--gc-stats] [--profile]

Each variant ``NAME=REF`` runs the ``orbited`` package of REF: ``.`` is this work tree, an
existing directory (with or without a ``/``; it must hold an ``orbited/`` package, and it
wins over a commit of the same name) is used as it is, any other REF is a commit checked
out in a temporary git worktree (removed at the end; its C extension built there, as an
install builds it, where the commit has one); ``nchan``
is nginx + Nchan with one worker (bench/peers.py's settings); ``raw`` is the floor,
bench/raw_server.py: this work tree's socket path (the node's accept loop, llhttp, 101,
write-through and SP server) with none of Orbited's work, WebSocket only, so a node's
figure minus raw's is Orbited's own work. Per variant and repetition:
a fresh server, ``--clients`` subscribers in this process (bench/subscribers.py), one
publisher (SP REQ batches every 10 ms, as ``bench dispatch``; Nchan: pipelined POSTs) at
``--rate`` events/s for ``--seconds``, each event to the next client. Printed: server CPU
(utime+stime of its process tree) per accepted connection and per delivered event (and
the system time alone: ``accept_sys_us``, ``event_sys_us`` in ``--json``), RSS per
connection; variants interleaved, order rotated per repetition; median [min-max].
Every run must deliver every event (sent = received, printed per run as JSON).

``--gc-stats``: each node runs under bench/nodeprof.py with ``ORBITED_GC_STATS``; with the
clients connected it is sent SIGUSR2 and the pause of one full collection is printed
(``full gc ms``). ``--profile``: SIGUSR1 around the connect phase and the event phase;
profiles in ``--out``/prof-<variant>-<transport>.<pid>.<n> (``python -m bench.nodeprof
show FILE``). ``--pyspy PHASE`` (``accept`` or ``event``): py-spy samples the node over that
phase (no instrumentation, so the proportions are the real ones), collapsed stacks in
``--out``/spy-<variant>-<transport>-<rep>.txt (``python -m bench.ab --fold FILE`` sums them
per function). Small and bounded: loopback only, a few thousand clients at most.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

from bench.peers import Nchan, NchanPublisher, Orbited, OrbitedPublisher, Raw, descendants
from bench.subscribers import Stats, Subscriber

ROOT = Path(__file__).resolve().parent.parent
NODEPROF = Path(__file__).resolve().parent / "nodeprof.py"
PEERS = ("nchan", "raw")  # variants that are a server of their own, not an orbited tree
TICK = os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    return descendants([pid])  # the pid and every process below it (each once)


def cpu(pid: int) -> float:
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) seconds of CPU of ``pid``'s process tree (/proc/PID/stat)."""
    user = system = 0.0
    for p in _tree(pid):
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11]) / TICK
        system += int(fields[12]) / TICK
    return user, system


def cpu_exact(pid: int) -> float:
    """``cpu`` in nanoseconds' resolution: the scheduler's run time of every thread of the
    tree (/proc/PID/task/TID/schedstat), not the 10 ms clock ticks of /proc/PID/stat."""
    total = 0
    for p in _tree(pid):
        for tid in os.listdir(f"/proc/{p}/task"):
            with open(f"/proc/{p}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    return total / 1e9


def rss_kb(pid: int) -> int:
    total = 0
    for p in _tree(pid):
        with open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    total += int(line.split()[1])
    return total


async def connect_all(server: Any, transport: str, n: int, stats: Stats, rate: int,
                      flavour: str, prefix: str = "c") -> list[Subscriber]:  # fmt: skip
    loop = asyncio.get_running_loop()

    async def one(i: int) -> Subscriber | None:
        sub = Subscriber(server.url(f"{prefix}{i}", transport), flavour, transport, stats)
        await loop.create_connection(lambda: sub, sub.host, sub.port)
        ok = await asyncio.wait_for(sub.opened, 30)
        return sub if ok else None

    wave = max(1, rate // 20)
    tasks = []
    for i in range(0, n, wave):
        tasks += [asyncio.create_task(one(j)) for j in range(i, min(n, i + wave))]
        await asyncio.sleep(0.05)
    return [s for s in await asyncio.gather(*tasks) if s is not None]


async def run_one(
    name: str, tree: Path | None, args: argparse.Namespace, work: Path, rep: int = 0
) -> dict:
    env: dict[str, str] = {}
    prefix = args.out / f"prof-{name}-{args.transport}"
    gc_prefix = args.out / f"gc-{name}-{args.transport}"
    if args.profile:
        env["ORBITED_PROFILE"] = str(prefix)
    if args.gc_stats:
        env["ORBITED_GC_STATS"] = str(gc_prefix)
    flavour = "orbited" if tree is not None else name  # nchan | raw
    nchan = flavour == "nchan"
    server = start_server(name, tree, work, env=env)
    pid = server.pids()[0]
    try:
        stats = Stats()
        spec = server.publish_spec(args.transport)
        pub = (NchanPublisher if nchan else OrbitedPublisher)(spec)  # raw: SP, as a node
        warm = await connect_all(server, args.transport, 20, stats, 1000, flavour)
        await pub.publish([(f"c{i}", json.dumps({"t": time.time(), "ph": "w"}))
                           for i in range(20)])  # fmt: skip
        await asyncio.sleep(0.3)
        for s in warm:
            s._close()
        await asyncio.sleep(0.3)
        toggle = args.profile and flavour == "orbited"
        if toggle:
            os.kill(pid, signal.SIGUSR1)
        spy = _spy(pid, args, name, "accept", rep)
        r0, (u0, s0) = rss_kb(pid), cpu_split(pid)
        subs = await connect_all(server, args.transport, args.clients, stats,
                                 args.connect_rate, flavour)  # fmt: skip
        await asyncio.sleep(0.5)
        (u1, s1), r1 = cpu_split(pid), rss_kb(pid)
        _unspy(spy)
        if toggle:
            os.kill(pid, signal.SIGUSR1)
        n = len(subs)
        out: dict[str, Any] = {"variant": name, "connected": n,
                               "accept_us": (u1 + s1 - u0 - s0) / n * 1e6,
                               "accept_sys_us": (s1 - s0) / n * 1e6,
                               "rss_kb_per_conn": (r1 - r0) / n}  # fmt: skip
        if args.gc_stats and flavour == "orbited":
            os.kill(pid, signal.SIGUSR2)
            await asyncio.sleep(1.0)
            with open(f"{gc_prefix}.{pid}.json") as f:
                out["full_gc_ms"] = json.load(f)["forced_full"][-1] * 1e3
        per_tick = max(1, args.rate // 100)
        total = int(args.rate * args.seconds)
        sent = i = 0
        if toggle:
            os.kill(pid, signal.SIGUSR1)
        spy = _spy(pid, args, name, "event", rep)
        u2, s2 = cpu_split(pid)
        t0 = time.monotonic()
        inflight: list[asyncio.Task[Any]] = []
        while sent < total:
            batch = []
            for _ in range(per_tick):
                batch.append((f"c{i % args.clients}",
                              json.dumps({"t": time.time(), "ph": "m", "n": i})))  # fmt: skip
                i += 1
            sent += len(batch)
            inflight.append(asyncio.create_task(pub.publish(batch)))
            inflight = [t for t in inflight if not t.done()]
            while len(inflight) > 8:
                await asyncio.sleep(0.001)
                inflight = [t for t in inflight if not t.done()]
            await asyncio.sleep(max(0.0, t0 + sent / args.rate - time.monotonic()))
        await asyncio.gather(*inflight)
        deadline = time.monotonic() + 10
        while stats.counts.get("m", 0) < sent and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        u3, s3 = cpu_split(pid)
        _unspy(spy)
        if toggle:
            os.kill(pid, signal.SIGUSR1)
        got = stats.counts.get("m", 0)
        out.update(sent=sent, received=got, event_us=(u3 + s3 - u2 - s2) / max(1, got) * 1e6,
                   event_sys_us=(s3 - s2) / max(1, got) * 1e6,
                   errors=dict(stats.errors))  # fmt: skip
        for s in subs:
            s._close()
        await pub.close()
        return out
    finally:
        server.stop()


def start_server(
    name: str, tree: Path | None, work: Path, node_flags: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Any:  # fmt: skip
    """A fresh server for variant ``name`` (when ``tree`` is None, the peer of that name:
    Nchan or the raw floor; else the node of ``tree`` with ``node_flags``), started under
    bench/nodeprof.py with ``env`` added to this process's environment for the start
    only."""
    added = {"BENCH_PY_ARGS": str(NODEPROF), **(env or {})}
    if tree is not None:
        added["PYTHONPATH"] = str(tree)
    d = work / f"{name}-{time.monotonic_ns()}"
    d.mkdir()
    server: Nchan | Orbited | Raw
    if tree is None:
        server = Raw(d) if name == "raw" else Nchan(d)
    else:
        server = Orbited(d)
        server.node_flags = node_flags
    with mock.patch.dict(os.environ, added):
        server.start()
    return server


async def accept_rounds(trees: dict[str, Path | None], args: argparse.Namespace,
                        work: Path) -> dict[str, list[float]]:  # fmt: skip
    """``--accept-rounds K``: every variant's server up at once; K rounds, each connecting
    ``--clients`` new clients (new keys, new tokens) to each server in turn (order rotated)
    at ``--connect-rate``, the server's CPU per connection (``cpu_exact``) measured over
    the connect and 0.5 s after, then the clients closed (their close is not measured).
    Variants measured seconds apart share the box's load, so rounds compare better than
    whole runs. The
    nodes run with ``--linger 1``: a closed round's mailboxes expire before that node's
    next round, not during it."""
    servers = {
        name: start_server(name, tree, work, ("--linger", "1")) for name, tree in trees.items()
    }
    out: dict[str, list[float]] = {name: [] for name in trees}
    try:
        names = list(trees)
        for k in range(args.accept_rounds):
            for name in names[k % len(names) :] + names[: k % len(names)]:
                server = servers[name]
                flavour = "orbited" if trees[name] is not None else name
                pid = server.pids()[0]
                stats = Stats()
                c0 = cpu_exact(pid)
                subs = await connect_all(server, args.transport, args.clients, stats,
                                         args.connect_rate, flavour, f"r{k}c")  # fmt: skip
                await asyncio.sleep(0.5)
                us = (cpu_exact(pid) - c0) / max(1, len(subs)) * 1e6
                out[name].append(us)
                print(json.dumps({"variant": name, "round": k, "connected": len(subs),
                                  "accept_us": us, "errors": dict(stats.errors)}),
                      flush=True)  # fmt: skip
                for sub in subs:
                    sub._close()
                await asyncio.sleep(1.5)
    finally:
        for server in servers.values():
            server.stop()
    return out


def _spy(pid: int, args: argparse.Namespace, name: str, phase: str, rep: int) -> Any:
    """py-spy recording the node over ``phase`` if asked (``--pyspy``), else None."""
    if args.pyspy != phase or name == "nchan":  # (the raw floor is sampled like a node)
        return None
    out = args.out / f"spy-{name}-{args.transport}-{rep}.txt"
    spy = subprocess.Popen([str(ROOT / ".venv" / "bin" / "py-spy"), "record", "--pid", str(pid),
                            "--rate", "1000", "--nonblocking", "--format", "raw", "-o", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(0.5)  # py-spy attaches
    return spy


def _unspy(spy: Any) -> None:
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=30)


def fold(path: Path, top: int = 40) -> None:
    """Samples per function (self and total) from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    n = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        k = int(count)
        n += k
        frames = stack.split(";")
        for f in set(frames):
            total[f] = total.get(f, 0) + k
        own[frames[-1]] = own.get(frames[-1], 0) + k
    print(f"{n} samples")
    for title, table in (("self", own), ("total", total)):
        print(f"-- {title}")
        for f, k in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            print(f"{100 * k / n:5.1f}%  {f}")


def _worktree(ref: str, work: Path, name: str) -> Path:
    """The tree whose ``orbited`` package variant ``name`` runs: ``.`` this work tree, an
    existing directory as it is (``cy=cydir`` as well as ``cy=./cydir``), anything else a
    commit checked out under ``work``."""
    if ref == ".":
        return ROOT
    if Path(ref).is_dir():  # a directory holding an orbited/ package
        if not (Path(ref) / "orbited").is_dir():
            raise SystemExit(f"bench.ab: variant {name}: {ref} holds no orbited/ package")
        return Path(ref).resolve()
    path = work / f"tree-{name}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(path), ref],
                   check=True)  # fmt: skip
    if (path / "setup.py").is_file():  # its C extension, as an install builds it
        build = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
        subprocess.run(build, cwd=path, check=False, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)  # fmt: skip
    return path


async def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    p.add_argument(
        "--variants",
        default="head=.,nchan",
        help="NAME=REF (REF: ., a directory holding an orbited/ package, or a commit), "
        "nchan, or raw; comma-separated",
    )
    p.add_argument("--transport", default="ws", choices=["ws", "sse", "poll"])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--connect-rate", type=int, default=1000)
    p.add_argument("--rate", type=int, default=5000, help="events/s offered")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--gc-stats", action="store_true")
    p.add_argument("--pyspy", choices=["accept", "event"])
    p.add_argument("--accept-rounds", type=int, default=0,
                   help="only accepts: K interleaved rounds, all servers up at once")  # fmt: skip
    p.add_argument("--fold", type=Path, help="print a --pyspy file per function and exit")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "orbited-ab")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.fold:
        fold(args.fold)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="orbited-ab-") as tmp:
        work = Path(tmp)
        trees: dict[str, Path | None] = {}
        try:
            for spec in args.variants.split(","):
                name, _, ref = spec.partition("=")
                peer = name in PEERS and not ref
                trees[name] = None if peer else _worktree(ref or ".", work, name)
            names = list(trees)
            if args.accept_rounds:
                per = await accept_rounds(trees, args, work)
                load = os.getloadavg()[0]
                print(
                    f"\n# accept {args.transport} clients={args.clients} "
                    f"rate={args.connect_rate}/s rounds={args.accept_rounds} load={load:.2f}"
                )
                first = None
                for name, values in per.items():
                    med = statistics.median(values)
                    first = first or med
                    print(f"{name:12} accept µs {med:7.1f} [{min(values):.1f}-{max(values):.1f}]"
                          f"   ×{med / first:.2f}")  # fmt: skip
                if args.json:
                    args.json.write_text(json.dumps(per, indent=1))
                return
            for rep in range(args.reps):
                for name in names[rep % len(names) :] + names[: rep % len(names)]:
                    r = await run_one(name, trees[name], args, work, rep)
                    r["rep"] = rep
                    print(json.dumps(r), flush=True)
                    results.append(r)
        finally:
            for tree in trees.values():
                if tree is not None and tree != ROOT and tree.is_relative_to(work):
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                    str(tree)], check=False)  # fmt: skip
    load = os.getloadavg()[0]
    print(f"\n# {args.transport} clients={args.clients} rate={args.rate}/s "
          f"{args.seconds:g}s reps={args.reps} load={load:.2f}")  # fmt: skip
    print(f"{'variant':12} {'event µs':>22} {'accept µs':>10} {'RSS KB/conn':>12} "
          f"{'full gc ms':>10}")  # fmt: skip
    first = None
    for name in trees:
        rs = [r for r in results if r["variant"] == name]
        ev = statistics.median(r["event_us"] for r in rs)
        spread = f"[{min(r['event_us'] for r in rs):.1f}-{max(r['event_us'] for r in rs):.1f}]"
        ac = statistics.median(r["accept_us"] for r in rs)
        rss = statistics.median(r["rss_kb_per_conn"] for r in rs)
        gcs = [r["full_gc_ms"] for r in rs if "full_gc_ms" in r]
        gc_text = f"{statistics.median(gcs):.1f}" if gcs else "-"
        first = first or ev
        print(f"{name:12} {ev:7.1f} {spread:>14} {ac:10.1f} {rss:12.1f} {gc_text:>10}"
              f"   ×{ev / first:.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
