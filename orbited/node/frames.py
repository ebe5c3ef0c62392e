"""Browser frames: the JSON objects every transport carries (docs/protocol.md, "Frames").

Event payloads arrive already encoded (once per event), so an event frame is built by
splicing bytes instead of encoding the payload again for every recipient.

The functions below build a frame's bytes; the hub hands frames to a transport
(orbited.node.hub.Sink.deliver) as ``Frame`` objects, which also carry an event frame's
position (mailbox ``stream`` and ``seq``): the SSE transport writes its ``id:`` line
from them, not by reading the bytes again.
"""

from __future__ import annotations

import json
from typing import NamedTuple


class Frame(NamedTuple):
    """One frame as the hub hands it to a transport. ``data``: the frame's JSON bytes,
    exactly as the browser gets them. ``seq`` and ``stream``: an event frame's position
    in its mailbox (``<stream>:<seq>``, docs/protocol.md, "SSE"); None for other frames."""

    data: bytes
    seq: int | None = None
    stream: str | None = None


REPLACED = b'{"type":"replaced"}'  # a newer connection took this key: do not reconnect


def _encode(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def event_id(text: str) -> bytes:
    """An event request's id as the event frames carry it: encoded once per request and
    shared by every recipient's mailbox entry (docs/protocol.md, "Frames")."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return b'"%s"' % text.encode()  # nothing to escape: what json.dumps writes
    return _encode(text)


def event(
    seq: int, payload: bytes, eid: bytes | None = None, tag: bytes | None = None,
    replaced: int = 0,
) -> bytes:  # fmt: skip
    """``eid``: the request's id from event_id(); None (an event handed over by a node of
    the previous version) leaves it out. ``tag``: a latest-value event's tag, encoded
    once like ``eid`` (event_id() of the text); ``replaced``: how many events of that
    tag this one superseded, left out when 0 (docs/protocol.md, "Latest-value events")."""
    if tag is None:
        if eid is None:
            return b'{"type":"event","seq":%d,"data":%s}' % (seq, payload)
        return b'{"type":"event","seq":%d,"id":%s,"data":%s}' % (seq, eid, payload)
    head = b'{"type":"event","seq":%d' % seq
    if eid is not None:
        head += b',"id":%s' % eid
    head += b',"latest":%s' % tag
    if replaced:
        head += b',"replaced":%d' % replaced
    return head + b',"data":%s}' % payload


def whole_seconds(seconds: float) -> float:
    """``seconds`` as an int when it is a whole number (``25.0`` is written ``25``)."""
    if type(seconds) is float and seconds.is_integer() and abs(seconds) < 2**53:
        return int(seconds)
    return seconds


def hello(
    stream: str, keepalive: float, reset: bool, seq: int = 0, spread: float = 0.0,
    hash: int | None = None,
) -> bytes:  # fmt: skip
    """``seq``: the position in ``stream`` the events that follow start after (a fresh
    connection starts after what was acknowledged, not at 0: no false gap). ``spread``:
    seconds over which the browser should spread its first reconnect if it loses this
    node. ``hash``: the node's hash version (docs/hashing.md), which a node of this
    release always gives; None leaves it out (docs/protocol.md, "Frames").

    Built by formatting bytes for the node's own values (every attach sends one: each
    long-poll, each accept), byte-identical to the ``json.dumps`` below, which takes
    anything else (tests/node/test_frames.py compares the two over many values).
    A whole number of seconds is written as an integer (``"keepalive":25``, as
    docs/protocol.md shows it), whichever type the config gave it."""
    keepalive = whole_seconds(keepalive)
    if (
        (type(keepalive) is float or type(keepalive) is int)  # (a config's 30 is an int)
        and (type(spread) is float or type(spread) is int) and type(seq) is int
        and type(reset) is bool and (hash is None or type(hash) is int)
        and _FINITE_MIN <= keepalive <= _FINITE_MAX and _FINITE_MIN <= spread <= _FINITE_MAX
        and stream.isascii() and stream.isprintable() and '"' not in stream
        and "\\" not in stream
    ):  # fmt: skip
        # repr is what json writes for a finite float and for an int (bool: true/false).
        out = b'{"type":"hello","stream":"%s","keepalive":%r,"reset":%s,"seq":%d,"spread":%r' % (
            stream.encode(), keepalive, b"true" if reset else b"false", seq, spread,
        )  # fmt: skip
        return out + b"}" if hash is None else out + b',"hash":%d}' % hash
    frame: dict[str, object] = {
        "type": "hello", "stream": stream, "keepalive": keepalive, "reset": reset, "seq": seq,
        "spread": spread,
    }  # fmt: skip
    if hash is not None:
        frame["hash"] = hash
    return _encode(frame)


_FINITE_MAX = 1.7976931348623157e308  # the largest float: NaN and the infinities fail
_FINITE_MIN = -_FINITE_MAX


def ping(spread: float) -> bytes:
    """A keepalive frame, refreshing the reconnect ``spread`` hint of hello."""
    return b'{"type":"ping","spread":%s}' % _encode(spread)


def gap(first: int, last: int) -> bytes:
    return b'{"type":"gap","from":%d,"to":%d}' % (first, last)


def reconnect(reason: str, route: int | None = None, spread: float | None = None) -> bytes:
    """``route``: with reason ``rehash`` or ``route_moved``, the key's route now, so the
    browser can find its port; ``spread``: for a planned move, the reconnect spread hint
    counted over the browsers that move (docs/protocol.md, "Frames")."""
    frame: dict[str, object] = {"type": "reconnect", "reason": reason}
    if route is not None:
        frame["route"] = route
    if spread is not None:
        frame["spread"] = spread
    return _encode(frame)


def closed(code: int, reason: str) -> bytes:
    """The end of an HTTP transport for good (the WebSocket close ``code`` as a frame):
    4429 ``user_limit``, 4003 ``displaced``. The browser does not reconnect."""
    return _encode({"type": "closed", "code": code, "reason": reason})


USER_LIMIT = 4429  # close code: the user has user_max_connections already (refuse policy)
DISPLACED = 4003  # close code: closed for a newer connection of the user (close_oldest)
