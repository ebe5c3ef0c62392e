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
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?", help="what to fuzz; omit to list the targets")
    parser.add_argument("--runs", type=int, default=0, help="stop after N inputs (0: no limit)")
    parser.add_argument("--seconds", type=int, default=0, help="stop after S seconds")
    parser.add_argument("--corpus", default=None, help="directory of seed/saved inputs")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []  # libFuzzer's own flags
    args = parser.parse_args(argv[: len(argv) - len(extra) - (1 if extra else 0)])

    import atheris

    with atheris.instrument_imports(include=["orbited", "halod", "fuzz"]):
        from fuzz.targets import DESCRIPTIONS, SEEDS, TARGETS

    if args.target is None:
        for name in TARGETS:
            print(f"{name:16} {DESCRIPTIONS[name]}")
        return 0
    if args.target not in TARGETS:
        parser.error(f"unknown target {args.target!r}; run without arguments for the list")
    flags = [sys.argv[0]]
    if args.runs:
        flags.append(f"-runs={args.runs}")
    if args.seconds:
        flags.append(f"-max_total_time={args.seconds}")
    flags += ["-rss_limit_mb=2048", "-print_final_stats=1", *extra]
    if args.corpus:
        corpus = Path(args.corpus)
        corpus.mkdir(parents=True, exist_ok=True)
        if not any(corpus.iterdir()):
            for i, seed in enumerate(SEEDS.get(args.target, [])):
                (corpus / f"seed-{i}").write_bytes(seed)
        flags.append(args.corpus)
    atheris.Setup(flags, TARGETS[args.target])
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
