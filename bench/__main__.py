"""python -m bench SCENARIO [options] — see bench/README.md."""

from __future__ import annotations

import sys

SCENARIOS = {
    "dispatch": "bench.dispatch",
    "control": "bench.control",
    "dataplane": "bench.dataplane",
    "soak": "bench.soak",
}
# Load-tool pieces (bench/README.md, "Simulated browsers"), runnable the same way.
SCENARIOS |= {
    "browsers": "bench.browsers",
    "sender": "bench.sender",
    "chaos_report": "bench.chaos_report",
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in SCENARIOS:
        print(f"usage: python -m bench {{{','.join(SCENARIOS)}}} [options]", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(SCENARIOS[sys.argv[1]]).main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
