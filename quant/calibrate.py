"""Calibration: per-Linear input statistics, collected one decoder layer at a time.

The model is never whole in memory. A meta-device skeleton gets the parameters that come before
its decoder layers (embeddings, position tables; not an untied output head); the inputs of the
first decoder layer are captured; then each layer in turn is loaded from the source safetensors,
run over the calibration activations with hooks that accumulate ``H = E[x xᵀ]`` and ``E[x²]``
for every selected matrix's input, and dropped. Its outputs are the next layer's inputs. Where
the layers are, and how experts are stored, comes from the architecture table. Matrices that
read the same tensor (q/k/v, gate/up) share one set of statistics; each expert's matrices get
statistics from the tokens routed to it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llmq.errors import TextSourceError, UsageError
from llmq.quant.config import QuantConfig
from llmq.runtime.sources import families as F
from llmq.runtime.sources.checkpoint import Checkpoint, model_fingerprint
from llmq.runtime.sources.experts import RoutedExperts
from llmq.runtime.sources.models import ModelSource, load_tokenizer
from llmq.runtime.sources.tokenize import tokenize_stream


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
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        self.xtx += (x.T @ x).to(torch.float64)
        self.sq += (x * x).sum(0).to(torch.float64)
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
        if self.finished is None:
            self.finished = (self.hessian(), self.sq_mean())
            self.xtx = self.sq = None


@dataclass
class Calibration:
    stats: dict[str, InputStats] = field(default_factory=dict)  # canonical matrix name -> stats
    aliases: dict[str, str] = field(default_factory=dict)  # every matrix name -> canonical name
    tokens: int = 0

    def finish(self, prefix: str) -> None:
        """Finish the statistics of every matrix whose name starts with ``prefix`` (a layer's, or all):
        one layer's float64 sums are in memory at a time, not the whole model's."""
        for name, stats in self.stats.items():
            if name.startswith(prefix):
                stats.finish()


def sample_windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens at random offsets (GPTQ's sampling), ``[samples, seq_len]``."""
    if samples < 1 or seq_len < 2:
        raise UsageError("--samples must be at least 1 and --seq-len at least 2")
    needed = samples * seq_len
    if len(ids) < needed or len(ids) <= seq_len:
        raise TextSourceError(
            f"the calibration text has {len(ids)} tokens; {samples} samples of {seq_len} need at least "
            f"{needed}. Use fewer --samples, a smaller --seq-len, or a longer text"
        )
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - seq_len) for _ in range(samples)]
    return torch.stack([ids[s : s + seq_len] for s in starts])


class _Captured(Exception):
    pass


def collect(
    source: ModelSource,
    model_config,
    config: QuantConfig,
    windows: torch.Tensor,
    on_layer: Callable[[int, int], None] | None = None,
    device: torch.device | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> Calibration:
    """Run ``windows`` ([S, L] token ids) through the model layer by layer, collecting Linear input stats.

    Layers and activations live on ``device`` (default: the CPU); the statistics come back on the CPU.
    """
    device = device or torch.device("cpu")
    model = _skeleton_outside_layers(source, model_config, device)
    family = F.family_of(model, model_config)
    layers = F.decoder_layers(model, family)
    checkpoint = Checkpoint.of(source.path, model, family)
    _load(model, checkpoint, [n for n, _ in model.named_parameters() if _before_layers(n, family, model)], device)
    _load_layer(model, checkpoint, family, 0, device)
    hidden, inputs, returns_tuple = _layer_inputs(model, layers, windows.to(device))
    calibration = Calibration(tokens=windows.numel())
    starved = Starved(family)
    for index in range(len(layers)):
        prefix = f"{family.layers}.{index}"
        layer = layers[index] if index == 0 else _load_layer(model, checkpoint, family, index, device)
        _unfuse_experts(layer, family)
        hooks = _attach_hooks(layer, prefix, family, config, calibration)
        extra, kwargs = inputs[index]
        with torch.inference_mode():
            hidden = [_as_tensor(layer(h, *extra, **kwargs)) for h in hidden]
        for hook in hooks:
            hook.remove()
        starved.fill(calibration, layer, prefix)
        calibration.finish(prefix + ".")  # the fp64 sums of this layer become fp32 statistics on the CPU
        layers[index] = torch.nn.Identity()  # drop the weights before loading the next layer
        if on_layer is not None:
            on_layer(index + 1, len(layers))
    starved.report(log)
    if any(F.linear_shape(m) is not None and config.quantizes(n, family) for n, m in model.named_modules()):
        _after_layers(model, checkpoint, family, config, calibration, hidden, returns_tuple, windows)
        calibration.finish("")
    return calibration


def _load_layer(model, checkpoint: Checkpoint, family: F.Family, index: int, device: torch.device):
    layer = F.decoder_layers(model, family)[index]
    prefix = f"{family.layers}.{index}"
    _load(model, checkpoint, [f"{prefix}.{n}" for n, _ in layer.named_parameters()], device)
    return layer


def _after_layers(model, checkpoint, family, config, calibration, final, returns_tuple: bool, windows) -> None:
    """Statistics of selected matrices after the decoder layers (the LM head): the rest of the model
    runs on each window's output of the last layer, which stands in for the whole stack."""
    device = final[0].device
    _load(model, checkpoint, [n for n, p in model.named_parameters() if p.device.type == "meta"], device)
    layers = F.decoder_layers(model, family)
    outputs = iter(final)

    class Replay(torch.nn.Module):
        def forward(self, *args, **kw):
            hidden = next(outputs) if self is layers[0] else args[0]
            return (hidden,) if returns_tuple else hidden

    for index in range(len(layers)):
        layers[index] = Replay()
    hooks = _attach_hooks(model, "", family, config, calibration)
    with torch.inference_mode():
        for window in windows:
            model(window[None].to(device), use_cache=False)
    for hook in hooks:
        hook.remove()


def _as_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _skeleton_outside_layers(source: ModelSource, model_config, device: torch.device):
    """The model with parameters on meta and real buffers (rotary tables) on ``device``."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    for buffer_name, buffer in list(model.named_buffers()):
        set_module_tensor_to_device(model, buffer_name, device, value=buffer)
    return model.eval()


def _before_layers(name: str, family: F.Family, model) -> bool:
    """Parameters outside the decoder layers that a forward can use before them: all of them but an
    output head of its own (never reached before the first layer, and often the largest matrix)."""
    head = model.get_output_embeddings()
    own_head = head is not None and head.weight is not model.get_input_embeddings().weight
    return family.layer_of(name) is None and not (own_head and name.startswith(_module_name(model, head) + "."))


def _module_name(model, target) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def _load(model, checkpoint: Checkpoint, names: list[str], device: torch.device) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name in names:
        set_module_tensor_to_device(model, name, device, value=checkpoint.read(name).float())


def _layer_inputs(model, layers, windows: torch.Tensor):
    """What the model's forward passes its decoder layers, learned without loading more than the first:
    each window's hidden state entering layer 0; per layer, the other arguments it gets (masks,
    positions, rotary tables: Gemma 2/3 give local and global layers different ones), which are the
    same for every window of one length; and whether a layer returns a tuple."""
    hidden: list[torch.Tensor] = []
    inputs: list[tuple[tuple, dict] | None] = [None] * len(layers)
    originals = list(layers)
    first = originals[0]
    returns_tuple = [False]

    class Recorder(torch.nn.Module):
        """Stands in for layer ``index``; the first runs for real once, so its output type is known."""

        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index

        def forward(self, *args, **kw):
            if self.index == 0:
                hidden.append(args[0])
            if inputs[self.index] is None:
                inputs[self.index] = (args[1:], kw)
            elif self.index == 0:
                raise _Captured  # later windows: only the first layer's input is new
            if self.index == len(layers) - 1:
                raise _Captured
            if self.index > 0:
                return (args[0],) if returns_tuple[0] else args[0]
            out = first(*args, **kw)
            returns_tuple[0] = isinstance(out, tuple)
            return out

    for index in range(len(layers)):
        layers[index] = Recorder(index)
    with torch.inference_mode():
        for window in windows:
            try:
                model(window[None], use_cache=False)
            except _Captured:
                pass
    for index, layer in enumerate(originals):
        layers[index] = layer
    return hidden, inputs, returns_tuple[0]


def _unfuse_experts(layer, family: F.Family) -> None:
    """The layer's fused experts, if it has any, as one ``nn.Linear`` per expert matrix (sharing their
    memory), so each expert's input can be hooked."""
    if family.experts is None:
        return
    parent, _, child = family.experts.module.rpartition(".")
    try:
        owner = layer.get_submodule(parent) if parent else layer
        fused = getattr(owner, child)
    except AttributeError:
        return  # a dense layer of a model that mixes dense and MoE layers
    setattr(owner, child, RoutedExperts.from_fused(fused, family.experts))


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
) -> tuple[Calibration, dict]:
    """Tokenize ``text``, sample windows, collect stats; returns them and the stats-file manifest."""
    ids = tokenize_stream(load_tokenizer(source), text)
    windows = sample_windows(ids, samples, seq_len, seed)
    calibration = collect(source, model_config, config, windows, on_layer, device, log)
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
    return calibration, meta
