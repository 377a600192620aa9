"""The package's imports point one way: each module imports only its own layer or those below it, as
docs/architecture.md lists them, and no modules import each other in a circle."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PACKAGE = REPO / "thalia_ray"
TOP = PACKAGE.name


def documented_layers() -> dict[str, int]:
    """{module prefix: layer number} from the ```layers block of docs/architecture.md."""
    text = (REPO / "docs" / "architecture.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```layers block"
    layers: dict[str, int] = {}
    for line in block.group(1).strip().splitlines():
        number, _, rest = line.partition(" ")
        _, _, names = rest.partition(":")
        for name in (n.strip() for n in names.split(",")):
            assert name not in layers, f"{name} is listed twice"
            layers[name] = int(number)
    return layers


def modules() -> dict[str, Path]:
    """Every module of the package by its name relative to the package (`data.schema`; a package by its own name)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name:
            found[name] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    return {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
            for n in ast.walk(node)}


def imported_names(name: str, path: Path) -> set[str]:
    """Everything of the package `name` imports, at module level or inside functions (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                above = [TOP, *package.split(".")] if package else [TOP]
                above = above[: len(above) - node.level + 1]
                base = ".".join(above + ([base] if base else []))
            out.update(f"{base}.{a.name}" for a in node.names)
            out.add(base)
    return {n.removeprefix(TOP + ".") for n in out if n.startswith(TOP + ".")}


def import_graph() -> dict[str, set[str]]:
    """{module: modules it depends on}; `from pkg import mod` is an edge to `pkg.mod`, and an edge to a
    package whose `__init__` imports nothing is dropped (running it carries no dependency)."""
    mods = modules()
    imports = {name: imported_names(name, path) for name, path in mods.items()}

    def resolve(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    graph = {}
    for name, targets in imports.items():
        resolved = {resolve(t) for t in targets} - {None, name}
        graph[name] = {r for r in resolved if not name.startswith(r + ".")
                       and not (mods[r].name == "__init__.py" and not imports[r] and
                                any(t != r and t.startswith(r + ".") for t in targets))}
    return graph


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    prefixes = [p for p in layers if module == p or module.startswith(p + ".")]
    return layers[max(prefixes, key=len)] if prefixes else None


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_documented_layer() -> None:
    layers = documented_layers()
    assert [m for m in sorted(modules()) if layer_of(m, layers) is None] == []


def test_no_import_points_up_a_layer() -> None:
    layers = documented_layers()
    upward = [f"{m} (layer {layer_of(m, layers)}) imports {t} (layer {layer_of(t, layers)})"
              for m, targets in sorted(import_graph().items()) for t in sorted(targets)
              if (layer_of(t, layers) or 0) > (layer_of(m, layers) or 0)]
    assert upward == []


def test_no_modules_import_each_other_in_a_circle() -> None:
    assert circles(import_graph()) == []


def test_config_depends_on_the_base_layer_only() -> None:
    layers = documented_layers()
    assert {t for t in import_graph()["config"] if layer_of(t, layers) != 0} == set()


def test_the_checker_sees_function_level_imports_and_circles(tmp_path: Path) -> None:
    """The checks above could pass by reading too little: they must see an import inside a function."""
    source = "def f():\n    from thalia_ray.store.layout import ExperimentStore\n    from . import records\n"
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert imported_names("store.probe", path) >= {"store.layout.ExperimentStore", "store.records"}
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", ["thalia_ray.config", "thalia_ray.ids", "thalia_ray.models.registry"])
def test_the_base_and_config_import_neither_torch_nor_ray(module: str) -> None:
    """Validating a configuration must stay cheap: a fresh interpreter imports the module and neither library."""
    code = f"import sys, {module}; print(sorted({{'torch', 'ray'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def _top_level_names(path: Path) -> set[str]:
    """Names a module binds at its top level (including under if/try), as `from module import name` finds them."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def test_every_name_imported_from_the_package_exists() -> None:
    """A module moved or a name removed leaves no import behind, even one inside a function that no test runs."""
    mods = modules()
    bound = {name: _top_level_names(path) for name, path in mods.items()}
    bound[""] = _top_level_names(PACKAGE / "__init__.py")
    missing = []
    for name, path in sorted(mods.items()):
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = node.module or ""
            if node.level:
                above = [TOP, *package.split(".")] if package else [TOP]
                base = ".".join(above[: len(above) - node.level + 1] + ([base] if base else []))
            if base != TOP and not base.startswith(TOP + "."):
                continue
            source = base.removeprefix(TOP).removeprefix(".")
            for alias in node.names:
                target = f"{source}.{alias.name}".strip(".")
                if target not in mods and alias.name not in bound.get(source, set()):
                    missing.append(f"{name}: from {base} import {alias.name}")
    assert missing == []
