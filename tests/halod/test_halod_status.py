"""What HaloD shows operators (docs/halod-protocol.md, "Status endpoints"): live connections
apart from mailboxes, the spare situation, the HTML view of /status for people (JSON stays
for machines), the SVG's legend, and `halod status`. Views are unit-tested with values;
the real processes check the numbers nodes report and the page in real Chromium."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import HaloDProcess, NodeProcess, keys_on_routes, wait_for


@pytest.fixture
def procs():
    started: list[HaloDProcess | NodeProcess] = []
    yield started
    for proc in reversed(started):
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop(signal.SIGKILL)


def start(tmp_path, procs, names, *flags):
    halod = HaloDProcess(tmp_path, "--heartbeat-interval", "0.2", *flags).start()
    procs.append(halod)
    nodes = {}
    for name in names:
        nodes[name] = halod.node(tmp_path, name, "--linger", "30")
        procs.append(nodes[name])
    return halod, nodes


@pytest.mark.slow
def test_nodes_report_live_connections_apart_from_lingering_mailboxes(tmp_path, procs):
    halod, nodes = start(tmp_path, procs, ["n1"], "--spares", "0")
    n1 = nodes["n1"]
    keys = keys_on_routes(range(1, 25), count=2)
    sockets = [n1.ws(n1.token(key.user)) for key in keys]
    for ws in sockets:
        assert json.loads(ws.recv(timeout=5))["type"] == "hello"
    wait_for(lambda: halod.nodes()["n1"]["connections"] == 2, "2 live connections")
    assert halod.nodes()["n1"]["mailboxes"] == 2
    sockets[0].close()  # its mailbox lingers (linger 30 s): not a connection any more
    wait_for(lambda: halod.nodes()["n1"]["connections"] == 1, "1 live connection")
    assert halod.nodes()["n1"]["mailboxes"] == 2
    out = subprocess.run(
        [sys.executable, "-m", "halod.cli", "status", "--url", f"http://{halod.status_http}"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.splitlines()  # fmt: skip
    header = out[1].split()
    row = dict(zip(header, out[2].split(), strict=False))
    assert (row["NAME"], row["CONNS"], row["MAILBOXES"]) == ("n1", "1", "2")
    metrics = urllib.request.urlopen(f"http://{halod.status_http}/metrics", timeout=5).read()
    assert b'halod_node_connections{node="n1"} 1' in metrics
    assert b'halod_node_mailboxes{node="n1"} 2' in metrics
    sockets[1].close()


# -- views, with values ---------------------------------------------------------------------

NASTY = "<script>window.pwned=1</script>"


def status_of(**extra):
    node = {"name": "n1", "id": 1, "state": "active", "connected": True,
            "routes": list(range(1, 25)), "ranges": "1-24", "browser": f"{NASTY}:80",
            "sp": "tcp://a\"b'<i>:90", "capacity": 100000, "connections": 1234,
            "mailboxes": 2000, "last_heartbeat_age": 0.2, "disconnected_for": None,
            "suspected": {"cause": "silent", "probe": "<b>alive</b>"}}  # fmt: skip
    status = {"routes": 24, "policy": "seed", "spares_wanted": 1, "spares": 0,
              "heartbeat_interval": 1.0, "missed_heartbeats": 3, "grace": 5.0,
              "table_version": 7, "failovers": 1, "uptime": 4000.0, "nodes": [node],
              "failed": [{"name": "n2", "at": 0.0, "why": f"disconnected, {NASTY}"}],
              "warnings": [f"no spare left {NASTY}"], "dataplane": None}  # fmt: skip
    status.update(extra)
    return status


def parsed(page: str):
    from html.parser import HTMLParser

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.text = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append((tag, dict(attrs)))

        def handle_data(self, data):
            self.text.append(data)

    collect = Collect()
    collect.feed(page)
    return collect.tags, "".join(collect.text)


def test_the_html_view_escapes_everything_nodes_send():
    from halod.page import status_html

    tags, text = parsed(status_html(status_of()))
    names = [t for t, _ in tags]
    assert "script" not in names and "i" not in names  # nothing a node sent is markup
    assert NASTY + ":80" in text and "tcp://a\"b'<i>:90" in text
    assert f"disconnected, {NASTY}" in text and f"no spare left {NASTY}" in text
    assert "silent, probe: <b>alive</b>" in text
    assert [a["src"] for t, a in tags if t == "img"] == ["table.svg"]
    assert "1,234" in text and "2,000" in text  # connections, mailboxes


def test_a_follower_shows_its_nodes_at_the_leader_not_lost():
    """On etcd a follower holds the leader's table but no node connects to it: the time
    since it last saw one (its whole uptime) must not read as an outage."""
    from halod.cli import status_table
    from halod.page import status_html

    away = {**status_of()["nodes"][0], "connected": False, "disconnected_for": 270.6,
            "suspected": None}  # fmt: skip
    etcd = {"name": "h2", "endpoints": []}
    for role in ("follower", "candidate"):
        status = status_of(nodes=[away], role=role, leader={"name": "h1"}, etcd=etcd)
        assert "at the leader" in status_table(status) and "lost" not in status_table(status)
        assert "at the leader" in parsed(status_html(status))[1]
    leading = status_of(nodes=[away], role="leader", leader={"name": "h2"}, etcd=etcd)
    assert "lost 270.6s" in status_table(leading)


@pytest.mark.parametrize(
    ("accept", "fmt", "html"),
    [
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", None, True),
        ("*/*", None, False),  # curl
        (None, None, False),  # urllib, halod status
        ("application/json", None, False),
        ("application/json, text/html;q=0.5", None, False),
        ("text/html;q=0.9, application/json;q=0.2", None, True),
        ("text/*", None, True),
        ("text/html;q=bogus", None, False),
        ("text/html", "json", False),  # ?format= wins
        ("*/*", "html", True),
        ("text/html", "xml", True),  # an unknown format is ignored
    ],
)
def test_content_negotiation(accept, fmt, html):
    from halod.page import wants_html

    assert wants_html(accept, fmt) is html


def test_the_svg_has_a_legend_with_names_escaped():
    import xml.etree.ElementTree as ET

    from halod.svg import table_svg

    svg = table_svg(
        24,
        "t",
        [
            ("now", {1: list(range(1, 13))}, {1: "<a&b>"}),
            ("plan 2", {1: list(range(1, 13)), 2: list(range(13, 25))}, {}),
        ],
    )
    root = ET.fromstring(svg)  # well-formed: the name is escaped
    ns = "{http://www.w3.org/2000/svg}"
    (legend,) = root.findall(f"{ns}g")
    labels = [t.text for t in legend.findall(f"{ns}text")]
    assert labels == ["legend", "node 1 (<a&b>)", "node 2", "no owner"]
    swatches = [r.get("fill") for r in legend.findall(f"{ns}rect")]
    cells = {r.get("fill") for r in root.findall(f"{ns}rect")}
    assert swatches[:2] == ["#E69F00", "#56B4E9"] and set(swatches[:2]) == cells
    assert swatches[2] == "#fff"


# -- the page in real Chromium ----------------------------------------------------------------


@pytest.mark.slow
def test_the_status_page_renders_in_chromium(tmp_path, procs):
    import shutil

    import pynng

    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian chromium is not installed")
    halod = HaloDProcess(tmp_path, "--spares", "1", "--heartbeat-interval", "5").start()
    procs.append(halod)
    procs.append(halod.node(tmp_path, "n1"))
    register = {"type": "register", "version": 1, "name": "evil", "browser": f"{NASTY}:1",
                "sp": "tcp://127.0.0.1:1", "capacity": 1, "hashes": [1, 2]}  # fmt: skip
    url = f"http://{halod.status_http}/status"
    with pynng.Pair0(dial=halod.control, recv_timeout=5000) as pair:
        pair.send(json.dumps(register).encode())
        assert json.loads(pair.recv())["role"] == "spare"
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])  # fmt: skip
            try:
                page = browser.new_page(viewport={"width": 1366, "height": 768})
                response = page.goto(url)
                assert response.headers["content-type"] == "text/html; charset=utf-8"
                assert "default-src 'none'" in response.headers["content-security-policy"]
                assert page.title() == "HaloD: 2 nodes, 24 routes"
                rows = page.locator("tbody tr")
                assert rows.count() == 2
                assert rows.nth(0).locator("td").nth(1).inner_text() == "n1"
                assert rows.nth(1).locator("td").nth(8).inner_text() == f"{NASTY}:1"
                assert page.evaluate("window.pwned") is None
                image = page.locator("img")
                page.wait_for_function("document.images[0].complete")
                assert image.evaluate("i => i.naturalWidth") > 0  # /table.svg loaded
                # The table fits a laptop screen without scrolling sideways.
                assert page.evaluate("document.documentElement.scrollWidth") <= 1366
                # JSON stays for machines, also from a browser that asks for it.
                raw = page.goto(url + "?format=json")
                assert raw.headers["content-type"] == "application/json"
                assert {n["name"] for n in json.loads(raw.text())["nodes"]} == {"n1", "evil"}
            finally:
                browser.close()


def raw_http(address: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` to the status port; the status, headers and body of the answer."""
    import socket

    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(65536)
            assert chunk, answer
            answer += chunk
        head, body = answer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        headers = {k.lower(): v for k, v in headers.items()}
        while not data.startswith(b"HEAD") and len(body) < int(headers.get("content-length", "0")):
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split()[1]), headers, body


def test_the_status_port_answers_what_it_does_not_serve_with_json_errors(tmp_path, procs):
    """Unknown paths 404, unsupported methods 405 with Allow, a malformed request 400: the
    JSON error body {"error": {"code", "message"}}, never twisted.web's HTML pages."""
    halod = HaloDProcess(tmp_path).start()
    procs.append(halod)
    cases = [
        (b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404, "not_found", None),
        (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404, "not_found", None),
        (b"GET /status/more HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404, "not_found", None),
        (b"POST /status HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n", 405,
         "method_not_allowed", "GET, HEAD"),
        (b"PUT /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n", 405,
         "method_not_allowed", "GET, HEAD"),
        (b"BREW /routes HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405, "method_not_allowed",
         "GET, HEAD"),
        (b"GET /nodes/a/drain HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405,
         "method_not_allowed", "POST"),
        (b"POST /nodes/a/explode HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
         404, "not_found", None),
        (b"POST /nodes/nobody/drain HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
         409, "not_registered", None),
        (b"GET /status HTTP/1.1\r\nHost: rebind.example\r\n\r\n", 403, "host_not_allowed",
         None),
        (b"POST /nodes/a/drain HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://x.example\r\n"
         b"Content-Length: 0\r\n\r\n", 403, "cross_site", None),
        (b"GARBAGE\r\n\r\n", 400, "bad_request", None),
        (b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon here\r\n\r\n", 400,
         "bad_request", None),
        (b"GET /" + b"x" * 17000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 414,
         "uri_too_long", None),
        (b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n",
         431, "headers_too_large", None),
    ]  # fmt: skip
    for request, status, code, allow in cases:
        got, headers, body = raw_http(halod.status_http, request)
        assert got == status, (request, got, body)
        assert headers["content-type"] == "application/json", request
        error = json.loads(body)["error"]
        assert error["code"] == code and isinstance(error["message"], str), (request, error)
        assert headers.get("allow") == allow, request
    # What it serves is unchanged.
    assert (
        raw_http(halod.status_http, b"HEAD /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")[0] == 200
    )
