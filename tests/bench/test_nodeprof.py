"""bench/nodeprof.py as the harness uses it: a launcher whose SIGUSR1 toggles a CPU
profile and whose SIGUSR2 times a full collection, and the commands that print them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

WORKLOAD = """
import os, signal, time
def busy():
    return sum(i * i for i in range(200_000))
os.kill(os.getpid(), signal.SIGUSR1)  # start
busy()
os.kill(os.getpid(), signal.SIGUSR1)  # stop: .0 written
keep = [[i] for i in range(10_000)]
os.kill(os.getpid(), signal.SIGUSR2)  # a timed full collection
print("done")
"""


def test_launcher_profiles_by_signal_and_times_full_collections(tmp_path):
    (tmp_path / "workload.py").write_text(WORKLOAD)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), ORBITED_PROFILE=str(tmp_path / "prof"),
               ORBITED_GC_STATS=str(tmp_path / "gc"))  # fmt: skip
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "nodeprof.py"), "-m", "workload"],
                         env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "done"
    (profile,) = tmp_path.glob("prof.*.0")
    (gc_file,) = tmp_path.glob("gc.*.json")
    stats = json.loads(gc_file.read_text())
    assert len(stats["forced_full"]) == 1 and stats["tracked"] > 10_000
    shown = subprocess.run([sys.executable, "-m", "bench.nodeprof", "show", str(profile)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "busy" in shown.stdout
    printed = subprocess.run([sys.executable, "-m", "bench.nodeprof", "gc", str(gc_file)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "forced full collection" in printed.stdout and "generation 2" in printed.stdout
