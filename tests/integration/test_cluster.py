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

from orbited.cluster import EPHEMERAL_RANGE, free_port_block
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]


def worker_alive(state: Path) -> int | None:
    """The built-in proxy's worker of the cluster in ``state``, if it runs (not a zombie)."""
    try:
        pid = int((state / "proxy" / "worker.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError):
        return None
    return pid if b"proxy_worker" in cmdline and status != "Z" else None


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
        assert worker_alive(tmp_path) is not None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        # The proxy worker goes too (HaloD's default, proxy_on_exit = keep, would leave it).
        assert worker_alive(tmp_path) is None
        # Stopped: no file names a pid of the cluster any more.
        assert not (tmp_path / "cluster.json").exists()
        assert sorted(p.name for p in tmp_path.glob("*.ready.json")) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_ctrl_c_ends_the_proxy_worker_of_a_halod_that_was_killed(tmp_path):
    """A SIGKILLed HaloD cannot stop its worker (it forwards on by design): the cluster
    ends it itself, so ``./dev run`` leaves nothing holding the route ports."""
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
        worker = worker_alive(tmp_path)
        assert worker is not None
        os.kill(read_state(tmp_path)["pids"]["halod"], signal.SIGKILL)
        wait_for(lambda: "halod" not in (read_state(tmp_path) or {"pids": {"halod": 0}})["pids"],
                 "cluster.json to drop halod", timeout=10)  # fmt: skip
        assert worker_alive(tmp_path) == worker  # it outlived HaloD
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert worker_alive(tmp_path) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_free_port_blocks_avoid_the_ephemeral_range():
    """Outgoing connections take ephemeral ports at any moment: a block picked there could
    be taken before the data plane listens on it (seen as "cannot open the route ports")."""
    first, last = map(int, EPHEMERAL_RANGE.read_text().split())
    for _ in range(50):
        base = free_port_block(48)
        assert base + 48 <= first or base > last


def test_a_picked_block_is_not_picked_again_before_it_is_bound(monkeypatch):
    # The failover bench picked HaloD's control port, then a block for the proxy's routes
    # that overlapped it (neither was bound yet): "Address already in use" in CI.
    import orbited.cluster as cluster

    low = free_port_block(7)  # free now; then forget it was handed out
    monkeypatch.setattr(cluster, "_HANDED_OUT", [], raising=False)
    monkeypatch.setattr(cluster, "listen_port_range", lambda: (low, low + 7))
    first = free_port_block(4)  # every other block of 4 in 7 ports overlaps it
    with pytest.raises(cluster.ClusterError, match="no free block of ports"):
        free_port_block(4)
    assert low <= first <= low + 3


def test_the_status_line_puts_users_failovers_and_deaths_before_the_nodes(tmp_path, monkeypatch):
    # A terminal cuts the line at its width: what changes after a kill must come first.
    from orbited import cluster as cluster_module

    answers = {
        "http://chat/healthz": {"online": 2},
        "http://halod/status": {
            "failovers": 1,
            "nodes": [
                {"name": "n2", "state": "active", "ranges": "1-12", "connections": 3,
                 "connected": True, "disconnected_for": None},
                {"name": "n3", "state": "active", "ranges": "13-24", "connections": 1,
                 "connected": True, "disconnected_for": None},
                {"name": "n1", "state": "failed"},
            ],
        },
    }  # fmt: skip
    monkeypatch.setattr(cluster_module, "http_json", lambda url, timeout: answers[url])
    cluster = cluster_module.LocalCluster(cluster_module.ClusterConfig(state_dir=tmp_path))
    cluster.url, cluster.halod_status, cluster.halod_statuses = (
        "http://chat/",
        "http://halod",
        ["http://halod"],
    )
    dead = cluster_module.Child("n1", ["false"], tmp_path)
    dead.proc = subprocess.Popen(["sh", "-c", "kill -9 $$"])
    dead.proc.wait()
    cluster.children = {"n1": dead}
    line = cluster.status_line()
    assert line.split(" · ")[1:] == [
        "2 online", "failovers 1", "n1 exited (-9)",
        "n2 active (routes 1-12, 3 conn)", "n3 active (routes 13-24, 1 conn)", "n1 failed",
    ]  # fmt: skip
