"""Per-user state travels with a planned move (docs/halod-protocol.md, "Hand-off": the
last ``handoff`` message's ``users``): an event held for a user with no tab on the old
owner is delivered by the new owner when the user opens one, with real processes."""

from __future__ import annotations

import json
import signal

import pytest
from websockets.sync.client import connect

from orbited.client import BlockingClient, HaloDCluster
from orbited.core.keys import Selector
from tests.conftest import SECRET, HaloDProcess, keys_on_routes, wait_for

pytestmark = pytest.mark.slow


def test_a_user_hold_moves_with_its_route_when_a_node_joins(tmp_path):
    halod = HaloDProcess(tmp_path, "--spares", "0", "--heartbeat-interval", "0.2",
                         "--proxy-on-exit", "stop", proxy=True).start()  # fmt: skip
    procs = [halod]
    try:
        procs.append(halod.node(tmp_path, "n1"))
        cluster = HaloDCluster("127.0.0.1", halod.sp_base, halod.browser_base)
        (key,) = keys_on_routes([20])  # route 20 goes to n2 when it joins
        app = BlockingClient(cluster, backoff=0.2)
        # Nobody of this user is connected: the acknowledged-mode wildcard is held on n1.
        results = app.send([Selector(key.user, None)], {"n": 1}, "held-1", ack=0.3)
        (result,) = results.values()
        assert result["status"] == "no_connection" and result.get("held") is True
        procs.append(halod.node(tmp_path, "n2"))  # takes route 20, with a hand-off
        wait_for(
            lambda: halod.owners().get(20) == "n2" and halod.synced(), "route 20 on n2", timeout=15
        )
        with connect(cluster.browser_url(key, SECRET), open_timeout=5) as ws:
            frames = [json.loads(ws.recv(timeout=5)) for _ in range(2)]
        assert frames[0]["type"] == "hello"
        assert frames[1]["type"] == "event" and frames[1]["data"] == {"n": 1}
        assert frames[1]["id"] == "held-1"
    finally:
        for proc in reversed(procs):
            if proc.proc is not None and proc.proc.poll() is None:
                proc.stop(signal.SIGTERM if isinstance(proc, HaloDProcess) else signal.SIGKILL)
