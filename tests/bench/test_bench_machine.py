"""Every scenario's results file records the machine (bench/README.md, "The harness"): the
block bench/report.py's machine() gives, checked here with each scenario's runs stubbed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report

ROOT = Path(__file__).resolve().parents[2]
MACHINE = set(report.machine())  # cpus, cpu_model, kernel, python, mem_gb, loadavg_at_start


def test_dispatch_records_the_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from bench import dispatch

    monkeypatch.setattr(dispatch, "available", lambda name: True)
    monkeypatch.setattr(dispatch, "exit_on_signals", lambda: None)
    monkeypatch.setattr(dispatch, "run_one", lambda *a: {"server": "raw"})
    monkeypatch.setattr(dispatch, "summarise", lambda runs: ({}, {}))
    monkeypatch.setattr(dispatch, "table", lambda results: "")
    out = tmp_path / "dispatch.json"
    args = ["--servers", "raw", "--transports", "ws", "--quick", "--json", str(out)]
    assert dispatch.main(args) == 0
    assert set(json.loads(out.read_text())["machine"]) == MACHINE


def test_fanout_records_the_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from bench import fanout

    run = {"server": "orbited", "received": 1, "expected": 1, "cpu_us_per_recipient": 1.0,
           "cpu_us_per_recipient_median_round": 1.0}  # fmt: skip
    monkeypatch.setattr(fanout, "available", lambda name: True)
    monkeypatch.setattr(fanout, "exit_on_signals", lambda: None)
    monkeypatch.setattr(fanout, "run_one", lambda *a: run)
    monkeypatch.setattr(fanout, "table", lambda results: "")
    out = tmp_path / "fanout.json"
    assert fanout.main(["--servers", "orbited", "--quick", "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())["machine"]) == MACHINE


def test_user_records_the_machine(tmp_path: Path) -> None:
    from bench import usercost

    out = tmp_path / "user.json"
    assert usercost.main(["--quick", "--connections", "1", "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())["machine"]) == MACHINE


def test_store_records_the_machine(tmp_path: Path) -> None:
    # etcd and SQLite stubbed out; in a process of its own, as the bench runs a reactor
    stub = (
        "import sys\n"
        "import bench.store as s\n"
        "async def run(reactor, args, tmp):\n"
        "    return {'routes': args.routes}\n"
        "s.run, s.text, s.ETCD = run, lambda r: 'stub', sys.executable\n"
        "s.main(sys.argv[1:])\n"
    )
    out = tmp_path / "store.json"
    done = subprocess.run([sys.executable, "-c", stub, "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert set(json.loads(out.read_text())["machine"]) == MACHINE
