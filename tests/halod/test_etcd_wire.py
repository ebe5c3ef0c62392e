"""The etcd JSON gateway's messages (halod.etcd.wire): encoders and decoders, no I/O.

Reply bodies here are copied from etcd 3.4.23's gateway (tests/etcd_cluster.py's cluster,
queried with curl)."""

import base64

import pytest

from halod.etcd import wire


def b(s):
    return base64.b64encode(s).decode()


HEADER = {
    "cluster_id": "17466389560512348456",
    "member_id": "8975032517622519398",
    "revision": "2",
    "raft_term": "2",
}


def test_range_request_and_reply():
    assert wire.range_request(b"/t/", b"/t0", 7) == {
        "key": b(b"/t/"),
        "range_end": b(b"/t0"),
        "revision": "7",
    }
    reply = {
        "header": HEADER,
        "kvs": [
            {
                "key": "L3QvYQ==",
                "create_revision": "2",
                "mod_revision": "2",
                "version": "1",
                "value": "aGk=",
            }
        ],
        "count": "1",
    }
    assert wire.decode_range(reply) == wire.RangeResult(
        2, (wire.KeyValue(b"/t/a", b"hi", 2, 2, 1, 0),)
    )
    assert wire.decode_range({"header": HEADER}) == wire.RangeResult(2, ())


def test_prefix_end():
    assert wire.prefix_end(b"/orbited/") == b"/orbited0"
    assert wire.prefix_end(b"a\xff") == b"b"
    assert wire.prefix_end(b"\xff") == b"\0"


def test_txn_request_encodes_compares_and_ops():
    body = wire.txn_request(
        [
            wire.Compare(b"/l", wire.Target.CREATE, 0),
            wire.Compare(b"/l", wire.Target.LEASE, 42),
            wire.Compare(b"/v", wire.Target.VALUE, b"x", wire.Result.NOT_EQUAL),
        ],
        [wire.Put(b"/l", b"me", lease=42), wire.Delete(b"/r/", b"/r0")],
        [wire.Get(b"/l")],
    )
    assert body["compare"] == [
        {"key": b(b"/l"), "target": "CREATE", "result": "EQUAL", "create_revision": "0"},
        {"key": b(b"/l"), "target": "LEASE", "result": "EQUAL", "lease": "42"},
        {"key": b(b"/v"), "target": "VALUE", "result": "NOT_EQUAL", "value": b(b"x")},
    ]
    assert body["success"] == [
        {"request_put": {"key": b(b"/l"), "value": b(b"me"), "lease": "42"}},
        {"request_delete_range": {"key": b(b"/r/"), "range_end": b(b"/r0")}},
    ]
    assert body["failure"] == [{"request_range": {"key": b(b"/l")}}]
    with pytest.raises(TypeError):
        wire.txn_request([wire.Compare(b"/l", wire.Target.LEASE, b"1")], [])


def test_txn_reply_failed_is_the_absent_succeeded_field():
    reply = {
        "header": HEADER,
        "responses": [
            {
                "response_range": {
                    "header": {"revision": "2"},
                    "kvs": [
                        {
                            "key": "L3QvYQ==",
                            "create_revision": "2",
                            "mod_revision": "2",
                            "version": "1",
                            "value": "aGk=",
                            "lease": "9",
                        }
                    ],
                    "count": "1",
                }
            }
        ],
    }
    result = wire.decode_txn(reply)
    assert not result.succeeded and result.revision == 2
    assert result.ranges[0].kvs[0].lease == 9
    ok = wire.decode_txn(
        {
            "header": {**HEADER, "revision": "3"},
            "succeeded": True,
            "responses": [{"response_put": {"header": {"revision": "3"}}}],
        }
    )
    assert ok == wire.TxnResult(True, 3, ())


def test_leases():
    assert wire.decode_lease(
        {"header": HEADER, "ID": "6225841972150543112", "TTL": "2"}
    ) == wire.Lease(6225841972150543112, 2)
    # a keepalive of a lease that is gone: TTL left out
    assert wire.decode_lease({"result": {"header": HEADER, "ID": "123"}}) == wire.Lease(123, 0)
    with pytest.raises(wire.ProtocolError):
        wire.decode_lease({"header": HEADER})


def test_errors_become_etcd_errors():
    with pytest.raises(wire.EtcdError) as e:
        wire.decode_range(
            {
                "error": "etcdserver: mvcc: required revision has been compacted",
                "message": "etcdserver: mvcc: required revision has been compacted",
                "code": 11,
            }
        )
    assert e.value.code == wire.COMPACTED
    with pytest.raises(wire.EtcdError) as e:  # in a stream
        wire.decode_watch(
            {
                "error": {
                    "grpc_code": 14,
                    "http_code": 503,
                    "message": "no leader",
                    "http_status": "Service Unavailable",
                    "code": 14,
                }
            }
        )
    assert e.value.code == 14 and "no leader" in str(e.value)


@pytest.mark.parametrize(
    "body", [[], "x", {"kvs": "nope"}, {"kvs": [{"key": "***"}]}, {"header": {"revision": "x"}}]
)
def test_malformed_replies_are_protocol_errors(body):
    with pytest.raises(wire.ProtocolError):
        wire.decode_range(body)


def test_watch_messages():
    created = {"result": {"header": HEADER, "created": True}}
    assert wire.decode_watch(created) == wire.WatchMessage(2, created=True)
    events = {
        "result": {
            "header": {**HEADER, "revision": "3"},
            "events": [
                {
                    "kv": {
                        "key": "L3QvYQ==",
                        "create_revision": "2",
                        "mod_revision": "2",
                        "version": "1",
                        "value": "aGk=",
                    }
                },
                {"type": "DELETE", "kv": {"key": "L3QvYQ==", "mod_revision": "3"}},
            ],
        }
    }
    message = wire.decode_watch(events)
    assert [e.type for e in message.events] == [wire.EventType.PUT, wire.EventType.DELETE]
    assert message.events[1].kv == wire.KeyValue(b"/t/a", b"", 0, 3, 0, 0)
    compacted = {
        "result": {"header": {"raft_term": "2"}, "canceled": True, "compact_revision": "3"}
    }
    m = wire.decode_watch(compacted)
    assert m.canceled and m.compact_revision == 3
    with pytest.raises(wire.ProtocolError):
        wire.decode_watch({"result": {"events": [{"type": "MOVE", "kv": {}}]}})


def test_line_buffer_splits_across_chunks():
    buf = wire.LineBuffer(limit=100)
    assert buf.feed(b'{"a": 1}\n{"b"') == [{"a": 1}]
    assert buf.feed(b": 2}\n\n") == [{"b": 2}]
    with pytest.raises(wire.ProtocolError):
        buf.feed(b"x" * 101)
    with pytest.raises(wire.ProtocolError):
        wire.LineBuffer().feed(b"not json\n")


def test_watch_request():
    assert wire.watch_request(b"/p/", b"/p0", 5) == {
        "create_request": {"key": b(b"/p/"), "range_end": b(b"/p0"), "start_revision": "5"}
    }
