"""Pictures of route tables (SVG): `halod plan --svg` and the status page's /table.svg."""

from __future__ import annotations

import html

# Colour-blind-safe palette (Okabe–Ito), repeated for larger clusters.
PALETTE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
           "#999999"]  # fmt: skip

Row = tuple[str, dict[int, list[int]], dict[int, str]]  # label, id → routes, id → name


def table_svg(routes: int, title: str, rows: list[Row]) -> str:
    """One row per table, one column per route, coloured by node id (hover: route, node)."""
    cell = max(4, min(24, 960 // routes))
    left, top = 70, 30
    width, height = left + routes * cell + 10, top + len(rows) * cell + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f"<title>{html.escape(title)}</title>",
        f'<text x="{left}" y="14">routes 1..{routes} →</text>',
    ]
    for i, (label, table, names) in enumerate(rows):
        y = top + i * cell
        out.append(f'<text x="4" y="{y + cell - 3}">{html.escape(label)}</text>')
        for node, held in table.items():
            colour = PALETTE[(node - 1) % len(PALETTE)]
            who = f"node {node}" + (f" ({names[node]})" if node in names else "")
            for r in held:
                x = left + (r - 1) * cell
                out.append(
                    f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{colour}" '
                    f'stroke="#fff" stroke-width="0.5"><title>route {r}: '
                    f"{html.escape(who)}</title></rect>"
                )
    out.append("</svg>")
    return "\n".join(out)
