"""``orbited cluster`` with HaloD's operator key, and ``orbited trace`` through HaloD's
``/trace`` (docs/operations.md, "Tracing a delivery"; docs/halod-protocol.md, "Status
endpoints"): the cluster makes the key (mode 0600) and names it in cluster.json; the
trace command finds HaloD and the key there, asks every node, and prints the record of
an event written to a real browser connection with its verdict; without the key, HaloD
refuses both the trace and a drain."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pynng
import pytest
from websockets.sync.client import connect

from orbited.cluster import ClusterConfig, LocalCluster, http_json
from orbited.core.keys import ConnectionKey
from orbited.core.tokens import issue_token, load_secret
from orbited.whereis import locate, route_for

ROOT = Path(__file__).resolve().parents[2]
KEY = ConnectionKey("alice", "s1", "/chat")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=env)  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    config = ClusterConfig(
        state_dir=tmp_path_factory.mktemp("cluster"), free_ports=True, fresh=True,
        heartbeat_interval=0.25, missed_heartbeats=3, grace=1.0, keepalive=5.0,
    )  # fmt: skip
    with LocalCluster(config) as running:
        yield running


def no_key_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "HALOD_OPERATOR_KEY_FILE"}


@pytest.mark.slow
def test_the_operator_key_is_made_private_and_named_in_cluster_json(cluster):
    key_file = cluster.state / "operator.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(load_secret(key_file)) >= 32
    info = json.loads((cluster.state / "cluster.json").read_text())
    assert info["operator_key_file"] == str(key_file)


@pytest.mark.slow
def test_trace_through_haloD_shows_a_written_event(cluster):
    status = http_json(f"{cluster.halod_status}/status")
    placement = locate(status, route_for(status, KEY))
    secret = load_secret(cluster.state / "secret")
    token = issue_token(secret, KEY)
    url = f"ws://{placement.browser}/orbited/ws?token={token}"
    with connect(url, open_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "hello"
        with pynng.Req0(dial=placement.sp, recv_timeout=5000, send_timeout=5000) as req:
            req.send(json.dumps({"id": "42", "to": [list(KEY)], "data": "hi"}).encode())
            assert json.loads(req.recv())["results"][0]["status"] == "delivered"
        assert json.loads(ws.recv(timeout=5))["id"] == "42"
        state = ["--state-dir", str(cluster.state)]
        done = run("orbited.cli", "trace", "--user", "alice", "--event", "42", *state,
                   env=no_key_env())  # fmt: skip
        assert done.returncode == 0, done.stderr
        (verdict,) = [line for line in done.stdout.splitlines() if line.startswith("event 42")]
        assert verdict.startswith(
            f'event 42 → ["alice","s1","/chat"]: written to ws on {placement.node} at '
        )
        answer = json.loads(run("orbited.cli", "trace", "--user", "alice", "--json", *state,
                                env=no_key_env()).stdout)  # fmt: skip
        assert sorted(answer["asked"]) == sorted(answer["answered"]) == ["n1", "n2", "n3"]
        (entry,) = answer["keys"]
        assert entry["owner_now"] == placement.node
        (record,) = [r for r in entry["dispatches"] if r["event"] == "42"]
        assert (record["node"], record["status"], record["transport"]) == (
            placement.node, "delivered", "ws"
        )  # fmt: skip


@pytest.mark.slow
def test_without_the_key_haloD_refuses_trace_and_drain(cluster, tmp_path):
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(b"w" * 40)
    refused = run("orbited.cli", "trace", "--user", "alice", "--url", cluster.halod_status,
                  "--operator-key-file", str(wrong), env=no_key_env())  # fmt: skip
    assert refused.returncode == 1 and "401 unauthorized" in refused.stderr
    drain = run("halod.cli", "drain", "n1", "--url", cluster.halod_status, env=no_key_env())
    assert drain.returncode == 1 and "operator key" in drain.stderr
    nodes = {n["name"]: n["state"] for n in http_json(f"{cluster.halod_status}/status")["nodes"]}
    assert nodes["n1"] == "active"  # nothing was drained
