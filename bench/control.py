"""HaloD control plane: N simulated nodes heartbeating at 10 Hz; CPU, join rate, detection.

For each size in ``--nodes``: a fresh HaloD, then the baseline (bench/control_raw_server.py:
the same Twisted/SP pair0/JSON transport, none of HaloD's logic), each loaded by the same
simulator (bench/control_nodes.py: many nodes per process, real TCP connections).

- **join**: every node registers, paced (``--join-rate`` per second at most,
  ``--join-window`` registrations awaiting their welcome at once); joins/s and false
  failures while the table grows.
- **steady**: ``--window`` seconds of heartbeats only; server CPU % (utime+stime from
  /proc/PID/stat), heartbeats acknowledged per second, server CPU per heartbeat, ack
  round-trip p50/p99, and how late the simulator itself ran (its own health check).
- **detection** (HaloD only): ``--victims`` crashes (a node closes its connection; bound:
  grace) and ``--victims`` hangs (a node stops heartbeating, connection open; bound:
  k × interval), one at a time. Latency = crash (or the victim's last heartbeat) → the
  moment the node taking over has received ``assign``s covering all the victim's routes.
  After each, the victim registers again and becomes the spare, so every failover is the
  same one: the spare takes over.

Figures and ratios only (HaloD / baseline, latency / bound): nothing here asserts a timing.
Results JSON: ``--json``, by default bench/results/control.json (``--quick`` writes none).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
RESULTS = Path(__file__).parent / "results" / "control.json"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _die_with_parent() -> None:
    """Children get SIGTERM if the driver dies without cleaning up (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    def __init__(self, kind: str, args: argparse.Namespace, tmp: Path, tag: str) -> None:
        self.kind = kind
        ready = tmp / f"{kind}-{tag}.ready"
        self.log_path = tmp / f"{kind}-{tag}.log"
        if kind == "halod":
            cmd = [
                sys.executable, *os.environ.get("BENCH_PY_ARGS", "").split(),
                "-m", "halod.cli", "run",
                "--control", "tcp://127.0.0.1:0",
                "--status-http", "127.0.0.1:0",
                "--db", str(tmp / f"halod-{tag}.sqlite3"),
                "--routes", str(args.routes),
                "--spares", str(args.spares),
                "--heartbeat-interval", str(args.interval),
                "--missed-heartbeats", str(args.missed),
                "--grace", str(args.grace),
                "--ready-file", str(ready),
                "--log-level", "warn",
                "--dataplane", args.dataplane,
            ]  # fmt: skip
            if args.dataplane != "none":  # 2 × routes listening ports, clear of each other
                cmd += ["--browser-port-base", "20000", "--sp-port-base", "30000"]
        else:
            cmd = [sys.executable, "-m", "bench.control_raw_server", str(ready), str(args.interval)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
        deadline = time.monotonic() + 20
        while not ready.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{kind} did not start:\n{self.log()}")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        self.control, self.status, self.pid = info["control"], info.get("status"), info["pid"]

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def messages(self) -> int | None:
        """HaloD's own count of control messages received (from /metrics)."""
        if not self.status:
            return None
        try:
            with urllib.request.urlopen(f"http://{self.status}/metrics", timeout=10) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("halod_control_messages_total "):
                        return int(line.split()[1])
        except OSError as e:
            print(f"note: {self.kind} /metrics: {e}\n{self.log()}", file=sys.stderr)
        return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Sims:
    """The simulator processes; ``call`` sends one command to each and gathers replies."""

    def __init__(self, control: str, names: list[str], procs: int) -> None:
        self.owner: dict[str, int] = {}
        self.timeline: list[tuple[float, int]] = []  # (time, nodes up), from status polls
        self.procs: list[subprocess.Popen] = []
        for i in range(procs):
            chunk = names[i::procs]
            if not chunk:
                continue
            for name in chunk:
                self.owner[name] = len(self.procs)
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bench.control_nodes", control, *chunk],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    preexec_fn=_die_with_parent,
                )
            )

    def call(self, cmd: dict[str, Any], only: int | None = None) -> list[dict[str, Any]]:
        targets = self.procs if only is None else [self.procs[only]]
        line = json.dumps(cmd) + "\n"
        for p in targets:
            p.stdin.write(line)
            p.stdin.flush()
        replies = []
        for p in targets:
            reply = p.stdout.readline()
            if not reply:
                raise RuntimeError(f"simulator {p.pid} exited (code {p.poll()})")
            replies.append(json.loads(reply))
        return replies

    def status(self) -> dict[str, Any]:
        up, waiting, roles, unexpected, first = 0, 0, {}, {}, []
        for r in self.call({"cmd": "status"}):
            up += r["up"]
            waiting += r["waiting"]
            if r["first_unexpected"] is not None:
                first.append(r["first_unexpected"])
            for d, src in ((roles, r["roles"]), (unexpected, r["unexpected"])):
                for k, v in src.items():
                    d[k] = d.get(k, 0) + v
        self.timeline.append((time.monotonic(), up))
        first_unexpected = min(first, default=None)
        up_then = None
        if first_unexpected is not None:
            up_then = max((n for t, n in self.timeline if t <= first_unexpected), default=0)
        return {"up": up, "waiting": waiting, "roles": roles, "unexpected": unexpected,
                "up_at_first_unexpected": up_then}  # fmt: skip

    def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                p.stdin.flush()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def wait_up(sims: Sims, want: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = sims.status()
        if status["up"] >= want or time.monotonic() > deadline:
            return status
        if status["waiting"] == 0 and status["up"] < want:
            return status  # nothing left to wait for: some were refused or closed
        time.sleep(0.1)


def detect(
    sims: Sims, server: Server, mode: str, rng: random.Random, args: argparse.Namespace
) -> dict[str, Any]:
    """One failure: pick an active node, crash or hang it, time its routes' takeover."""
    members = []
    for i, r in enumerate(sims.call({"cmd": "nodes"})):
        members += [(i, name, role) for name, role, _ in r["nodes"]]
    active = [(i, name) for i, name, role in members if role == "active"]
    spares = {name for _, name, role in members if role == "spare"}
    proc, victim = rng.choice(active)
    reply = sims.call({"cmd": mode, "name": victim}, only=proc)[0]
    start = reply["t"] if mode == "crash" else reply["t_last"]
    routes = set(reply["routes"])
    bound = args.grace if mode == "crash" else args.missed * args.interval
    deadline = time.monotonic() + bound + args.detect_timeout
    covered: dict[int, float] = {}
    takers: set[str] = set()
    error_at = None
    while time.monotonic() < deadline:
        time.sleep(0.05)
        events = [e for r in sims.call({"cmd": "events", "since": start}) for e in r["events"]]
        covered.clear()
        takers.clear()
        for e in sorted(events, key=lambda e: e["t"]):
            if e["name"] == victim:
                if e["type"] == "error" and e.get("code") == "failed" and error_at is None:
                    error_at = e["t"]
                continue
            if e["type"] == "assign" and e.get("role") == "active":
                for route in routes.intersection(e["routes"]):
                    if route not in covered:
                        covered[route] = e["t"]
                        takers.add(e["name"])
        if len(covered) == len(routes) and (mode == "crash" or error_at is not None):
            break
    detected = max(covered.values()) if routes and len(covered) == len(routes) else None
    result = {
        "mode": mode,
        "victim": victim,
        "routes": len(routes),
        "bound": bound,
        "latency": None if detected is None else detected - start,
        "error_latency": None if error_at is None else error_at - start,
        "takers": sorted(takers),
        "spare_took_over": bool(takers) and takers <= spares,
    }
    # The victim comes back as a new node: it is the spare for the next failure.
    sims.call({"cmd": "rejoin", "name": victim}, only=proc)
    wait_up(sims, args.size, 10.0)
    return result


def run_once(kind: str, size: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    args.size = size
    server = Server(kind, args, tmp, str(size))
    sims = None
    try:
        names = [f"n{i:05d}" for i in range(size)]
        sims = Sims(server.control, names, min(args.procs, size))
        nprocs = len(sims.procs)
        # -- join ------------------------------------------------------------------------
        cpu0, t0 = server.cpu(), time.monotonic()
        sims.call({"cmd": "join", "rate": args.join_rate / nprocs,
                   "window": max(1, args.join_window // nprocs)})  # fmt: skip
        status = wait_up(sims, size, args.join_timeout)
        join_seconds = time.monotonic() - t0
        join_cpu = server.cpu() - cpu0
        time.sleep(args.settle)
        # -- steady ----------------------------------------------------------------------
        msgs0 = server.messages()
        sims.call({"cmd": "mark"})
        cpu0, t0 = server.cpu(), time.monotonic()
        time.sleep(args.window)
        cpu = server.cpu() - cpu0
        stats = sims.call({"cmd": "stats"})
        seconds = time.monotonic() - t0
        msgs1 = server.messages()
        status_after = sims.status()
        acks = sum(s["acks"] for s in stats)
        sent = sum(s["sent"] for s in stats)
        p50s = [s["rtt_p50"] for s in stats if s["rtt_p50"] is not None]
        rtt_p50 = statistics.median(p50s) if p50s else float("nan")
        result: dict[str, Any] = {
            "server": kind,
            "nodes": size,
            "joined": status["up"],
            "roles": status["roles"],
            "join_seconds": join_seconds,
            "joins_per_s": status["up"] / join_seconds,
            "join_cpu_pct": join_cpu / join_seconds * 100,
            "join_cpu_ms_per_join": join_cpu / max(1, status["up"]) * 1e3,
            "window_s": seconds,
            "heartbeats_sent_per_s": sent / seconds,
            "heartbeats_acked_per_s": acks / seconds,
            "server_messages_per_s": None
            if msgs0 is None or msgs1 is None
            else (msgs1 - msgs0) / seconds,
            "cpu_pct": cpu / seconds * 100,
            "cpu_us_per_heartbeat": cpu / max(1, acks) * 1e6,
            "rtt_p50_ms": rtt_p50 * 1e3,
            "rtt_p99_ms": max(s["rtt_p99"] or 0 for s in stats) * 1e3,
            "rtt_max_ms": max(s["rtt_max"] or 0 for s in stats) * 1e3,
            "sim_cpu_pct": sum(s["cpu"] for s in stats) / seconds * 100,
            "sim_max_late_ms": max(s["max_late"] for s in stats) * 1e3,
            "sim_late_over_interval": sum(s["late_over_interval"] for s in stats),
            "false_failures": dict(status_after["unexpected"]),
            "nodes_up_at_first_false_failure": status_after["up_at_first_unexpected"],
        }
        # -- detection -------------------------------------------------------------------
        if kind == "halod" and args.victims and status["up"] == size:
            rng = random.Random(size)
            runs = [detect(sims, server, m, rng, args) for m in ("crash", "hang")
                    for _ in range(args.victims)]  # fmt: skip
            result["detection"] = runs
            for mode in ("crash", "hang"):
                lat = [r["latency"] for r in runs if r["mode"] == mode]
                ok = [x for x in lat if x is not None]
                bound = args.grace if mode == "crash" else args.missed * args.interval
                result[f"{mode}_p50_s"] = statistics.median(ok) if ok else None
                result[f"{mode}_max_s"] = max(ok) if ok else None
                result[f"{mode}_bound_s"] = bound
                result[f"{mode}_missed"] = len(lat) - len(ok)
            errs = [r["error_latency"] for r in runs if r["mode"] == "hang"]
            errs = [x for x in errs if x is not None]
            result["hang_error_p50_s"] = statistics.median(errs) if errs else None
            result["spare_took_over"] = sum(r["spare_took_over"] for r in runs)
            final = sims.status()
            result["false_failures_total"] = dict(final["unexpected"])
            result["nodes_up_at_first_false_failure"] = final["up_at_first_unexpected"]
        return result
    finally:
        if sims is not None:
            sims.stop()
        server.stop()


def fmt(value: Any, spec: str = ".1f") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec)


def print_report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    by = {(r["server"], r["nodes"]): r for r in results}
    print(
        f"\ncontrol: {args.routes} routes, {args.spares} spare, heartbeat every "
        f"{args.interval:g}s, k={args.missed}, grace {args.grace:g}s, dataplane "
        f"{args.dataplane}; {args.procs} simulator "
        f"process(es); steady window {args.window:g}s; {args.victims} crash + "
        f"{args.victims} hang victims"
    )
    rows = [
        ("joins/s", "joins_per_s", ".0f"),
        ("server CPU ms/join", "join_cpu_ms_per_join", ".2f"),
        ("heartbeats/s acked", "heartbeats_acked_per_s", ".0f"),
        ("server CPU %", "cpu_pct", ".1f"),
        ("server CPU µs/heartbeat", "cpu_us_per_heartbeat", ".1f"),
        ("ack RTT p50 ms", "rtt_p50_ms", ".2f"),
        ("ack RTT p99 ms", "rtt_p99_ms", ".2f"),
        ("simulator CPU %", "sim_cpu_pct", ".1f"),
        ("simulator max lateness ms", "sim_max_late_ms", ".1f"),
    ]
    for size in args.nodes:
        h, r = by.get(("halod", size)), by.get(("raw", size))
        if h is None:
            continue
        print(f"\n{size} nodes")
        print(f"{'figure':<28}{'halod':>10}{'raw':>10}{'halod/raw':>11}")
        for label, field, spec in [("nodes up", "joined", "d"), *rows]:
            hv = h.get(field)
            rv = r.get(field) if r else None
            ratio = hv / rv if hv is not None and rv else None
            print(f"{label:<28}{fmt(hv, spec):>10}{fmt(rv, spec):>10}{fmt(ratio, '.2f'):>11}")
        if h["server"] == "halod" and "crash_p50_s" not in h:
            print("detection: skipped (not every node joined)")
        if "crash_p50_s" in h:
            print(f"{'detection':<28}{'p50 s':>10}{'max s':>10}{'max/bound':>11}")
            for mode, label in (("crash", "crash (bound grace)"), ("hang", "hang (bound k×int.)")):
                p50, mx, bound = h[f"{mode}_p50_s"], h[f"{mode}_max_s"], h[f"{mode}_bound_s"]
                ratio = mx / bound if mx is not None else None
                print(f"{label:<28}{fmt(p50, '.3f'):>10}{fmt(mx, '.3f'):>10}"
                      f"{fmt(ratio, '.2f'):>11}")  # fmt: skip
                if h[f"{mode}_missed"]:
                    print(f"note: {h[f'{mode}_missed']} {mode} failure(s) not detected in time")
        for server in (h, r):
            if server is None:
                continue
            if server["joined"] != size:
                print(f"note: only {server['joined']} of {size} nodes joined {server['server']}")
            ff = server.get("false_failures_total", server["false_failures"])
            if ff:
                then = server["nodes_up_at_first_false_failure"]
                print(f"note: {server['server']}: non-victim nodes failed or refused: {ff}; "
                      f"the first with {then} nodes up")  # fmt: skip
            if server["sim_late_over_interval"]:
                late = server["sim_late_over_interval"]
                print(f"note: {server['server']} run: {late} heartbeats sent > 1 interval late")


def parser() -> argparse.ArgumentParser:
    """``python -m bench control``'s options (also what ``report`` reproduces a run from)."""
    p = argparse.ArgumentParser(prog="python -m bench control", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--nodes", default="256,1024,2048", help="sizes, comma-separated")
    p.add_argument("--procs", type=int, default=2, help="simulator processes")
    p.add_argument("--routes", type=int, default=4096, help="HaloD --routes (≥ nodes)")
    p.add_argument("--spares", type=int, default=1, help="HaloD --spares")
    p.add_argument("--interval", type=float, default=0.1, help="heartbeat interval, seconds")
    p.add_argument("--missed", type=int, default=3, help="HaloD --missed-heartbeats (k)")
    p.add_argument("--grace", type=float, default=1.0, help="HaloD --grace, seconds")
    p.add_argument("--dataplane", default="none", help="HaloD --dataplane (proxy: 2×routes ports)")
    p.add_argument("--join-rate", type=float, default=200, help="registrations/s at most")
    p.add_argument("--join-window", type=int, default=2, help="registrations in flight")
    p.add_argument("--join-timeout", type=float, default=120, help="seconds, per size")
    p.add_argument("--settle", type=float, default=1.0, help="seconds after the join")
    p.add_argument("--window", type=float, default=5.0, help="steady window, seconds")
    p.add_argument("--victims", type=int, default=5, help="crashes, then as many hangs")
    p.add_argument("--detect-timeout", type=float, default=5.0, help="seconds past the bound")
    p.add_argument("--servers", default="halod,raw", help="which servers to run")
    p.add_argument("--json", type=Path, help=f"results (default {RESULTS}; --quick: none)")
    p.add_argument("--keep", type=Path, help="keep server logs and databases in this directory")
    p.add_argument("--quick", action="store_true", help="smoke: 64 nodes, 1 s window, 1 victim")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.nodes, args.window, args.victims, args.settle = "64", 1.0, 1, 0.5
    if args.json is None and not args.quick:
        args.json = RESULTS
    args.nodes = [int(n) for n in args.nodes.split(",") if n]
    servers = [s for s in args.servers.split(",") if s]

    # SIGTERM ends the run like Ctrl-C does: the finally clauses stop every child.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    results: list[dict[str, Any]] = []
    from bench.report import LoadSampler, machine

    started, facts = time.strftime("%Y-%m-%d %H:%M:%S"), machine()
    with LoadSampler() as load, tempfile.TemporaryDirectory() as tmp:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            tmp = str(args.keep)
        for size in args.nodes:
            for kind in servers:
                results.append(run_once(kind, size, args, Path(tmp)))
                brief = {k: v for k, v in results[-1].items() if k != "detection"}
                print(json.dumps(brief), file=sys.stderr)
    print_report(results, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"args": vars(args), "machine": facts, "started": started,
                        "loadavg": load.summary(), "runs": results}, indent=1, default=str)
        )  # fmt: skip
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


# -- report (docs/performance.md, python -m bench report) ------------------------------------

STEADY_ROWS = (
    ("nodes up", "joined", "d"),
    ("joins/s", "joins_per_s", ".0f"),
    ("server CPU in the join phase per join", "join_cpu_ms_per_join", ".1f", " ms"),
    ("heartbeats/s acked", "heartbeats_acked_per_s", ".0f"),
    ("server CPU", "cpu_pct", ".1f", " %"),
    ("server CPU per heartbeat", "cpu_us_per_heartbeat", ".1f", " µs"),
    ("ack round trip p50", "rtt_p50_ms", ".2f", " ms"),
    ("ack round trip p99", "rtt_p99_ms", ".1f", " ms"),
    ("simulator CPU (all processes)", "sim_cpu_pct", ".0f", " %"),
    ("simulator max lateness", "sim_max_late_ms", ".0f", " ms"),
)


def report(results: dict[str, Any], images: Path) -> str:
    """Markdown section from ``--json`` results: HaloD vs raw per size, detection, a plot."""
    from bench.report import command_line, machine_line, pyplot

    a, runs = results["args"], results["runs"]
    by = {(r["server"], r["nodes"]): r for r in runs}
    sizes = sorted({r["nodes"] for r in runs})
    out = [
        "```",
        command_line("control", parser(), a, always=("nodes", "procs", "window", "victims")),
        "```",
        "",
        machine_line(results),
        "",
        f"HaloD `--routes {a['routes']} --spares {a['spares']} --heartbeat-interval "
        f"{a['interval']} --missed-heartbeats {a['missed']} --grace {a['grace']} --dataplane "
        f"{a['dataplane']}`, fresh for each size; `raw` = bench/control_raw_server.py.",
        "",
    ]
    head = "| figure |" + "".join(f" {n} HaloD | raw | HaloD/raw |" for n in sizes)
    out += [head, "|---|" + "---|---|---|" * len(sizes)]
    for label, field, spec, *unit in STEADY_ROWS:
        cells = [label]
        for n in sizes:
            h, r = by.get(("halod", n), {}), by.get(("raw", n), {})
            hv, rv = h.get(field), r.get(field)
            u = unit[0] if unit else ""
            cells += [fmt(hv, spec) + (u if hv is not None else ""),
                      fmt(rv, spec) + (u if rv is not None else ""),
                      fmt(hv / rv, ".2f") if hv is not None and rv else ""]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    det = [(n, by[("halod", n)]) for n in sizes if "crash_p50_s" in by.get(("halod", n), {})]
    if det:
        out += ["", "Detection (HaloD), latency from the failure to `assign`s covering the "
                "victim's routes:", "",
                "| failure | bound |" + "".join(f" {n} p50 | max | max / bound |" for n, _ in det),
                "|---|---|" + "---|---|---|" * len(det)]  # fmt: skip
        for mode in ("crash", "hang"):
            bound = det[0][1][f"{mode}_bound_s"]
            cells = [mode, f"{bound:g} s"]
            for _, h in det:
                p50, mx = h[f"{mode}_p50_s"], h[f"{mode}_max_s"]
                cells += [fmt(p50, ".3f") + " s", fmt(mx, ".3f") + " s",
                          fmt(mx / bound if mx is not None else None, ".2f")]  # fmt: skip
            out.append("| " + " | ".join(cells) + " |")
    notes = []
    for r in runs:
        if r["joined"] != r["nodes"]:
            notes.append(f"only {r['joined']} of {r['nodes']} nodes joined {r['server']}")
        ff = r.get("false_failures_total", r.get("false_failures"))
        if ff:
            notes.append(f"{r['server']} at {r['nodes']}: non-victim failures {ff}")
    if notes:
        out += ["", "Notes from the run:", *[f"- {n}" for n in notes]]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for server in ("halod", "raw"):
        xs = [n for n in sizes if (server, n) in by]
        ax.plot(xs, [by[(server, n)]["cpu_us_per_heartbeat"] for n in xs], marker="o",
                label=server)  # fmt: skip
    ax.set_xlabel("simulated nodes (10 Hz heartbeats)")
    ax.set_ylabel("server CPU µs per heartbeat")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("Control plane: CPU per heartbeat, HaloD vs bare transport", fontsize=9)
    fig.tight_layout()
    fig.savefig(images / "perf-control-heartbeat.png", dpi=110)
    plt.close(fig)
    out += ["", "![control plane CPU per heartbeat](images/perf-control-heartbeat.png)"]
    return "\n".join(out)
