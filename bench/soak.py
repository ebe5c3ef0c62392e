"""Soak test: hours of browser churn through HaloD, sampling every server's memory.

Owns ``python -m bench soak`` (bench/README.md, "soak"). It starts, for real: HaloD with
its data plane (the built-in proxy by default, so HaloD's proxying is soaked too; or
nftables in a network namespace of its own), 2 active ``orbited node``s + 1 spare, two
web apps (bench/sender.py: one sending a round to most keys in one multi-recipient
request per route, plain mode; one sending per-key requests in the acknowledged mode to
the other keys) and ``--clients`` simulated browsers (bench/browsers.py in churn mode:
each page lives a random time, then switches transport resuming with ``last``, goes away
long enough for its mailbox to expire now and then, or is replaced for one life by a
brand-new key) in ``--browser-procs`` processes.

Every ``--sample`` seconds it records, per process, RSS, open fds and threads; for nodes
also /orbited/health's gauges (mailboxes, queued events, dedup entries, ...) and stats,
for HaloD its /metrics (connections through the route ports). At the end, per server
process: RSS at the end of ``--warmup-minutes``, at the end, max, and the growth per hour
from a least-squares slope over the post-warm-up samples (MB/h and % of the warm-up RSS
per hour), plus churn figures and bench/chaos_report.py's lost/duplicated. JSON to
``--json`` (bench/results/soak.json for a full run) and a table on stdout. Everything it
started is stopped at the end, on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from bench.chaos_report import analyse
from bench.dataplane import Env, HaloD, netns_possible, wait_ready
from bench.dataplane_failover import Probe
from bench.report import machine
from orbited.core.routes import DEFAULT_ROUTES

RESULTS = Path(__file__).parent / "results" / "soak.json"
ROUTES = DEFAULT_ROUTES
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- sampling -------------------------------------------------------------------------------


def proc_sample(pid: int) -> dict[str, Any] | None:
    """RSS (bytes), open fds and threads of ``pid``; None once it is gone."""
    try:
        rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except (OSError, IndexError, ValueError):
        return None
    return {"rss": rss_pages * PAGE, "fds": fds, "threads": threads} | rss_split(pid)


def rss_split(pid: int) -> dict[str, int]:
    """Resident bytes in the brk heap (glibc malloc's main arena) and in anonymous maps
    (pymalloc's arenas, large mallocs): where a growth is, when there is one."""
    heap = anon = 0
    name = ""
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    parts = line.split()
                    name = parts[5] if len(parts) > 5 else ""
                elif line.startswith("Rss:"):
                    kb = int(line.split()[1])
                    if name == "[heap]":
                        heap += kb
                    elif name == "":
                        anon += kb
    except (OSError, ValueError, IndexError):
        return {}
    return {"rss_heap": heap * 1024, "rss_anon": anon * 1024}


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


_METRIC = re.compile(r"^(\w+)(\{[^}]*\})? ([-0-9.e+]+)$", re.MULTILINE)


def metric_sums(text: str) -> dict[str, float]:
    """Prometheus text → {name: sum over its label sets} (enough to watch for growth)."""
    sums: dict[str, float] = Counter()
    for name, _labels, value in _METRIC.findall(text):
        sums[name] += float(value)
    return dict(sums)


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) in value per hour; None under 3 points."""
    if len(points) < 3:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in points) / var * 3600


def growth(samples: list[dict[str, Any]], name: str, warmup: float) -> dict[str, Any]:
    """RSS figures of one process from the samples (t = seconds since the load started)."""
    series = [(s["t"], s["procs"][name]["rss"]) for s in samples if s["procs"].get(name)]
    after = [(t, v) for t, v in series if t >= warmup]
    if not series:
        return {"samples": 0}
    at_warmup = after[0][1] if after else None
    slope = slope_per_hour(after)
    fds = [(s["t"], s["procs"][name]["fds"]) for s in samples if s["procs"].get(name)]
    return {
        "samples": len(series),
        "rss_start_mb": series[0][1] / 2**20,
        "rss_warmup_mb": None if at_warmup is None else at_warmup / 2**20,
        "rss_end_mb": series[-1][1] / 2**20,
        "rss_max_mb": max(v for _, v in series) / 2**20,
        "growth_mb_per_h": None if slope is None else slope / 2**20,
        "growth_pct_per_h": None if slope is None or not at_warmup else 100 * slope / at_warmup,
        "end_vs_warmup_pct": None if not at_warmup else 100 * (series[-1][1] / at_warmup - 1),
        **{
            f"{part}_growth_mb_per_h": (lambda sl: None if sl is None else sl / 2**20)(
                slope_per_hour(
                    [
                        (s["t"], s["procs"][name][f"rss_{part}"])
                        for s in samples
                        if s["t"] >= warmup
                        and (s["procs"].get(name) or {}).get(f"rss_{part}") is not None
                    ]
                )
            )
            for part in ("heap", "anon")
        },  # fmt: skip
        "fds_warmup": next((v for t, v in fds if t >= warmup), None),
        "fds_end": fds[-1][1],
        "fds_max": max(v for _, v in fds),
    }


# -- the run ----------------------------------------------------------------------------------


class Soak:
    def __init__(self, env: Env, args: argparse.Namespace) -> None:
        self.env, self.args = env, args
        self.probe = Probe(env)
        self.samples: list[dict[str, Any]] = []
        self.pids: dict[str, int] = {}  # process name → pid, for sampling
        self.kinds: dict[str, str] = {}  # name → "node" / "halod" / "load"
        self.nodes: dict[str, dict[str, Any]] = {}  # name → ready info
        self.died: list[str] = []

    def status(self) -> dict[str, Any]:
        return self.probe.call(get_json, f"http://{self.halod.status}/status")

    def start_cluster(self) -> None:
        env, args = self.env, self.args
        self.secret = env.tmp / "secret"
        self.secret.write_bytes(os.urandom(48).hex().encode())
        # Failure detection lenient (--missed s of silence): this is no failover test, and
        # a busy shared box must not fail healthy nodes (a false failover is still counted).
        missed = str(args.missed)
        self.halod = HaloD(env, args.dataplane, ROUTES, "soak", "--spares", "1",
                           "--missed-heartbeats", missed, "--grace", missed)  # fmt: skip
        self.pids["halod"], self.kinds["halod"] = self.halod.pid, "halod"
        for i, name in enumerate(("n1", "n2", "n3")):
            host = f"127.0.0.{i + 2}"
            ready = env.tmp / f"{name}.ready"
            proc = env.py(
                "orbited.cli", "node", "--name", name, "--halod", self.halod.control,
                "--http", f"{host}:0", "--sp", f"tcp://{host}:0",
                "--secret-file", str(self.secret), "--no-create-secret",
                "--ready-file", str(ready), "--log-level", "warn", *args.node_flags,
                log=f"{name}.log",
            )  # fmt: skip
            self.nodes[name] = wait_ready(env, proc, ready, f"{name}.log")
            self.pids[name], self.kinds[name] = proc.pid, "node"
            deadline = time.monotonic() + 20
            while not any(n["name"] == name and n["connected"] for n in self.status()["nodes"]):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not register:\n{env.log('halod-soak.log')}")
                time.sleep(0.05)
        deadline = time.monotonic() + 30
        want = [("active", ROUTES // 2), ("active", ROUTES // 2), ("spare", 0)]
        while sorted((n["state"], len(n["routes"])) for n in self.status()["nodes"]) != want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster did not settle: {self.status()['nodes']}")
            time.sleep(0.1)

    def start_load(self) -> None:
        env, args = self.env, self.args
        prefix = f"k{uuid.uuid4().hex[:6]}-"  # fresh keys per run
        base = ["--secret-file", str(self.secret), "--routes", str(ROUTES), "--prefix", prefix]
        per = -(-args.clients // args.browser_procs)
        self.browser_reports, ready_files = [], []
        self.browser_procs = []
        for i in range(args.browser_procs):
            offset, count = i * per, min(per, args.clients - i * per)
            if count <= 0:
                break
            ready, report = env.tmp / f"browsers-{i}.ready", env.tmp / f"browsers-{i}.json"
            ready_files.append(ready)
            self.browser_reports.append(report)
            proc = env.py(
                "bench.browsers", *base,
                "--halod-browser-base", f"{self.halod.host}:{self.halod.browser_base}",
                "--offset", str(offset), "--count", str(count),
                "--transports", "ws=1,poll=1,sse=1,iframe=1", "--churn", args.churn,
                "--ready-file", str(ready), "--report", str(report),
                "--ramp", str(args.ramp / args.browser_procs),
                "--progress", str(args.sample), log=f"browsers-{i}.log",
            )  # fmt: skip
            self.pids[f"browsers-{i}"], self.kinds[f"browsers-{i}"] = proc.pid, "load"
            self.browser_procs.append(proc)
        deadline = time.monotonic() + 60 + args.clients / 100
        while not all(f.exists() for f in ready_files):
            dead = [n for n, pid in self.pids.items() if proc_sample(pid) is None]
            if dead:
                logs = "\n".join(env.log(f"browsers-{i}.log") for i in range(len(ready_files)))
                raise RuntimeError(f"browsers died (dead: {dead}):\n{logs}")
            if time.monotonic() > deadline:  # a busy box: go on, the samples will show it
                print("soak: not every browser had a hello; starting the load anyway",
                      file=sys.stderr, flush=True)  # fmt: skip
                break
            time.sleep(0.2)
        self.ready_after = time.monotonic() - (deadline - 60 - args.clients / 100)
        acked = max(1, round(args.clients * args.ack_fraction)) if args.ack_fraction > 0 else 0
        sp = ["--halod-sp-base", f"{self.halod.host}:{self.halod.sp_base}"]
        self.senders: dict[str, Any] = {}
        plans = [("sender-plain", acked, args.clients - acked,
                  ["--interval", str(args.interval)])]  # fmt: skip
        if acked:
            plans.append(("sender-acked", 0, acked, ["--interval", str(args.ack_interval),
                          "--per-key", "--ack-timeout", str(args.ack_timeout)]))  # fmt: skip
        for name, offset, count, extra in plans:
            report = env.tmp / f"{name}.json"
            proc = env.py(
                "bench.sender", *sp, "--routes", str(ROUTES), "--prefix", prefix,
                "--offset", str(offset), "--count", str(count), *extra,
                "--progress", str(args.sample), "--drain", "10", "--report", str(report),
                log=f"{name}.log",
            )  # fmt: skip
            self.pids[name], self.kinds[name] = proc.pid, "load"
            self.senders[name] = (proc, report)

    def sample(self, t: float) -> dict[str, Any]:
        procs = {name: proc_sample(pid) for name, pid in self.pids.items()}
        health: dict[str, Any] = {}
        for name, info in self.nodes.items():
            try:
                health[name] = self.probe.call(get_json, f"http://{info['http']}/orbited/health")
            except Exception as e:  # noqa: BLE001 - a busy node: recorded, not fatal
                health[name] = {"error": str(e)[:100]}
        try:
            metrics = metric_sums(self.probe.call(get_text, f"http://{self.halod.status}/metrics"))
        except Exception as e:  # noqa: BLE001
            metrics = {"error": str(e)[:100]}
        s = {"t": round(t, 2), "wall": time.time(), "procs": procs, "health": health,
             "halod": metrics}  # fmt: skip
        self.samples.append(s)
        return s

    def run(self) -> dict[str, Any]:
        args = self.args
        self.start_cluster()
        self.start_load()
        t0 = time.monotonic()
        total, warmup = args.minutes * 60, args.warmup_minutes * 60
        next_at = t0
        while (t := time.monotonic() - t0) < total:
            s = self.sample(t)
            gone = [n for n, v in s["procs"].items() if v is None]
            if gone:
                self.died = gone
                print(f"soak: died: {gone}", file=sys.stderr)
                break
            line = " ".join(f"{n}={v['rss'] / 2**20:.1f}MB" for n, v in s["procs"].items()
                            if self.kinds[n] != "load")  # fmt: skip
            mb = {n: h.get("gauges", {}).get("mailboxes") for n, h in s["health"].items()}
            print(f"soak t={t:.0f}s {line} mailboxes={mb}", flush=True)
            # every S s; after a stall (a busy box) the next one S s later, not a burst
            next_at = max(next_at + args.sample, time.monotonic())
            time.sleep(max(0.0, next_at - time.monotonic()))
        return self.finish(warmup, time.monotonic() - t0)

    def finish(self, warmup: float, elapsed: float) -> dict[str, Any]:
        env = self.env
        sender_reports = {}
        for proc, _ in self.senders.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, (proc, report) in self.senders.items():
            with contextlib.suppress(Exception):
                proc.wait(40)
            with contextlib.suppress(Exception):
                sender_reports[name] = json.loads(report.read_text())
        time.sleep(1.0)  # the last events reach the browsers
        for p in self.browser_procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.browser_procs:
            with contextlib.suppress(Exception):
                p.wait(60)
        browser_reports = []
        for f in self.browser_reports:
            with contextlib.suppress(Exception):
                browser_reports.append(json.loads(f.read_text()))
        return self.result(warmup, elapsed, sender_reports, browser_reports, env)

    def result(self, warmup: float, elapsed: float, senders: dict[str, Any],
               browsers: list[dict[str, Any]], env: Env) -> dict[str, Any]:  # fmt: skip
        args = self.args
        servers = [n for n, k in self.kinds.items() if k != "load"]
        per_proc = {n: growth(self.samples, n, warmup) | {"kind": self.kinds[n]} for n in servers}
        load = {n: growth(self.samples, n, warmup) for n, k in self.kinds.items() if k == "load"}
        clients = [c for r in browsers for c in r["clients"]]
        churn: Counter[str] = Counter()
        sessions: Counter[str] = Counter()
        fresh_sessions: Counter[str] = Counter()
        for r in browsers:
            c = r.get("churn") or {}
            sessions.update(c.get("sessions", {}))
            fresh_sessions.update(c.get("fresh_sessions", {}))
            churn.update(c.get("actions", {}))
            for f in ("resumed", "connects", "fresh_keys", "fresh_connects", "fresh_fatal"):
                churn[f] += c.get(f, 0)
        accepted: dict[str, Any] = {}
        statuses: Counter[str] = Counter()
        for rep in senders.values():
            accepted |= {k: v["accepted"] for k, v in rep["keys"].items()}
            statuses.update(rep["status_counts"])
        analysis = analyse(accepted, clients) if accepted else {"summary": {}, "clients": {}}
        summary = analysis["summary"]
        # Never reset and there when the run ended (not away, not on a fresh key's life:
        # their last rounds wait in their mailbox): every event must have reached them.
        no_reset = [c for c in clients if not c["resets"] and not c.get("absent_at_end")]
        lost_no_reset = sum(analysis["clients"].get(c["id"], {}).get("lost_count", 0)
                            for c in no_reset)  # fmt: skip
        gauges_end = {n: h.get("gauges") for n, h in (self.samples[-1]["health"] if self.samples
                      else {}).items()}  # fmt: skip
        gauges_warm = next((s["health"] for s in self.samples if s["t"] >= warmup), {})
        return {
            "scenario": "soak",
            "command": "python -m bench soak " + " ".join(args.argv),
            "settings": {k: v for k, v in vars(args).items() if k not in ("argv", "node_flags")}
            | {"node_flags": args.node_flags, "routes": ROUTES},
            "machine": machine(),
            "elapsed_s": elapsed,
            "browsers_ready_after_s": self.ready_after,
            "warmup_s": warmup,
            "died": self.died,
            "halod_failovers": max(
                (s["halod"].get("halod_failovers_total", 0) for s in self.samples), default=None
            ),  # fmt: skip
            "pids": self.pids,
            "processes": per_proc,
            "load_processes": load,
            "gauges_at_warmup": {n: h.get("gauges") for n, h in gauges_warm.items()},
            "gauges_at_end": gauges_end,
            "churn": {
                "sessions_by_transport": dict(sessions),
                "fresh_key_sessions_by_transport": dict(fresh_sessions),
                **churn,
            },
            "events": {
                "sender_statuses": dict(statuses),
                "rounds": {n: r["rounds"] for n, r in senders.items()},
                "accepted": summary.get("accepted"),
                "received": summary.get("received"),
                "lost": summary.get("lost"),
                "lost_by_clients_without_reset": lost_no_reset,
                "clients_absent_at_end": sum(bool(c.get("absent_at_end")) for c in clients),
                "clients_with_reset": len(clients) - len(no_reset),
                "duplicated": summary.get("duplicated"),
                "resets": summary.get("resets"),
                "gaps": summary.get("gaps"),
                "missing_clients": len(summary.get("missing_clients", [])),
            },
            "browser_loop_lag_max_s": max(
                ((r.get("loop_lag") or {}).get("max") or 0 for r in browsers), default=None
            ),  # fmt: skip
            "samples": self.samples,
        }


# -- output -------------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    def f(v: Any, spec: str = ".1f") -> str:
        return "—" if v is None else format(v, spec)

    lines = [
        f"soak: {result['elapsed_s'] / 60:.1f} min, warm-up {result['warmup_s'] / 60:.1f} min, "
        f"{result['settings']['clients']} clients, data plane {result['settings']['dataplane']}",
        f"{'process':<10} {'RSS warm-up':>11} {'end':>8} {'max':>8} {'MB/h':>7} {'%/h':>6} "
        f"{'fds w→end':>10}",
    ]
    for name, g in result["processes"].items():
        lines.append(
            f"{name:<10} {f(g.get('rss_warmup_mb')):>9}MB {f(g.get('rss_end_mb')):>6}MB "
            f"{f(g.get('rss_max_mb')):>6}MB {f(g.get('growth_mb_per_h'), '+.2f'):>7} "
            f"{f(g.get('growth_pct_per_h'), '+.2f'):>6} "
            f"{f(g.get('fds_warmup'), 'd'):>4}→{f(g.get('fds_end'), 'd')}"
        )
    c, e = result["churn"], result["events"]
    lines.append(
        f"churn: sessions {c['sessions_by_transport']}, resumed {c.get('resumed', 0)}, "
        f"switch/away/new {c.get('switch', 0)}/{c.get('away', 0)}/{c.get('new', 0)}, "
        f"fresh keys {c.get('fresh_keys', 0)}"
    )
    lines.append(
        f"events: accepted {e['accepted']}, received {e['received']}, lost {e['lost']} "
        f"({e['lost_by_clients_without_reset']} by clients never reset and there at the "
        f"end), duplicated "
        f"{e['duplicated']}, resets {e['resets']}"
    )
    if result["halod_failovers"]:
        lines.append(f"HaloD failovers during the run: {result['halod_failovers']} (a busy box?)")
    if result["died"]:
        lines.append(f"DIED: {result['died']}")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """The table for docs/performance.md: per server process, RSS and its growth."""

    def f(v: Any, spec: str = ".1f") -> str:
        return "—" if v is None else format(v, spec)

    st = result["settings"]
    rows = [
        f"`{result['command']}` — {result['elapsed_s'] / 60:.0f} min, warm-up "
        f"{result['warmup_s'] / 60:.0f} min, {st['clients']} browsers, data plane "
        f"{st['dataplane']}",
        "",
        "| process | RSS after warm-up | RSS at end | max | growth/h (least squares) "
        "| growth/h % of warm-up | end vs warm-up | fds warm-up → end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, g in result["processes"].items():
        rows.append(
            f"| {name} | {f(g.get('rss_warmup_mb'))} MB | {f(g.get('rss_end_mb'))} MB "
            f"| {f(g.get('rss_max_mb'))} MB | {f(g.get('growth_mb_per_h'), '+.2f')} MB "
            f"| {f(g.get('growth_pct_per_h'), '+.1f')} % "
            f"| {f(g.get('end_vs_warmup_pct'), '+.1f')} % "
            f"| {f(g.get('fds_warmup'), 'd')} → {f(g.get('fds_end'), 'd')} |"
        )
    return "\n".join(rows)


def report(result: dict[str, Any], images: Path) -> str:
    """docs/performance.md's soak section (bench/report.py): the RSS table, churn and event
    figures, and RSS over time per server process (images/perf-soak-rss.png)."""
    from bench.report import machine_line, pyplot

    churn, ev = result["churn"], result["events"]
    by_t = ", ".join(f"{t} {n:,}" for t, n in sorted(churn["sessions_by_transport"].items()))
    statuses = ", ".join(f"{k} {v:,}" for k, v in ev["sender_statuses"].items())
    out = [
        machine_line(result),
        "",
        markdown(result),
        "",
        f"Churn: {churn['connects']:,} browser sessions ({by_t}); {churn['resumed']:,} "
        f"resumed with `last`, {churn['switch']:,} transport switches, {churn['away']:,} "
        f"away past the linger, {churn['new']:,} brand-new keys. Web-app replies: "
        f"{statuses}. Duplicated events {ev['duplicated']:,}, gaps {ev['gaps']:,}, HaloD "
        f"failovers {result['halod_failovers']:g}, processes died: "
        f"{', '.join(result['died']) or 'none'}.",
        "",
        "![RSS over the soak](images/perf-soak-rss.png)",
    ]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    servers = [n for n in result["processes"]]
    for name in servers:
        points = [(x["t"] / 60, x["procs"][name]["rss"] / 2**20)
                  for x in result["samples"] if name in x["procs"]]  # fmt: skip
        ax.plot([t for t, _ in points], [r for _, r in points], label=name)
    ax.axvline(result["warmup_s"] / 60, color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS, MB")
    ax.set_ylim(bottom=0)
    ax.set_title("Soak: RSS of HaloD and the nodes under churn")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(images / "perf-soak-rss.png", dpi=100)
    plt.close(fig)
    return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--minutes", type=float, default=60.0, help="load time, warm-up included")
    p.add_argument("--clients", type=int, default=3000)
    p.add_argument("--browser-procs", type=int, default=6)
    p.add_argument("--warmup-minutes", type=float, default=10.0)
    p.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--dataplane", choices=("proxy", "nftables"), default="proxy")
    p.add_argument("--interval", type=float, default=1000, help="ms between plain rounds")
    p.add_argument("--ack-fraction", type=float, default=0.05,
                   help="share of keys the acknowledged-mode web app sends to")  # fmt: skip
    p.add_argument("--ack-interval", type=float, default=2000, help="ms between acked rounds")
    p.add_argument("--ack-timeout", type=float, default=5.0)
    p.add_argument("--churn", default="life=45,switch=2,away=1,new=1,away_min=5,away_max=60",
                   help="bench/browsers.py --churn")  # fmt: skip
    p.add_argument("--ramp", type=float, default=150,
                   help="new browser connections per second at the start, in all")  # fmt: skip
    p.add_argument("--missed", type=int, default=20,
                   help="HaloD's missed heartbeats (1 s each) and grace (s)")  # fmt: skip
    p.add_argument("--linger", type=float, help="the nodes' linger (default: theirs, 30 s)")
    p.add_argument("--quick", action="store_true",
                   help="smoke: 45 s, 200 clients, 2 processes, 4 s lives, 3 s linger")  # fmt: skip
    p.add_argument("--json", type=Path, help=f"default {RESULTS} for a full run")
    p.add_argument("--keep", type=Path, help="keep logs and reports in this folder")
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.quick:
        args.minutes, args.warmup_minutes, args.sample = 0.75, 0.25, 2.0
        args.clients, args.browser_procs, args.interval = 200, 2, 500
        args.ack_interval, args.ack_fraction, args.ack_timeout = 1000, 0.1, 3.0
        args.churn, args.linger = "life=4,switch=2,away=1,new=1,away_min=1,away_max=6", 3.0
    args.node_flags = [] if args.linger is None else ["--linger", str(args.linger)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.dataplane == "nftables" and (why := netns_possible()):
        print(f"soak: nftables needs its namespace: {why}", file=sys.stderr)
        return 2

    def on_term(*_: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not stop the clean-up
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="soak-"))
    tmp.mkdir(parents=True, exist_ok=True)
    env = Env(tmp, netns=args.dataplane == "nftables")
    soak = Soak(env, args)
    try:
        result = soak.run()
    except KeyboardInterrupt:
        print("soak: interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        soak.probe.close()
        env.close()
    result["table_md"] = markdown(result)
    out = args.json or (None if args.quick else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, separators=(",", ":"), default=str) + "\n")
        print(f"soak: results in {out}")
    print(table(result))
    return 1 if result["died"] else 0


if __name__ == "__main__":
    sys.exit(main())
