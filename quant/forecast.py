"""How long each phase of a quantize run will take and how much memory it will hold, before it starts.

A run's phases (calibrate, fisher, plan, quantize, refine, e2e) are counted from the plan and the
settings in four kinds of work, each of which a device does at its own rate:

  flops      fp32 matrix products (layer forwards and backwards, Hessian sums, GPTQ's block updates)
  flops64    fp64 factorisations (GPTQ's inverse Hessian)
  elements   elementwise passes over large tensors (the scale search, rounding, GPTQ's column updates)
  ops        small tensor calls whose fixed cost dominates (GPTQ's column loop; a kernel launch on a GPU)

:func:`measure_speed` times the four rates on the run's device in about three seconds. The counts
follow the code's loops but not every temporary, so each phase's seconds carry one factor,
``EFFICIENCY``, fitted from measured runs on one CPU (docs/data/forecast.json says which runs,
and how far the forecast is from runs it was not fitted on). On another device the rates are
measured there and the factors carried over: a GPU forecast is an estimate until it is compared
with a run there.

Memory per phase is the process before the run (measured) plus what the phase holds at once: one
decoder layer in fp32, the calibration activations, the largest matrix's working set, the output
head's slice of logits. It does not grow with the number of layers, but for the output Fisher
(4 bytes per output row of every matrix), which the run holds to the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llmq.quant.calibrate import FISHER_WINDOWS, product_rows
from llmq.quant.linear import block_rows
from llmq.quant.plan import REST, Plan
from llmq.quant.reconstruct import FORWARD_BATCH
from llmq.runtime.sources.head import HEAD_CHUNK_ELEMENTS

GPTQ_BLOCK = 128
SEARCH_PASSES = 500  # elementwise passes per weight of the 2/4-bit scale search (shrinks x zeros x error)
SCORE_PASSES = 200  # per weight of the plan's channel scoring (min/max fits of both grids)
# Bytes per weight of the largest matrix while its backward runs in refinement: the decoded weight,
# its gradient and the decode's temporaries, counted from the decode's tensors (an upper bound: a
# 70B-class layer's refinement held 0.90 of the phase's forecast, docs/benchmarks.md)
REFINE_MATRIX_BYTES = 24
DECODE_PASSES = 40  # per weight per refinement step: decode, straight-through rounding, their gradients
FORWARD_DECODE_PASSES = 10  # per weight per forward without gradients: one decode
COLUMN_OPS = 14  # tensor calls per column of GPTQ's loop
LAYER_CALL_OPS = 120  # tensor calls of one decoder layer on one batch, forward
ELEMENT_SIZES = (1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24)  # 256 kB to 64 MB of fp32: caches, then memory
# Seconds as counted x this = seconds measured: `scripts/bench_forecast.py --fit h512-l4,h1536-l1` on the
# runs of docs/data/forecast.json (the other points there are the check). e2e has no measured run yet.
EFFICIENCY = {"calibrate": 1.093, "fisher": 1.112, "plan": 1.113, "quantize": 0.954, "refine": 1.145, "e2e": 1.145}


@dataclass(frozen=True)
class Speed:
    """What a device does per second, measured (:func:`measure_speed`)."""

    device: str
    flops: float  # fp32 matrix-product flop/s
    flops64: float  # fp64 Cholesky flop/s
    # elementwise element-passes/s by the tensor's number of elements: ((elements, rate), ...), rising
    # sizes; a tensor that fits a cache goes several times faster than one that streams from memory
    elements: tuple[tuple[int, float], ...]
    op_seconds: float  # one small tensor call

    def element_rate(self, size: float) -> float:
        """Element-passes/s over tensors of ``size`` elements: log-linear between the measured sizes."""
        points = self.elements
        if size <= points[0][0]:
            return points[0][1]
        for (s0, r0), (s1, r1) in zip(points, points[1:], strict=False):
            if size <= s1:
                t = math.log(size / s0) / math.log(s1 / s0)
                return math.exp((1 - t) * math.log(r0) + t * math.log(r1))
        return points[-1][1]

    def to_json(self) -> dict:
        return {"device": self.device, "gflops": round(self.flops / 1e9, 2), "gflops64": round(self.flops64 / 1e9, 2),
                "gelements": {f"{4 * size / 2**20:g} MB": round(rate / 1e9, 3) for size, rate in self.elements},
                "op_us": round(self.op_seconds * 1e6, 2)}  # fmt: skip


@dataclass
class Work:
    flops: float = 0.0
    flops64: float = 0.0
    elements: dict[int, float] = field(default_factory=dict)  # tensor size (elements) -> element-passes
    ops: float = 0.0

    def __iadd__(self, other: Work) -> Work:
        self.flops += other.flops
        self.flops64 += other.flops64
        for size, count in other.elements.items():
            self.elements[size] = self.elements.get(size, 0.0) + count
        self.ops += other.ops
        return self

    def seconds(self, speed: Speed) -> float:
        streamed = sum(count / speed.element_rate(size) for size, count in self.elements.items())
        return self.flops / speed.flops + self.flops64 / speed.flops64 + streamed + self.ops * speed.op_seconds


def _timed(call: Callable[[], object], device: torch.device, budget: float = 0.3) -> float:
    """Seconds of the median call of ``call``, called for about ``budget`` seconds after a warm-up:
    the median, because a moment of boost or of another process's work moves some calls and not
    the run being forecast."""
    call()
    _sync(device)
    times: list[float] = []
    while sum(times) < budget or len(times) < 3:
        start = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_speed(device: torch.device) -> Speed:
    """The four rates of :class:`Speed` on ``device``, at sizes like a model's (about three seconds)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(2048, 2048, generator=g).to(device)  # a layer's size: the rate a model's products reach
    matmul = _timed(lambda: a @ a, device)
    spd = (a[:1024, :1024] @ a[:1024, :1024].T).double() / 1024 + torch.eye(1024, dtype=torch.float64, device=device)
    cholesky = _timed(lambda: torch.linalg.cholesky(spd), device)
    rates = []
    for size in ELEMENT_SIZES:
        x = torch.rand(size, generator=g).to(device)
        passes = _timed(lambda x=x: torch.clamp(torch.round(x / 0.3 + 1.0), 0, 3), device, budget=0.1)  # 4 passes
        rates.append((size, 4 * size / passes))
    small = torch.rand(64, generator=g).to(device)
    op = _timed(lambda: [small.mul(2.0) for _ in range(100)], device) / 100
    return Speed(str(device), 2 * 2048**3 / matmul, 1024**3 / 3 / cholesky, tuple(rates), op)


@dataclass(frozen=True)
class Shape:
    """What a quantize run's cost depends on, from the plan and the model's config. Routed experts
    count as if every token reached every expert: an overestimate for a mixture of experts."""

    layers: list[list[tuple[int, int]]]  # per decoder layer, its quantized matrices' (out, in)
    inputs: list[list[int]]  # per decoder layer, the width of each distinct input (one Hessian each)
    outliers: bool  # GPTQ runs twice per 2-bit matrix (once more with the outliers exact)
    hidden: int
    heads: int
    attention: int  # heads x head dim
    vocab: int
    rest: list[tuple[int, int]] = field(default_factory=list)  # quantized matrices outside the layers

    @classmethod
    def of(cls, plan: Plan, model_config) -> Shape:
        text = model_config.get_text_config()
        heads = getattr(text, "num_attention_heads", 1)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        by_unit: dict[str, list[tuple[str, int, int]]] = {}
        for name, lay in plan.linears.items():
            by_unit.setdefault(plan.unit(name), []).append((name, lay.out_features, lay.in_features))
        layers = [[(n, k) for _, n, k in by_unit.get(u, [])] for u in plan.units if u != REST]
        # Matrices of one module reading the same width share an input (q/k/v, gate/up): one Hessian.
        # o_proj falls in with q/k/v, one Hessian fewer than the run collects; the factors absorb it.
        inputs = [sorted({(name.rsplit(".", 1)[0], k) for name, _, k in by_unit.get(u, [])}) for u in plan.units
                  if u != REST]  # fmt: skip
        return cls(
            layers=layers,
            inputs=[[k for _, k in unit] for unit in inputs],
            outliers=any(lay.n_outliers for lay in plan.linears.values()),
            hidden=text.hidden_size,
            heads=heads,
            attention=heads * head_dim,
            vocab=text.vocab_size,
            rest=[(n, k) for _, n, k in by_unit.get(REST, [])],
        )

    def params(self, index: int) -> int:
        return sum(n * k for n, k in self.layers[index])

    def token_flops(self, index: int, seq_len: int) -> float:
        """One token through decoder layer ``index``, forward: its matrices, and its attention over
        the half of the window before it on average (causal)."""
        return 2 * self.params(index) + 2 * seq_len * self.attention

    def token_elements(self) -> float:
        """Elementwise work of one token through a layer: norms, rotary, activation, residuals (the
        attention's softmax is fused into its kernel, and counted with its flops)."""
        return 30 * self.hidden + 6 * self.widest

    @property
    def matrices(self) -> list[tuple[int, int]]:
        """Every quantized matrix's (out, in): the layers', then the rest's."""
        return [m for unit in self.layers for m in unit] + self.rest

    @property
    def widest(self) -> int:
        """The widest matrix output (the MLP's): the largest activation per token."""
        return max((n for unit in self.layers for n, _ in unit), default=self.hidden)


@dataclass(frozen=True)
class Settings:
    """The parts of a run's settings its cost depends on."""

    samples: int  # calibration windows (0: no calibration in this run)
    seq_len: int
    refine_steps: int = 0  # 0: no refinement
    refine_batch: int = 4
    lean: bool = True  # lean codes: each block tunes once from the leaning start and may tune again from GPTQ's
    e2e_steps: int = 0
    e2e_batch: int = 2
    calibrates: bool = True  # False: the statistics come from a file
    spreads: bool = True  # the plan scores channels for a bit budget
    gptq: bool = True  # calibrated: GPTQ; else round to nearest


def phase_work(shape: Shape, s: Settings) -> dict[str, Work]:
    """Each phase the run goes through, as counted work (:class:`Work`)."""
    phases: dict[str, Work] = {}
    tokens = s.samples * s.seq_len
    layers = range(len(shape.layers))
    if s.calibrates:
        phases["calibrate"] = _calibrate(shape, s, layers, tokens)
        phases["fisher"] = _fisher(shape, s, layers)
    if s.spreads:
        phases["plan"] = Work(ops=300 * sum(map(len, shape.layers)))
        for n, k in shape.matrices:
            phases["plan"] += Work(elements={n * k: SCORE_PASSES * n * k})
    phases["quantize"] = Work()
    for n, k in shape.matrices:
        phases["quantize"] += _quantize(n, k, s.gptq, shape.outliers)
    if s.refine_steps:
        phases["refine"] = _refine(shape, s, layers)
    if s.e2e_steps:
        phases["e2e"] = _e2e(shape, s, layers)
    return phases


def _calibrate(shape: Shape, s: Settings, layers: range, tokens: int) -> Work:
    work = Work()
    for i in layers:
        hessians = sum(2 * k * k for k in shape.inputs[i])
        work += Work(flops=tokens * (shape.token_flops(i, s.seq_len) + hessians),
                     elements={s.seq_len * shape.widest: tokens * shape.token_elements(),
                               max(shape.inputs[i]) ** 2: s.samples * 1.5 * hessians},
                     ops=s.samples * LAYER_CALL_OPS)  # fmt: skip
    return work


def _fisher(shape: Shape, s: Settings, layers: range) -> Work:
    windows = min(s.samples, FISHER_WINDOWS)
    tokens = windows * s.seq_len
    logits = min(HEAD_CHUNK_ELEMENTS, s.seq_len * shape.vocab)
    # Each window goes through a layer forward again, then back for the input's gradient (2x forward).
    work = Work(flops=4 * tokens * shape.vocab * shape.hidden, elements={logits: 12 * tokens * shape.vocab})
    for i in layers:
        work += Work(flops=3 * tokens * shape.token_flops(i, s.seq_len),
                     elements={s.seq_len * shape.widest: 3 * tokens * shape.token_elements()},
                     ops=3 * windows * LAYER_CALL_OPS)  # fmt: skip
    return work


def _quantize(n: int, k: int, gptq: bool, outliers: bool) -> Work:
    """One matrix: the scale search, then GPTQ (twice with outliers: once more with them exact)."""
    work = Work(elements={n * k: SEARCH_PASSES * n * k}, ops=300)
    if gptq:
        passes = 2 if outliers else 1
        # the column loop updates the rest of its block of GPTQ_BLOCK columns: [N, 64] on average
        work += Work(flops=passes * 2 * n * k * k / 2, flops64=passes * 1.7 * k**3,
                     elements={n * GPTQ_BLOCK // 2: passes * n * k * GPTQ_BLOCK},
                     ops=passes * COLUMN_OPS * k)  # fmt: skip
    return work


def _refine(shape: Shape, s: Settings, layers: range) -> Work:
    tunes = 1.5 if s.lean else 1.0  # lean: a second tune from GPTQ's codes where the first lost
    held = max(1, s.samples // 8)
    # window passes, forward-equivalent: targets and next inputs (2 S), held-aside checks, training (fwd + bwd)
    windows = 2 * s.samples + (2 + tunes) * held + tunes * s.refine_steps * s.refine_batch * 3
    # each forward without gradients decodes every matrix once: the held-aside checks a batch at a time,
    # the refined layer's outputs FORWARD_BATCH windows at a time, and (lean) the leaning start
    forwards = (2 + tunes) * math.ceil(held / s.refine_batch) + math.ceil(s.samples / FORWARD_BATCH) + s.lean
    passes = tunes * s.refine_steps * DECODE_PASSES + forwards * FORWARD_DECODE_PASSES
    work = Work()
    for i in layers:
        decode = {n * k: passes * n * k for n, k in shape.layers[i]}
        work += Work(flops=windows * s.seq_len * shape.token_flops(i, s.seq_len),
                     elements={s.refine_batch * s.seq_len * shape.widest: windows * s.seq_len * shape.token_elements()},
                     ops=tunes * s.refine_steps * 4 * LAYER_CALL_OPS)  # fmt: skip
        work += Work(elements=decode)
    return work


def _e2e(shape: Shape, s: Settings, layers: range) -> Work:
    tokens = s.e2e_steps * s.e2e_batch * s.seq_len
    logits = min(HEAD_CHUNK_ELEMENTS, s.seq_len * shape.vocab)
    work = Work(flops=6 * tokens * shape.vocab * shape.hidden, elements={logits: 12 * tokens * shape.vocab})
    for i in layers:
        work += Work(flops=3 * tokens * shape.token_flops(i, s.seq_len),
                     elements={s.e2e_batch * s.seq_len * shape.widest: 3 * tokens * shape.token_elements()},
                     ops=s.e2e_steps * 4 * LAYER_CALL_OPS)  # fmt: skip
        work += Work(elements={n * k: s.e2e_steps * DECODE_PASSES * n * k for n, k in shape.layers[i]})
    return work


def phase_seconds(shape: Shape, s: Settings, speed: Speed) -> dict[str, float]:
    """Wall seconds of each phase on the device ``speed`` was measured on."""
    return {name: EFFICIENCY[name] * work.seconds(speed) for name, work in phase_work(shape, s).items()}


def _activations(shape: Shape, windows: int, seq_len: int, backward: bool) -> int:
    """Bytes of one decoder layer's intermediate tensors over ``windows`` windows (fp32); a backward
    pass keeps them all until it runs, so about three times the forward's transient peak."""
    per_token = 8 * shape.hidden + 3 * shape.widest + 2 * seq_len * shape.heads
    return int((3 if backward else 1) * 4 * windows * seq_len * per_token)


def _refine_weights(params: int, biggest: int, lean: bool) -> int:
    """Bytes of one layer's numbers while refinement tunes it: each weight's fp32 code and its
    gradient, the copy a tuning is undone from (fp32 for the leaning start's unrounded codes, uint8
    for GPTQ's integers) and, with lean codes, GPTQ's integers beside it; and, one matrix at a time,
    the backward's decoded weight, its gradient and the decode's own temporaries
    (:class:`~llmq.quant.refine.TrainableLinear` keeps none of them between the forward and the backward)."""
    per_weight = 4 + 4 + (4 + 1 if lean else 1)
    return per_weight * params + REFINE_MATRIX_BYTES * biggest


def phase_bytes(shape: Shape, s: Settings, unit_bytes: int) -> dict[str, int]:
    """What each phase holds at its peak beyond the process before the run, in bytes. The largest
    layer counts, never their number. ``unit_bytes``: the most one work unit holds while it is
    quantized, its output tensors and its largest matrix's working set
    (:func:`llmq.quant.resources.unit_bytes`)."""
    params = max((shape.params(i) for i in range(len(shape.layers))), default=0)
    widest_in = max((k for unit in shape.inputs for k in unit), default=shape.hidden)
    biggest = max((n * k for n, k in shape.matrices), default=0)
    activations = 4 * s.samples * s.seq_len * shape.hidden  # every calibration window's hidden state, fp32
    kept = min(s.samples, FISHER_WINDOWS)
    head = 4 * shape.vocab * shape.hidden
    phases: dict[str, int] = {}
    if s.calibrates:
        # fp64 sums, and beside them a window's fp32 product with its fp64 copy as it is added (a block of
        # rows of it for a wide input), or a finished fp32 result
        added = 12 * widest_in * product_rows(widest_in)
        sums = max((sum(8 * k * k for k in unit) for unit in shape.inputs), default=0) + max(added, 4 * widest_in**2)
        steady = 4 * params + 2 * activations + sums + _activations(shape, 1, s.seq_len, False)
        phases["calibrate"] = max(steady, head + 4 * params + 2 * activations) + kept * s.seq_len * shape.hidden * 4
        logits = 4 * 4 * min(HEAD_CHUNK_ELEMENTS, s.seq_len * shape.vocab)
        windows = 3 * 4 * kept * s.seq_len * shape.hidden  # last-layer outputs, their gradients, one layer's inputs
        phases["fisher"] = head + 4 * params + windows + _activations(shape, 1, s.seq_len, True) + logits
    if s.spreads:
        # the ranking's fp32 temporaries, a block of rows at a time, and the matrix as read (fp32 at most)
        block = max((block_rows(n, k) * k for n, k in shape.matrices), default=0)
        phases["plan"] = 32 * block + 4 * biggest + 4 * widest_in**2
    fisher = 4 * sum(n for unit in shape.layers for n, _ in unit) if s.calibrates or s.gptq else 0  # held to the end
    phases["quantize"] = fisher + unit_bytes
    if s.refine_steps:
        backward = _activations(shape, s.refine_batch, s.seq_len, True)
        phases["refine"] = 4 * activations + _refine_weights(params, biggest, s.lean) + backward
    if s.e2e_steps:
        layers = sum(4 * 4 * shape.params(i) for i in range(len(shape.layers)))  # every refined layer is kept
        phases["e2e"] = 4 * activations + layers + head + _activations(shape, s.e2e_batch, s.seq_len, True)
    return phases
