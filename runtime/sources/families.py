"""Model families as data: the one place that names a model's modules.

For each family the table says where the decoder layers are, how the checkpoint names what the
model holds (renames, experts stored one file tensor per expert), how mixture-of-experts layers
store and route experts, and which gates stay 16-bit. Calibration, the quantize pipeline and the
loader read it; none of them names a module of its own.

What the table does not need to say, llmq finds out: the quantizable matrices are every
``nn.Linear`` and GPT-2 ``Conv1D`` in the decoder layers; Linears that read the same tensor
(q/k/v, gate/up) share calibration statistics because calibration sees them read it; a fused
projection (``qkv_proj``, ``query_key_value``, ``gate_up_proj``, ``c_attn``) is one matrix whose
rows are its parts, quantized as one, so its stripes are input channels shared by every part,
and its shape is checked against the one the config builds. An architecture that is not listed
works when its decoder layers can be found: the one ``nn.ModuleList`` as long as
``config.num_hidden_layers``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmq.errors import ModelSourceError


@dataclass(frozen=True)
class Experts:
    """Experts of a mixture-of-experts layer, stored as 3-D parameters ``[experts, out, in]`` of one
    module and routed as transformers' eager implementation does (:mod:`llmq.runtime.sources.experts`):
    per expert, ``act(gate) * up`` from the ``gate_up`` matrix (gate rows first), then ``down``.

    module      the experts module, relative to a decoder layer (layers without it are dense)
    gate_up     its ``[E, 2I, H]`` parameter; ``down`` its ``[E, H, I]`` one. Each is quantized per
                expert, named ``<module>.<param>.<expert>`` in an artifact
    count, act  its attributes holding the number of experts and the activation
    checkpoint  how a checkpoint may store expert ``e`` of each parameter instead: the keys, relative
                to the experts module, whose matrices are concatenated along the rows
    """

    module: str
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    count: str = "num_experts"
    act: str = "act_fn"
    checkpoint: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def params(self) -> tuple[str, str]:
        return self.gate_up, self.down


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers: str  # the decoder layer list, from the model's root
    renames: tuple[tuple[str, str], ...] = ()  # checkpoint key prefix or infix -> the model's
    experts: Experts | None = None
    dense: tuple[str, ...] = ()  # gates and routers kept 16-bit, relative to a decoder layer

    def layer_of(self, name: str) -> int | None:
        """The decoder layer index a module or tensor name lies in, or None outside the layers."""
        prefix = self.layers + "."
        if not name.startswith(prefix):
            return None
        index = name[len(prefix) :].split(".", 1)[0]
        return int(index) if index.isdigit() else None

    def keeps_dense(self, name: str) -> bool:
        """Whether module ``name`` is one of the family's gates that stay 16-bit."""
        index = self.layer_of(name)
        return index is not None and name.removeprefix(f"{self.layers}.{index}.") in self.dense


_PER_EXPERT_GATE_UP = {
    "gate_up_proj": ("{e}.gate_proj.weight", "{e}.up_proj.weight"),
    "down_proj": ("{e}.down_proj.weight",),
}

FAMILIES: tuple[Family, ...] = (
    Family(
        "llama",
        (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "olmo",
            "olmo2",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi3",
            "granite",
            "smollm3",
        ),
        "model.layers",
    ),  # fmt: skip
    Family("gpt-neox", ("gpt_neox",), "gpt_neox.layers", renames=(("embed_out.", "lm_head."),)),
    Family("falcon", ("falcon",), "transformer.h"),
    Family("opt", ("opt",), "model.decoder.layers"),
    Family("gpt2", ("gpt2",), "transformer.h"),
    Family(
        "mixtral",
        ("mixtral",),
        "model.layers",
        renames=((".block_sparse_moe.", ".mlp."),),
        experts=Experts(
            "mlp.experts",
            checkpoint={"gate_up_proj": ("{e}.w1.weight", "{e}.w3.weight"), "down_proj": ("{e}.w2.weight",)},
        ),  # fmt: skip
    ),
    Family(
        "qwen-moe",
        ("qwen2_moe", "qwen3_moe"),
        "model.layers",
        experts=Experts("mlp.experts", checkpoint=_PER_EXPERT_GATE_UP),
        dense=("mlp.shared_expert_gate",),  # a [1, hidden] gate: a router, not a projection
    ),
)
_BY_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def family_of(model, config) -> Family:
    """The table's family for ``config.model_type``, or one made by the generic rule: the model's
    one ``nn.ModuleList`` of ``config.num_hidden_layers`` modules. ``model`` may be on meta."""
    model_type = getattr(config, "model_type", "unknown")
    if model_type in _BY_TYPE:
        return _BY_TYPE[model_type]
    count = getattr(config, "num_hidden_layers", None)
    lists = [name for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList)
             and len(module) == count and name]  # fmt: skip
    if len(lists) != 1:
        found = f"{len(lists)} candidates ({', '.join(lists[:3])})" if lists else "none"
        raise ModelSourceError(
            f"model type {model_type!r} is not in llmq's architecture table, and its decoder layers cannot be "
            f"found by the generic rule (one ModuleList of num_hidden_layers={count} modules): {found}. Add it "
            "to llmq/runtime/sources/families.py"
        )
    return Family(model_type, (model_type,), lists[0])


def decoder_layers(model, family: Family) -> torch.nn.ModuleList:
    try:
        layers = model.get_submodule(family.layers)
    except AttributeError:
        layers = None
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelSourceError(f"the {family.name} model has no decoder layer list at {family.layers!r}")
    return layers


def checked_per_layer(model, config, check):
    """``model`` with ``check()`` called before each decoder layer's forward, so that a stop lands
    within one layer of a forward pass rather than after it: one 2048-token window of the 135M
    demo model takes about 4 s on a 2-core CPU, one of its 30 layers about 0.13 s."""
    for layer in decoder_layers(model, family_of(model, config)):
        layer.register_forward_pre_hook(lambda module, args: check())
    return model


def is_conv1d(module) -> bool:
    """GPT-2's ``Conv1D``: a Linear whose weight is stored transposed, ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def linear_shape(module) -> tuple[int, int] | None:
    """``(out, in)`` of a quantizable matrix module (``nn.Linear`` or ``Conv1D``), else None."""
    if isinstance(module, torch.nn.Linear):
        return module.out_features, module.in_features
    if is_conv1d(module):
        return module.nf, module.nx
    return None


def expert_modules(model, family: Family) -> dict[str, torch.nn.Module]:
    """Name -> experts module of every decoder layer that has one (a model may mix dense and MoE layers)."""
    if family.experts is None:
        return {}
    found = {}
    for i, layer in enumerate(decoder_layers(model, family)):
        try:
            found[f"{family.layers}.{i}.{family.experts.module}"] = layer.get_submodule(family.experts.module)
        except AttributeError:
            continue
    return found


def expert_count(module, family: Family) -> int:
    return int(getattr(module, family.experts.count))
