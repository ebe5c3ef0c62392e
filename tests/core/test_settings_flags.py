"""Config flags made from the config dataclasses (orbited/core/settings.py ``add_flags``):
each boolean has the one flag that changes its default, and every help shows the real
default, lists (``default_factory``) included."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

import pytest

from halod.config import HaloDConfig
from orbited.node.config import NodeConfig


@pytest.mark.parametrize("config", [HaloDConfig, NodeConfig])
def test_every_flag_says_its_real_default_and_a_boolean_flag_changes_it(config):
    parser = argparse.ArgumentParser()
    config.add_flags(parser)
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    for f in fields(config):
        action = flags[f.name]
        if f.default is MISSING:  # a list: repeated, its default from the factory
            assert f"(default: {f.default_factory()!r})" in action.help
            assert action.option_strings[0] + "s" == "--" + f.name.replace("_", "-")
        elif isinstance(f.default, bool):
            name = f.name.replace("_", "-")
            if f.default:
                assert action.option_strings == [f"--no-{name}"] and action.const is False
                assert action.help.startswith("turn off: ")
                assert action.help.endswith("(default: on)")
            else:
                assert action.option_strings == [f"--{name}"] and action.const is True
                assert action.help.startswith("turn on: ")
                assert action.help.endswith("(default: off)")
            assert vars(parser.parse_args([]))[f.name] is None  # unset: the config file decides
            assert vars(parser.parse_args(action.option_strings))[f.name] is (not f.default)
        else:
            assert action.help.endswith(f"(default: {f.default!r})")


def test_the_probe_flag_no_longer_reads_as_its_opposite():
    parser = argparse.ArgumentParser()
    HaloDConfig.add_flags(parser)
    (probe,) = [a for a in parser._actions if a.dest == "probe"]
    assert probe.help == (
        "turn off: probe a lost node's ports (so a dead one fails over at once) (default: on)"
    )
    etcd = [a for a in parser._actions if a.dest == "etcd_endpoints"][0]
    assert "(default: ['http://127.0.0.1:2379'])" in etcd.help
