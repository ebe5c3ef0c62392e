"""The ``halod`` command. The route table and control plane arrive with issue 5."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("halod: the HaloD daemon is not part of this release yet", file=sys.stderr)
    return 2
