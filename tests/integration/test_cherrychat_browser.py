"""cherrychat as a user sees it, in real Chromium, on the real demo (LocalCluster).

Tabs, logging out, closing and reloading: what each does to the connection, to the member
lists other users see and to who may take a nickname. Other pages:
tests/integration/test_cherrychat.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from orbited.cluster import LocalCluster, http_json
from tests.conftest import wait_for
from tests.integration.test_cherrychat import (
    Browserless,
    chat_cluster_config,
    log_in,
    members,
    say,
    wait_members,
    wait_text,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(chat_cluster_config(tmp_path_factory.mktemp("cluster"))) as running:
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


def another_tab(page):
    """A second tab of the same browser (same cookie), opened on the chat."""
    tab = page.context.new_page()
    tab.goto(page.url)
    tab.wait_for_function("window.chat.connection.state === 'open'", timeout=20000)
    return tab


def join(page, room: str) -> None:
    page.fill("#new-room", room)
    page.click("#new-room-form button")
    page.wait_for_selector(f"#rooms li.current[data-room='{room}']")


def login_status(cluster: LocalCluster, nick: str) -> int:
    """What logging in as ``nick`` from another browser answers now (200, or 409: taken)."""
    return Browserless(cluster).call("POST", "/login", {"nick": nick})[0]


def open_tabs(cluster: LocalCluster) -> int:
    return http_json(f"{cluster.url}healthz")["tabs"]


# -- item: a second tab must not kill the first --------------------------------------------


def test_two_tabs_of_one_user_both_receive_and_count_as_online(cluster, browser):
    first = log_in(browser, cluster, "twotabs")
    second = another_tab(first)
    other = log_in(browser, cluster, "tab-watcher")
    try:
        for page in (first, second, other):
            join(page, "tabs")
        say(other, "to both tabs")
        wait_text(first, "to both tabs")
        wait_text(second, "to both tabs")
        say(second, "from tab two")
        wait_text(first, "from tab two")
        wait_text(other, "from tab two")
        for page in (first, second):
            assert page.evaluate("window.chat.connection.state") == "open"
        keys = [p.evaluate("window.chat.tab.key") for p in (first, second)]
        assert keys[0] != keys[1] and keys[0][0] == keys[1][0]  # one user, a key per tab
        wait_members(other, {"twotabs": "online", "tab-watcher": "online"})

        before = open_tabs(cluster)
        second.close()  # one tab gone, the other still open: still online
        wait_for(lambda: open_tabs(cluster) == before - 1, "the closed tab to be counted")
        assert members(other) == {"twotabs": "online", "tab-watcher": "online"}
        assert login_status(cluster, "twotabs") == 409
        say(other, "after tab two closed")
        wait_text(first, "after tab two closed")
    finally:
        first.context.close()
        other.context.close()


def test_a_connection_closed_for_good_says_so_and_disables_send(cluster, browser):
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()

    def bad_token(route):  # as if the app and the nodes disagreed on the token secret
        response = route.fetch()
        if "json" in response.headers.get("content-type", ""):
            route.fulfill(response=response, json={**response.json(), "token": "not-a-token"})
        else:
            route.fulfill(response=response, body="not-a-token")

    page.route("**/token*", bad_token)
    page.route("**/tabs", bad_token)
    try:
        page.goto(cluster.url)
        page.fill("#nick", "doomed")
        page.click("#login-form button")
        page.click("#rooms li[data-room='lobby']")
        page.wait_for_function("window.chat.connection.state === 'closed'", timeout=20000)
        banner = page.locator("#conn-banner")
        banner.wait_for(state="visible")
        assert "disconnected" in banner.text_content().lower()
        reason = page.evaluate("window.chat.connection.detail")
        assert reason and reason in banner.text_content()  # the reason, not only in a tooltip
        assert page.is_disabled("#text") and page.is_disabled("#send-form button")
        assert page.text_content("#conn-state") == "disconnected"
    finally:
        context.close()


# -- item: logging out or closing the tab frees the nickname -------------------------------


def wait_taken(cluster: LocalCluster, nick: str) -> None:
    """The node's signon reached the app: ``nick`` is in use."""
    wait_for(lambda: login_status(cluster, nick) == 409, f"{nick} to be online")


def test_logging_out_frees_the_nickname_at_once_and_ends_the_other_tabs(cluster, browser):
    page = log_in(browser, cluster, "leaver")
    other_tab = another_tab(page)
    watcher = log_in(browser, cluster, "leave-watcher")
    try:
        for p in (page, watcher):
            join(p, "leaving")
        wait_members(watcher, {"leaver": "online", "leave-watcher": "online"})
        wait_taken(cluster, "leaver")
        page.click("#logout")
        page.wait_for_selector("#login-view:not([hidden])")
        assert login_status(cluster, "leaver") == 200  # at once, not after the linger (30 s)
        wait_members(watcher, {"leave-watcher": "online", "leaver": "offline"}, timeout=5)
        # The session's other tab is told and shows the login, its connection closed.
        other_tab.wait_for_selector("#login-view:not([hidden])")
        assert "logged out" in other_tab.text_content("#login-error")
        assert other_tab.evaluate("window.chat.connection.state") == "closed"
    finally:
        page.context.close()
        watcher.context.close()


def test_closing_the_tab_frees_the_nickname(cluster, browser):
    page = log_in(browser, cluster, "closer")
    watcher = log_in(browser, cluster, "close-watcher")
    try:
        for p in (page, watcher):
            join(p, "closing")
        wait_members(watcher, {"closer": "online", "close-watcher": "online"})
        wait_taken(cluster, "closer")
        page.close()
        page.context.close()
        # The page says goodbye as it goes (pagehide): well before the linger (30 s) the
        # nickname is free and the member list says so.
        wait_for(lambda: login_status(cluster, "closer") == 200, "closer to be free", 10)
        wait_members(watcher, {"close-watcher": "online", "closer": "offline"}, timeout=10)
    finally:
        watcher.context.close()


def test_a_duplicated_tab_takes_a_key_of_its_own(cluster, browser):
    first = log_in(browser, cluster, "duplicator")
    other = log_in(browser, cluster, "dup-watcher")
    try:
        # "Duplicate tab" copies sessionStorage, and with it the tab id (so the key).
        tab_id = first.evaluate("sessionStorage.getItem('cherrychat.tab')")
        second = first.context.new_page()
        second.add_init_script(f"sessionStorage.setItem('cherrychat.tab', {tab_id!r})")
        second.goto(cluster.url)
        second.wait_for_function("window.chat.connection.state === 'open'", timeout=20000)
        assert second.evaluate("window.chat.tab.tab") == tab_id
        # The first tab was replaced by the node, took a new tab id and connected again.
        first.wait_for_function("window.chat.tab.tab !== " + repr(tab_id), timeout=20000)
        first.wait_for_function("window.chat.connection.state === 'open'", timeout=20000)
        for page in (first, second, other):
            join(page, "dups")
        say(other, "to the original and the duplicate")
        wait_text(first, "to the original and the duplicate")
        wait_text(second, "to the original and the duplicate")
    finally:
        first.context.close()
        other.context.close()


def test_a_reload_keeps_the_user_online_without_a_flap(cluster, browser):
    page = log_in(browser, cluster, "reloader")
    watcher = log_in(browser, cluster, "reload-watcher")
    try:
        for p in (page, watcher):
            join(p, "reloads")
        wait_members(watcher, {"reloader": "online", "reload-watcher": "online"})
        page.reload()
        page.wait_for_function("window.chat.connection.state === 'open'", timeout=20000)
        seen = set()
        deadline = time.monotonic() + 4  # beyond the app's grace before announcing a close
        while time.monotonic() < deadline:
            seen.add(members(watcher).get("reloader"))
            time.sleep(0.05)
        assert seen == {"online"}
        assert login_status(cluster, "reloader") == 409  # the reloaded tab holds the name
    finally:
        page.context.close()
        watcher.context.close()


# -- item: reload, read state, the Send box, room names ------------------------------------


def badges(page) -> dict[str, str]:
    """Each room's side number: an unread badge ("3") or nothing."""
    return page.eval_on_selector_all(
        "#rooms li", "es => Object.fromEntries(es.map(e => [e.dataset.room,"
        " e.querySelector('.badge') ? e.querySelector('.badge').textContent : '']))",
    )  # fmt: skip


def current_room(page) -> str | None:
    return page.evaluate("window.chat.current")


def test_a_reload_reopens_the_room_you_were_in_and_keeps_what_you_read(cluster, browser):
    reader = log_in(browser, cluster, "reader")
    writer = log_in(browser, cluster, "writer")
    try:
        for room in ("aa-read", "zz-read"):
            join(writer, room)
            join(reader, room)
        say(writer, "in zz while reader is there")
        wait_text(reader, "in zz while reader is there")
        join(writer, "aa-read")
        say(writer, "unread in aa")
        reader.wait_for_function("window.chat.rooms.get('aa-read').unread === 1")
        assert badges(reader)["aa-read"] == "1"
        reader.click("#rooms li[data-room='aa-read']")  # read it
        reader.wait_for_selector("#rooms li.current[data-room='aa-read']")
        wait_text(reader, "unread in aa")
        reader.click("#rooms li[data-room='zz-read']")  # and back
        reader.wait_for_selector("#rooms li.current[data-room='zz-read']")

        reader.reload()
        reader.wait_for_function("window.chat.connection.state === 'open'", timeout=20000)
        reader.wait_for_selector("#rooms li.current")
        wait_text(reader, "in zz while reader is there")
        assert current_room(reader) == "zz-read"  # not the first joined room (aa-read)
        assert badges(reader) == {**badges(reader), "aa-read": "", "zz-read": ""}  # all read

        join(writer, "aa-read")
        say(writer, "new after the reload")
        reader.wait_for_function("window.chat.rooms.get('aa-read').unread === 1")
        assert badges(reader)["aa-read"] == "1"  # only what came since
    finally:
        reader.context.close()
        writer.context.close()


def test_the_send_box_shows_only_in_a_room(cluster, browser):
    page = log_in(browser, cluster, "roomless")
    try:
        assert current_room(page) is None
        assert not page.is_visible("#send-form") and not page.is_visible("#leave")
        join(page, "send-box")
        assert page.is_visible("#send-form")
        page.click("#leave")
        page.wait_for_function("window.chat.current === null")
        assert not page.is_visible("#send-form")
    finally:
        page.context.close()


def test_room_names_with_capitals_and_bad_names(cluster, browser):
    page = log_in(browser, cluster, "namer")
    try:
        page.fill("#new-room", "Mixed-Case")
        page.click("#new-room-form button")  # room names are lower case: it opens mixed-case
        page.wait_for_selector("#rooms li.current[data-room='mixed-case']")
        assert page.text_content("#room-title") == "# mixed-case"
        for bad in ("no spaces", "-dash-first", "ü-room"):
            page.fill("#new-room", bad)
            page.click("#new-room-form button")
            page.wait_for_function("document.querySelector('#chat-error').textContent !== ''")
            assert page.text_content("#chat-error") == rules_room_message()
            assert page.input_value("#new-room") == bad  # kept, to correct it
            assert current_room(page) == "mixed-case"  # no phantom room, nothing else changed
            assert bad not in badges(page) and bad.lower() not in badges(page)
            page.evaluate("document.querySelector('#chat-error').textContent = ''")
    finally:
        page.context.close()


def rules_room_message() -> str:
    from tests.integration.test_cherrychat import rules

    try:
        rules.room("-x")
    except rules.InvalidInput as e:
        return str(e)
    raise AssertionError("-x is a valid room name")
