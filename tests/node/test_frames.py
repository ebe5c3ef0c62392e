"""Browser frames (docs/protocol.md, "Frames"): the bytes every transport carries."""

import json

import pytest

from orbited.node import frames


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
    hello = frames.hello("kQ3v_x9A.1f", 25, False, 40, 0.8, hash=2).decode()
    assert hello in text
