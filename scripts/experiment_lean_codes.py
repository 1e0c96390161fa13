"""Experiment, not an llmq option yet: block refinement that also tunes the codes, from an fp32-leaning start.

AutoRound's rounding starts each code at the fp32 weight's unrounded position and moves it by signed
gradient steps; llmq's refinement keeps GPTQ's codes (signed steps from GPTQ's codes made blocks
worse, docs/method.md). This script tries AutoRound's start inside llmq's format:

Patches quant.reconstruct so that each block (1) measures GPTQ's held-aside error, (2) resets every
2-bit and 4-bit code to the unrounded position of the fp32 weight under GPTQ's scales, (3) runs
refine_block with signed steps on the integers (--refine-lr), and (4) keeps GPTQ's numbers unless the
tuned ones beat GPTQ's held-aside error. Then runs the llmq CLI with the given arguments, e.g.

    python scripts/experiment_lean_codes.py quantize demo -o OUT --calib STATS --refine block \
        --g1 64 --target-bits 2.2812 --refine-lr 0.02

With --refine-lr 0.02 and the default 50 steps (the rate decays linearly to 0) a code moves at
most about half a step from its start, as AutoRound's offsets are bounded. Results: docs/benchmarks.md.
"""

import sys

import torch

import llmq.quant.reconstruct as R
import llmq.quant.refine as F
from llmq.runtime.format import layout as L

FP_WEIGHT = {}  # id(TrainableLinear) -> fp32 weight [N, K]
_orig_layer, _orig_refine = R._quantized_layer, R.refine_block
STATS = {"kept": 0, "blocks": 0}


def quantized_layer(fp_layer, plan, unit, tensors):
    layer, trainables = _orig_layer(fp_layer, plan, unit, tensors)
    prefix = f"{plan.family.layers}.{unit}."
    for name, t in trainables.items():
        FP_WEIGHT[id(t)] = fp_layer.get_submodule(name.removeprefix(prefix)).weight.detach().float()
    return layer, trainables


@torch.no_grad()
def lean_start(t, w):
    lay, v = t.layout, t._stored()
    wp = w[:, t.fixed["perm"].long()]
    if lay.k2:
        scale = t.group_scales2(v)  # [N, groups2]
        w2 = wp.new_zeros(lay.out_features, lay.k2_padded)
        w2[:, : lay.k2] = wp[:, : lay.k2]
        cont = w2.reshape(lay.out_features, lay.groups2, lay.g1) / scale.unsqueeze(-1) + t.zero2.unsqueeze(-1)
        cont = cont.reshape(lay.out_features, lay.k2_padded).clamp(-0.49, L.INT2_MAX + 0.49)
        ok = torch.isfinite(cont)
        ok[:, lay.k2 :] = False  # padding keeps its code
        t.codes2.copy_(torch.where(ok, cont, t.codes2))
    if lay.k4:
        cont = wp[:, lay.k2 :].reshape(lay.out_features, lay.groups4, lay.g4) / v["scale4"].unsqueeze(-1)
        cont = (cont + v["zero4"].unsqueeze(-1)).reshape(lay.out_features, lay.k4).clamp(-0.49, L.INT4_MAX + 0.49)
        t.codes4.copy_(torch.where(torch.isfinite(cont), cont, t.codes4))


def refine_block(block, trainables, inputs, targets, call, settings, stop=lambda: None, dense=()):
    held = slice(len(inputs) - settings.held_out(len(inputs)), len(inputs))
    params = [p for t in trainables.values() for p in t.parameters()] + [p for p, _ in dense]
    snapshot = [p.detach().clone() for p in params]
    gptq = F._error(block, inputs[held], targets[held], call, settings.batch)
    for t in trainables.values():
        lean_start(t, FP_WEIGHT[id(t)])
    result = _orig_refine(block, trainables, inputs, targets, call, settings, stop, dense)
    STATS["blocks"] += 1
    tuned = result.after if result.kept else result.before  # refine_block reverts to the lean start
    if tuned < gptq:
        STATS["kept"] += 1
        print(
            f"lean: kept, held-aside {gptq:.4g} -> {tuned:.4g} (lean start {result.before:.4g})",
            file=sys.stderr,
            flush=True,
        )
        return F.TuneResult(gptq, tuned, True)
    with torch.no_grad():
        for p, value in zip(params, snapshot, strict=True):
            p.copy_(value)
    print(
        f"lean: reverted to GPTQ {gptq:.4g} (tuned {tuned:.4g}, lean start {result.before:.4g})",
        file=sys.stderr,
        flush=True,
    )
    return F.TuneResult(gptq, gptq, False)


def main() -> None:
    from llmq.cli.app import app

    R._quantized_layer, R.refine_block = quantized_layer, refine_block
    try:
        app(sys.argv[1:], standalone_mode=False)
    finally:
        print(f"lean: {STATS['kept']} of {STATS['blocks']} blocks kept their tuned numbers", file=sys.stderr)


if __name__ == "__main__":
    main()
