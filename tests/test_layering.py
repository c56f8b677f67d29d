"""The package's layers import one way only, and no two modules import each other.

Every import of every module of ``nemo_mla_lora`` (module level and inside functions alike, read with ``ast``)
must go to a module of the same folder or of a folder in a lower layer:

    0  arch, runtime, data, inference.kernels   model description, process/compat shims, tiny data, Triton kernels
    1  peft, reference                          the adapters (and their merge math); the plain-torch equations
    2  checkpoints                              every checkpoint reader/writer (saves adapters: needs peft)
    3  models                                   Megatron-Core model builders (architecture read from checkpoints)
    4  export                                   the export pipeline (merge, write, verify)
    5  inference, training                      the serving engine; the trainers
    6  callbacks, config                        the export-at-train-end callback; typed configs and checks
    7  recipes                                  the ``python -m nemo_mla_lora.recipes.*`` entry points

Two folders of one layer do not import each other. The package root (``nemo_mla_lora/__init__.py``: the
NeMo registration hook) may be imported by any layer and imports nothing at module level. Nothing in the package
imports ``studies`` (the placement study is built on the package, not part of it).

Cycles: the module-level import graph (what runs at import time) has none. Imports inside functions may go both
ways between modules of one folder (e.g. a reader that hands a file to its sibling); never across layers.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "nemo_mla_lora"
LAYERS = [
    {"arch", "runtime", "data", "inference.kernels"},
    {"peft", "reference"},
    {"checkpoints"},
    {"models"},
    {"export"},
    {"inference", "training"},
    {"callbacks", "config"},
    {"recipes"},
]
RANK = {folder: rank for rank, folders in enumerate(LAYERS) for folder in folders}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def imports(name: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in module ``name`` of a name under
    ``nemo_mla_lora`` or ``studies``; ``from pkg import sub`` counts as importing the module ``pkg.sub``."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = name.split(".") if is_package(name) else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out += [(t, node.lineno, id(node) in top) for t in targets if t.split(".")[0] in (PACKAGE, "studies")]
    return out


def folder(name: str) -> str | None:
    """The layer folder of a module (``inference.kernels`` before ``inference``); None for the package root."""
    parts = name.split(".")[1:]
    if not parts:
        return None
    if parts[0] == "inference" and len(parts) > 1 and parts[1] == "kernels":
        return "inference.kernels"
    return parts[0]


def test_every_folder_has_a_layer():
    folders = {folder(m) for m in MODULES} - {None}
    assert folders == set(RANK), (
        f"folders without a layer: {sorted(folders - set(RANK))}, "
        f"layers without a folder: {sorted(set(RANK) - folders)}"
    )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_down_the_layers(name):
    own = folder(name)
    wrong = []
    for target, line, top_level in imports(name):
        if target.split(".")[0] == "studies":
            wrong.append(f"line {line}: {target} (the package must not import studies)")
            continue
        there = folder(target)
        if target not in MODULES:
            wrong.append(f"line {line}: {target} (no such module)")
        elif own is None:
            if top_level:
                wrong.append(f"line {line}: {target} (the package root imports nothing at module level)")
        elif there is not None and there != own and RANK[there] >= RANK[own]:
            wrong.append(f"line {line}: {target} (layer {RANK[there]} {there}) from layer {RANK[own]} {own}")
    assert not wrong, f"{MODULES[name].relative_to(ROOT)} imports upward or sideways:\n  " + "\n  ".join(wrong)


def find_cycle(graph: dict) -> list[str] | None:
    """One cycle of ``graph`` (node -> set of nodes) as a path, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_module_level_import_cycles():
    graph = {m: {t for t, _, top in imports(m) if top and t in MODULES and t != m} for m in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    """The check above can fail: a constructed graph with a cycle is reported as one."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
