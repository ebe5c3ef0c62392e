"""Control messages (docs/halod-protocol.md): typed values both ways, the wire unchanged,
and everything a peer sends checked."""

import json
import re
from pathlib import Path

import pytest

from orbited.core.control import (
    FROM_HALOD,
    FROM_NODE,
    MAX_MESSAGE,
    Assign,
    ControlError,
    Error,
    ErrorCode,
    Handoff,
    Heartbeat,
    HeartbeatAck,
    Leave,
    Register,
    Rehash,
    RouteMove,
    RouteMoved,
    Welcome,
    decode,
    decode_from_halod,
    decode_from_node,
    encode,
    encode_heartbeat_ack,
    handoff_messages,
)
from orbited.core.routes import Role

DOC = Path(__file__).resolve().parents[2] / "docs" / "halod-protocol.md"

NODE_MESSAGES = [
    Register("n-1.a", "127.0.0.1:80", "tcp://127.0.0.1:90", 5),
    Register("n-1.a", "127.0.0.1:80", "tcp://127.0.0.1:90", 5, node_id=3, secret="s3cr3t"),
    Heartbeat(9),
    Heartbeat(9, connections=4, mailboxes=7),
    Leave(),
    Handoff("n2", (13,), ({"key": ["a", "", ""], "route": 13, "events": [[1, "7", "x"]]},)),
    Register("n-1.a", "127.0.0.1:80", "tcp://127.0.0.1:90", 5, hashes=(1, 2)),
    Handoff("n2", (13,), (), ({"user": "alice", "holds": [], "watches": []},)),
]
HALOD_MESSAGES = [
    Welcome(2, Role.ACTIVE, (13, 14), 24, 1.0, 3),
    Welcome(None, Role.SPARE, (), 24, 0.25, 5, incoming=()),
    Welcome(1, Role.ACTIVE, (1, 2, 3), 4, 1.0, 3, incoming=(3,)),
    Assign(1, Role.DRAINED, ()),
    Assign(2, Role.ACTIVE, (5, 6), incoming=(6,)),
    RouteMoved(
        (
            RouteMove(13, "n2", "127.0.0.2:8000", "tcp://127.0.0.2:9000", handoff=True),
            RouteMove(14, "n2", "127.0.0.2:8000", "tcp://127.0.0.2:9000"),
            RouteMove(15, None),
        )
    ),  # fmt: skip
    HeartbeatAck(1),
    Error(ErrorCode.DUPLICATE_NAME, "a node named 'n2' is connected"),
    Error("a_newer_code", "from a newer HaloD"),
    Handoff("n2", (), ()),
    Welcome(1, Role.ACTIVE, (1, 2), 2, 1.0, 3, version=4, hash_version=2),
    Assign(1, Role.ACTIVE, (1,), version=5, hash_version=2),
    Assign(1, Role.ACTIVE, (1,), hash_version=1),
    Rehash(
        2,
        7,
        (
            RouteMove(1, "n1", "127.0.0.1:8001", "tcp://127.0.0.1:9001"),
            RouteMove(2, "n2", "127.0.0.2:8001", "tcp://127.0.0.2:9001"),
            RouteMove(3, None),
        ),
    ),  # fmt: skip
    Rehash(1, 8, ()),
    Error(ErrorCode.UNSUPPORTED_HASH, "the cluster runs hash_version 2; this node speaks 1"),
]


@pytest.mark.parametrize("message", NODE_MESSAGES, ids=repr)
def test_node_messages_round_trip(message):
    assert decode(encode(message), FROM_NODE) == message
    assert decode_from_node(encode(message)) == message


@pytest.mark.parametrize("message", HALOD_MESSAGES, ids=repr)
def test_halod_messages_round_trip(message):
    assert decode(encode(message), FROM_HALOD) == message
    assert decode_from_halod(encode(message)) == message


def test_the_wire_is_what_previous_versions_sent():
    """Byte for byte: field order, optional fields left out, no spaces."""
    assert encode(Register("n2", "127.0.0.2:8000", "tcp://127.0.0.2:9000", 100000, 2, "k")) == (
        b'{"type":"register","version":1,"name":"n2","browser":"127.0.0.2:8000",'
        b'"sp":"tcp://127.0.0.2:9000","capacity":100000,"node_id":2,"secret":"k"}'
    )
    assert (
        encode(Heartbeat(1, 0, 0)) == b'{"type":"heartbeat","seq":1,"connections":0,"mailboxes":0}'
    )
    assert encode(Leave()) == b'{"type":"leave"}'
    assert encode(Welcome(None, Role.SPARE, (), 24, 1.0, 3)) == (
        b'{"type":"welcome","node_id":null,"role":"spare","routes":[],"total_routes":24,'
        b'"heartbeat_interval":1.0,"missed_heartbeats":3}'
    )
    assert encode(Assign(1, Role.ACTIVE, (1, 2), (2,))) == (
        b'{"type":"assign","node_id":1,"role":"active","routes":[1,2],"incoming":[2]}'
    )
    assert encode(
        RouteMoved((RouteMove(13, "n2", "b:1", "tcp://s:2", True), RouteMove(14, None)))
    ) == (
        b'{"type":"route_moved","moves":[{"route":13,"name":"n2","browser":"b:1",'
        b'"sp":"tcp://s:2","handoff":true},{"route":14,"name":null}]}'
    )
    assert encode(Handoff("n2", (1,), ({"key": ["a", "", ""]},))) == (
        b'{"type":"handoff","to":"n2","done":[1],"mailboxes":[{"key":["a","",""]}]}'
    )
    assert encode(Error(ErrorCode.FAILED, "gone")) == (
        b'{"type":"error","code":"failed","message":"gone"}'
    )


def _doc_examples() -> list[dict]:
    """The JSON objects of the protocol doc's examples (``…`` elisions dropped)."""
    text = DOC.read_text()
    found = []
    for block in re.findall(r"```(?:json)?\n(.*?)```", text, re.S):
        for line_start in re.finditer(r"\{\"type\"", block):
            start, depth = line_start.start(), 0
            for i in range(start, len(block)):
                depth += {"{": 1, "}": -1}.get(block[i], 0)
                if depth == 0:
                    found.append(block[start : i + 1])
                    break
    objects = []
    for raw in found:
        raw = re.sub(r",\s*…", "", raw).replace("…,", "")
        raw = re.sub(r"\[(\d+),(\d+),…,(\d+)\]", lambda m: f"[{m[1]},{m[2]},{m[3]}]", raw)
        raw = re.sub(r"\[(\d+),…,(\d+)\]", lambda m: f"[{m[1]},{m[2]}]", raw)
        objects.append(json.loads(raw))
    return objects


def test_the_docs_examples_decode():
    examples = _doc_examples()
    assert {e["type"] for e in examples} >= {
        "register", "route_moved", "assign", "welcome", "heartbeat", "heartbeat_ack", "handoff",
        "rehash", "trace_query", "trace_reply",
    }  # fmt: skip
    for example in examples:
        body = json.dumps(example).encode()
        from_node = ("register", "heartbeat", "trace_reply")
        allowed = FROM_NODE if example["type"] in from_node else FROM_HALOD
        message = decode(body, allowed)
        assert message.TYPE == example["type"]
        # Re-encoded, it says the same (JSON-equal: field order is the encoder's).
        assert json.loads(encode(message)) == example


def test_unknown_fields_are_ignored():
    body = b'{"type":"heartbeat","seq":3,"future":{"x":1}}'
    assert decode_from_node(body) == Heartbeat(3)


def test_an_integral_interval_is_a_float():
    welcome = decode_from_halod(
        b'{"type":"welcome","role":"active","routes":[1],"total_routes":1,'
        b'"heartbeat_interval":2,"missed_heartbeats":3}'
    )
    assert welcome == Welcome(None, Role.ACTIVE, (1,), 1, 2.0, 3)
    assert isinstance(welcome.heartbeat_interval, float) and welcome.role is Role.ACTIVE


def test_roles_and_codes_are_the_wire_strings():
    assert [r.value for r in Role] == ["active", "spare", "drained"]
    assert ErrorCode.BAD_MESSAGE == "bad_message" and ErrorCode.ID_CLAIMED == "id_claimed"
    assert json.loads(encode(Assign(1, Role.DRAINED, ())))["role"] == "drained"


def test_the_secret_is_not_in_a_registers_repr():
    assert "hunter2" not in repr(Register("n", "a:1", "tcp://a:1", 1, secret="hunter2"))


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"\xff\xfe", ErrorCode.BAD_MESSAGE),
        (b"[1]", ErrorCode.BAD_MESSAGE),
        (b'{"type": "welcome"}', ErrorCode.BAD_MESSAGE),  # a HaloD message from a node
        (b'{"type": 7}', ErrorCode.BAD_MESSAGE),
        (b'{"type": "heartbeat", "seq": -1}', ErrorCode.BAD_MESSAGE),
        (b'{"type": "heartbeat", "seq": true}', ErrorCode.BAD_MESSAGE),
        (b'{"type": "heartbeat", "seq": 1, "connections": -1}', ErrorCode.BAD_MESSAGE),
        (b'{"type": "heartbeat", "seq": NaN}', ErrorCode.BAD_MESSAGE),
        (b'{"type": "register", "version": 2}', ErrorCode.UNSUPPORTED_VERSION),
        (
            b'{"type": "register", "version": 1, "name": "bad name", "browser": "a:1",'
            b' "sp": "tcp://a:1", "capacity": 1}',
            ErrorCode.BAD_MESSAGE,
        ),
        (
            b'{"type": "register", "version": 1, "name": "n", "browser": "a b",'
            b' "sp": "tcp://a:1", "capacity": 1}',
            ErrorCode.BAD_MESSAGE,
        ),
        (
            b'{"type": "register", "version": 1, "name": "n", "browser": "a:1",'
            b' "sp": "tcp://a:1", "capacity": 1, "node_id": 0}',
            ErrorCode.BAD_MESSAGE,
        ),
        (
            b'{"type": "register", "version": 1, "name": "n", "browser": "a:1",'
            b' "sp": "tcp://a:1", "capacity": 1, "secret": 5}',
            ErrorCode.BAD_MESSAGE,
        ),
        (b'{"type": "handoff", "to": "n2", "done": [], "mailboxes": [1]}', ErrorCode.BAD_MESSAGE),
        (b"[" * 100_000, ErrorCode.BAD_MESSAGE),
    ],
)
def test_bad_messages_are_refused_with_a_code(body, code):
    with pytest.raises(ControlError) as e:
        decode(body, FROM_NODE)
    assert e.value.code == code


@pytest.mark.parametrize(
    "body",
    [
        b'{"type": "assign", "role": "boss", "routes": []}',
        b'{"type": "assign", "role": "active", "routes": [0]}',
        b'{"type": "assign", "role": "active", "routes": [65537]}',
        b'{"type": "welcome", "role": "active", "routes": [], "total_routes": 4,'
        b' "heartbeat_interval": 0, "missed_heartbeats": 3}',
        b'{"type": "route_moved", "moves": [{"route": 1, "name": 5}]}',
        b'{"type": "route_moved", "moves": [{"route": 1, "handoff": "yes"}]}',
        b'{"type": "route_moved", "moves": {}}',
        b'{"type": "error", "code": "x"}',
        b'{"type": "register", "version": 1, "name": "n", "browser": "a:1",'
        b' "sp": "tcp://a:1", "capacity": 1}',  # a node message to a node
    ],
)
def test_halod_messages_are_checked_on_the_node_side_too(body):
    with pytest.raises(ControlError) as e:
        decode(body, FROM_HALOD)
    assert e.value.code is ErrorCode.BAD_MESSAGE


def test_hash_version_fields_on_the_wire():
    """Absent means version 1 (an older node or HaloD), so the old wire is unchanged;
    a version 2 cluster says so in welcome and assign."""
    assert b"hash" not in encode(Welcome(None, Role.SPARE, (), 24, 1.0, 3))
    assert b"hash" not in encode(Register("n", "a:1", "tcp://a:1", 1))
    assert encode(Assign(1, Role.ACTIVE, (1,), hash_version=2)) == (
        b'{"type":"assign","node_id":1,"role":"active","routes":[1],"hash_version":2}'
    )
    assert encode(Register("n", "a:1", "tcp://a:1", 1, hashes=(1, 2))).endswith(
        b'"capacity":1,"hashes":[1,2]}'
    )
    old = decode_from_halod(b'{"type":"assign","node_id":1,"role":"active","routes":[1]}')
    assert isinstance(old, Assign) and old.hash_version == 1
    old_node = decode_from_node(
        b'{"type":"register","version":1,"name":"n","browser":"a:1","sp":"tcp://a:1","capacity":1}'
    )
    assert isinstance(old_node, Register) and old_node.hashes is None
    # A newer node may speak versions this HaloD does not know: kept as sent.
    newer = decode_from_node(
        b'{"type":"register","version":1,"name":"n","browser":"a:1","sp":"tcp://a:1",'
        b'"capacity":1,"hashes":[1,2,3]}'
    )
    assert isinstance(newer, Register) and newer.hashes == (1, 2, 3)


def test_rehash_on_the_wire():
    message = Rehash(2, 9, (RouteMove(1, "node-1", "h:1", "tcp://h:2"),))
    assert encode(message) == (
        b'{"type":"rehash","hash_version":2,"version":9,'
        b'"owners":[{"route":1,"name":"node-1","browser":"h:1","sp":"tcp://h:2"}]}'
    )
    assert Rehash in FROM_HALOD and Rehash not in FROM_NODE
    with pytest.raises(ControlError) as e:
        decode_from_node(encode(message))  # a node never sends it
    assert e.value.code is ErrorCode.BAD_MESSAGE


def test_users_travel_in_the_last_hand_off_message():
    entries = [{"key": ["u", "", ""], "route": 1, "stream": "a.1", "next_seq": 11,
                "acked": 0, "events": [[n, "x" * 1000] for n in range(1, 11)]}]  # fmt: skip
    users = [{"user": "u", "holds": [], "watches": []}]
    messages = handoff_messages("n2", [1], entries, chunk=3000, users=users)
    assert len(messages) > 1
    assert messages[-1].users == tuple(users) and all(not m.users for m in messages[:-1])
    assert b'"users"' not in encode(messages[0])
    assert decode_from_halod(encode(messages[-1])) == messages[-1]


def test_new_error_codes_are_the_wire_strings():
    assert ErrorCode.UNSUPPORTED_HASH == "unsupported_hash"
    assert ErrorCode.REHASH_UNSUPPORTED == "rehash_unsupported"
    assert ErrorCode.REHASH_IN_PROGRESS == "rehash_in_progress"


@pytest.mark.parametrize(
    "body",
    [
        b'{"type":"assign","role":"active","routes":[],"hash_version":3}',
        b'{"type":"assign","role":"active","routes":[],"hash_version":true}',
        b'{"type":"assign","role":"active","routes":[],"hash_version":"2"}',
        b'{"type":"welcome","role":"active","routes":[],"total_routes":4,'
        b'"heartbeat_interval":1,"missed_heartbeats":3,"hash_version":0}',
        b'{"type":"rehash","version":1,"owners":[]}',
        b'{"type":"rehash","hash_version":2,"owners":[]}',
        b'{"type":"rehash","hash_version":5,"version":1,"owners":[]}',
        b'{"type":"rehash","hash_version":2,"version":1,"owners":{}}',
        b'{"type":"rehash","hash_version":2,"version":1,"owners":[{"route":0,"name":"n"}]}',
        b'{"type":"rehash","hash_version":2,"version":1,'
        b'"owners":[{"route":1,"name":"n"},{"route":1,"name":"m"}]}',
        b'{"type":"handoff","to":"n2","done":[],"mailboxes":[],"users":[1]}',
        b'{"type":"handoff","to":"n2","done":[],"mailboxes":[],"users":{}}',
    ],
)
def test_hash_fields_are_checked(body):
    with pytest.raises(ControlError) as e:
        decode(body, FROM_HALOD)
    assert e.value.code is ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize(
    "hashes", [b"[]", b"[0]", b"[true]", b'["2"]', b"2", b"[" + b"1," * 16 + b"1]"]
)
def test_register_hashes_are_checked(hashes):
    body = (
        b'{"type":"register","version":1,"name":"n","browser":"a:1","sp":"tcp://a:1",'
        b'"capacity":1,"hashes":%s}' % hashes
    )
    with pytest.raises(ControlError) as e:
        decode_from_node(body)
    assert e.value.code is ErrorCode.BAD_MESSAGE


def test_preformatted_ack_is_the_encoded_message():
    assert encode_heartbeat_ack(42) == encode(HeartbeatAck(42))


def test_hand_off_messages_split_large_mailboxes_and_name_the_done_routes():
    entries = [{"key": ["u", "", ""], "route": 1, "stream": "a.1", "next_seq": 101,
                "acked": 0, "events": [[n, "x" * 1000] for n in range(1, 101)]},
               {"key": ["v", "", ""], "route": 2, "stream": "a.2", "next_seq": 2,
                "acked": 0, "events": [[1, "1"]]}]  # fmt: skip
    messages = handoff_messages("n2", [2, 1], entries, chunk=10_000)
    assert len(messages) > 5 and messages[-1].done == (1, 2)
    assert all(not m.done and m.to == "n2" for m in messages[:-1])
    for m in messages:
        assert len(encode(m)) < 20_000
        assert decode_from_halod(encode(m)) == m
    seqs = [e[0] for m in messages for b in m.mailboxes if b["key"] == ["u", "", ""]
            for e in b["events"]]  # fmt: skip
    assert seqs == list(range(1, 101))
    assert handoff_messages("n2", [3], []) == [Handoff("n2", (3,), ())]


def test_hand_off_chunks_are_sized_as_sent_with_non_ascii_payloads():
    """A control message writes each non-ASCII character as \\uXXXX (and a quote as \\"):
    chunks are sized by that, so none passes MAX_MESSAGE (HaloD would close the link and
    the whole hand-off would be lost)."""
    big = "é" * 80_000  # 80 000 characters, 480 000 bytes once escaped
    entries = [
        {
            "key": ["u", "", ""],
            "route": 1,
            "stream": "a.1",
            "next_seq": 4,
            "acked": 0,
            "events": [[n, big] for n in (1, 2, 3)],
        },
        {
            "key": ["v", "", ""],
            "route": 1,
            "stream": "a.2",
            "next_seq": 2000,
            "acked": 0,
            "events": [[n, '{"q":"\\"é\\""}' * 20] for n in range(1, 2000)],
        },
    ]
    messages = handoff_messages("n2", [1], entries)  # fmt: skip
    assert all(len(encode(m)) < MAX_MESSAGE for m in messages)
    events = [e for m in messages for b in m.mailboxes for e in b["events"]]
    assert len(events) == 3 + 1999
