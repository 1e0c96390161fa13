"""Calibration: per-Linear input statistics, collected one decoder layer at a time.

The model is never whole in memory. A meta-device skeleton gets the parameters that come before
its decoder layers (embeddings, position tables; not an untied output head); the inputs of the
first decoder layer are captured; then each layer in turn is loaded from the source safetensors,
run over the calibration activations with hooks that accumulate ``H = E[x xᵀ]`` and ``E[x²]``
for every selected matrix's input, and dropped. Its outputs are the next layer's inputs. Where
the layers are, and how experts are stored, comes from the architecture table. Matrices that
read the same tensor (q/k/v, gate/up) share one set of statistics; each expert's matrices get
statistics from the tokens routed to it.

Then the first ``FISHER_WINDOWS`` windows go back through the layers, last to first
(:mod:`llmq.quant.sensitivity`): each matrix's output Fisher diagonal, which tells the bit budget
what an error in that output costs the whole model. Their layer inputs are kept from the forward
pass for it: ``layers x FISHER_WINDOWS x seq_len x hidden`` float32.

Memory does not grow with the depth when a ``spill`` folder is given (every caller in llmq gives
one): each layer's finished statistics and its Fisher-window inputs go to files there as the
layer finishes, and the backward pass reads each layer's inputs back once. What stays in memory
is one layer, its running sums, and the windows' hidden states.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmq.errors import TextSourceError, UsageError
from llmq.quant.config import DEFAULT_SEQ_LEN, QuantConfig
from llmq.quant.sensitivity import fill_unreached, output_fisher
from llmq.quant.stream import LayerStream
from llmq.quant.writer import writing
from llmq.runtime.sources import families as F
from llmq.runtime.sources.checkpoint import model_fingerprint
from llmq.runtime.sources.models import ModelSource, context_length, load_tokenizer
from llmq.runtime.sources.tokenize import tokenize_stream

# Windows of the backward pass: the sum over their positions averages the one label drawn per position.
FISHER_WINDOWS = 8
PRODUCT_BLOCK = 1 << 24  # entries of an input's [K, K] product made at once (all of it up to K = 4096)


def product_rows(k: int) -> int:
    """Rows of a width-``k`` input's ``[k, k]`` product made and added at once (all ``k`` when it fits)."""
    return min(k, max(1, PRODUCT_BLOCK // k))


@dataclass
class InputStats:
    """Running sums over the rows ``x`` (length ``K``) fed to a matrix; :meth:`finish` turns them into
    the float32 statistics on the CPU and drops the sums."""

    xtx: torch.Tensor | None  # float64 [K, K]
    sq: torch.Tensor | None  # float64 [K]
    rows: int = 0
    finished: tuple[torch.Tensor, torch.Tensor] | None = None  # (hessian, sq_mean) once finished

    def add(self, x: torch.Tensor) -> None:
        # One window's product in fp32 (the costly part, twice as fast as fp64 on a CPU), summed in fp64.
        # Adding fp32 into fp64 makes an fp64 copy of the addend on a CPU, so a wide input's product is
        # made and added a block of rows at a time: at a 70B's K = 28672 a whole one is 3.3 GB and its
        # copy 6.6 GB, beside the 6.6 GB sum.
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        k = x.shape[1]
        rows = product_rows(k)
        if rows == k:
            self.xtx += x.T @ x
        else:
            for i in range(0, k, rows):
                self.xtx[i : i + rows] += x[:, i : i + rows].T @ x
        self.sq += (x * x).sum(0)
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.finished is not None:
            return self.finished[0]
        return (self.xtx / max(self.rows, 1)).to(torch.float32).cpu()

    def sq_mean(self) -> torch.Tensor:
        if self.finished is not None:
            return self.finished[1]
        return (self.sq / max(self.rows, 1)).to(torch.float32).cpu()

    def finish(self) -> None:
        if self.finished is None:  # divided in place, as the sums are dropped: the fp32 results are the only copies
            rows = max(self.rows, 1)
            with torch.inference_mode():  # the sums are made under it, and only there may they change in place
                self.xtx.div_(rows)
                self.sq.div_(rows)
            self.finished = (self.xtx.to(torch.float32).cpu(), self.sq.to(torch.float32).cpu())
            self.xtx = self.sq = None


@dataclass
class Calibration:
    stats: dict[str, InputStats] = field(default_factory=dict)  # canonical matrix name -> stats
    aliases: dict[str, str] = field(default_factory=dict)  # every matrix name -> canonical name
    tokens: int = 0
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # matrix name -> [N] output Fisher diagonal
    out_features: dict[str, int] = field(default_factory=dict)  # every hooked matrix name -> its N
    spill: Path | None = None  # where finished statistics go, a file per layer; None: they stay in memory
    files: dict[str, Path] = field(default_factory=dict)  # "<name>.hessian"/".sq_mean" -> the file holding it

    def finish(self, prefix: str, label: str = "rest") -> None:
        """Finish the statistics of every matrix whose name starts with ``prefix`` (a layer's, or all):
        one layer's float64 sums are in memory at a time, not the whole model's. With ``spill`` they
        are written to the file ``inputs-<label>.safetensors`` there and leave memory."""
        finished = {}
        for name in [n for n in self.stats if n.startswith(prefix)]:
            stats = self.stats[name]
            stats.finish()
            if self.spill is not None:
                finished[f"{name}.hessian"], finished[f"{name}.sq_mean"] = (t.contiguous() for t in stats.finished)
                del self.stats[name]
        if finished:
            path = self.spill / f"inputs-{label}.safetensors"
            _spill(finished, path)
            self.files.update(dict.fromkeys(finished, path))


def _spill(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """One of calibration's files; a full disk is a clear error (the caller removes the folder)."""
    with writing(path.parent, "calibration's per-layer statistics", untouched=False):
        save_file(tensors, str(path))


class LayerInputs:
    """Each decoder layer's inputs on the Fisher windows, kept from the forward pass for the backward
    pass, which takes them back last layer first. They are ``layers x windows x seq_len x hidden``
    float32 in all: with ``folder`` each layer's go to a file there and only one layer's are read
    back at a time; without, they stay in memory."""

    def __init__(self, folder: Path | None, device: torch.device) -> None:
        self.folder, self.device = folder, device
        self.held: list[list[torch.Tensor]] = []
        self.count = 0

    def append(self, hidden: list[torch.Tensor]) -> None:
        if self.folder is None:
            self.held.append([h.clone() for h in hidden])  # clone: out of inference mode, for autograd
        else:
            _spill({str(i): h.contiguous() for i, h in enumerate(hidden)}, self._path(self.count))
        self.count += 1

    def pop(self) -> list[torch.Tensor]:
        self.count -= 1
        if self.folder is None:
            return self.held.pop()
        path = self._path(self.count)
        loaded = load_file(str(path), device=str(self.device))
        path.unlink()
        return [loaded[str(i)] for i in range(len(loaded))]

    def _path(self, index: int) -> Path:
        return self.folder / f"fisher-inputs-{index}.safetensors"


def check_windows(samples: int, seq_len: int | None) -> None:
    """Refuse calibration windows that cannot be drawn, before any model is opened or text read
    (``seq_len`` None: the default, fitted to the model by :func:`window_length`)."""
    if samples < 1 or (seq_len is not None and seq_len < 2):
        raise UsageError("--samples must be at least 1 and --seq-len at least 2")


def window_length(seq_len: int | None, model_config, log: Callable[[str], None]) -> int:
    """The calibration window's length in tokens for the model of ``model_config``: ``seq_len``,
    refused if it exceeds the model's context (statistics of positions the model was never trained
    on would rank and round its weights), or with None :data:`DEFAULT_SEQ_LEN`, shortened to the
    context (said in ``log``) where that is shorter."""
    context = context_length(model_config)
    if seq_len is None:
        if context is not None and context < DEFAULT_SEQ_LEN:
            log(f"calibration windows of {context} tokens: the model's context is shorter than {DEFAULT_SEQ_LEN}")
            return context
        return DEFAULT_SEQ_LEN
    if context is not None and seq_len > context:
        raise UsageError(
            f"calibration windows of {seq_len} tokens exceed the model's context of {context}; "
            f"use --seq-len (quantize: --calib-seq-len) {context} or less"
        )
    return seq_len


def sample_windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens at random offsets (GPTQ's sampling), ``[samples, seq_len]``."""
    check_windows(samples, seq_len)
    needed = samples * seq_len
    if len(ids) < needed or len(ids) <= seq_len:
        raise TextSourceError(
            f"the calibration text has {len(ids)} tokens; {samples} samples of {seq_len} need at least "
            f"{needed}. Use fewer --samples, a smaller --seq-len, or a longer text"
        )
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - seq_len) for _ in range(samples)]
    return torch.stack([ids[s : s + seq_len] for s in starts])


def calibration_windows(source: ModelSource, text: str, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """The token windows ``[samples, seq_len]`` calibration runs on: ``text`` tokenized by ``source``'s tokenizer."""
    return sample_windows(tokenize_stream(load_tokenizer(source), text), samples, seq_len, seed)


def collect(
    source: ModelSource,
    model_config,
    config: QuantConfig,
    windows: torch.Tensor,
    on_layer: Callable[[int, int], None] | None = None,
    device: torch.device | None = None,
    log: Callable[[str], None] = lambda message: None,
    seed: int = 0,
    stop: Callable[[], None] = lambda: None,
    spill: Path | None = None,
    stage: Callable[[str, float], None] = lambda name, seconds: None,
) -> Calibration:
    """Run ``windows`` ([S, L] token ids) through the model layer by layer, collecting Linear input stats,
    then back through the first ``FISHER_WINDOWS`` for the output Fisher (labels drawn with ``seed``).
    ``stop`` is called before each window of each layer, forward and back; it raises
    ``KeyboardInterrupt`` to end there. ``spill``: an empty folder for the per-layer files that keep
    memory independent of the depth (module docstring); the caller removes it.

    Layers and activations live on ``device`` (default: the CPU); the statistics come back on the CPU.
    """
    device = device or torch.device("cpu")
    start = time.perf_counter()
    stream = LayerStream(source, model_config, windows, device)
    family = stream.family
    calibration = Calibration(tokens=windows.numel(), spill=spill)
    starved = Starved(family)
    hidden = stream.hidden
    kept = min(len(windows), FISHER_WINDOWS)
    layer_inputs = LayerInputs(spill, device)  # per layer, its inputs on the windows the Fisher pass uses
    total = 2 * len(stream)  # the forward pass, then the backward pass of sensitivity.output_fisher
    for index in range(len(stream)):
        prefix = f"{family.layers}.{index}"
        layer = stream.layer(index)
        hooks = _attach_hooks(layer, prefix, family, config, calibration)
        layer_inputs.append(hidden[:kept])
        with torch.inference_mode():
            outputs = []
            for h in hidden:
                stop()  # a stop lands between two windows of one layer, tens of milliseconds apart
                outputs.append(stream.call(index, layer, h))
            hidden = outputs
        for hook in hooks:
            hook.remove()
        starved.fill(calibration, layer, prefix)
        calibration.finish(prefix + ".", str(index))  # this layer's fp64 sums become fp32 statistics
        if index < len(stream) - 1:  # the last one is the backward pass's first
            stream.drop(index)
        if on_layer is not None:
            on_layer(index + 1, total)
    starved.report(log)
    model = stream.model
    after = [n for n, m in model.named_modules() if family.layer_of(n) is None and F.linear_shape(m) is not None]
    if any(config.quantizes(name, family) for name in after):  # an output head to quantize: its inputs too
        hooks = _attach_hooks(model, "", family, config, calibration)
        stream.after_layers(hidden, stop)
        for hook in hooks:
            hook.remove()
        calibration.finish("")
    final = [h.clone() for h in hidden[:kept]]
    del hidden
    stage("calibrate", time.perf_counter() - start)
    start = time.perf_counter()
    backward = None if on_layer is None else lambda done, layers: on_layer(layers + done, total)
    calibration.fisher = output_fisher(stream, layer_inputs, final, config, seed, backward, stop)
    filled = fill_unreached(calibration.fisher, calibration.out_features)
    if filled:
        log(
            f"calibration: {filled} matrices got no gradient in the {kept} Fisher windows (routed experts no token "
            "reached there, or outputs that do not reach the loss); the bit budget uses their experts' mean or zero"
        )
    stage("fisher", time.perf_counter() - start)
    return calibration


def _attach_hooks(layer, prefix: str, family: F.Family, config: QuantConfig, calibration: Calibration) -> list:
    """Hooks on the selected matrices; those fed the very same tensor share one InputStats.

    ``seen`` keeps the input tensors themselves alive for the length of one layer call, so an
    ``id`` cannot be reused by a later tensor within it; it is cleared when the layer is called.
    """
    seen: dict[int, tuple[torch.Tensor, str]] = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, args: seen.clear())]
    for name, module in layer.named_modules():
        full = f"{prefix}.{name}" if prefix else name
        shape = F.linear_shape(module)
        if shape is None or not config.quantizes(full, family):
            continue
        calibration.out_features[full] = shape[0]

        def hook(mod, args, full=full, k=shape[1]):
            x = args[0]
            canonical = seen.setdefault(id(x), (x, full))[1]
            calibration.aliases[full] = canonical
            if canonical == full:
                stats = calibration.stats.get(full)
                if stats is None:  # created once, not per window: a [K, K] fp64 buffer is megabytes
                    zeros = {"dtype": torch.float64, "device": x.device}
                    stats = calibration.stats[full] = InputStats(torch.zeros(k, k, **zeros), torch.zeros(k, **zeros))
                stats.add(x)

        hooks.append(module.register_forward_pre_hook(hook))
    return hooks


class Starved:
    """Experts that saw too few routed tokens for a full-rank Hessian (fewer than their input
    width): each gets its layer's statistics for the same matrix pooled over all the layer's experts
    (the mean Hessian, weighted by tokens), held once and aliased. How many did is logged once."""

    def __init__(self, family: F.Family) -> None:
        self.spec = family.experts
        self.count, self.total = 0, 0

    def fill(self, calibration: Calibration, layer, prefix: str) -> None:
        if self.spec is None:
            return
        try:
            experts = layer.get_submodule(self.spec.module)
        except AttributeError:
            return
        for param in self.spec.params:
            names = [f"{prefix}.{self.spec.module}.{param}.{e}" for e in range(experts.num_experts)]
            present = [calibration.stats[n] for n in names if n in calibration.stats]
            if not present:
                continue  # not selected for quantization, or no token reached any expert
            k = present[0].xtx.shape[0]
            starved = [n for n in names if n not in calibration.stats or calibration.stats[n].rows < k]
            self.count, self.total = self.count + len(starved), self.total + len(names)
            if starved:
                pooled = f"{prefix}.{self.spec.module}.{param}.pooled"
                calibration.stats[pooled] = InputStats(sum(s.xtx for s in present), sum(s.sq for s in present),
                                                       sum(s.rows for s in present))  # fmt: skip
                for name in starved:
                    calibration.stats.pop(name, None)
                    calibration.aliases[name] = pooled

    def report(self, log: Callable[[str], None]) -> None:
        if self.count:
            log(
                f"calibration: {self.count} of {self.total} expert matrices saw fewer routed tokens than their "
                "input width; they use their layer's mean over its experts (more --samples give them their own)"
            )


def calibrate_model(
    source: ModelSource,
    model_config,
    config: QuantConfig,
    text_source: str,
    text: str,
    samples: int,
    seq_len: int,
    seed: int,
    on_layer: Callable[[int, int], None] | None = None,
    device: torch.device | None = None,
    log: Callable[[str], None] = lambda message: None,
    stop: Callable[[], None] = lambda: None,
    spill: Path | None = None,
    stage: Callable[[str, float], None] = lambda name, seconds: None,
) -> tuple[Calibration, dict, torch.Tensor]:
    """Tokenize ``text``, sample windows, collect stats; returns them, the stats-file manifest and the
    windows ``[samples, seq_len]`` (token ids). ``stop``, ``spill``, ``stage``: see :func:`collect`."""
    windows = calibration_windows(source, text, samples, seq_len, seed)
    stop()
    calibration = collect(source, model_config, config, windows, on_layer, device, log, seed, stop, spill, stage)
    meta = {
        "model": source.label,
        "model_fingerprint": model_fingerprint(source.path),
        "dataset": text_source,
        "samples": samples,
        "seq_len": seq_len,
        "seed": seed,
        "tokens": calibration.tokens,
        "include": list(config.include),
        "exclude": list(config.exclude),
    }
    return calibration, meta, windows
