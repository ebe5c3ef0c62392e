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
