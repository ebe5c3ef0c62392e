"""Issue 21 end to end: real node processes, the real nng (pynng REQ) as the web app and
every browser transport (WebSocket, SSE, long-poll, iframe) as the browsers.

docs/protocol.md: "Addressing a user or a session" (wildcard recipients, `matched` with a
status per key reached, `no_connection` with `keys: []`), "Per-user limits" (4429 / HTTP
429 `user_limit`, 4003 `displaced` and the `closed` frame, `limited` with `retry_after`),
"Latest-value events" (`latest`, `replaced`, the browser's rule: a skipped seq was
either announced by a `gap` or replaced), the hash version (`hello.hash`, the request's
`hash`, `hash_version_mismatch`), and bad input (bad wildcard forms, limits of 0, bad
`latest` tags, bad `offline`). The offline webhook's own tests are in
tests/node/test_user_protocol_offline.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pynng
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from orbited.core.keys import ConnectionKey
from tests.conftest import SECRET, NodeProcess

pytestmark = pytest.mark.slow

TRANSPORTS = ("ws", "sse", "poll", "iframe")
CYCLE_GRACE = 2.0  # s a key counts as attached after its transport left (a poll cycle)
SETTLE = 0.5  # s for the node to see a page's close or ack (no reply tells when)
SCRIPT = re.compile(rb"<script>f\((.*?)\)</script>\n")
# Frames after which a transport is over for good (or until the page reconnects).
FINAL = ("replaced", "closed", "reconnect")


# -- the browser side: one connection of a key on one transport ---------------------------


class Tab:
    """One browser connection of ``key`` on ``transport``, read by a background thread.

    ``frames`` collects every frame (long-poll: of every response, the loop re-polling
    with ``last`` = its position, which acknowledges). A refusal is kept as ``status`` and
    ``error`` (an HTTP answer before a stream started) or ``close_code``/``close_reason``
    (WebSocket). ``ended`` is set once the transport is over."""

    def __init__(self, node: NodeProcess, key: tuple[str, str, str] | list[str], transport: str,
                 last: str | None = None, token: str | None = None) -> None:  # fmt: skip
        assert transport in TRANSPORTS, transport
        self.node = node
        self.key = ConnectionKey(*key)
        self.transport = transport
        self.token = token or node.token(*self.key)
        self.frames: list[dict] = []
        self.status: int | None = None
        self.error: dict | None = None
        self.close_code: int | None = None
        self.close_reason: str = ""
        self.ended = False
        self.failure = ""
        self.stream: str | None = None
        self.seq = 0
        self._cond = threading.Condition()
        self._lock = threading.Lock()
        self._stop = False
        self._ws: Any = None
        self._conn: http.client.HTTPConnection | None = None
        self._sock: socket.socket | None = None
        self._first = True
        self._last = last
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    # -- reading -------------------------------------------------------------------------

    def _add(self, frame: dict) -> None:
        with self._cond:
            if frame.get("type") == "hello":
                if frame.get("stream") != self.stream or frame.get("reset"):
                    self.stream, self.seq = frame.get("stream"), int(frame.get("seq") or 0)
            elif frame.get("type") == "event":
                self.seq = max(self.seq, frame["seq"])
            elif frame.get("type") == "gap":  # as the JS client: lost, passed over
                self.seq = max(self.seq, frame["to"])
            self.frames.append(frame)
            self._cond.notify_all()

    def _end(self) -> None:
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    def _query(self, **extra: str) -> str:
        params = {"token": self.token, **extra}
        if self._last:
            params["last"] = self._last
        return urlencode(params)

    def _run(self) -> None:
        try:
            {"ws": self._run_ws, "sse": self._run_stream, "iframe": self._run_stream,
             "poll": self._run_poll}[self.transport]()  # fmt: skip
        except (OSError, http.client.HTTPException, ValueError, WebSocketException) as e:
            self.failure = repr(e)  # shown by a failing wait
        finally:
            self._end()

    def _run_ws(self) -> None:
        try:
            self._ws = ws = self.node.ws(self.token, last=self._last)
        except InvalidStatus as e:
            self.status = e.response.status_code
            try:
                self.error = json.loads(e.response.body or b"null")
            except ValueError:
                self.error = None
            return
        try:
            while True:
                self._add(json.loads(ws.recv()))
        except ConnectionClosed as e:
            if e.rcvd is not None:
                self.close_code, self.close_reason = e.rcvd.code, e.rcvd.reason
            else:
                self.close_code = 1006

    def _open_http(self, path: str) -> http.client.HTTPResponse | None:
        host, port = self.node.http.rsplit(":", 1)
        with self._lock:  # close() either stops this or shuts its socket down
            if self._stop:
                return None
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.connect()
            self._conn = conn
            # http.client hands a close-delimited response (the iframe's) its socket and
            # forgets it (conn.sock None): close() shuts this one down.
            self._sock = conn.sock
        conn.request("GET", path)
        response = conn.getresponse()
        if response.status != 200:
            self.status = response.status
            try:
                self.error = json.loads(response.read() or b"null")
            except ValueError:
                self.error = None
            return None
        return response

    def _run_stream(self) -> None:
        if self.transport == "sse":
            response = self._open_http(f"/orbited/sse?{self._query()}")
        else:
            origin = f"http://{self.node.http}"
            response = self._open_http(f"/orbited/iframe?{self._query(origin=origin)}")
        if response is None:
            return
        self.status = 200
        buffer = b""
        while chunk := response.read1(65536):
            buffer += chunk
            if self.transport == "sse":
                while b"\n\n" in buffer:
                    message, buffer = buffer.split(b"\n\n", 1)
                    for line in message.split(b"\n"):
                        if line.startswith(b"data: "):
                            self._add(json.loads(line[6:]))
            else:
                for match in SCRIPT.finditer(buffer):
                    self._add(json.loads(json.loads(match.group(1))))
                end = buffer.rfind(b"</script>\n")
                if end >= 0:
                    buffer = buffer[end + len(b"</script>\n") :]

    def _run_poll(self) -> None:
        while not self._stop:
            # The first poll answers at once (hello); the next ones are held until events.
            timeout = "0" if self._first else "20"
            self._first = False
            response = self._open_http(f"/orbited/poll?{self._query(timeout=timeout)}")
            if response is None:
                return
            self.status = 200
            frames = json.loads(response.read())
            self._conn.close()  # type: ignore[union-attr]
            for frame in frames:
                self._add(frame)
            if self.stream is not None:
                self._last = f"{self.stream}:{self.seq}"
            if any(f.get("type") in FINAL for f in frames):
                return

    # -- the test's side ----------------------------------------------------------------

    def wait(self, predicate: Callable[[], object], what: str, timeout: float = 10) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise AssertionError(
                    f"{self.transport} tab {list(self.key)}: timed out waiting for {what}; "
                    f"frames {self.frames[-5:]}, status {self.status}, "
                    f"close {self.close_code} {self.close_reason} {self.failure}"
                )

    def opened(self, timeout: float = 10) -> Tab:
        """Wait for hello (a test of a refusal waits with ``refused``)."""
        self.wait(lambda: self.hello() is not None or self.ended, "hello", timeout)
        assert self.hello() is not None, (self.transport, self.status, self.error,
                                          self.close_code, self.close_reason)  # fmt: skip
        return self

    def refused(self, timeout: float = 10) -> Tab:
        self.wait(lambda: self.ended, "the end of the transport", timeout)
        return self

    def hello(self) -> dict | None:
        return next((f for f in self.frames if f.get("type") == "hello"), None)

    def events(self) -> list[dict]:
        with self._cond:
            return [f for f in self.frames if f.get("type") == "event"]

    def ids(self) -> list[Any]:
        return [f.get("id") for f in self.events()]

    def of_type(self, kind: str) -> list[dict]:
        with self._cond:
            return [f for f in self.frames if f.get("type") == kind]

    def wait_ids(self, *ids: str, timeout: float = 10) -> list[dict]:
        self.wait(lambda: set(ids) <= {f.get("id") for f in self.frames}, f"events {ids}",
                  timeout)  # fmt: skip
        return self.events()

    def position(self) -> str:
        assert self.stream is not None
        return f"{self.stream}:{self.seq}"

    def ack(self) -> None:
        """Acknowledge everything received (long-poll: its next poll does)."""
        if self.transport == "ws":
            self._ws.send(json.dumps({"type": "ack", "seq": self.seq}))
        elif self.transport in ("sse", "iframe"):
            host, port = self.node.http.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
            query = urlencode({"token": self.token, "last": self.position()})
            conn.request("POST", f"/orbited/ack?{query}")
            assert conn.getresponse().status == 204
            conn.close()

    def close(self) -> None:
        """The page goes away: the connection closes (a held poll is aborted)."""
        with self._lock:
            self._stop = True
            sock = self._sock
        if self._ws is not None:
            self._ws.close()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(10)


def health(node: NodeProcess) -> dict:
    with urllib.request.urlopen(f"http://{node.http}/orbited/health", timeout=5) as r:
        return json.load(r)


def wait_polls_held(node: NodeProcess, count: int) -> None:
    deadline = time.monotonic() + 10
    while health(node)["limits"]["pending_polls"] < count:
        assert time.monotonic() < deadline, f"fewer than {count} long-polls held"
        time.sleep(0.02)


def open_tabs(node: NodeProcess, specs: list[tuple[tuple[str, str, str], str]]) -> list[Tab]:
    """Open tabs one after the other (attach order matters for close_oldest); long-polls
    are waited for until the node holds them, so their key counts as attached."""
    tabs: list[Tab] = []
    for key, transport in specs:
        tabs.append(Tab(node, key, transport).opened())
        if transport == "poll":
            wait_polls_held(node, sum(t.transport == "poll" for t in tabs))
    return tabs


def close_all(tabs: list[Tab]) -> None:
    for tab in tabs:
        tab.close()


# -- the web app side ---------------------------------------------------------------------


def request(req: pynng.Req0, body: dict | bytes) -> dict:
    req.send(body if isinstance(body, bytes) else json.dumps(body).encode())
    return json.loads(req.recv_msg().bytes)


def results(req: pynng.Req0, event_id: str, to: list, data: object = None, **fields) -> list:
    reply = request(req, {"id": event_id, "to": to, "data": data, **fields})
    assert reply.get("ok") is True, reply
    return reply["results"]


def by_key(result: dict) -> dict[tuple[str, ...], dict]:
    """A `matched` result's per-key statuses, keyed by the key as a tuple."""
    assert set(result) >= {"status", "keys"}, result
    return {tuple(entry["key"]): {k: v for k, v in entry.items() if k != "key"}
            for entry in result["keys"]}  # fmt: skip


@pytest.fixture(scope="module")
def unlimited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node with the per-user limits explicitly 0 (no limit), linger long enough for
    the tests' detach-and-resume steps."""
    proc = NodeProcess(tmp_path_factory.mktemp("users"), "--linger", "30",
                       "--user-max-connections", "0", "--user-rate", "0")  # fmt: skip
    proc.start()
    yield proc
    proc.stop()


def four_tabs(node: NodeProcess, user: str) -> list[Tab]:
    """A user with one tab per transport: sessions sA (ws, sse) and sB (poll, iframe)."""
    specs = [((user, "sA", "/ws"), "ws"), ((user, "sA", "/sse"), "sse"),
             ((user, "sB", "/poll"), "poll"), ((user, "sB", "/iframe"), "iframe")]  # fmt: skip
    return open_tabs(node, specs)


# -- 1. addressing a user or a session ----------------------------------------------------


def test_a_user_wildcard_reaches_every_key_once_on_every_transport(unlimited: NodeProcess):
    node = unlimited
    tabs = four_tabs(node, "wu")
    keys = {tuple(t.key) for t in tabs}
    try:
        with node.req() as req:
            [matched] = results(req, "wu-1", [["wu", "*", "*"]], {"n": 1})
            assert matched["status"] == "matched"
            per_key = by_key(matched)
            assert set(per_key) == keys
            assert {r["status"] for r in per_key.values()} == {"delivered"}, matched
            for tab in tabs:
                [event] = tab.wait_ids("wu-1")
                assert event["data"] == {"n": 1}
                assert event["seq"] == per_key[tuple(tab.key)]["seq"]
            wait_polls_held(node, 1)

            # A session: only that session's keys; the others get nothing.
            [matched] = results(req, "wu-2", [["wu", "sB", "*"]], 2)
            assert matched["status"] == "matched"
            assert set(by_key(matched)) == {("wu", "sB", "/poll"), ("wu", "sB", "/iframe")}
            for tab in tabs[2:]:
                tab.wait_ids("wu-2")
            wait_polls_held(node, 1)

            # A key listed and matched by a wildcard is delivered once; both entries show it.
            wildcard, exact = results(req, "wu-3", [["wu", "*", "*"], ["wu", "sA", "/ws"]], 3)
            assert by_key(wildcard)[("wu", "sA", "/ws")] == exact
            assert exact["status"] == "delivered"
            for tab in tabs:
                tab.wait_ids("wu-3")
            time.sleep(0.3)
            for tab in tabs:
                got = tab.ids()
                assert got.count("wu-1") == 1 and got.count("wu-3") == 1, (tab.transport, got)
                assert ("wu-2" in got) == (tab.key.session == "sB"), (tab.transport, got)
                # each key keeps its own sequence: 1, 2, ... with no hole
                assert [e["seq"] for e in tab.events()] == list(range(1, len(got) + 1))
    finally:
        close_all(tabs)


def test_a_resent_wildcard_gets_the_first_reply_and_nothing_twice(unlimited: NodeProcess):
    node = unlimited
    tabs = four_tabs(node, "rs")
    try:
        body = {"id": "rs-1", "to": [["rs", "*", "*"], ["rs", "sA", "*"]], "data": {"x": 1}}
        with node.req() as req:
            first = request(req, body)
            for tab in tabs:
                tab.wait_ids("rs-1")
            wait_polls_held(node, 1)
            again = request(req, body)
        assert first["ok"] is True and "duplicate" not in first, first
        assert again == {**first, "duplicate": True}, (first, again)
        # the session wildcard reached keys the user wildcard did: one event each
        assert by_key(first["results"][1]).items() <= by_key(first["results"][0]).items()
        time.sleep(0.3)
        assert all(t.ids() == ["rs-1"] for t in tabs), [t.ids() for t in tabs]
    finally:
        close_all(tabs)


def test_an_acknowledged_mode_wildcard_answers_per_key_on_every_transport(
    unlimited: NodeProcess,
):
    """`ack`: the reply waits for the browsers; each key reached is `acked` once its
    page confirmed (WebSocket ack, POST /orbited/ack, the next poll's `last`) or
    `unacked` when the wait ended first (here the iframe tab never confirms)."""
    node = unlimited
    tabs = four_tabs(node, "am")
    try:
        with node.req() as req:
            req.send(json.dumps({"id": "am-1", "to": [["am", "*", "*"]], "data": 1,
                                 "ack": 3}).encode())  # fmt: skip
            for tab in tabs:
                tab.wait_ids("am-1")
            for tab in tabs:
                if tab.transport != "iframe":
                    tab.ack()
            started = time.monotonic()
            reply = json.loads(req.recv_msg().bytes)
        assert reply["ok"] is True, reply
        [matched] = reply["results"]
        assert matched["status"] == "matched", matched
        statuses = {k: r["status"] for k, r in by_key(matched).items()}
        assert statuses == {("am", "sA", "/ws"): "acked", ("am", "sA", "/sse"): "acked",
                            ("am", "sB", "/poll"): "acked",
                            ("am", "sB", "/iframe"): "unacked"}, statuses  # fmt: skip
        assert time.monotonic() - started < 5
    finally:
        close_all(tabs)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_acknowledged_mode_wildcard_for_a_user_with_no_tab_waits_for_one(
    unlimited: NodeProcess, transport: str
):
    """`ack` and no tab: the event is held (docs/protocol.md, "held"); the user's first
    tab gets it in its first batch, and once it confirms, the reply names that key
    `acked`. With no tab in time the reply is `no_connection` with `held`."""
    node = unlimited
    user = f"hold-{transport}"
    with node.req() as req:
        req.send(json.dumps({"id": f"{user}-1", "to": [[user, "*", "*"]], "data": 1,
                             "ack": 8}).encode())  # fmt: skip
        time.sleep(SETTLE)
        with pytest.raises(pynng.TryAgain):
            req.recv_msg(block=False)
        tab = Tab(node, [user, "s", "/t"], transport).opened()
        try:
            [event] = tab.wait_ids(f"{user}-1")
            assert event["seq"] == 1
            tab.ack()
            reply = json.loads(req.recv_msg().bytes)
        finally:
            tab.close()
    assert reply["results"] == [{"status": "matched", "keys": [
        {"key": [user, "s", "/t"], "status": "acked", "seq": 1}]}], reply  # fmt: skip


def test_an_acknowledged_mode_wildcard_nobody_takes_answers_held(unlimited: NodeProcess):
    with unlimited.req() as req:
        started = time.monotonic()
        got = results(req, "nobody-ack", [["hold-nobody", "*", "*"]], 1, ack=1)
    assert got == [{"status": "no_connection", "keys": [], "held": True}], got
    assert time.monotonic() - started >= 0.9  # it waited for a tab


def test_none_reached_says_so_with_an_empty_key_list(unlimited: NodeProcess):
    node = unlimited
    tabs = open_tabs(node, [(("nr", "s1", "/a"), "ws")])
    try:
        with node.req() as req:
            got = results(req, "nr-1", [["nr", "s2", "*"], ["nobody-here", "*", "*"],
                                        ["nr", "s*", "/a"], ["nr", "*", "*"]])  # fmt: skip
        assert got[0] == {"status": "no_connection", "keys": []}
        assert got[1] == {"status": "no_connection", "keys": []}
        # Only the whole string "*" is a wildcard: "s*" is an ordinary session.
        assert got[2] == {"status": "no_connection"}
        assert got[3]["status"] == "matched" and list(by_key(got[3])) == [("nr", "s1", "/a")]
        tabs[0].wait_ids("nr-1")
    finally:
        close_all(tabs)


def test_a_closed_tab_queues_and_resumes_while_the_others_deliver(unlimited: NodeProcess):
    """Each key keeps its own mailbox and resume: a tab that went away gets the user's
    events `queued`, and on coming back (any transport) exactly those, once."""
    node = unlimited
    tabs = four_tabs(node, "cq")
    try:
        with node.req() as req:
            results(req, "cq-1", [["cq", "*", "*"]])
            for tab in tabs:
                tab.wait_ids("cq-1")
            for gone in tabs:
                position = gone.position()
                gone.close()
                time.sleep(SETTLE)  # the node sees the close
                if gone.transport != "poll":
                    wait_polls_held(node, 1)
                eid = f"cq-gone-{gone.transport}"
                [matched] = results(req, eid, [["cq", "*", "*"]])
                per_key = by_key(matched)
                assert per_key[tuple(gone.key)]["status"] == "queued", matched
                others = [t for t in tabs if t is not gone]
                for tab in others:
                    assert per_key[tuple(tab.key)]["status"] in ("delivered", "queued")
                    tab.wait_ids(eid)
                back = Tab(node, gone.key, gone.transport, last=position).opened()
                back.wait_ids(eid)
                assert not back.hello()["reset"]
                time.sleep(0.2)
                assert back.ids() == [eid], back.ids()
                tabs[tabs.index(gone)] = back
                if back.transport == "poll":
                    wait_polls_held(node, 1)
    finally:
        close_all(tabs)


# -- 2. per-user limits -------------------------------------------------------------------


def start_node(tmp: Path, *flags: str) -> NodeProcess:
    return NodeProcess(tmp, "--linger", "30", *flags).start()


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = start_node(tmp_path_factory.mktemp("refuse"), "--user-max-connections", "2",
                      "--user-limit-policy", "refuse")  # fmt: skip
    yield proc
    proc.stop()


def assert_user_limit_refusal(tab: Tab) -> None:
    """docs/protocol.md, "Errors (browser side)": WebSocket close 4429 `user_limit`; an
    HTTP transport gets 429 with the JSON error `user_limit` before its stream starts."""
    assert tab.hello() is None, tab.frames
    if tab.transport == "ws":
        assert tab.close_code == 4429, (tab.close_code, tab.close_reason, tab.status)
        assert tab.close_reason.startswith("user_limit"), tab.close_reason
    else:
        assert tab.status == 429, (tab.status, tab.error)
        assert tab.error["error"]["code"] == "user_limit", tab.error


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_refuse_policy_refuses_the_newest_connection(refusing: NodeProcess, transport: str):
    node = refusing
    user = f"ref-{transport}"
    tabs = open_tabs(node, [((user, "s", "/1"), "ws"), ((user, "s", "/2"), "poll")])
    extra: list[Tab] = []
    try:
        newest = Tab(node, (user, "s", "/3"), transport).refused()
        assert_user_limit_refusal(newest)
        with node.req() as req:
            # Nothing was created for the refused key; the two tabs are untouched.
            [matched, refused_key] = results(
                req, f"{user}-1", [[user, "*", "*"], [user, "s", "/3"]]
            )
            assert set(by_key(matched)) == {(user, "s", "/1"), (user, "s", "/2")}
            assert {r["status"] for r in by_key(matched).values()} == {"delivered"}
            assert refused_key == {"status": "no_connection"}
            for tab in tabs:
                tab.wait_ids(f"{user}-1")
            assert not any(t.ended for t in tabs)

            # A new connection on an attached key replaces it (4001 / `replaced`), never 4429.
            again = Tab(node, (user, "s", "/1"), transport).opened()
            extra.append(again)
            tabs[0].wait(lambda: tabs[0].ended, "the replaced tab to end")
            assert tabs[0].close_code == 4001
            if transport == "poll":
                wait_polls_held(node, 2)
            # A lingering mailbox does not count: with a tab closed, a new key is admitted
            # (once the long-poll cycle grace is over: between two polls a key counts).
            tabs[1].close()
            time.sleep(CYCLE_GRACE + 0.3)
            third = Tab(node, (user, "s", "/4"), transport).opened()
            extra.append(third)
            if transport == "poll":
                wait_polls_held(node, 1 + (again.transport == "poll"))
            [matched] = results(req, f"{user}-2", [[user, "*", "*"]])
            statuses = {k: r["status"] for k, r in by_key(matched).items()}
            assert statuses == {(user, "s", "/1"): "delivered", (user, "s", "/2"): "queued",
                                (user, "s", "/4"): "delivered"}, statuses  # fmt: skip
            # ... and now a third attached one is refused again
            fourth = Tab(node, (user, "s", "/5"), transport).refused()
            assert_user_limit_refusal(fourth)
    finally:
        close_all(tabs + extra)


def test_every_refusal_and_displacement_is_counted(tmp_path: Path):
    """/orbited/health's stats count refused (`user_refused`) and displaced
    (`user_displaced`) connections, whichever check refused them (the HTTP transports'
    and the WebSocket upgrade's pre-check, or the attach itself)."""
    for policy, stat in (("refuse", "user_refused"), ("close_oldest", "user_displaced")):
        folder = tmp_path / policy
        folder.mkdir()
        node = start_node(folder, "--user-max-connections", "1", "--user-limit-policy", policy)
        tabs: list[Tab] = []
        try:
            for i, transport in enumerate(TRANSPORTS):
                tab = Tab(node, ("counted", "s", f"/{i}"), transport)
                tabs.append(tab.opened() if i == 0 or policy == "close_oldest" else tab.refused())
                if policy == "close_oldest" and i > 0:
                    assert_displaced(tabs[i - 1])
                if transport == "poll" and policy == "close_oldest":
                    wait_polls_held(node, 1)
            assert health(node)["stats"][stat] == len(TRANSPORTS) - 1, health(node)["stats"]
        finally:
            close_all(tabs)
            node.stop()


@pytest.fixture(scope="module")
def displacing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = start_node(tmp_path_factory.mktemp("oldest"), "--user-max-connections", "2",
                      "--user-limit-policy", "close_oldest")  # fmt: skip
    yield proc
    proc.stop()


def assert_displaced(tab: Tab) -> None:
    """The oldest connection is closed for good: WebSocket close 4003, an HTTP transport
    the frame {"type":"closed","code":4003,"reason":"displaced"} and its end."""
    tab.wait(lambda: tab.ended, "the displaced tab to end")
    if tab.transport == "ws":
        assert tab.close_code == 4003, (tab.close_code, tab.close_reason)
        assert "displaced" in tab.close_reason, tab.close_reason
    else:
        closed = tab.of_type("closed")
        assert closed == [{"type": "closed", "code": 4003, "reason": "displaced"}], tab.frames


PAIRS = [("ws", "sse"), ("sse", "poll"), ("poll", "iframe"), ("iframe", "ws")]


@pytest.mark.parametrize(("oldest", "newest"), PAIRS)
def test_close_oldest_policy_displaces_the_longest_attached(
    displacing: NodeProcess, oldest: str, newest: str
):
    node = displacing
    user = f"old-{oldest}-{newest}"
    tabs = open_tabs(node, [((user, "s", "/1"), oldest), ((user, "s", "/2"), "ws")])
    try:
        tabs.append(Tab(node, (user, "s", "/3"), newest).opened())
        assert_displaced(tabs[0])
        if newest == "poll":
            wait_polls_held(node, 1)
        with node.req() as req:
            # The displaced key's mailbox is gone at once (its page will not reconnect).
            [matched, gone] = results(req, f"{user}-1", [[user, "*", "*"], [user, "s", "/1"]])
            assert gone == {"status": "no_connection"}
            assert {k: r["status"] for k, r in by_key(matched).items()} == {
                (user, "s", "/2"): "delivered",
                (user, "s", "/3"): "delivered",
            }
            for tab in tabs[1:]:
                tab.wait_ids(f"{user}-1")
            assert f"{user}-1" not in tabs[0].ids()
        assert health(node)["stats"]["user_displaced"] >= 1
    finally:
        close_all(tabs)


def test_close_oldest_displaces_a_long_poll_between_two_polls(tmp_path: Path):
    """A long-poll between two polls counts as a connection (a poll cycle), so when it is
    the oldest it is the one displaced: its next poll gets the `closed` frame (4003), and
    the user never has more than `user_max_connections` connections."""
    node = start_node(tmp_path, "--user-max-connections", "1",
                      "--user-limit-policy", "close_oldest")  # fmt: skip
    newest: Tab | None = None
    try:
        token = node.token("cyc", "s", "/poll")
        status, frames = node.poll(f"token={token}&timeout=0")  # attached, now between polls
        assert status == 200 and frames[0]["type"] == "hello", frames
        newest = Tab(node, ("cyc", "s", "/ws"), "ws").opened()
        status, frames = node.poll(f"token={token}&last={frames[0]['stream']}:0&timeout=1")
        assert status == 200, frames
        assert {"type": "closed", "code": 4003, "reason": "displaced"} in frames, frames
        with node.req() as req:
            [matched] = results(req, "cyc-1", [["cyc", "*", "*"]])
        assert list(by_key(matched)) == [("cyc", "s", "/ws")], matched
        assert health(node)["gauges"]["attached"] == 1
        assert not newest.ended
    finally:
        if newest is not None:
            newest.close()
        node.stop()


def test_a_limit_of_zero_is_no_limit(unlimited: NodeProcess):
    node = unlimited
    specs = [(("zero", "s", f"/{i}"), TRANSPORTS[i % 4]) for i in range(8)]
    tabs = open_tabs(node, specs)
    try:
        with node.req() as req:
            [matched] = results(req, "zero-1", [["zero", "*", "*"]])
            assert len(by_key(matched)) == 8
            for tab in tabs:
                tab.wait_ids("zero-1")
            # user_rate 0: no rate limit either (user_burst's default 20 is not a cap)
            for i in range(40):
                [r] = results(req, f"zero-r{i}", [["zero", "s", "/0"]])
                assert r["status"] in ("delivered", "queued"), r
    finally:
        close_all(tabs)


@pytest.mark.parametrize("flags", [
    ("--user-max-connections", "-1"),
    ("--user-rate", "-1"),
    ("--user-rate", "5", "--user-burst", "0"),
    ("--user-burst", "0"),
    ("--user-hold", "-1"),
    ("--user-limit-policy", "oldest"),
    ("--hash-version", "3"),
    ("--hash-version", "0"),
])  # fmt: skip
def test_bad_limit_values_are_config_errors(tmp_path: Path, flags: tuple[str, ...]):
    (tmp_path / "secret").write_bytes(SECRET)
    done = subprocess.run(
        [sys.executable, "-m", "orbited.cli", "node", "--http", "127.0.0.1:0",
         "--sp", "tcp://127.0.0.1:0", "--secret-file", str(tmp_path / "secret"),
         "--no-create-secret", *flags],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "unrecognized arguments" not in done.stderr, done.stderr[-2000:]
    name = flags[-2].removeprefix("--").replace("-", "_")
    assert name in done.stderr or flags[-2] in done.stderr, done.stderr[-2000:]


@pytest.fixture(scope="module")
def rate_limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = start_node(tmp_path_factory.mktemp("rate"), "--user-rate", "0.5", "--user-burst", "2")
    yield proc
    proc.stop()


def test_the_per_user_rate_limits_wildcards_and_exact_keys_alike(rate_limited: NodeProcess):
    node = rate_limited
    tabs = four_tabs(node, "rl")
    other = open_tabs(node, [(("rl-other", "s", "/t"), "ws")])
    try:
        with node.req() as req:
            [first] = results(req, "rl-1", [["rl", "*", "*"]])
            assert first["status"] == "matched"
            for tab in tabs:
                tab.wait_ids("rl-1")
            wait_polls_held(node, 1)
            # Listing keys does not get around it, and a user counts once per request.
            second = results(req, "rl-2", [["rl", "sA", "/ws"], ["rl", "sA", "/sse"],
                                           ["rl", "sA", "*"]])  # fmt: skip
            assert [r["status"] for r in second] == ["delivered", "delivered", "matched"]
            third = results(req, "rl-3", [["rl", "*", "*"], ["rl", "sB", "/poll"],
                                          ["rl-other", "s", "/t"]])  # fmt: skip
            for limited in third[:2]:
                assert limited["status"] == "limited", third
                assert 0 < limited["retry_after"] <= 2 / 0.5 + 0.01, third
                assert "seq" not in limited and "keys" not in limited
            assert third[2]["status"] == "delivered"  # another user is not limited
            other[0].wait_ids("rl-3")
            # A user with no connection here has nothing to limit.
            for i in range(4):
                assert results(req, f"ghost-{i}", [["rl-ghost", "*", "*"]]) == [
                    {"status": "no_connection", "keys": []}
                ]
            time.sleep(third[0]["retry_after"] + 0.05)
            [again] = results(req, "rl-4", [["rl", "*", "*"]])
            assert again["status"] == "matched" and len(again["keys"]) == 4
            for tab in tabs:
                tab.wait_ids("rl-4")
        for tab in tabs:  # the limited event was stored nowhere
            assert "rl-3" not in tab.ids() and tab.ids().count("rl-2") == (tab.key.session == "sA")
    finally:
        close_all(tabs + other)


# -- 3. latest-value events ---------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_latest_value_replaces_and_the_browser_sees_which_seqs_were_replaced(
    unlimited: NodeProcess, transport: str
):
    node = unlimited
    key = [f"lv-{transport}", "s", "/t"]
    tab = Tab(node, key, transport).opened()
    stream = tab.hello()["stream"]
    tab.close()
    time.sleep(SETTLE)
    with node.req() as req:
        sent = [("e1", "price:X"), ("e2", "price:X"), ("e3", None), ("e4", "price:x"),
                ("e5", "price:X")]  # fmt: skip
        replies = {}
        for eid, tag in sent:
            fields = {"latest": tag} if tag else {}
            [replies[eid]] = results(req, eid, [key], {"v": eid}, **fields)
        assert [replies[e]["seq"] for e, _ in sent] == [1, 2, 3, 4, 5]  # monotonic, never reused
        assert all(r["status"] == "queued" for r in replies.values()), replies
        assert "replaced" not in replies["e1"] and replies["e2"]["replaced"] == 1
        assert "replaced" not in replies["e3"]
        assert "replaced" not in replies["e4"]  # a tag differing in case is another tag
        assert replies["e5"]["replaced"] == 2  # cumulative: e5 replaced e2, which replaced e1
        assert not any("dropped" in r for r in replies.values())

        back = Tab(node, key, transport, last=f"{stream}:0").opened()
        back.wait_ids("e5")
        time.sleep(0.3)
        assert back.of_type("gap") == []  # replaced is not lost: no gap
        events = back.events()
        assert [(e["seq"], e["id"]) for e in events] == [(3, "e3"), (4, "e4"), (5, "e5")]
        assert "latest" not in events[0] and "replaced" not in events[0]
        assert events[1]["latest"] == "price:x" and "replaced" not in events[1]
        assert events[2]["latest"] == "price:X" and events[2]["replaced"] == 2
        assert events[2]["data"] == {"v": "e5"}
        # The browser's rule: the seqs it skipped are exactly those the replaced counts cover.
        skipped = 5 - len(events)
        assert skipped == sum(e.get("replaced", 0) for e in events)

        # Live: a delivered but unacknowledged event is replaced too; the live tab has both,
        # a page that resumes from before them gets only the newest.
        if transport == "poll":
            wait_polls_held(node, 1)
        before = back.position()
        [r6] = results(req, "e6", [key], 6, latest="price:Y")
        assert r6 == {"status": "delivered", "seq": 6}, r6
        back.wait_ids("e6")
        if transport == "poll":
            wait_polls_held(node, 1)
        [r7] = results(req, "e7", [key], 7, latest="price:Y")
        back.wait_ids("e7")
        if transport == "poll":
            # the poll that got e6 acknowledged it (its next poll carries last), so e7
            # replaced nothing; the other transports have not acknowledged e6
            assert r7["seq"] == 7 and "replaced" not in r7, r7
        else:
            assert r7["seq"] == 7 and r7["replaced"] == 1, r7
            assert back.events()[-1] == {
                "type": "event",
                "seq": 7,
                "id": "e7",
                "latest": "price:Y",
                "replaced": 1,
                "data": 7,
            }
        back.close()
        if transport == "poll":
            return  # its polls acknowledged e6 and e7: nothing left to resume from before
        time.sleep(SETTLE)
        resumed = Tab(node, key, transport, last=before).opened()
        try:
            resumed.wait_ids("e7")
            time.sleep(0.2)
            # Only the newest: e6 was replaced.
            assert resumed.ids() == ["e7"], resumed.frames
            assert resumed.of_type("gap") == []
        finally:
            resumed.close()


def test_acknowledged_events_are_never_replaced(unlimited: NodeProcess):
    node = unlimited
    key = ["lv-acked", "s", "/t"]
    tab = Tab(node, key, "ws").opened()
    try:
        with node.req() as req:
            [first] = results(req, "a1", [key], 1, latest="T")
            tab.wait_ids("a1")
            tab.ack()
            time.sleep(SETTLE)  # the ack reaches the node
            [second] = results(req, "a2", [key], 2, latest="T")
        assert second == {"status": "delivered", "seq": 2}, second
    finally:
        tab.close()


def test_an_acknowledged_mode_wait_on_a_replaced_event_answers_replaced(unlimited: NodeProcess):
    node = unlimited
    key = ["lv-ackmode", "s", "/t"]
    tab = Tab(node, key, "sse").opened()
    tab.close()
    time.sleep(SETTLE)
    with node.req() as waiting, node.req() as req:
        waiting.send(json.dumps({"id": "w1", "to": [key], "data": 1, "ack": 10,
                                 "latest": "T"}).encode())  # fmt: skip
        time.sleep(0.3)
        with pytest.raises(pynng.TryAgain):  # the browser has not confirmed it
            waiting.recv_msg(block=False)
        [newer] = results(req, "w2", [key], 2, latest="T")
        assert newer["status"] == "queued" and newer["seq"] == 2 and newer["replaced"] == 1
        reply = json.loads(waiting.recv_msg().bytes)
    assert reply["results"] == [{"status": "replaced", "seq": 1, "by": 2}], reply


def test_a_wildcard_with_latest_replaces_within_each_key(unlimited: NodeProcess):
    node = unlimited
    tabs = four_tabs(node, "lvw")
    positions = {t.transport: t.position() for t in tabs}
    close_all(tabs)
    time.sleep(SETTLE)
    with node.req() as req:
        [m1] = results(req, "lw1", [["lvw", "*", "*"]], 1, latest="members:42")
        [m2] = results(req, "lw2", [["lvw", "*", "*"]], 2, latest="members:42")
    assert {r["status"] for r in by_key(m1).values()} == {"queued"}
    assert len(by_key(m2)) == 4
    for per_key in by_key(m2).values():
        assert per_key["status"] == "queued" and per_key["seq"] == 2 and per_key["replaced"] == 1
    back = [Tab(node, t.key, t.transport, last=positions[t.transport]).opened() for t in tabs]
    try:
        for tab in back:
            [event] = tab.wait_ids("lw2")
            assert (event["seq"], event["latest"], event["replaced"]) == (2, "members:42", 1)
        time.sleep(0.2)
        assert all(t.ids() == ["lw2"] and not t.of_type("gap") for t in back)
    finally:
        close_all(back)


# -- 4. the hash version ------------------------------------------------------------------


def test_a_wildcard_for_a_user_another_node_owns_is_moved_with_the_hash(tmp_path: Path):
    """With HaloD, a user's route is one node's: a wildcard sent to another node answers
    `moved` with the route, the owner's SP address and the hash version, and nothing is
    stored; sent to the owner it is matched."""
    from orbited.core.hashing import route_of_user
    from tests.conftest import HaloDProcess

    halod = HaloDProcess(tmp_path, "--spares", "0").start()
    nodes: list[NodeProcess] = []
    try:
        nodes = [halod.node(tmp_path, name) for name in ("m1", "m2")]
        owners = halod.owners()
        user = next(f"mv{i}" for i in range(1000)
                    if owners[route_of_user(f"mv{i}", 24)] == "m2")  # fmt: skip
        route = route_of_user(user, 24)
        owner, other = nodes[1], nodes[0]
        tab = Tab(owner, [user, "s", "/t"], "ws").opened()
        try:
            with other.req() as req:
                [moved] = results(req, "mv-1", [[user, "*", "*"]])
            assert moved == {"status": "moved", "route": route, "to": owner.sp, "hash": 2}, moved
            with owner.req() as req:
                [matched] = results(req, "mv-2", [[user, "*", "*"]])
            assert list(by_key(matched)) == [(user, "s", "/t")]
            tab.wait_ids("mv-2")
            assert "mv-1" not in tab.ids()
        finally:
            tab.close()
    finally:
        for node in nodes:
            node.stop()
        halod.stop()


@pytest.fixture(scope="module")
def v1_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = start_node(tmp_path_factory.mktemp("v1"), "--hash-version", "1")
    yield proc
    proc.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_hello_carries_the_node_hash_version(unlimited: NodeProcess, v1_node: NodeProcess,
                                             transport: str):  # fmt: skip
    for node, version in ((unlimited, 2), (v1_node, 1)):
        tab = Tab(node, [f"hv-{transport}", "s", "/t"], transport).opened()
        tab.close()
        assert tab.hello()["hash"] == version, tab.hello()


def test_a_request_for_another_hash_version_is_refused_with_the_node_version(
    unlimited: NodeProcess, v1_node: NodeProcess
):
    tabs = {name: Tab(node, ["hm", "s", "/t"], "ws").opened()
            for name, node in (("v2", unlimited), ("v1", v1_node))}  # fmt: skip
    try:
        for name, node, mine, other in (("v2", unlimited, 2, 1), ("v1", v1_node, 1, 2)):
            with node.req() as req:
                reply = request(req, {"id": f"hm-{name}", "to": [["hm", "s", "/t"]],
                                      "data": 1, "hash": other})  # fmt: skip
                assert reply["ok"] is False and reply["id"] == f"hm-{name}", reply
                assert reply["error"]["code"] == "hash_version_mismatch", reply
                assert reply["error"]["hash"] == mine, reply
                ok = results(req, f"hm-ok-{name}", [["hm", "s", "/t"]], 2, hash=mine)
                assert ok[0]["status"] == "delivered"
            tabs[name].wait_ids(f"hm-ok-{name}")
            assert f"hm-{name}" not in tabs[name].ids()
    finally:
        close_all(list(tabs.values()))


def test_wildcards_are_refused_on_a_hash_v1_node(v1_node: NodeProcess):
    tab = Tab(v1_node, ["v1u", "s", "/t"], "sse").opened()
    try:
        with v1_node.req() as req:
            for to in (
                [["v1u", "*", "*"]],
                [["v1u", "s", "*"]],
                [["v1u", "s", "/t"], ["v1u", "*", "*"]],
            ):
                reply = request(req, {"id": "v1w", "to": to, "data": 1})
                assert reply["ok"] is False, reply
                assert reply["error"]["code"] == "hash_version_mismatch", reply
                assert reply["error"]["hash"] == 1
                assert "wildcards need hash_version 2" in reply["error"]["message"]
            assert results(req, "v1k", [["v1u", "s", "/t"]])[0]["status"] == "delivered"
        tab.wait_ids("v1k")
        assert "v1w" not in tab.ids()
    finally:
        tab.close()


# -- 5. bad input ---------------------------------------------------------------------------


WILDCARD_MESSAGE = 'a wildcard session needs a wildcard location: [user, "*", "*"]'
BAD_KEYS = [
    (["u", "*", "/x"], WILDCARD_MESSAGE),
    (["u", "*", ""], WILDCARD_MESSAGE),
    (["*", "*", "*"], "key user cannot be a wildcard"),
    (["*", "s", "/l"], "key user cannot be a wildcard"),
    (["*", "s", "*"], "key user cannot be a wildcard"),
    (["u", "*"], None),
    (["u", "*", "*", "x"], None),
    (["u", "s", "*", "*"], None),
    (["", "*", "*"], None),
    ([" ", "*", 1], None),
    (["u", "*", None], None),
    (["é" * 129, "*", "*"], None),  # a 258-byte user, with wildcards
    ("u/*/*", None),
]


@pytest.mark.parametrize(("key", "message"), BAD_KEYS)
def test_bad_wildcard_forms_are_bad_key(unlimited: NodeProcess, key: object, message: str | None):
    with unlimited.req() as req:
        reply = request(req, {"id": "bk", "to": [["u", "s", "/t"], key], "data": 1})
    assert reply["ok"] is False and reply["error"]["code"] == "bad_key", reply
    if message:
        assert reply["error"]["message"] == message, reply


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node with the offline hook on (a receiver that accepts everything), so that a
    refused `offline` is refused for its value, not for a missing hook."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Accept)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/offline"
    proc = start_node(tmp_path_factory.mktemp("hooked"), "--offline-url", url)
    yield proc
    proc.stop()
    server.shutdown()


class _Accept(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


BAD_FIELDS = [
    ({"latest": ""}, "bad_request"),
    ({"latest": "x" * 129}, "bad_request"),
    ({"latest": 5}, "bad_request"),
    ({"latest": None}, "bad_request"),
    ({"latest": True}, "bad_request"),
    ({"latest": ["t"]}, "bad_request"),
    ({"offline": 0}, "bad_request"),
    ({"offline": -1}, "bad_request"),
    ({"offline": False}, "bad_request"),
    ({"offline": None}, "bad_request"),
    ({"offline": 86401}, "bad_request"),
    ({"offline": "30"}, "bad_request"),
    ({"latests": "t"}, "bad_request"),  # an unknown field
    ({"hash": "2"}, "bad_request"),
    ({"hash": True}, "bad_request"),
]


@pytest.mark.parametrize(("fields", "code"), BAD_FIELDS, ids=lambda v: json.dumps(v)[:40])
def test_bad_latest_offline_and_hash_fields_are_refused(hooked: NodeProcess, fields: dict,
                                                        code: str):  # fmt: skip
    tab = Tab(hooked, ["bf", "s", "/t"], "ws").opened()
    try:
        with hooked.req() as req:
            reply = request(req, {"id": "bf", "to": [["bf", "*", "*"]], "data": 1, **fields})
            assert reply == {"id": "bf", "ok": False, "error": reply.get("error")}, reply
            assert reply["error"]["code"] == code, reply
            # Nothing was delivered; the same request without the bad field is fine.
            good = results(req, "bf-ok", [["bf", "*", "*"]], 2)
        assert good[0]["status"] == "matched"
        tab.wait_ids("bf-ok")
        assert "bf" not in tab.ids()
    finally:
        tab.close()


def test_good_latest_and_offline_bounds_are_accepted(hooked: NodeProcess):
    with hooked.req() as req:
        good = [{"latest": "x" * 128}, {"latest": "😀" * 128}, {"offline": True},
                {"offline": 86400}, {"offline": 0.5},
                {"latest": "t", "offline": 30, "hash": 2}]  # fmt: skip
        for i, fields in enumerate(good):
            got = results(req, f"gb-{i}", [["gb", "*", "*"]], i, **fields)
            assert got[0]["status"] == "no_connection", (fields, got)


class Notices:
    """An offline webhook receiver: the notices it got, in order."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        events = self.events

        class Hook(_Accept):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                events.extend(json.loads(body)["events"])
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/offline"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, event_id: str) -> list[tuple[str, str | None]]:
        return [(e["type"], e.get("reason")) for e in self.events if e.get("id") == event_id]


@pytest.fixture(scope="module")
def notified(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, Notices]]:
    notices = Notices()
    proc = start_node(tmp_path_factory.mktemp("notified"), "--offline-url", notices.url)
    yield proc, notices
    proc.stop()
    notices.server.shutdown()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("target", ["key", "user"])
def test_an_offline_push_is_cancelled_by_an_ack_on_every_transport(
    notified: tuple[NodeProcess, Notices], transport: str, target: str
):
    """`offline: 1` to a tab that does not acknowledge in time: one needs_push
    (`unacked`); its late acknowledgement (WebSocket ack, POST /orbited/ack) brings the
    cancel. A long-poll acknowledges with its next poll, in time: nothing is sent."""
    node, notices = notified
    user = f"off-{target}-{transport}"
    tab = Tab(node, [user, "s", "/t"], transport).opened()
    eid = f"{user}-1"
    try:
        if transport == "poll":
            wait_polls_held(node, 1)
        to = [[user, "*", "*"]] if target == "user" else [[user, "s", "/t"]]
        with node.req() as req:
            [result] = results(req, eid, to, {"n": 1}, offline=1)
        assert result["status"] in ("delivered", "matched"), result
        tab.wait_ids(eid)
        if transport == "poll":
            time.sleep(2.5)
            assert notices.of(eid) == [], notices.of(eid)
            return
        deadline = time.monotonic() + 10
        while not notices.of(eid):
            assert time.monotonic() < deadline, "no needs_push"
            time.sleep(0.05)
        assert notices.of(eid) == [("needs_push", "unacked")]
        tab.ack()
        while len(notices.of(eid)) < 2:
            assert time.monotonic() < deadline, "no cancel"
            time.sleep(0.05)
        time.sleep(SETTLE)
        assert notices.of(eid) == [("needs_push", "unacked"), ("cancel", None)]
        assert [e["key"] for e in notices.events if e.get("id") == eid] == [to[0], to[0]]
    finally:
        tab.close()


def test_a_user_hold_of_zero_holds_nothing(tmp_path: Path):
    """`user_hold = 0`: a wildcard with `offline` for a user with no tab answers plain
    `no_connection` (no `held`), the needs_push still goes at once, and a tab opened
    afterwards gets nothing."""
    notices = Notices()
    node = start_node(tmp_path, "--offline-url", notices.url, "--user-hold", "0")
    try:
        with node.req() as req:
            got = results(req, "uh-1", [["nohold", "*", "*"]], 1, offline=True)
            assert got == [{"status": "no_connection", "keys": []}], got
            deadline = time.monotonic() + 10
            while not notices.events:
                assert time.monotonic() < deadline, "no needs_push"
                time.sleep(0.05)
            assert notices.of("uh-1") == [("needs_push", "no_connection")], notices.events
            tab = Tab(node, ["nohold", "s", "/t"], "sse").opened()
            results(req, "uh-2", [["nohold", "*", "*"]], 2)
            tab.wait_ids("uh-2")
            assert tab.ids() == ["uh-2"], tab.ids()
            tab.close()
    finally:
        node.stop()
        notices.server.shutdown()


def test_a_lone_surrogate_in_latest_is_bad_json(unlimited: NodeProcess):
    with unlimited.req() as req:
        reply = request(req, b'{"id":"ls","to":[["u","s","/t"]],"data":1,"latest":"\\ud800"}')
    assert reply["ok"] is False and reply["error"]["code"] == "bad_json", reply


def test_offline_without_a_configured_hook_is_a_bad_request(unlimited: NodeProcess):
    with unlimited.req() as req:
        reply = request(req, {"id": "oh", "to": [["u", "*", "*"]], "data": 1, "offline": True})
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
    assert "offline hook not configured" in reply["error"]["message"], reply


def hs256_token(claims: dict) -> str:
    """A JWT signed with the test secret, built by hand: issue_token refuses "*"."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    signature = hmac.new(SECRET, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("claim", ["sid", "loc"])
def test_a_token_with_a_wildcard_session_or_location_is_invalid(
    unlimited: NodeProcess, transport: str, claim: str
):
    claims = {"sub": "tw", "sid": "s", "loc": "/t", "aud": "orbited", "exp": time.time() + 60}
    claims[claim] = "*"
    tab = Tab(unlimited, ["tw", "s", "/t"], transport, token=hs256_token(claims)).refused()
    assert tab.hello() is None
    if transport == "ws":
        assert tab.close_code == 4401, (tab.close_code, tab.status)
        assert tab.close_reason.startswith("token_invalid"), tab.close_reason
    else:
        assert tab.status == 401, (tab.status, tab.error)
        assert tab.error["error"]["code"] == "token_invalid", tab.error
