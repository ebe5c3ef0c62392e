"""Package data (setup.cfg ``[options.package_data]``): a wheel carries HaloD's dashboard
page (halod/static/*), which halod/dashboard.py serves through importlib.resources, so
an installed HaloD, not only a checkout, has it. And setup.py's C extension
(orbited/core/_speedups.c) is built into the wheel and loads from it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STATIC = sorted(p.name for p in (ROOT / "halod" / "static").iterdir() if p.is_file())

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of the checkout, built from a copy: a build in the checkout would leave
    build/ behind (and share it); the copy has no compiled extension (``*.so``), so the
    wheel's is the build's."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    source = tmp_path / "source"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so")
    for name in ("orbited", "halod", "twisted", "js"):
        shutil.copytree(ROOT / name, source / name, ignore=skip)
    for name in ("setup.cfg", "setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
         str(source)], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (built,) = tmp_path.glob("orbited-*.whl")
    return built


def _install(wheel: Path, tmp_path: Path) -> Path:
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
         str(wheel)], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    return site


def _run_installed(site: Path, tmp_path: Path, code: str) -> list[str]:
    """The output lines of ``code``, run where only the wheel's copy can be found: the
    checkout is taken off sys.path."""
    script = (
        "import sys; sys.path[:] = [p for p in sys.path if p.rstrip('/') != ROOT]\n" + code
    ).replace("ROOT", repr(str(ROOT)))
    where = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=60, cwd=tmp_path, env={"PYTHONPATH": str(site)})  # fmt: skip
    assert where.returncode == 0, where.stderr
    return where.stdout.splitlines()


def test_the_wheel_carries_the_dashboard_and_halod_reads_it_installed(wheel, tmp_path):
    assert {"dashboard.html", "app.js", "app.css"} <= set(STATIC)
    with zipfile.ZipFile(wheel) as z:
        packed = sorted(n.removeprefix("halod/static/") for n in z.namelist()
                        if n.startswith("halod/static/"))  # fmt: skip
        assert packed == STATIC
        for name in STATIC:
            assert z.read(f"halod/static/{name}") == (ROOT / "halod/static" / name).read_bytes()
    site = _install(wheel, tmp_path)
    location, size = _run_installed(site, tmp_path, (
        "import importlib.resources, halod\n"
        "static = importlib.resources.files('halod') / 'static'\n"
        "print(halod.__file__)\n"
        "print(len(static.joinpath('dashboard.html').read_bytes()))\n"
    ))  # fmt: skip
    assert location.startswith(str(site))
    assert int(size) == (ROOT / "halod/static/dashboard.html").stat().st_size


def test_the_wheel_builds_the_speedups_and_an_install_loads_them(wheel, tmp_path):
    """The C extension may be missing only where no compiler or OpenSSL headers are
    (never under CI, which installs them): docs/operations.md, "Running a node"."""
    with zipfile.ZipFile(wheel) as z:
        built = [n for n in z.namelist() if n.startswith("orbited/core/_speedups")]
    if not built and not os.environ.get("CI"):
        pytest.skip("the C extension was not built here (no compiler or OpenSSL headers)")
    assert any(n.endswith(".so") for n in built), built
    site = _install(wheel, tmp_path)
    where, key = _run_installed(site, tmp_path, (
        "from orbited.core import speedups\n"
        "print(speedups.native.__file__)\n"
        "print(speedups.native.accept_key(b'dGhlIHNhbXBsZSBub25jZQ==').decode())\n"
    ))  # fmt: skip
    assert where.startswith(str(site))
    assert key == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455, section 1.3
