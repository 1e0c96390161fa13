"""Load a model for running: a plain HF folder through transformers, or a ``.llmq`` artifact.

For an artifact, the model skeleton is built from the artifact's own config with parameters on the meta device
(buffers such as rotary tables are built normally), every quantized Linear is replaced by a
:class:`QuantLinear` holding its validated packed tensors, the dense tensors are assigned, and
tied weights are re-tied. Nothing is read from outside the artifact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llmq.errors import ArtifactError, ModelSourceError, UsageError
from llmq.runtime.backend import Backend, backend_for
from llmq.runtime.format import artifact as A
from llmq.runtime.format import dtypes
from llmq.runtime.format.manifest import Manifest
from llmq.runtime.options import LoadOptions, Placement, Weights, free_memory
from llmq.runtime.placement import device_of, plan_device_map
from llmq.runtime.qlinear import QuantLinear, parent_module, unfuse_quantized_experts
from llmq.runtime.sources.families import family_of, linear_shape
from llmq.runtime.sources.feedback import LOGGED, Feedback
from llmq.runtime.sources.memory import available_memory_bytes
from llmq.runtime.sources.models import ModelSource, ModelSpec, SourceKind, load_tokenizer, open_model


@dataclass(frozen=True)
class OpenedModel:
    """A model resolved and its config read, with where and how it will run; nothing loaded yet."""

    source: ModelSource
    config: Any
    placement: Placement
    backend: Backend | None  # for an artifact's quantized Linears; None for a plain HF model
    options: LoadOptions
    packed: bool = False  # the torch backend keeps the quantized weights packed (decoded per call)

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def dtype(self) -> torch.dtype:
        return self.placement.dtype

    def tokenizer(self):
        return load_tokenizer(self.source, self.options.trust_remote_code)

    def load(self, backend: Backend | None = None):
        """The model in eval mode; ``backend`` overrides the chosen one (``profile --baseline``).

        Under ``--device-map auto`` without ``--max-memory`` the devices' free memory is measured
        now, so a model loaded earlier in the same run (``eval kld``'s base) is accounted for."""
        limits = self.placement.max_memory
        if limits is not None and self.options.max_memory is None:
            limits = free_memory()
        chosen = backend or self.backend or Backend.torch
        return load_model(
            self.source, self.config, self.device, self.dtype, self.options.trust_remote_code, chosen, limits,
            self.packed,
        )  # fmt: skip


def open_for_run(
    spec: ModelSpec,
    options: LoadOptions,
    feedback: Feedback = LOGGED,
    role: str = "model",
    placement: Placement | None = None,
) -> OpenedModel:
    """Resolve MODEL, read its config, place it and choose its backend (the choice is logged).

    ``placement`` is ``options.placement()``, passed when the caller has checked it already."""
    placement = placement or options.placement()
    source, config = open_model(spec, options.revision, options.trust_remote_code, feedback, role)
    backend, notice = backend_for(source, options.backend, placement.device, placement.dtype)
    if notice:
        feedback.info(notice)
    packed, notice = resolve_weights(options.weights, source, backend, placement)
    if notice:
        feedback.info(notice)
    return OpenedModel(source, config, placement, backend, options, packed)


# Dense weights are chosen by ``--weights auto`` only while they take at most this share of the free
# memory: the rest is for activations, the KV cache and the runtime itself.
DENSE_SHARE_OF_FREE = 0.8


def resolve_weights(
    requested: Weights, source: ModelSource, backend: Backend | None, placement: Placement
) -> tuple[bool, str | None]:
    """(whether the torch backend keeps ``source``'s quantized weights packed, a notice when ``auto``
    chose packed). Packed applies to an artifact's Linears on the torch backend only."""
    if source.kind != SourceKind.artifact or backend == Backend.cuda:
        if requested == Weights.packed:
            what = "the CUDA kernels, which always keep them packed" if backend else f"a {source.kind.value} model"
            raise UsageError(f"--weights packed applies to an artifact on the torch backend, not to {what}")
        return False, None
    if requested != Weights.auto:
        return requested == Weights.packed, None
    manifest = A.read_manifest(source.path)
    itemsize = placement.dtype.itemsize
    dense = sum(e.layout.out_features * e.layout.in_features for e in manifest.linears.values()) * itemsize
    free = free_bytes(placement.device)
    if free is None or dense <= DENSE_SHARE_OF_FREE * free:
        return False, None
    return True, (
        f"weights: packed, each quantized Linear decoded as it runs (slower), because their dense form "
        f"({dense / 1e9:.1f} GB in {dtypes.short(placement.dtype)}) would not fit in the {free / 1e9:.1f} GB free "
        "on the device; --weights dense decodes them once at load"
    )


def free_bytes(device: torch.device) -> int | None:
    """Memory free on ``device`` now: a GPU's free memory, or the machine's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return available_memory_bytes()
    return None


def load_model(
    source: ModelSource,
    config,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    backend: Backend = Backend.torch,
    max_memory: dict | None = None,
    packed: bool = False,
):
    """Build the causal LM from safetensors (or a quantized artifact) in ``dtype`` on ``device``, in eval mode.

    ``backend`` (``cuda`` or ``torch``, already resolved) applies to an artifact's quantized Linears,
    and ``packed`` to those on the torch backend (:meth:`QuantLinear.keep_packed`).
    With ``max_memory`` (``{gpu index or "cpu": size}``) the model is spread over those devices by
    accelerate instead (``--device-map auto``).
    """
    from transformers import AutoModelForCausalLM

    if source.kind == SourceKind.artifact:
        # The checksums were verified when the source was resolved.
        manifest = A.read_manifest(source.path)
        device_map = None if max_memory is None else plan_device_map(manifest, config, dtype, max_memory)
        return load_quantized_model(manifest, config, device, dtype, backend, device_map, packed)
    placed = {"device_map": "auto", "max_memory": max_memory} if max_memory is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.path, config=config, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
            **placed,
        )  # fmt: skip
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"the weights in {source.path} cannot be loaded: {err}") from err
    return (model if placed else model.to(device)).eval()


def load_quantized_model(
    manifest: Manifest,
    config,
    device: torch.device,
    dtype: torch.dtype,
    backend: Backend = Backend.torch,
    device_map: dict[str, int | str] | None = None,
    packed: bool = False,
):
    """The artifact as a transformers model; its Linears compute with ``backend`` (``cuda`` or ``torch``),
    on the torch backend from dense weights decoded once, or with ``packed`` decoded at each call.

    With ``device_map`` (from :func:`llmq.runtime.placement.plan_device_map`) each part goes to its
    own device and accelerate moves activations between them; a quantized Linear placed on the
    CPU then uses the torch backend, whatever ``backend`` says for the GPUs.
    """
    assert backend in (Backend.cuda, Backend.torch), "resolve auto with backend.resolve_backend first"
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    def place(name: str) -> torch.device:
        return device if device_map is None else device_of(device_map, name)

    tensors = A.load_tensors(manifest)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    unfuse_quantized_experts(model, family_of(model, config), manifest.linears)
    for name, entry in manifest.linears.items():
        parent, child = parent_module(model, name)
        if linear_shape(getattr(parent, child, None)) is None:
            raise ArtifactError(f"{manifest.path}: {name} is not a Linear in the {config.model_type} model")
        target = place(name)
        stored = {suffix: tensors.pop(f"{name}.{suffix}").to(target) for suffix in entry.layout.tensor_specs()}
        bias = tensors.pop(entry.bias).to(target, dtype) if entry.bias else None
        module = QuantLinear(entry.layout, stored, bias)
        if backend == Backend.cuda and target.type == "cuda":
            module.use_cuda()
        elif packed:
            module.keep_packed(dtype)
        else:
            module.materialize(dtype)
        setattr(parent, child, module)
    known = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    for name, tensor in tensors.items():
        if name not in known:
            raise ArtifactError(f"{manifest.path}: tensor {name} has no place in the {config.model_type} model")
        set_module_tensor_to_device(model, name, place(name), value=tensor.to(dtype))
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise ArtifactError(
            f"{manifest.path}: {len(left)} parameter(s) have no tensor in the artifact, first {left[0]!r}"
        )
    if device_map is None:
        return model.to(device).eval()
    return dispatch_model(model, device_map=device_map).eval()
