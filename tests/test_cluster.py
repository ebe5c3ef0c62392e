"""``orbited cluster`` (``./dev run``): what it leaves in its state directory for scripts —
cluster.json lists live processes only, and nothing with a pid outlives the cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent


def read_state(state: Path) -> dict | None:
    try:
        return json.loads((state / "cluster.json").read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_cluster_json_forgets_dead_pids_and_goes_with_the_cluster(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "orbited.cli", "cluster", "--state-dir", str(tmp_path),
         "--free-ports", "--heartbeat-interval", "0.25", "--grace", "1", "--no-status"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        output: list[str] = []
        while not any("cherrychat is ready" in line for line in output):
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, "".join(output)
            output.append(line)
        state = read_state(tmp_path)
        assert state is not None
        pids = state["pids"]
        assert set(pids) == {"halod", "cherrychat", "n1", "n2", "n3"}
        os.kill(pids["n1"], signal.SIGKILL)
        # A process that died is no longer listed as running (its pid may be reused).
        wait_for(lambda: "n1" not in (read_state(tmp_path) or {"pids": {"n1": 0}})["pids"],
                 "cluster.json to drop n1", timeout=10)  # fmt: skip
        state = read_state(tmp_path)
        assert state["exited"] == {"n1": -signal.SIGKILL}
        assert state["pids"] == {k: v for k, v in pids.items() if k != "n1"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        # Stopped: no file names a pid of the cluster any more.
        assert not (tmp_path / "cluster.json").exists()
        assert sorted(p.name for p in tmp_path.glob("*.ready.json")) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
