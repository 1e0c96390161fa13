"""Calibration: per-Linear input statistics, collected one decoder layer at a time.

The model is never whole in memory. A meta-device skeleton gets only its embeddings; the
inputs of the first decoder layer are captured; then each layer in turn is loaded from the
source safetensors, run over the calibration activations with hooks that accumulate
``H = E[x xᵀ]`` and ``E[x²]`` for every Linear input, and dropped. Its outputs are the next
layer's inputs. Linears that read the same tensor (q/k/v, gate/up) share one set of statistics.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmq.errors import TextSourceError, UsageError
from llmq.quant.config import QuantConfig
from llmq.runtime.sources.checkpoint import model_fingerprint, read_tensor, source_keys
from llmq.runtime.sources.models import ModelSource, load_tokenizer
from llmq.runtime.sources.tokenize import tokenize_stream


@dataclass
class InputStats:
    """Running sums over the rows ``x`` (length ``K``) fed to a Linear."""

    xtx: torch.Tensor  # float64 [K, K]
    sq: torch.Tensor  # float64 [K]
    rows: int = 0

    def add(self, x: torch.Tensor) -> None:
        # One window's product in fp32 (the costly part, twice as fast as fp64 on a CPU), summed in fp64.
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        self.xtx += (x.T @ x).to(torch.float64)
        self.sq += (x * x).sum(0).to(torch.float64)
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return (self.xtx / max(self.rows, 1)).to(torch.float32).cpu()

    def sq_mean(self) -> torch.Tensor:
        return (self.sq / max(self.rows, 1)).to(torch.float32).cpu()


@dataclass
class Calibration:
    stats: dict[str, InputStats] = field(default_factory=dict)  # canonical Linear name -> stats
    aliases: dict[str, str] = field(default_factory=dict)  # every Linear name -> canonical name
    tokens: int = 0


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
) -> Calibration:
    """Run ``windows`` ([S, L] token ids) through the model layer by layer, collecting Linear input stats.

    Layers and activations live on ``device`` (default: the CPU); the statistics come back on the CPU.
    """
    device = device or torch.device("cpu")
    key_files = source_keys(source.path)
    model = _skeleton_with_embeddings(model_config, key_files, device)
    hidden, kwargs = _first_layer_inputs(model, windows.to(device))
    layers = model.model.layers
    calibration = Calibration(tokens=windows.numel())
    for index in range(len(layers)):
        layer = _load_layer(model, index, key_files, device)
        hooks = _attach_hooks(layer, f"model.layers.{index}", config, calibration)
        with torch.inference_mode():
            hidden = [_as_tensor(layer(h, **kwargs)) for h in hidden]
        for hook in hooks:
            hook.remove()
        layers[index] = torch.nn.Identity()  # drop the weights before loading the next layer
        if on_layer is not None:
            on_layer(index + 1, len(layers))
    return calibration


def _as_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _skeleton_with_embeddings(model_config, key_files: dict[str, Path], device: torch.device):
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    name = "model.embed_tokens.weight"
    if name not in key_files:
        raise UsageError(f"calibration expects a Llama-style model with {name}; this checkpoint has none")
    set_module_tensor_to_device(model, name, device, value=read_tensor(key_files, name).float())
    for buffer_name, buffer in list(model.named_buffers()):  # e.g. rotary inverse frequencies
        set_module_tensor_to_device(model, buffer_name, device, value=buffer)
    return model.eval()


def _first_layer_inputs(model, windows: torch.Tensor):
    """Each window's hidden state entering layer 0, and the keyword arguments the layers get."""
    captured: list[torch.Tensor] = []
    kwargs: dict = {}
    first = model.model.layers[0]

    class Catcher(torch.nn.Module):
        def forward(self, hidden_states, **kw):
            captured.append(hidden_states)
            kwargs.update(kw)
            raise _Captured

    model.model.layers[0] = Catcher()
    with torch.inference_mode():
        for window in windows:
            try:
                model.model(window[None], use_cache=False)
            except _Captured:
                pass
    model.model.layers[0] = first
    return captured, kwargs


def _load_layer(model, index: int, key_files: dict[str, Path], device: torch.device):
    from accelerate.utils import set_module_tensor_to_device

    prefix = f"model.layers.{index}."
    layer = model.model.layers[index]
    for name, _ in list(layer.named_parameters()):
        key = prefix + name
        set_module_tensor_to_device(model, key, device, value=read_tensor(key_files, key).float())
    return layer


def _attach_hooks(layer, prefix: str, config: QuantConfig, calibration: Calibration) -> list:
    """Hooks on the selected Linears; Linears fed the very same tensor share one InputStats.

    ``seen`` keeps the input tensors themselves alive for the length of one layer call, so an
    ``id`` cannot be reused by a later tensor within it; it is cleared when the layer is called.
    """
    seen: dict[int, tuple[torch.Tensor, str]] = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, args: seen.clear())]
    for name, module in layer.named_modules():
        full = f"{prefix}.{name}"
        if not (isinstance(module, torch.nn.Linear) and config.selects(full)):
            continue

        def hook(mod, args, full=full, k=module.in_features):
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
) -> tuple[Calibration, dict]:
    """Tokenize ``text``, sample windows, collect stats; returns them and the stats-file manifest."""
    ids = tokenize_stream(load_tokenizer(source), text)
    windows = sample_windows(ids, samples, seq_len, seed)
    calibration = collect(source, model_config, config, windows, on_layer, device)
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
