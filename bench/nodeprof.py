"""Where a node's time goes: a CPU profile toggled by a signal, and garbage-collector pauses.

As a launcher, in front of every Python server the harness starts (bench/peers.py puts
``BENCH_PY_ARGS`` before ``-m orbited.cli ...``)::

    BENCH_PY_ARGS=bench/nodeprof.py ORBITED_PROFILE=/tmp/prof \\
        .venv/bin/python -m bench dispatch --servers orbited --transports ws --quick

    kill -USR1 <node pid>   # start profiling (phase 0)
    kill -USR1 <node pid>   # stop: /tmp/prof.<pid>.0 is written; again for phase 1, ...

    .venv/bin/python -m bench.nodeprof show /tmp/prof.<pid>.0 [--sort cumulative] [-n 30]

- ``ORBITED_PROFILE=PREFIX``: SIGUSR1 toggles a ``cProfile.Profile(time.process_time)``
  (CPU time, not wall time: a ``send`` that wakes the reader on the same core is not
  charged to the sender); each stop writes ``PREFIX.<pid>.<n>``. One signal toggles:
  two different pending signals are delivered in signal-number order, which breaks a
  start/stop pair of signals.
- ``ORBITED_GC_STATS=PREFIX``: at exit, ``PREFIX.<pid>.json`` holds the collections per
  generation, their total seconds and the longest pause of each generation (the
  full-collection pause grows with the objects the process holds); SIGUSR2 runs a full
  collection at once and records its pause (``forced_full``) with the objects tracked
  and frozen then.

``show`` prints a profile (pstats), ``gc`` prints a gc-stats file. py-spy (in the venv)
samples a running node without any of this: ``py-spy top --pid PID`` or
``py-spy record --pid PID --duration 10 -o node.svg`` (bench/README.md, "Profiling").
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import runpy
import signal
import sys
import time
from typing import Any


def _install_profile(prefix: str) -> None:
    import cProfile

    # Built before any signal: a profiler must not be created or freed inside a handler.
    profiles = [cProfile.Profile(time.process_time) for _ in range(8)]
    state: dict[str, Any] = {"on": None, "n": 0}

    def toggle(*_: object) -> None:
        profile = state["on"]
        if profile is None:
            if state["n"] < len(profiles):
                state["on"] = profiles[state["n"]]
                state["on"].enable()
            return
        profile.disable()
        profile.dump_stats(f"{prefix}.{os.getpid()}.{state['n']}")
        state["on"] = None
        state["n"] += 1

    signal.signal(signal.SIGUSR1, toggle)


def _install_gc_stats(prefix: str) -> None:
    import gc

    stats: dict[str, Any] = {
        "count": [0, 0, 0],
        "seconds": [0.0, 0.0, 0.0],
        "max_pause": [0.0, 0.0, 0.0],
    }
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        generation = info["generation"]
        pause = time.perf_counter() - started[0]
        stats["count"][generation] += 1
        stats["seconds"][generation] += pause
        stats["max_pause"][generation] = max(stats["max_pause"][generation], pause)

    gc.callbacks.append(callback)

    def forced(*_: object) -> None:
        # A full collection now, timed: what the next automatic one would cost.
        start = time.perf_counter()
        gc.collect()
        stats.setdefault("forced_full", []).append(time.perf_counter() - start)
        stats["frozen"] = gc.get_freeze_count()
        stats["tracked"] = len(gc.get_objects())
        write()

    def write() -> None:
        with open(f"{prefix}.{os.getpid()}.json", "w") as out:
            json.dump(stats, out)

    signal.signal(signal.SIGUSR2, forced)

    atexit.register(write)
    # SIGTERM (how the harness stops servers) must run atexit: the node's own handler
    # stops the reactor and the process exits normally, so nothing to add here.


def launch(argv: list[str]) -> None:
    """``nodeprof.py -m MODULE ARGS...``: run MODULE as __main__ with the hooks on."""
    if len(argv) < 2 or argv[0] != "-m":
        raise SystemExit("usage: nodeprof.py -m MODULE [ARGS...]")
    if os.environ.get("ORBITED_PROFILE"):
        _install_profile(os.environ["ORBITED_PROFILE"])
    if os.environ.get("ORBITED_GC_STATS"):
        _install_gc_stats(os.environ["ORBITED_GC_STATS"])
    module = argv[1]
    sys.argv = [module, *argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "-m":
        launch(args)
        return
    parser = argparse.ArgumentParser(prog="python -m bench.nodeprof")
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print a profile written by ORBITED_PROFILE")
    show.add_argument("file")
    show.add_argument("--sort", default="tottime", help="pstats key (tottime, cumulative)")
    show.add_argument("-n", type=int, default=30, help="lines")
    gcs = sub.add_parser("gc", help="print a file written by ORBITED_GC_STATS")
    gcs.add_argument("file")
    opts = parser.parse_args(args)
    if opts.command == "show":
        import pstats

        pstats.Stats(opts.file).sort_stats(opts.sort).print_stats(opts.n)
    else:
        with open(opts.file) as f:
            stats = json.load(f)
        for pause in stats.get("forced_full", []):
            print(f"forced full collection: {pause * 1e3:.1f} ms")
        if "tracked" in stats:
            print(f"objects tracked {stats['tracked']}, frozen {stats['frozen']}")
        for g in range(3):
            print(
                f"generation {g}: {stats['count'][g]} collections, "
                f"{stats['seconds'][g] * 1e3:.1f} ms in all, "
                f"longest {stats['max_pause'][g] * 1e3:.1f} ms"
            )


if __name__ == "__main__":
    main()
