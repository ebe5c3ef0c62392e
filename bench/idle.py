"""Idle capacity: server memory per held connection, Orbited beside Nchan and Pushpin.

    python -m bench idle [--servers orbited,nchan,pushpin] [--transports ws,sse]
                         [--sizes 5000,19000] [--reps 2] [--procs 4] [--quick] [--json FILE]

Owns the idle-capacity scenario (bench/README.md "idle", docs/performance.md). For each
repetition, server and transport (order rotated per repetition, so every server sees the
box in every state): a fresh server; its memory before; ``--procs`` load processes
(bench/connload.py) open connections up to each size in turn (one key / channel per
connection); one event is published to every key, so Orbited's mailboxes and the peers'
channel buffers exist; the clients confirm they received it; the server's memory is
measured again. Per connection = (after − before) / held.

Memory of a server = the sum over its processes (an Orbited node is one; Nchan is the
nginx master + workers; Pushpin is condure, zurl, the proxy and the handler, and the
GRIP backend is left out as the app's) of PSS (/proc/PID/smaps_rollup: shared pages split
between the processes that map them, so nginx's shared memory zone is counted once); RSS
is recorded as well. Kernel socket memory (TCP ``mem`` pages of /proc/net/sockstat) is
recorded for both ends of the loopback connections: it is not part of any process's RSS.
Extrapolation: connections per GB of server memory, and the memory one process at the
fd limit (``--fd-limit``, 20 000 here) would need.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.report import (
    interleaved,
    med_range,
    num,
    previous_table,
    pyplot,
    ratio,
    spread,
    write_results,
)

RESULTS = Path(__file__).parent / "results" / "idle.json"
MARK = "idlemark"
MAX_CONNECTIONS = 19_200  # Orbited's limit for this scenario (default 15 000)
SERVERS = ("orbited", "nchan", "pushpin")


# -- process memory ---------------------------------------------------------------------------


def mem_kb(pids: list[int]) -> dict[str, int]:
    """Sum of PSS and RSS (KB) over ``pids`` (processes that went away count 0)."""
    pss = rss = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return {"pss": pss, "rss": rss}


def kernel_kb() -> dict[str, int]:
    """Kernel memory that no process's RSS shows: TCP socket buffers (sockstat ``mem``, in
    pages) and the slab (socket structures, epoll items, …; machine-wide, so other
    processes' churn is in it too)."""
    tcp = slab = 0
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            f = line.split()
            tcp = int(f[f.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Slab:"):
            slab = int(line.split()[1])
    return {"tcp_mem": tcp, "slab": slab}


def tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = (task / "children").read_text().split()
                todo += [int(k) for k in kids]
    return out


# -- servers ----------------------------------------------------------------------------------


class Server:
    """A server of bench/peers.py (the launchers the dispatch scenario uses, with their
    documented settings), its subscribe paths and a publisher for one event per client."""

    def __init__(self, name: str, tmp: Path) -> None:
        from bench import peers

        self.name = name
        self.peer = IdleOrbited(tmp) if name == "orbited" else peers.make_server(name, tmp)
        self.peer.start()
        self.settings = dict(self.peer.settings)

    def pids(self) -> list[int]:
        from bench import peers

        return peers.descendants(self.peer.pids())

    def target(self, transport: str) -> dict[str, Any]:
        url = urlsplit(self.peer.url("probe", transport))
        return {"host": url.hostname, "port": url.port, "kind": transport, "mark": MARK}

    def path(self, key: str, transport: str) -> str:
        url = urlsplit(self.peer.url(key, transport))
        return url.path + (f"?{url.query}" if url.query else "")

    def publish(self, keys: list[str], transport: str) -> int:
        from bench import peers

        async def go() -> int:
            pub = peers.make_publisher(self.peer.publish_spec(transport))
            try:
                done = await pub.publish([(k, json.dumps(MARK)) for k in keys])
            finally:
                await pub.close()
            return done.ok

        return asyncio.run(go())

    def stop(self) -> None:
        self.peer.stop()


def _idle_orbited() -> type:
    from bench import peers

    class IdleOrbited(peers.Orbited):
        """bench/peers.py's Orbited with the connection limits raised to what one process
        can hold here (the defaults, 15 000 connections and the fd limit less 1 024
        sockets, keep headroom below the 20 000 fds)."""

        settings = peers.Orbited.settings | {
            f"--max-connections {MAX_CONNECTIONS} --max-sockets {MAX_CONNECTIONS + 400}": (
                "idle: 19 000 connections in one process (fd limit 20 000)"
            )
        }

        def _node(self, tag: str, extra: list[str]) -> Any:
            limits = ["--max-connections", str(MAX_CONNECTIONS),
                      "--max-sockets", str(MAX_CONNECTIONS + 400)]  # fmt: skip
            return super()._node(tag, [*extra, *limits])

    return IdleOrbited


def IdleOrbited(tmp: Path) -> Any:  # noqa: N802 - a class made on first use (lazy import)
    return _idle_orbited()(tmp)


def available(name: str) -> str | None:
    """Why ``name`` cannot run here, or None."""
    from bench import peers

    return None if peers.available(name) else "not installed"


# -- load processes ---------------------------------------------------------------------------


class Loaders:
    """``count`` bench/connload.py processes; commands go to all, answers are collected."""

    def __init__(self, count: int) -> None:
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "bench.connload"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for _ in range(count)
        ]

    def ask(self, cmds: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for p, cmd in zip(self.procs, cmds, strict=False):
            p.stdin.write(json.dumps(cmd) + "\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        out = []
        for p, _ in zip(self.procs, cmds, strict=False):
            line = p.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise RuntimeError("a load process died")
            out.append(json.loads(line))
        return out

    def all(self, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        return self.ask([cmd] * len(self.procs))

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError, ValueError):
                p.stdin.write('{"cmd": "quit"}\n')  # type: ignore[union-attr]
                p.stdin.flush()  # type: ignore[union-attr]
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def settle_mem(pids: list[int], seconds: float = 1.0) -> dict[str, int]:
    time.sleep(seconds)
    return mem_kb(pids)


def one_pass(name: str, transport: str, sizes: list[int], procs: int, tmp: Path,
             rep: int, connect_rate: float) -> dict[str, Any]:  # fmt: skip
    """Fresh server; ramp to each size; memory per connection at each."""
    server = Server(name, tmp)
    loaders = Loaders(procs)
    result: dict[str, Any] = {"server": name, "transport": transport, "rep": rep, "sizes": [],
                              "settings": server.settings}  # fmt: skip
    try:
        target = server.target(transport)
        # Warm-up: the first connections and publish load code and grow pools lazily;
        # that one-off cost is not per connection.
        warm = [server.path(f"w{rep}{transport}{k}", transport) for k in range(50)]
        loaders.ask([{"cmd": "hold", "target": target, "paths": warm[i::procs]}
                     for i in range(procs)])  # fmt: skip
        server.publish([f"w{rep}{transport}{k}" for k in range(50)], transport)
        loaders.all({"cmd": "close"})
        pids = server.pids()
        before = settle_mem(pids, 1.0)
        sock0 = kernel_kb()
        result["before_kb"] = before
        done = 0
        held = 0
        for size in sizes:
            paths = [server.path(f"i{rep}{transport}{k}", transport) for k in range(done, size)]
            chunks = [paths[i::procs] for i in range(procs)]
            t0 = time.monotonic()
            answers = loaders.ask([{"cmd": "hold", "target": target, "paths": c,
                                    "rate": connect_rate / procs} for c in chunks])  # fmt: skip
            connect_s = time.monotonic() - t0
            errors: dict[str, int] = {}
            for a in answers:
                for k, n in a["errors"].items():
                    errors[k] = errors.get(k, 0) + n
            held = sum(a["held"] for a in answers)
            idle = settle_mem(server.pids())
            accepted = server.publish([f"i{rep}{transport}{k}" for k in range(size)], transport)
            deadline = time.monotonic() + 30
            marks = 0
            while time.monotonic() < deadline:
                marks = sum(a["marks"] for a in loaders.all({"cmd": "marks"}))
                if marks >= held:
                    break
                time.sleep(0.5)
            after = settle_mem(server.pids())
            sock = kernel_kb()
            result["sizes"].append({
                "size": size, "held": held, "errors": errors, "connect_s": connect_s,
                "client_cpu_s": sum(a["cpu_s"] for a in answers),
                "published": accepted, "received": marks,
                "held_kb": idle, "after_kb": after,
                "per_conn_kb": (after["pss"] - before["pss"]) / max(1, held),
                "per_conn_rss_kb": (after["rss"] - before["rss"]) / max(1, held),
                "per_conn_idle_kb": (idle["pss"] - before["pss"]) / max(1, held),
                "kernel_tcp_mem_kb": sock["tcp_mem"] - sock0["tcp_mem"],
                "kernel_per_conn_kb": (sock["slab"] - sock0["slab"]) / max(1, held),
                "server_procs": len(server.pids()),
            })  # fmt: skip
            done = size
            print(json.dumps({k: v for k, v in result["sizes"][-1].items()
                              if k not in ("held_kb", "after_kb")}), file=sys.stderr)  # fmt: skip
    finally:
        loaders.close()
        server.stop()
    return result


def summarize(runs: list[dict[str, Any]], fd_limit: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in runs:
        for s in r["sizes"]:
            slot = out.setdefault(r["server"], {}).setdefault(r["transport"], {})
            slot.setdefault(str(s["size"]), []).append(s)
    summary: dict[str, Any] = {}
    for server, by_t in out.items():
        for transport, by_size in by_t.items():
            for size, samples in by_size.items():
                per = spread([s["per_conn_kb"] for s in samples if s["held"]])
                row = {
                    "per_conn_kb": per,
                    "per_conn_rss_kb": spread([s["per_conn_rss_kb"] for s in samples]),
                    "per_conn_idle_kb": spread([s["per_conn_idle_kb"] for s in samples]),
                    "kernel_per_conn_kb": spread([s["kernel_per_conn_kb"] for s in samples]),
                    "held": spread([s["held"] for s in samples]),
                    "received": spread([s["received"] for s in samples]),
                    "errors": sum(sum(s["errors"].values()) for s in samples),
                    "connect_s": spread([s["connect_s"] for s in samples]),
                }
                if per and per["median"] > 0:
                    row["conns_per_gb"] = 2**20 / per["median"]
                    row["mb_at_fd_limit"] = per["median"] * fd_limit / 1024
                summary.setdefault(server, {}).setdefault(transport, {})[size] = row
    return summary


def parser() -> argparse.ArgumentParser:
    """``python -m bench idle``'s options (also what ``report`` reproduces a run from)."""
    p = argparse.ArgumentParser(prog="python -m bench idle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--transports", default="ws,sse")
    p.add_argument("--sizes", default="5000,19000", help="held connections, ascending")
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions")
    p.add_argument("--procs", type=int, default=4, help="load processes (≤ 19 000 fds each)")
    p.add_argument(
        "--connect-rate",
        type=float,
        default=1000.0,
        help="new connections/s while ramping (memory, not a storm: see storm)",
    )
    p.add_argument("--fd-limit", type=int, default=20_000, help="per server process, here")
    p.add_argument("--quick", action="store_true", help="smoke: 200 and 400 connections, 1 rep")
    p.add_argument("--json", type=Path, help=f"results (default {RESULTS}; --quick: none)")
    p.add_argument("--merge", action="store_true",
                   help="replace only these servers' passes in an existing --json")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.sizes, args.reps, args.procs = "200,400", 1, 2
    if args.json is None and not args.quick:
        args.json = RESULTS
    sizes = [int(s) for s in args.sizes.split(",")]

    def one(name: str, transport: str, rep: int, tmp: Path) -> dict[str, Any]:
        return one_pass(name, transport, sizes, args.procs, tmp, rep, args.connect_rate)

    result = interleaved(args, available, args.transports.split(","), one, "sizes")
    servers = result.pop("servers")
    if args.merge and args.json and args.json.exists():
        old = json.loads(args.json.read_text())
        result = merge(old, result, servers)
        # a merge completes that run: what it replaced stays (write_results keeps it)
        result["previous"] = old.get("previous")
    result["summary"] = summarize(result["runs"], args.fd_limit)
    print(text_table(result))
    write_results(result, args.json)
    return 0


def merge(old: dict[str, Any], new: dict[str, Any], servers: list[str]) -> dict[str, Any]:
    """``--merge``: the rerun servers' passes replace theirs in ``old``; the rest, and the
    run's description, stay; the rerun is listed under ``reruns`` (not interleaved with
    the others: the page says so)."""
    merged = dict(old)
    kept = [r for r in old["runs"] if r["server"] not in servers]
    merged["runs"] = kept + [r | {"from_run": new["started"]} for r in new["runs"]]
    merged["reruns"] = old.get("reruns", []) + [
        {
            "servers": servers,
            "started": new["started"],
            "loadavg": new["loadavg"],
            "args": new["args"],
        }  # fmt: skip
    ]
    merged["skipped"] = {k: v for k, v in old.get("skipped", {}).items() if k not in servers}
    return merged


def text_table(result: dict[str, Any]) -> str:
    lines = ["idle: server memory (PSS) per held connection, KB, median [min–max]"]
    for server, by_t in result["summary"].items():
        for transport, by_size in by_t.items():
            for size, row in by_size.items():
                lines.append(
                    f"{server:<8} {transport:<4} {size:>6}  held {num(row['held']['median'])}"
                    f"  {med_range(row['per_conn_kb'])} KB  kernel "
                    f"{med_range(row['kernel_per_conn_kb'])} KB  errors {row['errors']}"
                )
    return "\n".join(lines)


# -- report -----------------------------------------------------------------------------------


def report(results: dict[str, Any], images: Path) -> str:
    from bench.report import command_line, machine_line

    summary = results["summary"] = summarize(results["runs"], results["args"]["fd_limit"])
    sizes = [int(s) for s in results["args"]["sizes"].split(",")]
    reps = results["args"]["reps"]
    servers = [s for s in SERVERS if s in summary]
    out = [
        "```",
        command_line("idle", parser(), results["args"], always=("sizes", "reps", "procs")),
        "```",
        "",
        machine_line(results),
        "",
    ]
    for rerun in results.get("reruns", []):
        load = rerun["loadavg"]
        out += [f"Rerun {rerun['started']} (load average {load['min']:.1f}–{load['max']:.1f}): "
                f"{', '.join(rerun['servers'])} alone, replacing its passes of the main run "
                "(not interleaved with the others).", ""]  # fmt: skip
    if results.get("skipped"):
        out += [
            "Not run: " + "; ".join(f"{k} ({v})" for k, v in results["skipped"].items()) + ".",
            "",
        ]
    head = "| server | transport | connections | held | server memory per connection (PSS) "
    head += "| RSS | before the event | kernel slab Δ² | per GB | at the fd limit³ |"
    if "orbited" in summary and len(servers) > 1:
        head += " Orbited / this |"
    out += [head, "|" + "---|" * head.count("|")[:-1] if False else ""]
    cols = head.count("|") - 1
    out[-1] = "|" + "---|" * cols
    for server in servers:
        for transport, by_size in summary[server].items():
            for size in sizes:
                row = by_size.get(str(size))
                if not row:
                    continue
                cells = [
                    server, transport, f"{size:,}".replace(",", " "),
                    num(row["held"]["median"]) if row["held"] else "—",
                    med_range(row["per_conn_kb"], unit=" KB"),
                    med_range(row["per_conn_rss_kb"], unit=" KB"),
                    med_range(row["per_conn_idle_kb"], unit=" KB"),
                    med_range(row["kernel_per_conn_kb"], unit=" KB"),
                    num(row.get("conns_per_gb")),
                    (num(row["mb_at_fd_limit"]) + " MB") if row.get("mb_at_fd_limit") else "—",
                ]  # fmt: skip
                if "orbited" in summary and len(servers) > 1:
                    o = summary["orbited"].get(transport, {}).get(str(size), {})
                    om = (o.get("per_conn_kb") or {}).get("median")
                    pm = (row.get("per_conn_kb") or {}).get("median")
                    cells.append("—" if server == "orbited" else ratio(om, pm))
                out.append("| " + " | ".join(cells) + " |")
    errors = [
        f"{r['server']} {r['transport']} rep {r['rep']}: {r['error']}"
        for r in results["runs"]
        if r.get("error")
    ]
    short = [
        f"{r['server']} {r['transport']} rep {r['rep']} at {s['size']}: held {s['held']}, "
        f"received the event {s['received']}, errors {s['errors']}"
        for r in results["runs"]
        for s in r["sizes"]
        if s["held"] < s["size"] or s["received"] < s["held"] or s["errors"]
    ]
    if errors or short:
        out += ["", "Incomplete passes (their figures are per connection actually held):"]
        out += [f"- {e}" for e in errors + short]
    fd = f"{results['args'].get('fd_limit', 20_000):,}".replace(",", " ")
    out += ["", f"Medians [min–max] of {reps} interleaved repetition(s). `Orbited / this` "
            "is Orbited's memory per connection over the peer's at the same size and "
            "transport (< 1: Orbited needs less). `per GB` = connections per GB of server "
            "memory at the median. ² growth of the kernel's slab per connection (socket "
            "structures of both loopback ends, epoll items): machine-wide, so other "
            "processes' churn on this shared box is in it — indicative only, sometimes "
            "negative; TCP buffer pages (/proc/net/sockstat) stayed ≈ 0 for idle "
            f"connections. ³ memory of the server holding {fd} connections (the fd limit "
            "of one process here), extrapolated linearly from the median."]  # fmt: skip
    out += previous_table(
        results,
        ["server", "transport", "connections", "server memory per connection (PSS)", "before"],
        lambda now, before: [
            [server, transport, f"{int(size):,}".replace(",", " "),
             med_range(row["per_conn_kb"], unit=" KB"),
             med_range(((before.get(server) or {}).get(transport) or {}).get(size, {})
                       .get("per_conn_kb"), unit=" KB")]
            for server in now for transport, by_size in now[server].items()
            for size, row in by_size.items()
        ],
    )  # fmt: skip
    img = plot(results, images)
    if img:
        out += ["", f"![idle memory per connection](images/{img})"]
    return "\n".join(out)


def plot(results: dict[str, Any], images: Path) -> str | None:
    summary = results["summary"]
    if not summary:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels, meds, lows, highs, colours = [], [], [], [], []
    palette = {"orbited": "#4c72b0", "nchan": "#dd8452", "pushpin": "#55a868"}
    for server in SERVERS:
        for transport, by_size in summary.get(server, {}).items():
            for size, row in sorted(by_size.items(), key=lambda kv: int(kv[0])):
                s = row.get("per_conn_kb")
                if not s:
                    continue
                labels.append(f"{server}\n{transport} {int(size) // 1000}k")
                meds.append(s["median"])
                lows.append(s["median"] - s["min"])
                highs.append(s["max"] - s["median"])
                colours.append(palette.get(server, "grey"))
    ax.bar(range(len(meds)), meds, yerr=[lows, highs], capsize=3, color=colours)
    ax.set_xticks(range(len(meds)), labels, fontsize=7)
    ax.set_ylabel("KB per held connection (PSS)")
    ax.set_title("Idle capacity: server memory per connection (median, min–max)")
    fig.tight_layout()
    name = "perf-idle-memory.png"
    fig.savefig(images / name, dpi=110)
    plt.close(fig)
    return name


if __name__ == "__main__":
    sys.exit(main())
