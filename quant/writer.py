"""Writing an artifact atomically: everything goes into a hidden staging directory next to the
output, which is renamed into place only when complete. An interrupted run (exception, Ctrl-C,
SIGTERM) removes its staging directory; one killed outright leaves a hidden staging directory
that the next run for the same output removes. A visible ``OUT`` is therefore always complete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llmq.errors import LlmqError
from llmq.runtime import artifact as A


class OutputExistsError(LlmqError):
    pass


class ArtifactWriteError(LlmqError):
    """Writing the artifact failed (a full disk, a quota, a vanished folder); nothing was committed."""


@contextmanager
def writing(target: Path, what: str):
    """Turn an I/O failure while writing ``what`` of ``target`` into one clear error.

    The caller removes its temporary files; the message says that ``target`` was left as it was.
    """
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as err:
        text = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else str(err)
        full = (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or "os error 28" in text
        hint = "; free some space or write elsewhere with -o" if full else ""
        raise ArtifactWriteError(
            f"writing {what} of {target} failed: {text}{hint}; {target} was left as it was"
        ) from err


def _staging_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


def check_output(out: Path, force: bool) -> None:
    """Refuse an existing output unless ``force``; refuse an output whose parent is missing."""
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it, or choose another -o")
    if out.exists() and not A.is_artifact(out):
        raise OutputExistsError(f"{out} exists and is not an llmq artifact; refusing to replace it even with --force")
    if not out.parent.is_dir():
        raise LlmqError(f"the output's folder {out.parent} does not exist")


def remove_stale_staging(out: Path) -> list[Path]:
    """Delete staging directories of runs for ``out`` whose process no longer exists."""
    removed = []
    for path in out.parent.glob(_staging_prefix(out) + "*"):
        pid = path.name[len(_staging_prefix(out)) :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ArtifactWriter:
    """Collects shards and files in a staging directory; :meth:`commit` renames it to ``out``."""

    def __init__(self, out: Path, force: bool):
        self.out, self.force = out, force
        self.staging = out.parent / f"{_staging_prefix(out)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.staging.mkdir()
        self.files: dict[str, dict[str, Any]] = {}

    def write_shard(self, index: int, tensors: dict[str, torch.Tensor]) -> str:
        name = A.SHARD_PATTERN.format(index)
        contiguous = {k: v.contiguous() for k, v in tensors.items()}
        with writing(self.out, name):
            save_file(contiguous, str(self.staging / name), metadata={"format": A.FORMAT_NAME})
            self._record(name)
        return name

    def copy_file(self, source: Path) -> None:
        with writing(self.out, source.name):
            shutil.copyfile(source, self.staging / source.name)
            self._record(source.name)

    def _record(self, name: str) -> None:
        path = self.staging / name
        self.files[name] = {"sha256": A.sha256_file(path), "bytes": path.stat().st_size}

    def commit(self, manifest: dict[str, Any]) -> None:
        manifest = {**manifest, "files": dict(sorted(self.files.items()))}
        text = json.dumps(manifest, indent=2) + "\n"  # insertion order: module order, deterministic
        with writing(self.out, A.MANIFEST):
            (self.staging / A.MANIFEST).write_text(text, encoding="utf-8")
            _fsync_tree(self.staging)
        if self.out.exists():
            check_output(self.out, self.force)
            retired = self.out.parent / f"{_staging_prefix(self.out)}{os.getpid()}-old"
            os.rename(self.out, retired)
            os.rename(self.staging, self.out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            try:
                os.rename(self.staging, self.out)  # atomic: a reader sees no OUT or a complete one
            except OSError as err:
                raise OutputExistsError(
                    f"{self.out} was created by another run while this one worked; nothing replaced"
                ) from err

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        with file.open("rb") as f:
            os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
