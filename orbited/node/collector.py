"""Garbage-collector settings for a node: a server holding many long-lived objects.

CPython's cyclic collector runs a young collection every 700 allocations (net of frees)
and, every so often, a full collection that walks every tracked object in the process.
A node allocates a few objects per event (requests, frames, replies: freed at once by
reference counting, no cycles) and holds a few per connection for hours, so with the
defaults it runs hundreds of young collections per second at load that find nothing to
free, and its full collections grow with the number of connections (≈ 114 ms at 1 500
WebSocket connections in issue 20's study; bench/README.md, "Profiling", measures it).

At start-up, once everything is imported and the listeners are up (``tune``):

- ``gc.freeze()`` moves every object alive then (modules, classes, functions, the
  config, the hub) to the permanent generation: collections no longer walk them. It is
  done **once**, at start-up, never later: objects frozen after a burst of connections
  would never be collected if they were in a cycle, and a closed connection's
  protocol↔transport cycle must still be freed (tests/node/test_collector.py);
- ``gc.set_threshold(*THRESHOLD)``: young collections every 20 000 allocations instead
  of 700 (issue 20's study: gen-0 collections 348 → 69 and gc time 0.38 → 0.11 s over a
  run of 1 500 connections and 20 000 events), the older generations' thresholds kept.
"""

from __future__ import annotations

import gc

THRESHOLD = (20_000, 10, 10)  # gen 0 allocations; gen 1 and 2: CPython's defaults


_tuned = False


def tune(threshold: tuple[int, int, int] = THRESHOLD) -> bool:
    """Collect, freeze what is alive now, and set the thresholds: the first call in a
    process only (True); later calls (a second node service in one process, a restart
    of the service) change nothing and return False."""
    global _tuned
    if _tuned:
        return False
    _tuned = True
    gc.collect()
    gc.freeze()
    gc.set_threshold(*threshold)
    return True
