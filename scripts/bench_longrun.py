"""Long runs in one process: does memory grow beyond the KV cache?

    python scripts/bench_longrun.py ARTIFACT --out docs/data/longrun.json [--tokens 2000] [--windows 200]

1. Greedy generation of ``--tokens`` tokens after a short prompt, with the KV cache; the
   resident set is sampled every 100 tokens and compared with the KV cache's own size
   (2 · layers · kv_heads · head_dim · bytes per element · tokens).
2. Perplexity over ``--windows`` windows of ``--seq-len`` tokens of the embedded evaluation text
   in one call; the resident set is sampled after every window.

Both on the torch backend in fp32 on the CPU (or whatever --device gives). The RSS is read from
/proc, so it includes everything the process holds.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from llmq.runtime.eval import perplexity
from llmq.runtime.loader import load_model
from llmq.runtime.sources import models, text, tokenize
from llmq.runtime.sources.device import resolve_device
from llmq.runtime.sources.memory import current_rss_bytes


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * torch.tensor([], dtype=dtype).element_size()


@torch.inference_mode()
def generation(lm, config, tokens: int, device) -> dict:
    from llmq.runtime.decode.static import cache_keyword

    ids = torch.tensor([[1, 2, 3, 4]], device=device)
    out = lm(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    token = out.logits[:, -1:].argmax(-1)
    keyword = cache_keyword(lm)
    samples, start_rss, start = [], current_rss_bytes(), time.perf_counter()
    for step in range(1, tokens + 1):
        out = lm(input_ids=token, use_cache=True, logits_to_keep=1, **{keyword: cache})
        token = out.logits[:, -1:].argmax(-1)
        if step % 100 == 0:
            samples.append({"tokens": step, "rss_bytes": current_rss_bytes()})
    per_token = kv_bytes_per_token(config, next(lm.parameters()).dtype)
    growth = samples[-1]["rss_bytes"] - start_rss
    return {
        "tokens": tokens, "seconds": time.perf_counter() - start, "rss_start_bytes": start_rss,
        "rss_samples": samples, "rss_growth_bytes": growth, "kv_cache_bytes": per_token * (tokens + 4),
        "growth_beyond_kv_bytes": growth - per_token * (tokens + 4),
    }  # fmt: skip


def evaluation(lm, tokenizer, windows: int, seq_len: int) -> dict:
    loaded = text.load_text(text.Dataset.austen, None, text.Split.eval)
    ids = tokenize.tokenize_stream(tokenizer, loaded.text)[: windows * seq_len]
    samples = []
    start = time.perf_counter()
    result = perplexity.perplexity(
        lm, ids, seq_len, seq_len, on_window=lambda done, total: samples.append(current_rss_bytes())
    )
    return {
        "windows": result.windows, "seq_len": seq_len, "seconds": time.perf_counter() - start, "ppl": result.ppl,
        "rss_after_window_1": samples[0], "rss_after_window_10": samples[min(9, len(samples) - 1)],
        "rss_last": samples[-1], "rss_max": max(samples),
        "growth_after_window_10_bytes": samples[-1] - samples[min(9, len(samples) - 1)],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    source = models.resolve_model(args.artifact, progress=False)
    config = models.load_config(source)
    lm = load_model(source, config, device, torch.float32)
    document = {
        "command": "python scripts/bench_longrun.py " + " ".join(
            [args.artifact, "--out", str(args.out), "--tokens", str(args.tokens), "--windows", str(args.windows),
             "--seq-len", str(args.seq_len)]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": source.label,
        "generation": generation(lm, config, args.tokens, device),
        "evaluation": evaluation(lm, models.load_tokenizer(source), args.windows, args.seq_len),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    g, e = document["generation"], document["evaluation"]
    print(
        f"generation: {g['tokens']} tokens, RSS +{g['rss_growth_bytes'] / 1e6:.1f} MB, KV cache "
        f"{g['kv_cache_bytes'] / 1e6:.1f} MB; evaluation: {e['windows']} windows, RSS change after window 10 "
        f"{e['growth_after_window_10_bytes'] / 1e6:+.1f} MB"
    )


if __name__ == "__main__":
    main()
