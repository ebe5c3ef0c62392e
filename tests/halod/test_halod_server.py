"""HaloD's status port Host check (halod/server.py ``host_allowed``; docs/security.md)."""

from __future__ import annotations

import pytest

from halod.server import host_allowed

NAMES = frozenset({"halod.internal"})


@pytest.mark.parametrize(
    "host",
    [None, b"127.0.0.1:7601", b"10.0.0.5", b"[::1]:7601", b"localhost:7601", b"LOCALHOST.",
     b"halod.internal:7601", b"HALOD.internal."],
)  # fmt: skip
def test_ip_literals_localhost_and_configured_names_pass(host):
    assert host_allowed(host, NAMES)


@pytest.mark.parametrize(
    "host",
    [b"rebind.evil.example:7601", b"evil.example", b"127.0.0.1.evil.example",
     b"localhost.evil.example:80", b"[::1", b"\xff", b"", b"halod.internal.evil:1"],
)  # fmt: skip
def test_other_names_are_refused(host):
    assert not host_allowed(host, NAMES)
