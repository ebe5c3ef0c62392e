"""Share-nothing hashing (sans-I/O): which of N routes a connection key belongs to.

Any language can compute it (docs/hashing.md): the key's three parts, each as a u32
big-endian byte length and its UTF-8 bytes, are hashed with SHA-256; the first 8 bytes
of the digest, read as an unsigned big-endian integer, modulo N, plus 1, is the route.
"""

from __future__ import annotations

import hashlib
import struct

from orbited.core.keys import ConnectionKey
from orbited.core.routes import DEFAULT_ROUTES, canonical

__all__ = ["DEFAULT_ROUTES", "key_bytes", "route_of", "static_node"]


def key_bytes(key: ConnectionKey) -> bytes:
    out = bytearray()
    for part in key:
        data = part.encode("utf-8")
        out += struct.pack(">I", len(data)) + data
    return bytes(out)


def route_of(key: ConnectionKey, routes: int = DEFAULT_ROUTES) -> int:
    """The route (1..routes) of ``key``."""
    if routes < 1:
        raise ValueError("routes must be at least 1")
    digest = hashlib.sha256(key_bytes(key)).digest()
    return int.from_bytes(digest[:8], "big") % routes + 1


def static_node(route: int, nodes: int, routes: int = DEFAULT_ROUTES) -> int:
    """Without HaloD: the index (0-based) into a static list of ``nodes`` nodes that serves
    ``route`` — the same table HaloD would build for that many nodes (docs/halod.md)."""
    for node_id, held in canonical(routes, nodes).items():
        if route in held:
            return node_id - 1
    raise ValueError(f"route {route} is not in 1..{routes}")
