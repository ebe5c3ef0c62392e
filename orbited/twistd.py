"""``twistd orbited`` and ``twistd halod``: the node and HaloD as twistd plugins.

The dropin files (twisted/plugins/orbited_plugin.py, halod_plugin.py) only name the
service makers defined here. Each reuses its command's own flags (``orbited node``'s and
``halod run``'s argparse parsers) and config loading, so ``twistd -n orbited --config
node.toml`` takes exactly what ``orbited node --config node.toml`` takes; twistd then owns
daemonizing, the pid file, logging (``--logfile``, ``--syslog``) and the reactor
(docs/operations.md, "Under twistd").
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, IServiceMaker, MultiService
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer

from orbited.core.settings import ConfigBase, ConfigError


class ConfiguredOptions(usage.Options):
    """twistd's options object for a subcommand, parsed by the command's argparse parser:
    ``self["config"]`` is the loaded config, ``self["ready_file"]`` the ready file or None.
    ``--help`` prints the command's help; a bad flag or config exits 2 with the reason."""

    def __init__(self, prog: str, parser: Callable[[], argparse.ArgumentParser],
                 config_class: type[ConfigBase],
                 check: Callable[[Any], None] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.prog = prog
        self.make_parser = parser
        self.config_class = config_class
        self.check = check  # raises ConfigError for what twistd cannot run

    def parseOptions(self, options: list[str] | None = None) -> None:  # noqa: N802
        from orbited.runtime.daemon import load_config

        parser = self.make_parser()
        parser.prog = self.prog
        args = parser.parse_args(sys.argv[1:] if options is None else options)
        try:
            self["config"] = load_config(self.config_class, args)
            if self.check is not None:
                self.check(self["config"])
        except ConfigError as e:
            parser.error(str(e))
        self["ready_file"] = args.ready_file


@implementer(IServiceMaker, IPlugin)
class ServiceMaker:
    """One twistd plugin: ``tapname`` is the twistd subcommand."""

    def __init__(
        self, tapname: str, description: str, options: Callable[[], ConfiguredOptions],
        build: Callable[[Any], IService], ready: Callable[[Any], dict[str, object]],
        audit: Callable[[Any], list[str]],
    ) -> None:  # fmt: skip
        self.tapname = tapname
        self.description = description
        self.options = options
        self._build = build
        self._ready = ready
        self._audit = audit

    def makeService(self, options: ConfiguredOptions) -> IService:  # noqa: N802
        from orbited.runtime.daemon import ReadyFileService, log_audit
        from orbited.runtime.logs import quiet_factories

        quiet_factories()
        config = options["config"]
        log_audit(self.tapname, self._audit(config))
        service = self._build(config)
        if options["ready_file"] is None:
            return service
        top = MultiService()
        service.setServiceParent(top)
        ReadyFileService(options["ready_file"], lambda: self._ready(service)).setServiceParent(top)
        return top


def _node_options() -> ConfiguredOptions:
    from orbited.cli import _node_parser
    from orbited.node.config import NodeConfig

    return ConfiguredOptions("twistd orbited", _node_parser, NodeConfig, _one_node)


def _one_node(config: Any) -> None:
    """twistd runs one service per process: the worker parent of ``workers`` is
    ``orbited node``'s (docs/operations.md, "Workers"), so any other value is refused
    rather than silently ignored."""
    if config.workers != 1:
        raise ConfigError(
            "workers: twistd orbited runs one node per process; run one twistd per core "
            "(each with its own name and ports) or use `orbited node --workers`"
        )


def _build_node(config: Any) -> IService:
    from orbited.node.service import NodeService

    return NodeService(config)


def _node_ready(node: Any) -> dict[str, object]:
    from orbited.cli import node_ready

    return node_ready(node)


def _node_audit(config: Any) -> list[str]:
    from orbited.node.exposure import node_warnings

    return node_warnings(config)


def _halod_options() -> ConfiguredOptions:
    from halod.cli import _run_parser
    from halod.config import HaloDConfig

    return ConfiguredOptions("twistd halod", _run_parser, HaloDConfig)


def _build_halod(config: Any) -> IService:
    from halod.server import HaloDService

    return HaloDService(config)


def _halod_ready(daemon: Any) -> dict[str, object]:
    return {"control": daemon.control_address, "status": daemon.status_address}


def _halod_audit(config: Any) -> list[str]:
    from halod.exposure import halod_warnings

    return halod_warnings(config)


node_maker = ServiceMaker(
    "orbited", "An Orbited node (the flags of `orbited node --help`)",
    _node_options, _build_node, _node_ready, _node_audit,
)  # fmt: skip
halod_maker = ServiceMaker(
    "halod", "HaloD, Orbited's route table and load balancer (the flags of `halod run --help`)",
    _halod_options, _build_halod, _halod_ready, _halod_audit,
)  # fmt: skip
