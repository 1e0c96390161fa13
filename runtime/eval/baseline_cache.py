"""A baseline model's perplexity kept on disk, so a CI job that gates several artifacts pays for it once.

``eval ppl --baseline BASE --cache-baseline`` writes ``<cache>/ppl-baseline/<key>.json``: the key
(the same one ``eval kld --cache-base`` uses for the base's log-probs: the base model's files by
name, size and mtime, the text's token ids, and the protocol) and the result. A file whose key
differs is never used; it is written to a temporary name and renamed, so an interrupted run never
leaves one that looks whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from llmq.errors import CacheError
from llmq.runtime.eval.logit_cache import base_key, cache_path
from llmq.runtime.eval.perplexity import PplResult
from llmq.runtime.sources.feedback import Feedback


def _read(path: Path, key: dict) -> PplResult | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record["key"] != key:
            return None
        result = dict(record["result"])
        result["ppl_ci95"] = tuple(result["ppl_ci95"])
        return PplResult(**result)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CacheError(f"{path} is corrupt ({err!r}); delete it to rebuild the cache") from err


def baseline_perplexity(
    model_path: Path, ids: torch.Tensor, protocol: dict, use_cache: bool, compute: Callable[[], PplResult],
    feedback: Feedback,
) -> tuple[PplResult, bool]:  # fmt: skip
    """The baseline's result and whether it came from the cache.

    model_path  the baseline's resolved folder (its files identify it)
    ids         the text's token ids, int64 ``[tokens]``, as the baseline tokenizes it
    protocol    seq_len, stride, max_tokens, dtype, device: part of the key
    compute     runs the baseline when the cache has no result for the key (or is not used)
    """
    if not use_cache:
        return compute(), False
    key = {"kind": "ppl", **base_key(model_path, ids, protocol)}
    path = cache_path(key, "ppl-baseline", ".json")
    cached = _read(path, key)
    if cached is not None:
        feedback.info(f"baseline perplexity: reusing {path}")
        return cached, True
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}.json")
    try:
        tmp.write_text(json.dumps({"key": key, "result": dataclasses.asdict(result)}, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    feedback.info(f"baseline perplexity: cached in {path}")
    return result, False
