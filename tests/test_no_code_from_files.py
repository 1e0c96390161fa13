"""Nothing llmq reads can execute code: no pickle, no eval, no remote code unless asked.

A static scan of the package's own source (the AST, so comments and strings do not count):
no ``torch.load``, no pickle-family module, no builtin ``eval``/``exec``/``compile`` of data,
``numpy.load`` only with ``allow_pickle=False``, and ``trust_remote_code`` never set to a
literal ``True``. The runtime side is tested elsewhere: copied tokenizer and config files must
parse as data (``test_artifact``, the fuzzer) and folders with only pickles are refused
(``test_cli_errors``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ["cli", "quant", "runtime", "cuda"]
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib", "cloudpickle"}
FORBIDDEN_CALLS = {"torch.load", "torch.jit.load", "yaml.load", "yaml.unsafe_load"}
FORBIDDEN_BUILTINS = {"eval", "exec", "compile", "__import__"}


def package_sources() -> list[Path]:
    files = [ROOT / "__init__.py", ROOT / "errors.py"]
    for folder in PACKAGE_DIRS:
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def findings(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"imports {n}" for n in names if n and n.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.Call):
            name = dotted(node.func)
            if name in FORBIDDEN_CALLS or (isinstance(node.func, ast.Name) and name in FORBIDDEN_BUILTINS):
                found.append(f"calls {name}")
            if name in ("np.load", "numpy.load"):
                safe = any(k.arg == "allow_pickle" and getattr(k.value, "value", None) is False for k in node.keywords)
                found += [] if safe else ["calls np.load without allow_pickle=False"]
            for keyword in node.keywords:
                if keyword.arg == "trust_remote_code" and getattr(keyword.value, "value", None) is True:
                    found.append("sets trust_remote_code=True")
    return found


@pytest.mark.parametrize("path", package_sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_code_execution_from_data(path):
    assert findings(ast.parse(path.read_text(), filename=str(path))) == []


def test_the_scan_can_fail():
    bad = "import pickle\ntorch.load('x')\neval('1')\nnp.load('a')\nf(trust_remote_code=True)\n"
    assert findings(ast.parse(bad)) == [
        "imports pickle", "calls torch.load", "calls eval", "calls np.load without allow_pickle=False",
        "sets trust_remote_code=True",
    ]  # fmt: skip
    assert findings(ast.parse("model.eval()\nnp.load('a', allow_pickle=False)\n")) == []


def test_the_scan_covers_the_whole_package():
    names = {str(p.relative_to(ROOT)) for p in package_sources()}
    assert {"runtime/format/artifact.py", "runtime/sources/models.py", "quant/statsfile.py", "cuda/loader.py"} <= names
