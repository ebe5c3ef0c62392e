"""A webhook receiver's redirect is not followed (docs/security.md, "Webhooks"): a real
node process POSTs its offline notice to a receiver answering 307; the node counts that as
a failed attempt, tries `offline_retries` times in all, then drops the batch, and the
redirect's target never hears from it."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import NodeProcess

pytestmark = pytest.mark.slow


class Server:
    """Counts POSTs; answers ``code`` (with ``Location: location`` for a redirect)."""

    def __init__(self, code: int, location: str = "") -> None:
        self.posts = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers["content-length"]))
                server.posts += 1
                self.send_response(code)
                if location:
                    self.send_header("location", location)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def health(node: NodeProcess) -> dict:
    with urllib.request.urlopen(f"http://{node.http}/orbited/health", timeout=5) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("code", [301, 307, 308])
def test_a_redirecting_receiver_is_not_followed_and_the_batch_is_dropped(tmp_path, code):
    target = Server(204)
    redirect = Server(code, target.url)
    node = NodeProcess(
        tmp_path, "--offline-url", redirect.url, "--offline-retries", "3",
        "--offline-backoff", "0.1",
    ).start()  # fmt: skip
    try:
        with node.req() as req:
            doc = {"id": "m-1", "to": [["carol", "s", "/t"]], "data": 1, "offline": 2}
            req.send(json.dumps(doc).encode())
            assert json.loads(req.recv_msg().bytes)["ok"]
        deadline = time.monotonic() + 10
        while health(node)["limits"]["offline_dropped"] < 1:
            assert time.monotonic() < deadline, "the batch was never dropped"
            time.sleep(0.05)
        limits = health(node)["limits"]
        assert (limits["offline_sent"], limits["offline_dropped"]) == (0, 1)
        assert redirect.posts == 3  # offline_retries attempts in all
        assert target.posts == 0  # the Location is never followed
    finally:
        node.stop()
        redirect.close()
        target.close()
