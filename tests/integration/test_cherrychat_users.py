"""cherrychat's pushes addressed to users, its latest-value events and its offline-hook
endpoint, with a fake web-app client (what ``send`` is asked) and the real store.

The whole path (nodes, browsers) is in test_cherrychat_browser.py; this pins what the app
asks the client for and how it reads the answers and the nodes' offline notices.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.web.test.requesthelper import DummyRequest

from orbited.client.cluster import HaloDCluster
from orbited.core.keys import ConnectionKey, Selector
from orbited.node.presence import sign

DEMOS = Path(__file__).resolve().parents[2] / "demos"
sys.path.insert(0, str(DEMOS))

from cherrychat.app import COOKIE, ChatApp, message_event_id, message_of  # noqa: E402
from cherrychat.store import Store  # noqa: E402

SECRET = b"s" * 32


class FakeClient:
    """Records each send; answers every recipient with ``answer(target, options)``."""

    def __init__(self) -> None:
        self.sent: list[tuple[list[Any], dict, str | None, dict]] = []
        self.answer = lambda target, options: {"status": "matched", "keys": {
            ConnectionKey(target.user, "t", "/cherrychat/tab-1"): {"status": "delivered",
                                                                    "seq": 1}}}  # fmt: skip

    def send(self, to, data, event_id=None, **options) -> defer.Deferred:
        self.sent.append((list(to), data, event_id, options))
        return defer.succeed({t: self.answer(t, options) for t in to})

    def close(self) -> None:
        pass


@pytest.fixture
def app(tmp_path) -> ChatApp:
    store = Store(tmp_path / "chat.sqlite3")
    cluster = HaloDCluster("127.0.0.1", 9100, 8100)
    return ChatApp(store, SECRET, cluster, FakeClient(), task.Clock(), offline_hook=True,
                   offline_after=7.0, max_tabs=5)  # fmt: skip


def logged_in(app: ChatApp, nick: str, room: str = "lobby") -> str:
    sid = app.store.login(nick)
    app.store.join(room, app.store.session(sid).ident)
    return sid


def post(app: ChatApp, handler, body: bytes, sid: str | None = None, *args: str,
         headers: dict[bytes, bytes] | None = None) -> DummyRequest:  # fmt: skip
    request = DummyRequest([b""])
    request.method = b"POST"
    request.content = io.BytesIO(body)
    request.requestHeaders.setRawHeaders(b"content-type", [b"application/json"])
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
    cookies = {COOKIE: sid.encode()} if sid is not None else {}
    request.getCookie = cookies.get  # type: ignore[method-assign]
    request.addCookie = lambda *a, **k: None  # type: ignore[method-assign]
    handler(request, *args)
    return request


def test_a_message_goes_to_each_member_as_a_user_once(app):
    logged_in(app, "alice")
    logged_in(app, "Bob")
    message = app.store.add_message("lobby", "alice", "hi")
    app.push_message(message)
    ((to, data, event_id, options),) = app.client.sent
    assert to == [Selector("alice", None), Selector("bob", None)]  # identities, every tab
    assert data["type"] == "message" and data["text"] == "hi"
    assert event_id == message_event_id("lobby", message["id"]) == f"m.lobby.{message['id']}"
    assert options == {"offline": 7.0}  # the app's offline_after
    assert app.pushes == {"delivered": 2}  # counted per tab reached


def test_member_lists_and_typing_are_latest_value_events(app):
    sid = logged_in(app, "alice")
    logged_in(app, "bob")
    app.push_members(["lobby"])
    to, data, _, options = app.client.sent[-1]
    assert data["type"] == "members" and options == {"latest": "members:lobby"}
    assert post(app, app.typing, b'{"typing": true}', sid, "lobby").responseCode == 204
    to, data, _, options = app.client.sent[-1]
    assert to == [Selector("bob", None)]  # not the typist
    assert data == {"type": "typing", "room": "lobby", "nick": "alice", "typing": True}
    assert options == {"latest": "typing:lobby:alice"}  # no offline notice for typing
    with pytest.raises(Exception, match="typing must be true or false"):
        post(app, app.typing, b'{"typing": "yes"}', sid, "lobby")


def test_logging_out_tells_only_that_sessions_tabs(app):
    sid = logged_in(app, "carol")
    session = app.store.session(sid)
    request = post(app, app.logout, b"{}", sid)
    assert request.responseCode in (None, 200)
    sent = [s for s in app.client.sent if s[1] == {"type": "logged_out"}]
    assert [s[0] for s in sent] == [[Selector("carol", session.tag)]]


def test_without_an_offline_hook_on_the_nodes_messages_still_go(app):
    logged_in(app, "alice")
    refused = {"status": "error", "code": "bad_request", "error": "offline hook not configured"}
    app.client.answer = lambda target, options: (
        refused if "offline" in options else {"status": "no_connection", "keys": {}}
    )
    app.push_message(app.store.add_message("lobby", "alice", "one"))
    first, again = app.client.sent
    assert "offline" in first[3] and "offline" not in again[3]
    assert again[2] == first[2] and again[0] == first[0]  # same event, without the hook
    app.push_message(app.store.add_message("lobby", "alice", "two"))
    assert "offline" not in app.client.sent[-1][3] and not app.offline_hook
    assert app.pushes == {"no_connection": 2}


def notices(*events: dict) -> bytes:
    return json.dumps({"node": "n1", "events": list(events)}).encode()


def signed(body: bytes) -> dict[bytes, bytes]:
    return {b"x-orbited-signature": sign(SECRET, body).encode()}


def test_offline_notices_are_shown_in_the_room(app):
    logged_in(app, "alice")
    logged_in(app, "Dave")
    message = app.store.add_message("lobby", "alice", "are you there?")
    event_id = message_event_id("lobby", message["id"])
    body = notices(
        {"type": "needs_push", "key": ["dave", "*", "*"], "id": event_id,
         "reason": "no_connection", "keys": [], "serial": 1, "time": 0},
        {"type": "needs_push", "key": ["dave", "*", "*"], "id": "not-a-message",
         "reason": "unacked", "serial": 2, "time": 0},
        {"type": "cancel", "key": ["dave", "*", "*"], "id": event_id, "serial": 3, "time": 0},
    )  # fmt: skip
    assert post(app, app.offline, body, headers=signed(body)).responseCode == 204
    assert app.offline_counts == {"needs_push": 1, "cancel": 1}  # the foreign id is ignored
    shown = [
        (s[1]["notice"], s[1]["nick"], s[3]) for s in app.client.sent if s[1]["type"] == "offline"
    ]
    tag = {"latest": f"offline:lobby:{message['id']}:dave"}
    assert shown == [("needs_push", "Dave", tag), ("cancel", "Dave", tag)]


@pytest.mark.parametrize(
    ("body", "headers", "code"),
    [(b"{}", {b"x-orbited-signature": b"sha256=" + b"0" * 64}, 403), (b"{}", {}, 403),
     (b"[]", None, 400), (b"nope", None, 400), (b'{"events": [{"type": "x"}]}', None, 400)],
)  # fmt: skip
def test_offline_notices_need_the_signature_and_the_documented_shape(app, body, headers, code):
    with pytest.raises(Exception) as raised:
        post(app, app.offline, body, headers=signed(body) if headers is None else headers)
    assert raised.value.code == code


def test_message_event_ids_map_back_to_their_message():
    assert message_of(message_event_id("python", 12)) == ("python", 12)
    for junk in ("m.python", "x.python.1", "m.Bad Room.1", "m.python.x", 12, None, "m..1"):
        assert message_of(junk) is None


def test_on_hash_version_1_the_app_sends_to_the_tabs_it_knows(app):
    # No wildcards on a version-1 cluster (a user's tabs may be on several nodes): the
    # open tabs' keys instead, each session's own for a logout.
    sid = logged_in(app, "alice")
    logged_in(app, "bob")
    alice = app.store.session(sid)
    app.store.open_tab(alice, "tab-aaaa-1", "page-aaaa-1")
    app.store.open_tab(alice, "tab-aaaa-2", "page-aaaa-2")
    app.cluster.follow_hash(1)
    app.client.answer = lambda target, options: {"status": "delivered", "seq": 1}
    app.push_message(app.store.add_message("lobby", "bob", "hi"))
    to, _, _, options = app.client.sent[-1]
    assert to == [ConnectionKey("alice", alice.tag, f"/cherrychat/tab-aaaa-{i}") for i in (1, 2)]
    assert options == {"offline": 7.0}  # bob has no tab: nobody else to send to
    post(app, app.logout, b"{}", sid)
    to, data, _, _ = app.client.sent[-1]
    assert data == {"type": "logged_out"} and to == [
        ConnectionKey("alice", alice.tag, f"/cherrychat/tab-aaaa-{i}") for i in (1, 2)]  # fmt: skip
