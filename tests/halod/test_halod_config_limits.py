"""HaloD configuration limits that protect the control link (docs/operations.md)."""

from __future__ import annotations

import pytest

from halod.config import HaloDConfig
from orbited.core.control import MAX_MESSAGE
from orbited.core.settings import ConfigError


def test_control_max_message_below_what_nodes_send_is_refused() -> None:
    """A node sends hand-off chunks of about 256 KiB and trace replies of up to
    MAX_MESSAGE / 2: a smaller limit would make HaloD abort ordinary messages."""
    HaloDConfig(control_max_message=MAX_MESSAGE).validate()
    HaloDConfig(control_max_message=4 * MAX_MESSAGE).validate()
    with pytest.raises(ConfigError, match=f"control_max_message must be at least {MAX_MESSAGE}"):
        HaloDConfig(control_max_message=MAX_MESSAGE - 1).validate()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"heartbeat_interval": float("nan")}, "heartbeat_interval must be a finite number"),
        ({"grace": float("inf")}, "grace must be a finite number"),
        ({"db": ""}, "db must name the SQLite file"),
        ({"store": "etcd", "etcd_endpoints": ["http://127.0.0.1:2379"], "etcd_lease_ttl": 0},
         "etcd_lease_ttl"),
        ({"store": "etcd", "etcd_endpoints": ["http://127.0.0.1:2379,http://127.0.0.1:2380"]},
         "etcd_endpoints: .* repeat --etcd-endpoint"),  # (was a bare "Port could not be cast")
    ],
)  # fmt: skip
def test_meaningless_values_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        HaloDConfig.load(None, overrides)


def test_a_file_without_a_halod_table_is_refused(tmp_path) -> None:
    path = tmp_path / "halod.toml"
    path.write_text('control = "tcp://127.0.0.1:7600"\n')
    with pytest.raises(ConfigError, match="control is not a \\[node\\] or \\[halod\\] table"):
        HaloDConfig.load(path, {})


@pytest.mark.parametrize("dataplane", ["proxy", "haproxy"])
@pytest.mark.parametrize("host", ["", "not an address", "127.0.1.99999", "localhost", " 127.0.0.1"])
def test_dataplane_host_must_be_an_ip_literal(dataplane: str, host: str, tmp_path) -> None:
    """An empty dataplane_host used to bind every interface silently, and a name or typo
    was accepted (HAProxy then failed to start forever; the proxy exited 1 without naming
    the key): docs/operations.md, "HaloD configuration"."""
    overrides = {"dataplane": dataplane, "dataplane_host": host, "haproxy_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match="dataplane_host must be an IP address"):
        HaloDConfig.load(None, overrides)


@pytest.mark.parametrize("dataplane", ["proxy", "haproxy", "nftables"])
@pytest.mark.parametrize("host", ["224.0.0.18", "255.255.255.255", "ff02::1"])
def test_dataplane_host_must_be_unicast(dataplane: str, host: str, tmp_path) -> None:
    # An audit: 224.0.0.18 and 255.255.255.255 were accepted and HaloD ran, serving no one.
    if dataplane == "nftables" and ":" in host:
        return  # (nftables refuses IPv6 first)
    overrides = {"dataplane": dataplane, "dataplane_host": host, "haproxy_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match=f"dataplane_host must be a unicast address, not {host}"):
        HaloDConfig.load(None, overrides)


@pytest.mark.parametrize("dataplane", ["proxy", "haproxy"])
@pytest.mark.parametrize("host", ["127.0.1.50", "0.0.0.0", "::1", "::"])
def test_dataplane_host_ip_literals_are_accepted(dataplane: str, host: str, tmp_path) -> None:
    overrides = {"dataplane": dataplane, "dataplane_host": host, "haproxy_dir": str(tmp_path)}
    assert HaloDConfig.load(None, overrides).dataplane_host == host


def test_dataplane_none_ignores_dataplane_host() -> None:
    HaloDConfig.load(None, {"dataplane": "none", "dataplane_host": ""})


@pytest.mark.parametrize("dataplane", ["proxy", "haproxy"])
def test_halod_run_refuses_a_bad_dataplane_host_with_exit_2(dataplane: str, tmp_path) -> None:
    import subprocess
    import sys

    # (Only a value that cannot bind: before the check an empty one bound 0.0.0.0.)
    done = subprocess.run(
        [sys.executable, "-m", "halod.cli", "run", "--db", str(tmp_path / "x.db"),
         "--control", "tcp://127.0.1.50:0", "--status-http", "", "--proxy-on-exit", "stop",
         "--haproxy-dir", str(tmp_path / "hap"), "--haproxy-on-exit", "stop",
         "--dataplane", dataplane, "--dataplane-host", "not an address",
         "--browser-port-base", "31650", "--sp-port-base", "31750", "--routes", "2"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "dataplane_host must be an IP address (IPv4 or IPv6, not a name)" in done.stderr
