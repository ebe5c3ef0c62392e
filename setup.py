"""The one part of Orbited setup.cfg cannot declare: its optional C extension.

orbited.core._speedups (the common browser token's check, orbited/core/_speedups.c) is built
against OpenSSL's libcrypto (Debian: libssl-dev) where a C compiler and the headers are
found. Where they are not, the build goes on without it (optional) and orbited.core.tokens
checks every token in Python: the same decisions, more CPU per WebSocket accept
(docs/performance.md, "Accepts, seventh pass").
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
