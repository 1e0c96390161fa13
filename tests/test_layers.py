"""The package's dependency direction, read from every import statement (function-level ones too).

    format <- sources <- execution <- decode / eval <- api <- cli
    quant imports only format and sources; cuda imports only format

A lower layer never imports a higher one, and no two modules import each other, directly or
through others: a function-level import can hide a cycle from Python, not from this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "quant", "runtime", "cuda")

# Layer of a module: its longest matching prefix here.
LAYER_OF = {
    "llmq": "base",
    "llmq.errors": "base",
    "llmq.runtime": "base",  # the package docstring only
    "llmq.runtime.format": "format",
    "llmq.runtime.sources": "sources",
    "llmq.cuda": "kernels",
    "llmq.quant": "quant",
    "llmq.runtime.backend": "execution",
    "llmq.runtime.loader": "execution",
    "llmq.runtime.options": "execution",
    "llmq.runtime.placement": "execution",
    "llmq.runtime.qlinear": "execution",
    "llmq.runtime.cuda_backend": "execution",
    "llmq.runtime.hf_quantizer": "execution",
    "llmq.runtime.decode": "decode",
    "llmq.runtime.eval": "eval",
    "llmq.runtime.api": "api",
    "llmq.quant.api": "api",
    "llmq.cli": "cli",
}
_BELOW_EXECUTION = {"base", "format", "sources", "kernels", "execution"}
MAY_IMPORT = {
    "base": {"base"},
    "format": {"base", "format"},
    "sources": {"base", "format", "sources"},
    "kernels": {"base", "format", "kernels"},
    "quant": {"base", "format", "sources", "quant"},
    "execution": _BELOW_EXECUTION,
    "decode": _BELOW_EXECUTION | {"decode"},
    "eval": _BELOW_EXECUTION | {"eval"},
    "api": _BELOW_EXECUTION | {"decode", "eval", "quant", "api"},
    "cli": set(LAYER_OF.values()),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("llmq", *parts))


def package_sources() -> dict[str, str]:
    files = [ROOT / "__init__.py", ROOT / "errors.py", ROOT / "hf.py"]
    for package in PACKAGES:
        files += sorted((ROOT / package).rglob("*.py"))
    return {module_name(f): f.read_text(encoding="utf-8") for f in files}


def layer(module: str) -> str:
    best = max((p for p in LAYER_OF if module == p or module.startswith(p + ".")), key=len)
    return LAYER_OF[best]


def imported_modules(source: str, known: set[str]) -> set[str]:
    """llmq modules that ``source`` imports anywhere; ``from pkg import mod`` counts as ``pkg.mod``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
    return {m for m in found if m == "llmq" or m.startswith("llmq.")}


def graph(sources: dict[str, str]) -> dict[str, set[str]]:
    known = set(sources)
    return {module: imported_modules(text, known) - {module} for module, text in sources.items()}


def violations(sources: dict[str, str]) -> list[str]:
    return [
        f"{module} ({layer(module)}) imports {target} ({layer(target)})"
        for module, targets in graph(sources).items()
        for target in sorted(targets)
        if layer(target) not in MAY_IMPORT[layer(module)]
    ]


def cycles(sources: dict[str, str]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), as sorted module lists."""
    edges = graph(sources)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in edges:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def test_every_module_has_a_layer():
    for module in package_sources():
        assert layer(module) in MAY_IMPORT, module


def test_imports_point_down_the_layers():
    assert violations(package_sources()) == []


def test_no_module_imports_itself_through_others():
    assert cycles(package_sources()) == []


def test_a_forbidden_import_is_caught_wherever_it_hides():
    sources = package_sources()
    quant = dict(sources)
    quant["llmq.quant.pipeline"] += "\n\ndef f():\n    from llmq.runtime import loader\n"
    assert violations(quant) == ["llmq.quant.pipeline (quant) imports llmq.runtime.loader (execution)"]
    upward = dict(sources)
    upward["llmq.runtime.format.layout"] += "\nimport llmq.runtime.sources.models\n"
    assert violations(upward) == ["llmq.runtime.format.layout (format) imports llmq.runtime.sources.models (sources)"]


def test_a_cycle_hidden_in_a_function_is_caught():
    sources = dict(package_sources())
    sources["llmq.runtime.placement"] += "\n\ndef g():\n    from llmq.runtime.loader import load_model\n"
    assert any({"llmq.runtime.loader", "llmq.runtime.placement"} <= set(group) for group in cycles(sources))
