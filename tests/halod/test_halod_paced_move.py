"""A paced drain with real processes (docs/halod.md, "Paced moves"): HaloD moves the
drained node's routes a step at a time, each step's browsers resume their streams on the
new owner with nothing lost or repeated, and /status shows the routes still to move."""

from __future__ import annotations

import json
import signal
import threading
import urllib.request

import pytest

from orbited.client import BlockingClient, HaloDCluster
from tests.conftest import HaloDProcess, keys_on_routes, moved_frame, next_frame, wait_for
from tests.halod.test_halod_handoff import open_ws

pytestmark = pytest.mark.slow

ROUTES = range(1, 25)


@pytest.fixture
def procs():
    started = []
    yield started
    for proc in reversed(started):
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop(signal.SIGTERM if isinstance(proc, HaloDProcess) else signal.SIGKILL)


def test_a_drain_moves_its_routes_in_steps_and_loses_nothing(tmp_path, procs):
    # 24 browsers, one per route; move_rate 40/s: a step of 0.05 s takes 2 browsers, so the
    # drain of n1 takes 12 steps, each once the last one's hand-offs were relayed.
    halod = HaloDProcess(tmp_path, "--spares", "1", "--heartbeat-interval", "0.2",
                         "--move-rate", "40", "--move-close-delay", "0.5",
                         "--proxy-on-exit", "stop", proxy=True).start()  # fmt: skip
    procs.append(halod)
    procs.append(halod.node(tmp_path, "n1"))
    procs.append(halod.node(tmp_path, "n2"))  # the spare
    cluster = HaloDCluster("127.0.0.1", halod.sp_base, halod.browser_base)
    keys = [keys_on_routes([r])[0] for r in ROUTES]
    app = BlockingClient(cluster, backoff=0.2)
    sockets = {key: open_ws(cluster, key) for key in keys}
    streams = {key: next_frame(ws)["stream"] for key, ws in sockets.items()}
    wait_for(lambda: halod.nodes()["n1"]["connections"] == len(keys), "n1 reports 24")
    results = app.send(keys, {"n": 1}, "e1")
    assert {r["status"] for r in results.values()} == {"delivered"}
    for ws in sockets.values():
        assert next_frame(ws)["data"] == {"n": 1}

    seen: list[tuple[int, int]] = []  # (table_version, routes still moving)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            status = halod.get("status")
            seen.append((status["table_version"], len(status["moving"])))
            done.wait(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        version = halod.get("status")["table_version"]
        drain = f"http://{halod.status_http}/nodes/n1/drain"
        urllib.request.urlopen(urllib.request.Request(drain, method="POST"), timeout=5).read()
        for ws in sockets.values():  # every browser is told when its route's step comes
            assert moved_frame(next_frame(ws, timeout=10)) == {
                "type": "reconnect",
                "reason": "route_moved",
            }
            ws.close()
        wait_for(
            lambda: not halod.get("status")["moving"] and halod.synced(), "the paced move ends"
        )
    finally:
        done.set()
        watcher.join()
    assert max(left for _, left in seen) >= 10  # routes waited for later steps
    assert halod.get("status")["table_version"] - version >= 12  # one change a step
    assert set(halod.owners().values()) == {"n2"}
    assert halod.nodes()["n1"]["routes"] == [] and halod.nodes()["n1"]["state"] == "drained"

    # Each browser resumes its stream on n2 from where it was: nothing lost or repeated.
    sockets = {key: open_ws(cluster, key, last=f"{streams[key]}:1") for key in keys}
    for key, ws in sockets.items():
        hello = next_frame(ws)
        assert (hello["stream"], hello["seq"], hello["reset"]) == (streams[key], 1, False)
    results = app.send(keys, {"n": 2}, "e2")
    assert {r["status"] for r in results.values()} == {"delivered"}
    for ws in sockets.values():
        frame = next_frame(ws)
        assert (frame["seq"], frame["data"]) == (2, {"n": 2})
        ws.send(json.dumps({"type": "ack", "seq": 2}))
        ws.close()
    app.close()
    assert "paced move: routes" in halod.log_file.read_text()
