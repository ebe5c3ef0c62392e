"""Results → docs/performance.md: the generated sections, and helpers every scenario shares.

    python -m bench report [--results DIR] [--doc FILE] [--images DIR]

Owns the report side of the harness: each scenario module exposes
``report(results: dict, images: Path) -> str`` returning its markdown section and drawing
its PNGs (matplotlib, Agg) as ``images/perf-<scenario>-*.png``; this module loads
``<results>/<scenario>.json`` and replaces the text between ``<!-- BEGIN bench:NAME -->``
and ``<!-- END bench:NAME -->`` in the page, leaving the hand-written text around the
markers alone. A scenario without results (or without ``report``) keeps its old section.

Shared helpers: machine facts and load-average sampling recorded into every result,
median/[min–max] formatting, and the command line that reproduces a recorded run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "performance.md"
IMAGES = ROOT / "docs" / "images"
# Section order in the page and in `python -m bench all`.
SECTIONS = ("dispatch", "stages", "idle", "storm", "dataplane", "failover", "control")
# Sections `report` also renders, whose scenario `all` runs only when asked (an hour).
REPORT_ONLY = ("soak",)


# -- machine facts ----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": os.uname().release,
            "python": sys.version.split()[0], "mem_gb": round(mem_kb / 2**20, 1),
            "loadavg_at_start": os.getloadavg()}  # fmt: skip


def select_available(
    names: list[str], why_not: Callable[[str], str | None]
) -> tuple[list[str], dict[str, str]]:
    """The ``names`` that can run here, and why each of the others cannot (printed)."""
    chosen, skipped = [], {}
    for name in filter(None, names):
        why = why_not(name)
        if why:
            skipped[name] = why
            print(f"note: {name} skipped: {why}", file=sys.stderr)
        else:
            chosen.append(name)
    return chosen, skipped


def results_header(args: Any, skipped: dict[str, str]) -> dict[str, Any]:
    """What every result file opens with: the arguments, the machine, what was skipped."""
    return {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(),
        "skipped": skipped,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def interleaved(
    args: Any, available: Callable[[str], str | None], transports: list[str],
    one_pass: Callable[[str, str, int, Path], dict[str, Any]], empty: str,
) -> dict[str, Any]:  # fmt: skip
    """The side-by-side loop the peer scenarios share: the servers of ``args.servers``
    that are ``available`` (else skipped, with why), ``args.reps`` repetitions with the
    server order rotated each time, every transport per server; a pass that raises is
    recorded as an error (with ``empty``: [] under that key). Machine facts, start and end
    times and the load average during the run go into the result."""
    servers, skipped = select_available(args.servers.split(","), available)
    result = results_header(args, skipped) | {"runs": []}
    with LoadSampler() as load, tempfile.TemporaryDirectory() as tmpdir:
        for rep in range(args.reps):
            order = servers[rep % len(servers) :] + servers[: rep % len(servers)]
            for name in order:
                for transport in transports:
                    try:
                        run = one_pass(name, transport, rep, Path(tmpdir))
                    except Exception as e:  # noqa: BLE001 - one failed pass is a result too
                        run = {"server": name, "transport": transport, "rep": rep,
                               "error": f"{type(e).__name__}: {e}", empty: []}  # fmt: skip
                        print(f"error: {name} {transport}: {run['error']}", file=sys.stderr)
                    result["runs"].append(run)
    result["loadavg"] = load.summary()
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    result["servers"] = servers
    return result


def previous_run(path: Path | None) -> dict[str, Any] | None:
    """What ``path`` holds before a new run replaces it: its date and summary, kept in the
    new file as ``previous`` so the page shows the figures beside the new ones (issue 20:
    "regenerated, with the previous figures kept beside the new ones")."""
    if path is None or not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    date = (old.get("meta") or {}).get("date") or old.get("started")
    if not date or not old.get("summary"):
        return None
    return {"date": date, "summary": old["summary"]}


Beside = Callable[[dict[str, Any], dict[str, Any]], list[list[str]]]


def previous_table(results: dict[str, Any], head: list[str], rows: Beside) -> list[str]:
    """Markdown lines comparing this run with the one it replaced (``previous``): ``rows``
    gets (this summary, the previous summary) and returns the table's cells."""
    prev = results.get("previous")
    if not prev:
        return []
    body = rows(results["summary"], prev["summary"])
    if not body:
        return []
    out = ["", f"This run beside the run it replaced ({prev['date']}):", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    out += ["| " + " | ".join(cells) + " |" for cells in body]
    return out


def write_results(result: dict[str, Any], path: Path | None) -> None:
    """Write ``result`` to ``path`` (none: nothing), keeping what it replaces as
    ``previous`` unless the caller set that key itself."""
    if path and "previous" not in result:
        previous = previous_run(path)
        if previous:
            result["previous"] = previous
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}", file=sys.stderr)


class LoadSampler:
    """Samples the 1-minute load average every ``period`` s while a scenario runs (other
    engineers share the box: a loaded run must say so)."""

    def __init__(self, period: float = 5.0) -> None:
        self.period = period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.period):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        s = self.samples or [os.getloadavg()[0]]
        return {"min": min(s), "median": statistics.median(s), "max": max(s)}


# -- figures ----------------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}  # fmt: skip


def num(v: float | None, digits: int = 3) -> str:
    """A figure for a table: integers with thin thousands separators from 100 up, one
    decimal from 10, two below (``digits`` is accepted for call sites, unused)."""
    if v is None or v != v:
        return "—"
    if abs(v) >= 100:
        return f"{v:,.0f}".replace(",", " ")
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def med_range(s: dict[str, float] | None, digits: int = 3, unit: str = "") -> str:
    """``median [min–max]`` (the range only when there is more than one sample)."""
    if not s:
        return "—"
    text = num(s["median"], digits) + unit
    if s.get("n", 2) > 1 and s["min"] != s["max"]:
        text += f" [{num(s['min'], digits)}–{num(s['max'], digits)}]"
    return text


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b:
        return "—"
    return f"{a / b:.2f}"


def machine_line(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    load = results.get("loadavg") or {}
    text = (
        f"Machine: {m.get('cpus', '?')} vCPU ({m.get('cpu_model', '?')}), kernel "
        f"{m.get('kernel', '?')}, Python {m.get('python', '?')}"
    )
    if load:
        text += (
            f"; 1-min load average during the run {load['min']:.1f}–{load['max']:.1f} "
            f"(median {load['median']:.1f})"
        )
    if not load and m.get("loadavg_at_start"):
        text += f"; 1-min load average at the start {m['loadavg_at_start'][0]:.1f}"
    when = results.get("started")
    if when:
        text += f"; run {when}"
    return text + "."


# Where a run wrote (not how it ran), and idle's --merge: left out of a reproduced command.
NOT_SETTINGS = ("json", "keep", "merge", "images", "workdir")


def _arg_text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(_arg_text(v) for v in value)
    return str(value)


def _same(value: Any, default: Any) -> bool:
    numbers = (int, float)
    if isinstance(value, numbers) and isinstance(default, numbers):
        return float(value) == float(default)
    return _arg_text(value) == _arg_text(default)


def command_line(name: str, parser: argparse.ArgumentParser, recorded: dict[str, Any],
                 always: tuple[str, ...] = ()) -> str:  # fmt: skip
    """``python -m bench run NAME`` with the flags that reproduce a run whose arguments were
    ``recorded`` (a results file's ``args``): every setting the run had that is not
    ``parser``'s default, and those named in ``always`` even when they are, in the
    parser's order, as real arguments (``--quick`` too). Where the run wrote its results
    and logs is left out: the command writes to the default places."""
    words = ["python", "-m", "bench", "run", name]
    for dest, default in vars(parser.parse_args([])).items():
        if dest in NOT_SETTINGS or dest not in recorded:
            continue
        value, flag = recorded[dest], "--" + dest.replace("_", "-")
        if isinstance(default, bool):  # a store_true flag
            words += [flag] if value else []
        elif value is not None and (dest in always or not _same(value, default)):
            words += [flag, shlex.quote(_arg_text(value))]
    return " ".join(words)


def pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- the page ---------------------------------------------------------------------------------


def results_file(results_dir: Path, name: str) -> Path | None:
    path = results_dir / f"{name}.json"
    return path if path.exists() else None


def replace_section(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- BEGIN bench:{name} -->", f"<!-- END bench:{name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    return text.rstrip() + f"\n\n{block}\n"


def render(results_dir: Path = RESULTS, doc: Path = DOC, images: Path = IMAGES,
           only: list[str] | None = None) -> dict[str, str]:  # fmt: skip
    """Rewrite every section that has results; returns {scenario: 'ok' | why not}."""
    images.mkdir(parents=True, exist_ok=True)
    text = doc.read_text()
    status: dict[str, str] = {}
    for name in only or (*SECTIONS, *REPORT_ONLY):
        path = results_file(results_dir, name)
        if path is None:
            status[name] = "no results"
            continue
        try:
            module = importlib.import_module(f"bench.{name}")
        except ImportError as e:
            status[name] = f"no module: {e}"
            continue
        if not hasattr(module, "report"):
            status[name] = "no report()"
            continue
        try:
            section = module.report(json.loads(path.read_text()), images)
        except Exception as e:  # noqa: BLE001 - one bad file must not cost the other sections
            status[name] = f"report() failed, section kept: {type(e).__name__}: {e}"
            continue
        text = replace_section(text, name, section)
        status[name] = "ok"
    doc.write_text(text)
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--doc", type=Path, default=DOC)
    p.add_argument("--images", type=Path, default=IMAGES)
    p.add_argument("--only", help="comma-separated scenarios (default: all)")
    args = p.parse_args(argv)
    started = time.monotonic()
    only = args.only.split(",") if args.only else None
    status = render(args.results, args.doc, args.images, only)
    for name, what in status.items():
        print(f"{name:<10} {what}")
    print(f"wrote {args.doc} in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
