"""Pure analysis of a load run: what the web app got accepted vs what each browser received.

Owns the arithmetic shared by the chaos test, the failover benchmark and the soak test,
and the compact range encoding both report writers use (bench/sender.py,
bench/browsers.py). No I/O except the small CLI at the bottom:

    python -m bench.chaos_report SENDER.json BROWSERS-1.json [BROWSERS-2.json ...]
                                 [--window START END]...

Definitions (per client, i.e. per connection key):

- **accepted**: the n values the sender's request was answered ``delivered`` / ``queued``
  (/ ``acked`` / ``unacked`` in acknowledged mode: the node holds it) for;
- **lost** = accepted − received; each lost n is attributed to the incident window its
  send time falls in (``round_times``), or to "outside" — losses outside every incident
  are the interesting bug;
- **duplicated**: n values the browser's app layer saw more than once;
- **out_of_order**: events the browser's app layer saw after a later one of its stream
  (bench/browsers.py counts them; 0 is the promise, as for lost and duplicated);
- **user-addressed events** (``bench/sender.py --users``: one ``[user, "*", "*"]`` per
  user): each key's accepted n are those the wildcard's ``matched`` reply gave that key
  an accepted status (``selector_statuses``), so lost and duplicated are per key, as for
  single-key events;
- **recovery** (per incident window ``(start, end)``): a client is affected when one of
  its outages began inside the window; its recovery is the time from ``start`` to the
  first event it received afterwards (``None``: never received again).
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

Ranges = list[list[int]]  # [[lo, hi], ...] inclusive; JSON-friendly
Window = tuple[float, float]

# Statuses that mean "the node took the event for this key": it must reach the browser.
ACCEPTED_STATUSES = frozenset({"delivered", "queued", "acked", "unacked"})
# A wildcard recipient's key the `matched` reply did not list (docs/protocol.md,
# "Addressing a user or a session"): the node had no mailbox for it, nothing is owed.
UNMATCHED = "unmatched"


# -- ranges ------------------------------------------------------------------------------


def compress(values: Iterable[int]) -> Ranges:
    """Sorted, merged inclusive ranges of ``values`` (duplicates collapse)."""
    out: Ranges = []
    for v in sorted(set(values)):
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return out


def expand(ranges: Iterable[Sequence[int]]) -> set[int]:
    """The set of integers covered by ``ranges`` (overlapping or unordered is fine)."""
    out: set[int] = set()
    for lo, hi in ranges:
        out.update(range(lo, hi + 1))
    return out


class ArrivalRanges:
    """n values in arrival order, run-length encoded: [[lo, hi], ...] with each run
    consecutive ascending. In-order streams stay one run per outage, so a browser holding
    hours of events costs a few bytes; reordering shows up as extra runs."""

    __slots__ = ("runs", "count")

    def __init__(self) -> None:
        self.runs: Ranges = []
        self.count = 0

    def add(self, n: int) -> None:
        self.count += 1
        if self.runs and self.runs[-1][1] + 1 == n:
            self.runs[-1][1] = n
        else:
            self.runs.append([n, n])


class RangeSet:
    """A set of ints kept as sorted disjoint ranges; cheap when values come nearly in
    order (replies to pipelined rounds complete almost in order)."""

    __slots__ = ("_lo", "_hi")

    def __init__(self) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []

    def add(self, n: int) -> None:
        i = bisect.bisect_right(self._lo, n) - 1  # the range starting at or before n
        if i >= 0 and n <= self._hi[i]:
            return
        joins_left = i >= 0 and self._hi[i] + 1 == n
        joins_right = i + 1 < len(self._lo) and self._lo[i + 1] - 1 == n
        if joins_left and joins_right:
            self._hi[i] = self._hi[i + 1]
            del self._lo[i + 1], self._hi[i + 1]
        elif joins_left:
            self._hi[i] = n
        elif joins_right:
            self._lo[i + 1] = n
        else:
            self._lo.insert(i + 1, n)
            self._hi.insert(i + 1, n)

    def __contains__(self, n: int) -> bool:
        i = bisect.bisect_right(self._lo, n) - 1
        return i >= 0 and n <= self._hi[i]

    def __len__(self) -> int:
        return sum(h - lo + 1 for lo, h in zip(self._lo, self._hi, strict=True))

    def ranges(self) -> Ranges:
        return [[lo, h] for lo, h in zip(self._lo, self._hi, strict=True)]


# -- user-addressed events ---------------------------------------------------------------


def key_results(result: Mapping[str, Any]) -> dict[tuple[str, ...], Mapping[str, Any]]:
    """A wildcard recipient's result per connection key it reached (``"matched"``), as
    the node sends it (``"keys": [{"key": [u, s, l], "status": ...}, ...]``) or as the
    Python clients give it (``"keys": {ConnectionKey: {...}}``); {} when it reached none."""
    keys = result.get("keys") or ()
    if isinstance(keys, Mapping):
        return {tuple(k): v for k, v in keys.items()}
    return {tuple(entry["key"]): {f: v for f, v in entry.items() if f != "key"}
            for entry in keys}  # fmt: skip


def selector_statuses(
    result: Mapping[str, Any], keys: Iterable[Sequence[str]]
) -> dict[tuple[str, ...], str]:
    """Each of a user's ``keys`` with the status a wildcard's ``result`` gives it: its own
    entry when the node matched it, ``UNMATCHED`` when the node matched others but not
    it, and the wildcard's own status (``no_connection``, ``limited``, ``moved``, an
    error...) when the node matched none. Only ACCEPTED_STATUSES are owed to a browser:
    the per-key accounting of single-key events applies to user-addressed ones as is."""
    status = str(result.get("status", "error"))
    reached = key_results(result) if status == "matched" else {}
    out: dict[tuple[str, ...], str] = {}
    for key in keys:
        key = tuple(key)
        if status != "matched":
            out[key] = status
        elif key in reached:
            out[key] = str(reached[key].get("status", "error"))
        else:
            out[key] = UNMATCHED
    return out


# -- statistics --------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def spread(values: Sequence[float]) -> dict[str, float | int | None]:
    return {
        "count": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
    }


# -- per-client analysis -----------------------------------------------------------------


def send_time(round_times: Sequence[float] | Mapping[int, float], n: int) -> float | None:
    """Send time of round ``n`` (1-based list or a mapping n → time)."""
    if isinstance(round_times, Mapping):
        return round_times.get(n)
    return round_times[n - 1] if 1 <= n <= len(round_times) else None


def window_of(t: float | None, windows: Sequence[Window]) -> int | None:
    """Index of the first window holding ``t``, or None."""
    if t is None:
        return None
    for i, (start, end) in enumerate(windows):
        if start <= t <= end:
            return i
    return None


def recovery_after(
    outages: Iterable[Sequence[float | None]], window: Window
) -> tuple[bool, float | None]:
    """(affected, seconds from window start to receiving again) for one client.

    ``outages`` are [lost_at, receiving_again_at, ...] (again None = never); a client is
    affected when an outage began inside ``window``. Several outages inside one window
    (e.g. a reconnect that failed again) count until the last of them ended."""
    start, end = window
    affected = False
    again: float | None = None
    for outage in outages:
        lost_at, back = outage[0], outage[1]
        if lost_at is None or not start <= lost_at <= end:
            continue
        affected = True
        if back is None:
            return True, None
        again = back if again is None else max(again, back)
    if not affected:
        return False, None
    assert again is not None
    return True, max(0.0, again - start)


def analyse_client(
    accepted: set[int],
    client: Mapping[str, Any],
    round_times: Sequence[float] | Mapping[int, float] = (),
    windows: Sequence[Window] = (),
) -> dict[str, Any]:
    """Lost/duplicated/recovery figures for one client report (bench/browsers.py format)."""
    received = expand(client.get("received", []))
    lost = sorted(accepted - received)
    lost_by_window: dict[str, list[int]] = {}
    for n in lost:
        w = window_of(send_time(round_times, n), windows)
        lost_by_window.setdefault("outside" if w is None else str(w), []).append(n)
    recoveries = [recovery_after(client.get("outages", []), w) for w in windows]
    return {
        "id": client.get("id"),
        "transport": client.get("transport"),
        "accepted": len(accepted),
        "received": len(received),
        "lost": compress(lost),
        "lost_count": len(lost),
        "lost_by_window": {k: compress(v) for k, v in lost_by_window.items()},
        "duplicated": int(client.get("dups", 0)),
        "out_of_order": int(client.get("out_of_order", 0)),
        "unexpected": len(received - accepted),  # e.g. a reply lost though the event arrived
        "recoveries": [None if not hit else ("never" if t is None else t) for hit, t in recoveries],
    }


def analyse(
    accepted: Mapping[str, Iterable[int] | Ranges],
    clients: Iterable[Mapping[str, Any]],
    round_times: Sequence[float] | Mapping[int, float] = (),
    windows: Sequence[Window] = (),
) -> dict[str, Any]:
    """The whole run. ``accepted``: key id → accepted n (a set, or ranges); ``clients``:
    browser client reports (each with ``id``, ``received`` ranges, ``dups``, ``outages``).

    Returns {"summary": {...}, "clients": {id: per-client dict}}. A key the sender has but
    no browser reported is counted under ``missing_clients`` (its accepted events are lost).
    """
    by_id = {c["id"]: c for c in clients}
    per_client: dict[str, dict[str, Any]] = {}
    for key_id in sorted(set(accepted) | set(by_id)):
        got = accepted.get(key_id, set())
        acc = expand(got) if _is_ranges(got) else set(got)
        per_client[key_id] = analyse_client(
            acc, by_id.get(key_id, {"id": key_id}), round_times, windows
        )
    return {"summary": summarize(per_client, by_id, windows), "clients": per_client}


def _is_ranges(value: object) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], list | tuple)


def summarize(
    per_client: Mapping[str, Mapping[str, Any]],
    reports: Mapping[str, Mapping[str, Any]],
    windows: Sequence[Window] = (),
) -> dict[str, Any]:
    transports: dict[str, dict[str, int]] = {}
    for c in per_client.values():
        t = transports.setdefault(
            str(c.get("transport")), {"clients": 0, "received": 0, "lost": 0, "duplicated": 0}
        )
        t["clients"] += 1
        t["received"] += c["received"]
        t["lost"] += c["lost_count"]
        t["duplicated"] += c["duplicated"]
    lost_outside = sum(
        len(expand(c["lost_by_window"].get("outside", []))) for c in per_client.values()
    )
    incidents = []
    for i, window in enumerate(windows):
        recs = [c["recoveries"][i] for c in per_client.values() if c["recoveries"][i] is not None]
        times = [r for r in recs if r != "never"]
        incidents.append(
            {
                "window": list(window),
                "affected": len(recs),
                "never_recovered": sorted(
                    k for k, c in per_client.items() if c["recoveries"][i] == "never"
                ),
                "recovery": spread(times),
                "lost": sum(
                    len(expand(c["lost_by_window"].get(str(i), []))) for c in per_client.values()
                ),
            }
        )
    return {
        "clients": len(per_client),
        "missing_clients": sorted(k for k in per_client if k not in reports),
        "accepted": sum(c["accepted"] for c in per_client.values()),
        "received": sum(c["received"] for c in per_client.values()),
        "lost": sum(c["lost_count"] for c in per_client.values()),
        "lost_outside_windows": lost_outside,
        "duplicated": sum(c["duplicated"] for c in per_client.values()),
        "out_of_order": sum(c["out_of_order"] for c in per_client.values()),
        "clients_with_loss": sum(1 for c in per_client.values() if c["lost_count"]),
        "reconnects": sum(int(r.get("reconnects", 0)) for r in reports.values()),
        "resets": sum(int(r.get("resets", 0)) for r in reports.values()),
        "gaps": sum(len(r.get("gaps", [])) for r in reports.values()),
        "transports": transports,
        "incidents": incidents,
    }


# -- report files ------------------------------------------------------------------------


def load(sender_file: Path, browser_files: Iterable[Path]) -> tuple[dict, list[dict], list[float]]:
    """(accepted ranges by key id, client reports, round times) from report files."""
    sender = json.loads(Path(sender_file).read_text())
    accepted = {k: v["accepted"] for k, v in sender["keys"].items()}
    clients: list[dict] = []
    for path in browser_files:
        clients += json.loads(Path(path).read_text())["clients"]
    return accepted, clients, sender["round_times"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos_report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sender", type=Path, help="the sender's --report file")
    parser.add_argument("browsers", type=Path, nargs="+", help="browser processes' --report files")
    parser.add_argument(
        "--window",
        type=float,
        nargs=2,
        action="append",
        default=[],
        metavar=("START", "END"),
        help="incident window (wall time)",
    )
    parser.add_argument("--clients", action="store_true", help="print per-client figures too")
    args = parser.parse_args(argv)
    accepted, clients, round_times = load(args.sender, args.browsers)
    result = analyse(accepted, clients, round_times, [tuple(w) for w in args.window])
    json.dump(result if args.clients else result["summary"], sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
