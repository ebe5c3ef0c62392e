"""Rebuild docs/hashing-vectors.json, the share-nothing hashing test vectors.

    .venv/bin/python docs/gen_hash_vectors.py           # write the file
    .venv/bin/python docs/gen_hash_vectors.py --check   # exit 1 if the file differs

The routes are computed here from the formulas of docs/hashing.md with hashlib alone,
not with orbited.core.hashing, so the file checks the implementations rather than
repeating them. Version 1's vectors ("vectors") are the ones published with version 1
and must never change; version 2's ("v2") were added with user affinity.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path

PATH = Path(__file__).resolve().parent / "hashing-vectors.json"
ROUTES = (1, 2, 3, 24, 1024, 4096)

V1_DESCRIPTION = (
    "Share-nothing hashing test vectors (docs/hashing.md): route = SHA-256(key bytes)[0:8]"
    " as u64 big-endian mod N + 1; key bytes = for user, session, location: u32 BE UTF-8"
    " length + UTF-8 bytes."
)
V1_KEYS = [
    ("alice", "s1", "/chat"),
    ("bob", "s1", "/chat"),
    ("alice", "s2", "/chat"),
    ("alice", "s1", "/other"),
    ("alice", "", ""),
    ("a", "", ""),
    ("0", "0", "/"),
    ("michael", "123", "/event"),
    ("ünïcødé", "séssion", "/ćhat"),
    ("用户", "会话", "/聊天"),
    ("emoji 🚀", "s", "/l"),
    ("x" * 256, "y" * 256, "z" * 256),
    ("user with spaces", "", ""),
    ('"quoted"', "'single'", "<tag>"),
    ("ab", "c", ""),
    ("a", "bc", ""),
    ("abc", "", ""),
    ("1", "2", "3"),
    ("user@example.com", "sess-42", "/app/room/7"),
    ("tab", "\t", "\n"),
    ("carol", "9f86d081", "/cherrychat"),
    ("dave", "", "/cherrychat"),
]

V2_DESCRIPTION = (
    "Version 2 (user affinity, docs/hashing.md): route = SHA-256(user bytes)[0:8] as u64"
    " big-endian mod N + 1; user bytes = u32 BE UTF-8 length of the user + its UTF-8"
    " bytes. Session and location are not hashed: every key listed for a user has the"
    " user's route."
)
# Each user with two keys of different sessions and locations (they share the route).
V2_USERS = [
    ("alice", [("alice", "s1", "/chat"), ("alice", "", "")]),
    ("bob", [("bob", "s1", "/chat"), ("bob", "s2", "/other")]),
    ("carol", [("carol", "9f86d081", "/cherrychat"), ("carol", "tab-2", "/cherrychat")]),
    ("dave", [("dave", "", "/cherrychat"), ("dave", "phone", "/")]),
    ("a", [("a", "", ""), ("a", "bc", "")]),
    ("ab", [("ab", "c", ""), ("ab", "", "c")]),
    ("abc", [("abc", "", ""), ("abc", "1", "2")]),
    ("0", [("0", "0", "/"), ("0", "1", "/")]),
    ("1", [("1", "2", "3"), ("1", "", "")]),
    ("michael", [("michael", "123", "/event"), ("michael", "124", "/event")]),
    ("é", [("é", "s", "/l"), ("é", "t", "/m")]),
    ("ünïcødé", [("ünïcødé", "séssion", "/ćhat"), ("ünïcødé", "", "")]),
    ("用户", [("用户", "会话", "/聊天"), ("用户", "s", "/")]),
    ("emoji 🚀", [("emoji 🚀", "s", "/l"), ("emoji 🚀", "🚀", "/🚀")]),
    ("user with spaces", [("user with spaces", "", ""), ("user with spaces", " ", " ")]),
    ('"quoted"', [('"quoted"', "'single'", "<tag>"), ('"quoted"', "", "")]),
    (
        "user@example.com",
        [("user@example.com", "sess-42", "/app/room/7"), ("user@example.com", "sess-43", "/app")],
    ),  # fmt: skip
    ("tab\t", [("tab\t", "\t", "\n"), ("tab\t", "", "")]),
    ("s*", [("s*", "s*", "/*"), ("s*", "", "")]),  # "*" inside a part is no wildcard
    ("a" * 64, [("a" * 64, "s", "/l"), ("a" * 64, "", "")]),
    ("x" * 256, [("x" * 256, "y" * 256, "z" * 256), ("x" * 256, "", "")]),  # 256 bytes
    ("é" * 128, [("é" * 128, "s", "/l"), ("é" * 128, "", "")]),  # 256 bytes of UTF-8
    ("Alice", [("Alice", "s1", "/chat"), ("Alice", "", "")]),  # case matters
]


def _lp(part: str) -> bytes:
    data = part.encode("utf-8")
    return struct.pack(">I", len(data)) + data


def _routes(data: bytes) -> dict[str, int]:
    n = int.from_bytes(hashlib.sha256(data).digest()[:8], "big")
    return {str(r): n % r + 1 for r in ROUTES}


def build() -> dict[str, object]:
    v1 = []
    for key in V1_KEYS:
        data = b"".join(_lp(part) for part in key)
        v1.append({"key": list(key), "key_bytes_hex": data.hex(), "routes": _routes(data)})
    v2 = []
    for user, keys in V2_USERS:
        assert all(k[0] == user for k in keys) and len({k[1:] for k in keys}) == len(keys)
        data = _lp(user)
        v2.append({"user": user, "user_bytes_hex": data.hex(),
                   "keys": [list(k) for k in keys], "routes": _routes(data)})  # fmt: skip
    return {
        "description": V1_DESCRIPTION,
        "vectors": v1,
        "v2": {"description": V2_DESCRIPTION, "vectors": v2},
    }


def render() -> str:
    return json.dumps(build(), indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild docs/hashing-vectors.json.")
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if PATH.read_text(encoding="utf-8") != text:
            print(f"{PATH} is not what {Path(__file__).name} builds", file=sys.stderr)
            return 1
        return 0
    PATH.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
