"""The layers of the package: imports point down and run in no circle (docs/design.md).

Read from the source (every import, also those inside functions), so a lazy import that runs back
up counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import npdgru

PKG = Path(npdgru.__file__).parent

# top to bottom; a module may import only modules on later lines (its own unit aside)
LAYERS = [
    ["__main__"],
    ["cli"],
    ["explain"],  # a page of what the D-GRU selects: runs an Enhancer's model step by step
    ["train"],  # validation scores DNSMOS with evaluate.metrics
    ["evaluate"],
    ["corpus"],
    ["enhance"],
    ["streaming"],
    ["hop"],
    ["audio", "pcm", "resample"],
    ["shipped"],
    ["model"],
    ["kernels"],
    ["stft"],
    ["convert"],
    ["architectures"],
    ["weights"],
    ["plan"],
    ["kinds"],
    ["reference"],
    ["errors"],
]
LEVEL = {u: i for i, units in enumerate(LAYERS) for u in units}


def _modules() -> dict:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, mods: dict) -> set:
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - (node.level - 1)] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                deps.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod)
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names}
    return {d for d in deps if d.startswith("npdgru.") and d != name}


def _unit(m: str) -> str:
    return m.split(".")[1]


def _graph():
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items() if m != "npdgru"}


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _graph()} - {"_shipped"}
    assert units <= set(LEVEL), f"add to LAYERS (and docs/design.md): {sorted(units - set(LEVEL))}"


def test_imports_point_down():
    up = sorted(f"{m} -> {d}" for m, ds in _graph().items() for d in ds
                if _unit(d) != _unit(m) and _unit(m) in LEVEL and _unit(d) in LEVEL and LEVEL[_unit(d)] <= LEVEL[_unit(m)])
    assert up == [], "imports that run up or sideways:\n" + "\n".join(up)


def test_no_module_imports_in_a_circle():
    g = _graph()
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if d not in g:
                continue
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert cycles == [], "\n".join(cycles)


def _module_names(tree, name: str, mods: dict) -> set:
    """Local names bound to an npdgru module by an import (``from . import corpus as c``, ``import npdgru.x as y``)."""
    is_pkg = mods[name].name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - (node.level - 1)] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out |= {a.asname or a.name for a in node.names if f"{mod}.{a.name}" in mods}
        elif isinstance(node, ast.Import):
            out |= {a.asname for a in node.names if a.asname and a.name in mods}
    return out


def test_no_module_writes_another_modules_private_names():
    """``corpus._ENHANCERS[config] = enh`` from cli.py would tie cli to corpus's insides: a module
    changes another's state through its functions. Assignments to, item assignments into and
    method calls on ``module._name`` are refused."""
    mods = _modules()
    found = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        modules = _module_names(tree, name, mods)

        def private(node):
            return (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and node.attr.startswith("_") and not node.attr.startswith("__"))

        for node in ast.walk(tree):
            hit = None
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and private(node):
                hit = node
            elif isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)) and private(node.value):
                hit = node.value
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and private(node.func.value):
                hit = node.func.value
            if hit is not None:
                found.append(f"{name}:{hit.lineno}: {hit.value.id}.{hit.attr}")
    assert found == [], "\n".join(found)
