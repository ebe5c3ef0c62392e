"""The ``halod`` command.

    halod plan --routes N --nodes M [--json] [--svg FILE]

prints the canonical route table for 1..M nodes (docs/halod.md). The daemon itself (node
registration, heartbeats, failover, the data plane) is not part of this release yet.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

from halod.routes import DEFAULT_ROUTES, RouteTableError, canonical, format_ranges

# Colour-blind-safe palette (Okabe–Ito), repeated for larger clusters.
PALETTE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
           "#999999"]  # fmt: skip


def plan_text(routes: int, nodes: int) -> str:
    width = len(str(nodes))
    lines = []
    for m in range(1, nodes + 1):
        table = canonical(routes, m)
        label = f"{m:>{width}} node{'s' if m > 1 else ' '}:"
        lines.append(f"{label} " + " || ".join(format_ranges(table[i]) for i in sorted(table)))
    return "\n".join(lines)


def plan_json(routes: int, nodes: int) -> list[dict[str, list[int]]]:
    return [
        {str(i): held for i, held in sorted(canonical(routes, m).items())}
        for m in range(1, nodes + 1)
    ]


def plan_svg(routes: int, nodes: int) -> str:
    """Rows: node count 1..M; columns: routes 1..N; colour: the owning node id."""
    cell = max(4, min(24, 960 // routes))
    left, top = 70, 30
    width, height = left + routes * cell + 10, top + nodes * cell + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f"<title>{html.escape(f'HaloD route table, {routes} routes, 1-{nodes} nodes')}</title>",
        f'<text x="{left}" y="14">routes 1..{routes} →</text>',
    ]
    for m in range(1, nodes + 1):
        y = top + (m - 1) * cell
        out.append(f'<text x="4" y="{y + cell - 3}">{m} node{"s" if m > 1 else ""}</text>')
        for node, held in canonical(routes, m).items():
            colour = PALETTE[(node - 1) % len(PALETTE)]
            for r in held:
                x = left + (r - 1) * cell
                out.append(
                    f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{colour}" '
                    f'stroke="#fff" stroke-width="0.5"><title>route {r}: node {node}</title></rect>'
                )
    out.append("</svg>")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="halod", description="HaloD route table tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="print the canonical route table for 1..M nodes")
    plan.add_argument("--routes", type=int, default=DEFAULT_ROUTES, help="N (default 24)")
    plan.add_argument("--nodes", type=int, required=True, help="M")
    plan.add_argument("--json", action="store_true", help="a JSON list instead of text")
    plan.add_argument("--svg", type=Path, help="also write a picture of the progression")
    args = parser.parse_args(argv)
    if not 1 <= args.nodes <= args.routes:
        print(f"halod plan: --nodes must be from 1 to --routes ({args.routes})", file=sys.stderr)
        return 2
    try:
        if args.json:
            print(json.dumps(plan_json(args.routes, args.nodes)))
        else:
            print(plan_text(args.routes, args.nodes))
        if args.svg:
            args.svg.write_text(plan_svg(args.routes, args.nodes))
    except RouteTableError as e:
        print(f"halod plan: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
