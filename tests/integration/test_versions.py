"""Dependency bounds (setup.cfg): each has a lower bound and an upper bound, the lower bounds
are exactly what .ci/lower-bounds.txt pins for CI's lower-bound run (./dev lower), and the
versions installed here are inside the ranges — the pins themselves in that run."""

from __future__ import annotations

import configparser
import os
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def requirements() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    lines += cfg["options.extras_require"]["test"].splitlines()
    return [Requirement(line) for line in lines if line.strip()]


def lower_bound_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "lower-bounds.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, pinned = line.partition("==")
            assert sep and re.fullmatch(r"[0-9][0-9A-Za-z.]*", pinned), line
            pins[canonicalize_name(name)] = pinned
    return pins


def bounds(req: Requirement) -> tuple[str | None, str | None]:
    lower = [s.version for s in req.specifier if s.operator == ">="]
    upper = [s.version for s in req.specifier if s.operator == "<"]
    return (lower[0] if len(lower) == 1 else None), (upper[0] if len(upper) == 1 else None)


def test_every_dependency_has_a_lower_and_an_upper_bound():
    for req in requirements():
        lower, upper = bounds(req)
        assert lower and upper, f"{req}: give it >=LOWER,<UPPER"
        assert Version(lower) < Version(upper), str(req)


def test_the_lower_bound_pins_are_the_lower_bounds():
    expected = {canonicalize_name(r.name): bounds(r)[0] for r in requirements()}
    assert lower_bound_pins() == expected


def test_installed_versions_are_inside_the_bounds():
    """Here: what ./dev test installed is allowed. In the lower-bound run
    (ORBITED_LOWER_BOUNDS=1, set by ./dev lower): exactly the lower bounds."""
    exact = os.environ.get("ORBITED_LOWER_BOUNDS") == "1"
    pins = lower_bound_pins()
    checked = 0
    for req in requirements():
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            pytest.fail(f"{req.name} is not installed")
        assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed}"
        if exact:
            assert Version(installed) == Version(pins[canonicalize_name(req.name)]), req.name
        checked += 1
    assert checked >= 15


def test_the_tools_only_bench_and_fuzz_use_import():
    """matplotlib (bench plots) and atheris (python -m fuzz) have no test in the lower-bound
    run's few minutes: this at least imports them, with what they load, at those pins."""
    pytest.importorskip("atheris")  # Linux only (setup.cfg)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots()
    axes.plot([1, 2], [3, 4])
    plt.close(figure)
