"""The package's layout shows the data path: no import circle, and no import running back up a layer.

Every import of every module counts, those inside functions too (a lazy import is still a dependency);
only imports for type checkers (``if TYPE_CHECKING:``), which never run, are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "arrayloaders"

# Each layer may import the layers listed for it (and itself); nothing else of the package.
LAYERS = {
    "base": set(),  # errors, interrupts, byte_sizes, example_data
    "store": {"base"},
    "convert": {"base", "store"},
    "loading": {"base", "store"},
    "integrations": {"base", "store", "loading"},  # lightning
    "package": {"base", "store", "convert", "loading", "integrations"},  # __init__: the public names
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] in ("store", "convert", "loading"):
        return parts[0]
    return {"lightning": "integrations", "__init__": "package"}.get(parts[0], "base")


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG).with_suffix("").parts
        out[".".join(parts)] = path
    return out


def imports_of(module: str, path: Path) -> set[str]:
    """The package's modules that ``module`` imports, anywhere in it."""
    known = modules()
    package = module.split(".")[:-1] if not module.endswith("__init__") else module.split(".")[:-1]
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n) for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for n in ast.walk(block)
    }  # fmt: skip
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and (node.module == "arrayloaders" or node.module.startswith("arrayloaders.")):
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # from .store import shards: the module shards
                name = ".".join([*target, alias.name])
                found.add(name if name in known else ".".join(target) or "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("arrayloaders."):
                    found.add(alias.name.split(".", 1)[1])
        elif isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "_PUBLIC":  # names imported on first use
            found |= {v.value.lstrip(".") for v in node.value.values}
    found = {m if m in known else m + ".__init__" if m + ".__init__" in known else m for m in found}
    return {m for m in found if m in known and m != module}


GRAPH = {m: imports_of(m, p) for m, p in modules().items()}


def test_the_graph_sees_the_imports_it_must():
    assert "loading.engine" in GRAPH["loading.dataset"] or "loading.runtime" in GRAPH["loading.dataset"]
    assert "store.shards" in GRAPH["store.zarr_layout"]
    assert "loading.dataset" in GRAPH["__init__"]  # the lazy public names count


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_runs_back_up_a_layer(module):
    allowed = LAYERS[layer_of(module)] | {layer_of(module)}
    wrong = sorted(m for m in GRAPH[module] if layer_of(m) not in allowed)
    assert not wrong, f"{module} ({layer_of(module)}) imports {wrong}"


def test_no_import_circle():
    seen: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for n in sorted(GRAPH[m]):
            if seen.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(n) :], n]))
            if n not in seen:
                visit(n, [*path, n])
        seen[m] = 2

    for m in sorted(GRAPH):
        if m not in seen:
            visit(m, [m])


def test_no_module_is_over_700_lines():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 700}
    assert not long, long
