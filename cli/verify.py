"""``llmq verify ARTIFACT``: checksums, the manifest against the tensors, and every layer decoded."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmq.cli.common import Json, Quiet, Reporter
from llmq.errors import ArtifactError


def verify(
    artifact: Annotated[Path, typer.Argument(help="A .llmq artifact directory.", show_default=False)],
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Check an artifact completely: files, tensors, and every layer decoded with a NaN/Inf check."""
    from llmq.runtime import api

    out = Reporter(json, quiet)
    report = api.verify(artifact, feedback=out.feedback(models=False))
    if json:
        out.emit_json({"command": "verify", **report.to_json()})
    else:
        checks = report.to_json()["checks"]
        out.result(
            f"{artifact}: {checks['files_checksummed']} files "
            f"({checks['bytes_checksummed'] / 1e6:.1f} MB) checksummed, "
            f"{checks['tensors_checked']} tensors checked, {checks['linears_decoded']} quantized Linears decoded, "
            f"{checks['dense_tensors_checked']} dense tensors checked in {report.seconds:.1f} s"
        )
        for problem in report.problems:
            out.result(f"problem: {problem}")
        if report.ok:
            out.result("ok")
    if not report.ok:
        raise ArtifactError(f"{artifact}: {len(report.problems)} problem(s) found; first: {report.problems[0]}")
