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
