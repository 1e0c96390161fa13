"""A source model's checkpoint: its safetensors tensors, read by name without loading the model.

Quantization and calibration stream a model one tensor or one decoder layer at a time from the
memory-mapped files; these are the only functions that open them. ``model_files`` is the one
list of the files that define the weights and shape (the manifest's hashes, the resume
fingerprint and the calibration fingerprint all use it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from llmq.errors import ModelSourceError
from llmq.runtime.format import artifact as A
from llmq.runtime.format import dtypes


def source_keys(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file of ``folder`` that holds it (headers only are read)."""
    from safetensors import SafetensorError, safe_open

    keys: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                keys.update({k: file for k in f.keys()})
        except (SafetensorError, OSError) as err:
            raise ModelSourceError(f"{file}: unreadable safetensors file ({err})") from err
    return keys


def read_tensor(key_files: dict[str, Path], name: str) -> torch.Tensor:
    """One tensor from the memory-mapped source file that holds it; the mapping is closed again."""
    from safetensors import safe_open

    with safe_open(str(key_files[name]), framework="pt") as f:
        return f.get_tensor(name)


def expected_params(skeleton, key_files: dict[str, Path]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Parameter name -> (source dtype, shape) for every parameter stored in the checkpoint.

    A tied parameter (the LM head sharing the embedding) may be absent from the checkpoint; any
    other absent parameter is an error, never silently left at its random initialisation.
    """
    from safetensors import safe_open

    seen: dict[int, str] = {}
    result, missing = {}, []
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        alias_of = seen.setdefault(id(param), name)
        if name not in key_files:
            if alias_of == name:
                missing.append(name)
            continue
        with safe_open(str(key_files[name]), framework="pt") as f:
            sl = f.get_slice(name)
            info, shape = dtypes.BY_SAFETENSORS.get(sl.get_dtype()), tuple(sl.get_shape())
        if info not in dtypes.FLOATS:
            raise ModelSourceError(
                f"checkpoint tensor {name} is {sl.get_dtype()}; llmq reads "
                f"{', '.join(d.safetensors for d in dtypes.FLOATS)} weights"
            )
        if shape != tuple(param.shape):
            raise ModelSourceError(
                f"checkpoint tensor {name} has shape {list(shape)}, the model expects {list(param.shape)}"
            )
        result[name] = (info.torch(), shape)
    if missing:
        raise ModelSourceError(
            f"the checkpoint lacks {len(missing)} parameter(s) the model needs, first {missing[0]!r}"
        )
    return result


def model_files(folder: Path) -> list[Path]:
    """The files that define the source model's weights and shape: its safetensors and config.json."""
    return [
        p for p in sorted(folder.iterdir()) if p.is_file() and (p.suffix == ".safetensors" or p.name == "config.json")
    ]


def model_fingerprint(folder: Path) -> str:
    """SHA-256 over the model's config and weight files (names and contents)."""
    digest = hashlib.sha256()
    for path in model_files(folder):
        digest.update(path.name.encode())
        A.update_digest(digest, path)
    return digest.hexdigest()
