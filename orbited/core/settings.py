"""Settings shared by the node, HaloD and the web-app clients: the config base (a
dataclass whose fields are one TOML table's keys and the command's flags), the address
parsers and the loopback test. No Twisted.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import math
import tomllib
from dataclasses import MISSING, field, fields
from pathlib import Path
from typing import ClassVar, TypeVar


class ConfigError(ValueError):
    pass


class FieldError(ConfigError):
    """A component config's field is out of range: ``owner``'s ``field`` ``rule``, e.g.
    BrowserLimitsConfig's max_headers "must be positive". The node config names the key."""

    def __init__(self, owner: type[object], field: str, rule: str) -> None:
        super().__init__(f"{field} {rule}")
        self.owner = owner
        self.field = field
        self.rule = rule


def check_fields(
    config: object,
    positive: tuple[str, ...] = (),
    nonnegative: tuple[str, ...] = (),
    key_prefix: str = "",
) -> None:
    """A component config's own range check (call it from ``__post_init__``). With
    ``key_prefix`` the error names the config key, e.g. haproxy_ + retries."""
    for name in positive:
        if not getattr(config, name) > 0:
            raise FieldError(type(config), key_prefix + name, "must be positive")
    for name in nonnegative:
        if not getattr(config, name) >= 0:
            raise FieldError(type(config), key_prefix + name, "must not be negative")


T = TypeVar("T")


def opt(default: T, help: str) -> T:  # noqa: A002
    """A config field: its default (a list is copied per instance) and its flag's help."""
    if isinstance(default, list):  # a fresh copy per instance
        return field(default_factory=lambda: copy.copy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


C = TypeVar("C", bound="ConfigBase")


LOG_LEVELS = ["debug", "info", "warn", "error"]
# The tables a config file may hold: one file may serve both daemons.
SECTIONS = ("node", "halod")


class ConfigBase:
    """A dataclass whose fields are the keys of one TOML table (``section``) and flags.

    Each field is a TOML key and a flag (--field-name); its help is the flag's help.
    """

    section: ClassVar[str]

    @classmethod
    def load(cls: type[C], path: Path | None, overrides: dict[str, object]) -> C:
        values: dict[str, object] = {}
        if path is not None:
            try:
                doc = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise ConfigError(f"cannot read config {path}: {e}") from None
            # A misspelt table, or keys outside any, would otherwise drop the whole file
            # silently and run on the defaults (other ports, a fresh secret).
            stray = sorted(k for k, v in doc.items() if k not in SECTIONS or type(v) is not dict)
            if stray:
                raise ConfigError(
                    f"config {path}: {', '.join(stray)} is not a [node] or [halod] table "
                    "(every key goes under one)"
                )  # fmt: skip
            if cls.section not in doc:
                raise ConfigError(f"config {path} has no [{cls.section}] table")
            values.update(doc[cls.section])
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = values.keys() - known
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Types first (TOML and flags both end here); subclasses add their rules."""
        for f in fields(self):  # type: ignore[arg-type]
            value, default = getattr(self, f.name), f.default
            expected = type(default) if default is not MISSING else list
            ok = isinstance(value, expected) or (expected is float and isinstance(value, int))
            if not ok or isinstance(value, bool) != (expected is bool):
                raise ConfigError(f"{f.name} must be of type {expected.__name__}")
            if expected is list and not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{f.name} must be a list of strings")
            if expected is float and not math.isfinite(value):  # nan passes every x <= 0
                raise ConfigError(f"{f.name} must be a finite number, not {value}")
        if getattr(self, "log_level", LOG_LEVELS[1]) not in LOG_LEVELS:
            raise ConfigError("log_level is one of debug, info, warn, error")

    def require_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field: for a boolean the flag that changes its default (--no-x
        for one that is on, --x for one that is off), repeated --x for lists."""
        for f in fields(cls):  # type: ignore[arg-type]
            name = f.name.replace("_", "-")
            text = f.metadata["help"]
            if f.default is MISSING:  # a list (default_factory)
                parser.add_argument(
                    f"--{name}".removesuffix("s"), dest=f.name, action="append",
                    help=f"{text} (default: {f.default_factory()!r})",  # type: ignore[operator]
                )  # fmt: skip
            elif isinstance(f.default, bool):
                on = f.default
                parser.add_argument(
                    f"--no-{name}" if on else f"--{name}", dest=f.name,
                    action="store_const", const=not on,
                    help=f"turn {'off' if on else 'on'}: {text} (default: {'on' if on else 'off'})",
                )  # fmt: skip
            elif f.name == "log_level":
                parser.add_argument(
                    f"--{name}", choices=LOG_LEVELS, help=f"{text} (default: {f.default!r})"
                )
            else:
                parser.add_argument(
                    f"--{name}", type=type(f.default), help=f"{text} (default: {f.default!r})"
                )


def parse_host_port(text: str, key: str = "") -> tuple[str, int]:
    """``host:port`` (an empty host is 127.0.0.1); ConfigError, naming ``key`` when given
    (the config key the address came from), if it is not one."""
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
        raise ConfigError(f"{key}{': ' if key else ''}address {text!r} is not host:port")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def parse_sp_address(text: str, key: str = "") -> tuple[str, int]:
    """``tcp://host:port``, as ``parse_host_port``."""
    if not text.startswith("tcp://"):
        raise ConfigError(
            f"{key}{': ' if key else ''}SP address {text!r} must look like tcp://host:port"
        )
    return parse_host_port(text.removeprefix("tcp://"), key)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: assume it is reachable
