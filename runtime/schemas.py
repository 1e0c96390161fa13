"""The ids of the JSON documents the commands print with ``--json``.

Each document starts with ``"schema": "llmq.<command>.v<N>"``, and ``docs/json/<command>.v<N>.json``
is its JSON Schema. Within a version fields are only ever added; a field removed, renamed or given
another meaning bumps the version. A test validates every command's output against its schema.
"""

from __future__ import annotations

# command (as the document's "command" names it) -> current schema version
VERSIONS = {
    "calibrate": 1,
    "quantize": 1,
    "inspect": 1,
    "verify": 1,
    "eval ppl": 1,
    "eval kld": 1,
    "eval tasks": 1,
    "generate": 1,
    "profile": 1,
}


def schema_id(command: str) -> str:
    """``"eval ppl"`` -> ``"llmq.eval-ppl.v1"``."""
    return f"llmq.{command.replace(' ', '-')}.v{VERSIONS[command]}"


def schema_file(schema: str) -> str:
    """``"llmq.eval-ppl.v1"`` -> ``"eval-ppl.v1.json"``, the file under docs/json/."""
    return schema.removeprefix("llmq.") + ".json"
