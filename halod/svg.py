"""Pictures of route tables (SVG): `halod plan --svg` and the status page's /table.svg."""

from __future__ import annotations

import html

# Colour-blind-safe palette (Okabe–Ito), repeated for larger clusters.
PALETTE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
           "#999999"]  # fmt: skip

Row = tuple[str, dict[int, list[int]], dict[int, str]]  # label, id → routes, id → name


def table_svg(routes: int, title: str, rows: list[Row]) -> str:
    """One row per table, one column per route, coloured by node id (hover: route, node),
    and a legend below: each node id's colour, with its name when known, and white for a
    route without an owner."""
    cell = max(4, min(24, 960 // routes))
    left, top = 70, 30
    grid_width = routes * cell
    names: dict[int, str] = {}
    ids: set[int] = set()
    unowned = False
    for _, table, known in rows:
        ids |= set(table)
        names.update(known)
        owned = sum(len(r) for r in table.values())
        unowned = unowned or owned < routes
    entries = [
        (PALETTE[(i - 1) % len(PALETTE)], f"node {i}" + (f" ({names[i]})" if i in names else ""))
        for i in sorted(ids)
    ]
    if unowned:
        entries.append(("#fff", "no owner"))
    # Legend: entries in columns of a fixed width, as many per line as fit the grid.
    entry_width = 150
    per_line = max(1, (max(grid_width, 300)) // entry_width)
    legend_top = top + len(rows) * cell + 16
    legend_height = ((len(entries) + per_line - 1) // per_line) * 18 if entries else 0
    width = left + max(grid_width, per_line * entry_width) + 10
    height = legend_top + legend_height + 6
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f"<title>{html.escape(title)}</title>",
        f'<text x="{left}" y="14">routes 1..{routes} →</text>',
    ]
    for i, (label, table, row_names) in enumerate(rows):
        y = top + i * cell
        out.append(f'<text x="4" y="{y + cell - 3}">{html.escape(label)}</text>')
        for node, held in table.items():
            colour = PALETTE[(node - 1) % len(PALETTE)]
            who = f"node {node}" + (f" ({row_names[node]})" if node in row_names else "")
            for r in held:
                x = left + (r - 1) * cell
                out.append(
                    f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{colour}" '
                    f'stroke="#fff" stroke-width="0.5"><title>route {r}: '
                    f"{html.escape(who)}</title></rect>"
                )
    if entries:
        out.append('<g class="legend">')
        out.append(f'<text x="4" y="{legend_top + 10}">legend</text>')
        for n, (colour, text) in enumerate(entries):
            x = left + (n % per_line) * entry_width
            y = legend_top + (n // per_line) * 18
            out.append(
                f'<rect x="{x}" y="{y}" width="12" height="12" fill="{colour}" '
                f'stroke="#999" stroke-width="0.5"/>'
                f'<text x="{x + 17}" y="{y + 10}">{html.escape(text)}</text>'
            )
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out)
