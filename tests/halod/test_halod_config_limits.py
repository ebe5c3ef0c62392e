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
