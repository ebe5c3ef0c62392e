"""Property-based fuzzing of every parser (docs/fuzzing.md), with hypothesis.

The properties live in fuzz.targets (shared with the atheris runner, ``python -m fuzz``);
this module only generates inputs for them: raw bytes, and structured inputs that get
past the first checks (valid headers, real tokens, near-valid JSON messages). The
regression examples are inputs fuzzing found broken, kept as ``@example``.

Budget: ``ORBITED_FUZZ_EXAMPLES`` examples per test (default 200); derandomized when
``CI`` is set, so CI runs are reproducible.
"""

from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fuzz import targets as t
from orbited.core import control
from orbited.core.keys import ConnectionKey
from orbited.sp import wire

FUZZ = settings(
    max_examples=int(os.environ.get("ORBITED_FUZZ_EXAMPLES", "200")),
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None if os.environ.get("CI") else settings.default.database,
)

cuts = st.lists(st.integers(1, 70), min_size=1, max_size=8)
REQ_HEADER = wire.encode_header(wire.REQ)
PAIR_HEADER = wire.encode_header(control.CONTROL_PROTOCOL)


def length(n: int) -> bytes:
    return n.to_bytes(8, "big")


# A stream that is mostly well framed: messages, bare lengths (huge ones too) and junk.
frames = st.lists(
    st.one_of(
        st.binary(max_size=80).map(wire.encode_message),
        st.integers(0, 2**64 - 1).map(length),
        st.binary(max_size=12),
    ),
    max_size=8,
).map(b"".join)
sp_streams = st.one_of(
    st.binary(max_size=200),
    frames.map(lambda f: REQ_HEADER + f),
    st.tuples(st.binary(min_size=8, max_size=8), frames).map(b"".join),
)


# -- SP framing and backtraces -----------------------------------------------------------


@FUZZ
@given(sp_streams, cuts, st.integers(0, 100))
@example(REQ_HEADER + length(2**64 - 1), [3], 100)
@example(b"\x00SP\x00\x00\x30", [1], 10)  # a partial header of the wrong protocol
def test_sp_stream_any_bytes_any_chunking(stream, cuts, max_message):
    t.check_sp_stream(stream, cuts, max_message)


@FUZZ
@given(st.lists(st.binary(max_size=120), max_size=10), cuts, st.integers(0, 100))
def test_sp_messages_round_trip_or_oversize_is_refused(messages, cuts, max_message):
    t.check_sp_roundtrip(messages, cuts, max_message)


@FUZZ
@given(
    st.one_of(
        st.binary(min_size=8, max_size=8),
        st.integers(0, 0xFFFF).map(lambda p: b"\x00SP\x00" + p.to_bytes(2, "big") + b"\0\0"),
    ),
    st.sampled_from(sorted(wire.PROTOCOL_NAMES)),
)
def test_sp_header(header, expected):
    t.check_sp_header(header, expected)


@FUZZ
@given(st.binary(max_size=60), st.integers(1, 10))
def test_backtrace_any_body(body, max_hops):
    t.check_backtrace(body, max_hops)


@FUZZ
@given(st.lists(st.integers(0, 2**32 - 1), max_size=8), st.integers(0, 2**32 - 1),
       st.binary(max_size=40))  # fmt: skip
def test_backtrace_round_trip(hops, req_id, payload):
    t.check_backtrace_roundtrip(hops, req_id, payload)


@FUZZ
@given(sp_streams, cuts, st.integers(0, 100))
def test_rep_protocol_shell(stream, cuts, max_message):
    t.check_rep_protocol(stream, cuts, max_message)


def test_rep_protocol_closes_on_an_oversize_length_at_once():
    # 2**64-1 announced: refused from the 8 length bytes alone, nothing buffered for it.
    t.check_rep_protocol(REQ_HEADER + length(2**64 - 1) + b"x" * 1000, [4], 256)


# -- Event requests ----------------------------------------------------------------------

# Hypothesis leaves surrogates out of text: mix in high ones, which never make a pair.
lone_surrogates = st.characters(categories=["Cs"], max_codepoint=0xDBFF)
text = st.lists(st.characters() | lone_surrogates, max_size=12).map("".join)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | text
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=12,
)
# Parts that are the wildcard, look like it, or are ordinary (docs/protocol.md,
# "Addressing a user or a session").
wildcard_parts = st.sampled_from(["*", "*", "", "s*", "**", " *", "u"])
key_like = st.one_of(
    st.lists(text, min_size=3, max_size=3),
    st.lists(json_values, max_size=4),
    json_values,
    st.lists(st.text(min_size=250, max_size=260), min_size=3, max_size=3),
    st.lists(wildcard_parts | text, min_size=3, max_size=4),
)
event_docs = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(text, st.text(min_size=120, max_size=140), json_values),
        "op": st.one_of(st.sampled_from(["event", "ping"]), json_values),
        "to": st.one_of(st.lists(key_like, max_size=6), json_values),
        "data": json_values,
        "ack": st.one_of(st.floats(), st.integers(-5, 100), json_values),
        "latest": st.one_of(text, st.text(min_size=126, max_size=130), json_values),
        "offline": st.one_of(st.just(True), st.floats(), st.integers(-1, 10), json_values),
        "hash": st.one_of(st.integers(-1, 3), json_values),
        "extra": json_values,
    },
)


def encode_doc(doc: object, ascii_only: bool) -> bytes:
    # ensure_ascii escapes lone surrogates as \\udXXX (valid JSON, invalid text);
    # surrogatepass writes them as raw bytes (invalid UTF-8). Both must be refused cleanly.
    return json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@FUZZ
@given(st.one_of(
    st.binary(max_size=300),
    st.tuples(event_docs, st.booleans()).map(lambda d: encode_doc(*d)),
    st.integers(1, 3000).map(lambda n: b'{"id":"e","to":[["u","",""]],"data":%s%s}'
                             % (b"[" * n, b"]" * n)),
))  # fmt: skip
@example(b'{"id":"e","to":[["u","",""]],"data":1e999}')
@example(b'{"id":"\\ud800","to":[["u","",""]],"data":1}')
@example(b'{"op":"ping","id":"\\ud800"}')  # the id was echoed: strict decoders refuse it
@example(b'{"op":"nope","id":"\\udfff"}')
@example(b'\xef\xbb\xbf{"op":"ping"}')
@example(b'{"id":"e","to":[["u","*","*"],["u","*","/x"]],"data":1,"hash":1}')
@example(b'{"id":"e","to":[["u","s","*"]],"data":1,"latest":"t","offline":true,"hash":1}')
def test_event_request_any_body(body):
    t.check_event_body(body)


@FUZZ
@given(
    st.text(min_size=1, max_size=128),
    st.lists(st.lists(wildcard_parts | st.text(max_size=20), min_size=3,
                      max_size=3).filter(lambda k: k[0]),
             min_size=1, max_size=5),
    json_values,
    st.none() | st.floats(0.001, 60) | st.integers(1, 60),
    st.none() | st.text(min_size=1, max_size=128),
    st.none() | st.just(True) | st.floats(0.001, 86400) | st.integers(1, 86400),
    st.none() | st.integers(1, 5),
)  # fmt: skip
@example("e", [["u", "*", "/x"]], 1, None, None, None, None)
@example("e", [["*", "*", "*"]], 1, None, None, None, None)
@example("e", [["u", "", "*"], ["u", "*", "*"], ["u", "s", "/l"]], 1, 5, "t", True, 2)
def test_event_request_round_trip(event_id, keys, data, ack, latest, offline, hash_):
    t.check_event_roundtrip(event_id, keys, data, ack, latest, offline, hash_)


@FUZZ
@given(key_like)
@example(["u", "*", "*"])
@example(["u", "*", "/l"])
@example(["*", "s", "/l"])
@example(["u", "s*", "*"])
def test_connection_key_json(value):
    t.check_key_json(value)
    t.check_recipient_json(value)


positions = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"[A-Za-z0-9_-]{1,64}\.[0-9a-z]{1,16}:[0-9]{1,15}\s?", fullmatch=True),
)


@FUZZ
@given(positions)
@example("aZ3x_Q.1f:42\n")  # "$" matched before a final newline: now refused
def test_position_parse(text):
    t.check_position(text)


@FUZZ
@given(st.from_regex(r"[A-Za-z0-9_-]{1,64}\.[0-9a-z]{1,16}", fullmatch=True),
       st.integers(0, 10**15 - 1))  # fmt: skip
def test_position_round_trip(stream, seq):
    t.check_position_roundtrip(stream, seq)


# -- Tokens ------------------------------------------------------------------------------

claims = st.fixed_dictionaries(
    {},
    optional={
        "sub": st.one_of(text, json_values, wildcard_parts),
        "sid": st.one_of(text, json_values, wildcard_parts),
        "loc": st.one_of(text, json_values, wildcard_parts),
        "aud": st.one_of(st.just("orbited"), st.just(["orbited"]), json_values),
        "exp": st.one_of(st.integers(0, 2 * 10**9), st.floats(), json_values),
        "iat": st.one_of(st.integers(), json_values),
        "nbf": st.one_of(st.integers(), json_values),
    },
)
headers = st.one_of(
    st.just({"alg": "HS256", "typ": "JWT"}),
    st.fixed_dictionaries({"alg": st.one_of(st.sampled_from(["HS256", "none", "RS256"]),
                                            json_values)},
                          optional={"typ": json_values, "kid": json_values, "crit": json_values}),
    json_values,
)  # fmt: skip


@FUZZ
@given(st.one_of(
    st.text(max_size=300),
    st.tuples(st.just(t.valid_token()), st.integers(0, 200), st.text(max_size=3)).map(
        lambda a: a[0][: a[1]] + a[2] + a[0][a[1] + 1 :]),  # one character changed
))  # fmt: skip
@example("a.\udc80.c")  # a lone surrogate made PyJWT raise UnicodeEncodeError
def test_token_any_string(token):
    t.check_token(token)


@FUZZ
@given(headers, claims)
@example({"alg": "HS256"}, {"sub": "a", "aud": "orbited", "exp": "x"})  # TypeError with now=
@example({"alg": "HS256"}, {"sub": "a", "aud": "orbited", "exp": True})
def test_token_signed_arbitrary_claims(header, claims):
    t.check_token_claims(encode_doc(header, True), encode_doc(claims, True))


@FUZZ
@given(st.lists(wildcard_parts | st.text(max_size=30), min_size=3, max_size=3)
       .filter(lambda k: k[0]), st.integers(1, 10**6))  # fmt: skip
@example(["alice", "*", "/chat"], 60)
def test_token_round_trip(key, ttl):
    t.check_token_roundtrip(ConnectionKey(*key), ttl)


# Claims of every type, size and encoding (docs/protocol.md, "Tokens"), the documented
# outcome checked for each (fuzz.targets.check_token_claim_types).
around_now = st.integers(int(t.NOW) - 10**7, int(t.NOW) + 10**7)
claim_values = st.one_of(
    around_now,
    around_now.map(lambda n: n + 0.25),
    st.integers(),
    st.integers(2**53 - 3, 2**53 + 3),
    st.floats(),
    st.booleans(),
    st.none(),
    around_now.map(str),
    text,
    st.text(min_size=125, max_size=131).map(lambda s: "é" * len(s)),
    st.text(min_size=250, max_size=262),
    st.just("orbited"),
    st.just("*"),  # reserved in sub, sid and loc
    st.lists(st.one_of(st.just("orbited"), text, st.integers()), max_size=3),
    json_values,
)
typed_claims = st.dictionaries(st.sampled_from(t.CLAIM_NAMES), claim_values, max_size=8)
well_typed_claims = st.fixed_dictionaries(
    {"sub": st.text(min_size=1, max_size=8), "aud": st.just("orbited"), "exp": around_now},
    optional={
        "sid": text | wildcard_parts,
        "loc": text | wildcard_parts,
        "iat": around_now,
        "nbf": around_now,
    },
)


@FUZZ
@given(st.one_of(typed_claims, well_typed_claims), st.booleans(), st.booleans())
@example({"sub": "a", "aud": "orbited", "exp": "1893456000"}, False, False)  # cached, then 500
@example({"sub": "a", "aud": "orbited", "exp": True}, False, False)  # was token_expired
@example({"sub": 7, "aud": "orbited", "exp": 1893456000}, False, False)  # was token_invalid
@example({"sub": "a", "aud": "orbited", "exp": 1893456000, "iat": "1"}, False, False)
@example({"sub": "a", "aud": "orbited", "exp": 10**400}, False, False)  # OverflowError
@example({"sub": "\ud800", "aud": "orbited", "exp": 1893456000}, False, False)
@example({"sub": "a", "aud": "orbited", "exp": 1893456000}, True, False)  # duplicate sub
def test_token_claims_types_sizes_encodings(claims, duplicate, raw):
    t.check_token_claim_types(claims, duplicate, raw)


# -- Legacy Orbit 1.0 --------------------------------------------------------------------

orbit_ids = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20)
orbit_parts = st.text(st.characters(codec="utf-8", exclude_characters=",\r\n()"), max_size=10).map(
    str.strip
)
orbit_key_parts = orbit_parts.filter(lambda p: p != "*")  # "*" is reserved: refused
orbit_requests = st.tuples(
    orbit_ids.map(str.strip).filter(bool),
    st.lists(st.tuples(orbit_key_parts.filter(bool), orbit_key_parts, orbit_key_parts).map(list),
             min_size=1, max_size=4),
    st.binary(max_size=80),
    st.integers(0, 1),
)  # fmt: skip
orbit_lines = st.lists(
    st.one_of(
        st.sampled_from(["Orbit 1.0", "Orbit/1.0", "Event", "Action: Event", "Action: Nope"]),
        st.tuples(st.sampled_from(["id", "Id", "recipient", "Recipient", "length", "Length",
                                   "x"]), orbit_ids).map(": ".join),
        orbit_ids,
    ),
    max_size=8,
).map(lambda lines: "\r\n".join(lines).encode() + b"\r\n\r\n")  # fmt: skip
orbit_streams = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(orbit_lines, orbit_requests.map(lambda r: t.orbit_request(*r)),
                       st.binary(max_size=30)), max_size=5).map(b"".join),
)  # fmt: skip


@FUZZ
@given(orbit_streams, cuts)
@example(b"Orbit 1.0\r\nEvent\r\nid: 1\r\nrecipient: a,0,/\r\nlength: \xd9\xa3\r\n\r\n", [5])
def test_orbit_parser_any_stream_any_chunking(stream, cuts):
    t.check_orbit_stream(stream, cuts)


@FUZZ
@given(st.lists(orbit_requests, max_size=4), cuts)
def test_orbit_requests_round_trip(requests, cuts):
    t.check_orbit_roundtrip(requests, cuts)


@FUZZ
@given(orbit_streams, cuts)
def test_orbit_protocol_shell(stream, cuts):
    t.check_orbit_protocol(stream, cuts)


def test_orbit_endless_header_is_bounded_and_closed():
    t.check_orbit_protocol(b"Orbit 1.0\r\n" + b"x" * 200_000, [4096])


# -- HaloD control protocol, both ends ---------------------------------------------------

routes = st.lists(st.one_of(st.integers(-2, 6), json_values), max_size=5)
addresses = st.one_of(st.sampled_from(["127.0.0.1:1", "tcp://127.0.0.1:2", "[::1]:3",
                                       "tcp://:9", "h:99999"]), text)  # fmt: skip
mailbox_entries = st.one_of(
    st.fixed_dictionaries(
        {"key": key_like, "route": st.one_of(st.integers(-1, 6), json_values),
         "stream": st.one_of(st.just("fz0.1"), text), "next_seq": json_values,
         "acked": json_values, "events": st.one_of(
             st.lists(st.tuples(st.integers(-1, 5), text).map(list), max_size=3), json_values)},
        optional={"online": json_values},
    ),
    json_values,
)  # fmt: skip
user_entries = st.one_of(
    st.fixed_dictionaries({"user": st.one_of(st.just("u"), text),
                           "holds": json_values, "watches": json_values}),
    json_values,
)  # fmt: skip
hash_versions = st.one_of(st.sampled_from([1, 2]), st.integers(-1, 4), json_values)
node_messages = st.one_of(
    st.fixed_dictionaries({"type": st.just("register"), "version": st.sampled_from([1, 2]),
                           "name": st.sampled_from(["n1", "n2", "bad name"]),
                           "browser": addresses, "sp": addresses,
                           "capacity": st.integers(-1, 10)},
                          optional={"node_id": json_values, "secret": json_values,
                                    "hashes": st.one_of(st.just([1, 2]), json_values)}),
    st.fixed_dictionaries({"type": st.just("heartbeat"), "seq": st.integers(-1, 2**63)},
                          optional={"connections": json_values}),
    st.fixed_dictionaries({"type": st.just("handoff"), "to": st.sampled_from(["n1", "n2"]),
                           "done": routes, "mailboxes": st.lists(mailbox_entries, max_size=3)},
                          optional={"users": st.one_of(st.lists(user_entries, max_size=2),
                                                       json_values)}),
    st.just({"type": "leave"}),
    st.dictionaries(text, json_values, max_size=4),
    json_values,
)  # fmt: skip
WELCOME = {"type": "welcome", "role": "active", "routes": [1, 2], "total_routes": 4,
           "heartbeat_interval": 1, "missed_heartbeats": 3}  # fmt: skip
halod_messages = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["welcome", "assign"]),
                           "role": st.sampled_from(["active", "spare", "drained", "x"]),
                           "routes": routes, "total_routes": st.integers(0, 6),
                           "heartbeat_interval": st.one_of(st.floats(), st.integers(-1, 5)),
                           "missed_heartbeats": st.integers(0, 5)},
                          optional={"node_id": json_values, "incoming": routes,
                                    "hash_version": hash_versions}),
    st.fixed_dictionaries({"type": st.just("route_moved"),
                           "moves": st.lists(st.fixed_dictionaries(
                               {"route": st.one_of(st.integers(-1, 6), json_values)},
                               optional={"to": json_values, "sp": json_values,
                                         "browser": json_values, "name": json_values,
                                         "handoff": json_values}), max_size=3)}),
    st.fixed_dictionaries({"type": st.just("handoff"), "to": st.just("n1"), "done": routes,
                           "mailboxes": st.lists(mailbox_entries, max_size=3)}),
    st.fixed_dictionaries({"type": st.just("rehash"), "hash_version": hash_versions,
                           "version": st.one_of(st.integers(-1, 9), json_values),
                           "owners": st.one_of(st.lists(st.fixed_dictionaries(
                               {"route": st.one_of(st.integers(-1, 6), json_values)},
                               optional={"name": st.one_of(st.sampled_from(["n1", "n2"]),
                                                           json_values),
                                         "sp": json_values, "browser": json_values}),
                               max_size=4), json_values)}),
    st.fixed_dictionaries({"type": st.just("heartbeat_ack"), "seq": st.integers(-1, 9)}),
    st.fixed_dictionaries({"type": st.just("error"), "code": json_values,
                           "message": json_values}),
    st.dictionaries(text, json_values, max_size=4),
)  # fmt: skip


@FUZZ
@given(st.one_of(
    st.binary(max_size=200),
    node_messages.map(lambda m: json.dumps(m).encode()),
    halod_messages.map(lambda m: json.dumps(m).encode()),
))  # fmt: skip
@example(b'{"type":"handoff","to":"n","done":[],"mailboxes":[{"a":Infinity}]}')  # not JSON
@example('{"type":"leave"}'.encode("utf-16"))
def test_control_message_any_body(body):
    t.check_control_body(body)


@FUZZ
@given(st.lists(node_messages, max_size=5), cuts)
def test_halod_control_connection(messages, cuts):
    t.check_halod_messages(messages, cuts)


@FUZZ
@given(st.lists(halod_messages, max_size=5), cuts)
@example([dict(WELCOME, total_routes=2**31)], [1000])  # a node built 2**31 routes: OOM
@example([dict(WELCOME, heartbeat_interval=1e-300)], [1000])  # a spinning heartbeat
@example([WELCOME, {"type": "route_moved", "moves": [{"route": True, "sp": 5}]}], [1000])
def test_node_control_connection(messages, cuts):
    t.check_node_messages(messages, cuts)


@FUZZ
@given(sp_streams.map(lambda s: PAIR_HEADER + s), cuts)
def test_control_connections_any_bytes(stream, cuts):
    t.check_node_control(stream, cuts)
    t.check_halod_control(stream, cuts)


# -- Browser transports: query parameters and the twisted.web resources ------------------

param_values = st.one_of(
    st.text(max_size=40),
    st.just(t.valid_token()),
    positions,
    st.sampled_from(["0", "120", "120.1", "-0", "nan", "inf", "1e400", "1_0", " 5 ",
                     "http://127.0.0.1", "http://[", "http://a.com\n"]),
)  # fmt: skip


@FUZZ
@given(st.dictionaries(st.sampled_from(["token", "last", "x"]),
                       st.lists(param_values, max_size=3), max_size=3))  # fmt: skip
@example({"token": [t.valid_token()], "last": ["0.0:00"]})  # leading zeros normalise
def test_authenticate_params(params):
    t.check_auth_params(params)


@FUZZ
@given(param_values)
def test_longpoll_timeout_param(text):
    t.check_timeout_param(text)


origins = st.one_of(
    st.none(), st.text(max_size=30),
    st.sampled_from(["null", "http://[", "http://[::1", "http://h:1", "http://H:1", "*"]),
)  # fmt: skip


@FUZZ
@given(origins, st.one_of(st.none(), st.text(max_size=20), st.just("h:1")),
       st.lists(st.one_of(st.text(max_size=20), st.just("*")), max_size=2))  # fmt: skip
@example("http://[", "h:1", [])  # urlsplit raised ValueError: a 500 for one Origin header
def test_origin_allowed(origin, host, allowed):
    t.check_origin(origin, host, allowed)


header_values = st.one_of(
    st.binary(max_size=40).map(t.strip_crlf),
    st.sampled_from([b"http://127.0.0.1:8000", b"http://[", b"null", b"127.0.0.1:8000",
                     b"fz0.1:3", b"\xff", b"websocket", b"Upgrade", b"dGhlIHNhbXBsZSBub25jZQ=="]),
)  # fmt: skip
query_values = st.one_of(
    st.binary(max_size=40),
    param_values.map(lambda s: s.encode("utf-8", "surrogatepass")),
)


@FUZZ
@given(
    st.sampled_from(t.RESOURCES),
    st.sampled_from(t.METHODS),
    st.dictionaries(st.sampled_from([b"token", b"last", b"timeout", b"origin", b"\xff", b"x"]),
                    st.lists(query_values, min_size=1, max_size=2), max_size=4),
    st.dictionaries(st.sampled_from([b"origin", b"host", b"last-event-id", b"upgrade",
                                     b"connection", b"sec-websocket-key"]), header_values,
                    max_size=3),
    st.lists(st.sampled_from(["*", "http://127.0.0.1:8000", "http://["]), max_size=2),
)  # fmt: skip
@example("poll", b"GET", {b"token": [b"x"]}, {b"origin": b"http://[", b"host": b"h"}, [])
@example("iframe", b"GET", {b"token": [t.valid_token().encode()],
                            b"origin": [b"http://127.0.0.1:8000\n"]},
         {b"host": b"127.0.0.1:8000"}, [])  # fmt: skip
def test_http_resources(resource, method, args, headers, cors):
    t.check_http_request(resource, method, args, headers, cors)


def test_iframe_origin_with_a_final_newline_is_refused():
    # The origin pattern ended in "$", which also matches before a final "\n".
    args = {b"token": [t.valid_token().encode()], b"origin": [b"http://127.0.0.1:8000\n"]}
    response = t.http_exchange("iframe", b"GET", args, {b"host": b"127.0.0.1:8000"}, [])
    assert response.startswith(b"HTTP/1.1 403 ")
    args[b"origin"] = [b"http://127.0.0.1:8000"]
    response = t.http_exchange("iframe", b"GET", args, {b"host": b"127.0.0.1:8000"}, [])
    assert response.startswith(b"HTTP/1.0 200 ")  # close-delimited (protocol.md)


def test_head_on_ack_is_405_not_500():
    response = t.http_exchange("ack", b"HEAD", {}, {}, [])
    assert response.startswith(b"HTTP/1.1 405 ")


# -- The atheris targets, smoke-tested on a few raw inputs ---------------------------------


@settings(FUZZ, max_examples=max(20, FUZZ.max_examples // 10))
@given(st.sampled_from(sorted(t.TARGETS)), st.binary(max_size=300))
def test_atheris_targets_accept_any_bytes(name, data):
    t.TARGETS[name](data)


def test_every_atheris_target_is_described_and_its_seeds_pass():
    assert set(t.DESCRIPTIONS) == set(t.TARGETS) == set(t.SEEDS)
    for name, seeds in t.SEEDS.items():
        for seed in seeds:
            t.TARGETS[name](seed)


def test_orbit_long_ids_with_a_common_prefix_stay_two_events():
    # The scoped id was cut at 128 characters: the second request was a "resend".
    from twisted.internet.testing import StringTransport

    from orbited.node.legacy.orbit import OrbitProtocol

    hub = t._hub()
    proto = OrbitProtocol(hub)
    proto.makeConnection(StringTransport())
    for last in "12":
        proto.dataReceived(t.orbit_request("x" * 200 + last, [["u", "s", "/l"]], b"1", 0))
    assert hub.stats["duplicates"] == 0
    assert hub.stats["events"] == 2


@FUZZ
@given(json_values)
@example({"text": "</script><script>alert(1)</script>\u2028\u2029<!--\r\n"})
def test_frame_encodings(data):
    t.check_frame_encodings(data)
