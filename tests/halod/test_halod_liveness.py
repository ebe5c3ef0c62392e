"""Telling a dead node from a control-link blip (halod/liveness.py, docs/halod.md,
"Detecting a dead node"): the decision table with plain values, the membership rules with
explicit times, the HaloD shell with task.Clock and a probe we answer by hand, and the
probe itself against real sockets."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, error, task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from halod.config import HaloDConfig
from halod.liveness import (
    FAIL_NOW,
    FIRST_GAP,
    Cause,
    Outcome,
    Prober,
    ProbeRequest,
    ProbeSettings,
    Verdict,
    verdict,
)
from halod.membership import Membership, Suspicion, Timing
from halod.probe import outcome_of, probe
from halod.server import ControlProtocol, HaloD
from orbited.core.control import (
    CONTROL_PROTOCOL,
    FROM_NODE,
    MAX_MESSAGE,
    Assign,
    ErrorCode,
    HaloDMessage,
    Heartbeat,
    Leave,
    NodeMessage,
    decode,
    decode_from_halod,
    encode,
)
from orbited.core.routes import RouteTable
from orbited.sp.wire import SPConnection, encode_message

A, R, S, U, T = (Outcome.ANSWERED, Outcome.REFUSED, Outcome.RESET, Outcome.UNREACHABLE,
                 Outcome.TIMEOUT)  # fmt: skip
SETTINGS = ProbeSettings(enabled=True, timeout=0.5, interval=0.5)
TIMING = Timing(heartbeat_interval=1.0, missed_heartbeats=3, grace=5.0, probe=SETTINGS)


# -- the table ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcomes", "complete", "expected"),
    [
        ((A, None), False, Verdict.ALIVE),  # the first answer decides
        ((None, A), False, Verdict.ALIVE),
        ((R, None), False, None),  # the other port may still answer
        ((R, R), False, Verdict.DEAD),
        ((S, U), False, Verdict.DEAD),
        ((R, T), False, Verdict.DEAD),  # nothing listens on one of its ports
        ((R, None), True, Verdict.DEAD),  # timed out: the missing port is a time-out
        ((A, R), False, Verdict.ALIVE),  # ports disagree: something still listens
        ((T, T), False, Verdict.UNKNOWN),
        ((None, None), True, Verdict.UNKNOWN),
        ((None, None), False, None),
    ],
)
def test_verdict(outcomes, complete, expected):
    assert verdict(outcomes, complete) is expected


def test_only_silence_without_an_answer_or_a_dead_port_fails_at_once():
    assert {key for key, fail in FAIL_NOW.items() if fail} == {
        (Cause.DISCONNECTED, Verdict.DEAD),
        (Cause.SILENT, Verdict.DEAD),
        (Cause.SILENT, Verdict.UNKNOWN),
    }
    assert set(FAIL_NOW) == {(c, v) for c in Cause for v in Verdict}


def test_a_stale_or_repeated_result_is_ignored():
    prober = Prober(SETTINGS)
    first = prober.suspect("n", Cause.DISCONNECTED, {"browser": "h:1", "sp": "h:2"}, 0.0)
    assert [(r.port, r.address, r.timeout) for r in first] == [("browser", "h:1", 0.5),
                                                                ("sp", "h:2", 0.5)]  # fmt: skip
    probe_id = first[0].probe_id
    assert prober.result("n", probe_id, "browser", R, 0.1) is None  # waits for sp
    assert prober.result("n", probe_id, "browser", A, 0.1) is None  # reported twice
    assert prober.result("n", probe_id + 1, "sp", A, 0.1) is None  # not this probe
    assert prober.result("n", probe_id, "other", A, 0.1) is None  # not a port of it
    assert prober.result("x", probe_id, "sp", A, 0.1) is None  # not suspected
    finding = prober.result("n", probe_id, "sp", R, 0.1)
    assert finding is not None and finding.fail and finding.verdict is Verdict.DEAD
    assert finding.describe() == "probe: browser refused, sp refused"
    assert prober.cause("n") is None  # failed: no longer suspected


def test_probes_follow_each_other_sooner_at_first():
    prober = Prober(SETTINGS)
    (request,) = prober.suspect("n", Cause.DISCONNECTED, {"browser": "h:1"}, 0.0)
    assert prober.next_due() == 0.5  # its time-out
    now, gaps = 0.01, []
    for _ in range(6):
        prober.result("n", request.probe_id, "browser", A, now)
        gaps.append(round(prober.next_due() - now, 3))
        now = prober.next_due()
        (request,), _ = prober.tick(now)
    assert gaps == [FIRST_GAP, 0.1, 0.2, 0.4, 0.5, 0.5]  # doubling up to probe_interval


def test_disabled_probes_start_nothing():
    prober = Prober(ProbeSettings(enabled=False))
    assert prober.suspect("n", Cause.DISCONNECTED, {"browser": "h:1"}, 0.0) == []
    assert prober.tick(10.0) == ([], [])


# -- membership, with explicit times ----------------------------------------------------------


def reg(name, **extra):
    msg = {"type": "register", "version": 1, "name": name, "browser": f"{name}:80",
           "sp": f"tcp://{name}:90", "capacity": 10, "hashes": [1, 2], **extra}  # fmt: skip
    return decode(json.dumps(msg).encode(), FROM_NODE)


def cluster(timing=TIMING):
    """n1 active (id 1), s spare, n3 active (id 2)."""
    m = Membership(RouteTable(24, 1), timing)
    for name in ("n1", "s", "n3"):
        m.register(reg(name), now=0.0)
    return m


def tick(m, now, quiet=("n3",), **kwargs):
    """Every connected node but ``quiet`` heartbeats at ``now``; then the deadline check."""
    for record in list(m.nodes.values()):
        if record.connected and record.name not in quiet:
            m.heartbeat(record.name, Heartbeat(1), now)
    return m.tick(now, **kwargs)


def answer(m, probes, outcomes, now):
    """Report ``outcomes`` (port → Outcome) for ``probes``; the effects together."""
    effects = None
    for request in probes:
        if request.port in outcomes:
            got = m.probed(request.name, request.probe_id, request.port,
                           outcomes[request.port], now)  # fmt: skip
            if effects is None:
                effects = got
            else:
                effects.extend(got)
    return effects


def assigned(effects, name):
    return [s.message for s in effects.sends if s.name == name and isinstance(s.message, Assign)]


def test_a_dead_node_fails_over_as_soon_as_both_ports_refuse():
    m = cluster()
    routes = m.table.routes_of(2)
    effects = m.disconnected("n3", now=10.0)
    assert effects.changes == [] and {(r.port, r.address) for r in effects.probes} == {
        ("browser", "n3:80"),
        ("sp", "n3:90"),
    }
    failed = answer(m, effects.probes, {"browser": R, "sp": R}, now=10.01)
    assert [c.name for c in failed.changes] == ["n3"]  # 10 ms after, not after grace
    assert list(assigned(failed, "s")[0].routes) == routes  # the spare took id 2's routes
    assert m.failed["n3"] == (10.01, "disconnected, probe: browser refused, sp refused")


def test_one_refused_port_waits_for_the_other_then_its_time_out():
    m = cluster()
    probes = m.disconnected("n3", now=10.0).probes
    assert answer(m, probes, {"browser": R}, now=10.01).changes == []
    effects = tick(m, 10.6)  # sp never answered within probe_timeout
    assert [c.name for c in effects.changes] == ["n3"]
    assert m.failed["n3"][1] == "disconnected, probe: browser refused, sp timeout"


def test_a_node_that_answers_keeps_grace_and_its_routes_when_it_reconnects():
    m = cluster()
    table = m.table.table()
    probes = m.disconnected("n3", now=10.0).probes
    alive = answer(m, probes, {"browser": A}, now=10.01)
    assert alive.changes == [] and [f.verdict for f in alive.findings] == [Verdict.ALIVE]
    assert m.suspicion("n3") == Suspicion(Cause.DISCONNECTED, Verdict.ALIVE)
    again = tick(m, 10.6)  # still suspected: probed again every probe_interval
    assert {r.port for r in again.probes} == {"browser", "sp"}
    back = m.register(reg("n3", node_id=2), now=11.0)  # within grace: nothing moves
    assert back.changes == [] and m.table.table() == table and m.suspicion("n3") is None
    # The probe that was in flight when it came back says nothing about the new link.
    late = answer(m, again.probes, {"browser": R, "sp": R}, now=11.1)
    assert late.changes == [] and m.table.table() == table
    assert tick(m, 20.0).probes == []


def test_ports_that_disagree_count_as_alive():
    m = cluster()
    probes = m.disconnected("n3", now=10.0).probes
    effects = answer(m, probes, {"browser": R, "sp": A}, now=10.01)
    assert effects.changes == [] and effects.findings[0].verdict is Verdict.ALIVE


def test_a_node_that_answers_but_never_reconnects_fails_after_grace():
    m = cluster()
    now, probes = 10.0, m.disconnected("n3", now=10.0).probes
    while now < 15.0:  # it answers every probe
        answer(m, probes, {"browser": A, "sp": A}, now + 0.01)
        now += 0.25
        effects = tick(m, now)
        assert effects.changes == []
        probes = effects.probes or probes
    effects = tick(m, 15.1)
    assert [c.name for c in effects.changes] == ["n3"]
    assert m.failed["n3"][1] == "disconnected for more than 5s (its ports still answered)"


def test_a_killed_node_whose_listener_answered_the_first_probe_fails_at_the_second():
    m = cluster()
    probes = m.disconnected("n3", now=10.0).probes
    assert answer(m, probes, {"browser": A}, now=10.001).changes == []
    assert m.probe_due() == pytest.approx(10.001 + FIRST_GAP)
    second = m.probe_tick(10.051).probes
    effects = answer(m, second, {"browser": R, "sp": R}, now=10.052)
    assert [c.name for c in effects.changes] == ["n3"]


def test_a_node_that_stops_answering_during_grace_fails_then():
    m = cluster()
    probes = m.disconnected("n3", now=10.0).probes
    answer(m, probes, {"browser": A, "sp": A}, now=10.01)
    later = tick(m, 10.6).probes
    effects = answer(m, later, {"browser": R, "sp": R}, now=10.61)
    assert [c.name for c in effects.changes] == ["n3"]


def test_no_answer_at_all_leaves_the_decision_to_grace():
    m = cluster()
    m.disconnected("n3", now=10.0)
    for now in (10.6, 11.0, 12.0, 14.9):  # every probe times out: unknown
        assert tick(m, now).changes == []
    assert m.suspicion("n3") == Suspicion(Cause.DISCONNECTED, Verdict.UNKNOWN)
    assert [c.name for c in tick(m, 15.1).changes] == ["n3"]


def test_a_silent_node_that_answers_gets_grace_more_then_fails():
    m = cluster()
    for name in ("n1", "s"):
        m.heartbeat(name, Heartbeat(1), 9.0)
    m.heartbeat("n3", Heartbeat(1), 5.0)
    effects = tick(m, 8.1)  # n3 silent 3.1 s > 3 × 1 s: probed, not failed
    assert effects.changes == [] and {r.name for r in effects.probes} == {"n3"}
    assert answer(m, effects.probes, {"browser": A, "sp": A}, 8.11).changes == []
    assert m.suspicion("n3") == Suspicion(Cause.SILENT, Verdict.ALIVE)
    for name in ("n1", "s"):
        m.heartbeat(name, Heartbeat(2), 12.0)
    assert tick(m, 12.9).changes == []  # silent 7.9 s ≤ 3 + 5
    effects = tick(m, 13.1)
    assert [c.name for c in effects.changes] == ["n3"]
    assert [(d.name, d.code) for d in effects.drops] == [("n3", ErrorCode.FAILED)]
    assert m.failed["n3"][1] == "no heartbeat for 8.1s (its ports still answered)"


def test_a_late_heartbeat_clears_the_suspicion():
    m = cluster()
    for name in ("n1", "s"):
        m.heartbeat(name, Heartbeat(1), 9.0)
    m.heartbeat("n3", Heartbeat(1), 5.0)
    probes = tick(m, 8.1).probes
    m.heartbeat("n3", Heartbeat(2), 8.2)  # it was only busy
    assert m.suspicion("n3") is None
    assert answer(m, probes, {"browser": T, "sp": T}, 8.6).changes == []  # ignored
    assert tick(m, 8.7).probes == [] and "n3" in m.nodes


@pytest.mark.parametrize("outcome", [T, R])
def test_a_silent_node_that_does_not_answer_fails_at_once(outcome):
    m = cluster()
    for name in ("n1", "s"):
        m.heartbeat(name, Heartbeat(1), 9.0)
    m.heartbeat("n3", Heartbeat(1), 5.0)
    probes = tick(m, 8.1).probes
    effects = answer(m, probes, {"browser": outcome, "sp": outcome}, 8.2)
    assert [c.name for c in effects.changes] == ["n3"] and effects.drops[0].name == "n3"
    assert m.failed["n3"][1] == (
        f"no heartbeat for 3.2s, probe: browser {outcome.value}, sp {outcome.value}"
    )


def test_a_silent_node_that_then_disconnects_is_probed_afresh():
    m = cluster()
    for name in ("n1", "s"):
        m.heartbeat(name, Heartbeat(1), 9.0)
    m.heartbeat("n3", Heartbeat(1), 5.0)
    silent = tick(m, 8.1).probes
    closed = m.disconnected("n3", 8.2).probes
    assert {r.probe_id for r in closed}.isdisjoint({r.probe_id for r in silent})
    assert answer(m, silent, {"browser": T, "sp": T}, 8.3).changes == []  # the old probe
    assert m.suspicion("n3") == Suspicion(Cause.DISCONNECTED, None)
    assert [c.name for c in answer(m, closed, {"browser": R, "sp": R}, 8.3).changes] == ["n3"]


def test_a_stalled_halod_times_no_probe_out():
    m = cluster()
    m.disconnected("n3", now=10.0)
    assert tick(m, 11.0, heartbeats_current=False).findings == []  # answers may sit unread
    assert [f.verdict for f in tick(m, 11.1).findings] == [Verdict.UNKNOWN]


def test_nodes_restored_after_a_halod_restart_are_not_probed():
    # They may still be starting (a whole host rebooting): only grace applies to them.
    again = Membership.restore(cluster().snapshot(), TIMING, now=100.0, spares_wanted=1)
    assert again.tick(100.3).probes == [] and again.tick(104.9).changes == []
    assert len(again.tick(105.1).changes) == 3


def test_without_probes_only_grace_decides():
    m = cluster(Timing(1.0, 3, 5.0, ProbeSettings(enabled=False)))
    assert m.disconnected("n3", now=10.0).probes == []
    assert tick(m, 14.9).changes == [] and len(tick(m, 15.1).changes) == 1


# -- the Twisted shell with task.Clock and a hand-answered probe ------------------------------


class Node:
    """A node's control connection over a StringTransport, speaking SP pair0."""

    def __init__(self, halod: HaloD, name: str) -> None:
        self.proto = ControlProtocol(halod)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.sp = SPConnection(CONTROL_PROTOCOL, CONTROL_PROTOCOL, MAX_MESSAGE)
        self.proto.dataReceived(self.sp.initial_bytes())
        self.send(reg(name))

    def send(self, message: NodeMessage) -> None:
        self.proto.dataReceived(encode_message(encode(message)))

    def received(self) -> list[HaloDMessage]:
        data = self.transport.value()
        self.transport.clear()
        return [decode_from_halod(body) for body in self.sp.receive(data)]


def test_the_shell_probes_a_lost_node_and_applies_the_verdict(tmp_path: Path):
    clock = task.Clock()
    asked: dict[tuple[str, str], defer.Deferred[Outcome]] = {}

    def fake_probe(request: ProbeRequest) -> defer.Deferred[Outcome]:
        d: defer.Deferred[Outcome] = defer.Deferred()
        asked[(request.name, request.port)] = d
        return d

    config = HaloDConfig(db=str(tmp_path / "h.db"), dataplane="none")
    halod = HaloD(config, clock, prober=fake_probe)
    n1, spare, n3 = (Node(halod, name) for name in ("n1", "s", "n3"))
    for node in (n1, spare, n3):
        node.received()
    routes = halod.membership.table.routes_of(2)
    clock.advance(0.1)
    n3.proto.connectionLost(Failure(error.ConnectionLost()))
    assert set(asked) == {("n3", "browser"), ("n3", "sp")}
    (lost,) = (n for n in halod.status()["nodes"] if n["name"] == "n3")
    assert lost["suspected"] == {"cause": "disconnected", "probe": None}
    # A listener the dying process has not closed yet answers the first probe ...
    asked.pop(("n3", "browser")).callback(Outcome.ANSWERED)
    asked.pop(("n3", "sp")).callback(Outcome.REFUSED)  # late: the verdict was in
    assert spare.received() == [] and asked == {}
    # ... the second probe, FIRST_GAP later (not at the next deadline tick), does not.
    clock.advance(FIRST_GAP)
    assert set(asked) == {("n3", "browser"), ("n3", "sp")}
    asked[("n3", "browser")].callback(Outcome.REFUSED)
    assert spare.received() == []  # the sp port may still answer
    asked[("n3", "sp")].callback(Outcome.REFUSED)
    (assign,) = spare.received()
    assert isinstance(assign, Assign) and list(assign.routes) == routes
    assert halod.membership.state_of("n3") == "failed"
    assert halod.store.load() == halod.membership.snapshot()  # saved before nodes heard
    metrics = halod.metrics()
    assert 'halod_probes_total{verdict="alive"} 1' in metrics
    assert 'halod_probes_total{verdict="dead"} 1' in metrics


def test_the_shell_times_probes_out_on_its_clock(tmp_path: Path):
    clock = task.Clock()
    started: list[ProbeRequest] = []

    def silent_probe(request: ProbeRequest) -> defer.Deferred[Outcome]:
        started.append(request)
        return defer.Deferred()  # never answers

    halod = HaloD(HaloDConfig(db=str(tmp_path / "h.db"), dataplane="none"), clock,
                  prober=silent_probe)  # fmt: skip
    Node(halod, "n1")
    n2 = Node(halod, "n2")
    n2.proto.connectionLost(Failure(error.ConnectionLost()))
    assert len(started) == 2
    clock.advance(0.49)
    assert halod.stats["probes_unknown"] == 0
    clock.advance(0.01)  # probe_timeout: unknown, so grace applies; the next probe follows
    assert halod.stats["probes_unknown"] == 1 and "n2" in halod.membership.nodes
    clock.advance(FIRST_GAP)
    assert len(started) == 4


# -- the probe, against real sockets --------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_probe_outcomes_of_real_sockets():
    from twisted.internet import reactor

    listening, full = socket.socket(), socket.socket()
    for s in (listening, full):
        s.bind(("127.0.0.1", 0))
        s.listen(0)  # nothing accepts: the kernel completes the handshake (backlog + 1)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # bound once, nothing listens now
    # A full accept queue drops the SYN (a stopped node whose backlog filled up, or one
    # drowning in connects): no answer, not a refusal.
    held = socket.create_connection(full.getsockname())
    try:
        port = listening.getsockname()[1]
        assert (yield probe(reactor, f"127.0.0.1:{port}", 2.0)) is Outcome.ANSWERED
        assert (yield probe(reactor, f"127.0.0.1:{closed_port}", 2.0)) is Outcome.REFUSED
        full_port = full.getsockname()[1]
        assert (yield probe(reactor, f"127.0.0.1:{full_port}", 0.3)) is Outcome.TIMEOUT
        assert (yield probe(reactor, "not an address", 0.3)) is Outcome.TIMEOUT
    finally:
        for s in (held, listening, full):
            s.close()


@pytest.mark.parametrize(
    ("exception", "outcome"),
    [
        (error.ConnectionRefusedError(), R),
        (error.NoRouteError(), U),
        (error.ConnectError(osError=113), U),  # EHOSTUNREACH
        (error.ConnectError(osError=104), S),  # ECONNRESET
        (error.TimeoutError(), T),
        (error.DNSLookupError(), T),  # the name service failing says nothing of the node
        (defer.CancelledError(), T),
    ],
)
def test_connect_errors_map_to_outcomes(exception, outcome):
    assert outcome_of(Failure(exception)) is outcome


def test_nothing_changes_the_table_once_halod_is_stopping(tmp_path: Path):
    """At SIGTERM nodes often stop too: their leave messages and closed connections reach
    a HaloD whose store is closed. It must not act on them (each used to log a critical
    'saving the route table failed' with a traceback) and the saved table stays as it was."""
    clock = task.Clock()
    halod = HaloD(HaloDConfig(db=str(tmp_path / "h.db"), dataplane="none"), clock,
                  prober=lambda request: defer.Deferred())  # fmt: skip
    n1, n2 = Node(halod, "n1"), Node(halod, "n2")
    saved = halod.store.load()
    errors: list[dict] = []
    from twisted.logger import globalLogPublisher

    def observe(event: dict) -> None:
        if event.get("log_level") is not None and event["log_level"].name in ("error", "critical"):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        halod.shutdown()
        n1.send(Leave())
        n2.proto.connectionLost(Failure(error.ConnectionLost()))
    finally:
        globalLogPublisher.removeObserver(observe)
    assert errors == []
    assert set(halod.membership.nodes) == {"n1", "n2"}  # nothing acted on after shutdown
    from halod.store import Store

    assert Store(tmp_path / "h.db").load() == saved
