"""The package's layout, read from the source with `ast` (no JAX, nothing compiled): no import cycles, no
`noqa: E402`, data flowing one way through the rooms (docs/architecture.md), and every package in the wheel."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP_PACKAGES = ("dots_jax", "convert", "pallas_kernels")

# Entry points (`python -m ...`) and the module only they share: nothing else in the package may import these.
CLI_MODULES = {"dots_jax.sample", "dots_jax.train", "dots_jax.plan", "dots_jax.demo", "dots_jax.serve",
               "convert.hf_to_jax", "convert.jax_to_hf"}
CLI_SHARED = {"dots_jax.cli"}
# Which rooms each room may not import (module- or function-level). Rooms to the right of a room in
# config -> ops/parallel -> model -> weights -> inference/training -> CLIs are closed to it.
LATER = {"model", "weights", "inference", "training"}
FORBIDDEN = {
    "base": LATER | {"ops", "parallel", "kernels"},
    "kernels": LATER | {"ops", "parallel", "base"},  # Pallas kernels know no model
    "ops": LATER,
    "parallel": LATER,
    "model": {"weights", "inference", "training"},
    "weights": {"inference", "training"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_files() -> dict[str, Path]:
    files = {}
    for top in TOP_PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            files[module_name(path)] = path
    return files


FILES = package_files()
MODULES = set(FILES)


def room(module: str) -> str:
    """The room of a first-party module: its subpackage under dots_jax, or base / kernels / cli / api."""
    parts = module.split(".")
    if parts[0] == "pallas_kernels":
        return "kernels"
    if module in CLI_MODULES or module in CLI_SHARED or parts[0] == "convert":
        return "cli"
    if module == "dots_jax":
        return "api"  # the public-API __init__: it imports every room
    if len(parts) == 2 and f"dots_jax.{parts[1]}" in MODULES and (ROOT / "dots_jax" / parts[1]).is_dir():
        return parts[1]  # a subpackage's __init__
    if len(parts) >= 3:
        return parts[1]
    return "base"  # config, errors, files: used by every room


def imports_of(module: str) -> list[tuple[str, int]]:
    """The first-party modules `module` imports anywhere in its file (top level, functions, classes), with line
    numbers: `from a.b import c` counts as a.b.c when that is a module, else as a.b."""
    path = FILES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in TOP_PACKAGES:
                    found.append((alias.name, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] not in TOP_PACKAGES:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append((sub if sub in MODULES else source, node.lineno))
    return sorted(set(found), key=lambda item: (item[1], item[0]))


def import_graph() -> dict[str, set[str]]:
    return {m: {target for target, _ in imports_of(m)} for m in MODULES}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first within the component)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def test_modules_found():
    assert {"dots_jax", "dots_jax.config", "dots_jax.model.modeling", "convert.hf_to_jax",
            "pallas_kernels.gmm"} <= MODULES


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (module- and function-level imports):\n" + "\n".join(
        " -> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle():
    # Negative control: the checker itself must see a cycle, including one closed by a function-level import.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert sorted(map(tuple, find_cycles(graph))) == [("a", "b", "c", "a"), ("d", "d")]


def test_no_noqa_e402_in_package_code():
    hits = [f"{path.relative_to(ROOT)}:{n}" for path in FILES.values()
            for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"noqa:[^#]*E402", line)]
    assert not hits, "imports below code under noqa: E402 in package code:\n" + "\n".join(hits)


def test_data_flows_one_way():
    violations = []
    for module in sorted(MODULES):
        source_room = room(module)
        for target, line in imports_of(module):
            target_room = room(target)
            if target_room in FORBIDDEN.get(source_room, ()):
                violations.append(f"{FILES[module].relative_to(ROOT)}:{line}: {source_room} imports {target_room} "
                                  f"({module} -> {target})")
            elif (target in CLI_MODULES and target != module) or (target in CLI_SHARED and source_room != "cli"):
                violations.append(f"{FILES[module].relative_to(ROOT)}:{line}: {module} imports the CLI module "
                                  f"{target}")
            elif target == "dots_jax" and module != "dots_jax":
                violations.append(f"{FILES[module].relative_to(ROOT)}:{line}: {module} imports the public-API "
                                  f"package dots_jax (import from the defining module)")
    assert not violations, "imports against the one-way data flow (docs/architecture.md):\n" + "\n".join(violations)


def imported_names(node: ast.Import | ast.ImportFrom) -> list[str]:
    return [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]


def test_package_code_never_imports_the_oracle():
    # torch and transformers are the tests' oracle, never a runtime dependency.
    hits = [f"{FILES[m].relative_to(ROOT)}:{node.lineno}" for m in sorted(MODULES)
            for node in ast.walk(ast.parse(FILES[m].read_text()))
            if isinstance(node, ast.Import | ast.ImportFrom)
            and any(name.split(".")[0] in ("torch", "transformers") for name in imported_names(node))]
    assert not hits, "package code imports torch/transformers:\n" + "\n".join(hits)


def test_every_package_is_in_the_wheel():
    # pyproject lists packages explicitly (so that configs/ can map to dots_jax.configs); a new subpackage left out
    # of the list would be missing from an installed wheel while every test in a checkout still passes.
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {name for name, path in FILES.items() if path.name == "__init__.py"}
    missing = sorted(on_disk - listed)
    assert not missing, f"packages missing from pyproject's [tool.setuptools] packages: {missing}"
    assert {"dots_jax.configs", "dots_jax.demo_model"} <= listed


def test_subpackages_say_what_they_hold():
    missing = [name for name, path in FILES.items()
               if path.name == "__init__.py" and not ast.get_docstring(ast.parse(path.read_text()))]
    assert not missing, f"subpackages without a one-line purpose in their __init__ docstring: {missing}"


def test_rooms():
    assert [room(m) for m in ("dots_jax.config", "dots_jax.errors", "dots_jax.ops.gmm", "dots_jax.parallel",
                              "dots_jax.model.moe", "dots_jax.weights.hf", "dots_jax.inference.generate",
                              "dots_jax.training", "dots_jax.cli", "dots_jax.sample", "convert.hf_to_jax",
                              "pallas_kernels.gmm", "dots_jax")] == [
        "base", "base", "ops", "parallel", "model", "weights", "inference", "training", "cli", "cli", "cli",
        "kernels", "api"]
