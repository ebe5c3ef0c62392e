"""The JS client's unit tests (Node's built-in runner) as part of the suite."""

import shutil
import subprocess
from pathlib import Path

JS = Path(__file__).resolve().parents[2] / "js"


def test_js_client_unit_tests_pass():
    node = shutil.which("node")
    assert node, "Node.js is needed for the JS unit tests (./dev test installs it as root)"
    result = subprocess.run(
        [node, "--test", str(JS / "test")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout


def test_js_default_route_count_is_the_servers():
    """The route count is defined once per language: orbited.js's DEFAULT_ROUTES must be
    orbited.core.routes.DEFAULT_ROUTES, and docs/hashing-vectors.json covers it."""
    import json

    from orbited.core.routes import DEFAULT_ROUTES

    node = shutil.which("node")
    assert node, "Node.js is needed for the JS unit tests (./dev test installs it as root)"
    script = (
        f"import({json.dumps((JS / 'orbited.js').as_uri())})"
        ".then((m) => console.log(m.DEFAULT_ROUTES))"
    )
    result = subprocess.run(
        [node, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == DEFAULT_ROUTES
    vectors = json.loads((JS.parent / "docs" / "hashing-vectors.json").read_text())["vectors"]
    assert all(str(DEFAULT_ROUTES) in v["routes"] for v in vectors)
