"""The benchmark harness's one entry point — see bench/README.md.

    python -m bench run SCENARIO [options]     (or python -m bench SCENARIO [options])
    python -m bench all [--quick] [--only a,b] [--skip a,b] [--with soak] [--results DIR]
    python -m bench report [--results DIR] [--doc FILE] [--images DIR]

``all`` runs every scenario in a fixed order (ORDER), each in a process of its own writing
``<results>/<scenario>.json``, then ``report`` regenerates docs/performance.md's generated
sections and PNGs from those files (bench/report.py). ``--quick`` runs each scenario's
smoke mode into a scratch directory and renders into a copy of the page there, so it
never touches the published figures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

SCENARIOS = {
    "dispatch": "bench.dispatch",
    "idle": "bench.idle",
    "storm": "bench.storm",
    "control": "bench.control",
    "dataplane": "bench.dataplane",
    "failover": "bench.failover",
    "soak": "bench.soak",
    "store": "bench.store",
    "user": "bench.usercost",
    "tracecost": "bench.tracecost",
    "stages": "bench.stages",
}
# Load-tool pieces (bench/README.md, "Simulated browsers"), runnable the same way.
TOOLS = {
    "browsers": "bench.browsers",
    "sender": "bench.sender",
    "chaos_report": "bench.chaos_report",
}
# `all`, in this order: the page's order; the soak (an hour) only when asked for.
ORDER = ("dispatch", "stages", "idle", "storm", "dataplane", "failover", "control")
QUICK_RESULTS = Path("/tmp/orbited-bench-quick")


def run_scenario(name: str, argv: list[str]) -> int:
    module = importlib.import_module({**SCENARIOS, **TOOLS}[name])
    return module.main(argv)


def run_all(argv: list[str]) -> int:
    from bench import report

    p = argparse.ArgumentParser(prog="python -m bench all", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true", help="every scenario's smoke mode")
    p.add_argument("--only", help="comma-separated scenarios (default: all of ORDER)")
    p.add_argument("--skip", default="", help="comma-separated scenarios to leave out")
    p.add_argument("--with", dest="extra", default="", help="also run these (e.g. soak)")
    p.add_argument("--results", type=Path, help="default bench/results (--quick: a scratch dir)")
    p.add_argument("--doc", type=Path, help="page to regenerate (--quick: a copy in --results)")
    p.add_argument("--images", type=Path, help="default docs/images (--quick: under --results)")
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args(argv)
    results = args.results or (QUICK_RESULTS if args.quick else report.RESULTS)
    results.mkdir(parents=True, exist_ok=True)
    doc, images = args.doc, args.images
    if args.quick:
        if doc is None:
            doc = results / "performance.md"
            shutil.copyfile(report.DOC, doc)
        images = images or results / "images"
    names = args.only.split(",") if args.only else list(ORDER)
    names += [n for n in args.extra.split(",") if n and n not in names]
    skip = set(filter(None, args.skip.split(",")))
    status: dict[str, dict[str, object]] = {}
    for name in names:
        if name in skip:
            continue
        if name not in SCENARIOS:
            print(f"unknown scenario {name!r}", file=sys.stderr)
            return 2
        cmd = [sys.executable, "-m", "bench", "run", name, "--json", str(results / f"{name}.json")]
        if args.quick:
            cmd.append("--quick")
        print(f"== {name}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
        started = time.monotonic()
        rc = subprocess.call(cmd)
        status[name] = {"rc": rc, "seconds": round(time.monotonic() - started, 1)}
        print(f"== {name}: exit {rc} in {status[name]['seconds']} s", file=sys.stderr)
    if not args.no_report:
        rendered = report.render(results, doc or report.DOC, images or report.IMAGES)
        for name in status:
            status[name]["report"] = rendered.get(name, "not in the page")
    print(json.dumps(status, indent=1))
    failed = [n for n, s in status.items() if s["rc"] != 0 or "failed" in str(s.get("report"))]
    return 1 if failed else 0


def usage() -> int:
    names = ",".join([*SCENARIOS, *TOOLS])
    print(f"usage: python -m bench {{run SCENARIO|all|report}} [options]\n"
          f"       python -m bench {{{names}}} [options]", file=sys.stderr)  # fmt: skip
    return 2


def main() -> int:
    argv = sys.argv[1:]
    if not argv:
        return usage()
    if argv[0] == "all":
        return run_all(argv[1:])
    if argv[0] == "report":
        from bench import report

        return report.main(argv[1:])
    if argv[0] == "run":
        argv = argv[1:]
    if not argv or argv[0] not in {**SCENARIOS, **TOOLS}:
        return usage()
    return run_scenario(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
