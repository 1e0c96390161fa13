"""Placing an artifact's layers across several devices (GPUs, or GPUs and the CPU) with accelerate.

The plan is made on the meta device: a skeleton of the model whose quantized Linears hold meta
tensors shaped like their packed tensors, so accelerate sizes each layer by the bytes it will
really occupy, without reading or allocating any weight. ``accelerate.infer_auto_device_map``
then fills the devices in ``max_memory`` order (GPUs first, then the CPU), keeping each decoder
layer whole; ``accelerate.dispatch_model`` moves activations between devices at run time.

A quantized Linear placed on a GPU runs the chosen backend; one placed on the CPU decodes its
weight once into a dense matrix (the torch reference), which takes more memory than its packed
size. llmq does not offload an artifact to disk: a plan that needs it is refused.
"""

from __future__ import annotations

import re

import torch

from llmq.errors import DeviceError, UsageError

_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", re.IGNORECASE)


def parse_max_memory(spec: str) -> dict[int | str, str]:
    """``"0=20GiB,cpu=60GiB"`` -> ``{0: "20GiB", "cpu": "60GiB"}`` (keys: GPU indices or ``cpu``)."""
    result: dict[int | str, str] = {}
    for part in spec.split(","):
        key, sep, size = (p.strip() for p in part.partition("="))
        if not sep or not _SIZE.match(size):
            raise UsageError(f"--max-memory {spec!r}: give DEVICE=SIZE pairs such as 0=20GiB,cpu=60GiB")
        if key.isdigit():
            result[int(key)] = size
        elif key == "cpu":
            result["cpu"] = size
        else:
            raise UsageError(f"--max-memory {spec!r}: {key!r} is not a GPU index or 'cpu'")
    return result


def meta_skeleton(manifest, config, dtype: torch.dtype):
    """The artifact's model on the meta device, quantized Linears holding meta packed tensors."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from llmq.runtime.qlinear import QuantLinear, parent_module, unfuse_quantized_experts
    from llmq.runtime.sources.families import family_of

    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    unfuse_quantized_experts(model, family_of(model, config), manifest.linears)
    for name, entry in manifest.linears.items():
        parent, child = parent_module(model, name)
        packed = {
            s: torch.empty(shape, dtype=dt, device="meta") for s, (dt, shape) in entry.layout.tensor_specs().items()
        }
        bias = torch.empty(entry.layout.out_features, dtype=dtype, device="meta") if entry.bias else None
        setattr(parent, child, QuantLinear(entry.layout, packed, bias))
    return model


def plan_device_map(manifest, config, dtype: torch.dtype, max_memory: dict[int | str, str]) -> dict[str, int | str]:
    """Module name -> device (GPU index or ``cpu``) for every part of the model, made on meta."""
    from accelerate import infer_auto_device_map

    model = meta_skeleton(manifest, config, dtype)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    spilled = sorted(name for name, where in device_map.items() if where == "disk")
    if spilled:
        raise DeviceError(
            f"the model does not fit in --max-memory {max_memory}: {len(spilled)} part(s) would go to disk "
            f"(first {spilled[0]!r}), which llmq does not do; allow more memory"
        )
    return device_map


def device_of(device_map: dict[str, int | str], name: str) -> torch.device:
    """The device of module or tensor ``name``: the map's longest matching prefix."""
    best = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
    if best is None:
        raise DeviceError(f"the device map does not place {name}")
    where = device_map[best]
    return torch.device(f"cuda:{where}" if isinstance(where, int) else where)
