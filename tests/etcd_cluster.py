"""A real etcd cluster on loopback for tests (Debian's ``etcd-server``, /usr/bin/etcd).

``etcd_cluster`` (a pytest fixture) starts 3 members (halod.etcd.local.EtcdCluster) on free
127.0.0.1 ports, each with its own data directory under ``tmp_path``, waits until every
member answers ``/health``, and kills them all at teardown (no process or port is left
behind). Tests may ``kill(i)`` a member with SIGKILL and read etcd's revision history
(``history(prefix)``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from halod.etcd.local import ETCD, EtcdCluster

__all__ = ["EtcdCluster", "etcd_cluster"]


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    if not os.access(ETCD, os.X_OK):
        pytest.skip("etcd-server is not installed (./dev test installs it as root)")
    cluster = EtcdCluster(tmp_path)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
