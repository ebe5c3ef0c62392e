"""Smoke test of ``python -m bench dispatch fanout --quick`` (bench/fanout.py): one request
to every client's key on Orbited and one publish to a channel on Nchan, in one run; every
recipient received every round, and the figures exist (their values are the bench's
business, never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.peers import available

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not available("nchan"), reason="nchan is not installed")
def test_quick_fanout_orbited_and_nchan(tmp_path: Path) -> None:
    out = tmp_path / "fanout.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "dispatch", "fanout", "--quick", "--clients", "150",
         "--json", str(out), "--workdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    runs = {r["server"]: r for r in result["runs"]}
    assert set(runs) == {"orbited", "nchan"}
    for run in runs.values():
        assert run["connected"] == 150 and run["connect_failed"] == 0, run["client_errors"]
        assert len(run["rounds"]) == 3
        assert all(r["received"] == 150 for r in run["rounds"]), run["rounds"]
        assert run["received"] == run["expected"] == 450
        assert run["cpu_us_per_recipient"] >= 0
    assert "µs CPU/recipient" in done.stdout
    assert "orbited" in done.stdout and "nchan" in done.stdout
