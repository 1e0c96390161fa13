"""llmq as a ``transformers`` quantization method: ``AutoModelForCausalLM.from_pretrained(ARTIFACT)``.

An artifact's ``config.json`` carries ``quantization_config: {"quant_method": "llmq", ...}``
(:mod:`llmq.runtime.format.hub`). Once :func:`register` has run (``import llmq`` arranges it, see
``llmq/hf.py``), ``from_pretrained`` hands such a model to :class:`LlmqHfQuantizer`, which splits
the loading with ``transformers``:

1. before the model is built, it points ``transformers`` at the artifact's shard index
   (``llmq.safetensors.index.json``), which ``transformers`` would not find on its own;
2. on the model skeleton (meta device), it checks every file's size and SHA-256 and every shard's
   header against the manifest (a tampered artifact is refused here), and puts a
   :class:`~llmq.runtime.qlinear.QuantLinear` with meta packed tensors where each quantized Linear
   was, exactly as ``llmq.load`` does;
3. ``transformers`` loads the dense tensors (embeddings, norms, biases, LM head) with its own
   ``dtype``, ``device_map`` and tying logic, and places the QuantLinears' buffers;
4. afterwards the quantizer fills each QuantLinear with its packed tensors, read and
   value-checked by llmq (``artifact.iter_shards``), on the device ``transformers`` chose, and
   decodes them (torch backend) or hands them to the CUDA kernels, as ``llmq.load``'s ``auto``.

Not supported, each refused with an error: quantizing with ``from_pretrained`` (llmq quantizes
offline), saving the loaded model, training, disk or CPU offload, an artifact written before llmq
wrote ``quantization_config`` (use ``llmq.load``), and a hub id (download it first: the
manifest is not among the files ``transformers`` fetches).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from llmq.errors import ArtifactError, DeviceError
from llmq.runtime.backend import Backend, resolve_backend
from llmq.runtime.format import artifact as A
from llmq.runtime.format.hub import QUANT_METHOD
from llmq.runtime.format.manifest import FORMAT_VERSION, Manifest
from llmq.runtime.qlinear import QuantLinear, parent_module, unfuse_quantized_experts
from llmq.runtime.sources.families import family_of, linear_shape

_LOG = logging.getLogger("llmq")


class LlmqConfig(QuantizationConfigMixin):
    """``quantization_config`` of an llmq artifact: the method and the artifact format version.

    format_version  the ``manifest.json`` format the artifact was written in; this llmq reads 1
    """

    def __init__(self, format_version: int = FORMAT_VERSION, quant_method: str = QUANT_METHOD, **unknown: Any):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"LlmqConfig is for quant_method {QUANT_METHOD!r}, not {quant_method!r}")
        if unknown:
            raise ArtifactError(
                f"config.json's quantization_config has key(s) {sorted(unknown)} this llmq does not know; "
                "a newer llmq wrote it: upgrade llmq"
            )
        if format_version != FORMAT_VERSION:
            raise ArtifactError(
                f"config.json's quantization_config says format_version {format_version!r}; "
                f"this llmq reads version {FORMAT_VERSION}"
            )
        self.quant_method = QUANT_METHOD
        self.format_version = format_version


class LlmqHfQuantizer(HfQuantizer):
    """Loads an llmq artifact for ``from_pretrained`` (the steps are in the module docstring)."""

    # transformers' own switch: a model without llmq's quantization_config (not pre-quantized)
    # is refused with transformers' message, rather than quantized on the fly.
    requires_calibration = True

    def __init__(self, quantization_config: LlmqConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.manifest: Manifest | None = None
        self.dtype: torch.dtype | None = None

    def validate_environment(self, *args, **kwargs) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict):
            _check_no_offload(device_map.values(), f"device_map {device_map}")

    def update_attn_implementation(self, config):
        # The one hook transformers calls with the config before it looks for the weights. The index
        # has a name transformers does not look for by itself, so without llmq registered an
        # artifact fails to load instead of loading with random Linears (docs/format.md).
        config.transformers_weights = A.WEIGHTS_INDEX
        return config

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        self.dtype = dtype  # the dense tensors' and the decoded weights' dtype
        return dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files: list[str] | None = None, **kwargs):
        self.manifest = manifest = _open_checked(checkpoint_files)
        if self.dtype is None:
            raise RuntimeError("transformers did not report the dtype before building the model (update_dtype)")
        config = model.config
        unfuse_quantized_experts(model, family_of(model, config), manifest.linears)
        for name, entry in manifest.linears.items():
            parent, child = parent_module(model, name)
            if linear_shape(getattr(parent, child, None)) is None:
                raise ArtifactError(f"{manifest.path}: {name} is not a Linear in the {config.model_type} model")
            if entry.bias is not None and entry.bias != f"{name}.bias":
                raise ArtifactError(f"{manifest.path}: linear {name}: its bias is stored as {entry.bias!r}")
            packed = {
                s: torch.empty(shape, dtype=dt, device="meta") for s, (dt, shape) in entry.layout.tensor_specs().items()
            }
            bias = torch.empty(entry.layout.out_features, dtype=self.dtype, device="meta") if entry.bias else None
            setattr(parent, child, QuantLinear(entry.layout, packed, bias))
        _check_tensor_names(model, manifest)
        # The packed tensors are in the shards transformers reads, but no parameter takes them:
        # the QuantLinears get them from llmq afterwards, so transformers should not report them.
        packed_names = [f"{n}.{s}" for n, e in manifest.linears.items() for s in e.layout.tensor_specs()]
        ignored = set(model._keys_to_ignore_on_load_unexpected or ())
        model._keys_to_ignore_on_load_unexpected = ignored | {_exact(packed_names)}
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        manifest, dtype = self.manifest, self.dtype
        # accelerate records a map over several devices (device_map="auto" included) here
        _check_no_offload((getattr(model, "hf_device_map", None) or {}).values(), "the device_map transformers made")
        modules = {name: model.get_submodule(name) for name in manifest.linears}
        devices = {module.weight.device for module in modules.values()}  # where transformers put them
        if any(device.type == "meta" for device in devices):
            raise _offload_error("the device_map")
        main = next((d for d in sorted(devices, key=str) if d.type == "cuda"), torch.device("cpu"))
        backend, notice = resolve_backend(Backend.auto, main, dtype)
        if notice:
            _LOG.info(notice)
        for shard, tensors in A.iter_shards(manifest):  # every value checked, one shard in memory at a time
            for name, entry in manifest.linears.items():
                if entry.shard != shard:
                    continue
                module = modules[name]
                device = module.weight.device
                for suffix in entry.layout.tensor_specs():
                    setattr(module, f"packed_{suffix}", tensors[f"{name}.{suffix}"].to(device))
                if backend == Backend.cuda and device.type == "cuda":
                    module.use_cuda()
                else:
                    module.materialize(dtype)
        return model

    def _dequantize(self, model, dtype=None):
        raise NotImplementedError(
            "llmq does not turn a loaded artifact back into a plain model: its QuantLinear modules are the "
            "artifact's exact weights; quantize the original model again if you need it unquantized"
        )

    def is_serializable(self) -> bool:
        return False  # the artifact is the serialized form: llmq quantize writes it

    @property
    def is_trainable(self) -> bool:
        return False


def _check_no_offload(devices, what: str) -> None:
    """Refuse a placement that offloads: disk anywhere, or the CPU beside accelerators (accelerate
    then keeps those weights on the CPU and moves them for each forward, which a QuantLinear's
    packed and decoded buffers do not take part in)."""
    kinds = {str(d) for d in devices}
    if "disk" in kinds or ("cpu" in kinds and len(kinds) > 1):
        raise _offload_error(what)


def _offload_error(what: str) -> DeviceError:
    return DeviceError(
        f"{what} offloads part of the model to the CPU or disk, which llmq's quantized Linears do not support "
        "through from_pretrained; give the GPUs enough memory, or use llmq.load(..., "
        "LoadOptions(device_map='auto')), which runs CPU-placed layers on the CPU"
    )


def _open_checked(checkpoint_files: list[str] | None) -> Manifest:
    """The artifact the shards transformers resolved belong to, every file checked against its manifest."""
    if not checkpoint_files:
        raise ArtifactError("transformers found no weight files for this llmq artifact")
    root = Path(checkpoint_files[0]).parent
    if not A.is_artifact(root):
        raise ArtifactError(
            f"{root} has no manifest.json, so it is not a complete llmq artifact; from_pretrained loads an "
            "artifact from a local folder: download a hub repository first (hf download ORG/NAME --local-dir DIR)"
        )
    manifest = A.open_artifact(root, verify=True)
    resolved = sorted(Path(f).name for f in checkpoint_files)
    if resolved != manifest.shards or any(Path(f).parent != root for f in checkpoint_files):
        raise ArtifactError(f"{root / A.WEIGHTS_INDEX} names other shards than the manifest ({resolved})")
    return manifest


def _check_tensor_names(model, manifest: Manifest) -> None:
    """Every parameter and persistent buffer of the model has its dense tensor in the artifact (the
    tied ones aside), and every dense tensor has its place: what ``llmq.load`` requires too.
    Otherwise transformers would initialize the missing ones at random and only warn."""
    expected = set(model.state_dict())
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    dense = set(manifest.dense)
    missing, extra = sorted(expected - dense - tied), sorted(dense - expected)
    if missing:
        raise ArtifactError(
            f"{manifest.path}: {len(missing)} parameter(s) have no tensor in the artifact, first {missing[0]!r}"
        )
    if extra:
        raise ArtifactError(f"{manifest.path}: tensor {extra[0]} has no place in the {model.config.model_type} model")


def _exact(names: list[str]) -> str:
    """A regular expression matching exactly ``names``."""
    return "^(?:" + "|".join(re.escape(name) for name in sorted(names)) + ")$"


def register() -> None:
    """Register :class:`LlmqConfig` and :class:`LlmqHfQuantizer` with transformers as ``llmq``; a
    second call does nothing. Another class registered under ``llmq`` is an error."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    for mapping, ours in ((AUTO_QUANTIZATION_CONFIG_MAPPING, LlmqConfig), (AUTO_QUANTIZER_MAPPING, LlmqHfQuantizer)):
        present = mapping.get(QUANT_METHOD)
        if present is not None and present is not ours:
            raise RuntimeError(
                f"transformers already has {present.__module__}.{present.__name__} registered as "
                f"quantization method {QUANT_METHOD!r}; llmq cannot register its own"
            )
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is None:
        register_quantization_config(QUANT_METHOD)(LlmqConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is None:
        register_quantizer(QUANT_METHOD)(LlmqHfQuantizer)
