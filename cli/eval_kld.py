"""``llmq eval kld MODEL --base BASE``: per-token KL divergence of MODEL from BASE, and top-1 agreement."""

from __future__ import annotations

import contextlib
import time
from typing import Annotated

import typer

from llmq import __version__
from llmq.cli.common import (
    BackendOpt,
    DatasetOpt,
    Device,
    DTypeOpt,
    Json,
    ModelArg,
    Quiet,
    Reporter,
    TextFile,
    TrustRemoteCode,
    pick_backend,
    quiet_libraries,
    source_json,
)
from llmq.runtime.backend import Backend
from llmq.runtime.sources.device import DType


def kld(
    model: ModelArg,
    base: Annotated[str, typer.Option("--base", help="The reference model: folder, hub id or 'demo'.")],
    dataset: DatasetOpt = None,
    text_file: TextFile = None,
    seq_len: Annotated[int, typer.Option("--seq-len", min=2, help="Window length in tokens.")] = 2048,
    stride: Annotated[
        int | None, typer.Option("--stride", min=1, help="Window start spacing (default: --seq-len).")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=2, help="Use only the first N tokens.")] = None,
    cache_base: Annotated[
        bool,
        typer.Option(
            "--cache-base",
            help="Keep BASE's log-probs in the cache directory and reuse them; a hit skips loading BASE.",
        ),
    ] = False,
    device: Device = "auto",
    dtype: DTypeOpt = DType.auto,
    backend: BackendOpt = Backend.auto,
    trust_remote_code: TrustRemoteCode = False,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """KL divergence of MODEL's next-token distribution from BASE's, on the same windows as `eval ppl`."""
    from llmq.errors import ModelSourceError
    from llmq.runtime.eval import perplexity
    from llmq.runtime.eval.kld import kl_divergence
    from llmq.runtime.format.dtypes import short as dtype_name
    from llmq.runtime.loader import load_model
    from llmq.runtime.sources import models, text, tokenize
    from llmq.runtime.sources.device import resolve_device, resolve_dtype

    wall_start = time.perf_counter()
    out = Reporter(json, quiet)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    models.check_model_spec(model)
    models.check_model_spec(base)
    loaded = text.load_text(dataset, text_file, text.Split.eval, default=text.Dataset.wikitext2)
    quiet_libraries(out.show_progress)
    sources = [models.resolve_model(spec, progress=out.show_progress, log=out.info) for spec in (model, base)]
    configs = [models.load_config(s, trust_remote_code) for s in sources]
    stride = seq_len if stride is None else stride
    contexts = [c for c in (models.context_length(cfg) for cfg in configs) if c]
    perplexity.check_protocol(seq_len, stride, max_tokens, min(contexts) if contexts else None)
    ids = [tokenize.tokenize_stream(models.load_tokenizer(s, trust_remote_code), loaded.text) for s in sources]
    if not (len(ids[0]) == len(ids[1]) and bool((ids[0] == ids[1]).all())):
        raise ModelSourceError(
            f"{model} and {base} tokenize the text differently; KL divergence needs the same tokenizer"
        )
    perplexity.require_one_window(len(ids[0]), seq_len, loaded.source)
    out.info(f"model: {sources[0].label}")
    out.info(f"base:  {sources[1].label}")
    backends = [pick_backend(s, backend, torch_device, torch_dtype, out) for s in sources]
    lm = load_model(sources[0], configs[0], torch_device, torch_dtype, trust_remote_code, backends[0] or Backend.torch)
    protocol = {
        "seq_len": seq_len, "stride": stride, "max_tokens": max_tokens,
        "dtype": dtype_name(torch_dtype), "device": torch_device.type,
    }  # fmt: skip

    def load_base():
        return load_model(
            sources[1], configs[1], torch_device, torch_dtype, trust_remote_code, backends[1] or Backend.torch
        )

    with _base_log_probs(out, sources[1], configs[1], ids[1], protocol, cache_base, load_base) as base_lp:
        with out.progress("kl divergence") as update:
            result = kl_divergence(base_lp, lm, ids[0], seq_len, stride, max_tokens, on_window=update)
    document = {
        "command": "eval kld",
        "llmq_version": __version__,
        "model": source_json(sources[0]),
        "base": source_json(sources[1]),
        "device": str(torch_device),
        "dtype": dtype_name(torch_dtype),
        "backend": backends[0].value if backends[0] else None,
        "text": {"source": loaded.source, "tokens": len(ids[0])},
        "protocol": {
            "seq_len": seq_len,
            "stride": stride,
            "max_tokens": max_tokens,
            "kl": "KL(P_base || P_model) per scored token, fp32",
            "base_log_probs": "cached, float16" if cache_base else "computed",
        },
        "result": {
            "kl_mean": result.mean,
            "kl_median": result.median,
            "kl_p99": result.p99,
            "kl_p999": result.p999,
            "top1_agreement": result.top1_agreement,
            "ppl_model": result.ppl_quant,
            "ppl_base": result.ppl_base,
            "tokens_scored": result.tokens_scored,
            "windows": result.windows,
        },
        "timing": {
            "eval_seconds": round(result.seconds, 3),
            "wall_seconds": round(time.perf_counter() - wall_start, 3),
        },
    }
    if json:
        out.emit_json(document)
        return
    out.result(
        f"KL mean {result.mean:.4f}  median {result.median:.4f}  p99 {result.p99:.4f}  p99.9 {result.p999:.4f}  "
        f"top-1 agreement {100 * result.top1_agreement:.2f}%  "
        f"(ppl {result.ppl_quant:.3f} vs base {result.ppl_base:.3f}; "
        f"{loaded.source}, {result.tokens_scored} tokens, {result.seconds:.1f} s)"
    )


@contextlib.contextmanager
def _base_log_probs(out, source, config, ids, protocol: dict, cache_base: bool, load):
    """The base side of the KL: ``load()``'s model, or its log-probs from (or recorded into) the cache.

    ``protocol`` (seq_len, stride, max_tokens, dtype, device) is part of the cache key."""
    from llmq.runtime.eval import logit_cache
    from llmq.runtime.eval.kld import model_log_probs, scored_tokens

    if not cache_base:
        yield model_log_probs(load())
        return
    scored = scored_tokens(len(ids), protocol["seq_len"], protocol["stride"], protocol["max_tokens"])
    key = logit_cache.base_key(source.path, ids, protocol)
    path = logit_cache.cache_path(key)
    cached = logit_cache.load(path, key, sum(scored))
    if cached is not None:
        out.info(f"base log-probs: reusing {path}")
        yield logit_cache.cached_base(cached, scored)
        return
    size = logit_cache.size_bytes(sum(scored), config.vocab_size)
    if size > logit_cache.LARGE_BYTES:
        out.warn(f"caching the base log-probs writes {size / 1e9:.2f} GB to {path.parent}")
    recorder = logit_cache.Recorder(path, key, sum(scored), config.vocab_size)
    try:
        yield logit_cache.recording_base(model_log_probs(load()), recorder)
        recorder.commit()
        out.info(f"base log-probs: cached in {path}")
    finally:
        recorder.discard()
