"""The ``.llmq`` artifact directory: reading it and checking every file and tensor strictly.

An artifact is a directory (see ``docs/format.md``)::

    manifest.json              format, version, provenance, config, layouts, checksums, accounting
    shard-00000.safetensors    tensors, one shard per decoder layer plus one for the rest
    config.json, tokenizer...  the source model's HF config and tokenizer files, copied in

Nothing here executes anything from the file: JSON and safetensors only. Every shape, dtype,
offset and code range is checked before a tensor reaches a decoder or kernel; a problem raises
:class:`ArtifactError` naming the file and what is wrong. The manifest's schema is
:mod:`llmq.runtime.format.manifest`; the writer lives in ``llmq.quant``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from llmq.errors import ArtifactError
from llmq.runtime.format import dtypes
from llmq.runtime.format import layout as L
from llmq.runtime.format.manifest import MANIFEST, FileRecord, Manifest

# Files llmq writes for the HF ecosystem (``docs/format.md``): the model card, and the index of the
# shards that ``transformers`` loads through llmq's quantizer (``llmq.runtime.hf_quantizer``).
CARD = "README.md"
WEIGHTS_INDEX = "llmq.safetensors.index.json"
# Source files an artifact may carry along: data only, never code or pickles. The source's own
# weight index, model card and any file named like llmq's own are never copied: llmq writes those.
HF_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
HF_FILE_EXCLUDE = ("model.safetensors.index.json", MANIFEST, CARD, WEIGHTS_INDEX)
_MAX_JSON_BYTES = 64 << 20


def is_artifact(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def update_digest(digest, path: Path) -> None:
    """Feed a file's bytes to a ``hashlib`` digest, 4 MiB at a time."""
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)


def fsync_folder(path: Path) -> None:
    """Make the renames inside folder ``path`` durable (POSIX). Windows cannot open a folder to
    sync it; there NTFS journals the rename itself, so there is nothing to do."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    update_digest(digest, path)
    return digest.hexdigest()


def read_manifest(path: Path) -> Manifest:
    """Parse and check ``manifest.json``'s structure (not yet the files it points to)."""
    file = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"{path}: not an artifact directory")
    if not file.is_file():
        raise ArtifactError(f"{path}: {MANIFEST} is missing")
    if file.stat().st_size > _MAX_JSON_BYTES:
        raise ArtifactError(f"{file}: larger than {_MAX_JSON_BYTES >> 20} MiB, refusing to parse")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ArtifactError(f"{file}: not valid JSON ({err})") from err
    return Manifest.from_json(raw, file)


def file_problem(path: Path, record: FileRecord) -> str | None:
    """What is wrong with ``path`` against its size and checksum record, or None."""
    if not path.is_file():
        return "listed in the manifest but missing"
    size = path.stat().st_size
    if size != record.bytes:
        return f"{size} bytes, the manifest says {record.bytes} (truncated or replaced)"
    if sha256_file(path) != record.sha256:
        return "checksum mismatch (the file is corrupt or was modified)"
    return None


def verify_files(manifest: Manifest) -> None:
    """Every listed file exists, has the recorded size and SHA-256; no symlink leaves the artifact."""
    root = manifest.path.resolve()
    for name, info in manifest.files.items():
        path = manifest.path / name
        if path.is_file() and path.resolve().parent != root:
            raise ArtifactError(f"{path}: points outside the artifact")
        problem = file_problem(path, info)
        if problem:
            raise ArtifactError(f"{path}: {problem}")
    check_headers(manifest)


def check_headers(manifest: Manifest) -> None:
    """Every shard's safetensors header (read without its data) names the manifest's tensors with
    its dtypes and shapes; safetensors itself checks the offsets against the file size."""
    from safetensors import SafetensorError, safe_open

    expected = expected_tensors(manifest)
    for shard in manifest.shards:
        path = manifest.path / shard
        try:
            with safe_open(str(path), framework="pt") as f:
                slices = {k: f.get_slice(k) for k in f.keys()}
                declared = {k: (s.get_dtype(), tuple(s.get_shape())) for k, s in slices.items()}
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ArtifactError(f"{path}: unreadable safetensors header ({err})") from err
        for name, (dtype, shape) in declared.items():
            info = dtypes.BY_SAFETENSORS.get(dtype)
            _check_declared(path, shard, name, info.torch() if info else None, dtype, shape, expected)


def _check_declared(path: Path, shard: str, name: str, dtype, label, shape: tuple, expected: dict) -> None:
    """Tensor ``name`` of ``shard`` (its torch ``dtype``, shown as ``label``) is in the manifest for
    this shard, with the manifest's dtype and shape. Shared by the header check and the loader."""
    want = expected.get(name)
    if want is None or want[0] != shard:
        raise ArtifactError(f"{path}: tensor {name!r} is not in the manifest for this shard")
    if dtype != want[1] or tuple(shape) != want[2]:
        raise ArtifactError(
            f"{path}: tensor {name!r} is {label} {list(shape)}, the manifest says {want[1]} {list(want[2])}"
        )


def load_tensors(manifest: Manifest, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of all shards, after checking each one's name, dtype, shape and values against the manifest."""
    tensors: dict[str, torch.Tensor] = {}
    for _, loaded in iter_shards(manifest, device):
        tensors.update(loaded)
    return tensors


def iter_shards(manifest: Manifest, device: str | torch.device = "cpu"):
    """Yield ``(shard name, its tensors)`` one shard at a time, each checked like :func:`load_tensors`.

    Only one shard is in memory at once; the check that every expected tensor exists runs after
    the last shard.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    expected = expected_tensors(manifest)
    seen: set[str] = set()
    for shard in manifest.shards:
        path = manifest.path / shard
        try:
            loaded = load_file(path, device=str(device))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ArtifactError(f"{path}: unreadable safetensors file ({err})") from err
        for name, tensor in loaded.items():
            _check_declared(path, shard, name, tensor.dtype, tensor.dtype, tensor.shape, expected)
        for name, entry in manifest.linears.items():
            if entry.shard == shard:
                suffixes = entry.layout.tensor_specs()
                if all(f"{name}.{k}" in loaded for k in suffixes):
                    check_linear_values(name, entry.layout, {k: loaded[f"{name}.{k}"] for k in suffixes}, manifest.path)
        seen.update(loaded)
        yield shard, loaded
    missing = sorted(set(expected) - seen)
    if missing:
        raise ArtifactError(f"{manifest.path}: {len(missing)} tensor(s) missing, first {missing[0]!r}")


def expected_tensors(manifest: Manifest) -> dict[str, tuple[str, torch.dtype, tuple[int, ...]]]:
    """Tensor name -> (shard, dtype, shape), from the manifest and the layout table."""
    expected = {name: (e.shard, e.dtype, e.shape) for name, e in manifest.dense.items()}
    for name, entry in manifest.linears.items():
        for suffix, (dtype, shape) in entry.layout.tensor_specs().items():
            expected[f"{name}.{suffix}"] = (entry.shard, dtype, shape)
    return expected


def check_linear_values(name: str, layout: L.LinearLayout, t: dict[str, torch.Tensor], where: Path) -> None:
    """Value-level checks the shapes cannot catch: permutation, code ranges, CSR structure, finite scales."""

    def fail(message: str) -> None:
        raise ArtifactError(f"{where}: linear {name}: {message}")

    perm = t["perm"].long()
    if not torch.equal(torch.sort(perm).values, torch.arange(layout.in_features, device=perm.device)):
        fail("perm is not a permutation of the input channels")
    if layout.k2 > 0:
        _, scale_code = L.unpack_meta2(t["meta2"])
        if int(scale_code.max()) >= 1 << layout.scale_bits:
            fail(f"a scale code exceeds scale_bits={layout.scale_bits}")
        if int(t["szero2"].max()) > L.SZERO_MAX:
            fail("a second-order zero exceeds INT4")
        if not torch.isfinite(t["scale2"]).all():
            fail("scale2 holds NaN/Inf")
    if layout.k4 > 0:
        if int(t["zero4"].max()) > L.INT4_MAX:
            fail("a 4-bit zero exceeds INT4")
        if not torch.isfinite(t["scale4"]).all():
            fail("scale4 holds NaN/Inf")
    if layout.n_outliers > 0:
        _check_csr(t, layout, fail)


def _check_csr(t: dict[str, torch.Tensor], layout: L.LinearLayout, fail) -> None:
    rowptr, cols = t["outlier_rowptr"].long(), t["outlier_col"].long()
    if int(rowptr[0]) != 0 or int(rowptr[-1]) != layout.n_outliers or bool((rowptr.diff() < 0).any()):
        fail("outlier_rowptr is not a valid CSR row pointer")
    if bool(((cols < 0) | (cols >= layout.k2)).any()):
        fail("an outlier column is outside the 2-bit part")
    rows = torch.repeat_interleave(torch.arange(layout.out_features, device=cols.device), rowptr.diff())
    key = rows * layout.k2 + cols
    if bool((key.diff() <= 0).any()):
        fail("outlier columns are not strictly increasing within each row")
    if not torch.isfinite(t["outlier_val"]).all():
        fail("outlier_val holds NaN/Inf")


def open_artifact(path: Path, verify: bool = True) -> Manifest:
    """Read the manifest and, unless told not to, check every file's size and checksum."""
    manifest = read_manifest(path)
    if verify:
        verify_files(manifest)
    return manifest
