"""``llmq eval kld MODEL --base BASE``: per-token KL divergence of MODEL from BASE, and top-1 agreement."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from llmq import __version__
from llmq.cli.common import (
    DatasetOpt,
    Device,
    DTypeOpt,
    Json,
    ModelArg,
    Quiet,
    Reporter,
    TextFile,
    TrustRemoteCode,
    quiet_libraries,
    source_json,
)
from llmq.runtime.device import DType


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
    device: Device = "auto",
    dtype: DTypeOpt = DType.auto,
    trust_remote_code: TrustRemoteCode = False,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """KL divergence of MODEL's next-token distribution from BASE's, on the same windows as `eval ppl`."""
    from llmq.errors import LlmqError
    from llmq.runtime import models, perplexity, text
    from llmq.runtime.device import dtype_name, resolve_device, resolve_dtype
    from llmq.runtime.kld import kl_divergence

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
    ids = [perplexity.tokenize_stream(models.load_tokenizer(s, trust_remote_code), loaded.text) for s in sources]
    if not (len(ids[0]) == len(ids[1]) and bool((ids[0] == ids[1]).all())):
        raise LlmqError(f"{model} and {base} tokenize the text differently; KL divergence needs the same tokenizer")
    perplexity.require_one_window(len(ids[0]), seq_len, loaded.source)
    out.info(f"model: {sources[0].label}")
    out.info(f"base:  {sources[1].label}")
    lms = [
        models.load_model(s, c, torch_device, torch_dtype, trust_remote_code)
        for s, c in zip(sources, configs, strict=True)
    ]
    with out.progress("kl divergence") as update:
        result = kl_divergence(lms[1], lms[0], ids[0], seq_len, stride, max_tokens, on_window=update)
    document = {
        "command": "eval kld",
        "llmq_version": __version__,
        "model": source_json(sources[0]),
        "base": source_json(sources[1]),
        "device": str(torch_device),
        "dtype": dtype_name(torch_dtype),
        "text": {"source": loaded.source, "tokens": len(ids[0])},
        "protocol": {
            "seq_len": seq_len,
            "stride": stride,
            "max_tokens": max_tokens,
            "kl": "KL(P_base || P_model) per scored token, fp32",
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
