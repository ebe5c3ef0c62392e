"""Smoke test of ``python -m bench failover --quick`` (bench/failover.py) on the built-in
proxy, in the host's loopback (no namespace): the harness starts HaloD, real nodes,
simulated browsers and the web app, runs every case (a node killed with and without a
spare, a drain, a join, HaloD killed and restarted), cleans up and writes its JSON. It
asserts that each case ran and measured what it names, never what the figures are
(timings belong to the bench, docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_mode_runs_every_case_on_the_proxy(tmp_path: Path) -> None:
    out = tmp_path / "failover.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "failover", "--quick", "--backends", "proxy",
         "--netns", "no", "--json", str(out), "--keep", str(tmp_path / "logs")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {r["case"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"kill", "kill-nospare", "drain", "join", "halod"}
    for name, run in runs.items():
        assert "error" not in run, (name, run.get("error"))
        assert run["backend"] == "proxy" and run["clients"] == 60
    for name in ("kill", "kill-nospare", "drain", "join"):
        assert runs[name]["moved_routes"], name  # the incident moved routes
        assert runs[name]["clients_moved"] > 0
    assert runs["kill"]["affected"] > 0 and runs["kill"]["recovery_p99_s"] is not None
    assert runs["drain"]["silence_max_s"] is not None
    assert runs["halod"]["moved_routes"] == []  # HaloD's restart moved nothing
    assert "failover: seconds from the incident" in done.stdout
