"""Issue 16, with real processes: a node is SIGKILLed while its browser has read events it
had not acknowledged yet; the web app (acknowledged mode, through HaloD's route ports)
resends them to the route's new owner and the page — the bench's simulated browser, which
deduplicates by event id as js/orbited.js does — sees each event exactly once."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
from websockets.sync.client import connect

from bench.browsers import Browser, Options, Shared
from orbited.client import BlockingClient, HaloDCluster
from tests.conftest import SECRET, HaloDProcess, keys_on_routes, send_event, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def procs():
    started = []
    yield started
    for proc in reversed(started):
        if proc.alive():
            proc.stop(signal.SIGTERM if isinstance(proc, HaloDProcess) else signal.SIGKILL)


def test_a_resend_after_a_node_crash_reaches_the_page_once(tmp_path, procs):
    halod = HaloDProcess(tmp_path, "--spares", "0", "--heartbeat-interval", "0.2",
                         "--grace", "0.5", proxy=True).start()  # fmt: skip
    procs.append(halod)
    n1 = halod.node(tmp_path, "n1")
    procs.append(n1)
    n2 = halod.node(tmp_path, "n2")
    procs.append(n2)
    cluster = HaloDCluster("127.0.0.1", halod.sp_base, halod.browser_base)
    route = next(r for r, owner in halod.owners().items() if owner == "n1")
    (key,) = keys_on_routes([route], 1)
    page = Browser(key, "ws", "", Shared(SECRET, Options()))  # the app layer: its counts

    ws = connect(cluster.browser_url(key, SECRET), open_timeout=5, legacy=True)
    page.on_frame(json.loads(ws.recv(timeout=5)))
    results: dict[int, dict] = {}

    def send(n: int) -> None:  # one web-app request, waiting for the browser's ack
        with BlockingClient(cluster, timeout=30, retry_budget=20, backoff=0.2) as app:
            results[n] = app.send([key], {"n": n}, f"evt-{n}", ack=20)[key]

    senders = [threading.Thread(target=send, args=(n,)) for n in range(1, 6)]
    for t in senders:
        t.start()
    for _ in range(5):  # read, never acknowledged: the ack dies with the node
        page.on_frame(json.loads(ws.recv(timeout=5)))
    assert page.report()["count"] == 5
    n1.stop(signal.SIGKILL)
    ws.close()
    wait_for(
        lambda: halod.owners()[route] == "n2" and halod.synced(), "the route failed over to n2"
    )
    # The page reconnects with its old position: the new owner's stream is a reset, and
    # the resent events come again, with their ids.
    ws = connect(cluster.browser_url(key, SECRET) + f"&last={page.position()}", open_timeout=5,
                 legacy=True)  # fmt: skip
    hello = json.loads(ws.recv(timeout=5))
    assert hello["type"] == "hello" and hello["reset"] is True
    page.on_frame(hello)
    resent = []
    while len(resent) < 5:
        frame = json.loads(ws.recv(timeout=10))
        if frame["type"] == "event":
            resent.append(frame["id"])
        page.on_frame(frame)
    assert sorted(resent) == [f"evt-{n}" for n in range(1, 6)]
    ws.send(json.dumps({"type": "ack", "seq": page.seq}))  # dropped resends are acked too
    for t in senders:
        t.join(timeout=30)
    assert {n: r["status"] for n, r in results.items()} == {n: "acked" for n in range(1, 6)}
    report = page.report()
    assert (report["count"], report["dups"], report["dup_dropped"]) == (5, 0, 5)
    ws.close()


def test_the_js_client_in_chromium_drops_resends_after_a_node_crash(chromium_cluster):
    """The same with the real JS client in headless Chromium (the page of
    tests/integration/test_browser.py): the node is SIGKILLed and restarted (a new stream:
    a reset), the web app resends the events the page had read, in the acknowledged mode;
    the page's onMessage sees each once, and its acks still confirm the dropped resends."""
    from tests.integration.test_browser import open_page, received, wait_received

    node = chromium_cluster["node"]
    to = [["crash-js", "s", "/t"]]
    context, page = open_page(chromium_cluster, "crash-js", "websocket")
    try:
        with node.req() as req:
            for n in range(5):
                assert send_event(req, f"js-{n}", to, n)["results"][0]["status"] == "delivered"
        wait_received(page, 5)
        node.stop(signal.SIGKILL)
        node.start(http=node.http)
        replies: dict[int, dict] = {}

        def resend(n: int) -> None:  # the web app's resend: same id, to, data
            with node.req(recv_timeout=20_000) as req:
                req.send(json.dumps({"id": f"js-{n}", "to": to, "data": n, "ack": 15}).encode())
                replies[n] = json.loads(req.recv_msg().bytes)["results"][0]

        senders = [threading.Thread(target=resend, args=(n,)) for n in range(5)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(timeout=25)
        # the page confirmed the resends it dropped (the JS acks within a second)
        assert {n: r["status"] for n, r in replies.items()} == {n: "acked" for n in range(5)}
        with node.req() as req:
            send_event(req, "js-5", to, 5)
        wait_received(page, 6)
        time.sleep(0.3)
        assert [d for _, d, _ in received(page)] == [0, 1, 2, 3, 4, 5]
        assert page.evaluate("window.client.position").endswith(":6")  # 5 resends + 1 new
    finally:
        context.close()


@pytest.fixture(scope="module")
def chromium_cluster(tmp_path_factory):
    pytest.importorskip("playwright.sync_api")
    from tests.integration import test_browser

    if test_browser.CHROMIUM is None:  # pragma: no cover
        pytest.skip("Debian chromium is not installed")
    yield from test_browser.cluster.__wrapped__(tmp_path_factory)
