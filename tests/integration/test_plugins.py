"""``twistd orbited`` and ``twistd halod`` (twisted/plugins/): found from the editable
install and from a wheel, run as real processes under twistd, and fed real traffic."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pynng
import pytest

from orbited.core.keys import ConnectionKey
from orbited.core.tokens import issue_token
from tests.conftest import SECRET, DaemonProcess, send_event, wait_for

ROOT = Path(__file__).resolve().parents[2]
TWISTD = Path(sys.executable).parent / "twistd"


class Twistd(DaemonProcess):
    """``twistd -n <plugin> ...`` in the foreground, its pid file in its own folder."""

    def __init__(self, tmp: Path, name: str) -> None:
        self.tmp = tmp
        self.ready_file = tmp / f"{name}-ready.json"
        self.log_file = tmp / f"{name}.log"

    def start(self, plugin: str, *flags: str) -> dict:
        return self.spawn([str(TWISTD), "-n", "--pidfile", str(self.tmp / f"{plugin}.pid"),
                           plugin, "--ready-file", str(self.ready_file), *flags])  # fmt: skip


def twistd(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(TWISTD), *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env=env)  # fmt: skip


def test_twistd_lists_both_plugins_from_any_directory(tmp_path):
    done = twistd("--help", cwd=tmp_path)  # not the checkout: found through the install
    assert done.returncode == 0, done.stderr
    names = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("    ")]
    assert "orbited" in names and "halod" in names


def test_plugin_help_is_the_commands_help(tmp_path):
    done = twistd("orbited", "--help", cwd=tmp_path)
    assert done.returncode == 0
    assert "usage: twistd orbited" in done.stdout and "--max-payload" in done.stdout
    done = twistd("halod", "--help", cwd=tmp_path)
    assert done.returncode == 0
    assert "usage: twistd halod" in done.stdout and "--missed-heartbeats" in done.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["orbited", "--bogus"], "unrecognized arguments: --bogus"),
        (["orbited", "--linger", "0"], "linger must be positive"),
        (["halod", "--routes", "0"], "routes"),
        (["orbited", "--workers", "2"], "workers: twistd orbited runs one node per process"),
    ],
)
def test_bad_flags_are_refused_before_anything_starts(tmp_path, args, message):
    done = twistd("-n", "--pidfile", str(tmp_path / "x.pid"), *args, cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert not (tmp_path / "x.pid").exists()


@pytest.mark.slow
def test_twistd_runs_halod_and_a_node_that_carries_an_event(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    halod, node = Twistd(tmp_path, "halod"), Twistd(tmp_path, "node")
    try:
        ready = halod.start("halod", "--db", str(tmp_path / "halod.sqlite3"),
                            "--control", "tcp://127.0.0.1:0", "--status-http", "127.0.0.1:0",
                            "--dataplane", "none", "--spares", "0")  # fmt: skip
        status_url = f"http://{ready['status']}/status"
        node_ready = node.start("orbited", "--name", "tw1", "--http", "127.0.0.2:0",
                                "--sp", "tcp://127.0.0.2:0", "--secret-file", str(secret),
                                "--no-create-secret", "--halod", ready["control"])  # fmt: skip
        assert node_ready["pid"] == node.proc.pid  # twistd -n: the process itself

        def status() -> dict:
            with urllib.request.urlopen(status_url, timeout=5) as r:
                return {n["name"]: n for n in json.loads(r.read())["nodes"]}

        wait_for(lambda: status().get("tw1", {}).get("state") == "active", "tw1 active")
        # A browser's mailbox (long-poll), an event over SP, the browser gets it.
        key = ConnectionKey("alice", "s", "/t")
        poll = (f"http://{node_ready['http']}/orbited/poll?token="
                f"{issue_token(SECRET, key, 60)}")  # fmt: skip
        with urllib.request.urlopen(poll + "&timeout=0", timeout=5) as r:
            stream = json.loads(r.read())[0]["stream"]
        with pynng.Req0(dial=node_ready["sp"], recv_timeout=5000, send_timeout=5000) as req:
            reply = send_event(req, "tw-1", [list(key)], {"text": "hi"})
        assert reply["results"] == [{"status": "queued", "seq": 1}]
        with urllib.request.urlopen(f"{poll}&last={stream}:0", timeout=5) as r:
            assert json.loads(r.read())[1] == {"type": "event", "seq": 1, "id": "tw-1",
                                                "data": {"text": "hi"}}  # fmt: skip
        assert status()["tw1"]["ranges"] == "1-24"  # HaloD gave it every route
        # twistd stops the service, then exits by the same signal (Twisted's convention).
        assert node.stop(signal.SIGTERM) == -signal.SIGTERM
        assert halod.stop(signal.SIGTERM) == -signal.SIGTERM
    finally:
        for proc in (node, halod):
            if proc.alive():
                proc.stop(signal.SIGKILL)
    node_log = node.log_file.read_text()
    assert "node tw1 epoch" in node_log  # our service's lines reach twistd's log
    for log in (node_log, halod.log_file.read_text()):
        assert "Starting factory" not in log and "Stopping factory" not in log


@pytest.mark.slow
def test_a_wheel_installs_the_dropins_into_twisted_plugins(tmp_path):
    """A normal (non-editable) install: the wheel carries twisted/plugins/*.py (and no
    dropin.cache); installed into a directory of its own, twistd finds them there."""
    # Built from a copy: a build in the checkout would leave build/ behind (and share it).
    source = tmp_path / "source"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("orbited", "halod", "twisted", "js"):
        shutil.copytree(ROOT / name, source / name, ignore=skip)
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    (source / "twisted/plugins/dropin.cache").write_bytes(b"a cache Twisted wrote here")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
         str(source)], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("orbited-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n for n in names if n.startswith("twisted/")) == [
        "twisted/plugins/halod_plugin.py", "twisted/plugins/orbited_plugin.py",
    ]  # fmt: skip
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
         str(wheel)], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    # The checkout (on sys.path through the editable install) is taken off sys.path, so
    # only the wheel's copy can be found.
    script = (
        "import sys; sys.path[:] = [p for p in sys.path if p.rstrip('/') != ROOT]\n"
        "from twisted.plugin import getPlugins\n"
        "from twisted.application.service import IServiceMaker\n"
        "import twisted.plugins.orbited_plugin as o, twisted.plugins.halod_plugin as h\n"
        "print(sorted(p.tapname for p in getPlugins(IServiceMaker)))\n"
        "print(o.__file__); print(h.__file__); import orbited; print(orbited.__file__)\n"
    ).replace("ROOT", repr(str(ROOT)))
    where = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=60, cwd=tmp_path, env={"PYTHONPATH": str(site)})  # fmt: skip
    assert where.returncode == 0, where.stderr
    tapnames, *files = where.stdout.splitlines()
    assert "'orbited'" in tapnames and "'halod'" in tapnames
    assert files == [str(site / "twisted/plugins/orbited_plugin.py"),
                     str(site / "twisted/plugins/halod_plugin.py"),
                     str(site / "orbited/__init__.py")]  # fmt: skip
