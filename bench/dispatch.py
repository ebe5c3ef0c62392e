"""1:1 dispatch side by side: distinct events to individual clients at increasing rates.

    python -m bench dispatch [--servers orbited,raw,nchan,pushpin,orbited2,nchan2]
        [--transports ws,sse,poll] [--clients 10000] [--procs 4] [--pub-procs 1]
        [--rates 2500,5000,...] [--step-seconds 4] [--latency-seconds 5] [--reps 2]
        [--quick] [--json bench/results/dispatch.json] [--images docs/images]
    python -m bench dispatch fanout [...]   one request to 10 000 keys (bench/fanout.py)

Per repetition, per transport, per server (order rotated each repetition, so the servers
are interleaved): start the server (bench/peers.py), connect ``--clients`` subscribers in
``--procs`` processes (bench/subscribers.py), then a publisher process
(bench/publishers.py) offers distinct events, each to one client (round robin), at each
rate of ``--rates`` for ``--step-seconds``; the ladder stops at the first *saturated*
step: delivered/s below 90 % of offered, more than 1 % lost, or p99 latency over 1 s.
Then ``--latency-seconds`` at 50 % of the best delivered rate for p50/p99 latency.

Measured per step: delivered/s (events received in the step's window, from the
subscribers' ¼ s receive-time histogram: the whole buckets from 0.5 s into the step to the
last bucket with deliveries, which is only partly filled and left out), loss (sent − received of
the step's events after a drain), latency p50/p99 (receive − send, ``time.time()`` on this
box), server CPU per delivered event (utime+stime of the server's process tree from the
step's start to the end of its drain / events received in that time), the clients' CPU
(cores) and worst event-loop lag, and the publisher's CPU. RSS per connection = the
tree's RSS after connecting − before.

Results JSON (``--json``; default bench/results/dispatch.json, quick mode writes none):

    {"meta": {"date", "host_cpus", "python", "loadavg_before", "loadavg_after", "argv", "args",
              "wall_s"},
     "machine": {"cpus", "cpu_model", "kernel", "python", "mem_gb", "loadavg_at_start"},
     "runs": [{"server", "transport", "rep", "connected", "connect_failed",
               "rss_per_conn_kb", "steps": [{"phase", "offered_per_s", "sent", "ok",
                   "failed", "received", "lost", "delivered_per_s", "p50_ms", "p99_ms",
                   "server_cpu_us_per_event", "server_cpu_cores", "client_cpu_cores",
                   "client_lag_max_ms", "publisher_cpu_cores", "publisher_behind_s",
                   "saturated"}],
               "saturation_per_s", "saturated", "cpu_us_per_event" (at the best step),
               "latency": {"rate_per_s", "received", "lost", "p50_ms", "p99_ms",
                           "cdf_ms": [101 quantiles]},
               "lost_total", "client_errors": {kind: n}, "closed_by_server",
               "pids" (every process of the run: all are gone when the bench ends)}],
     "summary": {"<transport>": {"<server>": {figure: {"median", "min", "max"}}}},
     "ratios": {"<transport>": {"orbited/<peer>": {figure: ratio of medians}}}}

``report(results, images)`` returns the markdown section for docs/performance.md and draws
the PNGs it links (delivered vs offered per transport; latency CDF at 50 %).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.peers import SERVERS, available, descendants, exit_on_signals, make_server, usage
from bench.report import machine, previous_table, write_results

RESULTS = Path(__file__).resolve().parent / "results" / "dispatch.json"
IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
RAW_ENVELOPE_US = 24.0  # CPython + autobahn broadcasting on one core, a C client on the other
FIGURES = (
    "saturation_per_s",
    "cpu_us_per_event",  # at the best step
    "cpu_us_first_step",  # at the first rate, the same for every server
    "p50_ms",
    "p99_ms",
    "rss_per_conn_kb",
)
WARMUP = 0.5


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Subscribers:
    """``procs`` bench/subscribers.py processes holding the clients."""

    def __init__(self, config: dict, urls: list[str], procs: int, tmp: Path) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        per = -(-len(urls) // procs)
        for i in range(procs):
            chunk = urls[i * per : (i + 1) * per]
            if not chunk:
                continue
            path = tmp / f"subs-{i}.json"
            path.write_text(json.dumps(config | {"urls": chunk}))
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.subscribers", str(path)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            ))  # fmt: skip
        self.connected = self.failed = 0
        self.failed_urls: set[int] = set()
        for i, p in enumerate(self.procs):
            line = p.stdout.readline().split(maxsplit=3)  # type: ignore[union-attr]
            if not line:
                raise RuntimeError("a subscriber process died while connecting")
            self.connected += int(line[1])
            self.failed += int(line[2])
            self.failed_urls |= {i * per + k for k in json.loads(line[3])}

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stats(self, command: str = "stats") -> dict[str, Any]:
        """Every process's report, merged."""
        for p in self.procs:
            p.stdin.write(command + "\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        merged: dict[str, Any] = {"counts": {}, "latencies": {}, "buckets": {}, "errors": {},
                                  "closed": 0, "lag": [], "cpu_s": 0.0}  # fmt: skip
        for p in self.procs:
            r = json.loads(p.stdout.readline())  # type: ignore[union-attr]
            for field in ("counts", "buckets", "errors"):
                for k, v in r[field].items():
                    merged[field][k] = merged[field].get(k, 0) + v
            for k, v in r["latencies"].items():
                merged["latencies"].setdefault(k, []).extend(v)
            merged["closed"] += r["closed"]
            merged["lag"] += r["lag"]
            merged["cpu_s"] += r["cpu_s"]
        return merged

    def stop(self) -> dict[str, Any]:
        result = self.stats("stop")
        for p in self.procs:
            p.wait(15)
        return result

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


class Publishers:
    """``procs`` bench/publishers.py processes, the clients split between them."""

    def __init__(self, spec: dict, clients: list[str], procs: int, tmp: Path) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        for i in range(procs):
            path = tmp / f"pub-{i}.json"
            path.write_text(json.dumps({"server": spec, "clients": clients[i::procs]}))
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.publishers", str(path)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            ))  # fmt: skip

    def run(self, phase: str, rate: float, seconds: float) -> dict[str, Any]:
        for p in self.procs:
            p.stdin.write(f"run {phase} {rate / len(self.procs)} {seconds}\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        results = [json.loads(p.stdout.readline()) for p in self.procs]  # type: ignore[union-attr]
        out = {k: sum(r[k] for r in results) for k in ("offered", "sent", "ok", "failed", "cpu_s")}
        out["seconds"] = max(r["seconds"] for r in results)
        out["behind_s"] = max(r["behind_s"] for r in results)
        return out

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.stdin.write("stop\n")  # type: ignore[union-attr]
                p.stdin.flush()  # type: ignore[union-attr]
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def window_count(buckets: dict[str, int], t0: float, t1: float) -> tuple[int, float]:
    """Events received in the whole ¼ s buckets inside [t0, t1), and their seconds."""
    lo, hi = int(t0 * 4) + 1, int(t1 * 4)
    return sum(buckets.get(str(b), 0) for b in range(lo, hi)), (hi - lo) / 4


def run_one(name: str, transport: str, rep: int, args: argparse.Namespace, tmp: Path) -> dict:
    server = make_server(name, tmp / f"{name}-{transport}-{rep}")
    subs: Subscribers | None = None
    pubs: Publishers | None = None
    with server:
        try:
            clients = [f"c{i}" for i in range(args.clients)]
            before = usage(server.pids())
            rate = min(args.connect_rate, server.connect_rate // args.procs)
            config = {"flavour": server.flavour, "transport": transport, "connect_rate": rate}
            subs = Subscribers(config, [server.url(c, transport) for c in clients],
                               args.procs, tmp)  # fmt: skip
            connected, failed = subs.connected, subs.failed
            time.sleep(1.0)
            after = usage(server.pids())
            # events only for clients that connected: a failed connect is not a loss
            clients = [c for i, c in enumerate(clients) if i not in subs.failed_urls]
            pubs = Publishers(server.publish_spec(transport), clients, args.pub_procs, tmp)
            seen = descendants(server.pids()) + subs.pids() + [p.pid for p in pubs.procs]
            steps: list[dict] = []
            for i, rate in enumerate(args.rates):
                step = measure_step(server, subs, pubs, f"s{i}", rate, args)
                steps.append(step)
                print(f"  {name}/{transport} rep {rep}: {fmt_step(step)}", file=sys.stderr)
                if step["saturated"]:
                    break
            best = max(steps, key=lambda s: s["delivered_per_s"])
            lat_rate = max(1.0, 0.5 * best["delivered_per_s"])
            sent = pubs.run("lat", lat_rate, args.latency_seconds)
            time.sleep(args.drain)
            final = subs.stop()
            subs = None
            lat = final["latencies"].get("lat", [])
            received = final["counts"].get("lat", 0)
            sent_total = sum(s["sent"] for s in steps) + sent["sent"]
            return {
                "server": name,
                "transport": transport,
                "rep": rep,
                "connected": connected,
                "connect_failed": failed,
                "rss_per_conn_kb": (after.rss_kb - before.rss_kb) / max(1, connected),
                "steps": steps,
                "saturation_per_s": best["delivered_per_s"],
                "saturated": any(s["saturated"] for s in steps),
                "cpu_us_per_event": best["server_cpu_us_per_event"],
                "latency": {
                    "rate_per_s": lat_rate,
                    "received": received,
                    "lost": sent["sent"] - received,
                    "p50_ms": percentile(lat, 0.50) * 1e3,
                    "p99_ms": percentile(lat, 0.99) * 1e3,
                    "cdf_ms": [percentile(lat, q / 100) * 1e3 for q in range(101)] if lat else [],
                },
                "p50_ms": percentile(lat, 0.50) * 1e3,
                "p99_ms": percentile(lat, 0.99) * 1e3,
                "lost_total": sent_total - sum(final["counts"].values()),
                "client_errors": final["errors"],
                "closed_by_server": final["closed"],
                "pids": sorted(set(seen + descendants(server.pids()))),
            }
        finally:
            if pubs is not None:
                pubs.stop()
            if subs is not None:
                subs.kill()


def measure_step(server, subs: Subscribers, pubs: Publishers, phase: str,  # noqa: ANN001
                 rate: float, args: argparse.Namespace) -> dict:  # fmt: skip
    pids = server.pids()
    s0, c0, t0 = usage(pids), usage(subs.pids()), time.time()
    sent = pubs.run(phase, rate, args.step_seconds)
    s1, c1, t1 = usage(pids), usage(subs.pids()), time.time()
    time.sleep(args.drain)
    s2, t2 = usage(pids), time.time()
    stats = subs.stats()
    # The window ends when the step's deliveries do (a backlog drains after t1 at the
    # server's own pace): delivered/s is then the server's rate, not a stall's artefact.
    # It ends where the last ¼ s bucket that received anything begins: the deliveries end
    # somewhere inside that bucket, so counting it as a whole 0.25 s understated the rate
    # (by up to 25 % on --quick's 1 s window); every whole bucket before it had deliveries
    # all through.
    last = max(
        (int(k) for k, v in stats["buckets"].items() if v and int(k) < (t1 + args.drain) * 4),
        default=0,
    )
    in_window, window_s = window_count(stats["buckets"], t0 + WARMUP, last / 4)
    # CPU per event: from the step's start to the end of the drain (a server that
    # delivers late does the work then), over every event received in that time.
    all_window, _ = window_count(stats["buckets"], t0, t2)
    received = stats["counts"].get(phase, 0)
    lat = stats["latencies"].get(phase, [])
    lags = [lag for when, lag in stats["lag"] if t0 <= when <= t1]
    step = {
        "phase": phase,
        "offered_per_s": rate,
        "sent": sent["sent"],
        "ok": sent["ok"],
        "failed": sent["failed"],
        "received": received,
        "lost": sent["sent"] - received,
        "delivered_per_s": in_window / window_s if window_s > 0 else 0.0,
        "p50_ms": percentile(lat, 0.50) * 1e3,
        "p99_ms": percentile(lat, 0.99) * 1e3,
        "server_cpu_us_per_event": (s2.cpu_s - s0.cpu_s) / max(1, all_window) * 1e6,
        "server_cpu_cores": (s1.cpu_s - s0.cpu_s) / (t1 - t0),
        "client_cpu_cores": (c1.cpu_s - c0.cpu_s) / (t1 - t0),
        "client_lag_max_ms": max(lags, default=0.0) * 1e3,
        "publisher_cpu_cores": sent["cpu_s"] / sent["seconds"],
        "publisher_behind_s": sent["behind_s"],
    }
    step["saturated"] = bool(
        step["delivered_per_s"] < 0.9 * rate
        or step["lost"] > 0.01 * max(1, step["sent"])
        or step["p99_ms"] > 1000
    )
    return step


def fmt_step(s: dict) -> str:
    return (
        f"offered {s['offered_per_s']:.0f}/s delivered {s['delivered_per_s']:.0f}/s "
        f"lost {s['lost']} p50 {s['p50_ms']:.1f} p99 {s['p99_ms']:.1f} ms "
        f"cpu {s['server_cpu_us_per_event']:.1f} µs/ev server {s['server_cpu_cores']:.2f} "
        f"clients {s['client_cpu_cores']:.2f} pub {s['publisher_cpu_cores']:.2f} cores"
        f"{' SATURATED' if s['saturated'] else ''}"
    )


def summarise(runs: list[dict]) -> tuple[dict, dict]:
    summary: dict[str, dict[str, dict]] = {}
    for r in runs:
        summary.setdefault(r["transport"], {}).setdefault(r["server"], {"runs": 0})
    for transport, servers in summary.items():
        for server, out in servers.items():
            mine = [r for r in runs if r["transport"] == transport and r["server"] == server]
            out["runs"] = len(mine)
            for r in mine:  # every server's first step is at the same offered rate
                r["cpu_us_first_step"] = r["steps"][0]["server_cpu_us_per_event"]
                best = max(r["steps"], key=lambda st: st["delivered_per_s"])
                r["server_cores_best"] = best["server_cpu_cores"]  # < 1: not CPU-bound
                r["client_cores_best"] = best["client_cpu_cores"]
            for f in FIGURES + ("lost_total", "server_cores_best", "client_cores_best"):
                values = [r[f] for r in mine]
                out[f] = {"median": statistics.median(values), "min": min(values),
                          "max": max(values)}  # fmt: skip
    ratios: dict[str, dict[str, dict]] = {}
    pairs = [("orbited", p) for p in ("raw", "nchan", "pushpin")]
    pairs += [("orbited2", "orbited"), ("orbited2", "nchan2"), ("nchan2", "nchan")]
    for transport, servers in summary.items():
        for a, b in pairs:
            if a in servers and b in servers:
                ratios.setdefault(transport, {})[f"{a}/{b}"] = {
                    f: servers[a][f]["median"] / servers[b][f]["median"]
                    if servers[b][f]["median"] else float("nan")
                    for f in FIGURES
                }  # fmt: skip
    return summary, ratios


def table(results: dict) -> str:
    lines = []
    for transport, servers in results["summary"].items():
        lines.append(
            f"\n{transport}: median [min–max] of {max(s['runs'] for s in servers.values())} rep(s)"
        )
        lines.append(f"{'server':<10}{'delivered/s':>26}{'µs CPU/ev':>12}{'p50 ms':>9}"
                     f"{'p99 ms':>9}{'KB/conn':>9}{'lost':>8}")  # fmt: skip
        for server, s in servers.items():
            sat = s["saturation_per_s"]
            lines.append(
                f"{server:<10}{sat['median']:>10.0f} [{sat['min']:.0f}–{sat['max']:.0f}]".ljust(36)
                + f"{s['cpu_us_per_event']['median']:>12.1f}{s['p50_ms']['median']:>9.1f}"
                f"{s['p99_ms']['median']:>9.1f}{s['rss_per_conn_kb']['median']:>9.1f}"
                f"{s['lost_total']['median']:>8.0f}"
            )
        for pair, r in results["ratios"].get(transport, {}).items():
            lines.append(f"  {pair}: delivered/s {r['saturation_per_s']:.2f}, CPU/event "
                         f"{r['cpu_us_per_event']:.2f}, p99 {r['p99_ms']:.2f}")  # fmt: skip
    return "\n".join(lines)


def fmt_range(f: dict, digits: int = 0) -> str:
    return f"{f['median']:,.{digits}f} [{f['min']:,.{digits}f}–{f['max']:,.{digits}f}]".replace(
        ",", " "
    )


def reproduce(argv: list[str]) -> list[str]:
    """The run's arguments without where it wrote (the default places are the published)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--json", "--images", "--workdir"):
            skip = True
        elif not arg.startswith(("--json=", "--images=", "--workdir=")):
            out.append(arg)
    return out


NOTES = """
Reading these figures:
- **The box, not a core.** Server, 4 subscriber processes and the publisher share 2 cores
  with whatever else runs (the load average is given above). The "server cores" column
  shows what each server got at its best step: a server under one core there was held
  by the box, so *delivered/s at saturation* is the machine's throughput under that
  load, not a server's per-core ceiling, and it counts what the subscribers and the
  publisher spend per event too (the SP publisher sends one event per request in
  batches; Nchan's, one `POST` per event and one response to read). **Server CPU per
  delivered event** (its process tree's utime+stime / events received) does not depend
  on that share and is the figure to compare; it is also given at the first rate, which
  is the same for every server. The subscribers' and publisher's own CPU and event-loop
  lag are in the JSON per step.
- **Orbited vs raw** (when `raw` runs: bench/raw_server.py, the node's own socket path,
  its accept loop, 101, write-through and SP REP server, with none of Orbited's work) is
  Orbited's own work per event (validation, mailbox, sequence number, dedup memory, a
  per-recipient reply); one recipient per request makes the per-request part count
  fully.
- **The top of the ladder is not a ceiling.** A server that delivers ≥ 90 % of the highest
  offered rate is not saturated: its "delivered/s at saturation" is then that step's
  rate, and its real ceiling is above it (the publisher and the subscribers share the
  box with it).
- **Long-poll** answers each event with a whole HTTP response and the client asks again:
  per delivery a request is read, its token checked (verified tokens are remembered;
  expiry is checked each time), the mailbox attached and detached. It is the fallback
  transport. Nchan's long-poll is C.
- **Pushpin** delivers in bursts: one subscriber receiving 100 events/s sees them 30–250
  ms late in batches, and 10 000 subscribers saw p50 in seconds at the lowest rate, so
  its ladder stops at the first step; zurl answered some connects with 502 even at
  400/s (those clients got no events; not counted as lost). Its CPU is four processes'
  (condure, zurl, proxy, handler), not the GRIP backend's.
- **Two nodes vs one** (`orbited2`) on this 2-core box can only show the share of CPU a
  second process wins from the load generator, not 2×; `nchan2` (2 workers) likewise.
"""


def _beside(now: dict, before: dict) -> list[list[str]]:
    """Per transport and server of this run: the main figures, then the previous run's."""

    def fig(s: dict | None, name: str, digits: int) -> str:
        m = ((s or {}).get(name) or {}).get("median")
        return "—" if m is None else f"{m:,.{digits}f}".replace(",", " ")

    rows = []
    for transport, servers in now.items():
        for server, s in servers.items():
            b = before.get(transport, {}).get(server)
            rows.append([transport, server,
                         fig(s, "cpu_us_per_event", 1), fig(b, "cpu_us_per_event", 1),
                         fig(s, "saturation_per_s", 0), fig(b, "saturation_per_s", 0),
                         fig(s, "rss_per_conn_kb", 1), fig(b, "rss_per_conn_kb", 1)])  # fmt: skip
    return rows


def report(results: dict, images: Path) -> str:
    """The "1:1 dispatch" markdown section of docs/performance.md; draws the PNGs it
    links into ``images`` (docs/images/perf-dispatch-*.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images.mkdir(parents=True, exist_ok=True)
    meta, runs = results["meta"], results["runs"]
    summary, ratios = summarise(runs)  # from the runs: figures added since are there too
    results = results | {"summary": summary, "ratios": ratios}
    a = meta["args"]
    out = [
        "## 1:1 dispatch: distinct events to individual clients, side by side",
        "",
        "```",
        ".venv/bin/python -m bench dispatch " + " ".join(reproduce(meta.get("argv", []))),
        "```",
        "",
        f"{a['clients']} clients in {a['procs']} subscriber processes; {a['pub_procs']} "
        f"publisher process(es) offer distinct events, each to one client, at rising rates "
        f"({', '.join(str(int(r)) for r in a['rates'])}/s, {a['step_seconds']} s each) until "
        "delivered/s falls below 90 % of offered, more than 1 % is lost or p99 passes 1 s; "
        f"then {a['latency_seconds']} s at 50 % of the best delivered rate for latency. "
        f"Medians [min–max] of {a['reps']} interleaved repetitions, {meta['date']}, "
        f"{meta['host_cpus']} cores shared by server, clients and publisher, load average "
        f"before {meta['loadavg_before']:.2f}. Method and every non-default peer setting: "
        'bench/README.md, "dispatch".',
    ]
    for transport, servers in results["summary"].items():
        out += ["", f"### {transport}", "",
                "| server | delivered/s at saturation | server CPU µs / event at the best "
                f"step | at {int(a['rates'][0])}/s | p50 ms at 50 % | p99 ms at 50 % | "
                "RSS KB / connection | lost | server / client cores at the best step |",
                "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for server, s in servers.items():
            out.append(
                f"| {server} | {fmt_range(s['saturation_per_s'])} | "
                f"{fmt_range(s['cpu_us_per_event'], 1)} | "
                f"{fmt_range(s['cpu_us_first_step'], 1)} | {fmt_range(s['p50_ms'], 1)} | "
                f"{fmt_range(s['p99_ms'], 1)} | {s['rss_per_conn_kb']['median']:.1f} | "
                f"{s['lost_total']['median']:.0f} | {s['server_cores_best']['median']:.2f} / "
                f"{s['client_cores_best']['median']:.2f} |"
            )
        ratios = results["ratios"].get(transport, {})
        if ratios:
            out += ["", "| ratio (medians) | delivered/s | CPU / event (best step) | "
                    f"CPU / event at {int(a['rates'][0])}/s | p99 | RSS / conn |",
                    "|---|---|---|---|---|---|"]  # fmt: skip
            for pair, r in ratios.items():
                out.append(f"| {pair} | {r['saturation_per_s']:.2f} | "
                           f"{r['cpu_us_per_event']:.2f} | {r['cpu_us_first_step']:.2f} | "
                           f"{r['p99_ms']:.2f} | {r['rss_per_conn_kb']:.2f} |")  # fmt: skip
    ws = results["summary"].get("ws", {})
    if "orbited" in ws:
        o = ws["orbited"]["cpu_us_per_event"]["median"]
        out += ["", f"Orbited's server CPU per delivered WebSocket event: {o:.1f} µs, "
                f"{o / RAW_ENVELOPE_US:.2f}× the reference envelope ({RAW_ENVELOPE_US:.0f} µs, "
                "CPython + autobahn broadcasting on one core, a C client on the other, "
                "measured on a 2-vCPU Debian 12 machine like this one)"
                + (f" and {o / ws['raw']['cpu_us_per_event']['median']:.2f}× raw in this run."
                   if "raw" in ws else ".")]  # fmt: skip
    out += previous_table(
        results,
        ["transport", "server", "server CPU µs / event", "before", "delivered/s at saturation",
         "before", "RSS KB / connection", "before"],
        _beside,
    )  # fmt: skip
    out += ["", NOTES.strip()]
    transports = list(results["summary"])

    def panels(name: str, title: str, xlabel: str, ylabel: str, draw: Any) -> None:
        """One panel per transport, one colour per server, every repetition a line."""
        fig, axes = plt.subplots(1, len(transports), figsize=(5 * len(transports), 4),
                                 squeeze=False)  # fmt: skip
        for ax, transport in zip(axes[0], transports, strict=True):
            for server in results["summary"][transport]:
                mine = [r for r in runs if r["server"] == server and r["transport"] == transport]
                for k, r in enumerate(mine):
                    draw(ax, r, {"color": f"C{list(SERVERS).index(server)}",
                                 "label": server if k == 0 else None})  # fmt: skip
            ax.set_title(f"{transport}: {title}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if name == "rates":
                top = max((s["offered_per_s"] for r in runs for s in r["steps"]), default=1)
                ax.plot([0, top], [0, top], "k:", lw=0.8, label="offered")
            else:
                ax.set_xscale("log")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(images / f"perf-dispatch-{name}.png", dpi=100)
        plt.close(fig)

    panels("rates", "delivered vs offered", "offered events/s", "delivered events/s",
           lambda ax, r, style: ax.plot([s["offered_per_s"] for s in r["steps"]],
                                        [s["delivered_per_s"] for s in r["steps"]],
                                        marker="o", alpha=0.8, **style))  # fmt: skip
    panels("latency", "latency at 50 % of saturation", "ms (log)", "fraction of events",
           lambda ax, r, style: r["latency"]["cdf_ms"] and ax.plot(
               r["latency"]["cdf_ms"], [q / 100 for q in range(len(r["latency"]["cdf_ms"]))],
               **style))  # fmt: skip
    out += ["", "![delivered vs offered](images/perf-dispatch-rates.png)", "",
            "![latency CDF at 50 % of saturation](images/perf-dispatch-latency.png)"]  # fmt: skip
    return "\n".join(out) + "\n"


QUICK = {"clients": 200, "procs": 2, "rates": [300.0, 600.0], "step_seconds": 1.5,
         "latency_seconds": 1.0, "drain": 0.5, "reps": 1}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fanout"]:  # one request to 10 000 keys (bench/fanout.py)
        from bench import fanout

        return fanout.main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench dispatch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--servers", default="orbited,raw,nchan,pushpin,orbited2,nchan2")
    p.add_argument("--transports", default="ws,sse,poll")
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--procs", type=int, default=4, help="subscriber processes")
    p.add_argument("--pub-procs", type=int, default=1, help="publisher processes")
    p.add_argument("--connect-rate", type=int, default=1000, help="per subscriber process")
    p.add_argument(
        "--rates",
        default="2500,5000,10000,15000,20000,30000,40000,50000,60000,70000,80000,90000,100000",
    )
    p.add_argument("--step-seconds", type=float, default=4.0)
    p.add_argument("--latency-seconds", type=float, default=5.0)
    p.add_argument("--drain", type=float, default=1.0, help="wait after each step")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke: " + json.dumps(QUICK))
    p.add_argument("--json", type=Path, help=f"results (default {RESULTS}; none in --quick)")
    p.add_argument("--images", type=Path, help="also draw the report's PNGs here")
    p.add_argument("--workdir", type=Path, help="parent of the temporary directory")
    p.add_argument("--pair-transports", default="ws",
                   help="transports the two-process servers (orbited2, nchan2) run on")  # fmt: skip
    args = p.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",")]
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    elif args.json is None:
        args.json = RESULTS
    servers = [s for s in args.servers.split(",") if s]
    for s in servers:
        if s not in SERVERS:
            p.error(f"unknown server {s}")
    missing = [s for s in servers if not available(s)]
    for s in missing:
        print(f"note: {s} is not installed; skipped", file=sys.stderr)
    servers = [s for s in servers if s not in missing]
    transports = [t for t in args.transports.split(",") if t]
    exit_on_signals()
    started = time.monotonic()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_before": os.getloadavg()[0],
        "argv": list(argv if argv is not None else sys.argv[1:]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    facts = machine()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-", dir=args.workdir) as tmp:
        for rep in range(args.reps):
            for transport in transports:
                here = [
                    s for s in servers if transport in SERVERS[s].transports
                    and (not s.endswith("2") or transport in args.pair_transports.split(","))
                ]  # fmt: skip
                shift = rep % max(1, len(here))
                for name in here[shift:] + here[:shift]:  # rotate: interleaved repetitions
                    runs.append(run_one(name, transport, rep, args, Path(tmp)))
    meta["loadavg_after"] = os.getloadavg()[0]
    meta["wall_s"] = round(time.monotonic() - started, 1)
    summary, ratios = summarise(runs)
    results = {"meta": meta, "machine": facts, "runs": runs, "summary": summary, "ratios": ratios}
    print(table(results))
    print(f"\nload average before {meta['loadavg_before']}, after {meta['loadavg_after']}; "
          f"wall {meta['wall_s']} s")  # fmt: skip
    write_results(results, args.json)
    if args.images:
        report(results, args.images)
    return 0
