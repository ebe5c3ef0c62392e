"""cherrychat with the nodes' per-user features on, in real Chromium (LocalCluster: HaloD,
two nodes, a spare, the app): messages addressed to users reach every tab once, a tab past
the user's limit says so, a member with no tab is reported for a push that is cancelled
once a tab of theirs reads it, and "is typing" travels as a latest-value event.

The nodes get ``--user-max-connections`` and ``--offline-url`` (the app's
``/orbited/offline``), the app ``--offline-hook`` and the same limit: added here to the
commands LocalCluster runs.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator

import pytest

from orbited.cluster import LocalCluster, http_json
from tests.conftest import wait_for
from tests.integration.test_cherrychat import (
    Browserless,
    chat_cluster_config,
    log_in,
    say,
    texts,
    wait_text,
)
from tests.integration.test_cherrychat_browser import another_tab, join

pytestmark = pytest.mark.slow

MAX_TABS = 3
OFFLINE_AFTER = 2.0


class UserFeaturesCluster(LocalCluster):
    """LocalCluster whose nodes limit tabs per user and post offline notices to the app."""

    def _child(self, name, cmd, env=None):  # noqa: ANN001, ANN202
        if name == "cherrychat":
            cmd = [*cmd, "--offline-hook", "--offline-after", str(OFFLINE_AFTER),
                   "--user-max-connections", str(MAX_TABS)]  # fmt: skip
        elif "--presence-url" in cmd:  # a node
            presence = cmd[cmd.index("--presence-url") + 1]
            cmd = [*cmd, "--user-max-connections", str(MAX_TABS),
                   "--offline-url", presence.rsplit("/", 1)[0] + "/offline"]  # fmt: skip
        return super()._child(name, cmd, env)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with UserFeaturesCluster(chat_cluster_config(tmp_path_factory.mktemp("cluster"))) as running:
        yield running


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


def new_tab(page):
    """Another tab of ``page``'s browser on the chat, once its connection is open."""
    tab = page.context.new_page()
    tab.goto(page.url)
    try:
        tab.wait_for_function("window.chat.connection.state === 'open'", timeout=20000)
    except Exception as e:  # playwright's TimeoutError
        states = tab.evaluate("window.chat && window.chat.states")
        raise AssertionError(f"the tab never opened: {states}") from e
    return tab


def health(cluster: LocalCluster) -> dict:
    return http_json(f"{cluster.url}healthz")


def test_a_message_to_a_user_reaches_each_of_their_tabs_once(cluster, browser):
    first = log_in(browser, cluster, "many-tabs")
    second = another_tab(first)
    other = log_in(browser, cluster, "sender")
    try:
        for page in (first, second, other):
            join(page, "users")
        delivered = health(cluster)["pushes"].get("delivered", 0)
        say(other, "to every tab")
        for page in (first, second):
            wait_text(page, "to every tab")
        # One event per member (a user each): 2 tabs of many-tabs and 1 of sender reached.
        wait_for(lambda: health(cluster)["pushes"].get("delivered", 0) >= delivered + 3,
                 "the pushes to be counted")  # fmt: skip
        say(second, "from the second tab")
        wait_text(first, "from the second tab")
        wait_text(other, "from the second tab")
        for page in (first, second):
            assert texts(page).count("to every tab") == 1
            assert page.evaluate("window.chat.connection.state") == "open"
        keys = [p.evaluate("window.chat.tab.key") for p in (first, second)]
        assert keys[0] != keys[1] and keys[0][0] == keys[1][0]  # one user, a key per tab
        routes = {p.evaluate("window.chat.tab.route") for p in (first, second)}
        assert len(routes) == 1  # hash version 2: a user's tabs share one route
    finally:
        first.context.close()
        other.context.close()


def test_a_tab_past_the_users_limit_says_so(cluster, browser):
    first = log_in(browser, cluster, "tab-hog")
    tabs = [first] + [new_tab(first) for _ in range(MAX_TABS - 1)]
    try:
        extra = first.context.new_page()
        extra.goto(first.url)
        extra.wait_for_function("window.chat.states.some(s => s[0] === 'closed')", timeout=20000)
        states = extra.evaluate("window.chat.states")
        assert str(extra.evaluate("window.chat.connection.detail")).startswith("user_limit"), states
        banner = extra.locator("#conn-banner")
        banner.wait_for(state="visible")
        assert f"Too many tabs open (at most {MAX_TABS} per user)" in banner.text_content()
        assert extra.is_disabled("#text")
        for page in tabs:  # the others keep working
            assert page.evaluate("window.chat.connection.state") == "open"
        # One closes: once its node has seen the connection go, a new tab is let in.
        tabs.pop().close()
        extra.close()
        for _ in range(20):
            later = first.context.new_page()
            later.goto(first.url)
            later.wait_for_function("window.chat.states.some(s => s[0] !== 'connecting')",
                                    timeout=20000)  # fmt: skip
            if later.evaluate("window.chat.connection.state") == "open":
                break
            later.close()  # refused: the close had not reached the node yet
            time.sleep(0.25)
        assert later.evaluate("window.chat.connection.state") == "open"
    finally:
        first.context.close()


def notes(page, text: str) -> str:
    """The offline notices shown under the message ``text``."""
    return page.evaluate(
        """t => { const li = [...document.querySelectorAll('#messages li')]
                   .find(l => l.querySelector('.text')?.textContent === t);
                 return li?.querySelector('.push-note')?.textContent || ''; }""",
        text,
    )


def away_member(cluster: LocalCluster, nick: str, room: str) -> Browserless:
    """``nick`` logged in and in ``room``, with no tab open."""
    away = Browserless(cluster)
    assert away.call("POST", "/login", {"nick": nick})[0] == 200
    assert away.call("POST", f"/rooms/{room}/join", {})[0] == 200
    return away


def wait_note(page, text: str, note: str) -> None:
    wait_for(lambda: note in notes(page, text), f"{note!r} under {text!r}", 20)


def open_as(browser, cluster: LocalCluster, user: Browserless, room: str):
    """A page with ``user``'s session cookie, connected, with ``room`` open."""
    page = browser.new_context(bypass_csp=True).new_page()
    cookie = next(c for h in user.opener.handlers if hasattr(h, "cookiejar")
                  for c in h.cookiejar if c.name == "cherrychat")  # fmt: skip
    page.context.add_cookies([{"name": "cherrychat", "value": cookie.value,
                               "url": cluster.url}])  # fmt: skip
    page.goto(cluster.url)
    page.wait_for_function("window.chat.connection.state === 'open'", timeout=20000)
    page.click(f"#rooms li[data-room='{room}']")
    return page


def test_a_member_with_no_tab_is_reported_for_a_push(cluster, browser):
    away_member(cluster, "away-user", "pushes")
    writer = log_in(browser, cluster, "writer")
    try:
        join(writer, "pushes")
        before = health(cluster)["offline"].get("needs_push", 0)
        say(writer, "are you there?")
        # No tab: the node reports it at once (needs_push, no_connection).
        wait_note(writer, "are you there?", "would push to away-user")
        assert health(cluster)["offline"].get("needs_push", 0) > before
    finally:
        writer.context.close()


def test_the_push_is_cancelled_once_a_tab_of_theirs_reads_it(cluster, browser):
    away = away_member(cluster, "late-reader", "cancels")
    writer = log_in(browser, cluster, "writer-2")
    reader = None
    try:
        join(writer, "cancels")
        say(writer, "read me later")
        wait_note(writer, "read me later", "would push to late-reader")
        # late-reader opens a tab: it gets the held message and acknowledges it → cancel.
        reader = open_as(browser, cluster, away, "cancels")
        wait_text(reader, "read me later")
        wait_note(writer, "read me later", "push to late-reader cancelled (read)")
        assert health(cluster)["offline"].get("cancel", 0) >= 1
    finally:
        writer.context.close()
        if reader is not None:
            reader.context.close()


def test_typing_shows_for_the_others_as_a_latest_value_event(cluster, browser):
    typist = log_in(browser, cluster, "typist")
    watcher = log_in(browser, cluster, "type-watcher")
    try:
        for page in (typist, watcher):
            join(page, "typing")
        typist.type("#text", "hello there", delay=30)
        watcher.wait_for_function(
            "document.getElementById('typing').textContent === 'typist is typing…'", timeout=10000
        )
        tags = watcher.evaluate("window.chat.latest.tags")
        assert "typing:typing:typist" in tags and "members:typing" in tags
        assert typist.text_content("#typing") == ""  # not told about itself
        typist.click("#send-form button")
        watcher.wait_for_function(
            "document.getElementById('typing').textContent === ''", timeout=10000
        )
    finally:
        typist.context.close()
        watcher.context.close()


def test_the_nodes_were_given_the_limit_and_the_hook(cluster):
    args = [c.cmd for n, c in cluster.children.items() if n.startswith("n")]
    assert args and all("--offline-url" in a and "--user-max-connections" in a for a in args)
    status = json.loads(urllib.request.urlopen(f"{cluster.halod_status}/status").read())
    assert status.get("hash_version", 2) == 2


class VersionOneCluster(UserFeaturesCluster):
    """The same, with HaloD's new table on hash version 1 (a cluster from before issue 21)."""

    def _child(self, name, cmd, env=None):  # noqa: ANN001, ANN202
        if name == "halod":
            cmd = [*cmd, "--hash-version", "1"]
        return super()._child(name, cmd, env)


def test_a_rehash_to_version_2_keeps_the_chat_going(tmp_path_factory, browser):
    # Its own cluster (the browser fixture's Chromium is shared): HaloD on version 1, two
    # users chatting, `halod rehash --to 2`; tabs whose key moved reconnect to their new
    # route (locate → GET /routes/<r>), the app's client follows the nodes' version, and
    # every message still arrives once.
    import subprocess
    import sys

    config = chat_cluster_config(tmp_path_factory.mktemp("v1cluster"))
    with VersionOneCluster(config) as v1:
        a = log_in(browser, v1, "rehash-a")
        b = log_in(browser, v1, "rehash-b")
        try:
            for page in (a, b):
                join(page, "rehash")
            say(a, "before the rehash")
            wait_text(b, "before the rehash")
            # `orbited cluster` starts HaloD with an operator key (docs/operations.md,
            # "The CLI with a key"): the operator's command sends it.
            done = subprocess.run([sys.executable, "-m", "halod.cli", "rehash", "--to", "2",
                                   "--url", v1.halod_status,
                                   "--operator-key-file", str(v1.operator_key_file)],
                                  capture_output=True, text=True, timeout=30)  # fmt: skip
            assert done.returncode == 0, done.stderr + done.stdout
            status = json.loads(urllib.request.urlopen(f"{v1.halod_status}/status").read())
            assert status["hash_version"] == 2
            for i in range(3):
                say(a, f"after the rehash {i}")
                say(b, f"from b after the rehash {i}")
            for page in (a, b):
                for i in range(3):
                    wait_text(page, f"after the rehash {i}")
                    wait_text(page, f"from b after the rehash {i}")
                shown = texts(page)
                assert len(shown) == len(set(shown)), shown  # each once
                page.wait_for_function("window.chat.connection.state === 'open'", timeout=20000)
        finally:
            a.context.close()
            b.context.close()


class CloseOldestCluster(UserFeaturesCluster):
    """The same, with the nodes' policy past the limit: close the user's oldest tab."""

    def _child(self, name, cmd, env=None):  # noqa: ANN001, ANN202
        if "--presence-url" in cmd:
            cmd = [*cmd, "--user-limit-policy", "close_oldest"]
        return super()._child(name, cmd, env)


def test_with_close_oldest_the_oldest_tab_says_it_was_displaced(tmp_path_factory, browser):
    config = chat_cluster_config(tmp_path_factory.mktemp("oldest"))
    with CloseOldestCluster(config) as closing:
        first = log_in(browser, closing, "displaced-user")
        try:
            tabs = [first] + [new_tab(first) for _ in range(MAX_TABS - 1)]
            newest = new_tab(first)  # past the limit: let in, the oldest goes
            first.wait_for_function("window.chat.states.some(s => s[0] === 'closed')",
                                    timeout=20000)  # fmt: skip
            detail = str(first.evaluate("window.chat.connection.detail"))
            assert detail.startswith("displaced"), first.evaluate("window.chat.states")
            banner = first.locator("#conn-banner")
            banner.wait_for(state="visible")
            assert (f"This tab was closed because you opened another (at most {MAX_TABS} per "
                    "user)") in banner.text_content()  # fmt: skip
            time.sleep(1)  # fatal: the displaced tab does not reconnect and take a slot back
            for page in [*tabs[1:], newest]:
                assert page.evaluate("window.chat.connection.state") == "open"
            assert first.evaluate("window.chat.connection.state") == "closed"
        finally:
            first.context.close()
