"""cherrychat on the whole system: HaloD, two nodes and a spare, the web app, real Chromium.

The cluster is started by ``orbited.cluster.LocalCluster`` — the code behind
``orbited cluster`` and ``./dev run`` — with short heartbeat and grace times so that a
killed node is failed over in about a second. Also: the app's pure parts (input rules,
the SQLite store), its HTTP answers (tokens, 400s, the signed presence webhook), and the
``orbited cluster`` command itself (Ctrl-C leaves no process behind).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.cookiejar import CookieJar
from pathlib import Path

import pytest

from orbited.cluster import ClusterConfig, LocalCluster
from orbited.core.hashing import route_of, route_of_user
from orbited.core.keys import ConnectionKey
from orbited.core.tokens import verify_token
from orbited.node.presence import sign
from tests.conftest import wait_for

DEMOS = Path(__file__).resolve().parents[2] / "demos"
sys.path.insert(0, str(DEMOS))

from cherrychat import rules  # noqa: E402
from cherrychat.store import TAB_WAIT, NickTaken, Presence, Store, Tab  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# -- the pure parts ---------------------------------------------------------------------


@pytest.mark.parametrize("nick", ["alice", "Zoë", "<b>bob</b>", "a b", "x" * 32, "  trimmed "])
def test_nicknames_allowed(nick):
    assert rules.nickname(nick) == nick.strip()


@pytest.mark.parametrize(
    ("nick", "why"),
    [("", "choose"), ("   ", "choose"), ("x" * 33, "at most 32"), ("a\nb", "control"),
     ("a\u202eb", "invisible"), ("a\u200bb", "invisible"), ("a\u00a0b", "invisible"),
     ("a  b", "runs of spaces"), (7, "string"), (None, "string")],
)  # fmt: skip
def test_nicknames_refused_with_a_reason(nick, why):
    with pytest.raises(rules.InvalidInput, match=why):
        rules.nickname(nick)


def test_room_names_and_messages():
    assert rules.room(" Python ") == "python"
    for bad in ("", "a" * 25, "-x", "a b", "ü", "../x"):
        with pytest.raises(rules.InvalidInput):
            rules.room(bad)
    assert rules.message("  two\nlines\t👨‍👩‍👧 ") == "two\nlines\t👨‍👩‍👧"
    assert rules.message("y" * 1000) == "y" * 1000
    with pytest.raises(rules.InvalidInput, match="at most 1000 characters"):
        rules.message("y" * 1001)
    for bad in ("", "   ", "a\x00b", "a\u202eb", ["x"]):
        with pytest.raises(rules.InvalidInput):
            rules.message(bad)


def test_the_store_holding_session_ids_is_readable_by_its_owner_only(tmp_path):
    # The sessions table holds the login cookies' values: it was created 0644.
    old = os.umask(0o022)
    try:
        store = Store(tmp_path / "chat.sqlite3")
        store.rooms()
    finally:
        os.umask(old)
    for name in ("chat.sqlite3", "chat.sqlite3-wal", "chat.sqlite3-shm"):
        if (tmp_path / name).exists():
            assert (tmp_path / name).stat().st_mode & 0o077 == 0, name


def test_store_rooms_members_messages_survive_a_restart(tmp_path):
    store = Store(tmp_path / "chat.sqlite3")
    assert [r["name"] for r in store.rooms()] == ["lobby", "python", "twisted"]
    assert store.join("python", "alice") and store.join("python", "bob")
    assert not store.join("python", "alice")  # already in
    assert store.join("new-room", "alice")
    first = store.add_message("python", "alice", "hi")
    second = store.add_message("new-room", "alice", "elsewhere")
    third = store.add_message("python", "bob", "hello")
    assert (first["id"], second["id"], third["id"]) == (1, 1, 2)  # 1, 2, 3… per room
    assert store.leave("python", "bob") and not store.leave("python", "bob")
    store.close()

    store = Store(tmp_path / "chat.sqlite3")  # the web app restarted
    assert store.member_idents("python") == ["alice"]
    assert store.rooms_of("alice") == ["new-room", "python"]
    assert [m["text"] for m in store.messages("python")] == ["hi", "hello"]
    assert [m["text"] for m in store.messages("python", after=first["id"])] == ["hello"]
    assert [m["id"] for m in store.recent("python", 1)] == [third["id"]]
    rooms = {r["name"]: r for r in store.rooms("alice")}
    assert rooms["new-room"] == {"name": "new-room", "members": 1, "joined": True}
    assert rooms["lobby"]["joined"] is False


def on(node_serial: int, kind: str, tab: Tab) -> Presence:
    return Presence(kind, tab, node_serial)


def test_store_sessions_and_nickname_ownership(tmp_path):
    store = Store(tmp_path / "chat.sqlite3")
    sid = store.login("alice")
    alice = store.session(sid)
    assert alice.nick == "alice" and alice.tag and store.session("forged") is None
    tab = Tab("alice", alice.tag, "tab-0001")
    store.open_tab(alice, tab.tab, "page-0001")
    assert not store.is_online("alice")  # registered, not yet on a node: login still free
    assert store.apply_presence("n1", [on(1, "signon", tab)]) == {"alice"}
    with pytest.raises(NickTaken):  # alice is online: nobody else may take the name
        store.login("alice")
    store.apply_presence("n1", [on(2, "signoff", tab)])
    sid2 = store.login("alice")  # offline: the name passes to the new session
    assert store.session(sid) is None and store.session(sid2).nick == "alice"
    assert store.session(sid2).tag != alice.tag
    # A late signon for a key of the ended session does not bring alice back.
    assert store.apply_presence("n1", [on(3, "signon", tab)]) == set()
    assert store.logout(sid2) == [] and store.session(sid2) is None


def test_store_a_user_is_online_while_any_tab_is(tmp_path):
    store = Store(tmp_path / "chat.sqlite3")
    store.join("lobby", "bob")
    bob = store.session(store.login("bob"))
    one, two = Tab("bob", bob.tag, "tab-one-1"), Tab("bob", bob.tag, "tab-two-2")
    assert store.open_tab(bob, one.tab, "page-one-1") is False  # not on a node yet
    store.open_tab(bob, two.tab, "page-two-1")
    assert store.tabs_of(["bob"]) == [one, two]  # pushes go to both at once
    assert store.apply_presence("n1", [on(1, "signon", one), on(2, "signon", two)]) == {"bob"}
    assert store.online() == {"bob": 2}
    assert store.members("lobby") == [{"nick": "bob", "online": True}]
    # Tab two says goodbye: bob is still online (tab one), and gets pushes only there.
    assert store.close_tab(bob, two.tab, "page-two-1") is False
    assert store.online() == {"bob": 1} and store.tabs_of(["bob"]) == [one]
    # Tab two reloads: its goodbye came first, then its next page load; the node's
    # mailbox lingered, so there is no new signon, and the tab counts again.
    store.open_tab(bob, two.tab, "page-two-2")
    assert store.online() == {"bob": 2}
    # A goodbye from an earlier load of the tab (reordered) is ignored.
    assert store.close_tab(bob, two.tab, "page-two-1") is False and store.online() == {"bob": 2}
    # Both tabs close: offline at once, the nickname free before the nodes' signoffs.
    store.close_tab(bob, two.tab, "page-two-2")
    assert store.close_tab(bob, one.tab, "page-one-1") is True
    assert not store.is_online("bob") and store.members("lobby")[0]["online"] is False
    assert store.apply_presence("n1", [on(3, "signoff", one), on(4, "signoff", two)]) == set()
    assert store.tabs_of(["bob"]) == []


def test_store_logout_ends_every_tab_at_once(tmp_path):
    store = Store(tmp_path / "chat.sqlite3")
    sid = store.login("carol")
    carol = store.session(sid)
    tabs = [Tab("carol", carol.tag, f"tab-{i}-xxxx") for i in range(2)]
    for i, tab in enumerate(tabs):
        store.open_tab(carol, tab.tab, f"page-{i}-xxxx")
        store.apply_presence("n1", [on(i + 1, "signon", tab)])
    assert store.is_online("carol")
    assert store.logout(sid) == tabs  # to tell them
    assert not store.is_online("carol") and store.tabs_of(["carol"]) == []
    store.login("carol")  # the name is free at once


def test_store_presence_rules(tmp_path):
    store = Store(tmp_path / "chat.sqlite3")
    store.join("lobby", "a")
    store.join("lobby", "b")
    sa, sb = store.session(store.login("a")), store.session(store.login("b"))
    a, b = Tab("a", sa.tag, "tab-aaaa"), Tab("b", sb.tag, "tab-bbbb")
    store.open_tab(sa, a.tab, "page-aaaa")
    store.open_tab(sb, b.tab, "page-bbbb")
    assert store.apply_presence("n1", [on(1, "signon", a), on(2, "signon", b)]) == {"a", "b"}
    assert store.members("lobby") == [{"nick": "a", "online": True},
                                      {"nick": "b", "online": True}]  # fmt: skip
    # n1 died; a's route went to n3, which signs a on before anything else is heard.
    assert store.apply_presence("n3", [on(1, "signon", a)]) == set()
    assert store.apply_presence("n1", [on(3, "signoff", a)]) == set()  # stale: a is on n3
    assert store.nodes() == {"n1", "n3"}
    # n1 restarted: its serials start again, so every tab it had is off it.
    assert store.apply_presence("n1", [on(1, "signon", Tab("c", "nope", "tab-cccc"))]) == {"b"}
    assert store.online() == {"a": 1}  # c has no session: its signon does not count
    assert store.drop_nodes(["n3"]) == {"a"}
    assert store.members("lobby") == [{"nick": "a", "online": False},
                                      {"nick": "b", "online": False}]  # fmt: skip
    assert [t.ident for t in store.tabs_of(["a", "b"])] == ["a", "b"]  # reconnecting: kept
    assert store.apply_presence("n2", [on(1, "signon", a)]) == {"a"}  # back, on the spare
    store.clear_presence()
    assert store.online() == {} and store.tabs_of(["a", "b"]) == []


def test_store_forgets_tabs_that_never_reach_a_node(tmp_path):
    store = Store(tmp_path / "chat.sqlite3")
    d = store.session(store.login("d"))
    store.open_tab(d, "tab-gone-1", "page-gone-1", now=1000.0)
    store.open_tab(d, "tab-live-1", "page-live-1", now=1000.0 + TAB_WAIT + 1)
    assert store.tabs_of(["d"]) == [Tab("d", d.tag, "tab-live-1")]


def test_nicknames_differing_in_case_are_one_user(tmp_path):
    assert rules.identity("Alice") == rules.identity("ALICE") == "alice"
    assert rules.identity("Zoë") == rules.identity("ZOË") and rules.identity("Straße") == "strasse"
    store = Store(tmp_path / "chat.sqlite3")
    alice = store.session(store.login("Alice"))
    assert (alice.nick, alice.ident) == ("Alice", "alice")  # shown as typed
    store.join("lobby", alice.ident)
    store.open_tab(alice, "tab-alice", "page-alice")
    store.apply_presence("n1", [on(1, "signon", Tab(alice.ident, alice.tag, "tab-alice"))])
    assert store.members("lobby") == [{"nick": "Alice", "online": True}]
    with pytest.raises(NickTaken):
        store.login("alice")  # the same user, and she is online
    store.apply_presence("n1", [on(2, "signoff", Tab(alice.ident, alice.tag, "tab-alice"))])
    again = store.session(store.login("ALICE"))
    assert (again.nick, again.ident) == ("ALICE", "alice")
    assert store.rooms_of(again.ident) == ["lobby"]  # her rooms, whatever the case
    assert store.members("lobby") == [{"nick": "ALICE", "online": False}]


def test_store_migrates_a_version_0_database(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE sessions (sid TEXT PRIMARY KEY, nick TEXT NOT NULL UNIQUE, created REAL);
        CREATE TABLE rooms (name TEXT PRIMARY KEY, created REAL NOT NULL);
        CREATE TABLE members (room TEXT NOT NULL REFERENCES rooms(name), nick TEXT NOT NULL,
            joined REAL NOT NULL, PRIMARY KEY (room, nick));
        CREATE TABLE messages (room TEXT NOT NULL, id INTEGER NOT NULL, nick TEXT NOT NULL,
            kind TEXT NOT NULL, text TEXT NOT NULL, time REAL NOT NULL, PRIMARY KEY (room, id));
        CREATE TABLE presence (nick TEXT PRIMARY KEY, node TEXT NOT NULL, since REAL NOT NULL);
        INSERT INTO sessions VALUES ('old-sid', 'alice', 0);
        INSERT INTO rooms VALUES ('lobby', 0);
        INSERT INTO members VALUES ('lobby', 'alice', 0);
        INSERT INTO members VALUES ('lobby', 'Alice', 1);
        INSERT INTO messages VALUES ('lobby', 1, 'alice', 'text', 'kept', 0);
        INSERT INTO presence VALUES ('alice', 'n1', 0);
    """)  # fmt: skip
    old.commit()
    old.close()
    store = Store(path)
    assert store.session("old-sid") is None  # logins start afresh
    assert store.member_idents("lobby") == ["alice"]
    assert store.members("lobby") == [{"nick": "alice", "online": False}]
    assert [m["text"] for m in store.messages("lobby")] == ["kept"]
    store.login("alice")  # nobody is online any more


# -- the cluster ------------------------------------------------------------------------


def chat_cluster_config(state_dir: Path) -> ClusterConfig:
    """Free ports, a fresh state, heartbeats short enough to fail a node over in ~1 s."""
    return ClusterConfig(
        state_dir=state_dir, free_ports=True, fresh=True,
        heartbeat_interval=0.25, missed_heartbeats=3, grace=1.0, keepalive=5.0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(chat_cluster_config(tmp_path_factory.mktemp("cluster"))) as running:
        yield running


class Browserless:
    """A logged-in user of the app's HTTP API, without a page (cookie jar + JSON)."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.base = cluster.url
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))

    def call(self, method: str, path: str, body: object = None,
             content_type: str = "application/json") -> tuple[int, object]:  # fmt: skip
        data = (
            None
            if body is None
            else (body if isinstance(body, bytes) else json.dumps(body).encode())
        )
        request = urllib.request.Request(self.base + path.lstrip("/"), data=data, method=method,
                                         headers={"content-type": content_type})  # fmt: skip
        try:
            with self.opener.open(request, timeout=10) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        if not raw:
            return status, None
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()


@pytest.mark.slow
def test_api_issues_tokens_and_refuses_bad_input_with_400(cluster):
    user = Browserless(cluster)
    assert user.call("GET", "/me")[0] == 401
    assert user.call("GET", "/static/chat.js")[0] == 200
    assert user.call("GET", "/static/index.html")[0] == 404  # only the page's own files
    assert user.call("GET", "/token")[0] == 401
    assert user.call("POST", "/login", {"nick": "x" * 33}) == (
        400, {"error": "a nickname has at most 32 characters"})  # fmt: skip
    assert user.call("POST", "/login", {"nick": "api"}, content_type="text/plain")[0] == 415
    status, me = user.call("POST", "/login", {"nick": "api"})
    assert status == 200 and me == {
        "nick": "api",
        "rooms": [],
        "max_tabs": 3,
    }  # ./dev run: 3 tabs per user
    status, tab = user.call("POST", "/tabs", {"tab": "tab-0001", "page": "page-0001"})
    assert status == 200 and tab["key"][0] == "api" and tab["key"][2] == "/cherrychat/tab-0001"
    assert tab["orbited"] == f"http://127.0.0.1:{cluster_browser_base(cluster) + tab['route'] - 1}"
    assert tab["route"] == route_of(ConnectionKey(*tab["key"]), 24)
    secret = (cluster.state / "secret").read_bytes().strip()
    assert verify_token(secret, tab["token"]) == ConnectionKey(*tab["key"])
    status, token = user.call("GET", "/token?tab=tab-0001")
    assert status == 200 and verify_token(secret, token) == ConnectionKey(*tab["key"])
    assert user.call("GET", "/token?tab=x")[0] == 400
    assert user.call("POST", "/rooms/python/messages", {"text": "hi"}) == (
        403, {"error": "join python first"})  # fmt: skip
    assert user.call("POST", "/rooms/Bad%20Room!/join", {})[0] == 400
    assert user.call("POST", "/rooms/python/join", {})[0] == 200
    assert user.call("POST", "/rooms/python/messages", {"text": "z" * 1001}) == (
        400, {"error": "a message has at most 1000 characters (1001 given)"})  # fmt: skip
    assert user.call("POST", "/rooms/python/messages", b"{not json")[0] == 400
    assert user.call("POST", "/rooms/python/messages", b"x" * 20000)[0] == 413
    status, message = user.call("POST", "/rooms/python/messages", {"text": "ok", "nick": "bob"})
    assert status == 201 and message["nick"] == "api"  # the claimed name is ignored
    assert user.call("GET", "/rooms/python/messages?after=x")[0] == 400
    status, found = user.call("GET", f"/rooms/python/messages?after={message['id'] - 1}")
    assert [m["text"] for m in found["messages"]] == ["ok"]
    other = Browserless(cluster)
    other.call("POST", "/login", {"nick": "api-other"})
    assert other.call("GET", "/rooms/python/messages?after=0")[0] == 403  # members only
    assert user.call("POST", "/rooms/python/leave", {})[0] == 200


@pytest.mark.slow
def test_presence_webhook_needs_the_signature(cluster):
    hook = Browserless(cluster)
    body = json.dumps(
        {
            "node": "nx",
            "events": [
                {
                    "type": "signon",
                    "key": ["hooked", "t", "/cherrychat/tab-0001"],
                    "serial": 1,
                    "time": 0,
                }
            ],
        }
    ).encode()
    secret = (cluster.state / "secret").read_bytes().strip()

    def post(signature: str) -> int:
        request = urllib.request.Request(cluster.url + "orbited/presence", data=body,
                                         headers={"x-orbited-signature": signature})  # fmt: skip
        try:
            with hook.opener.open(request, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert post("sha256=" + "0" * 64) == 403
    assert post(sign(secret, body)) == 204


def cluster_browser_base(cluster: LocalCluster) -> int:
    args = cluster.children["cherrychat"].cmd
    return int(args[args.index("--browser-port-base") + 1])


# -- in the browser ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(cluster) -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    from tests.integration.test_browser import (  # skips without Debian chromium
        CHROMIUM,
        CHROMIUM_ARGS,
    )

    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def owner_of(cluster: LocalCluster, page) -> str:
    """The node serving the route of ``page``'s connection key (one key per tab)."""
    route = page.evaluate("window.chat.tab.route")
    owners = json.loads(urllib.request.urlopen(f"{cluster.halod_status}/routes").read())["owners"]
    return owners[str(route)]["name"]


def log_in(browser, cluster: LocalCluster, nick: str, page=None):
    # bypass_csp: Playwright's string predicates are eval'd, which the page's CSP forbids;
    # it also makes the markup test show that escaping alone keeps scripts out.
    if page is None:
        page = browser.new_context(bypass_csp=True).new_page()
        page.goto(cluster.url)
    page.fill("#nick", nick)
    page.click("#login-form button")
    page.wait_for_function("window.chat.connection.state === 'open'", timeout=20000)
    return page


def nick_off(cluster: LocalCluster, nick: str, node: str) -> str:
    """``nick``, or the first of ``nick``-2, ``nick``-3, … whose keys' route is not on
    ``node``: with hash version 2 a user's route is the hash of the user (the nickname's
    identity) alone, whatever its session."""
    owners = json.loads(urllib.request.urlopen(f"{cluster.halod_status}/routes").read())["owners"]
    for i in range(1, 100):
        candidate = nick if i == 1 else f"{nick}-{i}"
        if owners[str(route_of_user(rules.identity(candidate), 24))]["name"] != node:
            return candidate
    raise AssertionError(f"every spelling of {nick} hashed to {node}")


def log_in_off(browser, cluster: LocalCluster, nick: str, node: str):
    """A user named like ``nick`` (``nick_off``) logged in, its keys' route not on ``node``."""
    page = log_in(browser, cluster, nick_off(cluster, nick, node))
    assert owner_of(cluster, page) != node
    return page


def open_room(page, room: str) -> None:
    page.click(f"#rooms li[data-room='{room}']")
    page.wait_for_selector(f"#rooms li.current[data-room='{room}']")


def say(page, text: str) -> None:
    page.fill("#text", text)
    page.click("#send-form button")
    page.wait_for_function("t => [...document.querySelectorAll('#messages .text')]"
                           ".some(e => e.textContent === t)", arg=text)  # fmt: skip


def texts(page) -> list[str]:
    return page.eval_on_selector_all("#messages li.text .text", "es => es.map(e => e.textContent)")


def wait_text(page, text: str, timeout: float = 20) -> None:
    try:
        page.wait_for_function("t => [...document.querySelectorAll('#messages .text')]"
                               ".some(e => e.textContent === t)", arg=text,
                               timeout=timeout * 1000)  # fmt: skip
    except Exception as e:  # playwright's TimeoutError; playwright may not be installed
        if type(e).__name__ != "TimeoutError":
            raise
        raise AssertionError(
            f"{text!r} not shown; page has {texts(page)}, connection states "
            f"{page.evaluate('window.chat.states')}"
        ) from None


def members(page) -> dict[str, str]:
    return page.eval_on_selector_all(
        "#members li", "es => Object.fromEntries(es.map(e => [e.dataset.nick, e.className]))"
    )


def wait_members(page, expected: dict[str, str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while members(page) != expected:
        assert time.monotonic() < deadline, f"members {members(page)} != {expected}"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_users_chat_leave_and_survive_a_node_kill(cluster, browser):
    actives = [n for n, info in cluster.halod_nodes().items() if info["state"] == "active"]
    assert len(actives) == 2
    alice = "alice"
    a = log_in(browser, cluster, alice)
    bob = nick_off(cluster, "bob", owner_of(cluster, a))  # on the other node
    b = log_in(browser, cluster, bob)
    try:
        open_room(a, "lobby")
        open_room(b, "lobby")
        wait_members(a, {alice: "online", bob: "online"})
        wait_members(b, {alice: "online", bob: "online"})

        say(a, "hello bob")
        wait_text(b, "hello bob")
        say(b, "hi alice")
        wait_text(a, "hi alice")

        b.click("#leave")
        wait_members(a, {alice: "online"})
        a.wait_for_selector(f"#messages li.leave .nick >> text={bob}")
        open_room(b, "lobby")
        wait_members(a, {alice: "online", bob: "online"})

        # The node serving bob dies; bob's route goes to the spare after HaloD's grace.
        victim = owner_of(cluster, b)
        cluster.children[victim].proc.send_signal(signal.SIGKILL)
        b.wait_for_function("window.chat.connection.state !== 'open'", timeout=10000)
        during = [f"while down {i}" for i in range(3)]
        for text in during:
            say(a, text)
        say(b, "bob typing while reconnecting")  # posts go to the web app, not the node
        wait_text(a, "bob typing while reconnecting")

        b.wait_for_function("window.chat.connection.state === 'open'", timeout=30000)
        assert owner_of(cluster, b) != victim
        for text in during:
            wait_text(b, text)
        say(a, "after failover")
        wait_text(b, "after failover")
        say(b, "still here")
        wait_text(a, "still here")

        expected = ["hello bob", "hi alice", *during, "bob typing while reconnecting",
                    "after failover", "still here"]  # fmt: skip
        assert texts(a) == expected and texts(b) == expected  # all, once, in order
        states = [s[0] for s in b.evaluate("window.chat.states")]
        assert "reconnecting" in states and states[-1] == "open"
        wait_members(a, {alice: "online", bob: "online"})  # signed on at the spare
        assert b.text_content("#conn-transport").startswith("via ")
    finally:
        a.context.close()
        b.context.close()


@pytest.mark.slow
def test_markup_in_nickname_and_message_is_shown_as_text(cluster, browser):
    nasty = '<img src=x onerror="pwned=1">'
    text = "<script>pwned=2</script><b>bold</b> & <i onmouseover=pwned=3>x</i>"
    evil, watcher = log_in(browser, cluster, nasty), log_in(browser, cluster, "watcher")
    try:
        open_room(evil, "twisted")
        open_room(watcher, "twisted")
        say(evil, text)
        wait_text(watcher, text)
        for page in (evil, watcher):
            wait_members(page, {nasty: "online", "watcher": "online"})
            assert page.evaluate("typeof window.pwned") == "undefined"
            assert page.eval_on_selector_all("#messages img, #messages script, #messages b,"
                                             " #members img", "es => es.length") == 0  # fmt: skip
            nicks = page.eval_on_selector_all("#messages .nick", "es => es.map(e => e.textContent)")
            assert nasty in nicks
        assert evil.text_content("#me") == nasty
    finally:
        evil.context.close()
        watcher.context.close()


# -- the command ------------------------------------------------------------------------


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and ") Z " not in Path(
        f"/proc/{pid}/stat").read_text()  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("kill_a_node_first", [False, True])
def test_orbited_cluster_command_stops_every_child_on_ctrl_c(tmp_path, kill_a_node_first):
    proc = subprocess.Popen(
        [sys.executable, "-m", "orbited.cli", "cluster", "--state-dir", str(tmp_path),
         "--free-ports", "--heartbeat-interval", "0.25", "--grace", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        url = None
        output = []
        deadline = time.monotonic() + 60
        while url is None:
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, "".join(output)
            output.append(line)
            if "cherrychat is ready: open " in line:
                url = line.split("open ", 1)[1].strip()
        with urllib.request.urlopen(url, timeout=5) as page:
            assert b"cherrychat" in page.read()
        pids = json.loads((tmp_path / "cluster.json").read_text())["pids"]
        assert set(pids) == {"halod", "cherrychat", "n1", "n2", "n3"}
        if kill_a_node_first:
            os.kill(pids["n1"], signal.SIGKILL)
            wait_for(lambda: "n1 exited (-9)" in proc.stdout.readline(), "the status line")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        rest = proc.stdout.read()
        assert "orbited cluster: stopped" in rest
        assert [name for name, pid in pids.items() if alive(pid)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
