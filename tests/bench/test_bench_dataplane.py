"""Smoke test of ``python -m bench dataplane --quick`` (bench/dataplane.py) on the built-in
proxy only, in the host's loopback (no namespace, no root needed): the harness starts,
measures every load on both paths, runs a 50-browser failover, cleans up and writes its
JSON. It asserts that figures exist, never what they are (timings belong to the bench)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_mode_on_the_proxy(tmp_path: Path) -> None:
    out = tmp_path / "dataplane.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "dataplane", "--quick", "--paths", "proxy",
         "--netns", "no", "--json", str(out), "--keep", str(tmp_path / "logs")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    fwd = result["forwarding"]
    assert fwd["paths"] == ["direct", "proxy"]
    for load in ("bulk", "conn", "rr"):
        for path in ("direct", "proxy"):
            figure = fwd["summary"][load][path]
            assert figure["value"]["median"] > 0, (load, path, figure)
            assert figure["ratio"]["median"] > 0
        assert fwd["summary"][load]["proxy"]["halod_cpu"] is not None  # HaloD's CPU was read
    (run,) = result["failover"]["runs"]
    assert "error" not in run, run.get("error")
    assert run["backend"] == "proxy" and run["clients"] == 50
    assert run["detected_s"] is not None and run["affected"] > 0
    assert "failover: SIGKILL" in done.stdout and "forwarding cost" in done.stdout
