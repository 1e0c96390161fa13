"""The runtime's public API: load a model or an artifact, evaluate it, generate with it, profile it.

Each function does what one ``llmq`` command does, with the same checks in the same order and
the same errors, and returns a typed result; a report's ``to_json()`` is the command's ``--json``
document. ``import llmq`` re-exports them (``llmq.perplexity``, ...); ``docs/api.md`` has examples.
Every function that loads a model takes the same :class:`~llmq.runtime.options.LoadOptions`, and
every one a :class:`~llmq.runtime.sources.feedback.Feedback` for logs and progress.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from llmq import __version__
from llmq.errors import ModelSourceError, UsageError
from llmq.runtime.backend import Backend
from llmq.runtime.decode import profile as P
from llmq.runtime.decode.generate import GenerationResult, SamplingOptions, generate_static
from llmq.runtime.decode.generate import generate as generate_dynamic
from llmq.runtime.decode.modes import DecodeMode, check_decode_device
from llmq.runtime.eval import gates as G
from llmq.runtime.eval import logit_cache
from llmq.runtime.eval import perplexity as ppl
from llmq.runtime.eval.baseline_cache import baseline_perplexity
from llmq.runtime.eval.kld import KldResult, kl_divergence
from llmq.runtime.format import artifact as A
from llmq.runtime.format import dtypes
from llmq.runtime.format.artifact import CARD
from llmq.runtime.format.card import perplexity_entry, record_perplexity
from llmq.runtime.format.manifest import Manifest
from llmq.runtime.format.verify import VerifyReport, verify_artifact
from llmq.runtime.loader import OpenedModel, open_for_run
from llmq.runtime.options import LoadOptions
from llmq.runtime.sources import text as T
from llmq.runtime.sources.families import checked_per_layer
from llmq.runtime.sources.feedback import LOGGED, Feedback
from llmq.runtime.sources.models import ModelSource, ModelSpec, SourceKind, check_model_spec, context_length
from llmq.runtime.sources.tokenize import bos_policy, check_prompt, encode_prompt, tokenize_stream

DEFAULT_SEQ_LEN = 2048  # eval ppl's window when the model's context allows it
DEFAULTS = LoadOptions()


def _header(command: str, run: OpenedModel, base: ModelSource | None = None) -> dict:
    """The keys every report's JSON starts with."""
    document = {"command": command, "llmq_version": __version__, "model": run.source.to_json()}
    if base is not None:
        document["base"] = base.to_json()
    return document | {"device": str(run.device), "dtype": dtypes.short(run.dtype)}


def load(model: ModelSpec, options: LoadOptions = DEFAULTS, feedback: Feedback = LOGGED):
    """A ``transformers`` causal LM in eval mode, ready for ``generate()``, pipelines or a forward.

    ``model`` is ``"demo"``, a local HF folder, a hub id or a ``.llmq`` artifact; an artifact's
    quantized Linears are :class:`~llmq.runtime.qlinear.QuantLinear` modules computing with
    ``options.backend``. Activations go to ``options.device`` in ``options.dtype``.
    """
    return open_for_run(model, options, feedback).load()


# -- perplexity ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BaselinePerplexity:
    """``eval ppl --baseline``: the other model's result on the same text and windows."""

    source: ModelSource
    result: ppl.PplResult
    cached: bool  # read from the llmq cache (``cache_baseline``), not computed in this run


@dataclass(frozen=True)
class PerplexityReport:
    """``llmq eval ppl``: the result, the exact protocol, and where and how it ran."""

    run: OpenedModel
    text_source: str
    protocol: dict  # seq_len, stride, max_tokens and the written rules (docs/eval.md)
    result: ppl.PplResult
    load_seconds: float
    wall_seconds: float
    baseline: BaselinePerplexity | None = None
    gates: tuple[G.Gate, ...] = ()

    @property
    def ratio(self) -> float | None:
        """ppl(model) / ppl(baseline), with a baseline."""
        return None if self.baseline is None else self.result.ppl / self.baseline.result.ppl

    @property
    def passed(self) -> bool:
        """Every gate passed (true without gates)."""
        return all(g.passed for g in self.gates)

    def to_json(self) -> dict:
        r = self.result
        document = _header("eval ppl", self.run) | {
            "text": {"source": self.text_source, "tokens": r.tokens_in_text},
            "result": _ppl_json(r),
            "timing": {
                "eval_seconds": round(r.seconds, 3),
                "tokens_per_s": round(r.tokens_used / r.seconds, 1) if r.seconds > 0 else None,
                "load_seconds": round(self.load_seconds, 3),
                "wall_seconds": round(self.wall_seconds, 3),
            },
            "backend": self.run.backend.value if self.run.backend else None,
            "protocol": self.protocol,
        }
        if self.baseline is not None:
            b = self.baseline
            document["baseline"] = {"model": b.source.to_json(), "result": _ppl_json(b.result), "cached": b.cached}
            document["ppl_ratio"] = self.ratio
        return document | G.verdict(list(self.gates))


def _ppl_json(r: ppl.PplResult) -> dict:
    return {
        "ppl": r.ppl,
        "ppl_stderr": r.ppl_stderr,
        "ppl_ci95": list(r.ppl_ci95),
        "ppl_stderr_windows": r.ppl_stderr_windows,
        "mean_nll": r.mean_nll,
        "tokens_scored": r.tokens_scored,
        "windows": r.windows,
        "tokens_used": r.tokens_used,
    }


def _open_with_text(models: list[ModelSpec], text: T.TextSpec | None, options: LoadOptions, feedback: Feedback):
    """The models opened for a run and the eval text, in the order that fails fastest: the options
    and every MODEL checked, a local text read, the models resolved (a download or the demo build),
    then a dataset that may need the network."""
    placement = options.placement()
    revisions = _revisions(models, options.revision)
    early = T.load_local_first(text, T.Split.eval, T.Dataset.wikitext2)
    runs = [
        open_for_run(model, replace(options, revision=revision), feedback, role, placement)
        for model, revision, role in zip(models, revisions, ("model", "base"), strict=False)
    ]
    return runs, early or T.load(text, T.Split.eval, T.Dataset.wikitext2)


def _revisions(models: list[ModelSpec], revision: str | None) -> list[str | None]:
    """``revision`` applies to the hub ids among ``models`` (``kld``: the model, its base or both);
    given where none is a hub id, it is the usual error."""
    kinds = [check_model_spec(model) for model in models]
    if revision is not None and SourceKind.hub not in kinds:
        check_model_spec(models[0], revision)
    return [revision if kind == SourceKind.hub else None for kind in kinds]


def _same_tokens(runs: list[OpenedModel], text: str, models: list[ModelSpec], why: str) -> list[torch.Tensor]:
    """The text tokenized by each run's tokenizer; a comparison of two models needs the same tokens."""
    ids = [tokenize_stream(r.tokenizer(), text) for r in runs]
    if len(ids) == 2 and not (len(ids[0]) == len(ids[1]) and bool((ids[0] == ids[1]).all())):
        raise ModelSourceError(f"{models[0]} and {models[1]} tokenize the text differently; {why}")
    return ids


def perplexity(
    model: ModelSpec,
    text: T.TextSpec | None = None,
    *,
    seq_len: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    baseline: ModelSpec | None = None,
    cache_baseline: bool = False,
    max_ratio: float | None = None,
    record: bool = False,
    options: LoadOptions = DEFAULTS,
    feedback: Feedback = LOGGED,
) -> PerplexityReport:
    """Perplexity of ``model`` on ``text`` (default: wikitext2 test), to the protocol of docs/eval.md.

    seq_len         window length in tokens; default 2048, capped by the model's (and baseline's) context
    stride          start a window every ``stride`` tokens (default ``seq_len``: no overlap)
    max_tokens      use only the first ``max_tokens`` tokens of the text
    baseline        another model (the original) scored on the same text and windows; same tokenizer
    cache_baseline  keep the baseline's result in the llmq cache and reuse it (keyed like kld's base cache)
    max_ratio       a gate: ``report.passed`` is false when ppl(model) / ppl(baseline) exceeds it
    record          add the result to the artifact's model card (README.md; its checksum in the
                    manifest follows), so the card carries what was measured; ``model`` must be an artifact
    """
    G.check_threshold("--max-ratio", max_ratio, 0.0)
    if record and check_model_spec(model, options.revision) != SourceKind.artifact:
        raise UsageError(f"--record writes into an llmq artifact's model card, and {model} is not an artifact")
    if baseline is None and (max_ratio is not None or cache_baseline):
        raise UsageError("--max-ratio and --cache-baseline compare with a baseline; add --baseline MODEL")
    wall_start = time.perf_counter()
    torch.manual_seed(options.seed)
    models = [model] if baseline is None else [model, baseline]
    runs, loaded = _open_with_text(models, text, options, feedback)
    contexts = [c for c in (context_length(r.config) for r in runs) if c]
    context = min(contexts) if contexts else None
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, context or DEFAULT_SEQ_LEN)
        if seq_len < DEFAULT_SEQ_LEN:
            feedback.info(f"--seq-len defaults to the model's context of {seq_len} tokens")
    stride = seq_len if stride is None else stride
    ppl.check_protocol(seq_len, stride, max_tokens, context)
    # Tokenization comes before the weights, so a too-short text fails in seconds.
    ids = _same_tokens(runs, loaded.text, models, "a perplexity ratio needs the same tokenizer")
    ppl.require_one_window(len(ids[0]), seq_len, loaded.source)
    feedback.info(f"text: {loaded.source}, {len(ids[0])} tokens; windows of {seq_len}, stride {stride}")
    result, load_seconds = _score(runs[0], ids[0], seq_len, stride, max_tokens, feedback)
    base = None
    if baseline is not None:
        key = {"seq_len": seq_len, "stride": stride, "max_tokens": max_tokens,
               "dtype": dtypes.short(runs[1].dtype), "device": runs[1].device.type}  # fmt: skip
        score = lambda: _score(runs[1], ids[1], seq_len, stride, max_tokens, feedback)[0]  # noqa: E731
        base_result, cached = baseline_perplexity(runs[1].source.path, ids[1], key, cache_baseline, score, feedback)
        base = BaselinePerplexity(runs[1].source, base_result, cached)
    protocol = {
        "seq_len": seq_len, "stride": stride, "max_tokens": max_tokens, "tokenization": ppl.TOKENIZATION_RULE,
        "bos": bos_policy(runs[0].tokenizer(), ids[0]), "scoring": ppl.SCORING_RULE,
        "uncertainty": ppl.UNCERTAINTY_RULE,
    }  # fmt: skip
    wall = time.perf_counter() - wall_start
    report = PerplexityReport(runs[0], loaded.source, protocol, result, load_seconds, wall, base)
    report = replace(report, gates=tuple(G.at_most("ppl_ratio", "--max-ratio", report.ratio, max_ratio)))
    if record:
        record_perplexity(runs[0].source.path, perplexity_entry(report.to_json()))
        feedback.info(f"recorded in {runs[0].source.path / CARD}")
    return report


def _score(run: OpenedModel, ids: torch.Tensor, seq_len: int, stride: int, max_tokens: int | None,
           feedback: Feedback) -> tuple[ppl.PplResult, float]:  # fmt: skip
    """``run``'s model loaded and scored on ``ids``; the result and the load time in seconds."""
    load_start = time.perf_counter()
    lm = run.load()
    load_seconds = time.perf_counter() - load_start
    feedback.info(f"running {run.source.label} in {dtypes.short(run.dtype)} on {run.device}")
    with feedback.steps("perplexity") as step, feedback.stoppable() as check:
        checked_per_layer(lm, run.config, check)
        return ppl.perplexity(lm, ids, seq_len, stride, max_tokens, on_window=step), load_seconds


# -- KL divergence --------------------------------------------------------------------------


@dataclass(frozen=True)
class KldReport:
    """``llmq eval kld``: KL(P_base || P_model) per token, top-1 agreement, both perplexities."""

    run: OpenedModel
    base: ModelSource
    text_source: str
    text_tokens: int
    protocol: dict  # seq_len, stride, max_tokens, how KL is computed, whether base log-probs were cached
    result: KldResult
    wall_seconds: float
    gates: tuple[G.Gate, ...] = ()

    @property
    def passed(self) -> bool:
        """Every gate passed (true without gates)."""
        return all(g.passed for g in self.gates)

    def to_json(self) -> dict:
        r = self.result
        return (
            _header("eval kld", self.run, self.base)
            | {
                "backend": self.run.backend.value if self.run.backend else None,
                "text": {"source": self.text_source, "tokens": self.text_tokens},
                "protocol": self.protocol,
                "result": {
                    "kl_mean": r.mean,
                    "kl_median": r.median,
                    "kl_p99": r.p99,
                    "kl_p999": r.p999,
                    "top1_agreement": r.top1_agreement,
                    "ppl_model": r.ppl_quant,
                    "ppl_base": r.ppl_base,
                    "tokens_scored": r.tokens_scored,
                    "windows": r.windows,
                },
                "timing": {"eval_seconds": round(r.seconds, 3), "wall_seconds": round(self.wall_seconds, 3)},
            }
            | G.verdict(list(self.gates))
        )


def kld(
    model: ModelSpec,
    base: ModelSpec,
    text: T.TextSpec | None = None,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    stride: int | None = None,
    max_tokens: int | None = None,
    cache_base: bool = False,
    max_mean: float | None = None,
    min_top1: float | None = None,
    options: LoadOptions = DEFAULTS,
    feedback: Feedback = LOGGED,
) -> KldReport:
    """KL divergence of ``model``'s next-token distribution from ``base``'s on the perplexity windows.

    With ``cache_base`` the base's log-probabilities are kept in the llmq cache (keyed by the base
    files, the text's tokens and the protocol) and a later call reads them instead of loading it.
    Gates: ``max_mean`` (nats; fails when the mean KL exceeds it), ``min_top1`` (a share in [0, 1];
    fails when the top-1 agreement is below it); ``report.passed`` says whether all held.
    """
    G.check_threshold("--max-mean", max_mean, 0.0)
    G.check_threshold("--min-top1", min_top1, 0.0, 1.0)
    wall_start = time.perf_counter()
    torch.manual_seed(options.seed)
    (run, base_run), loaded = _open_with_text([model, base], text, options, feedback)
    stride = seq_len if stride is None else stride
    contexts = [c for c in (context_length(r.config) for r in (run, base_run)) if c]
    ppl.check_protocol(seq_len, stride, max_tokens, min(contexts) if contexts else None)
    ids, base_ids = _same_tokens([run, base_run], loaded.text, [model, base], "KL divergence needs the same tokenizer")
    ppl.require_one_window(len(ids), seq_len, loaded.source)
    feedback.info(f"text: {loaded.source}, {len(ids)} tokens; windows of {seq_len}, stride {stride}")
    key_protocol = {"seq_len": seq_len, "stride": stride, "max_tokens": max_tokens,
                    "dtype": dtypes.short(run.dtype), "device": run.device.type}  # fmt: skip
    with feedback.stoppable() as check:
        lm = checked_per_layer(run.load(), run.config, check)
        load_base = lambda: checked_per_layer(base_run.load(), base_run.config, check)  # noqa: E731
        with logit_cache.base_log_probs(base_run.source, base_run.config, base_ids, key_protocol, cache_base,
                                        load_base, feedback) as base_lp:  # fmt: skip
            feedback.info(f"running {run.source.label} against its base in {dtypes.short(run.dtype)} on {run.device}")
            with feedback.steps("kl divergence") as step:
                result = kl_divergence(base_lp, lm, ids, seq_len, stride, max_tokens, on_window=step)
    protocol = {
        "seq_len": seq_len, "stride": stride, "max_tokens": max_tokens,
        "kl": "KL(P_base || P_model) per scored token, fp32",
        "base_log_probs": "cached, float16" if cache_base else "computed",
    }  # fmt: skip
    wall = time.perf_counter() - wall_start
    gates = G.at_most("kl_mean", "--max-mean", result.mean, max_mean)
    gates += G.at_least("top1_agreement", "--min-top1", result.top1_agreement, min_top1)
    return KldReport(run, base_run.source, loaded.source, len(ids), protocol, result, wall, tuple(gates))


# -- generation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateReport:
    """``llmq generate``: the text, why it stopped, and prefill/decode timing."""

    run: OpenedModel
    decode: DecodeMode
    prompt: str
    chat: bool
    sampling: SamplingOptions
    result: GenerationResult
    wall_seconds: float

    def to_json(self) -> dict:
        r, s, speed = self.result, self.sampling, self.result.decode_tokens_per_s
        return _header("generate", self.run) | {
            "backend": self.run.backend.value if self.run.backend else None,
            "decode": self.decode.value,
            "prompt": self.prompt,
            "chat": self.chat,
            "sampling": {
                "temperature": s.temperature,
                "top_p": s.top_p,
                "top_k": s.top_k,
                "seed": s.seed,
                "greedy": s.temperature == 0,
            },
            "text": r.text,
            "prompt_tokens": r.prompt_tokens,
            "new_tokens": r.new_tokens,
            "stop_reason": r.stop_reason,
            "timing": {
                "prefill_seconds": round(r.prefill_seconds, 4),
                "decode_seconds": round(r.decode_seconds, 4),
                "decode_tokens_per_s": round(speed, 2) if speed else None,
                "wall_seconds": round(self.wall_seconds, 3),
            },
        }


def generate(
    model: ModelSpec,
    prompt: str,
    *,
    chat: bool = False,
    system: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    decode: DecodeMode = DecodeMode.dynamic,
    on_text: Callable[[str], None] | None = None,
    options: LoadOptions = DEFAULTS,
    feedback: Feedback = LOGGED,
) -> GenerateReport:
    """Continue ``prompt`` (greedy unless ``temperature`` > 0, seeded by ``options.seed``), stopping
    at EOS or after ``max_new_tokens``; ``on_text`` receives the text as it is decoded.

    chat    wrap the prompt (and ``system``) in the model's chat template as a user turn
    decode  ``dynamic`` (transformers' cache), ``static`` (preallocated cache, sampling on the
            device) or ``graph`` (static, the step replayed as a CUDA graph; GPU only)
    """
    wall_start = time.perf_counter()
    sampling = SamplingOptions(max_new_tokens, temperature, top_p, top_k, options.seed)
    sampling.check()
    check_prompt(prompt, chat, system)
    decode = DecodeMode(decode)
    check_model_spec(model, options.revision)
    placement = options.placement()
    check_decode_device(decode, placement.device)
    run = open_for_run(model, options, feedback, placement=placement)
    tokenizer = run.tokenizer()
    input_ids = encode_prompt(tokenizer, prompt, chat, system)
    context = context_length(run.config)
    if context is not None and input_ids.shape[1] + max_new_tokens > context:
        raise UsageError(
            f"the prompt ({input_ids.shape[1]} tokens) plus --max-new-tokens {max_new_tokens} exceeds the model's "
            f"context of {context} tokens"
        )
    lm = run.load()
    with feedback.stoppable() as stop:
        if decode == DecodeMode.dynamic:
            result = generate_dynamic(lm, tokenizer, input_ids, sampling, on_text=on_text, stop=stop)
        else:
            graph = decode == DecodeMode.graph
            result = generate_static(lm, tokenizer, input_ids, sampling, on_text, graph=graph, stop=stop)
    return GenerateReport(run, decode, prompt, chat, sampling, result, time.perf_counter() - wall_start)


# -- profile --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileRun:
    label: str  # "llmq", "model" (a plain HF model) or "dense baseline"
    backend: Backend | None
    model_memory_bytes: int
    batches: list[P.BatchResult]


@dataclass(frozen=True)
class ProfileReport:
    """``llmq profile``: prefill and decode latency per batch, the decode step's breakdown, GB/s."""

    run: OpenedModel
    device_name: str
    protocol: dict
    copy_bandwidth_gbps: float
    runs: list[ProfileRun]
    gates: tuple[G.Gate, ...] = ()

    @property
    def passed(self) -> bool:
        """Every gate passed (true without gates)."""
        return all(g.passed for g in self.gates)

    def to_json(self) -> dict:
        runs = [
            {"label": r.label, "backend": r.backend.value if r.backend else None,
             "model_memory_bytes": r.model_memory_bytes,
             "batches": [b.to_json(self.copy_bandwidth_gbps) for b in r.batches]}
            for r in self.runs
        ]  # fmt: skip
        return (
            _header("profile", self.run)
            | {
                "device_name": self.device_name,
                "protocol": self.protocol,
                "copy_bandwidth_gbps": self.copy_bandwidth_gbps,
                "runs": runs,
                "speedup": _speedups(runs) if len(runs) == 2 else None,
            }
            | G.verdict(list(self.gates))
        )


def _speedups(runs: list[dict]) -> list[dict]:
    ours, dense = runs
    return [
        {
            "batch": a["batch"],
            "prefill": a["prefill_tokens_per_s"] / b["prefill_tokens_per_s"],
            "decode": a["decode_tokens_per_s"] / b["decode_tokens_per_s"],
        }
        for a, b in zip(ours["batches"], dense["batches"], strict=True)
    ]


def profile(
    model: ModelSpec,
    *,
    batches: Sequence[int] | str = (1,),
    prompt_len: int = 128,
    gen_len: int = 32,
    warmup: int = 1,
    reps: int = 3,
    breakdown_steps: int = 4,
    baseline: bool = False,
    min_speedup: float | None = None,
    decode: DecodeMode = DecodeMode.dynamic,
    options: LoadOptions = DEFAULTS,
    feedback: Feedback = LOGGED,
) -> ProfileReport:
    """Time prefill (``prompt_len`` random tokens) and ``gen_len`` greedy decode steps per batch size,
    mean ± sd over ``reps`` after ``warmup``; break ``breakdown_steps`` decode steps down by kernel
    (GPU) or module (CPU). ``baseline`` runs the same artifact again with dense weights.
    ``min_speedup`` gates each batch size's decode speedup over that baseline (needs ``baseline``)."""
    G.check_threshold("--min-speedup", min_speedup, 0.0)
    if min_speedup is not None and not baseline:
        raise UsageError("--min-speedup compares with the dense weights; add --baseline")
    batch_sizes = P.parse_batches(batches) if isinstance(batches, str) else P.check_batches(list(batches))
    decode = DecodeMode(decode)
    kind = check_model_spec(model, options.revision)
    if baseline and kind != SourceKind.artifact:
        raise UsageError(f"--baseline compares an llmq artifact with its dense weights, and {model} is not one")
    placement = options.placement()
    check_decode_device(decode, placement.device)
    run = open_for_run(model, options, feedback, placement=placement)
    context = context_length(run.config)
    if context is not None and prompt_len + gen_len > context:
        raise UsageError(f"--prompt-len {prompt_len} plus --gen-len {gen_len} exceeds the model's context of {context}")
    copy_gbps = P.copy_bandwidth_gbps(run.device, (256 if run.device.type == "cuda" else 64) << 20)
    plan = [("llmq" if run.backend else "model", run.backend)]
    if baseline:
        plan.append(("dense baseline", Backend.torch))
    runs = []
    for label, backend in plan:
        feedback.info(f"profiling {label} ({backend.value if backend else 'dense'}) on {run.device}")
        lm = run.load(backend)
        feedback.info(f"timing {label}: {warmup} warm-up and {reps} timed rounds per batch size")
        memory = sum(t.numel() * t.element_size() for t in (*lm.parameters(), *lm.buffers()))
        with feedback.stoppable() as stop:
            results = P.profile_batches(lm, run.config.vocab_size, batch_sizes, prompt_len, gen_len, warmup, reps,
                                        breakdown_steps, options.seed, run.device, decode, stop)  # fmt: skip
        runs.append(ProfileRun(label, backend, memory, results))
        del lm
        P.free_memory(run.device)
    protocol = {
        "prompt_len": prompt_len, "gen_len": gen_len, "warmup": warmup, "reps": reps,
        "breakdown_steps": breakdown_steps, "seed": options.seed, "prompt": "random token ids",
        "decode": "greedy argmax, KV cache, one token per sequence per step", "decode_mode": decode.value,
    }  # fmt: skip
    report = ProfileReport(run, P.device_name(run.device), protocol, copy_gbps, runs)
    speedups = report.to_json()["speedup"] or []
    gates = [g for s in speedups for g in G.at_least(f"decode_speedup_batch{s['batch']}", "--min-speedup",
                                                      s["decode"], min_speedup)]  # fmt: skip
    return replace(report, gates=tuple(gates))


# -- artifacts ------------------------------------------------------------------------------


def verify(artifact: str | os.PathLike, feedback: Feedback = LOGGED) -> VerifyReport:
    """Every check an artifact can get without running it: files, tensors, every layer decoded.

    Structural damage raises :class:`~llmq.errors.ArtifactError`; non-finite weights and bad JSON
    are collected in the report (``report.ok``, ``report.problems``).
    """
    with feedback.steps("verifying shards") as step:
        return verify_artifact(Path(artifact), on_shard=step)


def inspect(artifact: str | os.PathLike, verify_checksums: bool = True) -> Manifest:
    """An artifact's manifest (provenance, config, layouts, files), checksums checked unless told not to."""
    return A.open_artifact(Path(artifact), verify=verify_checksums)
