"""The dashboard against real processes: HaloD and two nodes, browsers on WebSockets, a
web app over SP. The nodes' heartbeat ``load`` reaches the page's JSON, a drain reaches
the event stream as a new table and a drain incident with its hand-off, and ``/trace``
asks both nodes (the page itself runs in Chromium in tests/integration)."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HaloDProcess, NodeProcess, keys_on_routes, send_event, wait_for

pytestmark = pytest.mark.slow

KEY = b"operator-key-" + b"x" * 40


class Stream:
    """``GET /dashboard/events`` read in a thread: (arrival time, event, data)."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)
        self.conn.request("GET", "/dashboard/events")
        self.response = self.conn.getresponse()
        assert self.response.status == 200
        assert self.response.getheader("content-type") == "text/event-stream"
        self.events: list[tuple[float, str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        event = None
        try:
            for raw in self.response:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event is not None:
                    self.events.append((time.time(), event, json.loads(line[6:])))
                    event = None
        except (OSError, ValueError, AttributeError):  # closed by the test
            pass

    def of(self, kind: str) -> list[tuple[float, Any]]:
        return [(t, data) for t, name, data in list(self.events) if name == kind]

    def close(self) -> None:
        self.conn.close()


def call(halod: HaloDProcess, path: str, method: str = "GET", key: bytes | None = KEY,
         **headers: str) -> tuple[int, Any]:  # fmt: skip
    if key is not None:
        headers["Authorization"] = "Bearer " + key.decode()
    request = urllib.request.Request(f"http://{halod.status_http}{path}", method=method,
                                     headers=headers)  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_dashboard_follows_real_nodes_through_a_drain(tmp_path: Path) -> None:
    key_file = tmp_path / "operator.key"
    key_file.write_bytes(KEY)
    started: list[HaloDProcess | NodeProcess] = []
    stream = None
    try:
        halod = HaloDProcess(tmp_path, "--heartbeat-interval", "0.2", "--spares", "0",
                             "--operator-key-file", str(key_file)).start()  # fmt: skip
        started.append(halod)
        n1 = halod.node(tmp_path, "n1", "--linger", "30", "--trace", "all")
        started.append(n1)
        n2 = halod.node(tmp_path, "n2", "--linger", "30", "--trace", "all")
        started.append(n2)
        wait_for(lambda: len(set(halod.owners().values())) == 2, "both nodes own routes")
        mine = [r for r, o in halod.owners().items() if o == "n1"]
        keys = keys_on_routes(mine, count=3)
        sockets = [n1.ws(n1.token(k.user)) for k in keys]
        for ws in sockets:
            assert json.loads(ws.recv(timeout=5))["type"] == "hello"

        # Without etcd a HaloD is named by its control host:port, as etcd_name defaults to.
        me = call(halod, "/dashboard/state", key=None)[1]["halod"]
        assert me["name"] == halod.control.removeprefix("tcp://") and me["role"]

        def row(name: str) -> dict[str, Any]:
            state = call(halod, "/dashboard/state", key=None)[1]
            return next(n for n in state["nodes"]["nodes"] if n["name"] == name)

        # The node's own per-route counts, through its heartbeat load.
        wait_for(lambda: sum(row("n1")["routes"].values()) == 3, "n1 reports 3 browsers")
        assert row("n1")["connections"] == 3
        with n1.req() as req:
            for i in range(10):
                to = [[k.user, k.session, k.location] for k in keys]
                assert send_event(req, f"e{i}", to, {"i": i})["results"]
                time.sleep(0.05)
        wait_for(lambda: (row("n1")["events_per_s"] or 0) > 0, "n1's events/s")

        stream = Stream(halod.status_http)
        wait_for(lambda: stream.of("snapshot"), "the snapshot")
        version = stream.of("snapshot")[0][1]["table"]["version"]
        posted = time.time()
        status, body = call(halod, "/nodes/n1/drain", "POST")
        assert (status, body) == (200, {"name": "n1", "state": "drained"})
        wait_for(lambda: any(d["version"] > version for _, d in stream.of("table")),
                 "the new table on the stream")  # fmt: skip
        arrived, table = next((t, d) for t, d in stream.of("table") if d["version"] > version)
        assert arrived - posted < 1.0
        assert set(table["owners"]) == {"n2"}
        for ws in sockets:  # the browsers follow the reconnect hint, to the new owner
            ws.close()
        sockets = [n2.ws(n2.token(k.user)) for k in keys]
        for ws in sockets:
            assert json.loads(ws.recv(timeout=5))["type"] == "hello"

        def drained() -> dict[str, Any] | None:
            return next((d for _, d in reversed(stream.of("incident"))
                         if d["kind"] == "drain" and not d["open"]), None)  # fmt: skip

        wait_for(drained, "the drain incident settled", timeout=35)
        incident = drained()
        assert incident is not None and incident["node"] == "n1" and incident["settled"]
        assert incident["handoff_s"] is not None and incident["mailboxes_handed"] >= 3
        assert incident["browsers_moved"] == 3 and incident["browsers_back"] == 3
        assert incident["back_s"] is not None
        assert {m["route"] for m in incident["moves"]} == set(mine)
        for ws in sockets:
            ws.close()

        # /trace: both nodes are asked; the records of the events sent are n1's.
        status, answer = call(halod, f"/trace?user={keys[0].user}&event=e3")
        assert status == 200 and answer["asked"] == ["n1", "n2"]
        assert answer["answered"] == ["n1", "n2"] and answer["missing"] == []
        assert call(halod, f"/trace?user={keys[0].user}", key=None)[0] == 401
        (entry,) = answer["keys"]  # the first key; delivered on n1, then handed to n2
        assert entry["key"] == [keys[0].user, keys[0].session, keys[0].location]
        assert entry["owner_now"] == "n2"
        records = [r for r in entry["dispatches"] if r.get("event") == "e3"]
        assert records and records[0]["node"] == "n1" and records[0]["status"] == "delivered"
        (verdict,) = answer["verdicts"]
        assert verdict["event"] == "e3" and verdict["key"] == entry["key"]
        assert verdict["text"].startswith("written to ws")
    finally:
        if stream is not None:
            stream.close()
        for proc in reversed(started):
            if proc.proc is not None and proc.proc.poll() is None:
                proc.stop(signal.SIGKILL)
