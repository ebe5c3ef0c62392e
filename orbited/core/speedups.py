"""The C twins of the accept path's pure functions (orbited/core/_speedups.c), if built.

setup.py builds them where a C compiler, the Python headers and OpenSSL's headers are
found at install; where not, the install goes on without them and every caller uses its
Python twin: the same results, more CPU per WebSocket accept (docs/performance.md,
"Accepts, seventh pass"). The node says so in its log at start (``NOT_BUILT``).
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
    "when Orbited was installed): browser tokens, request heads, routes and WebSocket accept "
    "keys are handled in Python, about 40 % more CPU per WebSocket accept; reinstall with "
    "them (Debian: gcc python3-dev libssl-dev) to build it"
)
