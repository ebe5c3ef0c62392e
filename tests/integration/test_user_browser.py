"""Issue 21's acceptance in real headless Chromium: one user in several tabs and browsers.

A cluster (HaloD with its built-in proxy data plane, 2 nodes, hash version 2,
`user_max_connections = 3`, the offline hook pointed at a receiver in this test) and
the JS client in pages of their own origin, each tab connecting to its user's route
port. The web app is the real nng (pynng) on the route's SP port. Checked, as
docs/protocol.md promises them ("Addressing a user or a session", "Per-user limits",
"Offline webhooks"; docs/client.md for the page's view):

1. alice in three tabs (WebSocket, SSE, long-poll) of one browser context, bob in a
   second context: an event to ["alice","*","*"] reaches each of alice's tabs exactly
   once and bob's not at all; the reply is `matched` with the three keys;
2. a fourth alice tab, from the second context (another device), is refused with the
   documented code: the page ends `closed`, its detail `user_limit` (WebSocket close
   4429; SSE: HTTP 429);
3. closing one tab leaves the others: the next user event is `delivered` to them once
   each and `queued` for the closed tab's key; a new tab (iframe) is then admitted;
4. carol has no tab: an event with `"offline"` answers `no_connection` with `held`, the
   signed `needs_push` (`no_connection`) reaches the web app; carol opens a tab, gets
   the held event, her client acknowledges it and the `cancel` for the same id follows.
   One of each;
5. a page coming back (each transport) gets the newest latest-value event, with
   `info.latest` and `info.replaced`, and a `skip` of the replaced seqs (no `gap`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from orbited.core.hashing import route_of_user
from orbited.core.keys import ConnectionKey
from orbited.core.tokens import issue_token
from tests.conftest import SECRET, HaloDProcess, wait_for
from tests.integration.test_browser import CHROMIUM, CHROMIUM_ARGS, free_port, playwright

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROUTES = 24
LIMIT = 3

PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8">
<script src="{script}/orbited/client.js"></script></head><body><script>
window.received = []; window.states = []; window.skips = []; window.closeCodes = [];
// the WebSocket close codes as Chromium reports them to the page
const NativeWebSocket = window.WebSocket;
window.WebSocket = class extends NativeWebSocket {{
  constructor(...args) {{
    super(...args);
    this.addEventListener("close", (e) => window.closeCodes.push([e.code, e.reason]));
  }}
}};
const q = new URLSearchParams(location.search);
window.client = new Orbited.OrbitedClient(q.get("node"), {{
  token: q.get("token"), transports: q.get("transports").split(","), base: 100, max: 800,
  position: q.get("position") || undefined,
  onMessage: (data, info) => window.received.push(
    [info.seq, info.id, data, info.transport, info.latest ?? null, info.replaced]),
  onState: (state, info) => window.states.push([state, info.transport, info.detail ?? null]),
}});
window.client.on("skip", (seqs, why) => window.skips.push([seqs, why]));
window.client.connect();
</script></body></html>"""


class OfflineReceiver:
    """The web app's offline webhook: every notice, and whether each body was signed."""

    def __init__(self) -> None:
        self.notices: list[dict] = []
        self.bad_signatures = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
                if not hmac.compare_digest(self.headers.get("x-orbited-signature", ""), expected):
                    receiver.bad_signatures += 1
                receiver.notices += json.loads(body)["events"]
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/offline"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, event_id: str) -> list[dict]:
        return [n for n in self.notices if n.get("id") == event_id]

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("users")
    receiver = OfflineReceiver()
    page_port = free_port()
    page_origin = f"http://127.0.0.1:{page_port}"
    halod = HaloDProcess(tmp, "--spares", "0", routes=ROUTES, proxy=True).start()
    nodes = []
    server = None
    try:
        for name in ("n1", "n2"):
            nodes.append(halod.node(
                tmp, name, "--cors-origin", page_origin, "--keepalive", "5", "--linger", "10",
                "--user-max-connections", str(LIMIT), "--user-limit-policy", "refuse",
                "--offline-url", receiver.url,
            ))  # fmt: skip
        wait_for(lambda: all(halod.owners().values()), "every route owned", 15)
        site = tmp / "site"
        site.mkdir()
        (site / "index.html").write_text(
            PAGE.format(script=f"http://127.0.0.1:{halod.browser_base}")
        )
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(page_port), "--bind", "127.0.0.1",
             "--directory", str(site)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(lambda: _listening(page_port), "the page server")
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            yield {"halod": halod, "nodes": nodes, "browser": browser, "receiver": receiver,
                   "page_origin": page_origin}  # fmt: skip
            browser.close()
    finally:
        if server is not None:
            server.terminate()
        for node in nodes:
            node.stop()
        halod.stop()
        receiver.close()


def _listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def route_base(cluster: dict, user: str) -> str:
    """The user's route port (hash version 2: every key of the user has this route)."""
    return f"http://127.0.0.1:{cluster['halod'].browser_base + route_of_user(user, ROUTES) - 1}"


def sp_of(cluster: dict, user: str) -> str:
    return f"tcp://127.0.0.1:{cluster['halod'].sp_base + route_of_user(user, ROUTES) - 1}"


def open_tab(cluster: dict, context, key: tuple[str, str, str], transport: str, *,
             wait_open: bool = True, position: str = ""):  # fmt: skip
    page = context.new_page()
    token = issue_token(SECRET, ConnectionKey(*key), 300)
    page.goto(f"{cluster['page_origin']}/index.html?token={token}&transports={transport}"
              f"&node={route_base(cluster, key[0])}&position={position}",
              wait_until="domcontentloaded")  # fmt: skip
    if wait_open:
        try:
            page.wait_for_function("window.states.some(s => s[0] === 'open')", timeout=15000)
        except playwright.Error as e:
            raise AssertionError(f"{key} on {transport} did not open: "
                                 f"{page.evaluate('window.states')}") from e  # fmt: skip
    return page


def ids(page) -> list[str]:
    return [r[1] for r in page.evaluate("window.received")]


def wait_ids(page, *wanted: str, timeout: float = 15) -> None:
    page.wait_for_function(
        "ids => ids.every(id => window.received.some(r => r[1] === id))", arg=list(wanted),
        timeout=timeout * 1000,
    )  # fmt: skip


def send(cluster: dict, user: str, event_id: str, to: list, data: object, **fields) -> list:
    import pynng

    with pynng.Req0(dial=sp_of(cluster, user), recv_timeout=10000, send_timeout=5000) as req:
        req.send(json.dumps({"id": event_id, "to": to, "data": data, **fields}).encode())
        reply = json.loads(req.recv_msg().bytes)
    assert reply.get("ok") is True, reply
    return reply["results"]


def key_statuses(result: dict) -> dict[tuple[str, ...], str]:
    return {tuple(k["key"]): k["status"] for k in result["keys"]}


def attached_here(cluster: dict, poll_tab: bool) -> None:
    """Give a long-poll tab the moment to have its next poll held (between two polls the
    event is `queued`, then the next poll takes it: both are fine, the check is on what
    the pages get)."""
    time.sleep(0.3 if poll_tab else 0.05)


def test_one_user_in_three_tabs_and_a_second_browser(cluster: dict):
    browser, receiver = cluster["browser"], cluster["receiver"]
    first = browser.new_context()  # alice's browser
    second = browser.new_context()  # bob's, and later alice's second device
    alice = [("alice", "sA", f"/t{i}") for i in (1, 2, 3)]
    try:
        transports = ("websocket", "sse", "longpoll")
        tabs = [open_tab(cluster, first, k, t) for k, t in zip(alice, transports, strict=True)]
        bob = open_tab(cluster, second, ("bob", "sB", "/t1"), "websocket")

        # 1. One event to the user: every tab once, bob nothing.
        for n in range(3):
            attached_here(cluster, True)
            [matched] = send(cluster, "alice", f"all-{n}", [["alice", "*", "*"]], {"n": n})
            assert matched["status"] == "matched", matched
            statuses = key_statuses(matched)
            assert set(statuses) == set(alice), matched
            assert set(statuses.values()) <= {"delivered", "queued"}, matched
            for tab in tabs:
                wait_ids(tab, f"all-{n}")
        time.sleep(0.5)
        for tab in tabs:
            got = tab.evaluate("window.received")
            assert [r[1] for r in got] == ["all-0", "all-1", "all-2"], got
            assert [r[2] for r in got] == [{"n": 0}, {"n": 1}, {"n": 2}]
            assert [r[0] for r in got] == [1, 2, 3]  # each key's own sequence
        assert ids(bob) == []

        # 2. A fourth tab of alice, from her second device: refused, the page says why.
        for transport in ("websocket", "sse"):
            extra = open_tab(cluster, second, ("alice", "sB", f"/d-{transport}"), transport,
                             wait_open=False)  # fmt: skip
            extra.wait_for_function("window.states.some(s => s[0] === 'closed')", timeout=15000)
            states = extra.evaluate("window.states")
            assert not any(s[0] == "open" for s in states), states
            closed = [s for s in states if s[0] == "closed"]
            # the WebSocket close reason of 4429, or user_limit for SSE's HTTP 429
            assert closed[-1][2] and closed[-1][2].startswith("user_limit"), states
            if transport == "websocket":
                [(code, reason)] = extra.evaluate("window.closeCodes")
                assert code == 4429 and reason.startswith("user_limit"), (code, reason)
            extra.close()
        attached_here(cluster, True)
        [matched] = send(cluster, "alice", "after-refusal", [["alice", "*", "*"]], 1)
        assert set(key_statuses(matched)) == set(alice), matched  # the refused keys got nothing

        # 3. Closing one tab leaves the others; its key queues while it lingers.
        tabs[1].close()
        wait_for(lambda: _gone(cluster, "alice", alice[1]), "the closed tab to detach", 10)
        attached_here(cluster, True)
        [matched] = send(cluster, "alice", "two-left", [["alice", "*", "*"]], 2)
        statuses = key_statuses(matched)
        assert statuses[alice[1]] == "queued", matched
        assert statuses[alice[0]] == "delivered", matched
        assert statuses[alice[2]] in ("delivered", "queued"), matched
        for tab in (tabs[0], tabs[2]):
            wait_ids(tab, "two-left")
        # A new tab (iframe) on the second device is admitted now: two are attached (once
        # the closed one's long-poll cycle grace, 2 s, is over: it counts until then).
        time.sleep(2.2)
        device = open_tab(cluster, second, ("alice", "sB", "/d1"), "iframe")
        attached_here(cluster, True)
        [matched] = send(cluster, "alice", "new-device", [["alice", "*", "*"]], 3)
        assert key_statuses(matched)[("alice", "sB", "/d1")] == "delivered", matched
        for tab in (tabs[0], tabs[2], device):
            wait_ids(tab, "new-device")
        time.sleep(0.5)
        for tab in (tabs[0], tabs[2]):
            got = ids(tab)
            assert len(got) == len(set(got)), got  # once each
            assert got[-3:] == ["after-refusal", "two-left", "new-device"], got
        assert ids(device) == ["new-device"]
        assert ids(bob) == []
        assert receiver.bad_signatures == 0
    finally:
        first.close()
        second.close()


def _gone(cluster: dict, user: str, key: tuple[str, str, str]) -> bool:
    """Whether ``key`` is no longer attached: a plain event to it answers `queued`."""
    results = send(cluster, user, f"probe-{time.monotonic_ns()}", [list(key)], None)
    return results[0]["status"] == "queued"


def test_the_offline_hook_fires_for_a_user_with_no_tab_and_is_cancelled_on_ack(cluster: dict):
    receiver = cluster["receiver"]
    [reply] = send(cluster, "carol", "for-carol", [["carol", "*", "*"]], {"text": "hi"},
                   offline=2)  # fmt: skip
    assert reply == {"status": "no_connection", "keys": [], "held": True}, reply
    wait_for(lambda: receiver.of("for-carol"), "the needs_push notice", 10)
    [push] = receiver.of("for-carol")
    assert push["type"] == "needs_push" and push["reason"] == "no_connection", push
    assert push["key"] == ["carol", "*", "*"] and push["keys"] == []
    assert receiver.bad_signatures == 0

    context = cluster["browser"].new_context()
    try:
        tab = open_tab(cluster, context, ("carol", "phone", "/chat"), "websocket")
        wait_ids(tab, "for-carol")  # the held event, in the tab's first batch
        assert tab.evaluate("window.received")[0][2] == {"text": "hi"}
        # The client acknowledges within a second (docs/client.md): the cancel follows.
        wait_for(lambda: len(receiver.of("for-carol")) >= 2, "the cancel notice", 10)
        time.sleep(1.5)  # nothing more comes for it
        notices = receiver.of("for-carol")
        assert [n["type"] for n in notices] == ["needs_push", "cancel"], notices
        assert notices[1]["key"] == ["carol", "*", "*"], notices
        assert notices[0]["serial"] < notices[1]["serial"]
        assert ids(tab) == ["for-carol"]
        assert receiver.bad_signatures == 0
    finally:
        context.close()


@pytest.mark.parametrize("transport", ["websocket", "sse", "longpoll", "iframe"])
def test_a_page_coming_back_gets_the_latest_value_and_knows_what_was_replaced(
    cluster: dict, transport: str
):
    """docs/client.md: `onMessage` gets `latest` and `replaced`; the seqs a page passes
    over that no `gap` announced come as `skip` with why `replaced`."""
    user = f"trader-{transport}"
    key = (user, "desk", "/prices")
    context = cluster["browser"].new_context()
    try:
        tab = open_tab(cluster, context, key, transport)
        position = tab.evaluate("window.client.position")
        tab.close()
        wait_for(lambda: _gone(cluster, user, key), "the page to detach", 10)
        # three prices of one tag, one of another (after the probes: untagged events)
        sent = [("p1", "px:A", 1), ("p2", "px:A", 2), ("q1", "px:B", 10), ("p3", "px:A", 3)]
        seq = {}
        for eid, tag, value in sent:
            [result] = send(cluster, user, eid, [list(key)], {"px": value}, latest=tag)
            assert result["status"] == "queued", result
            seq[eid] = result["seq"]
        assert result == {"status": "queued", "seq": seq["q1"] + 1, "replaced": 2}, result
        back = open_tab(cluster, context, key, transport, position=position)
        wait_ids(back, "p3")
        time.sleep(0.5)
        got = back.evaluate("window.received")
        assert [(r[0], r[1], r[2], r[4], r[5]) for r in got[-2:]] == [
            (seq["q1"], "q1", {"px": 10}, "px:B", 0),
            (seq["p3"], "p3", {"px": 3}, "px:A", 2)], got  # fmt: skip
        assert back.evaluate("window.skips") == [[[seq["p1"], seq["p2"]], "replaced"]]
        assert ids(back).count("p3") == 1 and "p1" not in ids(back) and "p2" not in ids(back)
    finally:
        context.close()
