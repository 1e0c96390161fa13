"""``quantize --refine block``: after GPTQ, tune each decoder block so it reproduces the fp32 block.

The pass streams the source model one decoder layer at a time, like calibration. For layer ``i``
it holds two copies: the fp32 layer from the checkpoint, and the quantized layer built from the
shard GPTQ just wrote (its matrices as :class:`~llmq.quant.refine.TrainableLinear`, its dense
tensors as the artifact stores them). The fp32 layer's outputs on the fp32 hidden states are the
targets; the quantized layer learns to give them from its inputs, which are either the same fp32
hidden states or the outputs of the already-refined layers before it (``refine_inputs``: the
second is what the model sees at inference, errors compounded). The block's norm weights are
tuned with its scales (they scale the same activations; the artifact stores them 16-bit like
every dense tensor). With ``--refine-codes lean`` the block also gets its matrices' fp32 weights,
read from the checkpoint as GPTQ read them, to start its codes from. The tuned numbers replace the
shard, and the run checkpoints the block, so an interrupted run resumes at a block boundary by
replaying the finished blocks (forward passes only) to rebuild their outputs.

Memory: three activation sets of ``[windows, tokens, hidden]`` float32 (fp32 inputs, quantized
inputs, targets) and one layer, never the whole model: the fp32 layer is dropped once its outputs
are known, and the quantized copy is made without copying the fp32 matrices it replaces.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn

from llmq.quant.config import RefineCodes, RefineSettings
from llmq.quant.plan import Plan
from llmq.quant.refine import TrainableLinear, TuneResult, refine_block
from llmq.quant.stream import LayerStream

# How many windows one forward pass without gradients takes at once.
FORWARD_BATCH = 8


@dataclass(frozen=True)
class Shards:
    """Access to the run's shards by unit index: ``read(i)`` -> tensors, ``write(i, tensors)``,
    ``done(unit)``: whether the block was refined by an earlier, interrupted run, ``finish(unit)``:
    record that it now is."""

    read: Callable[[int], dict[str, torch.Tensor]]
    write: Callable[[int, dict[str, torch.Tensor]], None]
    done: Callable[[str], bool]
    finish: Callable[[str], None]


@dataclass(frozen=True)
class BlockReport:
    index: int
    result: TuneResult | None  # None: refined by an earlier run, replayed here
    seconds: float


@dataclass(frozen=True)
class Stack:
    """Every decoder layer as the artifact now holds it, kept for the end-to-end stage.

    layers      the quantized layers, in order, their matrices :class:`TrainableLinear`
    trainables  per layer, its TrainableLinears by matrix name
    norms       per layer, its norm weights by tensor name, with the dtype the shard stores them in
    final_fp    [S, L, H] float32: the fp32 model's last decoder layer outputs on the windows
    """

    layers: list[nn.Module]
    trainables: list[dict[str, TrainableLinear]]
    norms: list[dict[str, tuple[nn.Parameter, torch.dtype]]]
    final_fp: torch.Tensor


def refine_blocks(
    stream: LayerStream,
    plan: Plan,
    shards: Shards,
    settings: RefineSettings,
    on_block: Callable[[BlockReport, int], None] = lambda report, total: None,
    stop: Callable[[], None] = lambda: None,
    keep: bool = False,
) -> tuple[list[BlockReport], Stack | None]:
    """Refine every decoder layer of ``plan`` in order, rewriting its shard; returns one report per
    layer and, with ``keep``, the whole refined :class:`Stack` (else None).

    stream    the source model over the calibration windows (its ``hidden``: each window's input to layer 0)
    on_block  called after each layer with its report and the number of layers
    stop      called between optimiser steps; raises ``KeyboardInterrupt`` to end the run there
    """
    x_fp = torch.cat(stream.hidden)  # [S, L, H]
    x_q = x_fp if settings.inputs == "fp" else x_fp.clone()
    reports, kept = [], Stack([], [], [], x_fp)
    for index in range(len(stream)):
        started = time.perf_counter()
        unit = str(index)
        fp_layer = stream.layer(index)
        tensors = shards.read(plan.units.index(unit))
        q_layer, trainables = _quantized_layer(fp_layer, plan, unit, tensors)
        norms = _norm_weights(q_layer, f"{plan.family.layers}.{unit}.", tensors)
        y_fp = _forward(stream, index, fp_layer, x_fp)
        del fp_layer  # its work is done: only the quantized copy is tuned, so the stream frees it now
        stream.drop(index)
        result = None
        if not shards.done(unit) and trainables:
            inputs = x_fp if settings.inputs == "fp" else x_q
            fp_weight = plan.weight if settings.codes == RefineCodes.lean else None
            result = refine_block(q_layer, trainables, inputs, y_fp, partial(stream.call, index), settings, stop,
                                  list(norms.values()), fp_weight)  # fmt: skip
            shards.write(plan.units.index(unit), tensors | stored_tensors(trainables, norms))
            shards.finish(unit)
        if settings.inputs != "fp":
            x_q = _forward(stream, index, q_layer, x_q)
        x_fp = y_fp
        if keep:
            kept.layers.append(q_layer)
            kept.trainables.append(trainables)
            kept.norms.append(norms)
        reports.append(BlockReport(index, result, time.perf_counter() - started))
        on_block(reports[-1], len(stream))
    return reports, (replace(kept, final_fp=x_fp) if keep else None)


def stored_tensors(
    trainables: dict[str, TrainableLinear], norms: dict[str, tuple[nn.Parameter, torch.dtype]]
) -> dict[str, torch.Tensor]:
    """A layer's tuned numbers as its shard stores them: each matrix packed, each norm in its dtype."""
    tensors = {}
    for name, trainable in trainables.items():
        tensors.update({f"{name}.{suffix}": t for suffix, t in trainable.pack().items()})
    tensors.update({key: param.detach().to(dtype).cpu() for key, (param, dtype) in norms.items()})
    return tensors


def _norm_weights(
    layer: torch.nn.Module, prefix: str, tensors: dict[str, torch.Tensor]
) -> dict[str, tuple[nn.Parameter, torch.dtype]]:
    """The layer's normalisation parameters (RMSNorm, LayerNorm, q/k norms: any module whose class
    name ends in ``Norm``) by tensor name, where the shard stores them, with the dtype it stores them
    in: refinement tunes them with the scales, as they scale the same inputs and outputs."""
    found = {}
    for module_name, module in layer.named_modules():
        if type(module).__name__.lower().endswith("norm"):
            for param_name, param in module.named_parameters(recurse=False):
                key = f"{prefix}{module_name}.{param_name}" if module_name else f"{prefix}{param_name}"
                if key in tensors and param.dtype.is_floating_point:
                    found[key] = (param, tensors[key].dtype)
    return found


def _quantized_layer(fp_layer: torch.nn.Module, plan: Plan, unit: str, tensors: dict[str, torch.Tensor]):
    """A copy of ``fp_layer`` as the artifact holds it: dense tensors as stored (16-bit, rounded) and
    each quantized matrix a :class:`TrainableLinear` of its packed tensors. Returns the layer and
    the trainables by matrix name; only their stored numbers require gradients."""
    prefix = f"{plan.family.layers}.{unit}."
    device = next(fp_layer.parameters()).device
    names = [n for n in plan.linears if n.startswith(prefix)]
    # the quantized matrices' fp32 weights are not copied (they are replaced below): a meta tensor stands in
    matrices = [fp_layer.get_submodule(n.removeprefix(prefix)).weight for n in names]
    layer = copy.deepcopy(fp_layer, memo={id(w): nn.Parameter(w.to("meta"), requires_grad=False) for w in matrices})
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if prefix + name in tensors:
                param.copy_(tensors[prefix + name].float())
    layer.requires_grad_(False)
    trainables = {}
    for name in names:
        layout = plan.linears[name]
        relative = name.removeprefix(prefix)
        module = layer.get_submodule(relative)
        packed = {suffix: tensors[f"{name}.{suffix}"].to(device) for suffix in layout.tensor_specs()}
        trainable = TrainableLinear(layout, packed, getattr(module, "bias", None))
        parent, _, child = relative.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, child, trainable)
        trainables[name] = trainable
    return layer, trainables


@torch.no_grad()
def _forward(stream: LayerStream, index: int, layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Layer ``index`` (or its quantized copy) over every window, a few windows per call: [S, L, H]."""
    return torch.cat([stream.call(index, layer, hidden[i : i + FORWARD_BATCH])
                      for i in range(0, len(hidden), FORWARD_BATCH)])  # fmt: skip
