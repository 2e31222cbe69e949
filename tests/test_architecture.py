"""The layout docs/architecture.md describes, checked against the code.

Every import between ncpipe's packages (deferred imports inside functions included) must point
from a higher layer to a lower one or stay within one layer without a cycle; no module imports
another module's private name; product files name no path of the build machine.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ncpipe"

# Lower layers never import higher ones. A "unit" is a subpackage or a top-level module.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"__init__", "errors"}),
    frozenset({"allocator", "device", "images", "metrics", "io", "entropy", "bitstream", "manifest", "config",
               "resources", "progress"}),
    frozenset({"models", "codec", "codec_cache"}),
    frozenset({"diffusion"}),
    frozenset({"pipeline", "train", "evaluation", "reliability", "operations", "api"}),
    frozenset({"cli", "__main__"}),
)


def unit_of(module: str) -> str:
    """``ncpipe.io.urls`` -> ``io``; ``ncpipe.codec`` -> ``codec``; ``ncpipe`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import in the file, at any depth."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.append((base, [alias.name for alias in node.names], node.lineno))
    return [f for f in found if f[0] == "ncpipe" or f[0].startswith("ncpipe.")]


def source_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def layer_of(unit: str) -> int:
    for index, layer in enumerate(LAYERS):
        if unit in layer:
            return index
    raise AssertionError(f"ncpipe/{unit} is in no layer of tests/test_architecture.py: place it")


def unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in source_files():
        source = unit_of(module_name(path))
        for target, _, _ in imports_of(path):
            if unit_of(target) != source:
                graph.setdefault(source, set()).add(unit_of(target))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_import_cycle_between_packages() -> None:
    cycle = find_cycle(unit_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{path.relative_to(ROOT)}:{line} imports {target} (layer {layer_of(unit_of(target))} > "
        f"{layer_of(unit_of(module_name(path)))})"
        for path in source_files()
        for target, _, line in imports_of(path)
        if layer_of(unit_of(target)) > layer_of(unit_of(module_name(path)))
    ]
    assert not upward, "\n".join(upward)


def test_no_private_name_is_imported_across_modules() -> None:
    private = [
        f"{path.relative_to(ROOT)}:{line} imports {name} from {target}"
        for path in source_files()
        for target, names, line in imports_of(path)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not private, "\n".join(private)


MACHINE_PATHS = re.compile(r"\.\./shared|/work/|/home/\w+|/tmp/pytest")


def product_files() -> list[Path]:
    docs = [p for p in (ROOT / "docs").rglob("*") if p.suffix in {".md", ".txt"}]
    return [*source_files(), *sorted((ROOT / "jobs").glob("*")), *sorted(docs)]


@pytest.mark.parametrize("path", product_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_product_files_name_no_path_of_the_build_machine(path: Path) -> None:
    hits = [f"{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
            if MACHINE_PATHS.search(line)]
    assert not hits, "\n".join(hits)


def test_readme_names_workspace_paths_only_in_its_development_section() -> None:
    readme = (ROOT / "README.md").read_text()
    user_part = readme.split("\n## Development", 1)[0]
    assert not MACHINE_PATHS.search(user_part)
