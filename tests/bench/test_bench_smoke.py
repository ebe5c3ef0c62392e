"""Smoke test of the benchmark harness (bench/__main__.py, bench/report.py): every scenario's
quick mode end to end through ``python -m bench all --quick`` (real servers, real load
processes; a peer whose binaries are missing is skipped by the scenario itself), then the
report rendered from that JSON into a scratch copy of docs/performance.md with every image
drawn. Asserts that the harness works — results exist, sections are replaced, text outside
the markers is kept, PNGs are written — never what the figures are.

The data-plane scenario's quick mode has its own test (tests/bench/test_bench_dataplane.py); here
its report is rendered from the committed bench/results/dataplane.json.
"""

from __future__ import annotations

import importlib
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report

ROOT = Path(__file__).resolve().parents[2]
QUICK = ("idle", "storm", "control")  # dispatch's quick mode is tested with bench/dispatch.py


def test_replace_section_keeps_the_text_around_the_markers() -> None:
    page = "# T\nintro\n<!-- BEGIN bench:idle -->\nold\n<!-- END bench:idle -->\nreading\n"
    out = report.replace_section(page, "idle", "new table")
    assert (
        out
        == "# T\nintro\n<!-- BEGIN bench:idle -->\nnew table\n<!-- END bench:idle -->\nreading\n"
    )
    # A section the page does not have yet is appended, with its markers.
    out = report.replace_section(out, "storm", "storm table")
    assert out.endswith("<!-- BEGIN bench:storm -->\nstorm table\n<!-- END bench:storm -->\n")
    assert report.replace_section(out, "storm", "again").count("bench:storm") == 2


def test_the_page_has_a_marker_pair_for_every_section() -> None:
    text = report.DOC.read_text()
    for name in report.SECTIONS:
        assert text.count(f"<!-- BEGIN bench:{name} -->") == 1, name
        assert text.count(f"<!-- END bench:{name} -->") == 1, name


def test_formatting_of_spreads() -> None:
    assert report.med_range(report.spread([1.0, 2.0, 4.0])) == "2.00 [1.00–4.00]"
    assert report.med_range(report.spread([18.04])) == "18.0"
    assert report.med_range(None) == "—"
    assert report.num(19_000) == "19 000"


@pytest.mark.slow
def test_all_quick_then_report(tmp_path: Path) -> None:
    results = tmp_path / "results"
    doc = tmp_path / "performance.md"
    images = tmp_path / "images"
    shutil.copyfile(report.DOC, doc)
    results.mkdir()
    shutil.copyfile(ROOT / "bench" / "results" / "dataplane.json", results / "dataplane.json")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "all", "--quick", "--only", ",".join(QUICK),
         "--results", str(results), "--doc", str(doc), "--images", str(images)],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    status = json.loads(done.stdout[done.stdout.index("{") :])
    for name in QUICK:
        assert status[name]["rc"] == 0 and status[name]["report"] == "ok", status
        result = json.loads((results / f"{name}.json").read_text())
        assert result["machine"]["cpus"] >= 1 and "loadavg" in result
    idle = json.loads((results / "idle.json").read_text())
    for run in idle["runs"]:
        assert "error" not in run, run
        for size in run["sizes"]:
            assert size["held"] == size["size"] and size["received"] == size["held"], size
            assert size["after_kb"]["pss"] > 0
    storm = json.loads((results / "storm.json").read_text())
    assert storm["runs"] and all(r["steps"] and "error" not in r for r in storm["runs"])
    assert {r["server"] for r in storm["runs"]} >= {"orbited"}

    page = doc.read_text()
    original = report.DOC.read_text()
    # hand-written text outside the markers is untouched
    assert page.split("<!-- BEGIN bench:")[0] == original.split("<!-- BEGIN bench:")[0]
    for name in (*QUICK, "dataplane"):
        section = page.split(f"<!-- BEGIN bench:{name} -->")[1].split(f"<!-- END bench:{name}")[0]
        assert "python -m bench run " + name in section, name
        assert "| " in section  # a table
    pngs = {p.name for p in images.glob("perf-*.png")}
    assert {"perf-idle-memory.png", "perf-storm-rates.png", "perf-control-heartbeat.png",
            "perf-dataplane-forwarding.png", "perf-dataplane-failover.png"} <= pngs  # fmt: skip
    for png in images.glob("perf-*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # `report` alone redraws from the JSON (same sections, images rewritten).
    for png in images.glob("perf-*.png"):
        png.unlink()
    again = subprocess.run(
        [sys.executable, "-m", "bench", "report", "--results", str(results), "--doc", str(doc),
         "--images", str(images)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert doc.read_text() == page
    assert {p.name for p in images.glob("perf-*.png")} == pngs


def test_idle_merge_replaces_only_the_rerun_servers() -> None:
    from bench import idle

    old = {"started": "t0", "args": {"sizes": "5"}, "skipped": {"nchan": "x"},
           "runs": [{"server": "orbited", "n": 1}, {"server": "nchan", "n": 2}]}  # fmt: skip
    new = {"started": "t1", "loadavg": {"min": 1, "median": 1, "max": 1}, "args": {},
           "runs": [{"server": "nchan", "n": 3}]}  # fmt: skip
    merged = idle.merge(old, new, ["nchan"])
    assert merged["runs"] == [{"server": "orbited", "n": 1},
                              {"server": "nchan", "n": 3, "from_run": "t1"}]  # fmt: skip
    assert merged["started"] == "t0" and merged["reruns"][0]["servers"] == ["nchan"]
    assert merged["skipped"] == {}


def test_storm_kept_up_needs_no_error_and_the_offered_rate() -> None:
    from bench import storm

    def step(rate: int, achieved: float, errors: int = 0) -> dict:
        return {"rate": rate, "achieved": achieved, "error_count": errors,
                "errors": {"timeout": errors} if errors else {}, "p50_ms": 1.0,
                "p99_ms": 2.0, "server_cpu_us_per_conn": 5.0, "launch_lag_max_s": 0.0}  # fmt: skip

    runs = [
        {"server": "s", "transport": "ws", "steps": [step(100, 100), step(200, 150)]},
        {"server": "s", "transport": "ws", "steps": [step(100, 99), step(200, 199, 1)]},
        {"server": "s", "transport": "ws", "steps": [step(100, 100), step(200, 200)]},
    ]
    summary = storm.summarize(runs)["s"]["ws"]
    assert summary["kept_up_rate"] == {"median": 100, "min": 100, "max": 200, "n": 3}
    assert summary["steps"]["200"]["error_kinds"] == {"timeout": 1}


def test_a_new_run_shows_the_run_it_replaced_beside_it(tmp_path: Path) -> None:
    from bench import dispatch, storm

    (tmp_path / "images").mkdir()
    assert report.previous_run(tmp_path / "none.json") is None
    old = json.loads((ROOT / "bench" / "results" / "storm.json").read_text())
    old["summary"]["orbited"]["ws"]["kept_up_rate"] = {"median": 800.0, "min": 800, "max": 800}
    path = tmp_path / "storm.json"
    path.write_text(json.dumps(old))
    new = json.loads((ROOT / "bench" / "results" / "storm.json").read_text())
    new["previous"] = report.previous_run(path)
    assert new["previous"]["date"] == old["started"]
    text = storm.report(new, tmp_path / "images")
    kept = new["summary"]["orbited"]["ws"]["kept_up_rate"]["median"]
    beside = text.split("the run it replaced")[1].splitlines()
    row = next(line for line in beside if line.startswith("| orbited | ws | "))
    assert row.split(" | ")[2:4] == [f"{kept:,.0f}/s".replace(",", " "), "800/s"]
    assert f"the run it replaced ({old['started']})" in text

    # dispatch files carry their date in meta; a server the old run lacked shows "—"
    old = json.loads((ROOT / "bench" / "results" / "dispatch.json").read_text())
    gone = old["summary"]["ws"].pop("orbited")
    path = tmp_path / "dispatch.json"
    path.write_text(json.dumps(old))
    new = json.loads((ROOT / "bench" / "results" / "dispatch.json").read_text())
    new["previous"] = report.previous_run(path)
    text = dispatch.report(new, tmp_path / "images")
    beside = text.split("the run it replaced")[1].splitlines()
    row = next(line for line in beside if line.startswith("| ws | orbited | "))
    assert row.split(" | ")[2:4] == [f"{gone['cpu_us_per_event']['median']:.1f}", "—"]


def test_write_results_keeps_the_file_it_replaces_unless_told(tmp_path: Path) -> None:
    path = tmp_path / "storm.json"
    report.write_results({"started": "t0", "summary": {"a": 1}}, path)
    assert "previous" not in json.loads(path.read_text())  # nothing was there
    report.write_results({"started": "t1", "summary": {"a": 2}}, path)
    assert json.loads(path.read_text())["previous"] == {"date": "t0", "summary": {"a": 1}}
    report.write_results({"started": "t2", "summary": {"a": 3}, "previous": None}, path)
    assert json.loads(path.read_text())["previous"] is None  # an idle --merge's choice


def _setting(value: object) -> object:
    """A setting as the run saw it: a list as its comma-separated flag, numbers as float."""
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def _reproduces(module: object, line: str, name: str, recorded: dict) -> None:
    assert "#" not in line, line  # a copied line must not run the defaults
    words = shlex.split(line)
    assert words[:5] == ["python", "-m", "bench", "run", name]
    parsed = vars(module.parser().parse_args(words[5:]))  # type: ignore[attr-defined]
    for dest, value in parsed.items():
        if dest not in report.NOT_SETTINGS and dest in recorded:
            assert _setting(value) == _setting(recorded[dest]), (dest, line)


@pytest.mark.parametrize("name", ["stages", "idle", "storm", "dataplane", "control"])
def test_a_section_s_command_line_reproduces_its_recorded_run(name: str, tmp_path: Path) -> None:
    module = importlib.import_module(f"bench.{name}")
    results = json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())
    text = module.report(results, tmp_path)
    line = next(x for x in text.splitlines() if x.startswith(f"python -m bench run {name}"))
    _reproduces(module, line, name, results["args"])
    # and the page shows what the generator prints for the recorded run
    assert f"\n{line}\n" in (ROOT / "docs" / "performance.md").read_text()


def test_a_quick_run_s_command_line_keeps_every_setting_it_had() -> None:
    from bench import stages, storm

    recorded = vars(storm.parser().parse_args([])) | {
        "servers": "orbited", "transports": "ws", "rates": "50,100", "seconds": 1.0,
        "pause": 0.2, "reps": 1, "procs": 2, "quick": True, "json": "/tmp/x/storm.json",
    }  # fmt: skip
    line = report.command_line("storm", storm.parser(), recorded, always=("rates",))
    assert "--quick" in line.split() and "--servers orbited" in line and "--json" not in line
    _reproduces(storm, line, "storm", recorded)
    recorded = vars(stages.parser().parse_args([])) | {"transports": "poll", "accept": ""}
    line = report.command_line("stages", stages.parser(), recorded)
    assert line == "python -m bench run stages --transports poll --accept ''"
    _reproduces(stages, line, "stages", recorded)
