"""The tutorial's kill step (docs/tutorial.md, "4. Kill a node") on ``./dev run``'s own
settings, in real Chromium: the node serving a chat user is killed hard, the other user
posts at once, and the page shows that message within 1 s of the kill (issue: "a node
can die and nobody notices").

The cluster is ``orbited cluster``'s (LocalCluster) with its defaults — grace 5 s,
heartbeat 1 s × 3, one spare, keepalive 25 s — only on free ports and a fresh state.
The victim is found the way the tutorial says: the page's route, then ``orbited whereis
--route R --pid`` against this cluster's HaloD.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orbited.cluster import ClusterConfig, LocalCluster
from tests.integration import test_cherrychat
from tests.integration.test_cherrychat import log_in, log_in_off, open_room, owner_of, say

browser = test_cherrychat.browser  # Chromium, module-scoped, on this module's cluster

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    config = ClusterConfig(state_dir=tmp_path_factory.mktemp("devrun"), free_ports=True,
                           fresh=True)  # fmt: skip
    defaults = ClusterConfig()
    assert (config.grace, config.heartbeat_interval, config.spares, config.keepalive) == (
        defaults.grace,
        defaults.heartbeat_interval,
        defaults.spares,
        defaults.keepalive,
    )
    with LocalCluster(config) as running:
        yield running


def whereis_pid(cluster: LocalCluster, route: int) -> int:
    done = subprocess.run(
        [sys.executable, "-m", "orbited.cli", "whereis", "--route", str(route), "--pid",
         "--state-dir", str(cluster.state)],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


@pytest.mark.slow
def test_killing_the_users_node_costs_the_page_under_a_second(cluster, browser):
    a = log_in(browser, cluster, "alice")
    b = log_in_off(browser, cluster, "bob", owner_of(cluster, a))  # bob on the other node
    try:
        open_room(a, "lobby")
        open_room(b, "lobby")
        say(a, "before the kill")
        b.wait_for_function("t => [...document.querySelectorAll('#messages .text')]"
                            ".some(e => e.textContent === t)", arg="before the kill")  # fmt: skip
        route = b.evaluate("window.chat.tab.route")
        victim_pid = whereis_pid(cluster, route)
        victim = owner_of(cluster, b)
        assert cluster.children[victim].proc.pid == victim_pid  # whereis names bob's node
        text = "sent the moment bob's node died"
        os.kill(victim_pid, signal.SIGKILL)
        killed = time.monotonic()
        # alice's message goes straight to the app (her page's cookies), not through typing
        response = a.request.post(f"{cluster.url}rooms/lobby/messages", data={"text": text})
        assert response.status == 201
        b.wait_for_function("t => [...document.querySelectorAll('#messages .text')]"
                            ".some(e => e.textContent === t)", arg=text,
                            timeout=10_000, polling=20)  # fmt: skip
        shown = time.monotonic() - killed
        print(f"kill → bob's page shows the next message: {shown:.3f} s")
        assert owner_of(cluster, b) != victim  # bob reconnected to the route's new owner
        assert shown < 1.0, f"{shown:.2f} s; bob's states {b.evaluate('window.chat.states')}"
    finally:
        a.context.close()
        b.context.close()
