"""``quantize --refine e2e``: after block-wise reconstruction, tune the whole model's continuous numbers
to the fp32 model's output distribution.

What moves: every quantized matrix's fp16 second-order scales and 4-bit groups' fp16 scales (as
log-multipliers, rounded to fp16 on the forward pass, like :mod:`llmq.quant.refine`) and the
decoder layers' norm weights. The codes, scale codes and zeros stay frozen, as EfficientQAT's
E2E-QP and PV-tuning's continuous phase keep them.

The loss is the KL divergence from the fp32 model's next-token distribution, truncated to its
``TOP_K`` most likely tokens per position: ``sum p (log p - log q)`` over those tokens. The
teacher's logits come from the fp32 last-layer outputs the block pass already computed, through
the model's own final norm and head, so the fp32 model never runs a second time. The student runs
window by window with every decoder layer checkpointed (the activations of one layer at a time
are kept for the backward pass). One window in eight is held aside: the tuned numbers are kept
only if its loss went down. The final norm and the head are not tuned (the student uses the
source's fp32 values; the artifact stores them rounded to 16 bits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from llmq.quant.config import RefineSettings
from llmq.quant.reconstruct import Stack
from llmq.quant.refine import TuneResult, tune_if_better
from llmq.quant.stream import LayerStream

# Teacher tokens per position: enough to hold nearly all of the fp32 model's probability mass.
TOP_K = 64


@dataclass(frozen=True)
class _Teacher:
    tokens: torch.Tensor  # [S, L, TOP_K] int64
    log_probs: torch.Tensor  # [S, L, TOP_K] float32


@torch.no_grad()
def _teacher(stream: LayerStream, final_fp: torch.Tensor) -> _Teacher:
    tokens, log_probs = [], []
    for hidden in final_fp:
        top = torch.log_softmax(stream.logits(hidden[None])[0].float(), -1).topk(TOP_K, dim=-1)
        tokens.append(top.indices)
        log_probs.append(top.values)
    return _Teacher(torch.stack(tokens), torch.stack(log_probs))


def _student_loss(stream: LayerStream, stack: Stack, index: int, teacher: _Teacher) -> torch.Tensor:
    """KL of the quantized model from the teacher over the teacher's top tokens, window ``index``."""
    hidden = stream.hidden[index].to(stream.device)
    for position, layer in enumerate(stack.layers):
        hidden = checkpoint(stream.call, position, layer, hidden, use_reentrant=False)
    log_q = torch.log_softmax(stream.logits(hidden)[0].float(), -1)
    picked = log_q.gather(-1, teacher.tokens[index].to(log_q.device))
    log_p = teacher.log_probs[index].to(log_q.device)
    return (log_p.exp() * (log_p - picked)).sum(-1).mean()


def _held_loss(stream: LayerStream, stack: Stack, windows: range, teacher: _Teacher) -> float:
    with torch.no_grad():
        return sum(float(_student_loss(stream, stack, i, teacher)) for i in windows) / len(windows)


def tune_end_to_end(
    stream: LayerStream,
    stack: Stack,
    settings: RefineSettings,
    stop: Callable[[], None] = lambda: None,
    on_step: Callable[[int, int], None] = lambda step, total: None,
) -> TuneResult:
    """Tune ``stack``'s scales and norms in place so the model's outputs match the fp32 model's.

    stream  the source model over the calibration windows, its layers already walked (the stack's)
    stack   from :func:`llmq.quant.reconstruct.refine_blocks` with ``keep``
    """
    stream.load_rest()
    teacher = _teacher(stream, stack.final_fp)
    windows = len(stream.windows)
    train = windows - settings.held_out(windows)
    held = range(train, windows)
    scales = [p for layer in stack.trainables for t in layer.values() for p in t.scale_parameters()]
    norms = [(p, dtype) for layer in stack.norms for p, dtype in layer.values()]
    params = scales + [p for p, _ in norms]

    def steps() -> None:
        adam = torch.optim.Adam(params, lr=settings.e2e_lr)
        gen = torch.Generator().manual_seed(0)
        for step in range(settings.e2e_steps):
            stop()
            adam.zero_grad(set_to_none=True)
            for i in torch.randperm(train, generator=gen)[: settings.e2e_batch].tolist():
                (_student_loss(stream, stack, i, teacher) / settings.e2e_batch).backward()
            adam.step()
            on_step(step + 1, settings.e2e_steps)

    return tune_if_better(params, norms, partial(_held_loss, stream, stack, held, teacher), steps)
