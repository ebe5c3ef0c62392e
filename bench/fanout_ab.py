"""Fan-out A/B between commits, with Nchan as the yardstick, in one run.

    .venv/bin/python -m bench.fanout_ab --variants before=HEAD~1,after=.,nchan \\
        [--clients 3000] [--rounds 5] [--reps 2] [--profile]

``bench dispatch fanout`` (bench/fanout.py) measures one server after the other with
10 000 subscribers in four processes; this is its small twin for steps of the hub:
per variant (``NAME=REF`` as bench/ab.py: ``.`` this work tree, a commit checked out in
a temporary git worktree, or a directory holding an ``orbited`` package; ``nchan``:
Nchan with one worker) and repetition, a fresh
server, ``--clients`` WebSocket subscribers in this process, then ``--rounds`` times one
publish (Orbited: ONE SP request whose ``to`` lists every subscriber's key; Nchan: one
``POST /pub/fan`` to the channel all of them joined), waiting until every subscriber
has it. Printed: the server's CPU (its process tree's run time from schedstat, ns
resolution) per recipient over all rounds (``kernel_us``: the system share, in 10 ms
ticks); variants interleaved, order rotated per repetition; median [min-max]. Every
round must reach every subscriber.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.ab import ROOT, TICK, _tree, _worktree, connect_all, cpu_exact, start_server
from bench.fanout import CHANNEL, publish_nchan, publish_orbited
from bench.subscribers import Stats


def cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid``'s process tree (in ticks: the kernel's
    share, as an indication)."""
    user = system = 0.0
    for p in _tree(pid):
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11]) / TICK
        system += int(fields[12]) / TICK
    return user, system


async def run_one(name: str, tree: Path | None, args: argparse.Namespace, work: Path) -> dict:
    env = {"ORBITED_PROFILE": str(args.out / f"prof-fan-{name}")} if args.profile else {}
    nchan = tree is None
    flavour = "nchan" if nchan else "orbited"
    server = start_server(name, tree, work, env=env)
    pid = server.pids()[0]
    try:
        stats = Stats()
        url = server.url

        class Target:  # every Nchan subscriber on one channel; Orbited: one key each
            def url(self, client: str, transport: str) -> str:
                return url(CHANNEL if nchan else client, transport)

        subs = await connect_all(Target(), "ws", args.clients, stats, args.connect_rate,
                                 flavour)  # fmt: skip
        clients = [f"c{i}" for i in range(len(subs))]
        if len(subs) != args.clients:
            raise RuntimeError(f"{name}: {len(subs)} of {args.clients} connected")
        await asyncio.sleep(0.5)
        if args.profile and not nchan:
            os.kill(pid, signal.SIGUSR1)
        total = kernel = 0.0
        for rnd in range(args.rounds):
            phase = f"f{rnd}"
            c0, e0 = cpu(pid), cpu_exact(pid)
            data = json.dumps({"t": time.time(), "ph": phase, "n": rnd})
            if nchan:
                await asyncio.to_thread(publish_nchan, server.port, data)
            else:
                reply = await asyncio.to_thread(
                    publish_orbited, server.sp, clients, data, f"fan-{rnd}-{time.time()}"
                )
                if not reply.get("ok"):
                    raise RuntimeError(f"{name}: the request failed: {reply}")
            deadline = time.monotonic() + 30
            while stats.counts.get(phase, 0) < len(subs) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            c1, e1 = cpu(pid), cpu_exact(pid)
            total += e1 - e0
            kernel += c1[1] - c0[1]
            if stats.counts.get(phase, 0) != len(subs):
                raise RuntimeError(f"{name}: round {rnd}: {stats.counts.get(phase, 0)} received")
            await asyncio.sleep(0.2)
        if args.profile and not nchan:
            os.kill(pid, signal.SIGUSR1)
        for s in subs:
            s._close()
        return {"variant": name, "recipients": len(subs) * args.rounds,
                "us_per_recipient": total / (len(subs) * args.rounds) * 1e6,
                "kernel_us": kernel / (len(subs) * args.rounds) * 1e6}  # fmt: skip
    finally:
        server.stop()


async def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.fanout_ab", description=__doc__.split("\n")[0]
    )
    p.add_argument("--variants", default="head=.,nchan")
    p.add_argument("--clients", type=int, default=3000)
    p.add_argument("--connect-rate", type=int, default=1500)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "orbited-ab")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="orbited-fanab-") as tmp:
        work = Path(tmp)
        trees: dict[str, Path | None] = {}
        try:
            for spec in args.variants.split(","):
                name, _, ref = spec.partition("=")
                if name == "nchan":
                    trees[name] = None
                elif ref not in ("", ".") and Path(ref).is_dir():  # a tree of your own
                    trees[name] = Path(ref).resolve()
                else:
                    trees[name] = _worktree(ref or ".", work, name)
            names = list(trees)
            for rep in range(args.reps):
                for name in names[rep % len(names) :] + names[: rep % len(names)]:
                    r = await run_one(name, trees[name], args, work)
                    r["rep"] = rep
                    print(json.dumps(r), flush=True)
                    results.append(r)
        finally:
            for tree in trees.values():
                if tree is not None and tree != ROOT and tree.parent == work:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                    str(tree)], check=False)  # fmt: skip
    load = os.getloadavg()[0]
    print(f"\n# fan-out clients={args.clients} rounds={args.rounds} reps={args.reps} "
          f"load={load:.2f}")  # fmt: skip
    base = (
        results
        and statistics.median(r["us_per_recipient"] for r in results if r["variant"] == "nchan")
        if any(r["variant"] == "nchan" for r in results)
        else None
    )
    for name in trees:
        v = [r["us_per_recipient"] for r in results if r["variant"] == name]
        ratio = f"   ×{statistics.median(v) / base:.2f} Nchan" if base else ""
        print(f"{name:12} {statistics.median(v):7.2f} [{min(v):.2f}-{max(v):.2f}] µs CPU / "
              f"recipient{ratio}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
