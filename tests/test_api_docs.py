"""docs/api.md's examples run, in order, as written, on a tiny random Llama in place of "demo"."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def test_the_docs_have_examples_of_every_public_function():
    code = "\n".join(_blocks())
    for name in ("calibrate", "quantize", "estimate", "load", "perplexity", "kld", "generate", "profile", "verify",
                 "inspect"):  # fmt: skip
        assert f"llmq.{name}(" in code, name


def test_every_example_runs(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for number, block in enumerate(_blocks(), start=1):
        source = block.replace('"demo"', repr(str(tiny_model)))
        try:
            exec(compile(source, f"docs/api.md example {number}", "exec"), namespace)  # noqa: S102
        except Exception as err:
            pytest.fail(f"docs/api.md example {number} failed: {type(err).__name__}: {err}\n{block}")
    printed = capsys.readouterr().out
    assert "bits per weight" in printed and "tokens/s decode" in printed and "ModelSourceError 1" in printed
    assert (tmp_path / "demo.llmq" / "manifest.json").is_file() and (tmp_path / "demo-budget.llmq").is_dir()
