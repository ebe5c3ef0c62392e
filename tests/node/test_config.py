"""Node configuration: TOML file, flag overrides, validation (docs/operations.md)."""

import pytest

from orbited.cli import main
from orbited.core.settings import ConfigError
from orbited.node.config import NodeConfig


def test_file_then_flags(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('[node]\nname = "n1"\nlinger = 12\ncors_origins = ["https://a.test"]\n')
    config = NodeConfig.load(path, {"linger": 3.0, "http": None})
    assert (config.name, config.linger, config.http) == ("n1", 3.0, "127.0.0.1:8000")
    assert config.cors_origins == ["https://a.test"]
    assert config.hub_config().linger == 3.0


def test_defaults_bind_loopback():
    config = NodeConfig.load(None, {})
    assert config.http.startswith("127.0.0.1:") and config.sp.startswith("tcp://127.0.0.1:")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"bogus": 1}, "unknown config keys: bogus"),
        ({"http": "nohost"}, "not host:port"),
        ({"http": "127.0.0.1:²"}, "not host:port"),  # a digit to isdigit(), not to int()
        ({"sp": "ipc:///tmp/x"}, "tcp://host:port"),
        ({"max_payload": 10, "mailbox_bytes": 5}, "max_payload"),
        ({"linger": 0}, "linger must be positive"),
        ({"log_level": "loud"}, "log_level"),
        ({"linger": "soon"}, "linger must be of type float"),
        ({"create_secret": 1}, "create_secret must be of type bool"),
        ({"mailbox_events": True}, "mailbox_events must be of type int"),
        ({"cors_origins": [1]}, "cors_origins must be a list of strings"),
        ({"dedup_max": 0}, "dedup_max must be positive"),
        ({"max_client_message": 0}, "max_client_message must be positive"),
        ({"max_request_line": -1}, "max_request_line must be positive"),
        ({"max_header_bytes": 0}, "max_header_bytes must be positive"),
        ({"max_headers": 0}, "max_headers must be positive"),
    ],
)
def test_invalid_config_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        NodeConfig.load(None, overrides)


def test_bad_toml_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[node\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        NodeConfig.load(path, {})


def test_every_config_key_is_a_flag(tmp_path, capsys):
    from orbited.cli import _node_parser

    args = _node_parser().parse_args(
        [
            "--dedup-max-bytes",
            "5",
            "--sp-max-inflight",
            "3",
            "--cors-origin",
            "a",
            "--cors-origin",
            "b",
            "--no-create-secret",
            "--token-leeway",
            "1.5",
        ]
    )
    assert (args.dedup_max_bytes, args.sp_max_inflight, args.cors_origins) == (5, 3, ["a", "b"])
    assert args.create_secret is False and args.token_leeway == 1.5


def test_cli_reports_config_errors(capsys):
    assert main(["node", "--http", "nohost"]) == 2
    assert "not host:port" in capsys.readouterr().err


def test_cli_token_needs_a_secret(tmp_path, capsys):
    assert main(["token", "--secret-file", str(tmp_path / "missing"), "--user", "a"]) == 2
    assert "orbited token:" in capsys.readouterr().err


def test_every_config_key_is_documented():
    from dataclasses import fields
    from pathlib import Path

    from halod.config import HaloDConfig
    from orbited.node.config import NodeConfig

    text = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    for cls in (NodeConfig, HaloDConfig):
        missing = [f.name for f in fields(cls) if f"| `{f.name}` |" not in text]
        assert missing == [], f"{cls.__name__} keys not in docs/operations.md: {missing}"


def test_reconnect_rate_is_a_config_key_passed_to_the_hub():
    """The spread hint's rate (docs/protocol.md, "The reconnect spread hint"): a flag and
    TOML key, ≥ 0 (0 = no spreading), its default the hub's own."""
    from orbited.cli import _node_parser
    from orbited.node.hub import HubConfig

    assert NodeConfig.load(None, {}).hub_config().reconnect_rate == HubConfig().reconnect_rate
    args = _node_parser().parse_args(["--reconnect-rate", "250"])
    config = NodeConfig.load(None, {"reconnect_rate": args.reconnect_rate})
    assert config.hub_config().reconnect_rate == 250.0
    assert NodeConfig.load(None, {"reconnect_rate": 0}).hub_config().reconnect_rate == 0
    with pytest.raises(ConfigError, match="reconnect_rate must not be negative"):
        NodeConfig.load(None, {"reconnect_rate": -1.0})
