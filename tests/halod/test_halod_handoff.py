"""Lossless planned moves with real processes (docs/halod-protocol.md, "Hand-off"): when a
node joins or is drained, browsers of the moved routes resume their stream on the new
owner — no reset, no gap, nothing twice — and events the web app sends meanwhile follow."""

from __future__ import annotations

import json
import signal
import urllib.request

import pytest
from websockets.sync.client import ClientConnection, connect

from orbited.client import BlockingClient, HaloDCluster
from tests.conftest import SECRET, HaloDProcess, keys_on_routes, moved_frame, next_frame, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def procs():
    started = []
    yield started
    for proc in reversed(started):  # HaloD (--proxy-on-exit stop) ends its proxy worker
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop(signal.SIGTERM if isinstance(proc, HaloDProcess) else signal.SIGKILL)


def open_ws(cluster: HaloDCluster, key, last: str | None = None) -> ClientConnection:
    url = cluster.browser_url(key, SECRET) + (f"&last={last}" if last else "")
    return connect(url, open_timeout=5, legacy=True)


def frames(ws: ClientConnection, count: int) -> list[dict]:
    return [next_frame(ws) for _ in range(count)]


def test_join_and_drain_hand_mailboxes_over(tmp_path, procs):
    halod = HaloDProcess(tmp_path, "--spares", "0", "--grace", "2", "--heartbeat-interval",
                         "0.2", "--move-close-delay", "0.5", "--proxy-on-exit", "stop",
                         proxy=True).start()  # fmt: skip
    procs.append(halod)
    n1 = halod.node(tmp_path, "n1")
    procs.append(n1)
    cluster = HaloDCluster("127.0.0.1", halod.sp_base, halod.browser_base)
    live, away = keys_on_routes([20], count=2)  # route 20 goes to n2 when it joins
    app = BlockingClient(cluster, backoff=0.2)

    ws = open_ws(cluster, live)
    (hello,) = frames(ws, 1)
    stream = hello["stream"]
    gone = open_ws(cluster, away)
    (away_hello,) = frames(gone, 1)
    gone.close()  # `away` is offline: its events queue in n1's mailbox
    for n in (1, 2, 3):
        results = app.send([live, away], {"n": n}, f"e{n}")
        assert results[live]["status"] == "delivered"
    assert [f["data"]["n"] for f in frames(ws, 3)] == [1, 2, 3]
    ws.send(json.dumps({"type": "ack", "seq": 1}))

    n2 = halod.node(tmp_path, "n2")  # takes routes 13-24 from n1, which hands them over
    procs.append(n2)
    assert [moved_frame(f) for f in frames(ws, 1)] == [
        {"type": "reconnect", "reason": "route_moved"}
    ]
    ws.close()
    # The browser that saw 1..3 resumes from 3 on n2: same stream, nothing replayed.
    ws = open_ws(cluster, live, last=f"{stream}:3")
    (hello,) = frames(ws, 1)
    assert isinstance(hello.pop("spread"), int | float)  # the reconnect hint (protocol.md)
    assert hello == {"type": "hello", "stream": stream, "keepalive": 25.0, "seq": 3,
                     "reset": False, "hash": 2}  # fmt: skip
    # The offline one finds its three queued events on n2.
    gone = open_ws(cluster, away, last=f"{away_hello['stream']}:0")
    got = frames(gone, 4)
    assert got[0]["stream"] == away_hello["stream"] and got[0]["reset"] is False
    assert [(f["seq"], f["data"]["n"]) for f in got[1:]] == [(1, 1), (2, 2), (3, 3)]
    # New events continue the same sequence on n2 (the app's resend after `moved` included).
    results = app.send([live, away], {"n": 4}, "e4")
    assert results[live] == {"status": "delivered", "seq": 4}
    assert frames(ws, 1)[0]["seq"] == 4 and frames(gone, 1)[0]["seq"] == 4
    assert halod.get("status")["nodes"][1]["name"] == "n2"

    # Drain n2: its routes go back to n1, again with their mailboxes.
    wait_for(lambda: halod.nodes()["n2"]["connected"], "n2 connected")
    urllib.request.urlopen(urllib.request.Request(
        f"http://{halod.status_http}/nodes/n2/drain", method="POST"), timeout=5).read()  # fmt: skip
    assert [moved_frame(f) for f in frames(ws, 1)] == [
        {"type": "reconnect", "reason": "route_moved"}
    ]
    ws.close()
    results = app.send([live], {"n": 5}, "e5")  # sent while the browser is between nodes
    assert results[live]["status"] in ("queued", "delivered")
    ws = open_ws(cluster, live, last=f"{stream}:4")
    got = frames(ws, 2)
    assert got[0]["stream"] == stream and got[0]["reset"] is False
    assert (got[1]["seq"], got[1]["data"]["n"]) == (5, 5)
    metrics = urllib.request.urlopen(f"http://{halod.status_http}/metrics", timeout=5).read()
    assert b'halod_handoffs_total{outcome="relayed"}' in metrics
    assert b'halod_handoffs_total{outcome="dropped"} 0' in metrics
    app.close()
    ws.close()
    gone.close()
