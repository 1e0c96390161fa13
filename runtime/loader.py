"""Load a ``.llmq`` artifact into a transformers model on any torch device.

The model skeleton is built from the artifact's own config with parameters on the meta device
(buffers such as rotary tables are built normally), every quantized Linear is replaced by a
:class:`QuantLinear` holding its validated packed tensors, the dense tensors are assigned, and
tied weights are re-tied. Nothing is read from outside the artifact.
"""

from __future__ import annotations

import torch

from llmq.errors import ArtifactError
from llmq.runtime import artifact as A
from llmq.runtime.device import Backend
from llmq.runtime.qlinear import QuantLinear


def load_quantized_model(
    manifest: A.Manifest,
    config,
    device: torch.device,
    dtype: torch.dtype,
    backend: Backend = Backend.torch,
    device_map: dict[str, int | str] | None = None,
):
    """The artifact as a transformers model; its Linears compute with ``backend`` (``cuda`` or ``torch``).

    With ``device_map`` (from :func:`llmq.runtime.placement.plan_device_map`) each part goes to its
    own device and accelerate moves activations between them; a quantized Linear placed on the
    CPU then uses the torch backend, whatever ``backend`` says for the GPUs.
    """
    assert backend in (Backend.cuda, Backend.torch), "resolve auto with device.resolve_backend first"
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    from llmq.runtime.placement import device_of

    def place(name: str) -> torch.device:
        return device if device_map is None else device_of(device_map, name)

    tensors = A.load_tensors(manifest)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, entry in manifest.linears.items():
        parent, child = parent_module(model, name)
        if not isinstance(getattr(parent, child, None), torch.nn.Linear):
            raise ArtifactError(f"{manifest.path}: {name} is not a Linear in the {config.model_type} model")
        target = place(name)
        packed = {suffix: tensors.pop(f"{name}.{suffix}").to(target) for suffix in entry.layout.tensor_specs()}
        bias = tensors.pop(entry.bias).to(target, dtype) if entry.bias else None
        module = QuantLinear(entry.layout, packed, bias)
        if backend == Backend.cuda and target.type == "cuda":
            module.use_cuda()
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


def parent_module(model, dotted: str):
    parent_name, _, child = dotted.rpartition(".")
    try:
        return model.get_submodule(parent_name), child
    except AttributeError as err:
        raise ArtifactError(f"{dotted} does not exist in the model built from the artifact's config") from err
