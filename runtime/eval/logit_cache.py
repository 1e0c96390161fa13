"""A file of a base model's next-token log-probabilities, so `eval kld` can skip the base model.

One file per (base model, text tokens, windows, dtype): ``<cache>/kld-base/<key>.npy`` holds a
``[tokens_scored, vocab]`` float16 array (NumPy's ``.npy`` format, memory-mapped both ways, no
pickle) and ``<key>.json`` the inputs of the key, checked on reuse. float16 keeps ~3 significant
digits of each log-probability; for the tokens that carry the KL (log p > -2) the rounding is
under 0.001 nats, and the KL is computed from the renormalised values in fp32.

The file is written to a temporary name and renamed when complete, so an interrupted run never
leaves a cache that looks whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from llmq.errors import CacheError, ModelSourceError
from llmq.runtime.eval.kld import BaseLogProbs, model_log_probs, scored_tokens
from llmq.runtime.sources.cache import cache_dir
from llmq.runtime.sources.feedback import Feedback
from llmq.runtime.sources.models import ModelSource

BYTES_PER_VALUE = 2  # float16
LARGE_BYTES = 1 << 30  # warn above 1 GiB
_SCHEMA = 1


def base_key(model_path: Path, ids: torch.Tensor, protocol: dict) -> dict:
    """What the cached log-probs depend on. Weights are identified by name, size and mtime, not
    hashed: hashing a 14 GB model on every run would cost more than the forward pass it saves."""
    files = sorted(p for p in model_path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json"))
    weights = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    tokens = hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()
    return {"schema": _SCHEMA, "model": str(model_path.resolve()), "files": weights, "tokens": tokens, **protocol}


def cache_path(key: dict, folder: str = "kld-base", suffix: str = ".npy") -> Path:
    """``<cache>/<folder>/<digest of key><suffix>``: one file per key (eval ppl's baseline cache too)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir() / folder / f"{digest}{suffix}"


def size_bytes(tokens_scored: int, vocab: int) -> int:
    return tokens_scored * vocab * BYTES_PER_VALUE


def load_cached(path: Path, key: dict, tokens_scored: int) -> np.ndarray | None:
    """The cached array if ``path`` holds this key's complete log-probs, else None."""
    meta_path = path.with_suffix(".json")
    if not (path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise CacheError(f"{meta_path} is corrupt ({err}); delete it and {path.name} to rebuild the cache") from err
    if meta != key:
        return None
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise CacheError(f"{path} is corrupt ({err}); delete it and {meta_path.name} to rebuild the cache") from err
    if array.dtype != np.float16 or array.ndim != 2 or array.shape[0] != tokens_scored:
        raise CacheError(f"{path} has shape {array.shape} {array.dtype}; delete it to rebuild the cache")
    return array


class Recorder:
    """Writes log-probs window by window into a memory-mapped temporary file; ``commit`` renames it."""

    def __init__(self, path: Path, key: dict, tokens_scored: int, vocab: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        need = size_bytes(tokens_scored, vocab)
        free = shutil.disk_usage(path.parent).free
        if need > free:
            raise CacheError(
                f"caching the base log-probs needs {need / 1e9:.2f} GB but {path.parent} has {free / 1e9:.2f} GB "
                "free; free space, set LLMQ_CACHE_DIR elsewhere, or drop --cache-base"
            )
        self.path, self.key = path, key
        self.tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}.npy")
        self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float16, shape=(tokens_scored, vocab))
        self.filled = 0

    def write(self, log_probs: torch.Tensor) -> np.ndarray:
        """Store the next rows; returns them as stored (float16), i.e. as a cached run will read them."""
        rows = log_probs.shape[0]
        if log_probs.shape[1] != self.array.shape[1]:
            raise ModelSourceError(
                f"the base model gives {log_probs.shape[1]} logits, its config says {self.array.shape[1]}"
            )
        stored = self.array[self.filled : self.filled + rows]
        stored[:] = log_probs.to(torch.float16).cpu().numpy()
        self.filled += rows
        return stored

    def commit(self) -> None:
        assert self.filled == self.array.shape[0], (self.filled, self.array.shape)
        self.array.flush()
        del self.array
        self.path.with_suffix(".json").write_text(json.dumps(self.key, indent=1))
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def renormalized(rows: np.ndarray) -> torch.Tensor:
    """fp16 log-probs -> fp32 log-probs that sum to one again after rounding."""
    log_p = torch.from_numpy(np.asarray(rows, dtype=np.float32))
    return log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)


def cached_base(array: np.ndarray, scored: list[int]):
    """A ``BaseLogProbs`` reading window ``i``'s rows from the cached array."""
    offsets = np.cumsum([0, *scored])

    def read(i: int, _chunk: torch.Tensor, n: int) -> torch.Tensor:
        assert n == scored[i]
        return renormalized(array[offsets[i] : offsets[i] + n])

    return read


def recording_base(model_base, recorder: Recorder):
    """A ``BaseLogProbs`` that runs the base model and records each window; it returns the values
    as a later cached run will read them, so both runs report the same KL."""

    def run(i: int, chunk: torch.Tensor, n: int) -> torch.Tensor:
        return renormalized(recorder.write(model_base(i, chunk, n)))

    return run


@contextlib.contextmanager
def base_log_probs(
    source: ModelSource, config, ids: torch.Tensor, protocol: dict, use_cache: bool, load: Callable, feedback: Feedback
) -> Iterator[BaseLogProbs]:
    """The base side of a KL: the model ``load()`` returns, or its log-probs read from the cache, or
    computed and recorded into it (kept only if the run completes).

    ``protocol`` (seq_len, stride, max_tokens, dtype, device) is part of the cache key.
    """
    if not use_cache:
        yield model_log_probs(load())
        return
    scored = scored_tokens(len(ids), protocol["seq_len"], protocol["stride"], protocol["max_tokens"])
    key = base_key(source.path, ids, protocol)
    path = cache_path(key)
    cached = load_cached(path, key, sum(scored))
    if cached is not None:
        feedback.info(f"base log-probs: reusing {path}")
        yield cached_base(cached, scored)
        return
    size = size_bytes(sum(scored), config.vocab_size)
    if size > LARGE_BYTES:
        feedback.warn(f"caching the base log-probs writes {size / 1e9:.2f} GB to {path.parent}")
    recorder = Recorder(path, key, sum(scored), config.vocab_size)
    try:
        yield recording_base(model_log_probs(load()), recorder)
        recorder.commit()
        feedback.info(f"base log-probs: cached in {path}")
    finally:
        recorder.discard()
