"""The C twins of the node's hot pure functions (orbited/core/_speedups.c), if built.

setup.py builds them where a C compiler, the Python headers and OpenSSL's headers are
found at install; where not, the install goes on without them and every caller uses its
Python twin: the same results, more CPU per WebSocket accept and per event
(docs/performance.md, "Accepts, seventh pass" and "The per-event path, sixth pass"). The
node says so in its log at start (``NOT_BUILT``).
"""

from __future__ import annotations

from types import ModuleType

native: ModuleType | None
try:
    from orbited.core import _speedups as native
except ImportError:  # not built
    native = None

NOT_BUILT = (
    "orbited.core._speedups is not built (no C compiler, Python headers or OpenSSL headers "
    "when Orbited was installed): browser tokens, request heads, event requests, routes and "
    "WebSocket accept keys are handled in Python, about 50 % more CPU per WebSocket accept "
    "and 10 % per event; reinstall with them (Debian: gcc python3-dev libssl-dev) to build it"
)
