"""Every HTTP endpoint of cherrychat (demos/README.md, "The web app's HTTP API"), against
the real demo: ``orbited cluster``'s LocalCluster (HaloD, two nodes, a spare, the app as its
own process), each answer and each error path, as a page or a node would see them.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from orbited.cluster import LocalCluster, http_json
from orbited.core.hashing import route_of
from orbited.core.keys import ConnectionKey
from orbited.core.tokens import verify_token
from orbited.node.presence import sign
from tests.integration.test_cherrychat import Browserless, chat_cluster_config, rules

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(chat_cluster_config(tmp_path_factory.mktemp("cluster"))) as running:
        yield running


def raw(cluster: LocalCluster, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """One request without cookies: (status, lower-cased headers, body)."""
    request = urllib.request.Request(cluster.url + path.lstrip("/"), data=body, method=method,
                                     headers=headers or {})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def error(status: int, body: bytes) -> tuple[int, str]:
    """(status, the JSON error message): every error answer is JSON with an ``error``."""
    return status, json.loads(body)["error"]


def logged_in(cluster: LocalCluster, nick: str) -> Browserless:
    user = Browserless(cluster)
    status, me = user.call("POST", "/login", {"nick": nick})
    assert status == 200, me
    return user


def cookie_of(user: Browserless) -> str | None:
    jar = next(h for h in user.opener.handlers if isinstance(h, urllib.request.HTTPCookieProcessor))
    return next((c.value for c in jar.cookiejar if c.name == "cherrychat"), None)


def test_the_page_its_files_and_health(cluster):
    status, headers, body = raw(cluster, "GET", "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert b"<title>cherrychat</title>" in body
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    for name, kind in (("chat.js", "text/javascript"), ("chat.css", "text/css")):
        status, headers, body = raw(cluster, "GET", f"/static/{name}")
        assert status == 200 and headers["content-type"].startswith(kind) and body
    for name in ("index.html", "app.py", "nothing"):
        assert error(*raw(cluster, "GET", f"/static/{name}")[::2]) == (404, "no such file")
    assert error(*raw(cluster, "GET", "/static/..%2fapp.py")[::2]) == (404, "no such page")
    status, headers, body = raw(cluster, "GET", "/orbited-client.mjs")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert b"export class OrbitedClient" in body or b"OrbitedClient" in body
    status, headers, body = raw(cluster, "GET", "/healthz")
    health = json.loads(body)
    assert status == 200 and health["ok"] is True and health["rooms"] >= 3
    assert isinstance(health["online"], int) and isinstance(health["pushes"], dict)
    assert isinstance(health["offline"], dict)


def test_unknown_paths_and_methods_get_json_errors(cluster):
    assert error(*raw(cluster, "GET", "/no/such/page")[::2]) == (404, "no such page")
    status, headers, body = raw(cluster, "GET", "/login")
    assert error(status, body) == (405, "method not allowed")
    assert headers["allow"] == "POST"
    assert error(*raw(cluster, "DELETE", "/rooms/lobby")[::2]) == (405, "method not allowed")


def test_login_answers_and_refusals(cluster):
    user = Browserless(cluster)
    status, me = user.call("POST", "/login", {"nick": "  ep-login "})
    assert status == 200 and me["nick"] == "ep-login" and isinstance(me["rooms"], list)
    assert cookie_of(user)
    assert user.call("POST", "/login", {"nick": ""}) == (400, {"error": "choose a nickname"})
    assert user.call("POST", "/login", {}) == (400, {"error": "nickname must be a string"})
    assert user.call("POST", "/login", ["ep"]) == (
        400, {"error": "the body must be a JSON object"})  # fmt: skip
    assert user.call("POST", "/login", b"{nope") == (400, {"error": "the body is not JSON"})
    assert user.call("POST", "/login", {"nick": "ep"}, content_type="text/plain") == (
        415, {"error": "send application/json"})  # fmt: skip
    assert user.call("POST", "/login", b"x" * 20000) == (
        413, {"error": "request body too large"})  # fmt: skip


def test_logout_ends_the_session_and_clears_the_cookie(cluster):
    user = logged_in(cluster, "ep-logout")
    sid = cookie_of(user)
    status, body = user.call("POST", "/logout", {})
    assert (status, body) == (200, {"ok": True})
    assert cookie_of(user) is None  # the answer expired the cookie
    assert user.call("GET", "/me") == (401, {"error": "log in first"})
    # The old cookie is dead on the server too, not only forgotten by this browser.
    status, _, body = raw(cluster, "GET", "/me", headers={"cookie": f"cherrychat={sid}"})
    assert error(status, body) == (401, "log in first")
    assert user.call("POST", "/logout", {}) == (200, {"ok": True})  # without a session: fine
    assert user.call("POST", "/logout", {}, content_type="text/plain")[0] == 415


def test_me_token_and_rooms_need_a_session(cluster):
    anonymous = Browserless(cluster)
    for path in ("/me", "/token?tab=tab-0001", "/rooms", "/rooms/lobby", "/rooms/lobby/messages"):
        assert anonymous.call("GET", path) == (401, {"error": "log in first"}), path
    for path in ("/rooms/lobby/join", "/rooms/lobby/leave", "/rooms/lobby/messages", "/tabs",
                 "/tabs/tab-0001/close"):  # fmt: skip
        body = {"text": "x", "tab": "tab-0001", "page": "page-0001"}
        assert anonymous.call("POST", path, body) == (401, {"error": "log in first"}), path
    forged = raw(cluster, "GET", "/me", headers={"cookie": "cherrychat=forged"})
    assert error(forged[0], forged[2]) == (401, "log in first")

    user = logged_in(cluster, "ep-me")
    assert user.call("GET", "/me") == (200, {"nick": "ep-me", "rooms": [], "max_tabs": 3})
    status, rooms = user.call("GET", "/rooms")
    names = {r["name"]: r for r in rooms["rooms"]}
    assert status == 200 and {"lobby", "python", "twisted"} <= set(names)
    assert names["lobby"]["joined"] is False


def test_rooms_join_view_history_post_and_leave(cluster):
    user, other = logged_in(cluster, "ep-rooms"), logged_in(cluster, "ep-rooms-2")
    assert user.call("POST", "/rooms/ep-room/join", {"x": 1})[0] == 200  # extra fields: fine
    status, view = user.call("GET", "/rooms/ep-room")
    assert status == 200 and view["room"] == "ep-room"
    assert view["members"] == [{"nick": "ep-rooms", "online": False}]
    assert [(m["kind"], m["nick"]) for m in view["messages"]] == [("join", "ep-rooms")]
    assert other.call("GET", "/rooms/ep-room") == (403, {"error": "join ep-room first"})
    assert other.call("GET", "/rooms/ep-room/messages") == (403, {"error": "join ep-room first"})
    assert other.call("POST", "/rooms/ep-room/messages", {"text": "hi"}) == (
        403, {"error": "join ep-room first"})  # fmt: skip
    assert user.call("GET", "/rooms/bad%20room") == (400, {"error": user_room_rule()})
    assert user.call("POST", "/rooms/-x/join", {}) == (400, {"error": user_room_rule()})

    status, posted = user.call("POST", "/rooms/ep-room/messages", {"text": " hi "})
    assert status == 201 and (posted["text"], posted["nick"], posted["id"]) == ("hi", "ep-rooms", 2)
    for body, message in (
        ({"text": ""}, "the message is empty"),
        ({"text": 5}, "message must be a string"),
        ({}, "message must be a string"),
        ({"text": "a\u202eb"}, "the message contains control or invisible characters"),
    ):
        assert user.call("POST", "/rooms/ep-room/messages", body) == (400, {"error": message})
    assert user.call("POST", "/rooms/ep-room/messages", {"text": "x"},
                     content_type="text/plain")[0] == 415  # fmt: skip
    status, found = user.call("GET", "/rooms/ep-room/messages?after=1")
    assert status == 200 and [m["text"] for m in found["messages"]] == ["hi"]
    assert user.call("GET", "/rooms/ep-room/messages")[1]["messages"][0]["kind"] == "join"
    for after in ("x", "-1", "1" * 19):
        assert user.call("GET", f"/rooms/ep-room/messages?after={after}") == (
            400, {"error": "after must be a message id"})  # fmt: skip

    assert user.call("POST", "/rooms/ep-room/leave", {}) == (200, {"room": "ep-room", "left": True})
    assert user.call("GET", "/rooms/ep-room") == (403, {"error": "join ep-room first"})
    assert user.call("POST", "/rooms/ep-room/leave", {}) == (
        200, {"room": "ep-room", "left": False})  # not a member: nothing to do  # fmt: skip


def user_room_rule() -> str:
    try:
        rules.room("-x")
    except rules.InvalidInput as e:
        return str(e)
    raise AssertionError("-x is a valid room name")


def test_presence_webhook_answers(cluster):
    secret = (cluster.state / "secret").read_bytes().strip()

    def post(body: bytes, signature: str | None = None) -> tuple[int, bytes]:
        headers = {"x-orbited-signature": sign(secret, body) if signature is None else signature}
        status, _, answer = raw(cluster, "POST", "/orbited/presence", body, headers)
        return status, answer

    batch = json.dumps({"node": "ep-node", "events": [
        {"type": "signon", "key": ["ep-hook", "", "/cherrychat"], "serial": 1, "time": 0}]}
    ).encode()  # fmt: skip
    assert error(*post(batch, "sha256=" + "0" * 64)) == (403, "bad signature")
    assert error(*post(batch, "")) == (403, "bad signature")
    assert post(batch) == (204, b"")
    for garbage in (b"[]", b"{}", b"not json", b'{"node": "n", "events": [{"type": "x"}]}'):
        assert error(*post(garbage)) == (400, "not a presence batch"), garbage
    assert error(*post(b"x" * (1024 * 1024 + 1))) == (413, "request body too large")


def test_offline_webhook_answers(cluster):
    secret = (cluster.state / "secret").read_bytes().strip()

    def post(body: bytes, signature: str | None = None) -> tuple[int, bytes]:
        headers = {"x-orbited-signature": sign(secret, body) if signature is None else signature}
        status, _, answer = raw(cluster, "POST", "/orbited/offline", body, headers)
        return status, answer

    batch = json.dumps({"node": "ep-node", "events": [
        {"type": "needs_push", "key": ["ep-off", "*", "*"], "id": "m.lobby.999999",
         "reason": "no_connection", "keys": [], "serial": 1, "time": 0}]}).encode()  # fmt: skip
    assert error(*post(batch, "sha256=" + "0" * 64)) == (403, "bad signature")
    assert post(batch) == (204, b"")
    for garbage in (b"[]", b"{}", b"not json", b'{"node": "n", "events": [{"type": "x"}]}'):
        assert error(*post(garbage)) == (400, "not an offline batch"), garbage
    assert error(*post(b"x" * (1024 * 1024 + 1))) == (413, "request body too large")


def test_route_answers(cluster):
    user = logged_in(cluster, "ep-route")
    _, tab = user.call("POST", "/tabs", {"tab": "tab-route", "page": "page-route"})
    assert user.call("GET", f"/routes/{tab['route']}") == (
        200, {"route": tab["route"], "orbited": tab["orbited"]})  # fmt: skip
    for bad in ("0", "25", "x", "-1"):
        assert user.call("GET", f"/routes/{bad}") == (400, {"error": "a route is 1 to 24"}), bad
    assert Browserless(cluster).call("GET", "/routes/1") == (401, {"error": "log in first"})


def test_typing_answers(cluster):
    user = logged_in(cluster, "ep-typing")
    assert user.call("POST", "/rooms/ep-type/typing", {"typing": True}) == (
        403, {"error": "join ep-type first"})  # fmt: skip
    user.call("POST", "/rooms/ep-type/join", {})
    assert user.call("POST", "/rooms/ep-type/typing", {"typing": True}) == (204, None)
    assert user.call("POST", "/rooms/ep-type/typing", {"typing": False}) == (204, None)
    assert user.call("POST", "/rooms/ep-type/typing", {"typing": 1}) == (
        400, {"error": "typing must be true or false"})  # fmt: skip
    assert Browserless(cluster).call("POST", "/rooms/ep-type/typing", {"typing": True}) == (
        401, {"error": "log in first"})  # fmt: skip


def test_tabs_tokens_and_goodbyes(cluster):
    secret = (cluster.state / "secret").read_bytes().strip()
    user = logged_in(cluster, "ep-tabs")
    status, tab = user.call("POST", "/tabs", {"tab": "tab-0001", "page": "page-0001"})
    assert status == 200 and tab["tab"] == "tab-0001"
    key = ConnectionKey(*tab["key"])
    assert key.user == "ep-tabs" and key.location == "/cherrychat/tab-0001" and key.session
    assert tab["route"] == route_of(key, 24) and tab["orbited"].startswith("http://127.0.0.1:")
    assert tab["hash"] == 2  # the route is the user's: every tab of a user has it
    assert verify_token(secret, tab["token"]) == key
    _, again = user.call("POST", "/tabs", {"tab": "tab-0001", "page": "page-0002"})  # reload
    assert again["key"] == tab["key"]
    _, second = user.call("POST", "/tabs", {"tab": "tab-0002", "page": "page-0003"})
    assert second["key"][:2] == tab["key"][:2] and second["key"] != tab["key"]
    status, token = user.call("GET", "/token?tab=tab-0002")
    assert status == 200 and verify_token(secret, token) == ConnectionKey(*second["key"])
    rule = "a tab id is 8 to 64 of A-Z, a-z, 0-9, '_' and '-'"
    for bad in ("", "short", "x" * 65, "tab/0001", "tab%200001"):
        assert user.call("GET", f"/token?tab={bad}") == (400, {"error": rule}), bad
        assert user.call("POST", "/tabs", {"tab": bad, "page": "page-0001"}) == (
            400, {"error": rule})  # fmt: skip
    assert user.call("GET", "/token") == (400, {"error": rule})
    assert user.call("POST", "/tabs", {"tab": "tab-0001"}) == (
        400, {"error": "a page id is 8 to 64 of A-Z, a-z, 0-9, '_' and '-'"})  # fmt: skip
    assert user.call("POST", "/tabs/tab-0001/close", {"page": "page-0002"}) == (204, None)
    assert user.call("POST", "/tabs/tab-0001/close", {"page": "page-0002"}) == (204, None)
    assert user.call("POST", "/tabs/no-such-tab/close", {"page": "page-0002"}) == (204, None)
    assert user.call("POST", "/tabs/tab-0001/close", {})[0] == 400
    assert user.call("POST", "/tabs/x/close", {"page": "page-0002"}) == (400, {"error": rule})


def test_health_counts_users_and_tabs_online(cluster):
    health = http_json(f"{cluster.url}healthz")
    assert isinstance(health["tabs"], int) and health["tabs"] >= health["online"]


def test_nicknames_are_one_user_whatever_their_case(cluster):
    secret = (cluster.state / "secret").read_bytes().strip()
    alice = logged_in(cluster, "CaseAlice")
    _, tab = alice.call("POST", "/tabs", {"tab": "tab-case", "page": "page-case"})
    assert tab["key"][0] == "casealice"  # the identity is the key's user
    alice.call("POST", "/rooms/case-room/join", {})
    body = json.dumps({"node": "case-node", "events": [
        {"type": "signon", "key": tab["key"], "serial": 1, "time": 0}]}).encode()  # fmt: skip
    status, _, _ = raw(cluster, "POST", "/orbited/presence", body,
                       {"x-orbited-signature": sign(secret, body)})  # fmt: skip
    assert status == 204
    assert Browserless(cluster).call("POST", "/login", {"nick": "casealice"}) == (
        409, {"error": "that nickname is in use by someone online"})  # fmt: skip
    _, view = alice.call("GET", "/rooms/case-room")
    assert view["members"] == [{"nick": "CaseAlice", "online": True}]
    status, posted = alice.call("POST", "/rooms/case-room/messages", {"text": "hi"})
    assert status == 201 and posted["nick"] == "CaseAlice"  # shown as typed
    assert alice.call("POST", "/logout", {})[0] == 200
    other = Browserless(cluster)
    status, me = other.call("POST", "/login", {"nick": "CASEALICE"})
    assert status == 200 and me == {"nick": "CASEALICE", "rooms": ["case-room"], "max_tabs": 3}
