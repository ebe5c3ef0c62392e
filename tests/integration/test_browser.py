"""The JS client in real headless Chromium, cross-origin, against a real node.

The page is served from its own origin; the browser reaches the node through a TCP proxy
the test controls, so it can cut connections (FIN or RST) and refuse WebSocket upgrades
like a hostile middlebox. Events are dispatched over SP with pynng.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.conftest import NodeProcess, send_event, wait_for

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
if CHROMIUM is None:  # pragma: no cover - CI installs it (./dev test, as root)
    pytest.skip("Debian chromium is not installed", allow_module_level=True)

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip
NASTY = {"text": "</script><script>window.pwned=1</script> \"q\" 'q' é ✓ \u2028 <!-- &amp;"}

PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8">
<script src="{node}/orbited/client.js"></script></head><body><script>
window.received = []; window.states = [];
const q = new URLSearchParams(location.search);
window.client = new Orbited.OrbitedClient("{node}", {{
  token: q.get("token"), transports: q.get("transports").split(","), base: 100, max: 800,
  onMessage: (data, info) => window.received.push([info.seq, data, info.transport]),
  onState: (state, info) => window.states.push([state, info.transport]),
}}).connect();
</script></body></html>"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    """Loopback TCP proxy: cut() all connections with FIN or RST; optionally refuse
    WebSocket upgrades (as some corporate proxies do)."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.block_websocket = False
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    client.close()
                    return
                head += chunk
            if self.block_websocket and b"upgrade: websocket" in head.lower():
                client.sendall(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
                client.close()
                return
            server = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        with self.lock:
            self.sockets += [client, server]
        server.sendall(head)
        threading.Thread(target=self._pump, args=(server, client), daemon=True).start()
        self._pump(client, server)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self, reset: bool) -> None:
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for s in sockets:
            try:
                if reset:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                else:
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        self.cut(reset=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("browser")
    page_port = free_port()
    page_origin = f"http://127.0.0.1:{page_port}"
    http_port = free_port()
    node = NodeProcess(tmp, "--cors-origin", page_origin, "--keepalive", "5", "--linger", "30")
    node.start(http=f"127.0.0.1:{http_port}")
    proxy = Proxy(node.http)
    site = tmp / "site"
    site.mkdir()
    (site / "index.html").write_text(PAGE.format(node=f"http://{proxy.address}"))
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(page_port), "--bind", "127.0.0.1",
         "--directory", str(site)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", page_port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield {"node": node, "proxy": proxy, "browser": browser, "page_origin": page_origin,
               "site": site, "tmp": tmp}  # fmt: skip
        browser.close()
    server.terminate()
    proxy.close()
    node.stop()


def open_page(cluster: dict, user: str, transports: str):
    context = cluster["browser"].new_context()
    page = context.new_page()
    token = cluster["node"].token(user)
    page.goto(
        f"{cluster['page_origin']}/index.html?token={token}&transports={transports}",
        wait_until="domcontentloaded",
    )  # a forever iframe never finishes "load"
    page.wait_for_function("window.states.some(s => s[0] === 'open')", timeout=15000)
    return context, page


def received(page) -> list:
    return page.evaluate("window.received")


def wait_received(page, count: int, timeout: float = 15) -> list:
    page.wait_for_function(f"window.received.length >= {count}", timeout=timeout * 1000)
    return received(page)


def dispatch(node: NodeProcess, user: str, start: int, count: int, data=None) -> list[str]:
    statuses = []
    with node.req() as req:
        for i in range(start, start + count):
            reply = send_event(req, f"{user}-{i}", [[user, "s", "/t"]],
                               data if data is not None else i)  # fmt: skip
            statuses.append(reply["results"][0]["status"])
    return statuses


def pending_polls(node: NodeProcess) -> int:
    with urllib.request.urlopen(f"http://{node.http}/orbited/health", timeout=5) as r:
        return json.load(r)["limits"]["pending_polls"]


@pytest.mark.parametrize("transport", ["websocket", "sse", "longpoll", "iframe"])
def test_each_transport_survives_cuts_without_loss_or_duplicates(cluster: dict, transport: str):
    node, proxy = cluster["node"], cluster["proxy"]
    user = f"b-{transport}"
    context, page = open_page(cluster, user, transport)
    try:
        assert page.evaluate("window.client.transport") == transport
        dispatch(node, user, 0, 1, NASTY)
        assert wait_received(page, 1)[0][1] == NASTY
        assert page.evaluate("window.pwned") is None
        n = 1
        for reset in (False, True):
            dispatch(node, user, n, 3)
            wait_received(page, n + 3)
            if transport == "longpoll":
                # Cut a held poll, not the moment between two polls (which the page would
                # never notice: its next poll opens a new connection).
                wait_for(lambda: pending_polls(node) >= 1, "the next poll to be held")
            proxy.cut(reset=reset)
            statuses = dispatch(node, user, n + 3, 3)  # while the page reconnects
            assert set(statuses) <= {"queued", "delivered"}
            n += 6
            got = wait_received(page, n)
            time.sleep(0.3)
            got = received(page)
            assert [seq for seq, _, _ in got] == list(range(1, n + 1)), got
            assert [data for _, data, _ in got][1:] == list(range(1, n))
        states = page.evaluate("window.states")
        assert ["reconnecting", transport] in states and states[-1] == ["open", transport]
    finally:
        context.close()


def test_falls_back_when_websocket_is_blocked(cluster: dict):
    node, proxy = cluster["node"], cluster["proxy"]
    proxy.block_websocket = True
    try:
        context, page = open_page(cluster, "b-fallback", "websocket,sse,longpoll,iframe")
        assert page.evaluate("window.client.transport") == "sse"
        dispatch(node, "b-fallback", 0, 2)
        assert [d for _, d, t in wait_received(page, 2)] == [0, 1]
        context.close()
    finally:
        proxy.block_websocket = False


def test_client_reconnects_after_node_restart(cluster: dict):
    node = cluster["node"]
    context, page = open_page(cluster, "b-restart", "websocket")
    try:
        dispatch(node, "b-restart", 0, 2)
        wait_received(page, 2)
        node.stop()
        node.start(http=node.http)
        page.wait_for_function(
            "window.states.filter(s => s[0] === 'open').length >= 2", timeout=20000
        )
        # The new node has a new mailbox (a reset); new events arrive, old ones not again.
        dispatch(node, "b-restart", 2, 2)
        got = wait_received(page, 4)
        time.sleep(0.3)
        assert [d for _, d, _ in received(page)] == [0, 1, 2, 3]
        assert [s for s, _, _ in got][2:] == [1, 2]
    finally:
        context.close()


def health_limits(node: NodeProcess) -> dict:
    with urllib.request.urlopen(f"http://{node.http}/orbited/health", timeout=5) as r:
        return json.load(r)["limits"]


def test_an_overloaded_node_is_retried_after_retry_after_on_the_same_transport(cluster: dict):
    """A 503 is not a transport failure: the client neither tries the other transports at
    once (each would be refused too) nor comes back before the cross-origin page can read
    the answer's Retry-After (5 s at max_connections)."""
    (workdir := cluster["tmp"] / "overloaded").mkdir()
    node = NodeProcess(workdir, "--cors-origin", cluster["page_origin"],
                       "--max-connections", "1").start()  # fmt: skip
    (cluster["site"] / "overloaded.html").write_text(PAGE.format(node=f"http://{node.http}"))
    context = cluster["browser"].new_context()
    try:
        holder = node.ws(node.token("holder"))  # takes the one connection
        assert json.loads(holder.recv(timeout=5))["type"] == "hello"
        page = context.new_page()
        page.goto(f"{cluster['page_origin']}/overloaded.html?token={node.token('b-busy')}"
                  "&transports=longpoll,websocket,sse", wait_until="domcontentloaded")  # fmt: skip
        wait_for(lambda: health_limits(node)["refused_connections"] >= 1, "the first 503")
        time.sleep(3)  # backoff here is 50-100 ms: without Retry-After it would be back
        assert health_limits(node)["refused_connections"] == 1
        holder.close()
        page.wait_for_function("window.states.some(s => s[0] === 'open')", timeout=15000)
        states = page.evaluate("window.states")
        assert {t for _, t in states[1:]} == {"longpoll"}, states  # after "connecting"
        with node.req() as req:
            send_event(req, "busy-1", [["b-busy", "s", "/t"]], "after")
        assert [d for _, d, _ in wait_received(page, 1)] == ["after"]
    finally:
        context.close()
        node.stop()


def test_client_script_is_served_as_module_and_classic(cluster: dict):
    import urllib.request

    base = f"http://{cluster['proxy'].address}/orbited"
    with urllib.request.urlopen(f"{base}/client.mjs") as r:
        module = r.read().decode()
        assert r.headers["content-type"].startswith("text/javascript")
    with urllib.request.urlopen(f"{base}/client.js") as r:
        classic = r.read().decode()
    assert "export class OrbitedClient" in module
    assert "export " not in classic and "window.Orbited = {" in classic
    for name in ("OrbitedClient", "Resume", "backoffDelay", "routeOf", "TRANSPORTS"):
        assert name in classic.rsplit("window.Orbited = {", 1)[1]


def test_browser_computes_routes_like_the_vectors(cluster: dict):
    """Chromium's WebCrypto gives the published routes of both hash versions; version 2
    (the user part only) is the default."""
    from pathlib import Path

    published = json.loads(
        (Path(__file__).resolve().parents[2] / "docs" / "hashing-vectors.json").read_text()
    )
    context, page = open_page(cluster, "b-hash", "longpoll")
    try:
        for vector in published["vectors"][:5]:
            got = page.evaluate("([k]) => Orbited.routeOf(k, 24, 1)", [vector["key"]])
            assert got == vector["routes"]["24"]
        v2 = published["v2"]["vectors"]
        assert len(v2) >= 20
        for vector in v2:
            for key in vector["keys"]:
                got = page.evaluate(
                    "([k]) => Promise.all([Orbited.routeOf(k, 24), Orbited.routeOf(k, 1024, 2)])",
                    [key],
                )
                assert got == [vector["routes"]["24"], vector["routes"]["1024"]], key
            user = page.evaluate("([u]) => Orbited.routeOfUser(u, 24)", [vector["user"]])
            assert user == vector["routes"]["24"]
        assert page.evaluate("() => Orbited.HASH_VERSION") == 2
    finally:
        context.close()


# -- reconnect schedule (docs/client.md, "What it does on trouble") ----------------------

# base 4000: the old schedule's first attempt came 2-4 s after a loss; the quick first
# retry comes 100 ms + a random part of the node's spread hint (a few ms for these nodes).
RECONNECT_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8">
<script src="{node}/orbited/client.js"></script></head><body><script>
window.received = []; window.states = []; window.attempts = [];
const q = new URLSearchParams(location.search);
const client = window.client = new Orbited.OrbitedClient("{node}", {{
  token: q.get("token"), transports: q.get("transports").split(","), base: 4000, max: 8000,
  onMessage: (data, info) => window.received.push([info.seq, data, info.transport]),
  onState: (state, info) => window.states.push([state, info.transport, performance.now()]),
}});
// Every attempt (transport start), with its time: the client's own factories, wrapped.
client.factories = Object.fromEntries(Object.entries(client.factories).map(([name, make]) =>
  [name, (...a) => {{ window.attempts.push([name, performance.now()]); return make(...a); }}]));
client.connect();
</script></body></html>"""
OLD_FIRST_ATTEMPT_MS = 2000  # backoffDelay(0) with base 4000: at least base / 2


class SwitchProxy(Proxy):
    """A Proxy whose upstream can change (HaloD moved the route to another node) and that
    can refuse connections (the route has not moved yet: its node is dead)."""

    refuse = False

    def _serve(self, client: socket.socket) -> None:
        if self.refuse:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            client.close()  # RST, as a dead node's port answers
            return
        super()._serve(client)

    def cut(self, reset: bool = True) -> None:
        """End every connection now: reset (RST: a killed node's kernel with unread bytes)
        or, with ``reset`` False, closed (FIN: a killed node's kernel otherwise, or a
        proxy whose upstream went away). Shutting the read side first wakes the pump
        thread blocked in recv, which holds the socket open (Proxy.cut takes effect only
        when the next bytes arrive)."""
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for s in sockets:
            try:
                if reset:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    s.shutdown(socket.SHUT_RD)
                else:
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


@pytest.fixture(scope="module")
def two_nodes(cluster: dict) -> Iterator[dict]:
    (workdir := cluster["tmp"] / "spare").mkdir()
    spare = NodeProcess(workdir, "--cors-origin", cluster["page_origin"], "--keepalive", "5")
    spare.start()
    proxy = SwitchProxy(cluster["node"].http)
    (cluster["site"] / "reconnect.html").write_text(
        RECONNECT_PAGE.format(node=f"http://{proxy.address}")
    )
    yield {"old": cluster["node"], "spare": spare, "proxy": proxy}
    proxy.close()
    spare.stop()


def host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def attempts_and_drops(page) -> tuple[list, list]:
    attempts = page.evaluate("window.attempts")
    states = page.evaluate("window.states")
    return attempts, [at for state, _, at in states if state == "reconnecting"]


@pytest.mark.parametrize("transport", ["websocket", "sse", "longpoll", "iframe"])
def test_a_lost_connection_is_retried_quickly_then_with_the_old_backoff(
    cluster: dict, two_nodes: dict, transport: str
):
    """The node dies after hello (its connections reset). 1: the route has already moved
    (the proxy now leads to the spare): one attempt, before the old backoff's first, lands
    there. 2: the route has not moved yet (refused): that quick attempt fails and the
    next comes at the old backoff's pace, on the same transport."""
    old, spare, proxy = two_nodes["old"], two_nodes["spare"], two_nodes["proxy"]
    user = f"q-{transport}"
    context = cluster["browser"].new_context()
    try:
        page = context.new_page()
        page.goto(f"{cluster['page_origin']}/reconnect.html?token={old.token(user)}"
                  f"&transports={transport}", wait_until="domcontentloaded")  # fmt: skip
        page.wait_for_function("window.states.some(s => s[0] === 'open')", timeout=15000)
        dispatch(old, user, 0, 1)
        wait_received(page, 1)
        time.sleep(1.2)  # a connection that worked for a while (client STABLE, 1 s)

        # 1. The route has moved to the spare before the browser comes back.
        if transport == "longpoll":
            wait_for(lambda: pending_polls(old) >= 1, "the next poll to be held")
        proxy.upstream = host_port(spare.http)
        proxy.cut(reset=True)
        if transport == "longpoll":
            # A held poll reset before its answer may be sent again by the browser itself
            # (Chromium retries it on a reused connection), with no drop the page sees; or
            # the client reconnects. Either way it lands on the spare.
            wait_for(lambda: pending_polls(spare) >= 1, "a poll held by the spare")
        else:
            page.wait_for_function("window.states.filter(s => s[0] === 'open').length >= 2",
                                   timeout=15000)  # fmt: skip
            attempts, drops = attempts_and_drops(page)
            assert [name for name, _ in attempts] == [transport, transport], attempts
            quick = attempts[1][1] - drops[0]
            assert 100 <= quick < OLD_FIRST_ATTEMPT_MS, (quick, attempts, drops)
        # It landed on the new owner: the spare has a mailbox for the key (no_connection if not).
        assert dispatch(spare, user, 1, 1)[0] in {"delivered", "queued"}
        assert [d for _, d, _ in wait_received(page, 2)] == [0, 1]
        time.sleep(1.2)

        # 2. The node dies and its route has not moved yet: the quick attempt fails.
        if transport == "longpoll":
            wait_for(lambda: pending_polls(spare) >= 1, "the next poll to be held")
        attempts, drops = attempts_and_drops(page)
        first, drop = len(attempts), len(drops)  # this loss's attempts and drop
        opens = len([s for s in page.evaluate("window.states") if s[0] == "open"])
        proxy.refuse = True
        proxy.cut(reset=True)
        page.wait_for_function(f"window.attempts.length >= {first + 1}", timeout=15000)
        time.sleep(0.5)  # let it fail
        proxy.upstream = host_port(old.http)
        proxy.refuse = False
        page.wait_for_function(
            f"window.states.filter(s => s[0] === 'open').length >= {opens + 1}", timeout=15000
        )
        attempts, drops = attempts_and_drops(page)
        assert [name for name, _ in attempts] == [transport] * (first + 2), attempts
        quick = attempts[first][1] - drops[drop]
        assert 100 <= quick < OLD_FIRST_ATTEMPT_MS, (attempts, drops)
        assert attempts[first + 1][1] - attempts[first][1] >= OLD_FIRST_ATTEMPT_MS, (
            attempts, drops
        )  # fmt: skip
        dispatch(old, user, 2, 1)
        assert [d for _, d, _ in wait_received(page, 3)] == [0, 1, 2]
    finally:
        context.close()


@pytest.mark.parametrize("transport", ["websocket", "sse", "iframe"])  # a poll: see below
def test_a_connection_ended_by_its_node_is_noticed_at_once(
    cluster: dict, two_nodes: dict, transport: str
):
    """A killed node's kernel closes its connections (FIN), or a data plane does: every
    transport notices at once, not at its watchdog (2 x keepalive: 10 s here). The iframe
    did not: Chromium fires no load for a chunked document cut in the middle, so its
    document is now close-delimited. (A held poll's connection closed before its answer is
    retried by Chromium itself, on a live node here, so the page rightly sees nothing.)"""
    old, proxy = two_nodes["old"], two_nodes["proxy"]
    context = cluster["browser"].new_context()
    try:
        page = context.new_page()
        page.goto(f"{cluster['page_origin']}/reconnect.html?token={old.token(f'fin-{transport}')}"
                  f"&transports={transport}", wait_until="domcontentloaded")  # fmt: skip
        page.wait_for_function("window.states.some(s => s[0] === 'open')", timeout=15000)
        time.sleep(1.2)
        cut_at = page.evaluate("performance.now()")
        proxy.cut(reset=False)
        page.wait_for_function("window.states.some(s => s[0] === 'reconnecting')", timeout=15000)
        (dropped, *_) = [at for state, _, at in page.evaluate("window.states")
                         if state == "reconnecting"]  # fmt: skip
        assert dropped - cut_at < 2000, (transport, dropped - cut_at)
    finally:
        context.close()


@pytest.mark.parametrize("transport", ["websocket", "sse", "longpoll", "iframe"])
def test_a_planned_move_reconnects_at_once(cluster: dict, two_nodes: dict, transport: str):
    """A node stopping (SIGTERM) sends `reconnect` frames after hello: the client comes
    back at once (a random part of the node's spread hint, not 100 ms + it, nor the
    backoff), and that one attempt lands on the spare, over every transport: the node
    closes each connection that carried a `reconnect` frame and its idle keep-alive ones,
    so Chrome cannot send the attempt over a connection an L4 proxy or data plane still
    routes to the stopping node."""
    spare = two_nodes["spare"]
    (workdir := cluster["tmp"] / f"planned-{transport}").mkdir()
    node = NodeProcess(workdir, "--cors-origin", cluster["page_origin"], "--keepalive", "5")
    node.start()
    proxy = SwitchProxy(node.http)
    page_name = f"planned-{transport}.html"
    (cluster["site"] / page_name).write_text(RECONNECT_PAGE.format(node=f"http://{proxy.address}"))
    user = f"p-{transport}"
    context = cluster["browser"].new_context()
    try:
        page = context.new_page()
        page.goto(f"{cluster['page_origin']}/{page_name}?token={node.token(user)}"
                  f"&transports={transport}", wait_until="domcontentloaded")  # fmt: skip
        page.wait_for_function("window.states.some(s => s[0] === 'open')", timeout=15000)
        dispatch(node, user, 0, 1)
        wait_received(page, 1)
        time.sleep(1.2)
        if transport == "longpoll":
            wait_for(lambda: pending_polls(node) >= 1, "the next poll to be held")
        proxy.upstream = host_port(spare.http)  # the route has moved; the node then stops
        node.stop()
        page.wait_for_function("window.states.filter(s => s[0] === 'open').length >= 2",
                               timeout=15000)  # fmt: skip
        attempts, drops = attempts_and_drops(page)
        assert [name for name, _ in attempts] == [transport, transport], attempts  # one attempt
        assert attempts[1][1] - drops[0] < OLD_FIRST_ATTEMPT_MS, (attempts, drops)
        assert dispatch(spare, user, 1, 1)[0] in {"delivered", "queued"}  # landed there
        assert [d for _, d, _ in wait_received(page, 2)] == [0, 1]
    finally:
        context.close()
        proxy.close()
        node.stop()


# -- the per-user connection limit and latest-value events in Chromium (issue 21) --------
# docs/client.md, "What it does on trouble" (4429/4003, HTTP 429, the closed frame) and
# the skip listener; nodes with user_max_connections 1, pages straight to the node.

USER_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8">
<script src="{node}/orbited/client.js"></script></head><body><script>
window.received = []; window.states = []; window.skips = []; window.attempts = [];
const q = new URLSearchParams(location.search);
const client = window.client = new Orbited.OrbitedClient("{node}", {{
  token: q.get("token"), transports: q.get("transports").split(","), base: 100, max: 800,
  position: q.get("position"),
  onMessage: (data, info) => window.received.push([info.seq, data, info.latest ?? null,
                                                   info.replaced]),
  onState: (state, info) => window.states.push([state, info.transport, info.detail ?? null]),
}});
client.on("skip", (seqs, why) => window.skips.push([seqs, why]));
client.factories = Object.fromEntries(Object.entries(client.factories).map(([name, make]) =>
  [name, (...a) => {{ window.attempts.push(name); return make(...a); }}]));
client.connect();
</script></body></html>"""


@pytest.fixture(scope="module")
def user_nodes(cluster: dict) -> Iterator[dict]:
    nodes = {}
    for policy in ("refuse", "close_oldest"):
        (workdir := cluster["tmp"] / f"users-{policy}").mkdir()
        flags = ("--user-max-connections", "1", "--user-limit-policy", policy)
        node = NodeProcess(workdir, "--cors-origin", cluster["page_origin"], "--keepalive", "5",
                           *flags)  # fmt: skip
        node.start()
        (cluster["site"] / f"{policy}.html").write_text(
            USER_PAGE.format(node=f"http://{node.http}")
        )
        nodes[policy] = node
    yield nodes
    for node in nodes.values():
        node.stop()


def open_user_page(cluster: dict, node: NodeProcess, page_name: str, user: str, session: str,
                   transports: str, position: str = "", wait_open: bool = True):  # fmt: skip
    context = cluster["browser"].new_context()
    page = context.new_page()
    token = node.token(user, session)
    page.goto(f"{cluster['page_origin']}/{page_name}.html?token={token}"
              f"&transports={transports}&position={position}",
              wait_until="domcontentloaded")  # fmt: skip
    if wait_open:
        page.wait_for_function("window.states.some(s => s[0] === 'open')", timeout=15000)
    return context, page


@pytest.mark.parametrize("transport", ["websocket", "sse", "longpoll", "iframe"])
def test_a_tab_past_the_users_limit_is_closed_with_user_limit(
    cluster: dict, user_nodes: dict, transport: str
):
    """refuse, 1 per user: the second tab of the user ends in `closed`, detail
    `user_limit…`, on every transport (WebSocket 4429; SSE and iframe learn the 429 from
    the one timeout=0 poll; a long-poll's 429), and never tries again or falls back."""
    node = user_nodes["refuse"]
    user = f"lim-{transport}"
    first, first_page = open_user_page(cluster, node, "refuse", user, "s1", "websocket")
    second, page = open_user_page(cluster, node, "refuse", user, "s2",
                                  f"{transport},websocket", wait_open=False)  # fmt: skip
    try:
        page.wait_for_function("window.states.some(s => s[0] === 'closed')", timeout=15000)
        time.sleep(1)  # the backoff (100-800 ms) has passed: nothing tried again
        states = page.evaluate("window.states")
        assert [s[0] for s in states] == ["connecting", "closed"], states
        assert states[-1][2].startswith("user_limit"), states
        assert page.evaluate("window.attempts") == [transport]
        dispatch_to = [[user, "s1", "/t"]]
        with node.req() as req:
            assert send_event(req, f"{user}-1", dispatch_to, 1)["results"][0]["status"] == (
                "delivered"
            )
        first_page.wait_for_function("window.received.length === 1", timeout=5000)
    finally:
        second.close()
        first.close()


@pytest.mark.parametrize("transport", ["websocket", "sse", "longpoll", "iframe"])
def test_close_oldest_closes_the_oldest_tab_with_displaced(
    cluster: dict, user_nodes: dict, transport: str
):
    node = user_nodes["close_oldest"]
    user = f"old-{transport}"
    oldest, old_page = open_user_page(cluster, node, "close_oldest", user, "s1", transport)
    newer, page = open_user_page(cluster, node, "close_oldest", user, "s2", "websocket")
    try:
        old_page.wait_for_function("window.states.some(s => s[0] === 'closed')", timeout=15000)
        time.sleep(1)
        states = old_page.evaluate("window.states")
        assert [s[0] for s in states] == ["connecting", "open", "closed"], states
        assert states[-1][2].startswith("displaced"), states
        assert old_page.evaluate("window.attempts") == [transport]
        assert page.evaluate("window.client.state") == "open"
    finally:
        newer.close()
        oldest.close()


@pytest.mark.parametrize("transport", ["websocket", "sse", "longpoll", "iframe"])
def test_a_page_resuming_past_replaced_events_gets_the_newest_and_a_skip(
    cluster: dict, user_nodes: dict, transport: str
):
    """Three events of one tag while the page is away: it gets the newest with
    info.latest and info.replaced (2), and `skip` ([1, 2], "replaced") first, no gap."""
    node = user_nodes["refuse"]
    user = f"skip-{transport}"
    status, frames = node.poll(f"token={node.token(user, 's1')}&timeout=0")
    assert status == 200
    stream = frames[0]["stream"]  # type: ignore[index]
    with node.req() as req:
        for i in (1, 2, 3):
            req.send(json.dumps({"id": f"{user}-{i}", "to": [[user, "s1", "/t"]], "data": i,
                                 "latest": "price:AAPL"}).encode())  # fmt: skip
            assert json.loads(req.recv_msg().bytes)["results"][0]["status"] == "queued"
    context, page = open_user_page(cluster, node, "refuse", user, "s1", transport,
                                   position=f"{stream}:0")  # fmt: skip
    try:
        page.wait_for_function("window.received.length >= 1", timeout=15000)
        assert page.evaluate("window.received") == [[3, 3, "price:AAPL", 2]]
        assert page.evaluate("window.skips") == [[[1, 2], "replaced"]]
    finally:
        context.close()
