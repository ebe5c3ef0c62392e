"""Start-up audit of exposed, unauthenticated listeners (orbited/node/exposure.py,
halod/exposure.py; docs/security.md)."""

from __future__ import annotations

import pytest

from halod.config import HaloDConfig
from halod.exposure import halod_warnings
from orbited.core.settings import is_loopback
from orbited.node.config import NodeConfig
from orbited.node.exposure import node_warnings
from tests.conftest import NodeProcess


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("", False), ("example.org", False)],
)  # fmt: skip
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_defaults_expose_nothing():
    assert node_warnings(NodeConfig()) == []
    assert halod_warnings(HaloDConfig()) == []


def test_node_ports_beyond_loopback_are_named():
    config = NodeConfig(
        sp="tcp://0.0.0.0:9000", orbit_legacy="10.0.0.5:9999", publish_http="0.0.0.0:8200",
        publish_key_file="k", halod="tcp://10.0.0.9:7600", cors_origins=["*"],
    )  # fmt: skip
    text = "\n".join(node_warnings(config))
    for name in ("SP port tcp://0.0.0.0:9000", "Orbit 1.0 port", "HTTP publish API 0.0.0.0:8200",
                 "no halod_secret_file", "cors_origins has '*'"):  # fmt: skip
        assert name in text
    # The browser port is meant to be public and is authenticated by tokens.
    assert node_warnings(NodeConfig(http="0.0.0.0:8000")) == []
    assert node_warnings(NodeConfig(halod="tcp://10.0.0.9:7600", halod_secret_file="s")) == []


def test_halod_ports_beyond_loopback_are_named():
    open_control = halod_warnings(HaloDConfig(control="tcp://0.0.0.0:7600"))
    assert len(open_control) == 1 and "no secret_file" in open_control[0]
    with_secret = halod_warnings(HaloDConfig(control="tcp://0.0.0.0:7600", secret_file="s"))
    assert len(with_secret) == 1 and "in clear" in with_secret[0]
    status = halod_warnings(HaloDConfig(status_http="0.0.0.0:7601"))
    assert len(status) == 1 and "drain nodes" in status[0]
    assert halod_warnings(HaloDConfig(status_http="")) == []
    routes = halod_warnings(HaloDConfig(dataplane_host="0.0.0.0"))
    assert len(routes) == 1 and "SP route ports (9100+)" in routes[0]
    assert halod_warnings(HaloDConfig(dataplane_host="0.0.0.0", dataplane="none")) == []


def test_a_running_node_logs_its_warnings(tmp_path):
    node = NodeProcess(tmp_path, "--cors-origin", "*").start()
    try:
        assert node.stop() == 0
    finally:
        if node.alive():
            node.stop(9)
    assert "exposed: cors_origins has '*'" in node.log_file.read_text()


def test_each_of_several_halod_addresses_is_checked():
    """``halod`` may list several control addresses (HaloD on etcd): loopback ones need
    no secret, and a routable one among them is named alone."""
    both_local = "tcp://127.0.0.1:7600,tcp://127.0.0.2:7610"
    assert node_warnings(NodeConfig(halod=both_local)) == []
    one_remote = "tcp://127.0.0.1:7600, tcp://10.0.0.9:7610"
    assert node_warnings(NodeConfig(halod=one_remote)) == [
        "HaloD tcp://10.0.0.9:7610 is not on loopback and no halod_secret_file is set"
    ]
