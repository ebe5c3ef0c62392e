"""The built-in proxy's control channel: HaloD ↔ its proxy worker (sans-I/O).

One UNIX stream socket (``proxy/worker.sock`` beside HaloD's database, mode 600), each
message a 4-byte big-endian length then a JSON object with ``"v": 1`` and a ``"type"``
(docs/halod.md, "The built-in proxy"). Decoding checks every field and raises
``ProtocolError`` with a message; the Twisted ends close the connection on it.

worker → HaloD: ``hello`` (once, on connect: protocol version, pid, port layout, whether
the route ports are open, the last table seq applied), ``applied`` (a table is in force),
``stats`` (per-route connection counts: all routes on connect and after a table, else
only the routes whose counts changed; at least every second, so it doubles as the
worker's heartbeat) and ``error`` (e.g. a route port could not be opened; the worker
exits after it).

HaloD → worker: ``table`` (seq, the full route → owner map, ``close_delay``) and ``stop``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from halod.dataplane.base import Owner, Ports

VERSION = 1
# Largest control message either end accepts: a table for MAX_ROUTES (4096) routes with
# long host names is well under 1 MiB.
MAX_MESSAGE = 16 * 1024 * 1024

Counts = dict[int, tuple[int, int]]  # route → (browser connections, SP connections)


class ProtocolError(ValueError):
    """A control message that does not follow this module's format."""


@dataclass(frozen=True)
class Layout:
    """What a worker listens on: a HaloD re-attaches only to a worker with its own."""

    host: str
    browser_base: int
    sp_base: int
    routes: int

    @classmethod
    def of(cls, ports: Ports) -> Layout:
        return cls(ports.host, ports.browser_base, ports.sp_base, ports.routes)

    def ports(self) -> Ports:
        return Ports(self.host, self.browser_base, self.sp_base, self.routes)


@dataclass(frozen=True)
class Hello:
    pid: int
    layout: Layout
    listening: bool  # the route ports are open (a table was applied)
    seq: int  # the last table seq applied (0: none)
    version: int = VERSION


@dataclass(frozen=True)
class Applied:
    seq: int


@dataclass(frozen=True)
class Stats:
    full: bool  # counts holds every route (else only those that changed)
    counts: Counts
    refused: int  # totals since the worker started
    cut: int


@dataclass(frozen=True)
class Error:
    message: str


@dataclass(frozen=True)
class Table:
    seq: int
    owners: dict[int, Owner | None]
    close_delay: float


@dataclass(frozen=True)
class Stop:
    pass


Message = Hello | Applied | Stats | Error | Table | Stop


def moved(old: dict[int, Owner | None], new: dict[int, Owner | None], routes: int) -> list[int]:
    """Routes whose owner differs between two tables: their connections get cut."""
    return [r for r in range(1, routes + 1) if old.get(r) != new.get(r)]


# -- encoding ------------------------------------------------------------------------------


def _owner(owner: Owner | None) -> Any:
    if owner is None:
        return None
    return {"name": owner.name, "browser": list(owner.browser), "sp": list(owner.sp)}


def encode(message: Message) -> bytes:
    body: dict[str, Any]
    if isinstance(message, Hello):
        body = {"type": "hello", "pid": message.pid, "listening": message.listening,
                "seq": message.seq, "layout": vars(message.layout)}  # fmt: skip
        body["v"] = message.version
    elif isinstance(message, Applied):
        body = {"type": "applied", "seq": message.seq}
    elif isinstance(message, Stats):
        body = {"type": "stats", "full": message.full, "refused": message.refused,
                "cut": message.cut,
                "counts": {str(r): list(c) for r, c in sorted(message.counts.items())}}  # fmt: skip
    elif isinstance(message, Error):
        body = {"type": "error", "message": message.message}
    elif isinstance(message, Table):
        owners = {str(r): _owner(o) for r, o in sorted(message.owners.items())}
        body = {"type": "table", "seq": message.seq, "close_delay": message.close_delay,
                "owners": owners}  # fmt: skip
    elif isinstance(message, Stop):
        body = {"type": "stop"}
    else:  # pragma: no cover - the union is closed
        raise TypeError(message)
    body.setdefault("v", VERSION)
    return json.dumps(body, separators=(",", ":")).encode()


# -- decoding ------------------------------------------------------------------------------


def _int(body: dict[str, Any], name: str, low: int = 0, high: int = 2**63) -> int:
    value = body.get(name)
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError(f"{name} must be an integer in {low}..{high}")
    return value


def _addr(value: Any, what: str) -> tuple[str, int]:
    if (
        not isinstance(value, list) or len(value) != 2 or not isinstance(value[0], str)
        or not value[0] or type(value[1]) is not int or not 0 < value[1] < 65536
    ):  # fmt: skip
        raise ProtocolError(f"{what} must be [host, port]")
    return value[0], value[1]


def _route(key: str, routes: int | None) -> int:
    if not key.isdigit() or not 1 <= int(key) <= (routes or 2**31):
        raise ProtocolError(f"bad route {key!r}")
    return int(key)


def _decode_owner(value: Any, route: int) -> Owner | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ProtocolError(f"route {route}: owner must be null or {{name, browser, sp}}")
    return Owner(
        value["name"],
        _addr(value.get("browser"), f"route {route} browser"),
        _addr(value.get("sp"), f"route {route} sp"),
    )


def decode(data: bytes, routes: int | None = None) -> Message:
    """One control message; ``routes`` (when known) bounds the route numbers."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError("a message is a JSON object")
    kind = body.get("type")
    if kind == "hello":  # checked before the version: a worker of another version says hello
        layout = body.get("layout")
        if not isinstance(layout, dict) or not isinstance(layout.get("host"), str):
            raise ProtocolError("hello needs a layout")
        if not isinstance(body.get("listening"), bool):
            raise ProtocolError("hello.listening must be true or false")
        return Hello(
            pid=_int(body, "pid", 1),
            layout=Layout(
                layout["host"],
                _int(layout, "browser_base", 1, 65535),
                _int(layout, "sp_base", 1, 65535),
                _int(layout, "routes", 1),
            ),  # fmt: skip
            listening=body["listening"],
            seq=_int(body, "seq"),
            version=_int(body, "v"),
        )
    if body.get("v") != VERSION:
        raise ProtocolError(f"unsupported version {body.get('v')!r} (this end speaks {VERSION})")
    if kind == "applied":
        return Applied(_int(body, "seq", 1))
    if kind == "stats":
        counts = body.get("counts")
        if not isinstance(counts, dict) or not isinstance(body.get("full"), bool):
            raise ProtocolError("stats needs full and counts")
        parsed: Counts = {}
        for key, value in counts.items():
            if (
                not isinstance(value, list) or len(value) != 2
                or any(type(v) is not int or v < 0 for v in value)
            ):  # fmt: skip
                raise ProtocolError(f"stats: route {key} needs [browser, sp] counts")
            parsed[_route(key, routes)] = (value[0], value[1])
        return Stats(body["full"], parsed, _int(body, "refused"), _int(body, "cut"))
    if kind == "error":
        if not isinstance(body.get("message"), str):
            raise ProtocolError("error needs a message")
        return Error(body["message"])
    if kind == "table":
        owners = body.get("owners")
        delay = body.get("close_delay")
        if not isinstance(owners, dict):
            raise ProtocolError("table needs owners")
        if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay <= 86400:
            raise ProtocolError("table.close_delay must be 0..86400 seconds")
        table = {}
        for key, value in owners.items():
            route = _route(key, routes)
            table[route] = _decode_owner(value, route)
        return Table(_int(body, "seq", 1), table, float(delay))
    if kind == "stop":
        return Stop()
    raise ProtocolError(f"unknown message type {kind!r}")
