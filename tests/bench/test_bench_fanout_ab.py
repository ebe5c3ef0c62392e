"""Smoke tests of the fan-out A/B driver (bench/fanout_ab.py) and ``bench.hubcost
--fanout``: they run, every subscriber gets every round, the figures exist (their values
are the bench's business, never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.peers import available

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not available("nchan"), reason="nchan is not installed")
def test_fanout_ab_runs_this_tree_and_nchan(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.fanout_ab", "--variants", "head=.,nchan", "--clients", "40",
         "--rounds", "2", "--reps", "1", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["variant"] for r in runs) == ["head", "nchan"]
    assert all(r["recipients"] == 80 and r["us_per_recipient"] > 0 for r in runs)
    assert "µs CPU / recipient" in done.stdout


def test_hubcost_fanout_prints_a_figure() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.hubcost", "--fanout", "300", "--reps", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "µs of CPU per recipient (best of 2 requests to 300 keys)" in done.stdout


def test_hubcost_attach_runs_every_long_poll_cycle() -> None:
    """``--attach``: it runs, and each held poll took its event (the script exits with an
    error naming the key otherwise)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.hubcost", "--attach", "200", "--reps", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cold attach" in done.stdout and "long-poll delivery" in done.stdout
