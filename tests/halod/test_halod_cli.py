"""``halod plan``: text, JSON and SVG views of the canonical progression."""

import json
import xml.etree.ElementTree as ET

import pytest

from halod.cli import main
from tests.core.test_halod_routes import NOTE_24


def test_text_is_the_note_progression(capsys):
    assert main(["plan", "--routes", "24", "--nodes", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == NOTE_24
    assert lines[0].startswith("1 node ") and lines[1].startswith("2 nodes")


def test_json_lists_one_mapping_per_node_count(capsys):
    assert main(["plan", "--routes", "24", "--nodes", "3", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan[2] == {
        "1": list(range(1, 9)),
        "2": list(range(13, 21)),
        "3": [9, 10, 11, 12, 21, 22, 23, 24],
    }
    assert [len(step) for step in plan] == [1, 2, 3]


def test_svg_draws_every_route_of_every_row(tmp_path, capsys):
    path = tmp_path / "plan.svg"
    assert main(["plan", "--routes", "24", "--nodes", "8", "--svg", str(path)]) == 0
    root = ET.fromstring(path.read_text())
    rects = root.findall("{http://www.w3.org/2000/svg}rect")
    assert len(rects) == 24 * 8
    assert rects[0].find("{http://www.w3.org/2000/svg}title").text == "route 1: node 1"


def test_bad_arguments(capsys):
    assert main(["plan", "--routes", "4", "--nodes", "5"]) == 2
    assert "--nodes must be from 1 to --routes" in capsys.readouterr().err
    for routes in ("65537", "0"):  # HaloD itself refuses more than 65536 routes
        assert main(["plan", "--routes", routes, "--nodes", "1"]) == 2
        assert "--routes must be from 1 to 65536" in capsys.readouterr().err


def test_run_refuses_bad_configuration(tmp_path):
    import subprocess
    import sys

    for flags, message in (
        (["--policy", "random"], "policy is one of seed, minimal"),
        (["--grace", "0"], "grace must be positive"),
        (["--control", "127.0.0.1:7600"], "must look like tcp://host:port"),
        (["--routes", "65537", "--dataplane", "none"], "routes must be at most 65536"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "halod.cli", "run", "--db", str(tmp_path / "x.db"), *flags],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.returncode == 2 and message in done.stderr


def test_restart_with_another_route_count_is_refused(tmp_path):
    import subprocess
    import sys

    from halod.membership import Membership, Timing
    from halod.store import Store
    from orbited.core.routes import RouteTable

    Store(tmp_path / "h.db").save(Membership(RouteTable(24), Timing()).snapshot())
    done = subprocess.run(
        [sys.executable, "-m", "halod.cli", "run", "--db", str(tmp_path / "h.db"),
         "--routes", "48", "--control", "tcp://127.0.0.1:0", "--status-http", ""],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2 and "routes are fixed for the life of a cluster" in done.stderr


# -- commands: listed in --help, a typo is an error with a suggestion (as `orbited`) --------

HALOD_COMMANDS = ("run", "status", "plan", "drain", "undrain", "rehash")


def halod(*args, **kwargs):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "halod.cli", *args], capture_output=True,
                          text=True, timeout=30, **kwargs)  # fmt: skip


def test_help_lists_every_command(capsys):
    for flag in ("--help", "-h", "help"):
        assert main([flag]) == 0
        out = capsys.readouterr().out
        commands = out.split("commands:", 1)[1]
        listed = [line.split()[0] for line in commands.splitlines() if line.startswith("  ")]
        assert listed == list(HALOD_COMMANDS)
        assert "halod COMMAND --help" in out
    assert main(["help", "plan"]) == 0
    assert "usage: halod plan" in capsys.readouterr().out


def test_an_unknown_command_is_an_error_with_a_suggestion(capsys):
    for argv, suggestion in ((["stauts"], "status"), (["plna", "--nodes", "2"], "plan"),
                             (["drian", "n1"], "drain"), (["frobnicate"], None)):  # fmt: skip
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert f"halod: unknown command {argv[0]!r}" in captured.err
        if suggestion:
            assert f"did you mean {suggestion!r}?" in captured.err
        else:
            assert "did you mean" not in captured.err
        assert "commands: " + ", ".join(HALOD_COMMANDS) in captured.err


def test_unknown_command_in_a_real_process_exits_2_without_run_help():
    done = halod("trace", "--help")
    assert done.returncode == 2 and "unknown command 'trace'" in done.stderr
    assert "--heartbeat-interval" not in done.stdout + done.stderr


def test_flags_without_a_command_still_run_halod(tmp_path):
    import json
    import subprocess
    import sys
    import time

    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "halod.cli", "--db", str(tmp_path / "h.db"), "--control",
         "tcp://127.0.0.1:0", "--status-http", "127.0.0.1:0", "--dataplane", "none",
         "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None and json.loads(ready.read_text())["control"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_halod_config_defaults_are_its_components():
    """Each default defined once: HaloD's keys read membership's Timing, the prober's
    ProbeSettings, HAProxy's Settings and the route count of orbited.core.routes."""
    from dataclasses import fields

    from halod.config import HaloDConfig
    from halod.dataplane.haproxy import HAProxyDataPlane, Settings
    from halod.liveness import ProbeSettings
    from halod.membership import Timing
    from orbited.core.routes import DEFAULT_ROUTES

    config = HaloDConfig()
    timing = config.timing()
    assert (timing.heartbeat_interval, timing.missed_heartbeats, timing.grace) == (
        Timing.heartbeat_interval, Timing.missed_heartbeats, Timing.grace)  # fmt: skip
    assert timing.probe == ProbeSettings()
    settings = config.haproxy_settings()
    for f in fields(Settings):
        if f.name not in ("ports", "directory"):
            assert getattr(settings, f.name) == f.default, f.name
    assert config.haproxy_stats_interval == HAProxyDataPlane.STATS_INTERVAL
    assert config.routes == DEFAULT_ROUTES


def test_halod_haproxy_ranges_are_checked_by_haproxy_settings():
    from halod.config import HaloDConfig
    from orbited.core.settings import ConfigError

    for bad, message in [
        ({"haproxy_maxconn": 0}, "haproxy_maxconn must be positive"),
        ({"haproxy_nbthread": -1}, "haproxy_nbthread must not be negative"),
        ({"haproxy_connect_timeout": 0.0}, "haproxy_connect_timeout must be positive"),
    ]:
        with pytest.raises(ConfigError, match=message):
            HaloDConfig.load(None, {"dataplane": "haproxy", **bad})


def test_halod_control_and_move_defaults_are_defined_once():
    from halod.config import HaloDConfig
    from halod.dataplane.base import MOVE_CLOSE_DELAY
    from orbited.core.control import MAX_MESSAGE

    config = HaloDConfig()
    assert config.control_max_message == MAX_MESSAGE  # what the node's link accepts
    assert config.move_close_delay == MOVE_CLOSE_DELAY  # the data planes' own default


def test_a_control_port_in_use_is_one_clear_line_and_no_traceback(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = halod(
            "run", "--db", str(tmp_path / "h.db"), "--control", f"tcp://127.0.0.1:{port}",
            "--status-http", "", "--dataplane", "none",
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"halod: cannot start: Couldn't listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
