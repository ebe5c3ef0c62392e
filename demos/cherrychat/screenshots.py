"""Make docs/images/cherrychat.png and docs/images/halod-status.png with headless Chromium.

    .venv/bin/python demos/cherrychat/screenshots.py

Starts a throw-away ``orbited cluster`` (free ports, temporary state), logs in two users
whose keys hash to different nodes, has them chat, and photographs alice's page and
then kills the node serving alice and photographs HaloD's view after the failover:
``halod status`` and the live route table (``/table.svg`` on its status port).
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from halod.cli import status_table
from orbited.cluster import ClusterConfig, LocalCluster, http_json

IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"
# `halod status` (the /status JSON as a table) above /table.svg (live table, then plan).
STATUS_PAGE = """<!DOCTYPE html><html><body style="margin:0;padding:12px;background:#fff;
font:13px sans-serif;width:max-content"><div style="font-weight:bold">$ halod status</div>
<pre style="margin:4px 0 12px"></pre><div style="font-weight:bold">/table.svg</div>
<img></body></html>"""
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]


def log_in(browser: object, url: str, nick: str) -> Page:
    page = browser.new_page(viewport={"width": 960, "height": 520})  # type: ignore[attr-defined]
    page.goto(url)
    page.fill("#nick", nick)
    page.click("#login-form button")
    page.wait_for_selector("#connection.state-open")
    return page


def say(page: Page, text: str) -> None:
    page.fill("#text", text)
    page.click("#send-form button")
    page.wait_for_selector(f"#messages li.text:last-child .text:text-is({text!r})")


def main() -> int:
    chromium = shutil.which("chromium")
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as state:
        config = ClusterConfig(state_dir=Path(state), free_ports=True, fresh=True)
        with LocalCluster(config) as cluster, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=ARGS)
            alice, carol = (
                log_in(browser, cluster.url, "alice"),
                log_in(browser, cluster.url, "carol"),
            )
            for page in (alice, carol):
                page.click("#rooms li[data-room='lobby']")
                page.wait_for_selector("#rooms li.current[data-room='lobby']")
            alice.wait_for_selector("#members li.online[data-nick='carol']")
            route = alice.evaluate("window.chat.tab.route")  # each tab has its own key
            say(alice, f"Hi carol! My tab is on route {route}, served by one node.")
            reply = "Mine hashes to another route. Same room, no pub/sub needed."
            say(carol, reply)
            say(alice, "<b>Markup</b> stays text: <script>alert(1)</script>")
            alice.wait_for_selector(f"#messages li.text .text:text-is({reply!r})")
            alice.wait_for_timeout(300)
            alice.screenshot(path=str(IMAGES / "cherrychat.png"))

            # Kill the node serving alice: the spare takes its routes, alice reconnects.
            victim = next(n for n, info in cluster.halod_nodes().items()
                          if route in info["routes"])  # fmt: skip
            cluster.children[victim].proc.send_signal(signal.SIGKILL)
            alice.wait_for_selector("#connection.state-reconnecting")
            alice.wait_for_selector("#connection.state-open", timeout=30000)
            say(alice, "Back, through the spare.")
            status = http_json(f"{cluster.halod_status}/status")
            page = browser.new_page(viewport={"width": 760, "height": 300})
            page.set_content(STATUS_PAGE)
            page.eval_on_selector("pre", "(e, t) => { e.textContent = t; }", status_table(status))
            page.eval_on_selector("img", "(e, u) => { e.src = u; }",
                                  f"{cluster.halod_status}/table.svg")  # fmt: skip
            page.wait_for_function("document.querySelector('img').complete")
            page.locator("body").screenshot(path=str(IMAGES / "halod-status.png"))
            browser.close()
    print(f"wrote {IMAGES / 'cherrychat.png'} and {IMAGES / 'halod-status.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
