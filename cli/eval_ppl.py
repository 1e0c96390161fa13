"""``llmq eval ppl MODEL``: perplexity with its uncertainty, to the protocol in docs/eval.md."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from llmq import __version__
from llmq.cli.common import (
    BackendOpt,
    DatasetOpt,
    Device,
    DeviceMapOpt,
    DTypeOpt,
    Json,
    MaxMemory,
    ModelArg,
    Quiet,
    Reporter,
    Revision,
    Seed,
    TextFile,
    TrustRemoteCode,
    pick_backend,
    quiet_libraries,
    resolve_placement,
    source_json,
)
from llmq.runtime.backend import Backend
from llmq.runtime.sources.device import DType

DEFAULT_SEQ_LEN = 2048


def ppl(
    model: ModelArg,
    dataset: DatasetOpt = None,
    text_file: TextFile = None,
    seq_len: Annotated[
        int | None,
        typer.Option(
            "--seq-len",
            min=2,
            help="Window length in tokens (default 2048, capped by the model's context).",
            show_default=False,
        ),
    ] = None,
    stride: Annotated[
        int | None,
        typer.Option(
            "--stride",
            min=1,
            help="Start a window every N tokens; less than --seq-len gives sliding windows (default: --seq-len).",
            show_default=False,
        ),
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", min=2, help="Use only the first N tokens of the text.")
    ] = None,
    device: Device = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemory = None,
    dtype: DTypeOpt = DType.auto,
    backend: BackendOpt = Backend.auto,
    seed: Seed = 0,
    revision: Revision = None,
    trust_remote_code: TrustRemoteCode = False,
    json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Perplexity of MODEL on a text: wikitext2 test by default, or the embedded Austen eval novel."""
    import torch

    from llmq.runtime.eval import perplexity
    from llmq.runtime.format.dtypes import short as dtype_name
    from llmq.runtime.loader import load_model
    from llmq.runtime.sources import models, text, tokenize
    from llmq.runtime.sources.device import resolve_dtype

    wall_start = time.perf_counter()
    out = Reporter(json, quiet)
    quiet_libraries(out.show_progress)
    torch_device, limits = resolve_placement(device, device_map, max_memory)
    torch_dtype = resolve_dtype(dtype, torch_device)
    torch.manual_seed(seed)

    # Cheap checks first: a bad MODEL path or --text-file fails before anything is downloaded or built.
    models.check_model_spec(model, revision)
    loaded = text.load_text(dataset, text_file, text.Split.eval, default=text.Dataset.wikitext2)
    source = models.resolve_model(model, revision=revision, progress=out.show_progress, log=out.info)
    out.info(f"model: {source.label}")
    config = models.load_config(source, trust_remote_code)
    context = models.context_length(config)
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, context or DEFAULT_SEQ_LEN)
        if seq_len < DEFAULT_SEQ_LEN:
            out.info(f"--seq-len defaults to the model's context of {seq_len} tokens")
    stride = seq_len if stride is None else stride
    perplexity.check_protocol(seq_len, stride, max_tokens, context)

    # Tokenization comes before the weights, so a too-short text fails in seconds.
    tokenizer = models.load_tokenizer(source, trust_remote_code)
    ids = tokenize.tokenize_stream(tokenizer, loaded.text)
    perplexity.require_one_window(len(ids), seq_len, loaded.source)

    load_start = time.perf_counter()
    chosen = pick_backend(source, backend, torch_device, torch_dtype, out)
    lm = load_model(source, config, torch_device, torch_dtype, trust_remote_code, chosen or Backend.torch, limits)
    load_seconds = time.perf_counter() - load_start
    out.info(f"text: {loaded.source}, {len(ids)} tokens; windows of {seq_len}, stride {stride}")
    out.info(f"running {dtype_name(torch_dtype)} on {torch_device}")
    with out.progress("perplexity") as update:
        result = perplexity.perplexity(lm, ids, seq_len, stride, max_tokens, on_window=update)

    document = _document(source, torch_device, dtype_name(torch_dtype), loaded.source, result)
    document["backend"] = chosen.value if chosen else None
    document["protocol"] = {
        "seq_len": seq_len,
        "stride": stride,
        "max_tokens": max_tokens,
        "tokenization": perplexity.TOKENIZATION_RULE,
        "bos": tokenize.bos_policy(tokenizer, ids),
        "scoring": perplexity.SCORING_RULE,
        "uncertainty": perplexity.UNCERTAINTY_RULE,
    }
    document["timing"]["load_seconds"] = round(load_seconds, 3)
    document["timing"]["wall_seconds"] = round(time.perf_counter() - wall_start, 3)
    if json:
        out.emit_json(document)
        return
    out.result(
        f"ppl {result.ppl:.4f} ± {result.ppl_stderr:.4f}  ({loaded.source}, {result.windows} windows × {seq_len}, "
        f"stride {stride}, {result.tokens_scored} tokens scored, {result.seconds:.1f} s)"
    )


def _document(source, device, dtype: str, text_source: str, result) -> dict:
    """The JSON result of ``eval ppl``, less the protocol and the command-level timings."""
    return {
        "command": "eval ppl",
        "llmq_version": __version__,
        "model": source_json(source),
        "device": str(device),
        "dtype": dtype,
        "text": {"source": text_source, "tokens": result.tokens_in_text},
        "result": {
            "ppl": result.ppl,
            "ppl_stderr": result.ppl_stderr,
            "ppl_ci95": list(result.ppl_ci95),
            "ppl_stderr_windows": result.ppl_stderr_windows,
            "mean_nll": result.mean_nll,
            "tokens_scored": result.tokens_scored,
            "windows": result.windows,
            "tokens_used": result.tokens_used,
        },
        "timing": {
            "eval_seconds": round(result.seconds, 3),
            "tokens_per_s": round(result.tokens_used / result.seconds, 1) if result.seconds > 0 else None,
        },
    }
