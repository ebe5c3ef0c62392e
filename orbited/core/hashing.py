"""Share-nothing hashing (sans-I/O): which of N routes a connection key belongs to.

Any language can compute it (docs/hashing.md). Two versions exist; a cluster uses one:

- version 1: the key's three parts, each as a u32 big-endian byte length and its UTF-8
  bytes, are hashed with SHA-256;
- version 2 (user affinity, the default): only the user part is hashed, the same way,
  so every connection of a user has one route and one owner.

The first 8 bytes of the digest, read as an unsigned big-endian integer, modulo N, plus
1, is the route.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from orbited.core import speedups
from orbited.core.keys import ConnectionKey, Selector
from orbited.core.routes import DEFAULT_ROUTES, canonical

__all__ = [
    "DEFAULT_HASH_VERSION",
    "DEFAULT_ROUTES",
    "HASH_VERSIONS",
    "check_hash_version",
    "key_bytes",
    "route_of",
    "route_of_recipient",
    "route_of_user",
    "static_node",
    "user_bytes",
]

HASH_VERSIONS = (1, 2)
DEFAULT_HASH_VERSION = 2
WILDCARDS_NEED_V2 = "wildcards need hash_version 2"

_sha256 = hashlib.sha256
_pack = struct.Struct(">I").pack
# The version 2 route in C where orbited.core._speedups is built (a WebSocket accept
# hashes its user: 0.2 against 0.8 µs): an ASCII user's, the same number; None for any
# other user or routes, which the Python below decides (tests/core/test_speedups.py).
_native_user_route: Any = None if speedups.native is None else speedups.native.route_of_user


def check_hash_version(value: object) -> int:
    """``value`` if it is a hash version this release speaks (1 or 2), else ValueError."""
    if type(value) is not int or value not in HASH_VERSIONS:
        raise ValueError(f"hash_version must be 1 or 2, not {value!r}")
    return value


def key_bytes(key: ConnectionKey) -> bytes:
    """Version 1's hash input: every part, each as u32 BE length + UTF-8."""
    out = bytearray()
    for part in key:
        data = part.encode("utf-8")
        out += _pack(len(data)) + data
    return bytes(out)


def user_bytes(user: str) -> bytes:
    """Version 2's hash input: the user part only, as u32 BE length + UTF-8."""
    data = user.encode("utf-8")
    return _pack(len(data)) + data


def _route(data: bytes, routes: int) -> int:
    if routes < 1:
        raise ValueError("routes must be at least 1")
    return int.from_bytes(_sha256(data).digest()[:8], "big") % routes + 1


def route_of(
    key: ConnectionKey, routes: int = DEFAULT_ROUTES, version: int = DEFAULT_HASH_VERSION
) -> int:
    """The route (1..routes) of ``key`` under hash ``version``."""
    if version == 2:
        if _native_user_route is not None:
            route: int | None = _native_user_route(key[0], routes)
            if route is not None:
                return route
        return _route(user_bytes(key[0]), routes)
    if version == 1:
        return _route(key_bytes(key), routes)
    raise ValueError(f"hash_version must be 1 or 2, not {version!r}")


def route_of_user(user: str, routes: int = DEFAULT_ROUTES) -> int:
    """Version 2: the route of every key of ``user``."""
    if _native_user_route is not None:
        route: int | None = _native_user_route(user, routes)
        if route is not None:
            return route
    return _route(user_bytes(user), routes)


def route_of_recipient(
    recipient: ConnectionKey | Selector,
    routes: int = DEFAULT_ROUTES,
    version: int = DEFAULT_HASH_VERSION,
) -> int:
    """The route of an event request's recipient: a key, or a selector (a user's or a
    session's keys). A selector has one route only under version 2: under version 1 it
    raises ValueError("wildcards need hash_version 2")."""
    if type(recipient) is Selector:
        if version != 2:
            if version == 1:
                raise ValueError(WILDCARDS_NEED_V2)
            raise ValueError(f"hash_version must be 1 or 2, not {version!r}")
        return _route(user_bytes(recipient.user), routes)
    return route_of(recipient, routes, version)  # type: ignore[arg-type]


def static_node(route: int, nodes: int, routes: int = DEFAULT_ROUTES) -> int:
    """Without HaloD: the index (0-based) into a static list of ``nodes`` nodes that serves
    ``route`` — the same table HaloD would build for that many nodes (docs/halod.md)."""
    for node_id, held in canonical(routes, nodes).items():
        if route in held:
            return node_id - 1
    raise ValueError(f"route {route} is not in 1..{routes}")
