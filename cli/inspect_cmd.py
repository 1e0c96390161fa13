"""``llmq inspect ARTIFACT``: what an artifact holds, its provenance and its bits-per-weight accounting."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmq.cli.common import Json, Reporter, render_accounting


def inspect(
    artifact: Annotated[Path, typer.Argument(help="A .llmq artifact directory.", show_default=False)],
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check every file's size and SHA-256.")] = True,
    json: Json = False,
) -> None:
    """Show an artifact's source, config and per-layer bits per weight (the same accounting as --dry-run)."""
    from llmq.runtime import api

    out = Reporter(json, quiet=True)
    manifest = api.inspect(artifact, verify_checksums=verify)
    accounting, raw = manifest.accounting(), manifest.to_json()
    if json:
        out.emit_json(
            {
                "command": "inspect",
                "artifact": str(artifact),
                "format_version": raw["format_version"],
                "llmq_version": manifest.llmq_version,
                "verified": verify,
                "source": raw.get("source"),
                "quantization": manifest.quantization,
                "calibration": manifest.calibration,
                "files": raw["files"],
                "accounting": accounting.to_json(),
            }
        )
        return
    out.result(f"artifact {artifact}  (format {raw['format_version']}, written by llmq {manifest.llmq_version})")
    out.result(f"source: {manifest.source.label if manifest.source else None}")
    out.result(f"config: {manifest.quantization}")
    out.result(f"files: {len(manifest.files)}, checksums {'verified' if verify else 'not checked'}")
    out.result(render_accounting(accounting))
