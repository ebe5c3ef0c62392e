"""Smoke test of ``bench.spcost`` (the SP server's CPU per request): it runs, every
request of every connection gets its reply (the client exits non-zero otherwise), the
figure is printed (its value is the bench's business, never asserted here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("handler", ["stub", "hub"])
def test_spcost_prints_a_figure(handler: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.spcost", "--handler", handler, "--batch", "20",
         "--batches", "20", "--reps", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "µs of CPU per request (best of 2;" in done.stdout
    assert f"handler {handler}, 20 per read, 20 reads" in done.stdout
