"""How much each Linear's output error costs the whole model: the diagonal of the output Fisher.

A Linear's quantization error moves its output by ``δ`` at every position, and the model's
next-token distribution with it. To second order the KL divergence from the fp32 model is
``½ Σ_t δ_tᵀ F_t δ_t``, where ``F_t`` is the Fisher information of the model's output
distribution with respect to that Linear's output at position ``t``. Its diagonal is
``E[g²]`` with ``g`` the gradient of ``log p(y)`` for labels ``y`` drawn from the model itself
(not the text's tokens: that would be the empirical Fisher, which measures fit, not sensitivity).
Averaged over positions it gives one weight per output channel, ``fisher[o] = mean_t g[t, o]²``.
Keeping only that diagonal, and taking ``g²`` independent of the input ``x``, the KL of an error
``E = Ŵ - W`` is about ``½ Σ_o fisher[o] · (E H Eᵀ)[o, o]``, with ``H = E[x xᵀ]`` the input
statistics calibration collects anyway. (On the demo model, 105 Linears each quantized alone to
pure 2-bit with GPTQ: that prediction ranks the measured KLs with Spearman 0.79; their output
errors ``tr(E H Eᵀ)`` rank them at 0.20. docs/method.md, "A model-wide bit budget".)

The pass streams like calibration: the caller's forward pass keeps every layer's input for the
windows used here (on disk, a file per layer), then one backward pass walks the layers from last
to first, loading each again and reading back, then freeing, its inputs as it goes. One label is
drawn per position; the positions of all the windows supply the averaging. The mean is over all
positions, so a routed expert's weight counts the positions that did not reach it as zero, as its
Hessian's tokens are only the routed ones: their product is the expert's share of the model's loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmq.quant.config import QuantConfig
from llmq.quant.stream import LayerStream
from llmq.runtime.sources import families as F


def output_fisher(
    stream: LayerStream,
    layer_inputs: list[list[torch.Tensor]],
    final: list[torch.Tensor],
    config: QuantConfig,
    seed: int,
    on_layer: Callable[[int, int], None] | None = None,
    stop: Callable[[], None] = lambda: None,
) -> dict[str, torch.Tensor]:
    """Per selected Linear that the loss reaches, ``fisher[o]`` float32 ``[N]`` on the CPU: the mean
    over positions of the squared gradient of a sampled label's log-probability at output ``o``.

    stream        the model, its layers already walked forward (each dropped or still loaded)
    layer_inputs  per decoder layer, the hidden states [1, L, H] entering it, one per window used
                  (the first ``len(final)`` of ``stream.windows``); ``pop()`` gives the last layer's,
                  and the pass empties it (a list, or :class:`~llmq.quant.calibrate.LayerInputs`)
    final         per window used, the last decoder layer's output [1, L, H]
    seed          of the label draws
    stop          called before each window's pass through a layer; raises ``KeyboardInterrupt`` to end
    """
    family = stream.family
    fisher: dict[str, torch.Tensor] = {}
    tokens = sum(h.shape[1] for h in final)
    stream.load_rest()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    grads = []
    for h in final:
        stop()  # the output head over a large vocabulary takes seconds per window
        grads.append(_head_grad(stream, h, config, fisher, generator))
    for index in reversed(range(len(stream))):
        prefix = f"{family.layers}.{index}"
        layer = stream.layer(index)
        layer.requires_grad_(False)
        inputs = layer_inputs.pop()
        for window, x in enumerate(inputs):
            stop()
            grads[window] = _layer_grad(stream, index, layer, prefix, x, grads[window], config, fisher)
        assert len(inputs) == len(grads)
        del inputs
        stream.drop(index)
        if on_layer is not None:
            on_layer(len(stream) - index, len(stream))
    return {name: (total / tokens).float().cpu() for name, total in fisher.items()}


def fill_unreached(fisher: dict[str, torch.Tensor], linears: dict[str, int]) -> int:
    """Give every Linear in ``linears`` (name -> out features) a Fisher: one the loss did not reach
    in the Fisher windows (a routed expert no token went to there) gets the mean of its measured
    sibling experts, any other zeros. Returns how many were filled."""
    filled = 0
    for name, out_features in linears.items():
        if name in fisher:
            continue
        kind, _, expert = name.rpartition(".")
        siblings = [v for n, v in fisher.items() if expert.isdigit() and n.rpartition(".")[0] == kind]
        fisher[name] = torch.stack(siblings).mean(0) if siblings else torch.zeros(out_features)
        filled += 1
    return filled


def _head_grad(stream: LayerStream, final, config, fisher, generator) -> torch.Tensor:
    """The gradient at the last layer's output of ``log p(y)`` summed over positions, ``y`` drawn
    from the model's own distribution; selected Linears after the layers (an output head) add theirs.
    The positions go through the head a slice at a time (:meth:`OutputHead.slices`): each
    position's logits and gradient are its own, and the labels are drawn in the same order."""
    return torch.cat([_head_grad_slice(stream, final[:, start:end], config, fisher, generator)
                      for start, end in stream.head.slices(0, final.shape[1])], dim=1)  # fmt: skip


def _head_grad_slice(stream: LayerStream, final, config, fisher, generator) -> torch.Tensor:
    final = final.detach().requires_grad_(True)
    outputs, hooks = _capture_outputs(stream.model, "", stream.family, config, skip=stream.family.layers + ".")
    try:
        logits = stream.logits(final)[0].float()
    finally:
        for hook in hooks:
            hook.remove()
    # Linears before the decoder layers (an embedding projection) get no gradient from here
    outputs = {name: out for name, out in outputs.items() if out.requires_grad}
    log_p = torch.log_softmax(logits, -1)
    labels = torch.multinomial(log_p.detach().exp().cpu(), 1, generator=generator).to(log_p.device)
    grads = torch.autograd.grad(log_p.gather(-1, labels).sum(), [final, *outputs.values()])
    _accumulate(fisher, outputs, grads[1:])
    return grads[0]


def _layer_grad(stream: LayerStream, index: int, layer, prefix: str, x, grad, config, fisher) -> torch.Tensor:
    """Back through decoder layer ``index`` from ``grad`` at its output: the gradient at its input;
    its selected Linears' squared output gradients are added to ``fisher``."""
    x = x.detach().requires_grad_(True)
    outputs, hooks = _capture_outputs(layer, prefix, stream.family, config)
    try:
        y = stream.call(index, layer, x)
    finally:
        for hook in hooks:
            hook.remove()
    grads = torch.autograd.grad(y, [x, *outputs.values()], grad_outputs=grad, allow_unused=True)
    _accumulate(fisher, outputs, grads[1:])
    return grads[0]


def _capture_outputs(module, prefix: str, family: F.Family, config: QuantConfig, skip: str | None = None):
    """Hooks that keep each selected Linear's output tensor: ``(name -> tensor, handles)``. Only the
    Linears that run appear (a routed expert no token reached does not)."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, child in module.named_modules():
        full = f"{prefix}.{name}" if prefix else name
        skipped = skip is not None and full.startswith(skip)
        if skipped or F.linear_shape(child) is None or not config.quantizes(full, family):
            continue
        hooks.append(child.register_forward_hook(lambda mod, args, out, full=full: outputs.__setitem__(full, out)))
    return outputs, hooks


def _accumulate(fisher: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], grads) -> None:
    for (name, out), grad in zip(outputs.items(), grads, strict=True):
        if grad is None:  # its output does not reach the loss; fill_unreached gives it one
            continue
        squares = grad.detach().double().pow(2).reshape(-1, out.shape[-1]).sum(0)
        fisher[name] = fisher[name] + squares if name in fisher else squares
