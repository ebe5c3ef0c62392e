"""bench.ab's CPU readers: the user/system split the lead's stage table rescales by."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import ab

# A process of its own, with no children, that spends user time, then system time, then
# sleeps: its figures no longer move while they are read. (Its user time is a loop that
# makes no system call: one timed by time.process_time() calls clock_gettime each turn,
# and a loaded box's CI once charged it 0.21 of 0.3 s as system time.) (The test process itself is a
# poor subject: processes it starts and reaps come and go from its tree between reads.)
WORK = """
import os, sys
x = 0
for i in range(6_000_000):  # Python work, no system call in it: user time (≈ 0.3 s)
    x += i
for _ in range(20_000):  # system calls: system time
    os.stat("/")
print("done", flush=True)
sys.stdin.read()
"""


def test_cpu_split_reads_user_and_system_time_of_the_process_tree():
    proc = subprocess.Popen([sys.executable, "-c", WORK], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "done\n"
        user, system = ab.cpu_split(proc.pid)
        assert user >= 0.1 and system >= 0
        assert ab.cpu(proc.pid) == user + system  # the same ticks, summed
    finally:
        proc.kill()
        proc.wait()


def test_a_node_and_the_raw_floor_deliver_every_event_side_by_side(tmp_path):
    """``--variants head=.,raw``: the work tree's node and the floor (bench/raw_server.py)
    each accept the clients and deliver every event; the figures are the bench's."""
    out = tmp_path / "ab.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.ab", "--variants", "head=.,raw", "--clients", "100",
         "--connect-rate", "500", "--rate", "500", "--seconds", "0.5", "--reps", "1",
         "--out", str(tmp_path), "--json", str(out)],
        cwd=ab.ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {r["variant"]: r for r in json.loads(out.read_text())}
    assert set(runs) == {"head", "raw"}
    for run in runs.values():
        assert run["connected"] == 100 and run["sent"] == run["received"] > 0, run
        assert {"accept_us", "event_us", "rss_kb_per_conn"} <= set(run)  # (10 ms ticks: may be 0)


def test_a_variant_names_a_directory_with_or_without_a_slash(tmp_path, monkeypatch):
    # docs/performance.md: "`bench.ab` runs a directory as a variant (`cy=DIR`)"; `cy=cydir`
    # went to `git worktree add ... cydir` and died with a CalledProcessError traceback.
    (tmp_path / "cydir" / "orbited").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    assert ab._worktree("cydir", work, "cy") == tmp_path / "cydir"
    assert ab._worktree("./cydir", work, "cy") == tmp_path / "cydir"
    assert ab._worktree(".", work, "head") == ab.ROOT
    with pytest.raises(SystemExit, match="empty holds no orbited/ package"):
        ab._worktree("empty", work, "e")
    # anything else is a commit, checked out in a worktree under `work`
    calls = []
    monkeypatch.setattr(ab.subprocess, "run", lambda cmd, check: calls.append(cmd))
    assert ab._worktree("HEAD~1", work, "before") == work / "tree-before"
    assert calls[0][3:5] == ["worktree", "add"] and calls[0][-1] == "HEAD~1"
