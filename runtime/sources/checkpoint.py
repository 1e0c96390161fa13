"""A source model's checkpoint: its safetensors tensors, read by the model's own parameter names.

Quantization and calibration stream a model one tensor or one decoder layer at a time from the
memory-mapped files; :class:`Checkpoint` is the only thing that opens them. It reads a tensor by
the name transformers gives the parameter, applying the family's renames (GPT-NeoX's
``embed_out`` is the model's ``lm_head``) and assembling fused expert parameters from files that
hold one tensor per expert (Mixtral's ``experts.{e}.w1``/``w3`` rows are one ``gate_up_proj[e]``).
``model_files`` is the one list of the files that define the weights and shape (the manifest's
hashes, the resume fingerprint and the calibration fingerprint all use it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from llmq.errors import ModelSourceError
from llmq.runtime.format import artifact as A
from llmq.runtime.format import dtypes
from llmq.runtime.sources.families import Family, expert_count, expert_modules


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


class Checkpoint:
    """The tensors of a model folder under the names of the model the family's config builds.

    folder   the model folder (``*.safetensors``)
    family   its row of the architecture table (renames, expert storage)
    experts  experts module name -> its number of experts, for parameters stored per expert
    prefix   the model's ``base_model_prefix`` (``transformer`` for GPT-2): checkpoints written by
             the base model alone name ``h.0.attn…`` what the causal LM calls ``transformer.h.0.attn…``
    """

    def __init__(self, folder: Path, family: Family, experts: dict[str, int] | None = None, prefix: str = ""):
        self.family, self.experts = family, experts or {}
        self.files = source_keys(folder)
        self.keys: dict[str, str] = {}  # model name -> file key
        for key in self.files:
            name = self._model_name(key)
            if name in self.keys:
                raise ModelSourceError(f"{folder}: checkpoint keys {self.keys[name]!r} and {key!r} both name {name}")
            self.keys[name] = key
        if prefix:
            for name, key in list(self.keys.items()):
                self.keys.setdefault(f"{prefix}.{name}", key)

    @classmethod
    def of(cls, folder: Path, model, family: Family) -> Checkpoint:
        """The checkpoint of ``model`` (a skeleton of it is enough) as its family stores it."""
        counts = {name: expert_count(module, family) for name, module in expert_modules(model, family).items()}
        return cls(folder, family, counts, getattr(model, "base_model_prefix", "") or "")

    def _model_name(self, key: str) -> str:
        for source, target in self.family.renames:
            if source.startswith("."):
                key = key.replace(source, target, 1)
            elif key.startswith(source):
                key = target + key[len(source) :]
        return key

    def _per_expert(self, name: str) -> tuple[str, list[list[str]]] | None:
        """For a fused expert parameter stored one tensor per expert: (its parameter name, the file
        keys of each expert's parts, in row order). None if ``name`` is not one, or is stored whole."""
        module, _, param = name.rpartition(".")
        spec = self.family.experts
        if spec is None or module not in self.experts or param not in spec.checkpoint or name in self.keys:
            return None
        parts = [[f"{module}.{template.format(e=e)}" for template in spec.checkpoint[param]]
                 for e in range(self.experts[module])]  # fmt: skip
        return param, parts

    def __contains__(self, name: str) -> bool:
        if name in self.keys:
            return True
        stored = self._per_expert(name)
        return stored is not None and all(part in self.keys for parts in stored[1] for part in parts)

    def header(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype code, shape) of the model's tensor ``name``, without reading its data.
        For a parameter stored one tensor per expert, every expert's parts must agree."""
        stored = self._per_expert(name)
        if stored is None:
            return self._slice_header(self.keys[name])
        experts = [[self._slice_header(self.keys[part]) for part in parts] for parts in stored[1]]
        if any(e != experts[0] for e in experts):
            odd = next(i for i, e in enumerate(experts) if e != experts[0])
            raise ModelSourceError(
                f"checkpoint: expert {odd} of {name} is stored as {experts[odd]}, expert 0 as {experts[0]}; "
                "every expert must have the same dtype and shape"
            )
        rows = sum(shape[0] for _, shape in experts[0])
        return experts[0][0][0], (len(experts), rows, *experts[0][0][1][1:])

    def _slice_header(self, key: str) -> tuple[str, tuple[int, ...]]:
        from safetensors import safe_open

        with safe_open(str(self.files[key]), framework="pt") as f:
            sl = f.get_slice(key)
            return sl.get_dtype(), tuple(sl.get_shape())

    def read(self, name: str) -> torch.Tensor:
        """The model's tensor ``name``, from the memory-mapped file; the mapping is closed again."""
        stored = self._per_expert(name)
        if stored is None:
            return self._read_key(self.keys[name])
        return torch.stack([self.read_expert(name, e) for e in range(len(stored[1]))])

    def read_expert(self, name: str, expert: int) -> torch.Tensor:
        """Expert ``expert``'s matrix ``[out, in]`` of the fused parameter ``name`` ``[E, out, in]``."""
        stored = self._per_expert(name)
        if stored is None:
            from safetensors import safe_open

            key = self.keys[name]
            with safe_open(str(self.files[key]), framework="pt") as f:
                return f.get_slice(key)[expert]
        return torch.cat([self._read_key(self.keys[part]) for part in stored[1][expert]])

    def _read_key(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[key]), framework="pt") as f:
            return f.get_tensor(key)


def expected_params(skeleton, checkpoint: Checkpoint) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Parameter name -> (source dtype, shape) for every parameter stored in the checkpoint.

    A tied parameter (the LM head sharing the embedding) may be absent from the checkpoint; any
    other absent parameter is an error, never silently left at its random initialisation. A shape
    that is not the one the config builds (a fused projection split differently, an expert tensor
    of another rank) is an error too.
    """
    seen: dict[int, str] = {}
    result, missing = {}, []
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        alias_of = seen.setdefault(id(param), name)
        if name not in checkpoint:
            if alias_of == name:
                missing.append(name)
            continue
        code, shape = checkpoint.header(name)
        info = dtypes.BY_SAFETENSORS.get(code)
        if info not in dtypes.FLOATS:
            readable = ", ".join(d.safetensors for d in dtypes.FLOATS)
            raise ModelSourceError(f"checkpoint tensor {name} is {code}; llmq reads {readable} weights")
        if shape != tuple(param.shape):
            raise ModelSourceError(
                f"checkpoint tensor {name} has shape {list(shape)}, the model expects {list(param.shape)} "
                "(the shape its config builds)"
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
