"""Package data (setup.cfg ``[options.package_data]``): a wheel carries HaloD's dashboard
page (halod/static/*), which halod/dashboard.py serves through importlib.resources, so
an installed HaloD, not only a checkout, has it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STATIC = sorted(p.name for p in (ROOT / "halod" / "static").iterdir() if p.is_file())

pytestmark = pytest.mark.slow


def test_the_wheel_carries_the_dashboard_and_halod_reads_it_installed(tmp_path):
    assert {"dashboard.html", "app.js", "app.css"} <= set(STATIC)
    # Built from a copy: a build in the checkout would leave build/ behind (and share it).
    source = tmp_path / "source"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("orbited", "halod", "twisted", "js"):
        shutil.copytree(ROOT / name, source / name, ignore=skip)
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
         str(source)], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("orbited-*.whl")
    with zipfile.ZipFile(wheel) as z:
        packed = sorted(n.removeprefix("halod/static/") for n in z.namelist()
                        if n.startswith("halod/static/"))  # fmt: skip
        assert packed == STATIC
        for name in STATIC:
            assert z.read(f"halod/static/{name}") == (ROOT / "halod/static" / name).read_bytes()
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
         str(wheel)], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    # Only the wheel's copy can be found: the checkout is taken off sys.path.
    script = (
        "import sys; sys.path[:] = [p for p in sys.path if p.rstrip('/') != ROOT]\n"
        "import importlib.resources, halod\n"
        "static = importlib.resources.files('halod') / 'static'\n"
        "print(halod.__file__)\n"
        "print(len(static.joinpath('dashboard.html').read_bytes()))\n"
    ).replace("ROOT", repr(str(ROOT)))
    where = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=60, cwd=tmp_path, env={"PYTHONPATH": str(site)})  # fmt: skip
    assert where.returncode == 0, where.stderr
    location, size = where.stdout.splitlines()
    assert location.startswith(str(site))
    assert int(size) == (ROOT / "halod/static/dashboard.html").stat().st_size
