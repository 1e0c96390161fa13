"""Every command's --json document names its schema, and validates against it (docs/json/)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import jsonschema
import pytest

from llmq.runtime.schemas import VERSIONS, schema_file, schema_id

DOCS = Path(__file__).resolve().parents[1] / "docs" / "json"
TASKS = Path(__file__).resolve().parent / "data" / "tasks"
TEXT = ("--dataset", "austen", "--seq-len", "64", "--max-tokens", "256")
PROFILE = ("--prompt-len", "8", "--gen-len", "2", "--reps", "1", "--baseline")


def _validate(document: dict) -> None:
    schema = json.loads((DOCS / schema_file(document["schema"])).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(document, schema, cls=jsonschema.Draft202012Validator)


def test_every_command_with_json_has_a_schema_file():
    from llmq.cli.app import app

    commands = set()
    for group in [app, *(g.typer_instance for g in app.registered_groups)]:
        prefix = "" if group is app else "eval "
        for command in group.registered_commands:
            if "json" in inspect.signature(command.callback).parameters:
                commands.add(prefix + command.name)
    assert commands == set(VERSIONS), "a command prints --json without a schema version, or the reverse"
    for command in commands:
        assert (DOCS / schema_file(schema_id(command))).is_file(), command


@pytest.fixture(scope="module")
def documents(tmp_path_factory, tiny_model, tiny_artifact) -> dict[str, list[dict]]:
    """Each command's --json output, in the variants whose fields differ."""
    from conftest import run_cli

    tmp = tmp_path_factory.mktemp("json")
    stats = tmp / "s.stats"
    model, artifact = str(tiny_model), str(tiny_artifact)
    runs = {
        "calibrate": [
            ("calibrate", model, "-o", str(stats), "--dataset", "austen", "--samples", "4", "--seq-len", "64")
        ],
        "quantize": [
            ("quantize", model, "-o", str(tmp / "a.llmq"), "--calib", str(stats), "--g4", "16", "--refine", "none"),
            ("quantize", model, "-o", str(tmp / "b.llmq"), "--no-calib", "--g4", "16"),
            ("quantize", model, "-o", str(tmp / "c.llmq"), "--dry-run"),
            (
                "quantize",
                model,
                "-o",
                str(tmp / "d.llmq"),
                "--calib-data",
                "austen",
                "--samples",
                "4",
                "--calib-seq-len",
                "64",
                "--g4",
                "16",
                "--refine",
                "none",
            ),  # calibrated inline, the default  # fmt: skip
        ],
        "inspect": [("inspect", artifact)],
        "verify": [("verify", artifact)],
        "eval ppl": [
            ("eval", "ppl", artifact, *TEXT),
            ("eval", "ppl", artifact, *TEXT, "--baseline", model, "--max-ratio", "100"),
        ],  # fmt: skip
        "eval kld": [("eval", "kld", artifact, "--base", model, *TEXT, "--min-top1", "0")],
        "eval tasks": [
            ("eval", "tasks", artifact, "--tasks", "llmq_local_choice", "--include-path", str(TASKS), "--limit", "4")
        ],  # fmt: skip
        "generate": [("generate", artifact, "-p", "hi", "--max-new-tokens", "3")],
        "profile": [
            ("profile", artifact, *PROFILE, "--breakdown-steps", "1"),
            ("profile", artifact, *PROFILE, "--breakdown-steps", "0", "--min-speedup", "1000000"),  # fails: exit 3
        ],
    }
    out = {}
    for command, variants in runs.items():
        out[command] = []
        for args in variants:
            result = run_cli(*args, "--json")
            assert result.code == (3 if "--min-speedup" in args else 0), (args, result.stderr)
            out[command].append(json.loads(result.stdout))
    return out


@pytest.mark.parametrize("command", sorted(VERSIONS))
def test_the_json_validates_against_its_schema(documents, command):
    for document in documents[command]:
        assert document["schema"] == schema_id(command) and document["command"] == command
        _validate(document)


def test_a_document_that_breaks_its_schema_is_caught(documents):
    document = dict(documents["eval ppl"][1])
    document["ppl_ratio"] = "1.2"  # a string where a number belongs
    with pytest.raises(jsonschema.ValidationError):
        _validate(document)
    del document["ppl_ratio"], document["result"]  # a required field missing
    with pytest.raises(jsonschema.ValidationError):
        _validate(document)
