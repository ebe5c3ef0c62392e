"""Browser frames (docs/protocol.md, "Frames"): the bytes every transport carries."""

import json

import pytest

from orbited.node import frames
from orbited.node.hub import HubConfig


def test_an_untagged_event_is_the_previous_releases_frame():
    assert frames.event(3, b'{"a":1}', b'"m-1"') == (
        b'{"type":"event","seq":3,"id":"m-1","data":{"a":1}}'
    )
    assert frames.event(3, b"1") == b'{"type":"event","seq":3,"data":1}'
    assert frames.event(3, b"1", b'"m"', None, 0) == frames.event(3, b"1", b'"m"')


def test_a_latest_value_event_names_its_tag_and_what_it_replaced():
    tag = frames.event_id("price:AAPL")
    assert frames.event(10, b"{}", b'"p-10"', tag, 3) == (
        b'{"type":"event","seq":10,"id":"p-10","latest":"price:AAPL","replaced":3,"data":{}}'
    )
    # replaced is left out when 0; an event without id keeps its tag.
    assert frames.event(10, b"{}", b'"p-10"', tag) == (
        b'{"type":"event","seq":10,"id":"p-10","latest":"price:AAPL","data":{}}'
    )
    assert frames.event(2, b"7", None, tag, 1) == (
        b'{"type":"event","seq":2,"latest":"price:AAPL","replaced":1,"data":7}'
    )


@pytest.mark.parametrize("tag", ['q"uote', "back\\slash", "é", "\u2028", "a\nb"])
def test_a_tag_is_json(tag):
    frame = json.loads(frames.event(1, b"null", frames.event_id("x"), frames.event_id(tag), 2))
    assert frame == {"type": "event", "seq": 1, "id": "x", "latest": tag, "replaced": 2,
                     "data": None}  # fmt: skip


def test_hello_carries_the_hash_version_when_given():
    assert json.loads(frames.hello("s.1", 25.0, False, 4, 1.5, hash=2)) == {
        "type": "hello", "stream": "s.1", "keepalive": 25.0, "reset": False, "seq": 4,
        "spread": 1.5, "hash": 2,
    }  # fmt: skip
    assert "hash" not in json.loads(frames.hello("s.1", 25.0, True))


def test_reconnect_may_name_the_route():
    assert frames.reconnect("route_moved") == b'{"type":"reconnect","reason":"route_moved"}'
    assert frames.reconnect("rehash", 11) == (b'{"type":"reconnect","reason":"rehash","route":11}')


def test_closed():
    assert frames.closed(4429, "user_limit") == (
        b'{"type":"closed","code":4429,"reason":"user_limit"}'
    )
    assert json.loads(frames.closed(frames.DISPLACED, "displaced")) == {
        "type": "closed", "code": 4003, "reason": "displaced"}  # fmt: skip
    assert frames.USER_LIMIT == 4429


def test_the_new_frames_are_spelled_as_the_protocol_doc_shows():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    tag = frames.event_id("price:AAPL")
    shown = [
        frames.event(10, b'{"px":187.2}', b'"p-10"', tag, 3),
        frames.reconnect("rehash", 11),
        frames.closed(4429, "user_limit"),
        frames.closed(4003, "displaced"),
    ]
    for frame in shown:
        assert frame.decode() in text
    # the node's default keepalive (a float) is written as the docs show it: 25
    hello = frames.hello("kQ3v_x9A.1f", HubConfig().keepalive, False, 40, 0.8, hash=2).decode()
    assert hello in text


def _hello_by_json(stream, keepalive, reset, seq=0, spread=0.0, hash=None) -> bytes:
    """hello as json.dumps writes it (the frame's definition before issue 20's cut), a
    whole number of keepalive seconds as an integer."""
    if isinstance(keepalive, float) and keepalive.is_integer() and abs(keepalive) < 2**53:
        keepalive = int(keepalive)
    frame = {"type": "hello", "stream": stream, "keepalive": keepalive, "reset": reset,
             "seq": seq, "spread": spread}  # fmt: skip
    if hash is not None:
        frame["hash"] = hash
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode()


def test_hello_is_byte_identical_to_json_dumps_over_many_values():
    import math
    import random
    import struct

    rng = random.Random(20)
    floats = [0.0, -0.0, 25.0, 600.0, 0.001, 0.017, 1e-7, 1e-5, 1e16, 1e22, 123456789.125,
              5e-324, 1.7976931348623157e308, -1.5, 0.1 + 0.2, 3.4, math.inf, -math.inf,
              math.nan, 30, True]  # fmt: skip
    # random doubles, from every part of the range (random bit patterns)
    floats += [struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
               for _ in range(3000)]  # fmt: skip
    floats += [rng.uniform(0, 60) for _ in range(1000)] + [rng.random() / 1e4 for _ in range(500)]
    streams = ["aZ3x_Q.1f", "ep.0", "a-b_c.ffff", "", "é.1", 'q"uote.1', "back\\slash.2",
               "tab\t.3", "nl\n.4", "\u2028.5", "\x7f.6", "\ud800.7"]  # fmt: skip
    seqs = [0, 1, 42, 2**53, 2**63 + 5, -1, True]
    hashes = [None, 1, 2, 10**20, False]
    checked = 0
    for i, keepalive in enumerate(floats):
        spread = floats[(i * 7 + 3) % len(floats)]
        stream = streams[i % len(streams)]
        seq = seqs[i % len(seqs)]
        hash_ = hashes[i % len(hashes)]
        reset = bool(i % 2)
        args = (stream, keepalive, reset, seq, spread, hash_)
        try:
            expected = _hello_by_json(*args)
        except UnicodeEncodeError:  # a lone surrogate: no frame either way
            with pytest.raises(UnicodeEncodeError):
                frames.hello(*args)
            continue
        assert frames.hello(*args) == expected, args
        checked += 1
    assert checked > 4000


def test_the_nodes_own_hello_values_never_take_json_dumps(monkeypatch):
    """Every attach sends a hello: the node's values (a keepalive from the config, float or
    an int such as TOML's 30; the spread; a stream of the hub's) take the byte path."""
    expected = [
        _hello_by_json("aZ3x_Q.1f", 25.0, False, 7, 0.004, 2),
        _hello_by_json("aZ3x_Q.1f", 30, True, 0, 0.0, 2),
        _hello_by_json("ep.ff", 600, False, 3, 10, None),
    ]

    def no_json(obj: object) -> bytes:
        raise AssertionError("json.dumps for the node's own values")

    monkeypatch.setattr(frames, "_encode", no_json)
    assert frames.hello("aZ3x_Q.1f", 25.0, False, 7, 0.004, 2) == expected[0]
    assert frames.hello("aZ3x_Q.1f", 30, True, 0, 0.0, 2) == expected[1]
    assert frames.hello("ep.ff", 600, False, 3, 10) == expected[2]
