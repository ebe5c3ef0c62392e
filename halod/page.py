"""The status page for people: /status as HTML (docs/halod-protocol.md, "Status endpoints").

Pure: the page is built from the same dict /status serves as JSON, every value that
comes from a node (names, addresses, reasons) escaped. Plain HTML and CSS, no script; the
browser reloads it every REFRESH seconds.
"""

from __future__ import annotations

import html
import time
from typing import Any

REFRESH = 5  # seconds between reloads of the page
# The page needs nothing but its own inline style and the /table.svg image.
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)

_STYLE = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto;
       max-width: 1200px; padding: 0 1em; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.4em; margin: 0 0 .2em; }
h2 { font-size: 1.1em; margin: 1.6em 0 .5em; }
.summary { color: #444; margin: 0 0 1em; }
.summary b { color: #1d1d1f; }
.warn { background: #fff4e5; border-left: 4px solid #d55e00; padding: .5em .8em;
        margin: .5em 0; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .35em .6em; border-bottom: 1px solid #e5e5e5;
         white-space: nowrap; }
th { font-weight: 600; color: #555; border-bottom: 2px solid #ccc; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.addr { font-family: ui-monospace, monospace; font-size: .9em; }
.state { border-radius: 3px; padding: .1em .45em; font-size: .9em; }
.active { background: #d9f2e6; } .spare { background: #dbeafe; }
.drained { background: #eee; } .failed, .suspect { background: #fde2e1; }
.wrap { overflow-x: auto; }
img { max-width: 100%; margin-top: .5em; }
footer { margin-top: 2em; color: #666; font-size: .9em; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _hashes(value: list[int] | None) -> str:
    """A node's hash versions: "1,2"; "-" before it registered (a restored table)."""
    return "-" if not value else ",".join(map(str, value))


def _uptime(seconds: float) -> str:
    minutes, _ = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h" if days else f"{hours}h {minutes}m" if hours else f"{minutes}m"


def _heartbeat(node: dict[str, Any], standby: bool = False) -> str:
    """``standby``: this HaloD follows (nodes heartbeat to the leader, not to it)."""
    if node["connected"]:
        text = f"{_age(node['last_heartbeat_age'])} ago"
    elif standby:
        text = "at the leader"
    else:
        text = f"lost {_age(node['disconnected_for'])}"
    suspected = node.get("suspected")
    if suspected:
        probe = suspected.get("probe") or "probing"
        text += f' <span class="state suspect">{_e(suspected["cause"])}, probe: {_e(probe)}</span>'
    return text


def status_html(status: dict[str, Any]) -> str:
    """The /status dict as a page."""
    nodes = status["nodes"]
    spares = status.get("spares")
    summary = [
        f"<b>{_e(status['routes'])}</b> routes",
        f"policy <b>{_e(status['policy'])}</b>",
        f"spares <b>{_e('-' if spares is None else spares)}</b> of "
        f"{_e(status['spares_wanted'])} wanted",
        f"failovers <b>{_e(status['failovers'])}</b>",
        f"table version {_e(status['table_version'])}",
        f"hash version <b>{_e(status.get('hash_version', 1))}</b>",
        f"heartbeat {_e(status['heartbeat_interval'])}s × {_e(status['missed_heartbeats'])}, "
        f"grace {_e(status['grace'])}s",
        f"up {_e(_uptime(status['uptime']))}",
    ]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta http-equiv="refresh" content="{REFRESH}">',
        f"<title>HaloD: {len(nodes)} nodes, {_e(status['routes'])} routes</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>HaloD</h1>",
        '<p class="summary"><a href="/dashboard">Live dashboard</a>: the route map, '
        "load, the timeline of failovers and moves, and delivery traces.</p>",
        f'<p class="summary">{" · ".join(summary)}</p>',
    ]
    if status.get("role") not in (None, "solo"):  # HaloD on etcd (docs/halod.md)
        leader = status.get("leader") or {}
        etcd = status.get("etcd") or {}
        health = ", ".join(
            f"{_e(e['url'])} {'up' if e['healthy'] else 'down' if e['healthy'] is False else '?'}"
            for e in etcd.get("endpoints", [])
        )  # fmt: skip
        out.append(f'<p class="summary">this HaloD (<b>{_e(etcd.get("name"))}</b>) is '
                   f'<b>{_e(status["role"])}</b> · leader <b>{_e(leader.get("name") or "none")}'
                   f'</b> · etcd {health}</p>')  # fmt: skip
    out += [f'<p class="warn">{_e(w)}</p>' for w in status.get("warnings", [])]
    rehash = status.get("rehash")
    if rehash:  # docs/halod.md, "Rehash"
        out.append(f'<p class="warn">rehash to hash version {_e(rehash["hash_version"])} '
                   f'running: {_e(len(rehash["pending"]))} hand-offs to go</p>')  # fmt: skip
    out += [
        "<h2>Nodes</h2>",
        '<div class="wrap"><table><thead><tr><th class="num">ID</th><th>Name</th>'
        '<th>State</th><th>Routes</th><th class="num" title="browsers connected now">'
        'Connections</th><th class="num" title="keys with a mailbox, lingering ones too">'
        'Mailboxes</th><th class="num">Capacity</th><th>Heartbeat</th><th>Browser</th>'
        '<th>SP</th><th title="hash versions the node speaks">Hashes</th></tr></thead><tbody>',
    ]
    standby = status.get("role") in ("follower", "candidate")
    for node in nodes:
        out.append(
            "<tr>"
            f'<td class="num">{_e(node["id"] if node["id"] is not None else "-")}</td>'
            f"<td>{_e(node['name'])}</td>"
            f'<td><span class="state {_e(node["state"])}">{_e(node["state"])}</span></td>'
            f"<td>{_e(node['ranges'] or '-')}</td>"
            f'<td class="num">{_e(_count(node["connections"]))}</td>'
            f'<td class="num">{_e(_count(node.get("mailboxes")))}</td>'
            f'<td class="num">{_e(_count(node["capacity"]))}</td>'
            f"<td>{_heartbeat(node, standby)}</td>"
            f'<td class="addr">{_e(node["browser"])}</td>'
            f'<td class="addr">{_e(node["sp"])}</td>'
            f"<td>{_e(_hashes(node.get('hashes')))}</td>"
            "</tr>"
        )
    if not nodes:
        out.append('<tr><td colspan="11">no node has registered</td></tr>')
    out.append("</tbody></table></div>")
    if status["failed"]:
        out += [
            "<h2>Failed and left</h2>",
            '<div class="wrap"><table><thead><tr><th>Name</th><th>When (UTC)</th>'
            "<th>Why</th></tr></thead><tbody>",
        ]
        for failed in reversed(status["failed"]):  # the latest first
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(failed["at"]))
            out.append(
                f"<tr><td>{_e(failed['name'])}</td><td>{_e(when)}</td>"
                f"<td>{_e(failed['why'])}</td></tr>"
            )
        out.append("</tbody></table></div>")
    out += [
        "<h2>Route table</h2>",
        '<img src="table.svg" alt="The route table: one column per route, coloured by the '
        'node that serves it, above the canonical table for as many active nodes">',
        f"<footer>Reloads every {REFRESH} s. For machines: "
        '<a href="status?format=json">status JSON</a> · <a href="routes">routes</a> · '
        '<a href="metrics">metrics</a> · <a href="table.svg">table.svg</a></footer>',
        "</body></html>",
    ]
    return "\n".join(out)


def wants_html(accept: str | None, fmt: str | None = None) -> bool:
    """Content negotiation for /status: ``?format=json|html`` decides; otherwise HTML
    only when the Accept header prefers text/html to application/json (a browser
    navigating), so curl, scripts and `halod status` get JSON."""
    if fmt in ("json", "html"):
        return fmt == "html"
    if not accept:
        return False
    quality: dict[str, float] = {}
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        media, q = fields[0].lower(), 1.0
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media:
            quality[media] = max(q, quality.get(media, 0.0))

    def q_of(media: str) -> float:
        kind = media.split("/")[0] + "/*"
        for candidate in (media, kind, "*/*"):
            if candidate in quality:
                return quality[candidate]
        return 0.0

    return q_of("text/html") > q_of("application/json")
