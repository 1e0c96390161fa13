"""Fuzzing the artifact reader: every damaged artifact ends in llmq's own error, never in a crash.

Each example copies a real small artifact (with outliers, so the CSR checks run too), applies
one mutation from ``artifact_fuzz`` (bytes, safetensors headers, manifest values and keys,
layouts, truncation, deletion, symlinks out of the artifact; most re-signed with fresh
checksums), then runs ``llmq verify`` and ``llmq inspect`` in-process. Allowed outcomes: exit 1
with a one-line ``error:`` (an ``LlmqError``), or exit 0 with every decoded weight finite. Not
allowed: an internal error, another exit code, NaN/Inf that passes, or a run over the alarm.

CI runs ``LLMQ_FUZZ_EXAMPLES`` (default 200) examples; ``scripts/fuzz_artifact.py`` runs more
and records the counts per family and outcome.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from artifact_fuzz import mutations
from hypothesis import HealthCheck, given, settings

from conftest import run_cli

EXAMPLES = int(os.environ.get("LLMQ_FUZZ_EXAMPLES", "200"))
REPORT = os.environ.get("LLMQ_FUZZ_REPORT")
ALARM_SECONDS = 30
OUTCOMES: Counter = Counter()
ACCEPTED_CHANGES: list[dict] = []


def _same_tree(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def _diff(a: Path, b: Path) -> list[str]:
    """Which files differ; for the manifest, which top-level keys."""
    changed = []
    for path in sorted(a.iterdir()):
        other = b / path.name
        if not other.exists() or path.read_bytes() != other.read_bytes():
            if path.name == "manifest.json":
                new, old = json.loads(path.read_text()), json.loads(other.read_text())
                changed += [f"manifest.{k}" for k in sorted(set(new) | set(old)) if new.get(k) != old.get(k)]
            else:
                changed.append(path.name)
    return changed


@pytest.fixture(scope="module")
def base_artifact(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz-base") / "base.llmq"
    result = run_cli(
        "quantize", str(tiny_model), "-o", str(out), "--no-calib", "--g4", "16", "--outliers", "0.01", "-q"
    )
    assert result.code == 0, result.stderr
    assert json.loads(run_cli("verify", str(out), "--json").stdout)["ok"]
    return out


def _on_alarm(signum, frame):
    raise TimeoutError(f"the reader ran longer than {ALARM_SECONDS} s")


def _check(args: list[str]) -> str:
    result = run_cli(*args)
    assert result.code in (0, 1), f"exit {result.code}: {result.stderr[-800:]}"
    if result.code == 1:
        assert result.stderr.startswith("error: "), result.stderr[-800:]
        assert "internal error" not in result.stderr
        return "refused"
    if args[0] == "verify":
        doc = json.loads(result.stdout)
        assert doc["ok"] and all(math.isfinite(layer["max_abs"]) for layer in doc["linears"])
    return "accepted"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=REPORT is None,  # CI: the same cases every run; the script explores
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutation=mutations())
def test_a_damaged_artifact_never_crashes_the_reader(base_artifact, mutation):
    family, apply = mutation
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(ALARM_SECONDS)
    try:
        with tempfile.TemporaryDirectory() as work:
            root, outside = Path(work) / "a.llmq", Path(work) / "outside"
            shutil.copytree(base_artifact, root)
            outside.mkdir()
            apply(root, outside)
            verdict = _check(["verify", str(root), "--json"])
            _check(["inspect", str(root), "--json"])
            if verdict == "accepted":
                verdict += " (unchanged)" if _same_tree(root, base_artifact) else " (changed)"
                if REPORT and verdict.endswith("(changed)"):
                    ACCEPTED_CHANGES.append({"family": family, "diff": _diff(root, base_artifact)})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    OUTCOMES[(family, verdict)] += 1
    if REPORT:
        rows = [{"family": f, "outcome": o, "count": n} for (f, o), n in sorted(OUTCOMES.items())]
        document = {"examples": sum(OUTCOMES.values()), "by_family": rows, "accepted_changes": ACCEPTED_CHANGES}
        Path(REPORT).write_text(json.dumps(document, indent=1))
