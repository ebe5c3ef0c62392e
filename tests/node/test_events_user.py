"""Event requests for users and sessions, latest-value tags, the offline hook and the
hash version (docs/protocol.md, "Addressing a user or a session", "Latest-value events",
"Offline webhooks", "Replies", "Errors"): parsing, node checks and reply encodings."""

import hashlib
import json

import pytest

from orbited.core.keys import ConnectionKey, Selector
from orbited.node import events
from orbited.node.events import (
    EventRequest,
    RecipientResult,
    RequestError,
    RequestLimits,
    Status,
    check_node,
    decode_reply,
    error_reply,
    ok_reply,
    parse_request,
)

LIMITS = RequestLimits(max_recipients=5, max_payload=100)
A1 = ConnectionKey("alice", "s1", "/t1")
A2 = ConnectionKey("alice", "s2", "/t9")


def body(doc: object) -> bytes:
    return json.dumps(doc).encode()


def parse(doc: object, limits: RequestLimits = LIMITS) -> EventRequest:
    request = parse_request(body(doc), limits)
    assert isinstance(request, EventRequest)
    # Whatever path took it, the general path (every check spelled out) agrees.
    assert events._parse_general(json.loads(body(doc)), limits) == request
    return request


def refused(doc: object, limits: RequestLimits = LIMITS) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_request(body(doc), limits)
    return info.value


# -- wildcards --------------------------------------------------------------------------


def test_a_request_may_address_users_sessions_and_keys():
    request = parse({"id": "m-1", "data": 1,
                     "to": [["alice", "*", "*"], ["bob", "s1", "*"], ["carol", "s9", "/t1"],
                            ["dave", "", "*"]]})  # fmt: skip
    assert request.recipients == (
        Selector("alice", None), Selector("bob", "s1"), ConnectionKey("carol", "s9", "/t1"),
        Selector("dave", ""),
    )  # fmt: skip
    assert [type(r) for r in request.recipients] == [Selector, Selector, ConnectionKey, Selector]


@pytest.mark.parametrize(
    "recipient, message",
    [
        (["alice", "*", "/x"], 'a wildcard session needs a wildcard location: [user, "*", "*"]'),
        (["*", "*", "*"], "key user cannot be a wildcard"),
        (["*", "s", "/l"], "key user cannot be a wildcard"),
        (["alice", "*", "*", "*"], "a connection key is an array [user, session, location]"),
        (["", "*", "*"], "key user must not be empty"),
    ],
)
@pytest.mark.parametrize("extra", [{}, {"ack": 5}, {"hash": 2}])
def test_bad_wildcard_forms_are_bad_key(recipient, message, extra):
    error = refused({"id": "e", "to": [["ok", "", ""], recipient], "data": 1, **extra})
    assert (error.code, error.message, error.event_id) == ("bad_key", message, "e")


def test_star_inside_a_part_is_not_a_wildcard():
    request = parse({"id": "e", "to": [["a*", "s*", "*/"]], "data": 1})
    assert request.recipients == (ConnectionKey("a*", "s*", "*/"),)


# -- the fast path and the digest --------------------------------------------------------


def test_the_plain_digest_is_unchanged():
    """Dedup memories of a node of the previous version stay valid for plain requests."""
    doc = {"id": "e1", "to": [["u", "", ""]], "data": {"x": 1}}
    addressed = json.dumps(["e1", [["u", "", ""]]], separators=(",", ":")).encode()
    expected = hashlib.blake2b(addressed + b"\0" + b'{"x":1}', digest_size=16).digest()
    assert parse(doc).digest == expected
    assert parse({**doc, "hash": 2}).digest == expected  # hash is not part of the event
    assert parse({**doc, "ack": 3}).digest == expected


def test_latest_and_offline_make_another_request():
    plain = {"id": "e1", "to": [["u", "*", "*"]], "data": 1}
    digests = {
        parse(plain).digest,
        parse({**plain, "latest": "a"}).digest,
        parse({**plain, "latest": "b"}).digest,
        parse({**plain, "offline": True}).digest,
        parse({**plain, "offline": 30}).digest,
        parse({**plain, "latest": "a", "offline": 5}).digest,
    }
    assert len(digests) == 6
    assert parse({**plain, "latest": "a"}).digest == parse({"latest": "a", **plain}).digest


def test_hash_is_read_on_the_fast_path():
    request = parse({"id": "e", "to": [["u", "s", "/l"]], "data": 1, "hash": 2})
    assert request.hash == 2 and request.recipients == (ConnectionKey("u", "s", "/l"),)
    assert parse({"id": "e", "to": [["u", "s", "/l"]], "data": 1}).hash is None
    # Any positive integer parses; whether it is the node's is check_node's call.
    assert parse({"id": "e", "to": [["u", "", ""]], "data": 1, "hash": 3}).hash == 3


@pytest.mark.parametrize("value", [0, -1, True, "2", 2.0, None, [2]])
def test_a_bad_hash_is_bad_request(value):
    for extra in ({}, {"ack": 1}):
        error = refused({"id": "e", "to": [["u", "", ""]], "data": 1, "hash": value, **extra})
        assert error.code == "bad_request" and "hash" in error.message


def test_new_fields_default_to_none():
    request = parse({"id": "e", "to": [["u", "", ""]], "data": 1})
    assert (request.latest, request.offline, request.hash, request.ack) == (None,) * 4


# -- latest ------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["price:AAPL", "x", "é" * 128, 'a"b\\c', "Price:aapl"])
def test_latest_is_kept_encoded_once(tag):
    request = parse({"id": "e", "to": [["u", "", ""]], "data": 1, "latest": tag})
    assert request.latest is not None and json.loads(request.latest) == tag
    assert request.latest == events._json_text(tag)  # what the frames splice in


@pytest.mark.parametrize("tag", ["", "x" * 129, 5, None, True, ["a"], {"a": 1}])
def test_a_bad_latest_is_bad_request(tag):
    error = refused({"id": "e", "to": [["u", "", ""]], "data": 1, "latest": tag})
    assert error.code == "bad_request"
    assert error.message == "latest must be a string of 1-128 characters"


def test_a_latest_with_a_lone_surrogate_is_bad_json():
    with pytest.raises(RequestError) as info:
        parse_request(b'{"id":"e","to":[["u","",""]],"data":1,"latest":"\\ud800"}', LIMITS)
    assert info.value.code == "bad_json"


# -- offline -----------------------------------------------------------------------------


def test_offline_true_is_the_nodes_offline_after():
    doc = {"id": "e", "to": [["u", "*", "*"]], "data": 1, "offline": True}
    assert parse(doc).offline == 30.0
    assert parse(doc, RequestLimits(offline_after=12)).offline == 12.0


@pytest.mark.parametrize("seconds", [0.001, 1, 2.5, 86400])
def test_offline_seconds(seconds):
    request = parse({"id": "e", "to": [["u", "", ""]], "data": 1, "offline": seconds})
    assert request.offline == float(seconds) and type(request.offline) is float


@pytest.mark.parametrize("value", [False, 0, -1, 86400.5, None, "30", [30], {}])
def test_a_bad_offline_is_bad_request(value):
    error = refused({"id": "e", "to": [["u", "", ""]], "data": 1, "offline": value})
    assert error.code == "bad_request"
    assert error.message == (
        "offline is true or seconds to wait for an acknowledgement, 0 < offline <= 86400"
    )


def test_max_offline_after_is_the_limit():
    limits = RequestLimits(max_offline_after=60)
    assert parse({"id": "e", "to": [["u", "", ""]], "data": 1, "offline": 60}, limits).offline
    error = refused({"id": "e", "to": [["u", "", ""]], "data": 1, "offline": 61}, limits)
    assert error.code == "bad_request" and "0 < offline <= 60" in error.message


def test_everything_together():
    request = parse({"id": "m-1", "to": [["alice", "*", "*"], ["bob", "s1", "*"],
                                         ["carol", "s9", "/t1"]],
                     "data": {"p": 1}, "latest": "room:42", "offline": True, "ack": 10,
                     "hash": 2})  # fmt: skip
    assert request.ack == 10.0 and request.latest == b'"room:42"'
    assert request.offline == 30.0 and request.hash == 2


# -- checks that depend on the node -------------------------------------------------------


def test_check_node_passes_what_the_node_can_serve():
    for doc in ({"id": "e", "to": [["u", "*", "*"]], "data": 1, "hash": 2},
                {"id": "e", "to": [["u", "", ""]], "data": 1}):  # fmt: skip
        check_node(parse(doc), 2)
    check_node(parse({"id": "e", "to": [["u", "", ""]], "data": 1, "hash": 1}), 1)
    check_node(parse({"id": "e", "to": [["u", "", ""]], "data": 1, "offline": 5}), 2, True)


def test_a_hash_mismatch_carries_the_nodes_version():
    request = parse({"id": "e", "to": [["u", "", ""]], "data": 1, "hash": 1})
    with pytest.raises(RequestError) as info:
        check_node(request, 2)
    error = info.value
    assert (error.code, error.hash, error.event_id) == ("hash_version_mismatch", 2, "e")
    reply = json.loads(error_reply(error))
    assert reply == {
        "id": "e",
        "ok": False,
        "error": {
            "code": "hash_version_mismatch",
            "message": "this node routes with hash_version 2; the request used 1",
            "hash": 2,
        },
    }


def test_wildcards_are_refused_on_a_version_1_node():
    request = parse({"id": "e", "to": [["u", "", ""], ["v", "s", "*"]], "data": 1})
    with pytest.raises(RequestError) as info:
        check_node(request, 1)
    assert info.value.code == "hash_version_mismatch" and info.value.hash == 1
    assert info.value.message == "wildcards need hash_version 2"
    check_node(parse({"id": "e", "to": [["u", "", ""]], "data": 1}), 1)  # keys are fine


def test_offline_without_a_hook_is_bad_request():
    request = parse({"id": "e", "to": [["u", "", ""]], "data": 1, "offline": True})
    with pytest.raises(RequestError) as info:
        check_node(request, 2, offline_hook=False)
    assert (info.value.code, info.value.message) == ("bad_request", "offline hook not configured")
    check_node(parse({"id": "e", "to": [["u", "", ""]], "data": 1}), 2, offline_hook=False)


def test_other_errors_carry_no_hash():
    assert "hash" not in json.loads(error_reply(RequestError("bad_key", "x", "e")))["error"]


# -- replies -----------------------------------------------------------------------------

ENCODED = [
    (
        events.matched(
            ((A1, events.stored(Status.DELIVERED, 7)), (A2, events.stored(Status.QUEUED, 3, 1)))
        ),  # fmt: skip
        b'{"status":"matched","keys":[{"key":["alice","s1","/t1"],"status":"delivered","seq":7},'
        b'{"key":["alice","s2","/t9"],"status":"queued","seq":3,"dropped":1}]}',
    ),
    (events.matched(()), b'{"status":"no_connection","keys":[]}'),
    (events.held(), b'{"status":"no_connection","keys":[],"held":true}'),
    (
        events.moved(11, "tcp://10.0.0.7:7001", 2),
        b'{"status":"moved","route":11,"to":"tcp://10.0.0.7:7001","hash":2}',
    ),
    (events.moved(11, None, 2), b'{"status":"moved","route":11,"hash":2}'),
    (events.limited(0.25), b'{"status":"limited","retry_after":0.25}'),
    (events.superseded(4, 9), b'{"status":"replaced","seq":4,"by":9}'),
    (
        events.stored(Status.DELIVERED, 10, replaced=3),
        b'{"status":"delivered","seq":10,"replaced":3}',
    ),
    (
        events.stored(Status.QUEUED, 10, 2, replaced=1),
        b'{"status":"queued","seq":10,"dropped":2,"replaced":1}',
    ),
    (
        events.matched(((A1, events.superseded(4, 9)), (A2, events.limited(1.5)))),
        b'{"status":"matched","keys":[{"key":["alice","s1","/t1"],"status":"replaced","seq":4,'
        b'"by":9},{"key":["alice","s2","/t9"],"status":"limited","retry_after":1.5}]}',
    ),
    # The results of the previous release are encoded as before.
    (events.stored(Status.DELIVERED, 1), b'{"status":"delivered","seq":1}'),
    (events.moved(3, None), b'{"status":"moved","route":3}'),
    (events.NO_CONNECTION_RECIPIENT, b'{"status":"no_connection"}'),
    (events.FULL_RECIPIENT, b'{"status":"full"}'),
]


@pytest.mark.parametrize("result, wire", ENCODED, ids=lambda x: repr(x)[:50])
def test_reply_encodings(result, wire):
    assert result.encode() == wire
    # The general encoder writes the plain results exactly as the fast one does.
    assert events._encode_result(result) == wire
    reply = ok_reply("m-1", [result.encode()])
    assert decode_reply(reply).results == (result,)  # the dedup memory rebuilds it


def test_a_key_with_an_escaped_part_in_a_matched_result():
    key = ConnectionKey('a"\\', "é", "/\n")
    wire = events.matched(((key, events.stored(Status.QUEUED, 1)),)).encode()
    assert json.loads(wire)["keys"][0]["key"] == list(key)
    assert wire.isascii()  # replies are ASCII JSON, like the ids


def test_a_result_built_with_the_five_old_fields_still_encodes():
    """hub.py builds results with tuple.__new__ for speed; one of 5 fields is the
    previous release's shape and must keep working until every caller builds 11."""
    old = tuple.__new__(RecipientResult, (Status.QUEUED, 4, 1, None, None))
    assert old.encode() == b'{"status":"queued","seq":4,"dropped":1}'


def test_moved_result_bytes_with_hash():
    assert events.moved_result(5, "tcp://a:1", 2) == events.moved(5, "tcp://a:1", 2).encode()
    assert events.moved_result(5, None) == b'{"status":"moved","route":5}'


def test_the_new_statuses():
    assert [Status.MATCHED, Status.LIMITED, Status.REPLACED] == [
        "matched", "limited", "replaced"]  # fmt: skip
    assert not any(s.stored for s in (Status.MATCHED, Status.LIMITED, Status.REPLACED))
    assert events.MATCHED is Status.MATCHED and events.REPLACED is Status.REPLACED


def test_the_whole_reply_with_one_entry_per_element_of_to():
    results = [events.matched(((A1, events.stored(Status.DELIVERED, 7)),)),
               events.held(), events.stored(Status.QUEUED, 2)]  # fmt: skip
    reply = ok_reply("m-1", [r.encode() for r in results])
    doc = json.loads(reply)
    assert [r["status"] for r in doc["results"]] == ["matched", "no_connection", "queued"]
    assert decode_reply(reply).results == tuple(results)


def test_plain_requests_stay_on_the_fast_path(monkeypatch):
    """The 1:1 hot path: id, to and data (and the hash clients send) never reach the
    general parser; wildcards, latest and offline may."""

    def general(doc, limits):
        raise AssertionError("the general path parsed a plain request")

    monkeypatch.setattr(events, "_parse_general", general)
    for doc in ({"id": "e", "to": [["u", "s", "/l"]], "data": 1},
                {"id": "e", "to": [["u", "s", "/l"], ["v", "", ""]], "data": [1], "hash": 2},
                {"id": "e", "to": [["u", "*", "*"]], "data": 1, "hash": 2}):  # fmt: skip
        assert isinstance(parse_request(body(doc), LIMITS), EventRequest)
    with pytest.raises(AssertionError):
        parse_request(body({"id": "e", "to": [["u", "", ""]], "data": 1, "latest": "t"}), LIMITS)


def test_the_reply_examples_of_the_protocol_doc():
    """Every result object in docs/protocol.md's "Reply" section is what the node encodes
    for it (the same fields; JSON-equal), and decodes back."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    section = text.split("### Reply", 1)[1].split("\n### ", 1)[0]
    examples = []
    for block in re.findall(r"```json\n(.*?)```", section, re.S):
        for line in re.sub(r"\n\s+", " ", block).splitlines():
            line = line.strip().rstrip(",")
            if line.startswith('{"status"'):
                examples.append(json.loads(line))
    assert len(examples) >= 7
    assert {e["status"] for e in examples} >= {"matched", "no_connection", "moved", "limited",
                                               "replaced", "delivered"}  # fmt: skip
    for example in examples:
        result = events._result(example)
        assert json.loads(result.encode()) == example
        assert list(json.loads(result.encode())) == list(example)  # the documented order
