"""The import rules of the package layout (CONTRIBUTING.md, docs/architecture.md), read
from the source with ``ast`` — module-level and function-level imports alike:

(a) ``orbited.core`` and ``orbited.sp`` import no twisted, autobahn, txaio, klein or zope:
    web apps, the blocking client, HaloD, bench and fuzz stand on them;
(b) ``orbited.node`` never imports ``halod``; ``halod`` takes from ``orbited`` only
    ``orbited.core``, ``orbited.sp``, ``orbited.runtime`` and ``orbited.__version__``;
    ``orbited.core``, ``orbited.sp`` and ``orbited.runtime`` import nothing from
    ``orbited.node``, ``orbited.client`` or ``halod``; no product code imports klein (the
    demo's, in the ``demo`` extra);
(c) only ``orbited/runtime/twisted_compat.py`` uses a private upstream name: an import
    of an underscore name or module from twisted/autobahn/txaio/klein, an attribute
    ``._x`` (not a dunder) that our own code defines nowhere, one of the known internals
    without an underscore (``dataBuffer``, ``send_queue``, ...), an underscore member of
    an upstream base class read, written or overridden by our subclass, or an assignment
    to an upstream module or class (a monkeypatch);
(d) ``import orbited.client.blocking`` loads no twisted, autobahn, txaio, klein or
    opentelemetry module; nothing on the node's or the clients' paths loads opentelemetry
    until OpenTelemetry is turned on (the ``otel`` extra is optional).

The checker is plain functions over a source root, so the tests below also run it on
synthetic trees to show it reports what it should.
"""

from __future__ import annotations

import ast
import configparser
import importlib
import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("orbited", "halod", "twisted/plugins")  # the installed code
COMPAT = "orbited/runtime/twisted_compat.py"
UPSTREAM = ("twisted", "autobahn", "txaio", "klein", "zope")
PRIVATE_UPSTREAM = ("twisted", "autobahn", "txaio", "klein")
# Upstream internals whose names carry no underscore, and underscore internals flagged
# even where our own code happens to define a name like them.
KNOWN_INTERNALS = frozenset({
    "dataBuffer", "_tempDataBuffer", "_tempDataLen",  # twisted FileDescriptor
    "send_queue", "_perMessageCompress",  # autobahn WebSocketProtocol
    "_port", "_getPort", "_maybeGlobalReactor",  # twisted.application.internet
    "_respondToBadRequestAndDisconnect", "_receivedHeaderSize", "_receivedHeaderCount",
})  # fmt: skip
# Underscore names that are public API of the standard library.
STDLIB_PUBLIC = frozenset({"_exit", "_replace", "_asdict", "_fields", "_make"})


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: ({self.rule}) {self.detail}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(root: Path, tops: tuple[str, ...] = PRODUCT) -> Iterator[Path]:
    for top in tops:
        if (root / top).is_dir():
            yield from sorted(p for p in (root / top).rglob("*.py") if "__pycache__" not in p.parts)


def imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """Every module (or ``module.name``) the code imports, wherever the import stands,
    relative imports resolved; ``importlib.import_module("x")`` / ``__import__("x")``
    with a literal name too."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{base}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            yield node.lineno, node.args[0].value


def within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def import_violations(path: Path, root: Path) -> Iterator[Violation]:
    module = module_name(path, root)
    rel = str(path.relative_to(root))
    tree = ast.parse(path.read_text(), rel)
    found: dict[tuple[int, str], Violation] = {}  # one per line and rule
    for line, target in imports(tree, module, path.name == "__init__.py"):
        for violation in _import_rules(rel, module, line, target):
            found.setdefault((line, violation.rule), violation)
    yield from found.values()


def _import_rules(rel: str, module: str, line: int, target: str) -> Iterator[Violation]:
    def bad(rule: str, why: str) -> Violation:
        return Violation(rel, line, rule, f"{module} imports {target}: {why}")

    if within(module, "orbited.core", "orbited.sp") and within(target, *UPSTREAM):
        yield bad("a", "the cores stay free of Twisted and its family")
    if within(module, "orbited.node") and within(target, "halod"):
        yield bad("b", "the node never imports HaloD")
    if (
        within(module, "halod")
        and within(target, "orbited")
        and not (
            within(target, "orbited.core", "orbited.sp", "orbited.runtime")
            or target in ("orbited", "orbited.__version__")
        )
    ):
        yield bad("b", "HaloD uses only orbited.core, sp, runtime and __version__")
    if within(module, "orbited.core", "orbited.sp", "orbited.runtime") and within(
        target, "orbited.node", "orbited.client", "halod"
    ):
        yield bad("b", "core, sp and runtime import nothing above them")
    above_sp = within(target, "orbited") and not within(target, "orbited.sp")
    if within(module, "orbited.sp") and above_sp:
        yield bad("b", "sp is the bottom layer: it imports nothing else from orbited")
    if within(target, "klein"):
        yield bad("b", "klein is the demo's (the `demo` extra), not the product's")
    if (
        rel != COMPAT
        and within(target, *PRIVATE_UPSTREAM)
        and any(part.startswith("_") and not part.startswith("__") for part in target.split("."))
    ):
        yield bad("c", "a private upstream name (only twisted_compat may use one)")


def our_definitions(root: Path, tops: tuple[str, ...] = PRODUCT) -> set[str]:
    """Every name our own code defines: functions, methods, classes, class attributes,
    module globals, attributes assigned on any object (``self._x = ...``), parameters."""
    names: set[str] = set()
    for path in source_files(root, tops):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
            ):
                names.update(
                    c.value for c in ast.walk(node.value)
                    if isinstance(c, ast.Constant) and isinstance(c.value, str)
                )  # fmt: skip
    return names


def attribute_uses(tree: ast.AST) -> Iterator[tuple[int, str, bool]]:
    """(line, name, is_definition) of every attribute the code reads or writes —
    ``obj.name``, ``getattr(obj, "name")`` (also hasattr, setattr, delattr) — and of every
    function it defines (overriding an upstream internal is using it)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            yield node.lineno, node.attr, False
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.lineno, node.name, True
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            yield node.lineno, node.args[1].value, False


def private_violations(path: Path, root: Path, ours: set[str]) -> Iterator[Violation]:
    rel = str(path.relative_to(root))
    if rel == COMPAT:
        return
    for line, name, is_definition in attribute_uses(ast.parse(path.read_text(), rel)):
        if name in STDLIB_PUBLIC:
            continue
        if name in KNOWN_INTERNALS:
            yield Violation(rel, line, "c", f"upstream internal {name!r}")
        elif (
            not is_definition
            and name.startswith("_")
            and not (name.startswith("__") and name.endswith("__"))
            and name not in ours
        ):
            yield Violation(rel, line, "c", f"private name {name!r} not defined by us")


def subclass_violations(path: Path, root: Path, module: object) -> Iterator[Violation]:
    """A class of ours deriving from an upstream class must not read, write or define an
    underscore name that an upstream class in its MRO defines (an override of a private
    hook, a private class attribute), whatever it is called: found from the imported
    classes, so it needs no list."""
    rel = str(path.relative_to(root))
    if rel == COMPAT:
        return
    for node in ast.walk(ast.parse(path.read_text(), rel)):
        if not isinstance(node, ast.ClassDef):
            continue
        cls = getattr(module, node.name, None)
        if not isinstance(cls, type):
            continue
        upstream = [k for k in cls.__mro__ if k.__module__.split(".")[0] in PRIVATE_UPSTREAM]
        for line, name, _ in attribute_uses(node):
            if not name.startswith("_") or (name.startswith("__") and name.endswith("__")):
                continue
            owner = next((k for k in upstream if name in vars(k)), None)
            if owner is not None:
                yield Violation(
                    rel, line, "c", f"{node.name}.{name} is {owner.__module__}.{owner.__name__}'s"
                )


def import_file(path: Path, root: Path) -> object | None:
    """The module, imported: ours by name; a synthetic one (the checker's own tests) from
    its file, or None if it cannot run outside its tree."""
    name = module_name(path, root)
    if root == ROOT:
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(f"layout_check_{name.replace('.', '_')}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:
        return None
    return module


def patch_violations(path: Path, root: Path) -> Iterator[Violation]:
    """Assigning to a name of an upstream module (``autobahn...protocol.pformat = ...``):
    a process-wide patch of upstream's internals."""
    rel = str(path.relative_to(root))
    if rel == COMPAT:
        return
    tree = ast.parse(path.read_text(), rel)
    modules: set[str] = set()  # local names bound to upstream modules or their members
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if within(alias.name, *PRIVATE_UPSTREAM):
                    modules.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and within(node.module or "", *PRIVATE_UPSTREAM):
            modules.update(alias.asname or alias.name for alias in node.names)
    for node in ast.walk(tree):
        target = None
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)):
            target = node.value
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("setattr", "delattr")
            and node.args
        ):
            target = node.args[0]
        while isinstance(target, ast.Attribute):
            target = target.value
        if isinstance(target, ast.Name) and target.id in modules:
            yield Violation(rel, node.lineno, "c", f"patches upstream {target.id!r}")


def check(root: Path, tops: tuple[str, ...] = PRODUCT) -> list[Violation]:
    ours = our_definitions(root, tops)
    found: list[Violation] = []
    for path in source_files(root, tops):
        found += import_violations(path, root)
        found += private_violations(path, root, ours)
        found += patch_violations(path, root)
        if "plugins" not in path.relative_to(root).parts:  # twistd's dropins: not modules
            module = import_file(path, root)
            if module is not None:
                found += subclass_violations(path, root, module)
    return found


# -- the tree ---------------------------------------------------------------------------


def test_the_tree_follows_the_import_rules():
    violations = [v for v in check(ROOT) if v.rule in ("a", "b")]
    assert not violations, "\n".join(map(str, violations))


def test_only_twisted_compat_uses_private_upstream_names():
    violations = [v for v in check(ROOT) if v.rule == "c"]
    assert not violations, "\n".join(map(str, violations))


def loaded_by(statements: str, tops: tuple[str, ...]) -> list[str]:
    """The modules under ``tops`` that running ``statements`` loads in a fresh interpreter."""
    # What the statements load, not what the interpreter had before them: an old
    # zope.interface (6.0, our lower bound) installs a -nspkg.pth that imports the bare
    # `zope` namespace package into every interpreter at start-up.
    code = (
        "import json, sys; before = set(sys.modules)\n"
        f"{statements}\n"
        "print(json.dumps(sorted(m for m in set(sys.modules) - before "
        f"if m.split('.')[0] in {list(tops)!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return list(json.loads(out.splitlines()[-1]))


def test_the_blocking_client_loads_no_twisted_autobahn_or_klein():
    assert loaded_by("import orbited.client.blocking", (*UPSTREAM, "opentelemetry")) == []


def test_halod_starts_without_websocket_or_token_libraries():
    # A restarting HaloD competes for the CPU with traffic it must not delay (issue 16):
    # autobahn, PyJWT and cryptography are the node's and the web app's, not HaloD's.
    assert loaded_by("import halod.cli", ("autobahn", "jwt", "cryptography")) == []


def test_opentelemetry_is_loaded_only_when_turned_on():
    """The otel extra is optional and its import costs: the node (its service, hub and
    otel module, a service built with the default config) and the clients (a client
    made without otel=True) never load it."""
    pytest.importorskip("opentelemetry.sdk")  # else "not loaded" proves nothing
    statements = (
        "import orbited.client, orbited.client.twisted, orbited.client.otel\n"
        "import orbited.node.service, orbited.node.hub, orbited.node.otel\n"
        "from orbited.node.config import NodeConfig\n"
        "from orbited.node.otel import build\n"
        "assert build(NodeConfig(), 'n1') is None\n"
        "from orbited.client import BlockingClient, Cluster, Node\n"
        "BlockingClient(Cluster([Node('tcp://127.0.0.1:9', 'http://127.0.0.1:8')])).close()"
    )
    assert loaded_by(statements, ("opentelemetry",)) == []
    # ...and the check sees it when it is loaded.
    assert "opentelemetry.sdk.trace" in loaded_by(
        "from orbited.node.otel import OtelConfig, observer\n"
        "observer(OtelConfig(exporter='memory'), 'n1')",
        ("opentelemetry",),
    )


def test_klein_is_only_in_the_demo_extra():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")

    def names(text: str) -> dict[str, str]:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return {re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].lower(): line for line in lines}

    extras = cfg["options.extras_require"]
    assert "klein" not in names(cfg["options"]["install_requires"])
    demo, test = names(extras["demo"]), names(extras["test"])
    assert "klein" in demo
    # The tests exercise the demo: the test extra holds the demo's requirements, equal.
    assert all(test.get(name) == line for name, line in demo.items())


def test_opentelemetry_is_only_in_the_otel_extra_and_the_tests_have_it():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")

    def names(text: str) -> dict[str, str]:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return {re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].lower(): line for line in lines}

    extras = cfg["options.extras_require"]
    required = names(cfg["options"]["install_requires"])
    assert not [name for name in required if name.startswith("opentelemetry")]
    otel, test = names(extras["otel"]), names(extras["test"])
    assert set(otel) == {
        "opentelemetry-api", "opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http"
    }  # fmt: skip
    # CI installs the test extra: the OTel tests run there, at the same bounds.
    assert all(test.get(name) == line for name, line in otel.items())


def test_the_demo_imports_with_the_demo_extra():
    code = "import cherrychat.app, klein; print('ok')"  # as ./dev run starts it
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT / "demos", capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    assert out.strip() == "ok"


# -- the checker itself, on synthetic trees ---------------------------------------------


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    for parent in path.relative_to(root).parents:
        if str(parent) != ".":
            (root / parent / "__init__.py").touch()
    path.write_text(text)


def rules(found: list[Violation]) -> list[tuple[str, str, str]]:
    return [(v.path, v.rule, v.detail.split(": ")[0]) for v in found]


def test_the_checker_reports_twisted_imported_by_the_core(tmp_path):
    write(tmp_path, "orbited/core/clean.py", "import json\n")
    assert check(tmp_path) == []
    write(tmp_path, "orbited/core/bad.py", "from twisted.internet import reactor\n")
    found = check(tmp_path)
    assert ("orbited/core/bad.py", "a", "orbited.core.bad imports twisted.internet") in rules(found)
    # Inside a function, and as a plain import, in sp: reported as well.
    write(tmp_path, "orbited/sp/lazy.py", "def f():\n    import autobahn.websocket\n")
    assert ("orbited/sp/lazy.py", "a", "orbited.sp.lazy imports autobahn.websocket") in rules(
        check(tmp_path)
    )


@pytest.mark.parametrize(
    ("rel", "text", "rule"),
    [
        ("orbited/node/x.py", "from halod import membership\n", "b"),
        ("orbited/node/x.py", "def f():\n    from halod.server import S\n", "b"),
        ("halod/x.py", "from orbited.node.hub import Hub\n", "b"),
        ("halod/x.py", "from orbited import node\n", "b"),
        ("halod/x.py", "import importlib\nimportlib.import_module('orbited.client')\n", "b"),
        ("orbited/runtime/x.py", "from ..node import hub\n", "b"),
        ("orbited/core/x.py", "from orbited.client.blocking import BlockingClient\n", "b"),
        ("orbited/sp/x.py", "from orbited.core.keys import ConnectionKey\n", "b"),
        ("orbited/node/x.py", "from klein import Klein\n", "b"),
        (
            "orbited/node/x.py",
            "from twisted.application.internet import _maybeGlobalReactor\n",
            "c",
        ),  # fmt: skip
        ("halod/x.py", "def f(server):\n    return server._port\n", "c"),
        ("orbited/node/x.py", "def f(t):\n    return len(t.dataBuffer)\n", "c"),
        ("orbited/node/x.py", "def f(p):\n    return p._perMessageCompress\n", "c"),
        ("orbited/node/x.py", "class C:\n    def _getPort(self):\n        pass\n", "c"),
        ("orbited/node/x.py", "def f(r):\n    r._log.info('x')\n", "c"),
        ("orbited/node/x.py", "def f(r):\n    return getattr(r, '_log')\n", "c"),
        ("orbited/node/x.py", "import argparse\nargparse.ArgumentParser()._actions\n", "c"),
        (
            "orbited/node/x.py",
            "from twisted.web.http import HTTPChannel\n"
            "class C(HTTPChannel):\n    def _finishRequestBody(self, data):\n        pass\n",
            "c",
        ),  # fmt: skip
        (
            "orbited/node/x.py",
            "from twisted.web.http import HTTPChannel\n"
            "class C(HTTPChannel):\n    def f(self):\n        return self._transferDecoder\n",
            "c",
        ),  # fmt: skip
        ("orbited/node/x.py", "import autobahn.websocket.protocol as p\np.pformat = str\n", "c"),
        (
            "orbited/node/x.py",
            "from twisted.web import http\nhttp.HTTPChannel.maxHeaders = 5\n",
            "c",
        ),  # fmt: skip
    ],
)
def test_the_checker_reports_each_kind_of_violation(tmp_path, rel, text, rule):
    write(tmp_path, rel, text)
    found = check(tmp_path)
    assert [(v.path, v.rule) for v in found] == [(rel, rule)], found


@pytest.mark.parametrize(
    ("rel", "text"),
    [
        ("halod/x.py", "from orbited import __version__\nfrom orbited.core.keys import K\n"),
        ("halod/x.py", "from orbited.runtime.twisted_compat import listening_port\n"),
        ("orbited/node/x.py", "from twisted.internet import reactor\n"),
        (
            "orbited/node/x.py",
            "class C:\n    def __init__(self):\n        self._own = 1\n"
            "    def f(self, other):\n        return other._own\n",
        ),  # fmt: skip
        ("orbited/node/x.py", "def f(p):\n    return p.__class__, p._replace(a=1)\n"),
        ("orbited/runtime/twisted_compat.py", "def f(s):\n    return s._port, s.send_queue\n"),
    ],
)
def test_the_checker_accepts_what_the_rules_allow(tmp_path, rel, text):
    write(tmp_path, rel, text)
    assert check(tmp_path) == []
