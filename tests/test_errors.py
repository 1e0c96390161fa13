"""Every error llmq raises on purpose is a class of ``llmq/errors.py``, and a specific one."""

from __future__ import annotations

import ast

from test_layers import package_sources

import llmq.errors as E


def _nodes(kind):
    for module, source in package_sources().items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, kind):
                yield module, node


def test_error_classes_live_in_errors_py():
    defined = [
        f"{module}.{node.name}"
        for module, node in _nodes(ast.ClassDef)
        if any(getattr(base, "id", getattr(base, "attr", "")).endswith(("Error", "Run")) for base in node.bases)
        and module != "llmq.errors"
    ]
    assert defined == []


def test_no_bare_llmq_error_is_raised():
    bare = [
        f"{module}:{node.lineno}"
        for module, node in _nodes(ast.Raise)
        if isinstance(node.exc, ast.Call) and getattr(node.exc.func, "id", None) == "LlmqError"
    ]
    assert bare == []


def test_each_error_says_what_exit_code_it_maps_to():
    errors = [obj for obj in vars(E).values() if isinstance(obj, type) and issubclass(obj, E.LlmqError)]
    assert len(errors) >= 15 and all(cls.__doc__ for cls in errors)
    assert {cls.exit_code for cls in errors} == {1, 2, 130}
