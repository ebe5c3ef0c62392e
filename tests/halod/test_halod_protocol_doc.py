"""docs/halod-protocol.md says what the code does: its hand-off examples are what a node
reads and writes, and every field HaloD's status endpoints answer is named in the
"Status endpoints" table (an outside conformance suite is written from the docs)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from halod.config import HaloDConfig
from halod.server import ControlProtocol, HaloD, with_sender
from orbited.core.control import (
    CONTROL_PROTOCOL,
    MAX_MESSAGE,
    Handoff,
    Register,
    decode_from_halod,
    decode_from_node,
    encode,
)
from orbited.node.handoff import MailboxExport
from orbited.node.hub import Hub, HubConfig
from orbited.node.link import relayed_from
from orbited.node.offline import OfflineWatcher, WatchExport
from orbited.sp.wire import SPConnection
from tests.halod.test_halod_hash_version import HashNode

DOC = (Path(__file__).resolve().parents[2] / "docs" / "halod-protocol.md").read_text()


def section(title: str) -> str:
    return DOC.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def json_blocks(text: str) -> list[object]:
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, re.S)]


def table_row(text: str, first_cell: str) -> str:
    (row,) = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    return row


def test_the_handoff_example_is_a_message_a_node_reads_and_writes_back_as_is():
    message, users = json_blocks(section("Hand-off"))
    body = json.dumps(message).encode()
    decoded = decode_from_node(body)
    assert isinstance(decoded, Handoff) and decoded.to == "n2"
    (entry,) = decoded.mailboxes
    export = MailboxExport.from_wire(entry, 24)  # the route recomputed: 24 routes, hash v2
    assert export.to_wire() == entry  # every field, the tagged event's five included
    assert export.evicted == 0 and [seq for seq, _, _ in export.events] == [41, 43]
    assert [(seq, json.loads(tag), replaced) for seq, tag, replaced in export.tags] == [
        (43, "price:AAPL", 1)
    ]
    # HaloD appends its own "from" last; the node reads the sender from it.
    forged = body[:-1] + b',"from":"n9"}'
    relayed = with_sender(forged, "n1")
    assert json.loads(relayed)["from"] == "n1" and relayed_from(relayed) == "n1"
    assert decode_from_halod(relayed) == decoded


def _offline_hub() -> Hub:
    class Queue:
        def push(self, fields):
            return object()

        def cancel(self, notice) -> bool:
            return False

    clock = Clock()
    hub = Hub(clock, HubConfig(routes=24), epoch="ep")
    hub.offline = OfflineWatcher(Queue(), clock)
    return hub


def test_the_users_example_is_an_entry_a_node_takes_and_hands_on_unchanged():
    _, users = json_blocks(section("Hand-off"))
    assert isinstance(users, dict)
    for watch in users["watches"]:
        assert WatchExport.from_wire(watch).to_wire() == watch
    hub = _offline_hub()
    assert hub.import_users([users]) == 1
    assert hub.gauges()["user_holds"] == 1
    # The same clock time: the hold and the watches leave exactly as they came.
    assert hub.export_users(frozenset([users["route"]])) == [users]
    assert hub.gauges()["user_holds"] == 0


def _halod(tmp_path) -> HaloD:
    config = HaloDConfig(db=str(tmp_path / "halod.db"), dataplane="none", probe=False, spares=0,
                         hash_version=2)  # fmt: skip
    return HaloD(config, Clock())


def _named(row: str, name: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", row) is not None


def test_every_field_of_status_routes_metrics_and_rehash_is_in_the_table(tmp_path):
    halod = _halod(tmp_path)
    HashNode(halod, "a"), HashNode(halod, "b")  # two actives: a rehash runs until both hand off
    answer = halod.rehash(1)
    assert answer == {"hash_version": 1, "previous": 2, "nodes": ["a", "b"]}
    table = section("Status endpoints (HTTP, `status_http`, default 127.0.0.1:7601)")

    status = halod.status()
    assert status["rehash"] == {"hash_version": 1, "pending": [["a", "b"], ["b", "a"]]}
    row = table_row(table, "`GET /status`")
    node = status["nodes"][0]
    assert node["hashes"] == [1, 2]
    for name in [*status, *node, *status["rehash"]]:
        assert _named(row, name), f"/status field {name!r} is not in the doc"

    row = table_row(table, "`GET /routes`")
    for name in halod.routes_view():
        assert _named(row, f'"{name}"'), f"/routes field {name!r} is not in the doc"

    row = table_row(table, "`GET /metrics`")
    metrics = re.findall(r"^# TYPE (\w+) ", halod.metrics(), re.M)
    assert "halod_hash_version" in metrics
    missing = [name for name in metrics if not _named(row, name)]
    assert missing == []

    row = table_row(table, "`POST /rehash`")
    for name in answer:
        assert _named(row, f'"{name}"')
    for code in ("rehash_unsupported", "rehash_in_progress", "not_leader", "bad_request"):
        assert _named(row, code)


class DocNode(HashNode):
    """A node's control connection that registers with a given message and keeps the
    raw bodies HaloD sends (a relayed handoff's ``from`` is not a decoded field)."""

    def __init__(self, halod: HaloD, register: Register) -> None:
        self.proto = ControlProtocol(halod)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.sp = SPConnection(CONTROL_PROTOCOL, CONTROL_PROTOCOL, MAX_MESSAGE)
        self.proto.dataReceived(self.sp.initial_bytes())
        self.send(register)

    def bodies(self) -> list[Any]:
        data = self.transport.value()
        self.transport.clear()
        return [json.loads(body) for body in self.sp.receive(data)]


def example_messages(block: str) -> list[tuple[str, Any]]:
    """The ``who  {json}`` lines of an example block (continuation lines joined), with
    the doc's elisions filled in: ``[13,…,24]`` and the like are the whole range, a
    ``, …]`` list keeps only what is shown, ``[…]`` is empty."""
    lines: list[list[str]] = []
    for line in block.strip().splitlines():
        if line.startswith(" "):
            lines[-1][1] += line.strip()
        else:
            who, _, text = line.partition("{")
            if not text:  # "HaloD → n2   the same message with …": words, not JSON
                who, _, text = line.partition("  ")
                lines.append([who.strip(), text.strip()])
                continue
            lines.append([who.strip(), "{" + text.strip()])

    def expand(m: re.Match[str]) -> str:
        return json.dumps(list(range(int(m[1]), int(m[2]) + 1)))

    out = []
    for who, text in lines:
        if not text.startswith("{"):
            out.append((who, text))
            continue
        text = re.sub(r"\[(\d+),…,(\d+)\]", expand, text)
        text = re.sub(r"\[1,2,…,(\d+)\]", lambda m: json.dumps(list(range(1, int(m[1]) + 1))), text)
        text = text.replace(", …]", "]").replace("[…]", "[]")
        out.append((who, json.loads(text)))
    return out


def test_the_join_example_is_what_halod_sends(tmp_path):
    blocks = re.findall(r"```\n(.*?)```", section("Example"), re.S)
    join, spare = (example_messages(b) for b in blocks)
    halod = _halod(tmp_path)
    n1 = HashNode(halod, "n1")
    n1.received()
    (who, register), *rest = join
    assert who == "node → HaloD"
    n2 = DocNode(halod, decode_from_node(json.dumps(register).encode()))  # type: ignore[arg-type]
    sent = {"HaloD → n1": [json.loads(encode(m)) for m in n1.received()], "HaloD → n2": n2.bodies()}
    handoff: dict[str, Any] = {}
    for who, shown in rest:
        if who == "n1 → HaloD":  # n1's (empty) hand-off, relayed with its name
            handoff = shown
            n1.send(decode_from_node(json.dumps(shown).encode()))
            sent["HaloD → n2"] += n2.bodies()
            continue
        if isinstance(shown, str):
            assert shown == 'the same message with "from":"n1" appended as its last member'
            got = sent[who].pop(0)
            assert got == {**handoff, "from": "n1"} and list(got) == [*handoff, "from"]
            continue
        if who.startswith("n2 →"):
            continue  # the heartbeat pair: the ack is checked by the liveness tests
        if who == "HaloD → n2" and shown == {"type": "heartbeat_ack", "seq": 1}:
            continue
        got = sent[who].pop(0)
        if shown["type"] == "route_moved":  # the doc shows the first move of twelve
            assert len(got["moves"]) == 12
            got["moves"] = got["moves"][:1]
        assert got == shown and list(got) == list(shown)
    assert sent == {"HaloD → n1": [], "HaloD → n2": []}
    # The spare's welcome, in a version 1 cluster: no hash_version, node_id null.
    (_, register), (_, welcome) = spare
    assert welcome["node_id"] is None and "hash_version" not in welcome
    assert decode_from_halod(json.dumps(welcome).encode()).hash_version == 1  # type: ignore[union-attr]
    assert decode_from_node(json.dumps(register).encode()).hashes == (1, 2)  # type: ignore[union-attr]
