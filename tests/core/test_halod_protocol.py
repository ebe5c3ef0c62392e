"""Control message validation (docs/halod-protocol.md): everything a peer sends is checked."""

import pytest

from orbited.core import control as p


def test_round_trip_of_each_node_message():
    for msg in (
        {"type": "register", "version": 1, "name": "n-1.a", "browser": "127.0.0.1:80",
         "sp": "tcp://127.0.0.1:90", "capacity": 5, "node_id": 3},
        {"type": "heartbeat", "seq": 9, "connections": 4},
        {"type": "leave"},
    ):  # fmt: skip
        assert p.decode(p.encode(msg), p.FROM_NODE) == msg


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"\xff\xfe", p.BAD_MESSAGE),
        (b"[1]", p.BAD_MESSAGE),
        (b'{"type": "welcome"}', p.BAD_MESSAGE),  # a HaloD message from a node
        (b'{"type": "heartbeat", "seq": -1}', p.BAD_MESSAGE),
        (b'{"type": "heartbeat", "seq": true}', p.BAD_MESSAGE),
        (b'{"type": "register", "version": 2}', p.UNSUPPORTED_VERSION),
        (
            b'{"type": "register", "version": 1, "name": "bad name", "browser": "a:1",'
            b' "sp": "tcp://a:1", "capacity": 1}',
            p.BAD_MESSAGE,
        ),
        (
            b'{"type": "register", "version": 1, "name": "n", "browser": "a b",'
            b' "sp": "tcp://a:1", "capacity": 1}',
            p.BAD_MESSAGE,
        ),
        (
            b'{"type": "register", "version": 1, "name": "n", "browser": "a:1",'
            b' "sp": "tcp://a:1", "capacity": 1, "node_id": 0}',
            p.BAD_MESSAGE,
        ),
        (b"[" * 100_000, p.BAD_MESSAGE),
    ],
)
def test_bad_messages_are_refused_with_a_code(body, code):
    with pytest.raises(p.ControlError) as e:
        p.decode(body, p.FROM_NODE)
    assert e.value.code == code


def test_halod_messages_are_checked_on_the_node_side_too():
    with pytest.raises(p.ControlError):
        p.decode(b'{"type": "assign", "role": "boss", "routes": []}', p.FROM_HALOD)
    with pytest.raises(p.ControlError):
        p.decode(b'{"type": "assign", "role": "active", "routes": [0]}', p.FROM_HALOD)
    ok = {"type": "assign", "role": "active", "node_id": 1, "routes": [1, 2]}
    assert p.decode(p.encode(ok), p.FROM_HALOD) == ok


def test_preformatted_ack_is_the_encoded_message():
    assert p.heartbeat_ack(42) == p.encode({"type": "heartbeat_ack", "seq": 42})
