"""The HTTP publish API on a real node (docs/protocol.md, "HTTP publish API")."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.conftest import NodeProcess

pytestmark = pytest.mark.slow

API_KEY = "publish-key-0123456789-0123456789-abcdef"


@pytest.fixture(scope="module")
def publishing_node(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("publish")
    (tmp / "api-key").write_text(API_KEY + "\n")
    node = NodeProcess(tmp, "--publish-http", "127.0.0.1:0", "--publish-key-file",
                       str(tmp / "api-key"), "--sp-max-message", "200000")  # fmt: skip
    node.start()
    yield node
    node.stop()


def post(node: NodeProcess, body: bytes, key: str | None = API_KEY, method: str = "POST"):
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        f"http://{node.publish}/orbited/publish", data=body if method == "POST" else None,
        headers=headers, method=method,
    )  # fmt: skip
    if method not in ("POST", "GET"):
        request.data = body
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_publish_reaches_a_websocket(publishing_node: NodeProcess):
    node = publishing_node
    assert node.publish.startswith("127.0.0.1:")
    with node.ws(node.token("http-user")) as ws:
        ws.recv(timeout=5)
        body = json.dumps({"id": "h1", "to": [["http-user", "s", "/t"]], "data": "via http"})
        status, reply = post(node, body.encode())
        assert status == 200 and reply["results"] == [{"status": "delivered", "seq": 1}]
        assert json.loads(ws.recv(timeout=5))["data"] == "via http"
        status, again = post(node, body.encode())
        assert again["duplicate"] is True


@pytest.mark.parametrize("key", [None, "wrong-key", API_KEY + "x", ""])
def test_bad_api_keys_are_refused(publishing_node: NodeProcess, key):
    status, reply = post(publishing_node, b'{"op":"ping"}', key=key)
    assert status == 401 and reply["error"]["code"] == "unauthorized"


def test_bad_requests_and_oversize_bodies(publishing_node: NodeProcess):
    status, reply = post(publishing_node, b"{nope")
    assert status == 400 and reply["error"]["code"] == "bad_json"
    status, reply = post(publishing_node, b"x" * 300_000)
    assert status == 413 and reply["error"]["code"] == "body_too_large"
    for method in ("GET", "PUT", "DELETE"):
        status, reply = post(publishing_node, b"", method=method)
        assert status == 405 and reply["error"]["code"] == "method_not_allowed"


def test_publish_port_is_off_by_default(shared_node: NodeProcess):
    assert shared_node.publish is None


def publish_raw(node: NodeProcess, data: bytes) -> tuple[int, dict[str, str], dict]:
    import socket

    host, port = node.publish.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    return int(status_line.split()[1]), headers, json.loads(body)


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"GET /orbited/nothere HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", 404,
         "not_found"),
        (b"POST /orbited/publish/x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", 404,
         "not_found"),
        (b"PATCH /orbited/publish HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", 405,
         "method_not_allowed"),
        (b"POST /orbited/publish?" + b"a" * 17000 + b" HTTP/1.1\r\n\r\n", 414, "uri_too_long"),
        (b"POST /orbited/publish HTTP/1.1\r\nX: " + b"a" * 17000 + b"\r\n\r\n", 431,
         "headers_too_large"),
        (b"POST /orbited/publish\r\n\r\n", 400, "bad_request"),
    ],
    ids=["unknown-path", "below-publish", "patch", "long-line", "long-header", "malformed"],
)  # fmt: skip
def test_every_error_of_the_publish_listener_is_a_json_reply(
    publishing_node: NodeProcess, data: bytes, status: int, code: str
):
    got, headers, reply = publish_raw(publishing_node, data)
    assert got == status and headers["content-type"] == "application/json"
    assert reply["id"] is None and reply["ok"] is False and reply["error"]["code"] == code
    if status == 405:
        assert headers["allow"] == "POST"
