"""README.md's "Push your first event", run as written against a real node.

The section's commands and its Python block are taken from README.md itself, so the
README cannot drift from what works. The Python block runs in a fresh interpreter in
which the test-only packages (pynng, websockets, playwright, …) cannot be imported: it
must work on what ``./dev run`` installs (``pip install -e .``, setup.cfg's
install_requires).
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

PAGE = "http://127.0.0.1:8091"  # the page's origin, as the README serves it


def _name(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _closure(requirements: list[str], extra: str) -> set[str]:
    """The distributions these requirements bring in, transitively, for ``extra``."""
    found: set[str] = set()
    todo = list(requirements)
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = _name(req.name)
        if name in found:
            continue
        found.add(name)
        try:
            todo.extend(r for r in metadata.requires(req.name) or [] if "extra ==" not in r)
        except metadata.PackageNotFoundError:
            pass  # not installed here (e.g. atheris off Linux): nothing to block
    return found


def modules_only_tests_install() -> list[str]:
    """Top-level modules that ``./dev test`` installs and ``./dev run`` does not: those
    of setup.cfg's ``test`` extra and their dependencies, minus what install_requires
    brings (read from the installed orbited's metadata)."""
    own = metadata.requires("orbited") or []
    only = _closure(own, "test") - _closure(own, "")
    return sorted(module for module, dists in metadata.packages_distributions().items()
                  if module.isidentifier() and {_name(d) for d in dists} <= only)  # fmt: skip


def first_event_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Push your first event")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def code_blocks(section: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```$", section, flags=re.S | re.M)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[dict]:
    """``orbited node`` as the README starts it (it creates ./orbited.secret), on free ports."""
    ready_file = tmp_path / "ready.json"
    log = (tmp_path / "node.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "orbited.cli", "node", "--http", "127.0.0.1:0",
         "--sp", "tcp://127.0.0.1:0", "--ready-file", str(ready_file), "--cors-origin", PAGE],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while not ready_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (
            (tmp_path / "node.log").read_text())  # fmt: skip
        time.sleep(0.02)
    yield json.loads(ready_file.read_text())
    proc.terminate()
    proc.wait(10)


def test_the_first_event_runs_as_written(node, tmp_path):
    section = first_event_section()
    assert f"`.venv/bin/orbited node --cors-origin {PAGE}`" in section
    assert "browsers on 127.0.0.1:8000,\nweb apps on tcp://127.0.0.1:9000" in section
    assert "python3 -m http.server 8091 --bind 127.0.0.1" in section  # the page's origin
    blocks = code_blocks(section)
    shells = [code for lang, code in blocks if lang == ""]
    pythons = [code for lang, code in blocks if lang == "python"]
    assert len(shells) == 1 and len(pythons) == 1, blocks

    # The token command, with the secret `orbited node` created in the same directory.
    command = shlex.split(shells[0], comments=True)
    assert command[0] == ".venv/bin/orbited"
    token = subprocess.run([sys.executable, "-m", "orbited.cli", *command[1:]], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    key = (command[command.index("--user") + 1], command[command.index("--session") + 1],
           command[command.index("--location") + 1])  # fmt: skip

    # A page of another origin is refused, as the section says.
    url = f"ws://{node['http']}/orbited/ws?token={token}"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, origin=Origin("http://127.0.0.1:8092"), open_timeout=5)
    assert refused.value.response.status_code == 403
    assert b"origin_not_allowed" in refused.value.response.body

    # A browser connected with that token from the page's origin.
    with connect(url, origin=Origin(PAGE), open_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "hello"

        code = pythons[0]
        assert "tcp://127.0.0.1:9000" in code, "the example sends to the node's SP address"
        code = code.replace("tcp://127.0.0.1:9000", node["sp"])
        code = code.replace("http://127.0.0.1:8000", f"http://{node['http']}")
        assert all(f'"{part}"' in code for part in key)  # it sends to the token's key
        block = "import sys\n" + "".join(
            f"sys.modules[{m!r}] = None\n" for m in modules_only_tests_install()
        )
        run = subprocess.run([sys.executable, "-c", block + code], cwd=tmp_path,
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        assert run.returncode == 0, run.stderr
        printed = run.stdout.strip().splitlines()
        promised = [line.split("#", 1)[1].strip() for line in pythons[0].splitlines()
                    if "print(" in line and "#" in line]  # fmt: skip
        assert promised and printed == promised

        received = re.search(r"The browser receives `(\{.*?\})`", section)
        assert received, "the section says what the browser receives"
        assert json.loads(ws.recv(timeout=5)) == json.loads(received.group(1))


def test_the_first_example_needs_only_the_run_install():
    """Every module the example imports is Orbited's own or a ``./dev run`` dependency."""
    (code,) = [c for lang, c in code_blocks(first_event_section()) if lang == "python"]
    imported = {
        name.split(".")[0]
        for node in ast.walk(ast.parse(code))
        for name in (
            [a.name for a in node.names] if isinstance(node, ast.Import)
            else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        )
    }  # fmt: skip
    blocked = set(modules_only_tests_install())
    assert {"pynng", "websockets", "playwright", "pytest"} <= blocked  # the list is right
    assert imported and not imported & blocked, imported
