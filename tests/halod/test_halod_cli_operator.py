"""``halod drain/undrain/rehash --operator-key-file`` (halod/cli.py; docs/halod.md): the
operator key goes as ``Authorization: Bearer <key>``, its default is
``$HALOD_OPERATOR_KEY_FILE``, and without one no header is sent (a HaloD without
``operator_key_file``). A stdlib HTTP server on 127.0.0.1 plays HaloD's status port."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from halod.cli import main

KEY = b"k" * 40


class StatusPort:
    def __init__(self) -> None:
        self.posts: list[tuple[str, str | None]] = []
        self.status = 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                outer.posts.append((self.path, self.headers.get("authorization")))
                self.rfile.read(int(self.headers.get("content-length") or 0))
                if outer.status == 200:
                    body: dict[str, Any] = {"name": "n1", "state": "drained", "previous": 1,
                                            "hash_version": 2, "nodes": ["n1"]}  # fmt: skip
                else:
                    body = {"error": {"code": "unauthorized", "message": "operator key required"}}
                data = json.dumps(body).encode()
                self.send_response(outer.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()


@pytest.fixture
def port() -> Iterator[StatusPort]:
    p = StatusPort()
    yield p
    p.httpd.shutdown()
    p.httpd.server_close()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "operator.key"
    path.write_bytes(KEY + b"\n")
    return path


@pytest.mark.parametrize(
    "argv", [["drain", "n1"], ["undrain", "n1"], ["rehash", "--to", "2"]], ids=lambda a: a[0]
)
def test_the_key_file_is_sent_as_a_bearer_token(port, key_file, argv, monkeypatch, capsys):
    monkeypatch.delenv("HALOD_OPERATOR_KEY_FILE", raising=False)
    assert main([*argv, "--url", port.url, "--operator-key-file", str(key_file)]) == 0
    ((path, auth),) = port.posts
    assert auth == "Bearer " + KEY.decode()  # the file's whitespace stripped
    assert path in ("/nodes/n1/drain", "/nodes/n1/undrain", "/rehash")


def test_the_default_is_the_environment(port, key_file, monkeypatch):
    monkeypatch.setenv("HALOD_OPERATOR_KEY_FILE", str(key_file))
    assert main(["drain", "n1", "--url", port.url]) == 0
    assert port.posts[-1][1] == "Bearer " + KEY.decode()


def test_without_a_key_no_header_is_sent(port, monkeypatch):
    monkeypatch.delenv("HALOD_OPERATOR_KEY_FILE", raising=False)
    assert main(["drain", "n1", "--url", port.url]) == 0
    assert port.posts == [("/nodes/n1/drain", None)]


def test_a_refusal_is_printed_and_exits_1(port, monkeypatch, capsys):
    monkeypatch.delenv("HALOD_OPERATOR_KEY_FILE", raising=False)
    port.status = 401
    assert main(["drain", "n1", "--url", port.url]) == 1
    assert capsys.readouterr().err == "halod drain: operator key required\n"


def test_an_unusable_key_file_exits_2_before_asking(port, tmp_path, capsys):
    short = tmp_path / "short.key"
    short.write_bytes(b"abc")
    for path in (short, tmp_path / "missing.key"):
        assert main(["undrain", "n1", "--url", port.url, "--operator-key-file", str(path)]) == 2
        assert capsys.readouterr().err.startswith("halod undrain: ")
    assert port.posts == []
