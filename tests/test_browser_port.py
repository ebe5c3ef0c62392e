"""The browser port's edges: same-origin on any port.

docs/protocol.md, "Cross-origin pages".
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from websockets.exceptions import InvalidStatus

from orbited.transports.common import origin_allowed
from tests.conftest import NodeProcess

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
    """Send raw bytes, read until the node closes (or stops sending)."""
    host, port = node.http.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, TimeoutError):
            pass
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
