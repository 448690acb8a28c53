"""The shape of the code, checked: no import cycles (type-only ones included), no launcher
module over ~600 lines, every backend a package of the same shape, every workload kind
registered under its own name.

The import graph is read with ``ast`` from the files themselves: every ``import`` anywhere
in a module (at the top, under ``if TYPE_CHECKING:``, inside a function) is an edge from the
module to the module it names: ``from a.b import c`` names ``a.b.c`` when that is a module
of the tree, else ``a.b``. A package's ``__init__.py`` is the package itself; importing a
submodule is not counted as importing its parent package (Python runs the parent's
``__init__`` first, but the parent may import its submodules without making a cycle).
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.backends import BACKENDS, get_backend
from launcher.backends.base import Backend
from launcher.workloads import WORKLOADS, workload_class
from launcher.workloads.base import Workload
from tests.conftest import REPO

PACKAGES = ("launcher", "adapter")
MAX_LINES = 600
BACKEND_MODULES = {"__init__", "config", "rules", "render", "client"}
"""Every backend package holds these modules (see launcher/backends/base.py), and besides
them only parts of its client (``client_<part>.py``: I/O too big for one module)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def tree_modules() -> dict[str, Path]:
    """Every module of ``PACKAGES``, by its dotted name."""
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
    }


def imported(name: str, path: Path, modules: set[str]) -> set[str]:
    """The modules of the tree that module ``name`` (at ``path``) imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.append(submodule if submodule in modules else base)
    found = set()
    for target in targets:
        while target and target not in modules:  # a name inside a module, or not ours
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = tree_modules()
    return {name: imported(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    done: set[str] = set()
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> list[str] | None:
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target in on_stack:
                return [*stack[stack.index(target) :], target]
            if target not in done:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        on_stack.discard(node)
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def registry_edges() -> dict[str, set[str]]:
    """The registries import their entries by name (``importlib``): edges all the same."""
    return {
        "launcher.backends": {spec.split(":")[0] for spec in BACKENDS.values()},
        "launcher.workloads": {spec.split(":")[0] for spec in WORKLOADS.values()},
    }


def own_docstring(cls: type) -> bool:
    """Whether ``cls`` has a docstring of its own (a dataclass without one gets its signature)."""
    doc = vars(cls).get("__doc__") or ""
    return bool(doc.strip()) and not doc.startswith(f"{cls.__name__}(")


# --- imports ------------------------------------------------------------------------------


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    for registry, entries in registry_edges().items():
        graph[registry] |= entries
    assert find_cycle(graph) is None


def test_type_only_and_function_level_imports_are_edges(tmp_path: Path) -> None:
    path = tmp_path / "mod.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "from pkg import sub, VALUE\n"
        "if TYPE_CHECKING:\n"
        "    from pkg.other import Thing\n"
        "def load():\n"
        "    import pkg.lazy.inner\n"
    )
    modules = {"pkg", "pkg.mod", "pkg.sub", "pkg.other", "pkg.lazy"}
    assert imported("pkg.mod", path, modules) == {"pkg", "pkg.sub", "pkg.other", "pkg.lazy"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_launcher_module_imports_torch_or_a_cluster_sdk() -> None:
    """Start-up time: planning and rendering import neither torch nor an SDK (those load
    lazily, where a backend's client talks to its cluster)."""
    names = sorted(name for name in tree_modules() if name.split(".")[0] == "launcher")
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "heavy = ('torch', 'sagemaker', 'kubernetes', 'boto3', 'hydra')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout == "[]\n"


# --- sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_is_over_600_lines(package: str) -> None:
    sizes = {
        str(path.relative_to(REPO)): len(path.read_text().splitlines())
        for path in (REPO / package).rglob("*.py")
    }
    assert {path: lines for path, lines in sizes.items() if lines > MAX_LINES} == {}


def test_the_adapter_imports_nothing_of_the_launcher() -> None:
    """The training job runs without the launcher's dependencies (hydra, SDKs)."""
    crossing = {
        name: sorted(target for target in targets if target.startswith("launcher"))
        for name, targets in import_graph().items()
        if name.startswith("adapter")
    }
    assert {name: targets for name, targets in crossing.items() if targets} == {}


def test_every_adapter_class_says_what_it_is() -> None:
    undocumented = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name}"
        for path in sorted((REPO / "adapter").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and not ast.get_docstring(node)
    ]
    assert undocumented == []


# --- backends and workloads ---------------------------------------------------------------


def test_every_backend_directory_is_registered() -> None:
    packages = (REPO / "launcher/backends").iterdir()
    directories = {path.name for path in packages if (path / "__init__.py").is_file()}
    assert directories == set(BACKENDS)


@pytest.mark.parametrize("cluster_type", sorted(BACKENDS))
def test_every_backend_is_a_package_of_the_same_shape(cluster_type: str) -> None:
    package = BACKENDS[cluster_type].split(":")[0]
    files = {path.stem for path in (REPO / package.replace(".", "/")).glob("*.py")}
    assert {name for name in files if not name.startswith("client_")} == BACKEND_MODULES
    backend = get_backend(cluster_type)
    assert isinstance(backend, Backend) and backend.type == cluster_type
    parts = {"rules": backend.checks, "render": backend.renderer, "client": backend.client}
    for part, module in parts.items():
        assert module is importlib.import_module(f"{package}.{part}")
    assert backend.rules is backend.checks.RULES
    assert callable(backend.checks.hint_for_secret)
    assert callable(backend.renderer.artifacts)
    for name in ("resolve", "submit", "status", "logs", "cancel"):
        assert callable(getattr(backend.client, name)), name


@pytest.mark.parametrize("cluster_type", sorted(BACKENDS))
def test_every_backend_and_config_class_says_what_it_is(cluster_type: str) -> None:
    package = BACKENDS[cluster_type].split(":")[0]
    config = importlib.import_module(f"{package}.config")
    classes = [
        value
        for value in vars(config).values()
        if isinstance(value, type) and value.__module__ == config.__name__
    ]
    backend = type(get_backend(cluster_type))
    assert backend.cluster_schema in classes
    assert [cls.__name__ for cls in [backend, *classes] if not own_docstring(cls)] == []


@pytest.mark.parametrize("kind", sorted(WORKLOADS))
def test_every_workload_kind_is_registered_under_its_name(kind: str) -> None:
    workload = workload_class(kind)
    assert issubclass(workload, Workload) and workload.kind == kind
    assert own_docstring(workload)
