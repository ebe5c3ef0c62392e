"""bench/control.py's harness side, without HaloD: where a run's results go."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import control


@pytest.fixture
def fake_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """control.main with its runs replaced by a stub; returns where RESULTS points."""
    results = tmp_path / "results" / "control.json"
    monkeypatch.setattr(control, "RESULTS", results, raising=False)
    monkeypatch.setattr(
        control, "run_once", lambda kind, size, args, tmp: {"server": kind, "nodes": size}
    )
    monkeypatch.setattr(control, "print_report", lambda results, args: None)
    monkeypatch.setattr(control.signal, "signal", lambda *a: None)  # keep pytest's handlers
    return results


def test_a_run_writes_bench_results_control_json_by_default(fake_runs: Path) -> None:
    # docs/performance.md regenerates its control section from bench/results/control.json,
    # so `python -m bench run control` must write it, as stages, idle and storm do.
    assert control.main(["--nodes", "4", "--servers", "raw"]) == 0
    written = json.loads(fake_runs.read_text())
    assert written["runs"] == [{"server": "raw", "nodes": 4}]
    assert {"cpus", "cpu_model", "kernel", "python", "mem_gb"} <= set(written["machine"])


def test_quick_writes_no_results_unless_asked(fake_runs: Path, tmp_path: Path) -> None:
    assert control.main(["--quick", "--servers", "raw"]) == 0
    assert not fake_runs.exists()
    asked = tmp_path / "quick.json"
    assert control.main(["--quick", "--servers", "raw", "--json", str(asked)]) == 0
    assert json.loads(asked.read_text())["runs"] == [{"server": "raw", "nodes": 64}]
