"""Smoke test of ``python -m bench user`` (bench/usercost.py) with tiny counts: it runs
through the harness's entry point, sends each way what it says, checks every delivery
reached its sink, and writes its figures. Never asserts what the figures are (that is a
quiet machine's job, docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import usercost
from orbited.core.keys import ConnectionKey

ROOT = Path(__file__).resolve().parents[2]


def test_each_way_sends_what_it_says():
    keys = usercost.user_keys(2, 3)
    alice = next(iter(keys))
    wildcard = [json.loads(b) for b in usercost.bodies("wildcard", keys, 2, "t")]
    per_key = [json.loads(b) for b in usercost.bodies("per_key", keys, 2, "t")]
    listed = [json.loads(b) for b in usercost.bodies("listed", keys, 2, "t")]
    latest = [json.loads(b) for b in usercost.bodies("latest", keys, 2, "t")]
    assert [(r["to"], r["latest"]) for r in latest][0] == ([[alice, "*", "*"]], f"state:{alice}")
    assert "latest" not in wildcard[0]
    assert [r["to"] for r in wildcard][0] == [[alice, "*", "*"]]
    assert len(wildcard) == 2 and len(listed) == 2 and len(per_key) == 6  # 3 keys per user
    assert [r["to"] for r in per_key[:3]] == [[list(k)] for k in keys[alice]]
    assert listed[0]["to"] == [list(k) for k in keys[alice]]
    assert len({r["id"] for r in wildcard + per_key + listed}) == 10  # ids never repeat
    assert keys[alice][0] == ConnectionKey(alice, "s0", "/t0")


def test_the_quick_run_through_the_harness_writes_its_figures(tmp_path):
    out = tmp_path / "user.json"
    run = subprocess.run([sys.executable, "-m", "bench", "user", "--quick", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "wildcard to a user with 1 connection / a single-key event:" in run.stdout
    figures = json.loads(out.read_text())
    assert [r["connections"] for r in figures["results"]] == [1, 3, 10]
    for result in figures["results"]:
        k = result["connections"]
        assert [result[w]["requests_per_user_event"] for w in usercost.WAYS] == [1, k, 1, 1]
        for way in usercost.WAYS:
            assert result[way]["us_per_user_event"] > 0
    assert figures["wildcard_k1_vs_single_key"] > 0


@pytest.mark.parametrize("bad", [["--connections", "0"], ["--connections", "a"], ["--reps", "0"]])
def test_bad_options_are_refused(bad):
    with pytest.raises(SystemExit) as exited:
        usercost.main(bad)
    assert exited.value.code == 2
