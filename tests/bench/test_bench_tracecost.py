"""Smoke test of ``python -m bench tracecost`` (bench/tracecost.py) with tiny counts: the
in-process part runs through the harness's entry point with tracing off and on, every
recipient gets its frame in every variant, the traced hub really traced, and the figures
and the default rule are written. Never asserts what the figures are (that is a quiet
machine's job, docs/performance.md "Tracing cost")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import tracecost

ROOT = Path(__file__).resolve().parents[2]


def test_requests_reach_the_keys_they_name():
    keys = [tracecost.ConnectionKey(f"c{i}", "s", "/x") for i in range(5)]
    bodies = [json.loads(b) for b in tracecost.request_bodies(keys, 3, 4, "t")]
    assert [len(b["to"]) for b in bodies] == [3, 3, 3, 3]
    assert bodies[0]["to"] == [list(k) for k in keys[:3]]
    assert bodies[1]["to"] == [list(keys[3]), list(keys[4]), list(keys[0])]  # round robin
    assert len({b["id"] for b in bodies}) == 4
    assert set(bodies[0]) == {"id", "to", "data"}  # the fast path's shape (no trace context)


def test_the_traced_variant_records_and_the_baseline_does_not():
    keys = [tracecost.ConnectionKey(f"c{i}", "s", "/x") for i in range(3)]
    off, _ = tracecost.make_hub("off", keys)
    traced, sinks = tracecost.make_hub("all", keys)
    assert getattr(off, "observer", None) is None
    assert traced.observer is not None
    body = tracecost.request_bodies(keys, 2, 1, "x")[0]
    hellos = sum(s.frames for s in sinks)
    assert b'"ok":true' in traced.handle_request(body)
    assert sum(s.frames for s in sinks) - hellos == 2
    answer = traced.trace_answer("c0")
    assert answer["mode"] == "all"
    (entry,) = answer["keys"]
    assert [r["status"] for r in entry["dispatches"]] == ["delivered"]
    assert off.trace_answer("c0")["mode"] == "off"


def test_the_quick_run_through_the_harness_writes_its_figures(tmp_path):
    out = tmp_path / "tracecost.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "tracecost", "--quick", "--parts", "inproc",
         "--recipients", "1,10", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "default rule: trace = " in run.stdout
    figures = json.loads(out.read_text())
    assert [r["recipients"] for r in figures["inproc"]] == [1, 10]
    for result in figures["inproc"]:
        assert {"off", "all"} <= set(result["variants"])
        assert result["variants"]["all"]["us_per_event"] > 0
        assert "delta_us_per_recipient" in result["variants"]["all"]
    assert figures["rule"]["default"] in ("all", "off")
    assert figures["rule"]["measured"] is True
    assert "loadavg" in figures and "machine" in figures


def test_the_rule_turns_tracing_off_past_either_limit():
    def inproc(delta: float) -> list[dict]:
        return [{"variants": {"off": {}, "all": {"delta_us_per_recipient": delta}}}]

    def procs(ratio: float) -> dict:
        return {"summary": {"orbited-off": {}, "orbited-trace": {"cpu_ratio_to_off": ratio}}}

    assert tracecost.rule(inproc(0.4), procs(1.02))["default"] == "all"
    assert tracecost.rule(inproc(1.3), procs(1.02))["default"] == "off"
    assert tracecost.rule(inproc(0.4), procs(1.05))["default"] == "off"
    assert tracecost.rule(inproc(0.4), None)["default"] == "all"
    assert tracecost.rule(None, None) == {
        "default": None, "measured": False, "us_per_recipient_worst": None,
        "cpu_share": None, "reasons": [],
    }  # fmt: skip


@pytest.mark.parametrize("bad", [["--recipients", "0"], ["--recipients", "a"],
                                 ["--parts", "x"], ["--variants", "nope"]])  # fmt: skip
def test_bad_options_are_refused(bad):
    with pytest.raises(SystemExit) as exited:
        tracecost.main(bad)
    assert exited.value.code == 2
