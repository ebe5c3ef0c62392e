"""Share-nothing hashing against the published vectors (docs/hashing.md)."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from orbited.core.hashing import key_bytes, route_of
from orbited.core.keys import ConnectionKey

VECTORS = json.loads(
    (Path(__file__).resolve().parents[2] / "docs" / "hashing-vectors.json").read_text()
)["vectors"]


def test_there_are_enough_vectors():
    assert len(VECTORS) >= 20


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: repr(v["key"])[:30])
def test_vector(vector):
    key = ConnectionKey(*vector["key"])
    assert key_bytes(key).hex() == vector["key_bytes_hex"]
    # The spec's formula, spelled out independently of orbited.core.hashing.
    digest = hashlib.sha256(bytes.fromhex(vector["key_bytes_hex"])).digest()
    for routes, expected in vector["routes"].items():
        assert int.from_bytes(digest[:8], "big") % int(routes) + 1 == expected
        assert route_of(key, int(routes)) == expected


def test_part_boundaries_matter():
    assert route_of(ConnectionKey("ab", "c", ""), 4096) != route_of(
        ConnectionKey("a", "bc", ""), 4096
    )


def test_routes_are_spread_evenly():
    counts = Counter(route_of(ConnectionKey(f"user{i}", "s", "/l")) for i in range(24_000))
    assert set(counts) == set(range(1, 25))
    assert max(counts.values()) < 1.15 * 1000 and min(counts.values()) > 0.85 * 1000


def test_static_cluster_uses_the_halod_table():
    # 3 nodes, 24 routes: 1-8 || 13-20 || 9-12,21-24 (docs/halod.md)
    from orbited.core.hashing import static_node

    owners = [static_node(r, 3) for r in range(1, 25)]
    assert owners == [0] * 8 + [2] * 4 + [1] * 8 + [2] * 4
    with pytest.raises(ValueError):
        static_node(25, 3)
