"""Connect storm: new subscriber connections per second kept up with, Orbited beside
Nchan and Pushpin.

    python -m bench storm [--servers orbited,nchan,pushpin] [--transports ws,sse]
                          [--rates 100,200,400,800,1600,3200] [--seconds 3] [--reps 2]
                          [--procs 4] [--quick] [--json FILE]

Owns the connect-storm scenario (bench/README.md "storm", docs/performance.md). For each
repetition, server and transport (server order rotated per repetition): a fresh server
(bench/peers.py, its documented settings), a warm-up, then the offered rate steps up:
``--procs`` load processes (bench/connload.py) each open ``rate / procs`` connections per
second, open-loop (connection i starts at t0 + i/rate whether or not the earlier ones
finished), for ``--seconds``; a connection is connect → subscribe request (WebSocket
upgrade, or an SSE GET) → complete response head (``101`` / ``200``: accepted and
subscribed) → close with RST (so that tens of thousands of client-side TIME_WAIT sockets do
not exhaust the ephemeral ports; the server's teardown is counted either way). Every
connection is a new client: its own Orbited key (so a mailbox is made for it) or channel.

Per step: achieved connections/s (ok / time to the last answer), errors by kind (HTTP
5xx/4xx, refused, reset, timeout after ``--timeout`` s, client cap), connect → head
latency p50/p99, server CPU per connection, client CPU and the clients' worst launch lag
(> 250 ms: the clients, not the server, were late). The ramp stops after the first step
with more than 10 % errors. The figure: the highest offered rate kept up with — zero
errors and at least 95 % of it achieved — at that step and every step below it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.idle import Loaders, Server, available
from bench.report import (
    interleaved,
    med_range,
    previous_table,
    pyplot,
    spread,
    write_results,
)

RESULTS = Path(__file__).parent / "results" / "storm.json"
SERVERS = ("orbited", "nchan", "pushpin")
LATE = 0.25  # s: a launch this late means the load processes were the bottleneck
KEPT_UP = 0.95  # a step is kept up with when this share of the offered rate was achieved


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def one_pass(name: str, transport: str, rates: list[int], args: argparse.Namespace, tmp: Path,
             rep: int) -> dict[str, Any]:  # fmt: skip
    from bench import peers

    server = Server(name, tmp)
    loaders = Loaders(args.procs)
    result: dict[str, Any] = {"server": name, "transport": transport, "rep": rep, "steps": [],
                              "settings": server.settings}  # fmt: skip
    try:
        target = server.target(transport)
        procs = args.procs
        warm = [server.path(f"w{rep}{transport}{k}", transport) for k in range(20)]
        loaders.all({"cmd": "storm", "target": target, "paths": warm, "rate": 20 / procs,
                     "seconds": 1, "timeout": args.timeout})  # fmt: skip
        for rate in rates:
            time.sleep(args.pause)
            count = round(rate * args.seconds)
            keys = [f"s{rep}{transport}{rate}x{i}" for i in range(count)]
            paths = [server.path(k, transport) for k in keys]
            cpu0 = peers.usage(server.peer.pids()).cpu_s
            answers = loaders.ask([
                {"cmd": "storm", "target": target, "paths": paths[i::procs] or paths[:1],
                 "rate": rate / procs, "seconds": args.seconds, "timeout": args.timeout}
                for i in range(procs)
            ])  # fmt: skip
            server_cpu = peers.usage(server.peer.pids()).cpu_s - cpu0
            lat = [x for a in answers for x in a["latencies"]]
            errors: dict[str, int] = {}
            for a in answers:
                for k, n in a["errors"].items():
                    errors[k] = errors.get(k, 0) + n
            ok = sum(a["ok"] for a in answers)
            offered = sum(a["offered"] for a in answers)
            elapsed = max(a["elapsed_s"] for a in answers)
            step = {
                "rate": rate, "offered": offered, "ok": ok, "achieved": ok / elapsed,
                "errors": errors, "error_count": sum(errors.values()),
                "p50_ms": (pct(lat, 0.5) or 0) * 1e3 if lat else None,
                "p99_ms": (pct(lat, 0.99) or 0) * 1e3 if lat else None,
                "server_cpu_us_per_conn": server_cpu / max(1, ok) * 1e6,
                "server_cpu_pct": server_cpu / elapsed * 100,
                "client_cpu_pct": sum(a["cpu_s"] for a in answers) / elapsed * 100,
                "launch_lag_max_s": max(a["launch_lag_max_s"] for a in answers),
            }  # fmt: skip
            result["steps"].append(step)
            print(json.dumps({"server": name, "transport": transport, "rep": rep} | step),
                  file=sys.stderr)  # fmt: skip
            if step["error_count"] > 0.1 * offered:
                break
    finally:
        loaders.close()
        server.stop()
    return result


def kept_up(step: dict[str, Any]) -> bool:
    return step["error_count"] == 0 and step["achieved"] >= KEPT_UP * step["rate"]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["server"], r["transport"]), []).append(r)
    for (server, transport), rs in groups.items():
        rates = sorted({s["rate"] for r in rs for s in r["steps"]})
        steps = {}
        for rate in rates:
            got = [s for r in rs for s in r["steps"] if s["rate"] == rate]
            steps[str(rate)] = {
                "runs": len(got),
                "achieved": spread([s["achieved"] for s in got]),
                "errors": spread([s["error_count"] for s in got]),
                "error_kinds": {
                    k: sum(s["errors"].get(k, 0) for s in got)
                    for k in sorted({k for s in got for k in s["errors"]})
                },
                "p50_ms": spread([s["p50_ms"] for s in got]),
                "p99_ms": spread([s["p99_ms"] for s in got]),
                "server_cpu_us_per_conn": spread([s["server_cpu_us_per_conn"] for s in got]),
                "client_late": any(s["launch_lag_max_s"] > LATE for s in got),
            }
        # Per run: the highest rate of its ramp kept up with — no error and ≥ 95 % of the
        # offered rate achieved — with every lower step kept up with too.
        best = []
        for r in rs:
            top = 0
            for s in r["steps"]:
                if not kept_up(s):
                    break
                top = s["rate"]
            best.append(top)
        summary.setdefault(server, {})[transport] = {
            "steps": steps,
            "kept_up_rate": spread(best),
        }
    return summary


def parser() -> argparse.ArgumentParser:
    """``python -m bench storm``'s options (also what ``report`` reproduces a run from)."""
    p = argparse.ArgumentParser(prog="python -m bench storm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--transports", default="ws,sse")
    p.add_argument("--rates", default="100,200,400,800,1600,3200", help="offered /s, ascending")
    p.add_argument("--seconds", type=float, default=3.0, help="per step")
    p.add_argument("--pause", type=float, default=1.0, help="s between steps")
    p.add_argument("--timeout", type=float, default=5.0, help="s to the response head")
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions")
    p.add_argument("--procs", type=int, default=4, help="load processes")
    p.add_argument("--quick", action="store_true", help="smoke: 50 and 100/s for 1 s, 1 rep")
    p.add_argument("--json", type=Path, help=f"results (default {RESULTS}; --quick: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.rates, args.seconds, args.pause, args.reps, args.procs = "50,100", 1.0, 0.2, 1, 2
    if args.json is None and not args.quick:
        args.json = RESULTS
    rates = [int(r) for r in args.rates.split(",")]

    def one(name: str, transport: str, rep: int, tmp: Path) -> dict[str, Any]:
        return one_pass(name, transport, rates, args, tmp, rep)

    result = interleaved(args, available, args.transports.split(","), one, "steps")
    del result["servers"]
    result["summary"] = summarize(result["runs"])
    print(text_table(result))
    write_results(result, args.json)
    return 0


def text_table(result: dict[str, Any]) -> str:
    lines = [
        "storm: highest offered new connections/s kept up with (no error, ≥ 95 % "
        "achieved), median [min–max]"
    ]
    for server, by_t in result["summary"].items():
        for transport, row in by_t.items():
            lines.append(f"{server:<8} {transport:<4} {med_range(row['kept_up_rate'])}/s")
    return "\n".join(lines)


# -- report -----------------------------------------------------------------------------------


def report(results: dict[str, Any], images: Path) -> str:
    from bench.report import command_line, machine_line

    a = results["args"]
    summary = results["summary"] = summarize(results["runs"])  # today's definitions
    servers = [s for s in SERVERS if s in summary]
    out = [
        "```",
        command_line("storm", parser(), a, always=("rates", "seconds", "reps", "procs")),
        "```",
        "",
        machine_line(results),
        "",
    ]
    if results.get("skipped"):
        out += ["Not run: " + "; ".join(f"{k} ({v})" for k, v in results["skipped"].items())
                + ".", ""]  # fmt: skip
    transports = a["transports"].split(",")
    head = "| server | " + " | ".join(f"{t}: highest rate kept up with" for t in transports)
    if "orbited" in summary and len(servers) > 1:
        head += " | " + " | ".join(f"{t}: Orbited / this" for t in transports)
    out += [head + " |", "|" + "---|" * (head.count("|"))]
    for server in servers:
        cells = [server]
        for t in transports:
            row = summary[server].get(t)
            cells.append(med_range(row["kept_up_rate"], unit="/s") if row else "—")
        if "orbited" in summary and len(servers) > 1:
            for t in transports:
                if server == "orbited":
                    cells.append("—")
                    continue
                o = (summary["orbited"].get(t) or {}).get("kept_up_rate") or {}
                s = (summary[server].get(t) or {}).get("kept_up_rate") or {}
                om, sm = o.get("median"), s.get("median")
                cells.append(f"{om / sm:.2f}" if om is not None and sm else "—")
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Per step (medians [min–max] over repetitions; errors summed over them):", ""]
    out += [
        "| server | transport | offered/s | achieved/s | errors (kinds) | p50 ms | p99 ms "
        "| server CPU µs/conn |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for server in servers:
        for t, row in summary[server].items():
            for rate, s in row["steps"].items():
                kinds = ", ".join(f"{k} {n}" for k, n in s["error_kinds"].items())
                errs = str(sum(s["error_kinds"].values())) + (f" ({kinds})" if kinds else "")
                late = " ¹" if s["client_late"] else ""
                out.append(
                    f"| {server} | {t} | {rate}{late} | {med_range(s['achieved'])} | {errs} "
                    f"| {med_range(s['p50_ms'])} | {med_range(s['p99_ms'])} "
                    f"| {med_range(s['server_cpu_us_per_conn'])} |"
                )
    out += [
        "",
        f"Each step offers the rate for {a['seconds']} s, open-loop, from {a['procs']} load "
        "processes; a connection is connect → subscribe → response head → close; every "
        "connection is a new client (Orbited key / channel). `Orbited / this` > 1: Orbited "
        "keeps up with a higher rate than the peer. ¹ the load processes started some "
        f"connections more than {LATE * 1000:.0f} ms late (the clients, on a loaded box, "
        "limited that step as much as the server). A ramp stops after a step with more "
        "than 10 % errors.",
    ]
    errors = [f"- {r['server']} {r['transport']} rep {r['rep']}: {r['error']}"
              for r in results["runs"] if r.get("error")]  # fmt: skip
    if errors:
        out += ["", "Failed passes:", *errors]
    out += previous_table(
        results,
        ["server", "transport", "highest rate kept up with", "before",
         "server CPU µs/conn at that rate", "before"],
        _beside,
    )  # fmt: skip
    img = plot(results, images)
    if img:
        out += ["", f"![connect storm](images/{img})"]
    return "\n".join(out)


def _beside(now: dict[str, Any], before: dict[str, Any]) -> list[list[str]]:
    """Per server and transport: the rate kept up with and its CPU per connection, now and
    in the previous run."""

    def cells(row: dict[str, Any] | None) -> list[str]:
        kept = ((row or {}).get("kept_up_rate") or {}).get("median")
        if kept is None:
            return ["—", "—"]
        step = (row or {})["steps"].get(str(int(kept))) or {}
        return [f"{kept:,.0f}/s".replace(",", " "), med_range(step.get("server_cpu_us_per_conn"))]

    rows = []
    for server in now:
        for transport, row in now[server].items():
            (a, ca), (b, cb) = cells(row), cells((before.get(server) or {}).get(transport))
            rows.append([server, transport, a, b, ca, cb])
    return rows


def plot(results: dict[str, Any], images: Path) -> str | None:
    summary = results["summary"]
    if not summary:
        return None
    plt = pyplot()
    transports = results["args"]["transports"].split(",")
    fig, axes = plt.subplots(1, len(transports), figsize=(4 * len(transports), 3.4),
                             squeeze=False)  # fmt: skip
    for ax, t in zip(axes[0], transports, strict=True):
        top = 0
        for server in SERVERS:
            row = summary.get(server, {}).get(t)
            if not row:
                continue
            rates = [int(r) for r in row["steps"]]
            got = [row["steps"][str(r)]["achieved"]["median"] for r in rates]
            (line,) = ax.plot(rates, got, marker="o", label=server)
            bad = [r for r in rates if row["steps"][str(r)]["errors"]["max"]]
            ax.plot(bad, [row["steps"][str(r)]["achieved"]["median"] for r in bad], "x",
                    color=line.get_color(), markersize=10)  # fmt: skip
            top = max(top, *rates)
        ax.plot([0, top], [0, top], ":", color="grey", label="offered")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{t}: achieved vs offered (× = errors)", fontsize=9)
        ax.set_xlabel("offered new connections/s")
        ax.set_ylabel("achieved /s")
        ax.legend(fontsize=7)
    fig.tight_layout()
    name = "perf-storm-rates.png"
    fig.savefig(images / name, dpi=110)
    plt.close(fig)
    return name


if __name__ == "__main__":
    sys.exit(main())
