"""Fan-out side by side: ONE request to 10 000 keys vs one publish to a channel with 10 000
subscribers.

    python -m bench dispatch fanout [--servers orbited,nchan] [--clients 10000] [--procs 4]
        [--rounds 5] [--quick] [--json bench/results/fanout.json]
    (also: python -m bench.fanout ...)

Per server (bench/peers.py; Orbited one node, Nchan ``worker_processes 1``): connect
``--clients`` WebSocket subscribers in ``--procs`` processes (bench/subscribers.py), then
``--rounds`` times: one publish, and wait until every subscriber received it (or
``--timeout``). Orbited: one SP request whose ``to`` lists every client's own key
(``("c17", "b", "/bench")``, each key with one connected subscriber; ``max_recipients``
is 10 000 by default). Nchan: one ``POST /pub/fan`` to the channel every subscriber
joined. Measured per round: the server's CPU (utime+stime of its process tree, from
just before the publish to the last delivery) and the time until the last subscriber
had the event (receive − send, ``time.time()`` on this box). The figures: server CPU
per recipient (all rounds' CPU / all deliveries) and the ratio orbited / nchan.

Results JSON: ``{"meta": {...}, "machine": {...} (bench/report.py's machine()), "runs":
[{"server", "connected", "rounds": [{"received", "cpu_s", "last_ms", "p50_ms"}],
"received", "expected", "cpu_us_per_recipient", "cpu_us_per_recipient_median_round",
"last_ms_median"}], "ratio": orbited / nchan CPU per recipient (or null),
"ratio_median_round"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.dispatch import Subscribers, percentile
from bench.peers import LOCATION, SESSION, available, exit_on_signals, make_server, usage
from bench.report import machine

RESULTS = Path(__file__).resolve().parent / "results" / "fanout.json"
CHANNEL = "fan"  # the Nchan channel every subscriber joins
QUICK = {"clients": 200, "procs": 2, "rounds": 3}


def publish_orbited(sp: str, clients: list[str], data: str, event_id: str) -> dict[str, Any]:
    """One SP request to every client's key; the node's reply."""
    import pynng

    body = json.dumps({"id": event_id, "to": [[c, SESSION, LOCATION] for c in clients],
                       "data": json.loads(data)}, separators=(",", ":"))  # fmt: skip
    with pynng.Req0(dial=sp, recv_timeout=60_000, send_timeout=10_000,
                    recv_max_size=0) as req:  # fmt: skip
        req.send(body.encode())
        reply: dict[str, Any] = json.loads(req.recv())
    return reply


def publish_nchan(port: int, data: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/pub/{CHANNEL}",
                                     data=data.encode(), method="POST")  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as r:
        return int(r.status)


def run_one(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    server = make_server(name, tmp / name)
    subs: Subscribers | None = None
    with server:
        try:
            clients = [f"c{i}" for i in range(args.clients)]
            # Nchan: every subscriber on one channel; Orbited: each client its own key
            urls = [server.url(CHANNEL if server.flavour == "nchan" else c, "ws")
                    for c in clients]  # fmt: skip
            rate = min(args.connect_rate, server.connect_rate // args.procs)
            subs = Subscribers({"flavour": server.flavour, "transport": "ws",
                                "connect_rate": rate}, urls, args.procs, tmp)  # fmt: skip
            connected = [c for i, c in enumerate(clients) if i not in subs.failed_urls]
            time.sleep(1.0)
            rounds = []
            for k in range(args.rounds):
                phase = f"f{k}"
                pids = server.pids()
                before, sent_at = usage(pids), time.time()
                data = json.dumps({"t": sent_at, "ph": phase, "n": k})
                if server.flavour == "nchan":
                    publish_nchan(server.port, data)  # type: ignore[attr-defined]
                else:
                    reply = publish_orbited(server.sp, connected, data,  # type: ignore[attr-defined]
                                            f"fan-{k}")  # fmt: skip
                    if not reply.get("ok"):
                        raise RuntimeError(f"{name}: the request failed: {reply}")
                deadline = time.monotonic() + args.timeout
                stats = subs.stats()
                while stats["counts"].get(phase, 0) < len(connected):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                    stats = subs.stats()
                after = usage(pids)
                lat = stats["latencies"].get(phase, [])
                rounds.append({
                    "received": stats["counts"].get(phase, 0),
                    "cpu_s": after.cpu_s - before.cpu_s,
                    "last_ms": max(lat, default=float("nan")) * 1e3,
                    "p50_ms": percentile(lat, 0.5) * 1e3,
                })  # fmt: skip
                print(f"  {name} round {k}: {rounds[-1]}", file=sys.stderr)
                time.sleep(args.pause)
            final = subs.stop()
            subs = None
            received = sum(r["received"] for r in rounds)
            return {
                "server": name,
                "connected": len(connected),
                "connect_failed": args.clients - len(connected),
                "rounds": rounds,
                "received": received,
                "expected": len(connected) * args.rounds,
                "cpu_us_per_recipient": sum(r["cpu_s"] for r in rounds) / max(1, received) * 1e6,
                "cpu_us_per_recipient_median_round": statistics.median(
                    r["cpu_s"] / max(1, r["received"]) * 1e6 for r in rounds
                ),
                "last_ms_median": statistics.median(r["last_ms"] for r in rounds),
                "client_errors": final["errors"],
            }
        finally:
            if subs is not None:
                subs.kill()


def table(results: dict[str, Any]) -> str:
    lines = [f"{'server':<10}{'recipients':>12}{'received':>10}{'µs CPU/recipient':>18}"
             f"{'median round':>14}{'last ms (median)':>18}"]  # fmt: skip
    for r in results["runs"]:
        lines.append(f"{r['server']:<10}{r['connected']:>12}{r['received']:>10}"
                     f"{r['cpu_us_per_recipient']:>18.2f}"
                     f"{r['cpu_us_per_recipient_median_round']:>14.2f}"
                     f"{r['last_ms_median']:>18.1f}")  # fmt: skip
    if results["ratio"] is not None:
        median = results["ratio_median_round"]
        lines.append(f"  orbited/nchan CPU per recipient: {results['ratio']:.2f} (all rounds)"
                     + (f", {median:.2f} (median rounds)" if median else ""))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench dispatch fanout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--servers", default="orbited,nchan")
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--procs", type=int, default=4, help="subscriber processes")
    p.add_argument("--connect-rate", type=int, default=1000, help="per subscriber process")
    p.add_argument("--rounds", type=int, default=5, help="publishes per server")
    p.add_argument("--pause", type=float, default=0.5, help="seconds between rounds")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a round may take")
    p.add_argument("--quick", action="store_true", help="smoke: " + json.dumps(QUICK))
    p.add_argument("--json", type=Path, help=f"results (default {RESULTS}; none in --quick)")
    p.add_argument("--workdir", type=Path, help="parent of the temporary directory")
    args = p.parse_args(argv)
    if args.quick:  # the smoke sizes, where not given explicitly
        for k, v in QUICK.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    elif args.json is None:
        args.json = RESULTS
    servers = [s for s in args.servers.split(",") if s]
    for s in servers:
        if s not in ("orbited", "nchan"):
            p.error(f"fanout runs orbited and nchan, not {s}")
    missing = [s for s in servers if not available(s)]
    for s in missing:
        print(f"note: {s} is not installed; skipped", file=sys.stderr)
    exit_on_signals()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host_cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg()[0],
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    facts = machine()
    with tempfile.TemporaryDirectory(prefix="bench-fanout-", dir=args.workdir) as tmp:
        runs = [run_one(s, args, Path(tmp)) for s in servers if s not in missing]
    meta["loadavg_after"] = os.getloadavg()[0]
    cost = {r["server"]: r["cpu_us_per_recipient"] for r in runs}
    ratio = cost["orbited"] / cost["nchan"] if cost.get("nchan") and "orbited" in cost else None
    median = {r["server"]: r["cpu_us_per_recipient_median_round"] for r in runs}
    ratio_median = median["orbited"] / median["nchan"] if ratio and median["nchan"] else None
    results = {"meta": meta, "machine": facts, "runs": runs, "ratio": ratio,
               "ratio_median_round": ratio_median}  # fmt: skip
    print(table(results))
    print(f"load average before {meta['loadavg_before']}, after {meta['loadavg_after']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all(r["received"] == r["expected"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
