"""Coverage-guided fuzzing of one target with atheris (docs/fuzzing.md).

    python -m fuzz                       list the targets
    python -m fuzz TARGET [--runs N] [--seconds S] [--corpus DIR] [-- libFuzzer flags]

A property violation or an unexpected exception stops the run with the crashing input
written to ``crash-<sha1>`` (libFuzzer's behaviour); the ``#N`` lines are libFuzzer's
running case counts, ``Done N runs in S second(s)`` the total.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?", help="what to fuzz; omit to list the targets")
    parser.add_argument("--runs", type=int, default=0, help="stop after N inputs (0: no limit)")
    parser.add_argument("--seconds", type=int, default=0, help="stop after S seconds")
    parser.add_argument("--corpus", default=None, help="directory of seed/saved inputs")
    parser.add_argument("libfuzzer", nargs="*", help="extra libFuzzer flags (after --)")
    args = parser.parse_args(argv)

    import atheris

    with atheris.instrument_imports(include=["orbited", "halod", "fuzz"]):
        from fuzz.targets import TARGETS

    if args.target is None:
        for name, target in TARGETS.items():
            doc = (getattr(target, "__doc__", None) or "").strip().splitlines()
            print(f"{name:16} {doc[0] if doc else ''}")
        return 0
    if args.target not in TARGETS:
        parser.error(f"unknown target {args.target!r}; run without arguments for the list")
    flags = [sys.argv[0]]
    if args.runs:
        flags.append(f"-runs={args.runs}")
    if args.seconds:
        flags.append(f"-max_total_time={args.seconds}")
    flags += ["-rss_limit_mb=2048", "-print_final_stats=1", *args.libfuzzer]
    if args.corpus:
        flags.append(args.corpus)
    atheris.Setup(flags, TARGETS[args.target])
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
