"""Share-nothing hashing against the published vectors (docs/hashing.md)."""

import hashlib
import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from orbited.core.hashing import (
    DEFAULT_HASH_VERSION,
    HASH_VERSIONS,
    check_hash_version,
    key_bytes,
    route_of,
    route_of_recipient,
    route_of_user,
    user_bytes,
)
from orbited.core.keys import ConnectionKey, Selector

DOCS = Path(__file__).resolve().parents[2] / "docs"
FILE = json.loads((DOCS / "hashing-vectors.json").read_text(encoding="utf-8"))
VECTORS = FILE["vectors"]  # version 1
V2_VECTORS = FILE["v2"]["vectors"]


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
        assert route_of(key, int(routes), version=1) == expected


def test_there_are_enough_v2_vectors():
    assert len(V2_VECTORS) >= 20
    assert len({v["user"] for v in V2_VECTORS}) == len(V2_VECTORS)


@pytest.mark.parametrize("vector", V2_VECTORS, ids=lambda v: repr(v["user"])[:30])
def test_v2_vector(vector):
    user = vector["user"]
    assert user_bytes(user).hex() == vector["user_bytes_hex"]
    # The spec's formula, spelled out independently of orbited.core.hashing.
    digest = hashlib.sha256(bytes.fromhex(vector["user_bytes_hex"])).digest()
    assert len(vector["keys"]) >= 2
    assert len({tuple(k[1:]) for k in vector["keys"]}) == len(vector["keys"])
    for routes, expected in vector["routes"].items():
        assert int.from_bytes(digest[:8], "big") % int(routes) + 1 == expected
        assert route_of_user(user, int(routes)) == expected
        for key in vector["keys"]:
            assert key[0] == user
            assert route_of(ConnectionKey(*key), int(routes), version=2) == expected
            assert route_of(ConnectionKey(*key), int(routes)) == expected  # the default


def test_the_vector_file_is_what_the_generator_builds():
    """docs/gen_hash_vectors.py rebuilds the file; version 1's vectors never change."""
    spec = importlib.util.spec_from_file_location("gen_hash_vectors", DOCS / "gen_hash_vectors.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.render() == (DOCS / "hashing-vectors.json").read_text(encoding="utf-8")
    assert gen.main(["--check"]) == 0


def test_the_worked_examples_of_the_doc():
    text = (DOCS / "hashing.md").read_text(encoding="utf-8")
    key = ConnectionKey("alice", "s1", "/chat")
    assert key_bytes(key).hex() in text and route_of(key, 24, version=1) == 17
    assert user_bytes("alice").hex() == "00000005616c696365"
    assert "user bytes `00000005616c696365` → route 11 of 24, 219 of 1024" in text
    assert route_of_user("alice", 24) == 11 and route_of_user("alice", 1024) == 219


def test_version_2_hashes_the_user_only():
    a, b = ConnectionKey("alice", "s1", "/chat"), ConnectionKey("alice", "other", "/x")
    assert route_of(a, 4096, 2) == route_of(b, 4096, 2) == route_of_user("alice", 4096)
    assert route_of(a, 4096, 1) != route_of(b, 4096, 1)
    assert route_of_user("alice", 4096) != route_of_user("Alice", 4096)  # no case folding
    # The length prefix is there in version 2 too: not SHA-256 of the bare UTF-8.
    bare = hashlib.sha256(b"alice").digest()
    assert user_bytes("alice") == b"\x00\x00\x00\x05alice"
    assert route_of_user("alice", 2**31) != int.from_bytes(bare[:8], "big") % 2**31 + 1


def test_the_default_version_is_2():
    assert DEFAULT_HASH_VERSION == 2 and HASH_VERSIONS == (1, 2)
    key = ConnectionKey("bob", "s", "/l")
    assert route_of(key) == route_of(key, 24, 2) == route_of_user("bob")


def test_route_of_recipient():
    key = ConnectionKey("carol", "s", "/l")
    assert route_of_recipient(key, 24, 1) == route_of(key, 24, 1)
    assert route_of_recipient(key, 24, 2) == route_of_user("carol", 24)
    for selector in (Selector("carol", None), Selector("carol", "s")):
        assert route_of_recipient(selector, 24, 2) == route_of_user("carol", 24)
        assert route_of_recipient(selector, 24) == route_of_user("carol", 24)
        with pytest.raises(ValueError, match="^wildcards need hash_version 2$"):
            route_of_recipient(selector, 24, 1)


@pytest.mark.parametrize("bad", [0, 3, -1, True, "2", 2.0, None])
def test_unknown_versions_are_refused(bad):
    with pytest.raises(ValueError, match="hash_version must be 1 or 2"):
        check_hash_version(bad)
    if type(bad) is int:
        with pytest.raises(ValueError, match="hash_version must be 1 or 2"):
            route_of(ConnectionKey("a", "", ""), 24, bad)
        with pytest.raises(ValueError, match="hash_version must be 1 or 2"):
            route_of_recipient(Selector("a", None), 24, bad)


def test_check_hash_version_accepts_1_and_2():
    assert check_hash_version(1) == 1 and check_hash_version(2) == 2


def test_routes_must_be_positive():
    for version in (1, 2):
        with pytest.raises(ValueError, match="routes must be at least 1"):
            route_of(ConnectionKey("a", "", ""), 0, version)
    with pytest.raises(ValueError, match="routes must be at least 1"):
        route_of_user("a", 0)


def test_part_boundaries_matter():
    assert route_of(ConnectionKey("ab", "c", ""), 4096, version=1) != route_of(
        ConnectionKey("a", "bc", ""), 4096, version=1
    )


@pytest.mark.parametrize("version", [1, 2])
def test_routes_are_spread_evenly(version):
    counts = Counter(
        route_of(ConnectionKey(f"user{i}", "s", "/l"), version=version) for i in range(24_000)
    )
    assert set(counts) == set(range(1, 25))
    assert max(counts.values()) < 1.15 * 1000 and min(counts.values()) > 0.85 * 1000


def test_static_cluster_uses_the_halod_table():
    # 3 nodes, 24 routes: 1-8 || 13-20 || 9-12,21-24 (docs/halod.md)
    from orbited.core.hashing import static_node

    owners = [static_node(r, 3) for r in range(1, 25)]
    assert owners == [0] * 8 + [2] * 4 + [1] * 8 + [2] * 4
    with pytest.raises(ValueError):
        static_node(25, 3)
