"""The one part of Orbited setup.cfg cannot declare: its optional C extension.

orbited.core._speedups (orbited/core/_speedups.c: C twins of the node's hot pure functions,
the browser token's check, the request head's and the event request's reading, the route
and the WebSocket accept key) is built against OpenSSL's libcrypto (Debian: libssl-dev)
where a C compiler and the headers are found. Where they are not, the build goes on
without it (optional) and their Python twins run: the same results, more CPU per
WebSocket accept and per event (docs/performance.md, "Accepts, seventh pass").
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "orbited.core._speedups",
            ["orbited/core/_speedups.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
