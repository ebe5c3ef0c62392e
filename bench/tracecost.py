"""Node CPU per event with per-key delivery tracing on vs off, in one run (issue 22).

    .venv/bin/python -m bench tracecost [--parts inproc,procs] [--recipients 1,10,1000]
        [--deliveries 20000] [--reps 5] [--batch 20]
        [--servers orbited-off,orbited-trace,orbited-otel] [--clients 1000] [--rate R]
        [--seconds 7] [--proc-reps 3] [--quick]
        [--json bench/results/tracecost.json]

Two parts, each interleaving its variants per repetition (the order rotated by one each
repetition), so a box shared with other runs loads them alike:

1. **In process** (``inproc``), like ``bench.hubcost``: the same event request bodies go
   through ``Hub.handle_request`` of one hub per variant, ``--batch`` requests per delivery
   batch as the SP server opens them, to keys whose attached sink accepts every frame at
   once (no I/O). Variants: ``off`` (no observer: the shipped hub with tracing off),
   ``all`` (the tracer, ``trace = all``), ``all+otel`` (tracer and OpenTelemetry spans,
   SDK, every request sampled, a discarding exporter) and ``otel-unsampled`` (OTel on,
   ``otel_sample = 0``: the cost of the sampling decision alone). The two OTel variants run
   only when the ``otel`` extra is installed. Per recipient count k (``--recipients``;
   each request lists k keys), ``--deliveries`` recipient deliveries per repetition:
   µs of CPU (``time.process_time``) per event and per recipient, best of ``--reps``, and
   the difference to ``off``.
2. **Real processes** (``procs``), one ``bench dispatch``-style step per server
   (bench/peers.py): ``orbited-off`` (``--trace off``), ``orbited-trace`` (``--trace all``)
   and, with the extra, ``orbited-otel`` (tracing and OTel, sampled 100 %, discarding
   exporter). The same ``--clients`` WebSocket subscribers and the same offered rate
   (``--rate``; default 50 % of Orbited's WebSocket saturation in the recorded
   bench/results/dispatch.json) for ``--seconds``, ``--proc-reps`` interleaved
   repetitions. Reported: node CPU µs per delivered event, and RSS per connection after
   the step (every key then has at least twice ``trace_per_key`` events: each trace ring
   is full, so the difference to ``orbited-off`` is the trace's memory at its bound).

**The default rule** (docs/performance.md, "Tracing cost"): ``trace = all`` stays the
default unless it costs more than 3 % of node CPU per event in part 2 or more than 1 µs
per recipient in part 1; then the default is ``off``. The run prints the verdict and
writes it in the JSON (``rule``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

from orbited.core.keys import ConnectionKey
from orbited.node.hub import Hub, HubConfig

RESULTS = Path(__file__).resolve().parent / "results" / "tracecost.json"
DISPATCH = Path(__file__).resolve().parent / "results" / "dispatch.json"
INPROC_VARIANTS = ("off", "all", "all+otel", "otel-unsampled")
PROC_SERVERS = ("orbited-off", "orbited-trace", "orbited-otel")
# The default rule (plan of issue 22, §4): beyond either limit the default is "off".
CPU_SHARE_LIMIT = 0.03  # of node CPU per event, real processes
US_PER_RECIPIENT_LIMIT = 1.0  # µs per recipient, in process
FALLBACK_RATE = 4000.0  # events/s when no recorded dispatch run is there


def otel_available() -> bool:
    return (
        importlib.util.find_spec("opentelemetry") is not None
        and importlib.util.find_spec("opentelemetry.sdk") is not None
        and importlib.util.find_spec("orbited.node.otel") is not None
    )


# -- part 1: in process --------------------------------------------------------------------


class AcceptingSink:
    """A transport that takes every frame at once (no I/O)."""

    kind = "ws"
    wants_pings = True
    last_write = 0.0

    def __init__(self) -> None:
        self.frames = 0

    def deliver(self, out: list[Any]) -> bool:
        self.frames += len(out)
        return True

    def replaced(self) -> None:
        pass

    def reconnect(self, reason: str, route: int | None = None, spread: float | None = None) -> None:
        pass

    def closed(self, code: int, reason: str) -> None:
        raise AssertionError(f"a bench sink was closed: {code} {reason}")


_OTEL: list[Any] = []  # OTel observers built, shut down when a measurement ends


def observer_for(variant: str, node: str = "bench") -> tuple[Any, Any]:
    """The hub's observer and tracer for a variant ((None, None) for ``off``)."""
    if variant == "off":
        return None, None
    from orbited.node.observe import build_observer
    from orbited.node.trace import TraceConfig, Tracer

    tracer = Tracer(TraceConfig(mode="all"), node) if variant in ("all", "all+otel") else None
    otel = None
    if variant in ("all+otel", "otel-unsampled"):
        from orbited.node.otel import OtelConfig, observer

        sample = 1.0 if variant == "all+otel" else 0.0
        otel = observer(OtelConfig(sample=sample, exporter="discard"), node)
        _OTEL.append(otel)
    return build_observer(tracer, otel), tracer


def make_hub(variant: str, keys: list[ConnectionKey]) -> tuple[Hub, list[AcceptingSink]]:
    hub = Hub(Clock(), HubConfig(), epoch="ep")
    observer, tracer = observer_for(variant)
    if observer is not None:
        hub.observe(observer, tracer)
    sinks = []
    for key in keys:
        sinks.append(AcceptingSink())
        hub.attach(key, sinks[-1], None)
    return hub, sinks


def request_bodies(keys: list[ConnectionKey], k: int, count: int, tag: str) -> list[bytes]:
    """``count`` event requests, each to the next ``k`` keys in turn (round robin)."""
    out = []
    for n in range(count):
        start = (n * k) % len(keys)
        to = [list(keys[(start + i) % len(keys)]) for i in range(k)]
        request = {"id": f"{tag}-{n}", "to": to, "data": {"t": n, "ph": "m", "text": "hello"}}
        out.append(json.dumps(request, separators=(",", ":")).encode())
    return out


def measure_inproc(variants: list[str], k: int, deliveries: int, reps: int, batch: int,
                   keys: int = 1000) -> dict[str, Any]:  # fmt: skip
    """Best-of-``reps`` µs per event and per recipient of each variant, recipients ``k``."""
    names = [ConnectionKey(f"c{i}", "s", "/x") for i in range(max(keys, k))]
    events = max(20, deliveries // k)
    hubs = {v: make_hub(v, names) for v in variants}
    best = dict.fromkeys(variants, float("inf"))
    spent_all: dict[str, list[float]] = {v: [] for v in variants}

    def run(hub: Hub, part: list[bytes]) -> None:
        scope: Callable[[], AbstractContextManager[Any]] = getattr(hub, "batch", nullcontext)
        handle = hub.handle_request
        for start in range(0, len(part), batch):
            with scope():
                for body in part[start : start + batch]:
                    reply = handle(body)
                    if b'"ok":true' not in reply:
                        raise SystemExit(f"the hub refused a request: {reply!r}")

    warm = request_bodies(names, k, events, "warm")
    for hub, _ in hubs.values():
        run(hub, warm)
    for rep in range(reps):
        part = request_bodies(names, k, events, f"r{rep}")
        shift = rep % len(variants)
        for variant in variants[shift:] + variants[:shift]:  # interleaved, rotated
            hub, sinks = hubs[variant]
            frames = sum(s.frames for s in sinks)
            started = time.process_time()
            run(hub, part)
            spent = time.process_time() - started
            if sum(s.frames for s in sinks) - frames != events * k:
                raise SystemExit(f"{variant}, k={k}: not every recipient got its frame")
            spent_all[variant].append(spent / events * 1e6)
            best[variant] = min(best[variant], spent)
    while _OTEL:
        _OTEL.pop().shutdown()
    out: dict[str, Any] = {"recipients": k, "events": events, "variants": {}}
    off = best.get("off")
    for variant in variants:
        per_event = best[variant] / events * 1e6
        figures = {
            "us_per_event": round(per_event, 3),
            "us_per_recipient": round(per_event / k, 4),
            "us_per_event_all_reps": [round(x, 3) for x in spent_all[variant]],
        }
        if off is not None and variant != "off":
            off_per_event = off / events * 1e6
            figures["delta_us_per_event"] = round(per_event - off_per_event, 3)
            figures["delta_us_per_recipient"] = round((per_event - off_per_event) / k, 4)
            figures["ratio_to_off"] = round(per_event / off_per_event, 4)
        out["variants"][variant] = figures
    return out


# -- part 2: real processes ----------------------------------------------------------------


def recorded_rate() -> float:
    """50 % of Orbited's WebSocket saturation in the recorded dispatch run."""
    try:
        summary = json.loads(DISPATCH.read_text())["summary"]
        return 0.5 * float(summary["ws"]["orbited"]["saturation_per_s"]["median"])
    except (OSError, KeyError, ValueError, TypeError):
        return FALLBACK_RATE


def run_proc(name: str, rep: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One server: connect the subscribers, one step at the offered rate, CPU and RSS."""
    from bench.dispatch import Publishers, Subscribers, measure_step
    from bench.peers import make_server, usage

    server = make_server(name, tmp / f"{name}-{rep}")
    subs: Subscribers | None = None
    pubs: Publishers | None = None
    with server:
        try:
            clients = [f"c{i}" for i in range(args.clients)]
            before = usage(server.pids())
            config = {"flavour": server.flavour, "transport": "ws",
                      "connect_rate": min(1000, server.connect_rate // args.procs)}  # fmt: skip
            subs = Subscribers(config, [server.url(c, "ws") for c in clients], args.procs, tmp)
            connected = subs.connected
            time.sleep(1.0)
            clients = [c for i, c in enumerate(clients) if i not in subs.failed_urls]
            pubs = Publishers(server.publish_spec("ws"), clients, 1, tmp)
            step_args = argparse.Namespace(step_seconds=args.seconds, drain=args.drain)
            step = measure_step(server, subs, pubs, "t", args.rate, step_args)
            after = usage(server.pids())
            final = subs.stop()
            subs = None
            print(f"  {name} rep {rep}: {step['delivered_per_s']:.0f}/s delivered, "
                  f"{step['server_cpu_us_per_event']:.1f} µs CPU/event, lost {step['lost']}",
                  file=sys.stderr)  # fmt: skip
            return {
                "server": name,
                "rep": rep,
                "connected": connected,
                "events_per_key": step["received"] / max(1, connected),
                "rss_per_conn_kb": (after.rss_kb - before.rss_kb) / max(1, connected),
                "cpu_us_per_event": step["server_cpu_us_per_event"],
                "step": step,
                "client_errors": final["errors"],
            }
        finally:
            if pubs is not None:
                pubs.stop()
            if subs is not None:
                subs.kill()


def measure_procs(servers: list[str], args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-tracecost-") as tmp:
        for rep in range(args.proc_reps):
            shift = rep % len(servers)
            for name in servers[shift:] + servers[:shift]:
                runs.append(run_proc(name, rep, args, Path(tmp)))
    summary: dict[str, Any] = {}
    for name in servers:
        mine = [r for r in runs if r["server"] == name]
        summary[name] = {
            f: {"median": statistics.median(r[f] for r in mine),
                "min": min(r[f] for r in mine), "max": max(r[f] for r in mine)}
            for f in ("cpu_us_per_event", "rss_per_conn_kb", "events_per_key")
        }  # fmt: skip
    base = summary.get("orbited-off")
    if base:
        for name in servers:
            if name != "orbited-off":
                cpu = summary[name]["cpu_us_per_event"]["median"]
                off = base["cpu_us_per_event"]["median"]
                summary[name]["cpu_ratio_to_off"] = round(cpu / off, 4) if off else None
                summary[name]["rss_delta_per_conn_kb"] = round(
                    summary[name]["rss_per_conn_kb"]["median"]
                    - base["rss_per_conn_kb"]["median"], 2)  # fmt: skip
    return {"rate_per_s": args.rate, "clients": args.clients, "seconds": args.seconds,
            "reps": args.proc_reps, "runs": runs, "summary": summary}  # fmt: skip


# -- the rule --------------------------------------------------------------------------------


def rule(inproc: list[dict[str, Any]] | None, procs: dict[str, Any] | None) -> dict[str, Any]:
    """The default-mode rule: ``off`` if ``trace = all`` costs > 3 % of node CPU per event
    (real processes) or > 1 µs per recipient (in process); otherwise ``all``."""
    reasons = []
    worst_us = None
    if inproc:
        alls = [r["variants"].get("all", {}) for r in inproc]
        deltas = [a["delta_us_per_recipient"] for a in alls if "delta_us_per_recipient" in a]
        if deltas:
            worst_us = max(deltas)
            if worst_us > US_PER_RECIPIENT_LIMIT:
                reasons.append(f"{worst_us:.2f} µs per recipient in process (> 1 µs)")
    share = None
    if procs and "orbited-trace" in procs["summary"]:
        ratio = procs["summary"]["orbited-trace"].get("cpu_ratio_to_off")
        if ratio is not None:
            share = ratio - 1
            if share > CPU_SHARE_LIMIT:
                reasons.append(f"{share:+.1%} node CPU per event (> 3 %)")
    measured = worst_us is not None or share is not None
    return {
        "default": ("off" if reasons else "all") if measured else None,
        "measured": measured,
        "us_per_recipient_worst": worst_us,
        "cpu_share": share,
        "reasons": reasons,
    }


def main(argv: list[str] | None = None) -> int:
    from bench.report import LoadSampler, machine

    p = argparse.ArgumentParser(prog="python -m bench tracecost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--parts", default="inproc,procs", help="inproc, procs or both")
    p.add_argument("--recipients", default="1,10,1000", help="keys per request, in process")
    p.add_argument("--deliveries", type=int, default=20_000, help="per repetition, in process")
    p.add_argument("--reps", type=int, default=5, help="in-process repetitions (best of)")
    p.add_argument("--batch", type=int, default=20, help="requests per delivery batch")
    p.add_argument("--variants", default=",".join(INPROC_VARIANTS))
    p.add_argument("--servers", default=",".join(PROC_SERVERS))
    p.add_argument("--clients", type=int, default=1000, help="WebSocket subscribers")
    p.add_argument("--procs", type=int, default=2, help="subscriber processes")
    p.add_argument("--rate", type=float, help="offered events/s (default: 50 %% of the "
                   "recorded WebSocket saturation)")  # fmt: skip
    p.add_argument("--seconds", type=float, default=7.0, help="the step's length")
    p.add_argument("--drain", type=float, default=1.0)
    p.add_argument("--proc-reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a smoke run (tiny counts)")
    p.add_argument("--json", type=Path, help=f"results (default {RESULTS}; none in --quick)")
    args = p.parse_args(argv)
    parts = set(filter(None, args.parts.split(",")))
    if not parts <= {"inproc", "procs"}:
        p.error("--parts: inproc, procs")
    try:
        ks = [int(k) for k in args.recipients.split(",")]
    except ValueError:
        p.error("--recipients is a comma-separated list of integers")
    if min(ks) < 1 or args.reps < 1 or args.deliveries < 1 or args.batch < 1:
        p.error("--recipients, --reps, --deliveries and --batch must be at least 1")
    if args.quick:
        args.deliveries, args.reps, args.proc_reps = 200, 1, 1
        args.clients, args.seconds, args.drain, args.procs = 50, 1.0, 0.5, 1
        args.rate = args.rate or 300.0
    elif args.json is None:
        args.json = RESULTS
    args.rate = args.rate or recorded_rate()
    have_otel = otel_available()
    variants = [v for v in args.variants.split(",") if v]
    servers = [s for s in args.servers.split(",") if s]
    for v in variants:
        if v not in INPROC_VARIANTS:
            p.error(f"unknown variant {v!r}")
    for s in servers:
        if s not in PROC_SERVERS:
            p.error(f"unknown server {s!r}")
    skipped = []
    if not have_otel:
        skipped = [v for v in variants if "otel" in v] + [s for s in servers if "otel" in s]
        variants = [v for v in variants if "otel" not in v]
        servers = [s for s in servers if "otel" not in s]
        if skipped:
            print(f"note: the otel extra is not installed; skipped {', '.join(skipped)}",
                  file=sys.stderr)  # fmt: skip
    if "off" not in variants:
        variants.insert(0, "off")
    if "orbited-off" not in servers:
        servers.insert(0, "orbited-off")

    results: dict[str, Any] = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "skipped": skipped,
    }
    with LoadSampler() as load:
        if "inproc" in parts:
            results["inproc"] = []
            for k in ks:
                r = measure_inproc(variants, k, args.deliveries, args.reps, args.batch)
                results["inproc"].append(r)
                line = "  ".join(
                    f"{v} {f['us_per_event']:.2f}"
                    + (f" ({f['delta_us_per_recipient']:+.3f}/rcpt)"
                       if "delta_us_per_recipient" in f else "")
                    for v, f in r["variants"].items()
                )  # fmt: skip
                print(f"in process, {k} recipient(s): µs/event {line}")
        if "procs" in parts:
            procs = measure_procs(servers, args)
            results["procs"] = procs
            for name, s in procs["summary"].items():
                extra = ""
                if "cpu_ratio_to_off" in s:
                    extra = (f", {s['cpu_ratio_to_off']:.3f}× off, RSS "
                             f"{s['rss_delta_per_conn_kb']:+.2f} KB/conn")  # fmt: skip
                cpu, rss = s["cpu_us_per_event"]["median"], s["rss_per_conn_kb"]["median"]
                print(f"processes, {name}: {cpu:.1f} µs CPU per delivered event, "
                      f"{rss:.1f} KB/conn{extra}")  # fmt: skip
    results["loadavg"] = load.summary()
    results["rule"] = rule(results.get("inproc"), results.get("procs"))
    r = results["rule"]
    verdict = r["default"] or "not measured (no tracing variant ran)"
    why = f" ({'; '.join(r['reasons'])})" if r["reasons"] else ""
    load_avg = results["loadavg"]
    print(f"default rule: trace = {verdict}{why}; load average "
          f"{load_avg['min']:.1f}–{load_avg['max']:.1f}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
