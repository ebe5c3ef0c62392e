"""bench.ab's CPU readers: the user/system split the lead's stage table rescales by."""

from __future__ import annotations

import os
import time

from bench import ab


def test_cpu_split_reads_user_and_system_time_of_the_process_tree():
    pid = os.getpid()
    user0, system0 = ab.cpu_split(pid)
    end = time.process_time() + 0.3
    while time.process_time() < end:  # Python work: user time
        pass
    for _ in range(20_000):  # system calls: system time
        os.stat("/")
    user1, system1 = ab.cpu_split(pid)
    assert user1 - user0 >= 0.1
    assert system1 >= system0 and user0 >= 0 and system0 >= 0
    total = ab.cpu(pid)
    assert user1 + system1 <= total <= user1 + system1 + 0.1
