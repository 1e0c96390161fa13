"""Latency of prefill and decode, where a decode step's time goes, and the bandwidth it reaches.

Protocol, per batch size ``B``: random token ids ``[B, prompt_len]`` (seeded; no tokenizer is
needed), one forward with a fresh KV cache (prefill, up to the first new token), then
``gen_len`` single-token steps with the cache, the next token being the greedy argmax
(decode), through transformers' growing cache or :class:`~llmq.runtime.decode.static.StaticDecoder` (eager
or as a CUDA graph). ``warmup`` rounds are run and dropped, ``reps`` are kept; the device is synchronized
around each timed region. Times are reported as mean ± sample standard deviation.

The breakdown profiles ``breakdown_steps`` further decode steps with ``torch.profiler``:

* on a GPU, by kernel: llmq's kernels, dense matmul kernels (cuBLAS/cutlass: the LM head, and
  every Linear when the weights are dense), and everything else; the sum is GPU busy time;
* on a CPU, by module: time inside quantized Linears, inside dense Linears, and the rest of the
  step's wall time.

Weight bytes per step count what the quantized Linears actually read: the packed tensors with
the ``cuda`` backend, the dense weight with ``torch``. The copy bandwidth is ``2 · bytes / time``
of a device-to-device copy (read plus write), as CUDA's bandwidthTest counts it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from llmq.errors import UsageError
from llmq.runtime.decode.modes import DecodeMode
from llmq.runtime.decode.static import StaticDecoder, cache_keyword, greedy
from llmq.runtime.qlinear import QuantLinear

MAX_BATCH = 4096
LLMQ_KERNELS = ("gemv_mixed", "gemm_mixed", "gather_permuted", "dequant_packed", "outliers_add")
MATMUL_KERNEL_HINTS = ("gemm", "gemv", "cutlass", "xmma", "cublas", "matmul")


@dataclass(frozen=True)
class Stat:
    mean: float
    sd: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


@dataclass(frozen=True)
class Breakdown:
    """Seconds per decode step by category; ``method`` says how they were measured."""

    quantized_matmul: float
    dense_matmul: float
    other: float
    total: float
    method: str


@dataclass(frozen=True)
class BatchResult:
    batch: int
    prompt_len: int
    prefill_s: Stat
    decode_step_s: Stat
    breakdown: Breakdown | None
    quantized_bytes: int  # read per step by the quantized Linears
    linear_bytes: int  # read per step by every Linear (quantized ones plus dense ones such as the LM head)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.prompt_len / self.prefill_s.mean

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch / self.decode_step_s.mean

    def gbps(self) -> tuple[float | None, float | None]:
        """(quantized Linears' bytes / their time, all Linears' bytes / all matmul time), in GB/s."""
        b = self.breakdown
        if b is None:
            return None, None
        quant = self.quantized_bytes / b.quantized_matmul / 1e9 if b.quantized_matmul > 0 else None
        matmul = b.quantized_matmul + b.dense_matmul
        return quant, (self.linear_bytes / matmul / 1e9 if matmul > 0 else None)

    def to_json(self, copy_gbps: float) -> dict:
        quant, linear = self.gbps()
        return {
            "batch": self.batch,
            "prompt_len": self.prompt_len,
            "prefill_seconds": asdict(self.prefill_s),
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_step_seconds": asdict(self.decode_step_s),
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "breakdown_seconds_per_step": asdict(self.breakdown) if self.breakdown else None,
            "quantized_bytes_per_step": self.quantized_bytes,
            "linear_bytes_per_step": self.linear_bytes,
            "quantized_matmul_gbps": quant,
            "all_matmul_gbps": linear,
            "quantized_matmul_fraction_of_copy_bandwidth": quant / copy_gbps if quant else None,
        }


def check_batches(batches: list[int]) -> list[int]:
    """Batch sizes to profile: at least one, each between 1 and MAX_BATCH."""
    if not batches:
        raise UsageError("--batch needs at least one batch size, e.g. --batch 1,16")
    for value in batches:
        if not 1 <= value <= MAX_BATCH:
            raise UsageError(f"--batch {','.join(map(str, batches))}: {value} must be between 1 and {MAX_BATCH}")
    return batches


def parse_batches(spec: str) -> list[int]:
    """``"1,16"`` -> ``[1, 16]``; every entry a positive integer up to MAX_BATCH."""
    batches = []
    for part in spec.split(","):
        try:
            batches.append(int(part.strip()))
        except ValueError:
            raise UsageError(f"--batch {spec!r}: {part.strip()!r} is not an integer; give e.g. --batch 1,16") from None
    return check_batches(batches)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def free_memory(device: torch.device) -> None:
    """Release a dropped model's memory before the next one is loaded."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth_gbps(device: torch.device, nbytes: int, reps: int = 5) -> float:
    """Measured device-to-device copy bandwidth, ``2 · nbytes / time`` in GB/s (best of ``reps``)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def weight_bytes_per_step(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes the quantized Linears read per forward, bytes every Linear reads): a quantized Linear
    reads its packed tensors with the cuda backend and its dense weight with torch."""
    quantized = dense = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            use_packed = module.kernels is not None
            quantized += module.layout.stored_bits() // 8 if use_packed else _nbytes(module.weight)
        elif isinstance(module, torch.nn.Linear):
            dense += _nbytes(module.weight)
    return quantized, quantized + dense


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _prefill(model, ids: torch.Tensor):
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    return cache, out.logits[:, -1:].argmax(-1)


def _decode(model, cache, token: torch.Tensor, steps: int):
    """``steps`` greedy single-token steps; the cache object is updated in place by the model."""
    keyword = cache_keyword(model)
    for _ in range(steps):
        out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{keyword: cache})
        token = out.logits[:, -1:].argmax(-1)
    return cache, token


class _DynamicRunner:
    def __init__(self, model):
        self.model, self.cache = model, None

    def prepare(self, ids: torch.Tensor) -> None:
        pass

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.cache, token = _prefill(self.model, ids)
        return token

    def decode(self, token: torch.Tensor, steps: int) -> torch.Tensor:
        self.cache, token = _decode(self.model, self.cache, token, steps)
        return token


class _StaticRunner:
    def __init__(self, model, batch: int, max_len: int, capture: bool):
        self.decoder, self.capture = StaticDecoder(model, batch, max_len), capture

    def prepare(self, ids: torch.Tensor) -> None:
        """For a graph: one untimed prefill and the capture, so no timed round pays for it."""
        if self.capture and self.decoder.graph is None:
            self.decoder.prefill(ids)
            self.decoder.capture()

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        return greedy(self.decoder.prefill(ids))

    def decode(self, token: torch.Tensor, steps: int) -> torch.Tensor:
        for _ in range(steps):
            token = greedy(self.decoder.step(token))
        return token


def make_runner(model, mode: DecodeMode, batch: int, max_len: int):
    """A decode loop for ``mode``: ``prepare(ids)``, ``prefill(ids) -> token``, ``decode(token, n) -> token``."""
    if mode == DecodeMode.dynamic:
        return _DynamicRunner(model)
    return _StaticRunner(model, batch, max_len, capture=mode == DecodeMode.graph)


def random_prompt(vocab_size: int, batch: int, prompt_len: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, prompt_len), generator=gen).to(device)


@torch.inference_mode()
def time_batch(
    runner, ids: torch.Tensor, gen_len: int, warmup: int, reps: int, stop: Callable[[], None] = lambda: None
) -> tuple[Stat, Stat]:
    """(prefill seconds, decode seconds per step) over ``reps`` rounds after ``warmup``."""
    device = ids.device
    prefill, decode = [], []
    runner.prepare(ids)
    for round_ in range(warmup + reps):
        stop()  # outside the timed region
        synchronize(device)
        start = time.perf_counter()
        token = runner.prefill(ids)
        synchronize(device)
        middle = time.perf_counter()
        runner.decode(token, gen_len)
        synchronize(device)
        end = time.perf_counter()
        if round_ >= warmup:
            prefill.append(middle - start)
            decode.append((end - middle) / gen_len)
    return Stat.of(prefill), Stat.of(decode)


@torch.inference_mode()
def decode_breakdown(model, runner, ids: torch.Tensor, steps: int) -> Breakdown:
    """Where ``steps`` decode steps after a prefill of ``ids`` spend their time, per step."""
    from torch.profiler import ProfilerActivity, profile, record_function

    device = ids.device
    token = runner.prefill(ids)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    handles = _label_linears(model, record_function)
    try:
        synchronize(device)
        start = time.perf_counter()
        with _profiler_stderr_muted(), profile(activities=activities) as prof:
            runner.decode(token, steps)
            synchronize(device)
        wall = (time.perf_counter() - start) / steps
    finally:
        for handle in handles:
            handle.remove()
    if device.type == "cuda":
        return _by_kernel(prof, steps)
    return _by_module(prof, steps, wall)


@contextlib.contextmanager
def _profiler_stderr_muted():
    """Kineto writes a line to the C-level stderr when the profiler starts and stops; drop those.

    Only file descriptor 2 is redirected, only while the profiler runs; Python exceptions still
    propagate and are printed after it is restored.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _label_linears(model, record_function) -> list:
    """Forward hooks that open and close a profiler range around every Linear."""
    handles = []
    for module in model.modules():
        if isinstance(module, QuantLinear | torch.nn.Linear):
            label = "llmq.quantized_linear" if isinstance(module, QuantLinear) else "llmq.dense_linear"

            def pre(mod, args, label=label):
                mod._llmq_range = record_function(label)
                mod._llmq_range.__enter__()

            def post(mod, args, output):
                mod._llmq_range.__exit__(None, None, None)
                del mod._llmq_range

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def _by_module(prof, steps: int, wall_per_step: float) -> Breakdown:
    totals = {"llmq.quantized_linear": 0.0, "llmq.dense_linear": 0.0}
    for event in prof.key_averages():
        if event.key in totals:
            totals[event.key] += event.cpu_time_total / 1e6 / steps
    quant, dense = totals["llmq.quantized_linear"], totals["llmq.dense_linear"]
    return Breakdown(quant, dense, max(wall_per_step - quant - dense, 0.0), wall_per_step, "cpu time by module")


def _by_kernel(prof, steps: int) -> Breakdown:
    """GPU time of the kernels themselves: CPU ops (whose device time repeats their kernels') and
    the ``llmq.*`` annotation ranges are left out, so nothing is counted twice."""
    from torch.autograd import DeviceType

    quant = dense = other = 0.0
    for event in prof.key_averages():
        if event.device_type != DeviceType.CUDA or event.key.startswith("llmq."):
            continue
        seconds = getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0)) / 1e6 / steps
        if seconds <= 0:
            continue
        name = event.key.lower()
        if any(k in name for k in LLMQ_KERNELS):
            quant += seconds
        elif any(k in name for k in MATMUL_KERNEL_HINTS):
            dense += seconds
        else:
            other += seconds
    return Breakdown(quant, dense, other, quant + dense + other, "gpu kernel time (torch.profiler)")


def profile_batches(
    model, vocab_size: int, batches: list[int], prompt_len: int, gen_len: int, warmup: int, reps: int,
    breakdown_steps: int, seed: int, device: torch.device, mode: DecodeMode = DecodeMode.dynamic,
    stop: Callable[[], None] = lambda: None,
) -> list[BatchResult]:  # fmt: skip
    """``stop`` is called before each timed or warm-up round; it raises ``KeyboardInterrupt`` to end there."""
    results = []
    for batch in batches:
        ids = random_prompt(vocab_size, batch, prompt_len, seed, device)
        runner = make_runner(model, mode, batch, prompt_len + max(gen_len, breakdown_steps) + 1)
        prefill, decode = time_batch(runner, ids, gen_len, warmup, reps, stop)
        breakdown = decode_breakdown(model, runner, ids, breakdown_steps) if breakdown_steps > 0 else None
        results.append(BatchResult(batch, prompt_len, prefill, decode, breakdown, *weight_bytes_per_step(model)))
    return results
