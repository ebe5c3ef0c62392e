"""Knowing at once whether a node is dead (docs/halod.md, "Detecting a dead node"), with
real processes: a SIGKILLed node's routes move as soon as its ports refuse, long before
`grace`; a SIGSTOPped node still answers TCP connects from its kernel, so it keeps its
routes through a blip and fails over only after missed heartbeats + grace; a node whose
control link drops while its ports answer keeps its routes when it reconnects in time.

Times are printed (pytest -s), not asserted: bench/ measures them."""

from __future__ import annotations

import json
import signal
import socket
import time

import pynng
import pytest

from orbited.core.routes import canonical
from tests.conftest import HaloDProcess, NodeProcess, keys_on_routes, send_event, wait_for

pytestmark = pytest.mark.slow

HEARTBEAT, MISSED = 0.2, 3
LONG_GRACE = 30.0  # far longer than any wait below: what moves sooner was moved by a probe


@pytest.fixture
def procs():
    started: list[HaloDProcess | NodeProcess] = []
    yield started
    for proc in reversed(started):
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.send_signal(signal.SIGCONT)
            proc.stop(signal.SIGKILL)


def start(tmp_path, procs, names, *flags, grace=LONG_GRACE):
    halod = HaloDProcess(tmp_path, "--heartbeat-interval", str(HEARTBEAT),
                         "--missed-heartbeats", str(MISSED), "--grace", str(grace),
                         *flags).start()  # fmt: skip
    procs.append(halod)
    nodes = {}
    for name in names:
        nodes[name] = halod.node(tmp_path, name, "--linger", "5")
        procs.append(nodes[name])
    return halod, nodes


def routes_of(halod, name):
    node = halod.nodes().get(name)
    return None if node is None else node["routes"]


@pytest.mark.parametrize("spares", [1, 0])
def test_a_killed_node_fails_over_when_its_ports_refuse_not_after_grace(tmp_path, procs,
                                                                        spares):  # fmt: skip
    names = ["n1", "s", "n3"] if spares else ["n1", "n2", "n3"]
    halod, nodes = start(tmp_path, procs, names, "--spares", str(spares))
    before = halod.owners()
    victim = "n3" if spares else "n1"
    lost = sorted(r for r, owner in before.items() if owner == victim)

    start_time, killed_at = time.monotonic(), time.time()
    nodes[victim].stop(signal.SIGKILL)
    wait_for(lambda: victim not in halod.nodes(), f"{victim} to be failed over")
    assert time.monotonic() - start_time < LONG_GRACE
    (failed,) = halod.get("status")["failed"]
    print(f"\nSIGKILL → HaloD moved the routes {(failed['at'] - killed_at) * 1000:.0f} ms "
          f"later (grace {LONG_GRACE:g} s), spares={spares}")  # fmt: skip
    assert failed["name"] == victim
    assert failed["why"] == "disconnected, probe: browser refused, sp refused"
    after = halod.owners()
    if spares:  # the spare took exactly the dead node's routes; nothing else moved
        assert {r for r in after if after[r] != before[r]} == set(lost)
        assert {after[r] for r in lost} == {"s"}
    else:  # the seed replacement: the table of two nodes
        two = canonical(24, 2)
        assert {r: after[r] for r in after} == {
            r: {1: "n3", 2: "n2"}[i] for i, held in two.items() for r in held
        }
    # The new owner serves a key of a moved route (once its assign has arrived).
    owner = nodes[after[lost[0]]]
    key = keys_on_routes(lost)[0]

    def served() -> bool:
        with owner.req() as req:
            reply = send_event(req, f"e{time.monotonic()}", [list(key)], 1)
        return reply["results"][0]["status"] == "no_connection"

    wait_for(served, "the new owner to serve the route")


def test_a_stopped_node_answers_from_its_kernel_so_grace_applies(tmp_path, procs):
    grace = 2.0
    halod, nodes = start(tmp_path, procs, ["n1", "s", "n3"], "--spares", "1", grace=grace)
    before = halod.owners()
    n3 = nodes["n3"]

    # Stopped, then continued within grace: a blip. Its connections stay open (nothing
    # closes them), its heartbeats stop, and the probe is answered by n3's kernel.
    n3.proc.send_signal(signal.SIGSTOP)
    wait_for(lambda: halod.nodes()["n3"]["suspected"] == {"cause": "silent", "probe": "alive"},
             "the probe to find n3's ports answering")  # fmt: skip
    assert halod.owners() == before
    n3.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: halod.nodes()["n3"]["suspected"] is None, "n3 to heartbeat again")
    assert halod.owners() == before and halod.get("status")["failed"] == []

    # Stopped for good: failed after missed heartbeats + grace, though it still answers.
    stopped = time.monotonic()
    n3.proc.send_signal(signal.SIGSTOP)
    took = wait_for(lambda: "n3" not in halod.nodes(), "n3 to fail", timeout=20)
    print(f"\nSIGSTOP → failed over in {took:.2f} s "
          f"(missed heartbeats {MISSED * HEARTBEAT:g} s + grace {grace:g} s)")  # fmt: skip
    (failed,) = halod.get("status")["failed"]
    assert failed["why"].startswith("no heartbeat for ")
    assert failed["why"].endswith("s (its ports still answered)")
    assert time.monotonic() - stopped >= MISSED * HEARTBEAT + grace - 0.3
    after = halod.owners()
    assert {after[r] for r, owner in before.items() if owner == "n3"} == {"s"}
    # the failover incident carries the probe's finding (docs/halod.md, "The timeline"):
    # its ports still answered
    timeline = halod.get("dashboard/state")["timeline"]
    (incident,) = [i for i in timeline if i["kind"] == "failover" and i["node"] == "n3"]
    assert incident["probe"] is not None and "refused" not in incident["probe"], incident


def test_a_control_link_blip_keeps_the_routes_of_a_node_that_answers(tmp_path, procs):
    """A node (the real nng, as a Pair0 peer) whose listeners answer: its control
    connection drops and comes back within grace; nothing moves meanwhile."""
    halod, _ = start(tmp_path, procs, ["n1"], "--spares", "0", grace=3.0)
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    browser, sp = (f"127.0.0.1:{s.getsockname()[1]}" for s in listeners)
    register = {"type": "register", "version": 1, "name": "b", "browser": browser,
                "sp": f"tcp://{sp}", "capacity": 1, "hashes": [1, 2]}  # fmt: skip
    try:
        with pynng.Pair0(dial=halod.control, recv_timeout=5000) as pair:
            pair.send(json.dumps(register).encode())
            welcome = json.loads(pair.recv())
        assert welcome["type"] == "welcome" and welcome["routes"] == canonical(24, 2)[2]
        owners = halod.owners()
        wait_for(lambda: halod.nodes()["b"]["suspected"] == {"cause": "disconnected",
                                                             "probe": "alive"},
                 "the probe to find b's ports answering")  # fmt: skip
        assert halod.owners() == owners
        with pynng.Pair0(dial=halod.control, recv_timeout=5000) as pair:
            pair.send(json.dumps({**register, "node_id": welcome["node_id"]}).encode())
            again = json.loads(pair.recv())
            assert again["routes"] == welcome["routes"]
            assert halod.nodes()["b"]["suspected"] is None
        # Gone again, and now its ports refuse: failed over at once.
        for s in listeners:
            s.close()
        wait_for(lambda: "b" not in halod.nodes(), "b to be failed over")
        assert set(halod.owners().values()) == {"n1"}
        (failed,) = halod.get("status")["failed"]
        assert failed["why"] == "disconnected, probe: browser refused, sp refused"
    finally:
        for s in listeners:
            s.close()
