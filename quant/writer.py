"""Writing an artifact atomically: everything goes into a hidden staging directory next to the
output, which is renamed into place only when complete, so a visible ``OUT`` is always complete.

After each unit (decoder layer) the staging directory gets a ``checkpoint.json``: the run's
fingerprint, the units done and their files' checksums. A run that fails with an error removes
its staging directory; one interrupted (Ctrl-C, SIGTERM) or killed keeps it as a checkpoint.
The next run for the same output either continues from it (``--resume``, same fingerprint, every
kept file re-checked) or removes it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmq.errors import ArtifactWriteError, OutputError, OutputExistsError, ResumeError
from llmq.runtime.format import artifact as A
from llmq.runtime.format.manifest import FORMAT_NAME, MANIFEST, SHARD_PATTERN, FileRecord, Manifest


@contextmanager
def writing(target: Path, what: str, untouched: bool = True):
    """Turn an I/O failure while writing ``what`` of ``target`` into one clear error.

    The caller removes its temporary files; with ``untouched`` the message says that ``target`` was
    left as it was (a run's own temporary folder is not, and says nothing).
    """
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as err:
        text = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else str(err)
        full = (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or "os error 28" in text
        hint = "; free some space or write elsewhere with -o" if full else ""
        left = f"; {target} was left as it was" if untouched else ""
        raise ArtifactWriteError(f"writing {what} of {target} failed: {text}{hint}{left}") from err


def _staging_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


def check_output(out: Path, force: bool) -> None:
    """Refuse an existing output unless ``force``; refuse an output whose parent is missing."""
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it, or choose another -o")
    if out.exists() and not A.is_artifact(out):
        raise OutputExistsError(f"{out} exists and is not an llmq artifact; refusing to replace it even with --force")
    if not out.parent.is_dir():
        raise OutputError(f"the output's folder {out.parent} does not exist")


STOPPED = "stopped"  # the owner token of a staging directory kept by an interrupted run


def _ownerless(out: Path, path: Path) -> bool:
    """A staging directory no running process owns: its run was stopped, or its process is gone."""
    owner = path.name[len(_staging_prefix(out)) :].split("-")[0]
    return owner == STOPPED or (owner.isdigit() and not _alive(int(owner)))


def remove_stale_staging(out: Path) -> list[Path]:
    """Delete staging directories of runs for ``out`` that no running process owns."""
    removed = []
    for path in out.parent.glob(_staging_prefix(out) + "*"):
        if _ownerless(out, path):
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


CHECKPOINT = "checkpoint.json"


@dataclass(frozen=True)
class Checkpoint:
    """An interrupted run's staging directory and what it completed."""

    staging: Path
    fingerprint: str
    units_done: list[str]
    files: dict[str, FileRecord]


def find_checkpoints(out: Path) -> list[Checkpoint]:
    """Checkpoints of runs for ``out`` whose process is gone, newest first."""
    found = []
    for path in out.parent.glob(_staging_prefix(out) + "*"):
        record = path / CHECKPOINT
        if _ownerless(out, path) and record.is_file():
            try:
                raw = json.loads(record.read_text(encoding="utf-8"))
                files = {name: FileRecord(**info) for name, info in raw["files"].items()}
                found.append(Checkpoint(path, str(raw["fingerprint"]), list(raw["units_done"]), files))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable: treated as no checkpoint, and removed with the other stale directories
    return sorted(found, key=lambda c: (c.staging / CHECKPOINT).stat().st_mtime, reverse=True)


class ArtifactWriter:
    """Collects shards and files in a staging directory; :meth:`commit` renames it to ``out``.

    With ``resume_from`` the writer takes over an interrupted run's staging directory (renamed
    to this process's name) after checking every file the checkpoint lists.
    """

    def __init__(self, out: Path, force: bool, resume_from: Checkpoint | None = None):
        self.out, self.force = out, force
        self.staging = out.parent / f"{_staging_prefix(out)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.files: dict[str, FileRecord] = {}
        self.units_done: list[str] = []
        if resume_from is None:
            self.staging.mkdir()
            return
        for name, info in resume_from.files.items():
            if A.file_problem(resume_from.staging / name, info):
                raise ResumeError(
                    f"the checkpoint in {resume_from.staging} is damaged ({name}); run without --resume to start over"
                )
        os.rename(resume_from.staging, self.staging)
        self.files = dict(resume_from.files)
        self.units_done = list(resume_from.units_done)

    def checkpoint(self, fingerprint: str, unit: str) -> None:
        """Record ``unit`` as done (after its shard is written), atomically."""
        self.units_done.append(unit)
        files = {name: info.to_json() for name, info in self.files.items()}
        record = {"fingerprint": fingerprint, "units_done": self.units_done, "files": files}
        tmp = self.staging / f"{CHECKPOINT}.tmp"
        with writing(self.out, CHECKPOINT):
            tmp.write_text(json.dumps(record), encoding="utf-8")
            os.replace(tmp, self.staging / CHECKPOINT)

    def write_shard(self, index: int, tensors: dict[str, torch.Tensor]) -> str:
        name = SHARD_PATTERN.format(index)
        self._save(name, tensors, {"format": FORMAT_NAME})
        return name

    def write_side(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """A safetensors file for the run's own later use (checked on resume like a shard); the
        artifact does not carry it: :meth:`discard` it before :meth:`commit`."""
        self._save(name, tensors)

    def _save(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        with writing(self.out, name):
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(self.staging / name), metadata=metadata)
            self._record(name)

    def discard(self, name: str, fingerprint: str, unit: str) -> None:
        """Drop a side file: recorded as gone (checkpoint ``unit``) before it is deleted, so a resumed
        run never looks for it."""
        self.files.pop(name)
        self.checkpoint(fingerprint, unit)
        (self.staging / name).unlink()

    def write_text(self, name: str, text: str) -> None:
        """A file llmq writes itself (the model card, the HF config, the weights index), UTF-8;
        recorded like every other file, so the manifest's checksums cover it."""
        with writing(self.out, name):
            (self.staging / name).write_text(text, encoding="utf-8")
            self._record(name)

    def copy_file(self, source: Path) -> None:
        with writing(self.out, source.name):
            shutil.copyfile(source, self.staging / source.name)
            self._record(source.name)

    def _record(self, name: str) -> None:
        path = self.staging / name
        self.files[name] = FileRecord(A.sha256_file(path), path.stat().st_size)

    def commit(self, manifest: Manifest) -> Manifest:
        """Write ``manifest`` with the files written so far, and put the artifact in place; returns
        the manifest as written."""
        (self.staging / CHECKPOINT).unlink(missing_ok=True)  # the finished artifact carries no checkpoint
        manifest = replace(manifest, files=dict(sorted(self.files.items())), path=self.out)
        with writing(self.out, MANIFEST):
            (self.staging / MANIFEST).write_text(manifest.to_text(), encoding="utf-8")
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
        return manifest

    def stop(self) -> Path:
        """Keep the staging directory as a checkpoint of an interrupted run; returns where it is."""
        kept = self.out.parent / f"{_staging_prefix(self.out)}{STOPPED}-{uuid.uuid4().hex[:8]}"
        os.rename(self.staging, kept)
        self.staging = kept
        return kept

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        with file.open("rb") as f:
            os.fsync(f.fileno())
    A.fsync_folder(path)
