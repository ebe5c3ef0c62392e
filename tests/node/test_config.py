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
        ({"hash_version": 3}, "hash_version must be 1 or 2"),
        ({"hash_version": 0}, "hash_version must be 1 or 2"),
        ({"user_max_connections": -1}, "user_max_connections must not be negative"),
        ({"user_limit_policy": "newest"}, "user_limit_policy must be refuse or close_oldest"),
        ({"user_rate": -1.0}, "user_rate must not be negative"),
        ({"user_burst": 0, "user_rate": 5.0}, "user_burst must be at least 1"),
        ({"user_burst": 0}, "user_burst must be at least 1"),
        ({"user_hold": -1.0}, "user_hold must not be negative"),
        ({"offline_url": "ftp://x/"}, "offline_url must be an http"),
        ({"offline_after": 0.0}, "offline_after must be positive"),
        ({"offline_after": 100.0, "max_offline_after": 50.0}, "offline_after must not exceed"),
        ({"offline_queue": 0}, "offline_queue must be positive"),
        ({"offline_batch": 0}, "offline_batch must be positive"),
        ({"offline_retries": 0}, "offline_retries must be positive"),
        ({"offline_timeout": 0.0}, "offline_timeout must be positive"),
        ({"offline_watches": 0}, "offline_watches must be positive"),
        ({"offline_backoff": -0.5}, "offline_backoff must not be negative"),
        # checked while presence is off too (no presence_url), like the offline_* keys
        ({"presence_queue": 0}, "presence_queue must be positive"),
        ({"presence_timeout": 0.0}, "presence_timeout must be positive"),
        ({"presence_retries": 0}, "presence_retries must be positive"),
        # nan passes every "x <= 0" check; inf every "positive" one
        ({"keepalive": float("nan")}, "keepalive must be a finite number, not nan"),
        ({"linger": float("inf")}, "linger must be a finite number, not inf"),
        ({"token_leeway": -1.0}, "token_leeway must not be negative"),
        ({"iframe_max_bytes": 0}, "iframe_max_bytes must be positive"),
        ({"backlog": 0}, "backlog must be positive"),
        ({"name": ""}, "name must be 1-64 characters"),
        ({"routes": 65537}, "routes must be at most 65536"),
    ],
)
def test_invalid_config_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        NodeConfig.load(None, overrides)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[nodes]\nmax_connections = 5\n", "nodes is not a \\[node\\] or \\[halod\\] table"),
        ("max_connections = 5\n", "max_connections is not a \\[node\\] or \\[halod\\] table"),
        ("[halod]\nroutes = 8\n", "has no \\[node\\] table"),
        ("keepalive = nan\n[node]\n", "keepalive is not a"),
    ],
)
def test_a_file_whose_keys_are_not_under_node_is_refused(tmp_path, text, message):
    """A misspelt table or keys outside one would drop the whole file: the node would run
    on its defaults (other ports, a fresh secret)."""
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        NodeConfig.load(path, {})


def test_one_file_may_hold_both_tables(tmp_path):
    path = tmp_path / "both.toml"
    path.write_text('[node]\nname = "n1"\n[halod]\nroutes = 8\n')
    assert NodeConfig.load(path, {}).name == "n1"


def test_nan_from_a_file_is_refused(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text("[node]\nkeepalive = nan\n")
    with pytest.raises(ConfigError, match="keepalive must be a finite number"):
        NodeConfig.load(path, {})


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


# Each default defined once: a node key that sets a component's field reads that
# component's default (orbited.node.config.COMPONENT_KEYS).


def _default(cls, name):
    from dataclasses import MISSING, fields

    (f,) = [f for f in fields(cls) if f.name == name]
    return f.default if f.default is not MISSING else f.default_factory()


@pytest.mark.parametrize(
    "key", sorted(__import__("orbited.node.config").node.config.COMPONENT_KEYS)
)
def test_a_component_key_defaults_to_the_components_default(key):
    from orbited.node.config import COMPONENT_KEYS

    owner, name = COMPONENT_KEYS[key]
    if owner.__name__ in ("PresenceConfig", "OfflineConfig") and name == "url":
        assert _default(NodeConfig, key) == ""  # required by the webhook; "" = off
        return
    assert _default(NodeConfig, key) == _default(owner, name), f"{key} vs {owner.__name__}.{name}"


# The issue-21 node keys whose default lives in a component: each must be a
# COMPONENT_KEYS row (so the tests above and below cover it).
ISSUE_21_COMPONENT_KEYS = {
    "hash_version": ("orbited.node.hub:HubConfig", "hash_version"),
    "user_max_connections": ("orbited.node.users:UserLimits", "max_connections"),
    "user_limit_policy": ("orbited.node.users:UserLimits", "policy"),
    "user_rate": ("orbited.node.users:UserLimits", "rate"),
    "user_burst": ("orbited.node.users:UserLimits", "burst"),
    "user_hold": ("orbited.node.users:UserLimits", "hold"),
    "offline_after": ("orbited.node.events:RequestLimits", "offline_after"),
    "max_offline_after": ("orbited.node.events:RequestLimits", "max_offline_after"),
    "offline_url": ("orbited.node.offline:OfflineConfig", "url"),
    "offline_queue": ("orbited.node.offline:OfflineConfig", "max_queue"),
    "offline_batch": ("orbited.node.offline:OfflineConfig", "batch"),
    "offline_timeout": ("orbited.node.offline:OfflineConfig", "timeout"),
    "offline_retries": ("orbited.node.offline:OfflineConfig", "retries"),
    "offline_backoff": ("orbited.node.offline:OfflineConfig", "backoff"),
    "offline_watches": ("orbited.node.offline:OfflineConfig", "watches"),
}


@pytest.mark.parametrize("key", sorted(ISSUE_21_COMPONENT_KEYS))
def test_an_issue_21_key_reads_its_default_from_its_component(key):
    import importlib

    from orbited.node.config import COMPONENT_KEYS

    where, name = ISSUE_21_COMPONENT_KEYS[key]
    module, cls_name = where.split(":")
    owner = getattr(importlib.import_module(module), cls_name)
    assert COMPONENT_KEYS.get(key) == (owner, name)


@pytest.mark.parametrize(
    "where, name, key, value",
    [
        ("orbited.node.hub:HubConfig", "linger", "linger", 7.5),
        ("orbited.node.offline:OfflineConfig", "max_queue", "offline_queue", 123),
        ("orbited.node.offline:OfflineConfig", "watches", "offline_watches", 456),
        ("orbited.node.offline:OfflineConfig", "backoff", "offline_backoff", 0.75),
        ("orbited.node.users:UserLimits", "hold", "user_hold", 12.5),
    ],
)
def test_a_component_default_change_shows_in_the_node_config(monkeypatch, where, name, key, value):
    """The node's default is read from the component when NodeConfig is defined: a module
    reloaded after the component's default changes gets the new value."""
    import importlib

    import orbited.node.config as node_config

    module, cls_name = where.split(":")
    owner = getattr(importlib.import_module(module), cls_name)
    monkeypatch.setattr(owner, name, value)
    try:
        reloaded = importlib.reload(node_config)
        assert getattr(reloaded.NodeConfig(), key) == value
    finally:
        monkeypatch.undo()
        importlib.reload(node_config)
    assert getattr(node_config.NodeConfig(), key) == _default(owner, name)


def test_every_component_key_reaches_its_component():
    """Distinct non-default values for every mapped key arrive in the built components."""
    from orbited.node.config import COMPONENT_KEYS

    values = {}
    for i, key in enumerate(sorted(COMPONENT_KEYS)):
        default = _default(NodeConfig, key)
        if isinstance(default, str):
            values[key] = "http://127.0.0.1:9/hook"
        elif isinstance(default, float):
            values[key] = default + 0.25 + i
        else:
            values[key] = default + 1 + i
    values["sp_max_message"] = 8 * 1024 * 1024  # room for max_payload plus headers
    values["mailbox_total_bytes"] = 1 << 30  # at least mailbox_bytes
    values["max_payload"] = 1024  # at most mailbox_bytes
    values["routes"] = 3  # at most MAX_ROUTES
    values["hash_version"] = 1  # 1 or 2; the default is 2
    values["user_limit_policy"] = "close_oldest"  # one of two; the default is refuse
    config = NodeConfig.load(None, values)
    hub = config.hub_config()
    built = {
        "HubConfig": hub,
        "MailboxLimits": hub.mailbox,
        "RequestLimits": hub.requests,
        "UserLimits": hub.users,
        "RepLimits": config.rep_limits(),
        "BrowserLimitsConfig": config.browser_limits(),
        "PresenceConfig": config.presence_config(),
        "OfflineConfig": config.offline_config(),
        "BrowserAuth": config.browser_auth(b"x" * 32),
    }
    for key, (owner, name) in COMPONENT_KEYS.items():
        assert getattr(built[owner.__name__], name) == values[key], key


def test_sp_max_message_default_is_the_rep_servers_and_documented():
    """The 1 MiB / 4 MiB drift (issue 18): one default, the documented 4 MiB."""
    from orbited.node.rep import RepLimits

    assert NodeConfig().sp_max_message == RepLimits().max_message == 4 * 1024 * 1024
    assert NodeConfig().rep_limits() == RepLimits()


def test_presence_is_off_without_a_url_and_its_limits_are_checked():
    assert NodeConfig().presence_config() is None
    with pytest.raises(ConfigError, match="presence_retries must be positive"):
        NodeConfig.load(None, {"presence_url": "http://127.0.0.1:9/", "presence_retries": 0})


def test_the_offline_hook_is_off_without_a_url_and_its_limits_are_checked():
    """offline_config() builds the watcher's settings from the offline_* keys; the
    component checks their ranges, also while the hook is off."""
    from orbited.node.offline import OfflineConfig

    assert NodeConfig().offline_config() is None
    config = NodeConfig.load(None, {"offline_url": "http://127.0.0.1:9/hook"})
    assert config.offline_config() == OfflineConfig("http://127.0.0.1:9/hook")
    with pytest.raises(ConfigError, match="offline_watches must be positive"):
        NodeConfig.load(None, {"offline_url": "http://127.0.0.1:9/", "offline_watches": 0})
    with pytest.raises(ConfigError, match="offline_retries must be positive"):
        NodeConfig.load(None, {"offline_retries": 0})


@pytest.mark.parametrize(
    "component, args, message",
    [
        ("orbited.node.mailbox:MailboxLimits", {"max_events": 0}, "max_events must be positive"),
        ("orbited.node.transports.limits:BrowserLimitsConfig", {"max_headers": 0},
         "max_headers must be positive"),
        ("orbited.node.transports.limits:BrowserLimitsConfig", {"connect_rate": -1.0},
         "connect_rate must not be negative"),
        ("orbited.node.transports.limits:BrowserLimitsConfig", {"max_write_queue": 1000},
         "max_write_queue must be at least 65536"),
        ("orbited.node.presence:PresenceConfig", {"url": "http://x/", "timeout": 0},
         "timeout must be positive"),
    ],
)  # fmt: skip
def test_components_check_their_own_ranges(component, args, message):
    import importlib

    module, name = component.split(":")
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(ValueError, match=message):
        cls(**args)


def _documented_defaults(section_title):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    section = text.split(f"### {section_title}\n", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `([a-z_0-9]+)` \| `([^`]*)`", section, re.M)
    return dict(rows)


def _as_documented(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[]" if not value else repr(value)
    if isinstance(value, str):
        return value or '""'
    return value


@pytest.mark.parametrize(
    "section, cls", [("Node configuration", "node"), ("HaloD configuration", "halod")]
)
def test_documented_defaults_are_the_codes(section, cls):
    import importlib
    from dataclasses import fields

    config_cls = NodeConfig
    if cls == "halod":
        config_cls = importlib.import_module("halod.config").HaloDConfig
    documented = _documented_defaults(section)
    wrong = []
    for f in fields(config_cls):
        if f.name not in documented:
            continue  # test_every_config_key_is_documented reports it
        doc, code = documented[f.name], _as_documented(_default(config_cls, f.name))
        same = float(doc) == code if isinstance(code, int | float) else doc == code
        if not same:
            wrong.append(f"{f.name}: docs {doc}, code {code}")
    assert wrong == []


def test_user_limits_reach_the_hub_and_zero_means_no_limit():
    config = NodeConfig.load(
        None, {"user_max_connections": 3, "user_limit_policy": "close_oldest",
               "user_rate": 2.5, "user_burst": 4, "user_hold": 0.0},
    )  # fmt: skip
    users = config.hub_config().users
    assert (users.max_connections, users.policy, users.rate, users.burst, users.hold) == (
        3, "close_oldest", 2.5, 4, 0.0)  # fmt: skip
    default = NodeConfig.load(None, {}).hub_config()
    assert default.users.max_connections == 0 and default.users.rate == 0
    assert default.hash_version == 2


@pytest.mark.parametrize("key", ["presence_url", "offline_url"])
def test_an_https_webhook_needs_twisteds_tls_support(monkeypatch, key):
    """Without pyOpenSSL (Twisted[tls], not an Orbited dependency) Twisted's Agent cannot
    POST to https:// at all: the node refuses such a URL at start instead of losing
    every notice (docs/security.md, "Webhooks")."""
    import twisted.web.client

    monkeypatch.setattr(twisted.web.client, "SSL", None)  # as without pyOpenSSL
    with pytest.raises(ConfigError, match=rf"{key} is https:// but Twisted's TLS support"):
        NodeConfig.load(None, {key: "https://127.0.0.1:9/hook"})
    assert getattr(NodeConfig.load(None, {key: "http://127.0.0.1:9/hook"}), key)
    monkeypatch.setattr(twisted.web.client, "SSL", object())  # as with it
    assert getattr(NodeConfig.load(None, {key: "https://127.0.0.1:9/hook"}), key)


def _toml_examples():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for doc in sorted((root / "docs").glob("*.md")) + [root / "README.md"]:
        for n, block in enumerate(re.findall(r"```toml\n(.*?)```", doc.read_text(), re.S)):
            yield pytest.param(block, id=f"{doc.name}#{n}")


@pytest.mark.parametrize("block", list(_toml_examples()))
def test_every_toml_example_in_the_docs_loads(block, tmp_path):
    """An operator copies these: each table of each example loads as it stands (paths it
    names need not exist; every value is checked)."""
    import tomllib

    from halod.config import HaloDConfig

    tables = tomllib.loads(block)
    assert tables.keys() & {"node", "halod"}, "an example with neither [node] nor [halod]"
    path = tmp_path / "example.toml"
    path.write_text(block)
    if "node" in tables:
        NodeConfig.load(path, {})
    if "halod" in tables:
        HaloDConfig.load(path, {})


@pytest.mark.parametrize(
    "cls, values, key",
    [
        ("node", {"http": "nope"}, "http"),
        ("node", {"sp": "garbage"}, "sp"),
        ("node", {"orbit_legacy": "x"}, "orbit_legacy"),
        ("node", {"publish_http": "127.0.0.1:port"}, "publish_http"),
        ("node", {"halod": "tcp://127.0.0.1:7600,127.0.0.1:7610"}, "halod"),
        ("node", {"advertise_http": "x"}, "advertise_http"),
        ("node", {"advertise_sp": "127.0.0.1:9001"}, "advertise_sp"),
        ("halod", {"control": "127.0.0.1:7600"}, "control"),
        ("halod", {"status_http": "x"}, "status_http"),
        ("halod", {"store": "etcd", "control_advertise": "garbage"}, "control_advertise"),
    ],
)
def test_a_bad_address_is_refused_with_its_key_named(cls, values, key):
    from halod.config import HaloDConfig

    config = NodeConfig if cls == "node" else HaloDConfig
    with pytest.raises(ConfigError, match=f"^{key}: "):
        config.load(None, values)


@pytest.mark.parametrize("name", ["", "<b>x</b>", "-n1", "n 1", "é", "a" * 65])
def test_a_name_halod_would_refuse_is_refused_at_start(name):
    """HaloD's register refuses a name outside 1-64 of [A-Za-z0-9._:@-] starting with a
    letter or digit (docs/halod-protocol.md): a node with one must not start and then be
    refused once a second for ever."""
    with pytest.raises(ConfigError, match="^name must be 1-64 characters"):
        NodeConfig.load(None, {"name": name})


def test_names_halod_accepts_are_taken():
    for name in ("n1", "a" * 64, "node-1.eu:west@2", "7"):
        assert NodeConfig.load(None, {"name": name}).name == name
