"""A rehash on HaloD on etcd, with real processes (docs/halod.md, "Rehash", "High
availability"): the follower's warm copy shows the new hash version, and after the
leader is killed the new leader restores it from etcd, so nodes registering again are
welcomed with it and queued events stay where the rehash put them."""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path

import pytest
from websockets.sync.client import connect

from orbited.core.hashing import route_of
from orbited.core.keys import ConnectionKey
from tests.conftest import send_event, wait_for
from tests.halod.test_halod_rehash import first_hello
from tests.integration.test_halod_ha import (
    EtcdHaloD,
    connected,
    etcd_cluster,  # noqa: F401
    processes,  # noqa: F401
    start_nodes,
)

pytestmark = pytest.mark.slow


def rehash(halod: EtcdHaloD, version: int) -> dict:
    request = urllib.request.Request(
        f"http://{halod.status_http}/rehash", json.dumps({"hash_version": version}).encode(),
        {"content-type": "application/json"}, method="POST",
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=5) as r:
        return json.load(r)


def test_the_hash_version_survives_a_leader_kill(tmp_path: Path, etcd_cluster, processes):  # noqa: F811
    endpoints = etcd_cluster.endpoints
    h1 = EtcdHaloD(tmp_path, "h1", endpoints, "--hash-version", "1", "--spares", "0")
    processes.append(h1.start())
    wait_for(h1.leads, "h1 leads")
    h2 = EtcdHaloD(tmp_path, "h2", endpoints, "--spares", "0")  # its config says 2
    processes.append(h2.start())
    wait_for(lambda: h2.role() == "follower", "h2 follows")
    nodes = start_nodes(tmp_path, [h1, h2], ["a", "b"])
    processes.extend(nodes.values())
    owners = h1.owners()
    assert h1.status()["hash_version"] == 1

    # A key whose owner changes with the version, offline with three queued events.
    key = next(
        k for i in range(1000)
        if owners[route_of(k := ConnectionKey(f"u{i}", "s", "/t"), 24, version=1)]
        != owners[route_of(k, 24, version=2)]
    )  # fmt: skip
    old, new = (nodes[owners[route_of(key, 24, version=v)]] for v in (1, 2))

    def ws(node, last=None):
        url = f"ws://{node.http}/orbited/ws?token={node.token(*key)}"
        return connect(url + (f"&last={last}" if last else ""), open_timeout=5, legacy=True)

    stream = first_hello(lambda: ws(old))["stream"]  # once the owner applied its assign
    with old.req() as req:
        for n in (1, 2, 3):
            assert send_event(req, f"e{n}", [list(key)], n)["results"][0]["status"] == "queued"

    assert rehash(h1, 2)["nodes"] == ["a", "b"]
    wait_for(lambda: h1.status()["rehash"] is None, "the hand-offs")
    wait_for(lambda: h2.status()["hash_version"] == 2, "h2's warm copy to show version 2")

    h1.stop(signal.SIGKILL)
    wait_for(h2.leads, "h2 leads", timeout=5)
    wait_for(lambda: set(connected(h2)) == {"a", "b"}, "nodes registered at h2", timeout=10)
    status = h2.status()
    assert status["hash_version"] == 2 and status["failovers"] == 0
    assert h2.owners() == owners  # a rehash moves keys, never routes
    with ws(new, last=f"{stream}:0") as browser:
        got = [json.loads(browser.recv(timeout=5)) for _ in range(4)]
    assert got[0]["stream"] == stream and got[0]["reset"] is False
    assert [(f["seq"], f["data"]) for f in got[1:]] == [(1, 1), (2, 2), (3, 3)]
