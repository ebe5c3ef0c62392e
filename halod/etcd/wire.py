"""etcd 3.4's JSON gateway (grpc-gateway over the v3 API): request bodies and decoded replies.

Pure functions and frozen values, no I/O. Keys and values travel base64-encoded; 64-bit
integers travel as JSON strings; fields at their zero value (``succeeded: false``, a PUT
event's type, revision 0) are left out by the gateway, so every decoder defaults them.
A reply carrying ``error``/``code`` becomes :class:`EtcdError`; a body that is not what the
API documents becomes :class:`ProtocolError` (never a KeyError deep in a caller).
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

JSON = dict[str, Any]


class EtcdError(Exception):
    """etcd refused a request (``code`` is the gRPC status: 11 = compacted, 5 = lease not found)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"etcd error {code}: {message}")
        self.code = code
        self.message = message


class ProtocolError(Exception):
    """A reply that is not a gateway message of the expected shape."""


COMPACTED = 11  # gRPC OUT_OF_RANGE: "required revision has been compacted"
NOT_FOUND = 5  # gRPC NOT_FOUND: e.g. "requested lease not found"
UNAVAILABLE = 14  # gRPC UNAVAILABLE: "leader changed", "no leader", "request timed out"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError(f"expected base64 text, got {text!r}")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise ProtocolError(f"bad base64 {text!r}: {e}") from None


def _int(body: Mapping[str, Any], name: str) -> int:
    value = body.get(name, 0)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ProtocolError(f"{name}: not an integer: {value!r}") from None


def _obj(body: object, what: str) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise ProtocolError(f"{what}: expected an object, got {body!r}")
    return body


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that selects every key starting with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"  # every key
    return stripped[:-1] + bytes([stripped[-1] + 1])


def check(body: object) -> Mapping[str, Any]:
    """``body`` as an object, or raise the EtcdError it carries."""
    obj = _obj(body, "reply")
    if "error" in obj or ("code" in obj and "message" in obj):
        err = obj["error"]
        if isinstance(err, Mapping):  # streams wrap the status: {"error": {...}}
            obj, err = err, err.get("message", "")
        raise EtcdError(_int(obj, "code"), str(obj.get("message") or err))
    return obj


# -- values ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    lease: int = 0


@dataclass(frozen=True)
class RangeResult:
    revision: int  # the store's revision when the range was served
    kvs: tuple[KeyValue, ...]


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    ranges: tuple[RangeResult, ...]  # the range operations' results, in order


@dataclass(frozen=True)
class Lease:
    id: int
    ttl: int  # seconds; 0 from a keepalive means the lease is gone


class Target(enum.Enum):
    CREATE = "create_revision"
    MOD = "mod_revision"
    VERSION = "version"
    VALUE = "value"
    LEASE = "lease"


class Result(enum.Enum):
    EQUAL = "EQUAL"
    NOT_EQUAL = "NOT_EQUAL"
    GREATER = "GREATER"
    LESS = "LESS"


@dataclass(frozen=True)
class Compare:
    key: bytes
    target: Target
    value: int | bytes
    result: Result = Result.EQUAL


@dataclass(frozen=True)
class Put:
    key: bytes
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: bytes
    range_end: bytes | None = None


@dataclass(frozen=True)
class Get:
    key: bytes
    range_end: bytes | None = None


Op = Put | Delete | Get


class EventType(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True)
class Event:
    type: EventType
    kv: KeyValue


@dataclass(frozen=True)
class WatchMessage:
    """One message of a watch stream."""

    revision: int
    watch_id: int = 0
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0  # > 0: the start revision was compacted; resync from a range
    events: tuple[Event, ...] = ()


# -- requests --------------------------------------------------------------------------


def range_request(key: bytes, range_end: bytes | None = None, revision: int = 0) -> JSON:
    body: JSON = {"key": b64(key)}
    if range_end is not None:
        body["range_end"] = b64(range_end)
    if revision:
        body["revision"] = str(revision)
    return body


def _op(op: Op) -> JSON:
    if isinstance(op, Put):
        put: JSON = {"key": b64(op.key), "value": b64(op.value)}
        if op.lease:
            put["lease"] = str(op.lease)
        return {"request_put": put}
    if isinstance(op, Delete):
        return {"request_delete_range": range_request(op.key, op.range_end)}
    return {"request_range": range_request(op.key, op.range_end)}


def _compare(c: Compare) -> JSON:
    if c.target is Target.VALUE:
        if not isinstance(c.value, bytes):
            raise TypeError("a VALUE comparison takes bytes")
        value: str = b64(c.value)
    else:
        if not isinstance(c.value, int):
            raise TypeError(f"a {c.target.name} comparison takes an int")
        value = str(c.value)
    return {"key": b64(c.key), "target": c.target.name, "result": c.result.value,
            c.target.value: value}  # fmt: skip


def txn_request(compare: Sequence[Compare], success: Sequence[Op],
                failure: Sequence[Op] = ()) -> JSON:  # fmt: skip
    return {"compare": [_compare(c) for c in compare], "success": [_op(o) for o in success],
            "failure": [_op(o) for o in failure]}  # fmt: skip


def lease_grant_request(ttl: int) -> JSON:
    return {"TTL": str(ttl)}


def lease_id_request(lease: int) -> JSON:
    """The body of /v3/lease/keepalive and /v3/lease/revoke."""
    return {"ID": str(lease)}


def watch_request(key: bytes, range_end: bytes | None, start_revision: int) -> JSON:
    create: JSON = range_request(key, range_end)
    if start_revision:
        create["start_revision"] = str(start_revision)
    return {"create_request": create}


# -- replies ---------------------------------------------------------------------------


def _revision(body: Mapping[str, Any]) -> int:
    return _int(_obj(body.get("header", {}), "header"), "revision")


def decode_kv(body: object) -> KeyValue:
    kv = _obj(body, "kv")
    return KeyValue(unb64(kv.get("key", "")), unb64(kv.get("value", "")),
                    _int(kv, "create_revision"), _int(kv, "mod_revision"),
                    _int(kv, "version"), _int(kv, "lease"))  # fmt: skip


def decode_range(body: object) -> RangeResult:
    obj = check(body)
    kvs = obj.get("kvs", [])
    if not isinstance(kvs, list):
        raise ProtocolError(f"kvs: expected a list, got {kvs!r}")
    return RangeResult(_revision(obj), tuple(decode_kv(kv) for kv in kvs))


def decode_txn(body: object) -> TxnResult:
    obj = check(body)
    responses = obj.get("responses", [])
    if not isinstance(responses, list):
        raise ProtocolError(f"responses: expected a list, got {responses!r}")
    ranges = tuple(
        decode_range(_obj(r, "response")["response_range"])
        for r in responses
        if "response_range" in _obj(r, "response")
    )
    return TxnResult(bool(obj.get("succeeded", False)), _revision(obj), ranges)


def decode_lease(body: object) -> Lease:
    """A grant reply, or one keepalive result (``{"result": {...}}``)."""
    obj = check(body)
    if "result" in obj:
        obj = check(obj["result"])
    if "ID" not in obj:
        raise ProtocolError(f"not a lease reply: {obj!r}")
    return Lease(_int(obj, "ID"), _int(obj, "TTL"))


def decode_watch(body: object) -> WatchMessage:
    obj = check(body)
    result = check(obj.get("result"))
    events = result.get("events", [])
    if not isinstance(events, list):
        raise ProtocolError(f"events: expected a list, got {events!r}")
    decoded = []
    for e in events:
        ev = _obj(e, "event")
        try:
            kind = EventType(ev.get("type", "PUT"))
        except ValueError:
            raise ProtocolError(f"unknown event type {ev.get('type')!r}") from None
        decoded.append(Event(kind, decode_kv(ev.get("kv"))))
    return WatchMessage(_revision(result), _int(result, "watch_id"),
                        bool(result.get("created", False)), bool(result.get("canceled", False)),
                        _int(result, "compact_revision"), tuple(decoded))  # fmt: skip


class LineBuffer:
    """Splits a gateway stream (one JSON object per line) into decoded objects."""

    def __init__(self, limit: int = 64 << 20) -> None:
        self._buf = b""
        self.limit = limit

    def feed(self, data: bytes) -> list[object]:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        if len(self._buf) > self.limit:
            raise ProtocolError(f"a stream message over {self.limit} bytes")
        out = []
        for line in lines:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as e:
                    raise ProtocolError(f"not JSON: {line[:80]!r}: {e}") from None
        return out
