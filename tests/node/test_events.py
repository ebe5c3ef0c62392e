"""Event request parsing (docs/protocol.md, "Event requests")."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orbited.core.keys import ConnectionKey
from orbited.node.events import (
    EventRequest,
    PingRequest,
    RequestError,
    RequestLimits,
    parse_request,
)

LIMITS = RequestLimits(max_recipients=3, max_payload=100)


def parse(doc) -> EventRequest | PingRequest:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return parse_request(body, LIMITS)


def test_valid_request():
    req = parse({"id": "e1", "to": [["u", "s", "/l"]], "data": {"b": 1, "a": "é"}})
    assert req.event_id == "e1"
    assert req.recipients == (ConnectionKey("u", "s", "/l"),)
    assert json.loads(req.payload) == {"b": 1, "a": "é"}
    assert "é".encode() in req.payload  # UTF-8, not \u escapes


def test_same_event_same_digest_different_event_different_digest():
    a = parse({"id": "e1", "to": [["u", "", ""]], "data": 1})
    assert a.digest == parse({"to": [["u", "", ""]], "data": 1, "id": "e1"}).digest
    assert a.digest != parse({"id": "e2", "to": [["u", "", ""]], "data": 1}).digest
    assert a.digest != parse({"id": "e1", "to": [["v", "", ""]], "data": 1}).digest
    assert a.digest != parse({"id": "e1", "to": [["u", "", ""]], "data": 2}).digest


def test_ping():
    assert parse({"op": "ping"}) == PingRequest(None)


@pytest.mark.parametrize(
    "doc, code",
    [
        (b"{not json", "bad_json"),
        (b"\xff\xfe", "bad_json"),
        (b'{"id":"e","to":[["u","",""]],"data":NaN}', "bad_json"),
        (b'{"id":"e","to":[["u","",""]],"data":[1e999]}', "bad_json"),
        ('{"id":"e","to":[["u","",""]],"data":1}'.encode("utf-16"), "bad_json"),
        (b'\xef\xbb\xbf{"id":"e","to":[["u","",""]],"data":1}', "bad_json"),
        (b"[" * 100_000, "bad_json"),
        (b'{"id":"e","to":[["u","",""]],"data":"\\ud800"}', "bad_json"),
        ([1], "bad_request"),
        ({"to": [["u", "", ""]], "data": 1}, "bad_request"),
        ({"id": "", "to": [["u", "", ""]], "data": 1}, "bad_request"),
        ({"id": "x" * 129, "to": [["u", "", ""]], "data": 1}, "bad_request"),
        ({"id": 5, "to": [["u", "", ""]], "data": 1}, "bad_request"),
        ({"id": "e", "to": [], "data": 1}, "bad_request"),
        ({"id": "e", "to": "u", "data": 1}, "bad_request"),
        ({"id": "e", "to": [["u", "", ""]]}, "bad_request"),
        ({"id": "e", "to": [["u", "", ""]], "data": 1, "extra": 2}, "bad_request"),
        ({"id": "e", "to": [["u", ""]], "data": 1}, "bad_key"),
        ({"id": "e", "to": [["", "s", "l"]], "data": 1}, "bad_key"),
        ({"id": "e", "to": [["u", 5, "l"]], "data": 1}, "bad_key"),
        ({"id": "e", "to": [["x" * 257, "", ""]], "data": 1}, "bad_key"),
        ({"id": "e", "to": [["u", "", ""]] * 4, "data": 1}, "too_many_recipients"),
        ({"id": "e", "to": [["u", "", ""]], "data": "x" * 200}, "payload_too_large"),
        ({"id": "e", "op": "drop_tables"}, "unknown_op"),
    ],
)
def test_bad_requests_have_clear_codes(doc, code):
    with pytest.raises(RequestError) as info:
        parse(doc)
    assert info.value.code == code
    assert info.value.message


@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_parsed_or_rejected_cleanly(body):
    try:
        parse_request(body, LIMITS)
    except RequestError as e:
        assert e.code in {
            "bad_json",
            "bad_request",
            "bad_key",
            "unknown_op",
            "too_many_recipients",
            "payload_too_large",
        }


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(json_values)
def test_any_json_data_round_trips(data):
    try:
        req = parse({"id": "e", "to": [["u", "", ""]], "data": data})
    except RequestError as e:
        assert e.code in ("payload_too_large", "bad_json")
        return
    assert json.loads(req.payload) == data


# -- Lone surrogates are never echoed; pings take no other field -------------------------

from orbited.node.events import error_reply, ok_reply  # noqa: E402


def strict_loads(reply: bytes) -> object:
    """What a strict JSON decoder (a browser's TextDecoder + JSON.parse, Go, Rust serde)
    does: a lone surrogate escape is not a Unicode character."""
    doc = json.loads(reply.decode("utf-8"))
    json.dumps(doc, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    return doc


def reply_to(body: bytes) -> bytes:
    try:
        request = parse_request(body, LIMITS)
    except RequestError as e:
        return error_reply(e)
    return ok_reply(request.event_id, [])


LONE = "\\ud800"  # as written in JSON: a high surrogate with no low one


@pytest.mark.parametrize(
    "body",
    [
        b'{"op":"ping","id":"%s"}' % LONE.encode(),
        b'{"op":"ping","id":"x%sy"}' % b"\\udfff",
        b'{"op":"nope","id":"%s"}' % LONE.encode(),
        b'{"op":"%s","id":"e"}' % LONE.encode(),
        b'{"id":"%s","to":[["u","",""]],"data":1,"extra":2}' % LONE.encode(),
        b'{"id":"e","to":[["u","",""]],"data":1,"%s":2}' % LONE.encode(),
        b'{"id":"%s","to":[["","",""]],"data":1}' % LONE.encode(),
        b'{"id":"%s","to":[["u","",""]]}' % LONE.encode(),
        b'{"id":"e","to":[["%s","",""]],"data":1}' % LONE.encode(),
    ],
)
def test_lone_surrogates_anywhere_are_bad_json_and_never_echoed(body):
    with pytest.raises(RequestError) as info:
        parse_request(body, LIMITS)
    assert info.value.code == "bad_json" and info.value.event_id is None
    reply = strict_loads(error_reply(info.value))
    assert reply["id"] is None and reply["error"]["code"] == "bad_json"


def test_a_surrogate_pair_is_a_character_not_an_error():
    ping = parse_request(b'{"op":"ping","id":"\\ud83d\\ude00"}', LIMITS)
    assert ping == PingRequest("\U0001f600")
    assert strict_loads(ok_reply(ping.event_id, []))["id"] == "\U0001f600"


# Hypothesis leaves surrogates out of text by default: mix them in.
def texts(max_size: int) -> st.SearchStrategy[str]:
    surrogates = st.characters(categories=["Cs"], max_codepoint=0xDBFF)  # never a pair
    return st.lists(st.characters() | surrogates, max_size=max_size).map("".join)


request_docs = st.tuples(
    st.fixed_dictionaries({}, optional={
        "id": texts(6),
        "op": st.sampled_from(["ping", "event", "x"]) | texts(3),
        "to": st.lists(st.lists(texts(3), min_size=3, max_size=3), max_size=2),
        "data": texts(4),
    }),
    st.dictionaries(texts(3), texts(3), max_size=1),
).map(lambda d: json.dumps({**d[1], **d[0]}).encode())  # fmt: skip


@given(st.one_of(st.binary(max_size=200), request_docs))
def test_every_reply_is_strict_json(body):
    strict_loads(reply_to(body))


@pytest.mark.parametrize(
    "doc",
    [
        {"op": "ping", "extra": 1},
        {"op": "ping", "id": "p", "to": [["u", "", ""]]},
        {"op": "ping", "data": None},
        {"op": "ping", "ack": 5},
    ],
)
def test_a_ping_with_any_other_field_is_refused_like_an_event(doc):
    with pytest.raises(RequestError) as info:
        parse(doc)
    assert info.value.code == "bad_request" and "unknown fields" in info.value.message
    assert info.value.event_id == doc.get("id")


def test_error_messages_quote_at_most_a_bounded_part_of_the_request():
    big = "x" * 100_000
    for doc in [{"id": "e", "op": big}, {"id": "e", "op": [big]},
                {"id": "e", "to": [["u", "", ""]], "data": 1, big: 1}]:  # fmt: skip
        with pytest.raises(RequestError) as info:
            parse_request(json.dumps(doc).encode(), RequestLimits())
        assert len(info.value.message) < 200


@pytest.mark.parametrize("number", [b"1e999", b"-1E+400", b"1" * 310 + b".0"])
def test_a_number_beyond_the_double_range_is_bad_json_with_a_null_id(number):
    with pytest.raises(RequestError) as info:
        parse_request(b'{"id":"e","to":[["u","",""]],"data":[%s]}' % number, LIMITS)
    assert info.value.code == "bad_json" and info.value.event_id is None
    assert parse_request(b'{"id":"e","to":[["u","",""]],"data":[1e308]}', LIMITS).payload


def test_a_reply_built_from_the_frames_id_is_the_reply_built_from_the_text():
    """The hub hands ok_reply the id as frames.event_id encoded it (once per request);
    the reply must be what reply_id writes (ASCII JSON) for every id."""
    from orbited.node import events, frames

    ids = ["e-1", "a b", 'q"uote', "back\\slash", "tab\t", "nl\n", "\x00", "\x7f", "é", "日本",
           "\u2028", "😀", "x" * 128, "mixed-é-\"-\\-\x01"]  # fmt: skip
    for event_id in ids:
        results = [b'{"status":"queued","seq":1}']
        expected = events.ok_reply(event_id, results)
        assert events.ok_reply(event_id, results, frames.event_id(event_id)) == expected, event_id
        assert json.loads(expected)["id"] == event_id
        assert expected.isascii()


def test_the_recipients_of_a_long_to_list_are_parse_recipients():
    """parse_request reads a list of keys with parse_recipient's fast path inline: the
    same keys and selectors, and the same error for a bad one, wherever it is."""
    from orbited.core.keys import KeyError_, parse_recipient
    from orbited.node import events

    good = [["u", "s", "/l"], ["u", "*", "*"], ["u", "s", "*"], ["é" * 64, "", ""],
            ["u" * 65, "s", "l"], ["u", "s" * 80, "l"], ("u", "s", "l")]  # fmt: skip
    assert events._recipients(good) == tuple(parse_recipient(k) for k in good)
    for bad in (["*", "s", "l"], ["u", "*", "l"], ["", "s", "l"], ["u", 1, "l"], ["u", "s"],
                "u", ["u", "s", "x" * 300]):  # fmt: skip
        with pytest.raises(KeyError_) as expected:
            parse_recipient(bad)
        with pytest.raises(KeyError_) as got:
            events._recipients([["a", "b", "c"], bad, ["d", "e", "f"]])
        assert str(got.value) == str(expected.value)


DEEP = RequestLimits(max_payload=1_000_000)


def _nested(depth: int) -> bytes:
    return b'{"id":"d","to":[["a","s","/l"]],"data":' + b"[" * depth + b"]" * depth + b"}"


def test_any_nesting_is_read_or_refused_as_bad_json_never_raised():
    # The strict decoder reads deeper than the encoder writes: between the two a request
    # was read and then its payload raised RecursionError (no reply over SP, a 500 over
    # HTTP). Every depth now has an answer.
    import sys

    from orbited.node.events import parse_request

    for depth in [*range(1, 1200, 7), 5000, 100_000]:
        try:
            request = parse_request(_nested(depth), DEEP)
        except RequestError as e:
            assert (e.code, e.message) == ("bad_json", "request JSON is nested too deeply")
            assert depth > 500
        else:
            assert request.payload == b"[" * depth + b"]" * depth
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(300)  # the encoder fails where the decoder (orjson) did not
    try:
        with pytest.raises(RequestError, match="nested too deeply"):
            parse_request(_nested(280), DEEP)
    finally:
        sys.setrecursionlimit(limit)


def test_a_huge_integer_is_refused_in_the_documents_words():
    from orbited.node.events import parse_request

    body = b'{"id":"d","to":[["a","s","/l"]],"data":' + b"9" * 5000 + b"}"
    with pytest.raises(RequestError) as refused:
        parse_request(body, DEEP)
    assert refused.value.code == "bad_json"
    assert refused.value.message == "request JSON has an integer of more than 4300 digits"


def test_a_hash_mismatch_quotes_at_most_40_characters_of_the_request():
    from orbited.node.events import check_node, parse_request

    body = b'{"id":"a","to":[["alice","s1","/x"]],"data":1,"hash":' + b"9" * 4000 + b"}"
    with pytest.raises(RequestError) as refused:
        check_node(parse_request(body, DEEP), 2)
    quoted = refused.value.message.rsplit("the request used ", 1)[1]
    assert refused.value.code == "hash_version_mismatch" and len(quoted) <= 40
