"""The browser port's edges: same-origin on any port, oversized WebSocket messages and
protocol violations, unsupported methods, unknown paths and oversized request heads.

docs/protocol.md, "Cross-origin pages", "WebSocket" and "Errors (browser side)".
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from orbited.node.transports.common import origin_allowed
from tests.conftest import NodeProcess

pytestmark = pytest.mark.slow

# -- the same-origin rule (sans-I/O) ------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "host", "scheme"),
    [
        ("http://127.0.0.1:8123", "127.0.0.1:8123", "http"),
        ("http://App.Example:8123", "app.example:8123", "http"),  # hosts ignore case
        ("http://app.example", "app.example:80", "http"),  # default ports
        ("http://app.example:80", "app.example", "http"),
        ("https://app.example", "app.example", "https"),
        ("https://app.example:443", "app.example:443", "https"),
        ("http://[::1]:8123", "[::1]:8123", "http"),
    ],
)
def test_same_origin_is_scheme_host_and_port(origin: str, host: str, scheme: str):
    assert origin_allowed(origin, host, [], scheme=scheme)


@pytest.mark.parametrize(
    ("origin", "host", "scheme"),
    [
        ("http://127.0.0.1:8124", "127.0.0.1:8123", "http"),  # another port
        ("http://127.0.0.1", "127.0.0.1:8123", "http"),  # default port is not 8123
        ("http://127.0.0.1:8123", "127.0.0.1", "http"),
        ("https://app.example", "app.example", "http"),  # another scheme
        ("http://app.example", "app.example", "https"),
        ("https://app.example:80", "app.example:80", "http"),
        ("http://evil.example:8123", "127.0.0.1:8123", "http"),
        ("http://127.0.0.1:8123/", "127.0.0.1:8123", "http"),  # not a serialised origin
        ("http://user@127.0.0.1:8123", "127.0.0.1:8123", "http"),
        ("null", "127.0.0.1:8123", "http"),
        ("http://127.0.0.1:8123", None, "http"),
        ("http://127.0.0.1:8123", "127.0.0.1:x", "http"),
        ("http://127.0.0.1:99999", "127.0.0.1:99999", "http"),
        ("ftp://127.0.0.1:8123", "127.0.0.1:8123", "http"),
    ],
)
def test_other_origins_are_cross_origin(origin: str, host: str | None, scheme: str):
    assert not origin_allowed(origin, host, [], scheme=scheme)


def test_no_origin_and_listed_origins_pass():
    assert origin_allowed(None, "127.0.0.1:8123", [])
    assert origin_allowed("https://app.example", "127.0.0.1:8123", ["https://app.example"])
    assert origin_allowed("https://app.example", "127.0.0.1:8123", ["*"])
    assert not origin_allowed("https://app.example", "127.0.0.1:8123", ["https://other.example"])


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def port_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node on a port that is not 80: same-origin must still be same-origin there."""
    proc = NodeProcess(tmp_path_factory.mktemp("port-node"), "--linger", "5")
    proc.start()
    assert not proc.http.endswith(":80")
    yield proc
    proc.stop()


def request(node: NodeProcess, method: str, path: str, headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    host, port = node.http.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        body = response.read() if method != "GET" or response.status != 200 else b""
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


def raw_exchange(node: NodeProcess, data: bytes) -> bytes:
    """Send raw bytes; read one response (to its Content-Length, or until the node
    closes the connection)."""
    host, port = node.http.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
            head, sep, body = out.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length:")]  # fmt: skip
            if sep and length and len(body) >= length[0]:
                break
        return out


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def json_error(headers: dict[str, str], body: bytes) -> str:
    assert headers["content-type"] == "application/json", headers
    error = json.loads(body)["error"]
    assert error["message"]
    return error["code"]


def position(node: NodeProcess, token: str) -> str:
    status, frames = node.poll(f"token={token}&timeout=0")
    assert status == 200
    return f"{frames[0]['stream']}:{frames[0]['seq']}"


CHROMIUM = shutil.which("chromium")
BIG_MESSAGE_PAGE = """async (token) => await new Promise((resolve) => {
  const ws = new WebSocket(`ws://${location.host}/orbited/ws?token=${token}`);
  const seen = [];
  ws.onmessage = (e) => {
    seen.push(JSON.parse(e.data).type);
    if (seen.length === 1) ws.send("x".repeat(5000));
  };
  ws.onclose = (e) => resolve({code: e.code, reason: e.reason, seen});
})"""


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed")
def test_chromium_same_origin_page_sees_close_1009_for_a_big_message(port_node: NodeProcess):
    """Real Chromium, on a page of the node's own origin (a port that is not 80): the
    WebSocket opens (same-origin), and a message over 4 KiB gets close 1009, not 1006."""
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    from tests.integration.test_browser import CHROMIUM_ARGS

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"http://{port_node.http}/orbited/health")
            result = page.evaluate(BIG_MESSAGE_PAGE, port_node.token("chromium-big"))
        finally:
            browser.close()
    assert result["seen"] == ["hello"]
    assert result["code"] == 1009, result


def raw_websocket(node: NodeProcess, token: str, extra: str = "", host: str = "") -> socket.socket:
    """A WebSocket opened by hand, to send what no client library would."""
    address, port = node.http.rsplit(":", 1)
    s = socket.create_connection((address, int(port)), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    extra = extra + "\r\n" if extra else ""
    s.sendall(
        f"GET /orbited/ws?token={token} HTTP/1.1\r\nHost: {host or node.http}\r\n{extra}"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


# -- item: same-origin on a non-default port, over every transport -----------------------


def test_same_origin_passes_on_every_transport_on_a_non_default_port(port_node: NodeProcess):
    node = port_node
    origin = f"http://{node.http}"
    token = node.token("same-origin")

    ws = node.ws(token, Origin=origin)
    try:
        assert json.loads(ws.recv(timeout=5))["type"] == "hello"
    finally:
        ws.close()

    status, frames = node.poll(f"token={token}&timeout=0", {"Origin": origin})
    assert status == 200 and frames[0]["type"] == "hello"

    host, port = node.http.rsplit(":", 1)
    for path in (f"/orbited/sse?token={token}",
                 f"/orbited/iframe?token={token}&origin={quote(origin, safe='')}"):  # fmt: skip
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        conn.request("GET", path, headers={"Origin": origin})
        response = conn.getresponse()
        assert response.status == 200, (path, response.read())
        assert response.getheader("access-control-allow-origin") == origin
        conn.close()

    last = position(node, token)
    status, headers, _ = request(
        node, "POST", f"/orbited/ack?token={token}&last={last}", {"Origin": origin}
    )
    assert status == 204
    assert headers["access-control-allow-origin"] == origin


def test_another_port_on_the_same_host_is_cross_origin(port_node: NodeProcess):
    node = port_node
    host, port = node.http.rsplit(":", 1)
    other = f"http://{host}:{int(port) + 1}"
    token = node.token("other-port")

    with pytest.raises(InvalidStatus) as info:
        node.ws(token, Origin=other)
    assert info.value.response.status_code == 403

    status, body = node.poll(f"token={token}&timeout=0", {"Origin": other})
    assert status == 403 and body["error"]["code"] == "origin_not_allowed"

    for path in (f"/orbited/sse?token={token}",
                 f"/orbited/iframe?token={token}&origin={quote(other, safe='')}",
                 f"/orbited/iframe?token={token}&origin={quote(other, safe='')}&x=same",
                 ):  # fmt: skip
        headers = {"Origin": other} if "same" not in path else {}
        status, headers, body = request(node, "GET", path, headers)
        assert status == 403, path
        assert json_error(headers, body) == "origin_not_allowed"

    last = position(node, token)
    status, headers, body = request(
        node, "POST", f"/orbited/ack?token={token}&last={last}", {"Origin": other}
    )
    assert status == 403 and json_error(headers, body) == "origin_not_allowed"


def test_a_tls_terminating_proxy_says_https_with_x_forwarded_proto(port_node: NodeProcess):
    """Behind a TLS terminator the page's origin is https://host; the node hears plain
    HTTP with Host: host and X-Forwarded-Proto: https."""
    node = port_node
    token = node.token("xfp")
    headers = {"Origin": "https://push.example", "Host": "push.example"}
    status, _ = node.poll(f"token={token}&timeout=0", {**headers, "X-Forwarded-Proto": "https"})
    assert status == 200
    status, _ = node.poll(f"token={token}&timeout=0", headers)  # http://push.example:80
    assert status == 403
    raw_websocket(node, token, "Origin: https://push.example\r\nX-Forwarded-Proto: https",
                  host="push.example").close()  # fmt: skip


# -- item: WebSocket messages over the limit and other protocol violations --------------


def test_a_websocket_message_over_4_kib_gets_close_1009(port_node: NodeProcess):
    ws = port_node.ws(port_node.token("big"))
    assert json.loads(ws.recv(timeout=5))["type"] == "hello"
    ws.send("x" * 4097)
    with pytest.raises(ConnectionClosed) as info:
        while True:
            ws.recv(timeout=5)
    assert info.value.rcvd is not None, "the node dropped the connection without a close"
    assert info.value.rcvd.code == 1009


def test_a_websocket_message_of_exactly_4_kib_is_read(port_node: NodeProcess):
    ws = port_node.ws(port_node.token("edge"))
    assert json.loads(ws.recv(timeout=5))["type"] == "hello"
    ws.send(json.dumps({"type": "ack", "seq": 0}).ljust(4096))  # JSON allows the spaces
    ws.send('{"type":"nope"}')
    with pytest.raises(ConnectionClosed) as info:
        while True:
            ws.recv(timeout=5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 4400


def client_frame(opcode: int, payload: bytes, masked: bool = True, fin: bool = True,
                 rsv: int = 0) -> bytes:  # fmt: skip
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    length = len(payload)
    if length < 126:
        head = struct.pack(">BB", first, (0x80 if masked else 0) | length)
    else:
        head = struct.pack(">BBH", first, (0x80 if masked else 0) | 126, length)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_code_after(s: socket.socket, data: bytes) -> int | None:
    """Send ``data``, read frames until a close frame (its code) or the end (None)."""
    s.sendall(data)
    buffer = b""
    try:
        while True:
            while len(buffer) >= 2:
                length = buffer[1] & 0x7F
                start = 2
                if length == 126:
                    if len(buffer) < 4:
                        break
                    length, start = struct.unpack(">H", buffer[2:4])[0], 4
                if len(buffer) < start + length:
                    break
                opcode, payload = buffer[0] & 0x0F, buffer[start : start + length]
                buffer = buffer[start + length :]
                if opcode == 0x8:
                    return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
            chunk = s.recv(65536)
            if not chunk:
                return None
            buffer += chunk
    except (ConnectionResetError, TimeoutError):
        return None
    finally:
        s.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (client_frame(0x1, b"x" * 5000), 1009),  # over the message limit
        (client_frame(0x1, b"x" * 3000, fin=False) + client_frame(0x0, b"x" * 3000), 1009),
        (client_frame(0x1, b'{"type":"ack","seq":1}', masked=False), 1002),  # unmasked
        (client_frame(0x1, b"x", rsv=4), 1002),  # a reserved bit, no extension agreed
        (client_frame(0x3, b"x"), 1002),  # a reserved opcode
        (client_frame(0x9, b"x" * 126), 1002),  # a control frame over 125 bytes
        (client_frame(0x0, b"x"), 1002),  # a continuation with nothing to continue
        (client_frame(0x1, b"\xff\xfe"), 1007),  # text that is not UTF-8
    ],
    ids=[
        "too-big",
        "too-big-fragmented",
        "unmasked",
        "rsv",
        "opcode",
        "long-ping",
        "stray-continuation",
        "not-utf8",
    ],  # fmt: skip
)
def test_websocket_protocol_violations_close_with_a_code(port_node: NodeProcess, frame: bytes,
                                                        code: int):  # fmt: skip
    s = raw_websocket(port_node, port_node.token("violation"))
    assert close_code_after(s, frame) == code


# -- item: methods, unknown paths and request heads the node will not read ---------------

ALLOWED = {
    "ws": "GET",
    "poll": "GET, OPTIONS",
    "sse": "GET",
    "iframe": "GET",
    "ack": "OPTIONS, POST",
    "health": "GET, HEAD",
    "client.js": "GET, HEAD",
    "client.mjs": "GET, HEAD",
}


@pytest.mark.parametrize(
    ("path", "method"),
    [(path, method) for path in sorted(ALLOWED)
     for method in ("PUT", "PATCH", "DELETE", "FOO", "POST", "GET", "OPTIONS", "HEAD")
     if method not in ALLOWED[path].split(", ")],
)  # fmt: skip
def test_unsupported_methods_get_405_with_allow_and_a_json_body(
    port_node: NodeProcess, path: str, method: str
):
    status, headers, body = request(port_node, method, f"/orbited/{path}")
    assert status == 405, body
    assert headers["allow"] == ALLOWED[path]
    if method != "HEAD":  # a HEAD response has no body
        assert json_error(headers, body) == "method_not_allowed"
    else:
        assert headers["content-type"] == "application/json"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "OPTIONS"])
@pytest.mark.parametrize("path", ["/", "/orbited", "/orbited/", "/orbited/nothere",
                                  "/orbited/poll/x", "/favicon.ico"])  # fmt: skip
def test_unknown_paths_get_404_with_a_json_body(port_node: NodeProcess, path: str, method: str):
    status, headers, body = request(port_node, method, path)
    assert status == 404, body
    assert json_error(headers, body) == "not_found"


def test_a_get_without_upgrade_on_the_websocket_url_gets_426(port_node: NodeProcess):
    status, headers, body = request(port_node, "GET", "/orbited/ws?token=x")
    assert status == 426
    assert headers["upgrade"].lower() == "websocket"
    assert headers["sec-websocket-version"] == "13"
    assert json_error(headers, body) == "upgrade_required"


HANDSHAKE = {
    "Host": "h", "Upgrade": "websocket", "Connection": "keep-alive, Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13",
}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"Sec-WebSocket-Version": "8"}, 426, "upgrade_required"),
        ({"Sec-WebSocket-Key": "c2hvcnQ="}, 400, "bad_request"),  # not 16 bytes
        ({"Sec-WebSocket-Key": None}, 400, "bad_request"),
        ({"Connection": "keep-alive"}, 400, "bad_request"),
        ({"Host": None}, 400, "bad_request"),
    ],
    ids=["version", "short-key", "no-key", "no-connection-upgrade", "no-host"],
)
def test_a_bad_websocket_handshake_gets_a_json_error(port_node: NodeProcess, change: dict,
                                                     status: int, code: str):  # fmt: skip
    headers = {k: v for k, v in {**HANDSHAKE, **change}.items() if v is not None}
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    raw = raw_exchange(port_node, f"GET /orbited/ws?token=x HTTP/1.1\r\n{head}\r\n".encode())
    got, response_headers, body = parse_response(raw)
    assert got == status and json_error(response_headers, body) == code
    if status == 426:
        assert response_headers["sec-websocket-version"] == "13"
        assert response_headers["upgrade"] == "websocket"


def test_a_refused_websocket_origin_gets_a_json_403(port_node: NodeProcess):
    raw = raw_exchange(
        port_node,
        f"GET /orbited/ws?token=x HTTP/1.1\r\nHost: {port_node.http}\r\n"
        "Origin: http://evil.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode(),
    )
    status, headers, body = parse_response(raw)
    assert status == 403 and json_error(headers, body) == "origin_not_allowed"


def test_a_request_line_over_16_kib_gets_414(port_node: NodeProcess):
    raw = raw_exchange(
        port_node, b"GET /orbited/poll?x=" + b"a" * 20000 + b" HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    status, headers, body = parse_response(raw)
    assert status == 414 and json_error(headers, body) == "uri_too_long"


def test_a_request_line_of_16_kib_is_read(port_node: NodeProcess):
    line = b"GET /orbited/poll?x=" + b"a" * 16000
    line += b"a" * (16384 - len(line) - len(b" HTTP/1.1")) + b" HTTP/1.1"
    assert len(line) == 16384
    raw = raw_exchange(port_node, line + b"\r\nConnection: close\r\n\r\n")
    status, headers, body = parse_response(raw)
    assert status == 401 and json_error(headers, body) == "token_missing"


@pytest.mark.parametrize(
    "head",
    [
        b"X-Big: " + b"a" * 20000 + b"\r\n",  # one header line over 16 KiB
        b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(20)),  # 20 KiB in all
        b"".join(b"X-%d: a\r\n" % i for i in range(600)),  # too many header lines
    ],
    ids=["long-line", "large-head", "many-headers"],
)
def test_headers_over_the_limits_get_431(port_node: NodeProcess, head: bytes):
    raw = raw_exchange(port_node, b"GET /orbited/health HTTP/1.1\r\nHost: h\r\n" + head + b"\r\n")
    status, headers, body = parse_response(raw)
    assert status == 431 and json_error(headers, body) == "headers_too_large"


@pytest.mark.parametrize(
    "data",
    [
        b"GET /orbited/health\r\n\r\n",
        b"GET /orbited/health HTTP/1.1\r\nNo colon\r\n\r\n",
        b"GET /orbited/health HTTP/1.1\r\nContent-Length: x\r\n\r\n",
    ],  # fmt: skip
    ids=["no-version", "bad-header", "bad-length"],
)
def test_malformed_requests_get_400_with_a_json_body(port_node: NodeProcess, data: bytes):
    status, headers, body = parse_response(raw_exchange(port_node, data))
    assert status == 400 and json_error(headers, body) == "bad_request"


def test_a_bug_in_a_resource_is_a_json_500():
    """twisted.web answers an exception in a resource with an HTML page; the node's site
    with the JSON error body (docs/protocol.md, "Errors")."""
    from twisted.internet.testing import StringTransport
    from twisted.logger import globalLogPublisher

    from orbited.node.transports.http import orbited_site
    from orbited.runtime.web import JSONResource

    class Broken(JSONResource):
        def render_GET(self, request):  # noqa: N802
            raise RuntimeError("a bug")

    site = orbited_site({b"broken": Broken()})
    channel = site.buildProtocol(None)
    transport = StringTransport()
    logged: list[dict] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /orbited/broken HTTP/1.1\r\nHost: h\r\n\r\n")
    finally:
        globalLogPublisher.removeObserver(logged.append)
    status, headers, body = parse_response(transport.value())
    assert status == 500 and json_error(headers, body) == "internal_error"
    assert any("log_failure" in event for event in logged)  # still logged


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /orbited/x?" + b"a" * 90 + b" HTTP/1.1\r\n\r\n", 404),
        (b"GET /orbited/x?" + b"a" * 110 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /orbited/x HTTP/1.1\r\nA: " + b"a" * 60 + b"\r\n\r\n", 404),
        (b"GET /orbited/x HTTP/1.1\r\nA: " + b"a" * 40 + b"\r\nB: " + b"a" * 40 + b"\r\n\r\n",
         431),
        (b"GET /orbited/x HTTP/1.1\r\nA: a\r\nB: b\r\nC: c\r\n\r\n", 431),
    ],
    ids=["line-fits", "line-too-long", "headers-fit", "headers-too-long", "too-many"],
)  # fmt: skip
def test_the_head_limits_come_from_the_browser_limits(data: bytes, status: int):
    """BrowserLimitsConfig holds the defaults of the documented limits; a site and the
    WebSocket factory use the values they are given."""
    from twisted.internet import task
    from twisted.internet.testing import StringTransport

    from orbited.node.hub import Hub, HubConfig
    from orbited.node.transports.common import BrowserAuth
    from orbited.node.transports.limits import BrowserLimits, BrowserLimitsConfig
    from orbited.node.transports.websocket import BrowserWebSocketFactory
    from orbited.node.web import browser_site

    config = BrowserLimitsConfig(
        max_request_line=120, max_header_bytes=70, max_headers=2, max_client_message=10
    )
    clock = task.Clock()
    hub = Hub(clock, HubConfig(), epoch="t")
    limits = BrowserLimits(config, clock)
    auth = BrowserAuth(b"x" * 32)
    channel = browser_site(hub, auth, [], "t", 1 << 20, limits).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(data)
    assert parse_response(transport.value())[0] == status
    factory = BrowserWebSocketFactory(hub, auth, [], limits)
    assert factory.maxMessagePayloadSize == factory.maxFramePayloadSize == 10


# -- item: the browser limits are config keys ---------------------------------------------


def test_the_browser_limits_are_config_keys_on_the_browser_and_publish_ports(tmp_path: Path):
    """max_client_message and max_request_line (docs/operations.md, "Limits") set on a
    real node apply at the new size: close 1009 past 100 bytes, 414 past 1024 bytes,
    on the publish_http listener too."""
    key_file = tmp_path / "publish.key"
    key_file.write_bytes(b"k" * 40)
    node = NodeProcess(
        tmp_path, "--max-client-message", "100", "--max-request-line", "1024",
        "--publish-http", "127.0.0.1:0", "--publish-key-file", str(key_file),
    ).start()  # fmt: skip
    try:
        ws = node.ws(node.token("small"))
        assert json.loads(ws.recv(timeout=5))["type"] == "hello"
        ws.send(json.dumps({"type": "ack", "seq": 0}).ljust(100))  # at the limit: read
        ws.send("x" * 101)
        with pytest.raises(ConnectionClosed) as info:
            while True:
                ws.recv(timeout=5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009

        def line(length: int) -> bytes:
            start = b"GET /orbited/poll?x="
            return start + b"a" * (length - len(start) - len(b" HTTP/1.1")) + b" HTTP/1.1"

        raw = raw_exchange(node, line(1024) + b"\r\nConnection: close\r\n\r\n")
        assert parse_response(raw)[0] == 401  # token_missing: the line was read
        status, headers, body = parse_response(raw_exchange(node, line(1025) + b"\r\n\r\n"))
        assert status == 414 and json_error(headers, body) == "uri_too_long"

        publish = SimpleNamespace(http=node.publish)  # raw_exchange reads .http
        status, headers, body = parse_response(raw_exchange(publish, line(1025) + b"\r\n\r\n"))
        assert status == 414 and json.loads(body)["error"]["code"] == "uri_too_long"
    finally:
        node.stop()


# -- item: after reconnect frames, no keep-alive connection to a stopping node -----------


def test_shutdown_closes_held_and_idle_keep_alive_connections():
    """Node shutdown (NodeService.stopService: hub.shutdown, then the site's
    close_idle_connections): a held poll is answered with the reconnect frame and
    `Connection: close` and its connection closed; an idle keep-alive connection is
    closed too, so the browser's next request cannot reuse one to the stopping node."""
    from twisted.internet import task
    from twisted.internet.testing import StringTransport

    from orbited.core.keys import ConnectionKey
    from orbited.core.tokens import issue_token
    from orbited.node.hub import Hub, HubConfig
    from orbited.node.transports.common import BrowserAuth
    from orbited.node.web import browser_site

    secret = b"s" * 32
    clock = task.Clock()
    hub = Hub(clock, HubConfig(), epoch="t")
    site = browser_site(hub, BrowserAuth(secret), [], "t", 1 << 20)

    def request(path: str) -> tuple[object, StringTransport]:
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(f"GET {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        return channel, transport

    _, idle = request("/orbited/health")
    assert parse_response(idle.value())[0] == 200 and not idle.disconnecting  # keep-alive
    token = issue_token(secret, ConnectionKey("u", "s", "/t"), 60)
    _, held = request(f"/orbited/poll?token={token}&timeout=20")
    assert held.value() == b""  # held
    hub.shutdown("shutdown")
    site.close_idle_connections()  # type: ignore[attr-defined]
    assert idle.disconnecting
    raw = held.value()
    assert b'"reason":"shutdown"' in raw and held.disconnecting, raw
    assert parse_response(raw)[1]["connection"] == "close"


def test_a_poll_refused_with_a_reconnect_frame_leaves_no_timer():
    """A poll the hub answers at once with `reconnect` (node stopping, route not owned)
    is finished: it must not also be held for its timeout (a timer keeping the request
    alive for 25 s per refused poll in a reconnect storm)."""
    from twisted.internet import task
    from twisted.internet.testing import StringTransport

    from orbited.core.keys import ConnectionKey
    from orbited.core.tokens import issue_token
    from orbited.node.hub import Hub, HubConfig
    from orbited.node.transports.common import BrowserAuth
    from orbited.node.web import browser_site

    secret = b"s" * 32
    clock = task.Clock()
    hub = Hub(clock, HubConfig(), epoch="t")
    site = browser_site(hub, BrowserAuth(secret), [], "t", 1 << 20)
    hub.shutdown("shutdown")
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    token = issue_token(secret, ConnectionKey("u", "s", "/t"), 60)
    channel.dataReceived(f"GET /orbited/poll?token={token}&timeout=20 HTTP/1.1\r\n\r\n".encode())
    assert b'"reason":"shutdown"' in transport.value()
    assert clock.getDelayedCalls() == []


# -- the per-user connection limit on the twisted.web transports -------------------------
# (docs/protocol.md, "Per-user limits"): what the Site serves itself (the iframe, and any
# hot request the front hands off), in process on a test clock.

USER_SECRET = b"u" * 32


def user_site(users: object) -> tuple[object, object]:
    from twisted.internet import task

    from orbited.node.hub import Hub, HubConfig
    from orbited.node.transports.common import BrowserAuth
    from orbited.node.web import browser_site

    hub = Hub(task.Clock(), HubConfig(users=users), epoch="t")  # type: ignore[arg-type]
    return hub, browser_site(hub, BrowserAuth(USER_SECRET), [], "t", 1 << 20)


def site_get(site: object, session: str, route: str) -> object:
    """GET /orbited/<route> for ("alice", session, "/t") on a StringTransport."""
    from twisted.internet.testing import StringTransport

    from orbited.core.keys import ConnectionKey
    from orbited.core.tokens import issue_token

    token = issue_token(USER_SECRET, ConnectionKey("alice", session, "/t"), 60)
    query = {"poll": "&timeout=20", "iframe": "&origin=http://h", "sse": ""}[route]
    channel = site.buildProtocol(None)  # type: ignore[attr-defined]
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(
        f"GET /orbited/{route}?token={token}{query} HTTP/1.1\r\nHost: h\r\n\r\n".encode()
    )
    return transport


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        out, body = out + rest[:n], rest[n + 2 :]
    return out


def web_frames(route: str, raw: bytes) -> list[dict]:
    status, headers, body = parse_response(raw)
    assert status == 200, raw
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    if route == "poll":
        return json.loads(body)
    if route == "sse":
        return [json.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: ")]
    return [json.loads(json.loads(m)) for m in re.findall(rb"<script>f\((.*?)\)</script>", body)]


def is_user_limit_429(raw: bytes) -> bool:
    status, headers, body = parse_response(raw)
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return (
        raw.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
        and json_error(headers, body) == "user_limit"
        and json.loads(body)["error"]["message"] == "at most 2 connections per user"
    )


@pytest.mark.parametrize("route", ["poll", "sse", "iframe"])
def test_the_sites_transports_refuse_past_the_user_limit_with_429(route: str):
    from orbited.node.users import UserLimits

    hub, site = user_site(UserLimits(max_connections=2))
    site_get(site, "a", "sse")
    site_get(site, "b", "iframe")
    refused = site_get(site, "c", route)
    assert is_user_limit_429(refused.value()), refused.value()  # type: ignore[attr-defined]
    assert hub.attached == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize("route", ["poll", "sse", "iframe"])
def test_a_refusal_in_the_attach_itself_is_a_429_or_a_closed_frame(route: str):
    """Hub.admits is the pre-check; Hub.attach is the authority. One the pre-check let
    through (a race) gets Sink.closed(4429): a poll, whose answer had not begun, the same
    429; a stream whose head had left, the ``closed`` frame and the end."""
    from orbited.node.users import UserLimits

    hub, site = user_site(UserLimits(max_connections=2))
    hub.admits = lambda key: True  # type: ignore[attr-defined]
    site_get(site, "a", "sse")
    site_get(site, "b", "iframe")
    refused = site_get(site, "c", route)
    raw = refused.value()  # type: ignore[attr-defined]
    if route == "poll":
        assert is_user_limit_429(raw), raw
    else:
        assert web_frames(route, raw) == [{"type": "closed", "code": 4429, "reason": "user_limit"}]
        if route == "sse":
            assert raw.endswith(b"\r\n0\r\n\r\n")  # the response ended
        else:  # close-delimited (docs/protocol.md, "iframe streaming"): ended by the close
            assert refused.disconnecting  # type: ignore[attr-defined]
    assert hub.attached == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize("route", ["poll", "sse", "iframe"])
def test_close_oldest_ends_the_sites_oldest_transport_with_a_closed_frame(route: str):
    from orbited.node.users import UserLimits

    hub, site = user_site(UserLimits(max_connections=2, policy="close_oldest"))
    oldest = site_get(site, "a", route)
    site_get(site, "b", "sse")
    site_get(site, "c", "iframe")
    raw = oldest.value()  # type: ignore[attr-defined]
    frames = web_frames(route, raw)
    assert [f["type"] for f in frames] == ["hello", "closed"], frames
    assert frames[-1] == {"type": "closed", "code": 4003, "reason": "displaced"}
    assert hub.attached == 2  # type: ignore[attr-defined]


# -- request bodies and slow requests (docs/protocol.md, "Errors (browser side)") --------


def _site_channel(config_kwargs: dict | None = None) -> tuple:
    from twisted.internet import task
    from twisted.internet.testing import StringTransport

    from orbited.node.hub import Hub, HubConfig
    from orbited.node.transports.common import BrowserAuth
    from orbited.node.transports.limits import BrowserLimits, BrowserLimitsConfig
    from orbited.node.web import browser_site

    clock = task.Clock()
    hub = Hub(clock, HubConfig(), epoch="t")
    limits = BrowserLimits(BrowserLimitsConfig(**(config_kwargs or {})), clock)
    channel = browser_site(hub, BrowserAuth(b"x" * 32), [], "t", 1 << 20, limits).buildProtocol(
        None
    )
    channel.callLater = clock.callLater
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport, clock


@pytest.mark.parametrize(
    "head",
    [
        b"POST /orbited/ack HTTP/1.1\r\nHost: h\r\nContent-Length: 2000000000\r\n\r\n",
        b"POST /nowhere HTTP/1.1\r\nHost: h\r\nContent-Length: 4097\r\n\r\n",
    ],
    ids=["huge", "one-over"],
)
def test_a_body_over_max_request_body_is_413_at_the_head(head: bytes):
    # Before: twisted.web spooled any body to a temporary file (no token needed).
    channel, transport, _ = _site_channel()
    channel.dataReceived(head + b"x" * 1000)
    status, headers, body = parse_response(transport.value())
    assert status == 413 and json_error(headers, body) == "body_too_large"
    assert headers["connection"] == "close"


def test_a_chunked_body_is_cut_once_it_passes_the_limit():
    channel, transport, _ = _site_channel({"max_request_body": 100})
    channel.dataReceived(
        b"POST /orbited/ack HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    channel.dataReceived(b"20\r\n" + b"a" * 32 + b"\r\n")
    assert transport.value() == b""  # within the limit: still reading
    for _ in range(4):
        channel.dataReceived(b"20\r\n" + b"a" * 32 + b"\r\n")
    status, headers, body = parse_response(transport.value())
    assert status == 413 and json_error(headers, body) == "body_too_large"


def test_a_body_within_the_limit_is_read():
    channel, transport, _ = _site_channel()
    form = b"token=x&last=s:1"
    channel.dataReceived(
        b"POST /orbited/ack HTTP/1.1\r\nHost: h\r\nContent-Type: application/x-www-form-"
        b"urlencoded\r\nContent-Length: %d\r\n\r\n%s" % (len(form), form)
    )
    status, headers, body = parse_response(transport.value())
    assert status == 401 and json_error(headers, body) == "token_malformed"  # read: its token


def test_a_request_trickled_a_byte_at_a_time_is_closed_after_10_s():
    # Before: every byte reset twisted.web's 60 s idle timeout, so a request sent slowly
    # enough (a body byte every 20 s) held its socket for ever.
    channel, transport, clock = _site_channel()
    channel.dataReceived(b"POST /orbited/ack HTTP/1.1\r\nHost: h\r\nContent-Length: 3000\r\n\r\n")
    for _ in range(9):
        clock.advance(1.0)
        channel.dataReceived(b"x")
        assert not transport.disconnecting
    clock.advance(1.0)
    assert transport.disconnecting and transport.value() == b""  # closed, no answer


def test_the_request_deadline_starts_anew_with_each_request():
    channel, transport, clock = _site_channel()
    for _ in range(3):  # three whole requests, 9 s apart: none is late
        clock.advance(9.0)
        channel.dataReceived(b"GET /orbited/nowhere HTTP/1.1\r\nHost: h\r\n\r\n")
    assert not transport.disconnecting
    assert transport.value().count(b"HTTP/1.1 404 ") == 3
    assert not [call for call in clock.getDelayedCalls() if call.func == channel._too_slow]


def test_the_request_limits_on_a_real_node(tmp_path: Path):
    """The browser port and publish_http: a body over the limit gets 413 before it is
    read, without a token or a publish key."""
    key_file = tmp_path / "publish.key"
    key_file.write_bytes(b"k" * 40)
    node = NodeProcess(
        tmp_path, "--max-request-body", "64", "--sp-max-message", "70000",
        "--publish-http", "127.0.0.1:0", "--publish-key-file", str(key_file),
    ).start()  # fmt: skip
    try:
        head = b"POST /orbited/ack HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n"
        status, headers, body = parse_response(raw_exchange(node, head % 65))
        assert status == 413 and json_error(headers, body) == "body_too_large"
        raw = raw_exchange(node, head % 64 + b"x" * 64)
        assert parse_response(raw)[0] == 401  # read: the ack's missing token
        publish = SimpleNamespace(http=node.publish)
        big = b"POST /orbited/publish HTTP/1.1\r\nHost: h\r\nContent-Length: 70001\r\n\r\n"
        status, headers, body = parse_response(raw_exchange(publish, big))
        assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    finally:
        node.stop()
