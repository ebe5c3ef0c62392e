"""Per-key delivery tracing (orbited.node.trace) through the hub's hooks, with a Clock."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.task import Clock

from orbited.core.hashing import route_of
from orbited.core.keys import ConnectionKey
from orbited.node.hub import Hub, HubConfig
from orbited.node.mailbox import MailboxLimits, Position
from orbited.node.observe import build_observer
from orbited.node.trace import TraceConfig, Tracer
from orbited.node.users import UserLimits
from tests.node.test_hub import RecordingSink

ALICE = ConnectionKey("alice", "s1", "/chat")
ALICE2 = ConnectionKey("alice", "s2", "/chat")
BOB = ConnectionKey("bob", "s2", "/chat")


class Sink(RecordingSink):
    kind = "ws"


class PollSink(RecordingSink):
    kind = "poll"


def traced_hub(trace: TraceConfig | None = None, **config: Any) -> tuple[Hub, Clock, Tracer]:
    clock = Clock()
    clock.advance(1000)
    hub = Hub(clock, HubConfig(**config), epoch="ep")
    tracer = Tracer(trace or TraceConfig(), "n1")
    hub.observe(build_observer(tracer, None), tracer)
    return hub, clock, tracer


def send(hub: Hub, event_id: str, keys: list[Any], data: object = 1, **extra: Any) -> Any:
    body = {"id": event_id, "to": [list(k) for k in keys], "data": data, **extra}
    out = hub.handle_request(json.dumps(body).encode())
    if isinstance(out, bytes):
        return json.loads(out)
    got: list[Any] = []
    out.addCallback(lambda b: got.append(json.loads(b)))
    return got


def rows(hub: Hub, user: str = "alice", **query: Any) -> list[dict[str, Any]]:
    answer = hub.trace_answer(user, **query)
    return [r for k in answer["keys"] for r in k["dispatches"]]


def only_key(hub: Hub, user: str = "alice", **query: Any) -> dict[str, Any]:
    (key,) = hub.trace_answer(user, **query)["keys"]
    return key


def test_tracing_off_by_default_and_the_answer_says_so() -> None:
    hub = Hub(Clock(), HubConfig(), epoch="ep")
    assert hub.observer is None and hub.tracer is None
    hub.attach(ALICE, Sink(), None)
    send(hub, "1", [ALICE])
    answer = hub.trace_answer("alice")
    assert answer["mode"] == "off" and answer["keys"] == []


def test_delivered_record_has_write_time_transport_and_ack() -> None:
    hub, clock, _ = traced_hub()
    hub.attach(ALICE, Sink(), None)
    clock.advance(1)
    send(hub, "42", [ALICE], {"x": 1})
    (record,) = rows(hub)
    assert record["event"] == "42" and record["status"] == "delivered"
    assert record["node"] == "n1" and record["seq"] == 1 and record["transport"] == "ws"
    assert record["written"] == record["t"] == 1001.0
    assert record["stream"] == hub.mailbox(ALICE).stream
    assert record["route"] == route_of(ALICE, hub.routes, hub.hash_version)
    assert record["acked"] is None and record["outcome"] is None
    clock.advance(0.25)
    hub.ack(ALICE, 1)
    (record,) = rows(hub)
    assert record["acked"] == 1001.25
    key = only_key(hub)
    assert key["here"] and key["attached"] == "ws" and key["last_seq"] == 1 and key["acked"] == 1
    assert [n["what"] for n in key["notes"]] == ["attach"]


def test_queued_then_written_on_reconnect_and_rewritten_on_a_replay() -> None:
    hub, clock, _ = traced_hub()
    sink = Sink()
    hub.attach(ALICE, sink, None)
    hub.detach(ALICE, sink, reason="slow")
    send(hub, "7", [ALICE])
    (record,) = rows(hub)
    assert record["status"] == "queued" and record["written"] is None
    clock.advance(2)
    stream = hub.mailbox(ALICE).stream
    poll = PollSink()
    hub.attach(ALICE, poll, Position(stream, 0))
    (record,) = rows(hub)
    assert (
        record["written"] == 1002.0 and record["transport"] == "poll" and record["rewritten"] == 0
    )
    hub.detach(ALICE, poll)
    hub.attach(ALICE, Sink(), Position(stream, 0))  # replayed again: not acked
    (record,) = rows(hub)
    assert record["rewritten"] == 1 and record["transport"] == "poll"
    notes = only_key(hub)["notes"]
    assert [n["what"] for n in notes] == ["attach", "detach", "attach", "detach", "attach"]
    assert notes[1]["reason"] == "slow" and notes[2]["last"] == f"{stream}:0"


def test_no_connection_full_and_moved() -> None:
    hub, _, _ = traced_hub(mailbox_total_bytes=10)
    send(hub, "1", [ALICE])
    hub.attach(BOB, Sink(), None)
    send(hub, "2", [BOB], "x" * 20)
    hub.assign([])  # nothing served here any more
    send(hub, "3", [ALICE])
    statuses = [(r["event"], r["status"]) for r in rows(hub)]
    assert statuses == [("1", "no_connection"), ("3", "moved")]
    assert [(r["event"], r["status"]) for r in rows(hub, "bob")] == [("2", "full")]
    assert [n["what"] for n in only_key(hub, "bob")["notes"]][-1] == "moved"


def test_a_resend_is_recorded_as_duplicate_with_the_first_seq_and_request() -> None:
    hub, _, _ = traced_hub()
    hub.attach(ALICE, Sink(), None)
    send(hub, "5", [ALICE])
    reply = send(hub, "5", [ALICE])
    assert reply["duplicate"] is True
    first, again = rows(hub)
    assert (first["status"], again["status"]) == ("delivered", "duplicate")
    assert again["seq"] == first["seq"] == 1 and again["request"] == first["request"]


def test_ack_mode_outcomes_land_on_the_records() -> None:
    hub, clock, _ = traced_hub()
    hub.attach(ALICE, Sink(), None)
    hub.attach(BOB, Sink(), None)
    got = send(hub, "9", [ALICE, BOB], ack=5)
    hub.ack(ALICE, 1)
    clock.advance(5)
    assert got and got[0]["results"][0]["status"] == "acked"
    (a,) = rows(hub)
    (b,) = rows(hub, "bob")
    assert (a["status"], a["outcome"], a["ack_wait"]) == ("delivered", "acked", 5)
    assert (b["status"], b["outcome"]) == ("delivered", "unacked")


def test_a_wildcard_records_each_key_it_reached() -> None:
    hub, _, _ = traced_hub()
    hub.attach(ALICE, Sink(), None)
    hub.attach(ALICE2, Sink(), None)
    send(hub, "w", [["alice", "*", "*"]])
    got = {
        tuple(k["key"]): [r["status"] for r in k["dispatches"]]
        for k in hub.trace_answer("alice")["keys"]
    }
    assert got == {tuple(ALICE): ["delivered"], tuple(ALICE2): ["delivered"]}
    only = hub.trace_answer("alice", session="s2")["keys"]
    assert [k["key"] for k in only] == [list(ALICE2)]


def test_reset_gap_replaced_and_expired_notes() -> None:
    hub, clock, _ = traced_hub(mailbox=MailboxLimits(max_events=2), linger=5)
    first = Sink()
    hub.attach(ALICE, first, None)
    hub.detach(ALICE, first)
    for i in range(4):
        send(hub, str(i), [ALICE])
    stream = hub.mailbox(ALICE).stream
    hub.attach(ALICE, Sink(), Position(stream, 0))  # 1 and 2 were evicted: a gap
    hub.attach(ALICE, Sink(), Position("gone.1", 3))  # replaces, and a reset
    hub.detach(ALICE, hub._slots[ALICE].sink)  # type: ignore[arg-type]
    clock.advance(5)
    whats = [n["what"] for n in only_key(hub)["notes"]]
    assert whats == ["attach", "detach", "attach", "gap", "replaced", "attach", "reset", "gap",
                     "detach", "expired"]  # fmt: skip
    notes = only_key(hub)["notes"]
    assert notes[3]["first"] == 1 and notes[3]["last"] == 2 and notes[6]["old"] == "gone.1"
    assert not only_key(hub)["here"]
    dropped = [r["dropped"] for r in rows(hub)]
    assert dropped == [0, 0, 1, 1]


def test_rings_are_bounded_and_the_least_recently_active_key_is_forgotten() -> None:
    hub, _, tracer = traced_hub(TraceConfig(per_key=3, notes_per_key=2, keys=2))
    sink = Sink()
    hub.attach(ALICE, sink, None)
    for i in range(5):
        send(hub, str(i), [ALICE])
        hub.detach(ALICE, sink)
        hub.attach(ALICE, sink, None)
    assert [r["event"] for r in rows(hub)] == ["2", "3", "4"]
    assert len(only_key(hub)["notes"]) == 2
    assert tracer.gauges()["trace_records"] == 3 and tracer.gauges()["trace_notes"] == 2
    send(hub, "b", [BOB])
    send(hub, "c", [ConnectionKey("carol", "s", "/l")])  # a third key: alice goes
    assert tracer.gauges()["traced_keys"] == 2 and tracer.gauges()["trace_evicted_keys"] == 1
    assert rows(hub) == []  # her mailbox is still here, her trace is not
    assert only_key(hub)["here"] and only_key(hub)["dispatches"] == []
    assert tracer.gauges()["trace_records"] == 2


def test_keys_idle_past_keep_are_forgotten() -> None:
    hub, clock, tracer = traced_hub(TraceConfig(keep=60))
    send(hub, "1", [ALICE])
    clock.advance(61)
    send(hub, "2", [BOB])
    assert rows(hub) == [] and tracer.gauges()["traced_keys"] == 1


def test_users_mode_traces_only_those_users() -> None:
    hub, _, tracer = traced_hub(TraceConfig(mode="users", users=frozenset({"bob"})))
    send(hub, "1", [ALICE, BOB])
    assert rows(hub) == [] and [r["event"] for r in rows(hub, "bob")] == ["1"]
    assert tracer.gauges()["traced_keys"] == 1


def test_event_and_limit_filter_the_records() -> None:
    hub, _, _ = traced_hub()
    for i in range(4):
        send(hub, str(i), [ALICE])
    assert [r["event"] for r in rows(hub, event="2")] == ["2"]
    assert [r["event"] for r in rows(hub, limit=2)] == ["2", "3"]


def test_traceparent_trace_id_is_recorded() -> None:
    hub, _, _ = traced_hub()
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    send(hub, "1", [ALICE], traceparent=parent)
    send(hub, "2", [ALICE], traceparent="nonsense")
    assert [r["trace_id"] for r in rows(hub)] == ["4bf92f3577b34da6a3ce929d0e0e4736", None]


def test_deliveries_held_for_a_hand_off_are_recorded_held_then_as_they_ran() -> None:
    hub, clock, _ = traced_hub(handoff_timeout=1)
    route = route_of(ALICE, hub.routes, hub.hash_version)
    hub.assign([r for r in range(1, hub.routes + 1) if r != route])
    hub.assign(range(1, hub.routes + 1), incoming=[route])
    send(hub, "1", [ALICE], ack=10)
    assert [r["status"] for r in rows(hub)] == ["held"]
    clock.advance(1)  # no hand-off came: the held delivery runs
    held, ran = rows(hub)
    assert (held["status"], ran["status"]) == ("held", "queued")
    assert held["request"] == ran["request"] and (held["seq"], ran["seq"]) == (None, 1)


@pytest.mark.parametrize("bad", [None, 5, "x", {"t": "x"}, {"t": 1, "what": 5},
                                 {"t": 1, "request": "r", "event": "e", "node": "n", "status": "s",
                                  "route": "13"}])  # fmt: skip
def test_import_drops_malformed_entries(bad: Any) -> None:
    tracer = Tracer(TraceConfig(), "n2")
    tracer.import_(ALICE, [bad], "n1", 5.0)
    assert tracer.import_dropped == 1
    assert tracer.gauges()["trace_records"] == 0


def test_config_keys_build_the_tracer_settings() -> None:
    from orbited.core.settings import ConfigError
    from orbited.node.config import NodeConfig

    assert NodeConfig.load(None, {"trace": "off"}).trace_config() is None
    config = NodeConfig.load(
        None, {"trace": "users", "trace_users": ["alice"], "trace_keys": 5, "trace_per_key": 3,
               "trace_keep": 9.5},
    )  # fmt: skip
    assert config.trace_config() == TraceConfig("users", 3, 3, 5, frozenset({"alice"}), 9.5)
    assert NodeConfig().trace == "off" and NodeConfig().trace_config() is None
    on = NodeConfig.load(None, {"trace": "all"}).trace_config()
    assert on == TraceConfig()  # the other defaults are the tracer's
    with pytest.raises(ConfigError, match="trace = users needs trace_users"):
        NodeConfig.load(None, {"trace": "users"})
    with pytest.raises(ConfigError, match="trace must be one of off, all, users"):
        NodeConfig.load(None, {"trace": "some"})
    with pytest.raises(ConfigError, match="trace_per_key must be positive"):
        NodeConfig.load(None, {"trace_per_key": 0})
    with pytest.raises(ConfigError, match="otel_sample must be between 0 and 1"):
        NodeConfig.load(None, {"otel_sample": 1.5})
    with pytest.raises(ConfigError, match="otel_exporter must be one of"):
        NodeConfig.load(None, {"otel_exporter": "zipkin"})


def test_the_exposure_audit_names_a_trace_endpoint_beyond_loopback() -> None:
    from orbited.node.config import NodeConfig
    from orbited.node.exposure import node_warnings

    assert node_warnings(NodeConfig(trace_key_file="k")) == []  # loopback by default
    (line,) = node_warnings(NodeConfig(http="0.0.0.0:8000", trace_key_file="k"))
    assert "GET /orbited/trace is served on 0.0.0.0:8000" in line
    assert node_warnings(NodeConfig(http="0.0.0.0:8000")) == []


def test_rate_limited_recipients_are_recorded() -> None:
    hub, _, _ = traced_hub(users=UserLimits(rate=1.0, burst=1))
    hub.attach(ALICE, Sink(), None)
    send(hub, "1", [ALICE, BOB])
    send(hub, "2", [ALICE, BOB])  # over alice's rate
    assert [(r["event"], r["status"]) for r in rows(hub)] == [("1", "delivered"), ("2", "limited")]


def test_otel_switches_have_flags_that_turn_them_on() -> None:
    from orbited.cli import _node_parser
    from orbited.node.config import NodeConfig

    args = vars(_node_parser().parse_args(["--otel", "--otel-key-attributes", "--trace-user", "a",
                                           "--trace-user", "b", "--trace", "users"]))  # fmt: skip
    config = NodeConfig.load(None, {k: v for k, v in args.items() if k in ("otel",
                             "otel_key_attributes", "trace_users", "trace")})  # fmt: skip
    assert config.otel is True and config.otel_key_attributes is True
    assert config.trace_users == ["a", "b"]
    assert vars(_node_parser().parse_args([]))["otel"] is None  # unset: the file or default


def test_health_gauges_carry_the_tracers() -> None:
    hub, _, _ = traced_hub()
    send(hub, "1", [ALICE])
    gauges = hub.gauges()
    assert (gauges["traced_keys"], gauges["trace_records"], gauges["trace_notes"]) == (1, 1, 0)
    assert gauges["trace_evicted_keys"] == 0
    assert "traced_keys" not in Hub(Clock(), HubConfig()).gauges()


def test_off_leaves_the_hub_untouched_and_on_installs_the_hook() -> None:
    """Tracing off: no observer and the class's own _deliver (the per-recipient path has
    no hook); on: the instance's _deliver is the observed one; off again removes it."""
    hub = Hub(Clock(), HubConfig(), epoch="ep")
    assert hub.observer is None and "_deliver" not in vars(hub)
    tracer = Tracer(TraceConfig(), "n1")
    hub.observe(tracer, tracer)
    assert vars(hub)["_deliver"] == hub._deliver_observed
    hub.observe(None)
    assert hub.observer is None and hub.tracer is None and "_deliver" not in vars(hub)


def test_the_service_builds_the_tracer_from_its_config(tmp_path: Any) -> None:
    from twisted.internet import reactor

    from orbited.node.config import NodeConfig
    from orbited.node.service import NodeService

    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 40)
    base = {"http": "127.0.0.1:0", "sp": "tcp://127.0.0.1:0", "secret_file": str(secret),
            "create_secret": False, "name": "n7"}  # fmt: skip
    off = NodeService(NodeConfig(**base, trace="off"), reactor)
    assert off.hub.observer is None and off.tracer is None
    on = NodeService(NodeConfig(**base, trace="users", trace_users=["a"], trace_per_key=3), reactor)
    assert on.hub.observer is on.tracer is on.hub.tracer
    assert on.tracer is not None and on.tracer.node == "n7"
    assert on.tracer.config == TraceConfig("users", 3, 3, 10_000, frozenset({"a"}))


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def dispatched(self, request: Any, now: float) -> str:
        return "mine"

    def recipient(self, token: Any, key: Any, route: Any, status: Any, *rest: Any) -> None:
        self.calls.append(("recipient", token, key, str(status)))

    def answered(self, token: Any, outcome: Any, now: float) -> None:
        self.calls.append(("answered", token, outcome.event_id))

    def written(self, *args: Any) -> None: ...

    def acked(self, *args: Any) -> None: ...

    def noted(self, key: Any, what: str, now: float, **detail: Any) -> None: ...

    def export(self, key: Any) -> list[dict[str, Any]]:
        return []

    def import_(self, *args: Any) -> None: ...


def test_tracer_and_another_observer_both_see_each_dispatch() -> None:
    clock = Clock()
    hub = Hub(clock, HubConfig(), epoch="ep")
    tracer, other = Tracer(TraceConfig(), "n1"), _Recorder()
    hub.observe(build_observer(tracer, other), tracer)  # type: ignore[arg-type]
    hub.attach(ALICE, Sink(), None)
    send(hub, "1", [ALICE, BOB])
    assert other.calls == [
        ("recipient", "mine", ALICE, "delivered"),
        ("recipient", "mine", BOB, "no_connection"),
        ("answered", "mine", "1"),
    ]
    assert [r["status"] for r in rows(hub)] == ["delivered"]


def test_the_service_adds_opentelemetry_when_configured(tmp_path: Any) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from twisted.internet import reactor

    from orbited.node.config import NodeConfig
    from orbited.node.observe import Observers
    from orbited.node.service import NodeService

    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 40)
    config = NodeConfig(
        http="127.0.0.1:0", sp="tcp://127.0.0.1:0", secret_file=str(secret),
        create_secret=False, otel=True, otel_exporter="memory", trace="all",
    )  # fmt: skip
    node = NodeService(config, reactor)
    assert node.otel is not None
    observer = node.hub.observer
    assert isinstance(observer, Observers) and observer.parts == (node.tracer, node.otel)
    node.otel.shutdown()
    alone = NodeService(NodeConfig(**{**vars(config), "trace": "off"}), reactor)
    assert alone.hub.observer is alone.otel and alone.tracer is None
    alone.otel.shutdown()


def test_kept_records_and_notes_are_left_to_the_garbage_collector() -> None:
    """A full trace is 160 000 records: they must hold nothing the cyclic GC keeps
    tracking (an Enum status, a NamedTuple), or every full collection walks them all."""
    import gc

    hub, _, tracer = traced_hub()
    hub.attach(ALICE, Sink(), None)
    send(hub, "1", [ALICE, BOB])
    send(hub, "2", [ALICE], ack=5)
    hub.ack(ALICE, 2)
    send(hub, "2", [ALICE], ack=5)  # a duplicate
    gc.collect()
    gc.collect()
    kept = [r for kt in tracer._keys.values() for r in (*kt.records, *kt.notes)]
    assert len(kept) >= 5 and not any(gc.is_tracked(x) for x in kept)


@pytest.mark.parametrize(("content", "why"), [(b"short\n", "at least 32 bytes"),
                                              (None, "No such file")])  # fmt: skip
def test_a_bad_trace_key_file_is_named(tmp_path: Any, content: bytes | None, why: str) -> None:
    from orbited.node.service import trace_key

    path = tmp_path / "trace.key"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^trace_key_file {path}: .*{why}") as e:
        trace_key(str(path))
    assert "secret" not in str(e.value)
    assert trace_key("") is None


def test_the_answer_names_the_node_with_tracing_off() -> None:
    hub = Hub(Clock(), HubConfig(), epoch="ep")
    hub.name = "n9"
    answer = hub.trace_answer("alice")
    assert (answer["node"], answer["mode"], answer["keys"], answer["gauges"]) == (
        "n9",
        "off",
        [],
        {},
    )
