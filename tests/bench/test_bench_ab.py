"""bench.ab's CPU readers: the user/system split the lead's stage table rescales by."""

from __future__ import annotations

import json
import subprocess
import sys

from bench import ab

# A process of its own, with no children, that spends user time, then system time, then
# sleeps: its figures no longer move while they are read. (The test process itself is a
# poor subject: processes it starts and reaps come and go from its tree between reads.)
WORK = """
import os, sys, time
end = time.process_time() + 0.3
while time.process_time() < end:  # Python work: user time
    pass
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
