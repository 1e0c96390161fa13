"""What a quantize run will write, worked out before any weight is quantized.

The module tree comes from a meta-device skeleton built from the config, so nothing is allocated
to find the matrices; the architecture table (:mod:`llmq.runtime.sources.families`) says where
the decoder layers are and how experts are stored. Every ``nn.Linear`` and ``Conv1D`` the config
selects becomes a quantized matrix, and so does each expert of a fused expert parameter
(``<experts>.gate_up_proj.<e>``); every other parameter stays dense. One work unit (a shard) per
decoder layer, then one for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from llmq.errors import ModelSourceError, StatsFileError, UsageError
from llmq.quant.budget import allocate, check_target
from llmq.quant.config import Allocation, QuantConfig
from llmq.quant.linear import hessian_score, plan_layout
from llmq.quant.statsfile import CalibStats
from llmq.runtime.format.accounting import Accounting, account
from llmq.runtime.format.layout import LinearLayout
from llmq.runtime.sources import families as F
from llmq.runtime.sources.checkpoint import Checkpoint, expected_params
from llmq.runtime.sources.models import ModelSource

REST = "rest"


@dataclass(frozen=True)
class Matrix:
    """Where a quantized matrix's weight ``[out, in]`` comes from."""

    param: str  # the model parameter that holds it
    expert: int | None = None  # its index in a fused expert parameter [experts, out, in]
    transposed: bool = False  # GPT-2's Conv1D stores [in, out]

    @property
    def label(self) -> str:
        """How messages name it: the tensor, with the expert index for one expert of a fused one."""
        return self.param if self.expert is None else f"{self.param}[{self.expert}]"


@dataclass(frozen=True)
class Plan:
    """What a quantize run will write: layouts of the selected matrices and the dense tensors."""

    linears: dict[str, LinearLayout]
    matrices: dict[str, Matrix]  # linear name -> where its weight comes from
    biases: dict[str, str]  # linear name -> bias tensor name
    dense: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    family: F.Family
    checkpoint: Checkpoint
    units: list[str]  # "0", "1", ... then "rest"
    scores: dict[str, torch.Tensor] | None = None  # channel scores the budget used; reused to pick stripes
    tied: tuple[str, ...] = ()  # selected matrices that share their weight with an embedding: kept 16-bit
    budget_by: str | None = None  # what the budget's scores measure: "predicted KL", "output error", "weight error"
    target_bits: float | None = None  # the budget's bits per quantized weight (the uniform plan's unless given)
    uniform_for_want_of_fisher: bool = False  # stats without the output Fisher: the default stayed uniform

    def notes(self) -> list[str]:
        """What the user asked for that the plan does not do, each as one line to log."""
        lines = [f"{name} is tied to the input embeddings and stays 16-bit with them" for name in self.tied]
        stacked = [k for k, (_, shape) in self.dense.items() if len(shape) == 3 and self.family.layer_of(k) is not None]
        if stacked:
            lines.append(
                f"{len(stacked)} 3-D tensor(s) in the decoder layers stay 16-bit (first {stacked[0]}): the "
                f"architecture table does not describe {self.family.name}'s experts (llmq/runtime/sources/families.py)"
            )
        if self.budget_by == "output error":
            lines.append(
                "--target-bits: the calibration statistics carry no output Fisher (written by an older llmq), so "
                "the budget compares Linears by output error, which ranks them poorly; run `llmq calibrate` again"
            )
        if self.uniform_for_want_of_fisher:
            lines.append(
                "the calibration statistics carry no output Fisher (written by an older llmq), so every Linear keeps "
                "the same stripe fraction; run `llmq calibrate` again to spread them by predicted KL"
            )
        return lines

    def linear_bits_per_weight(self) -> float:
        """Stored bits per weight of the quantized matrices alone, as :func:`allocate` counts them."""
        weights = sum(lay.out_features * lay.in_features for lay in self.linears.values())
        return sum(lay.stored_bits() for lay in self.linears.values()) / weights

    def accounting(self) -> Accounting:
        return account(self.linears, self.dense)

    def unit(self, name: str) -> str:
        return unit_of(name, self.family)

    def weight(self, name: str) -> torch.Tensor:
        """The source weight of quantized matrix ``name``, ``[out, in]``, read from the checkpoint."""
        m = self.matrices[name]
        value = self.checkpoint.read(m.param) if m.expert is None else self.checkpoint.read_expert(m.param, m.expert)
        return value.t() if m.transposed else value


def unit_of(name: str, family: F.Family) -> str:
    """The work unit (shard) a tensor belongs to: its decoder layer index, or "rest"."""
    index = family.layer_of(name)
    return REST if index is None else str(index)


def skeleton(model_config):
    """The model on the meta device: its module tree and parameter shapes, nothing allocated."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def make_plan(
    source: ModelSource,
    model_config,
    config: QuantConfig,
    dense_dtype: torch.dtype | None,
    stats: CalibStats | None = None,
) -> Plan:
    """The layouts to write. With ``config.target_bits``, or the uniform plan's bits when
    ``config.allocation`` asks for a budget (by default: when ``stats`` carry the output Fisher), the
    stripes are spread over the matrices by :mod:`llmq.quant.budget`, scored with ``stats`` if
    given (one extra read of every weight); otherwise every matrix gets the config's stripe fraction."""
    model = skeleton(model_config)
    family = F.family_of(model, model_config)
    F.decoder_layers(model, family)  # exists, or a clear error
    experts = F.expert_modules(model, family)
    checkpoint = Checkpoint.of(source.path, model, family)
    params = expected_params(model, checkpoint)
    matrices, biases, tied = _matrices(model, family, config, params, experts)
    if not matrices:
        raise ModelSourceError(
            f"{source.spec} has no quantizable Linear layers matching {list(config.include)}"
            f"{' minus ' + str(list(config.exclude)) if config.exclude else ''}; check --include/--exclude"
        )
    linears = {name: plan_layout(*shape, config) for name, (_, shape) in matrices.items()}
    quantized = {m.param for m, _ in matrices.values()}
    dense = {key: (dense_dtype or _default_dense_dtype(dtype), shape)
             for key, (dtype, shape) in params.items() if key not in quantized}  # fmt: skip
    units = sorted({unit_of(k, family) for k in params} - {REST}, key=int) + [REST]
    plan = Plan(linears, {n: m for n, (m, _) in matrices.items()}, biases, dense, family, checkpoint, units, tied=tied)
    target = config.target_bits
    if target is None and _spreads_by_default(config, stats):
        target = plan.linear_bits_per_weight()
    if target is None:
        no_fisher = config.allocation is None and stats is not None and 0 < config.stripe_fraction < 1
        return replace(plan, uniform_for_want_of_fisher=no_fisher)
    factories = _layout_factories(plan, config)
    check_target(factories, target)  # before the scores, which read every weight
    scores = _channel_scores(plan, config, stats)
    budget_by = "weight error" if stats is None else "predicted KL" if stats.has_fisher else "output error"
    linears = allocate(factories, scores, target)
    return replace(plan, linears=linears, scores=scores, budget_by=budget_by, target_bits=target)


def check_target_bits(plan: Plan, config: QuantConfig) -> None:
    """Refuse ``config.target_bits`` if ``plan``'s matrices cannot reach it: from their shapes alone,
    so a run can say so before it calibrates."""
    if config.target_bits is not None:
        check_target(_layout_factories(plan, config), config.target_bits)


def _layout_factories(plan: Plan, config: QuantConfig) -> dict:
    return {
        name: (lambda k4, n=lay.out_features, k=lay.in_features: plan_layout(n, k, config, k4))
        for name, lay in plan.linears.items()
    }


def _spreads_by_default(config: QuantConfig, stats: CalibStats | None) -> bool:
    """Whether a run without ``target_bits`` spreads the uniform plan's bits by sensitivity: when
    asked to, or by default when the statistics can predict each channel's KL (measured better at
    equal bits on two texts: docs/benchmarks.md); pure 2- or 4-bit plans have nothing to spread."""
    if config.allocation == Allocation.budget:
        return True
    if config.allocation == Allocation.uniform or not 0 < config.stripe_fraction < 1:
        return False
    return stats is not None and stats.has_fisher


def _matrices(model, family: F.Family, config: QuantConfig, params: dict, experts: dict):
    """Name -> (Matrix, (out, in)) of every selected matrix, the biases of those that have one, and the
    selected ones whose weight is another's (a tied LM head: not in the checkpoint)."""
    matrices, biases, tied = {}, {}, []
    for name, module in model.named_modules():
        shape = F.linear_shape(module)
        if shape is None or not config.quantizes(name, family):
            continue
        if f"{name}.weight" not in params:
            tied.append(name)
            continue
        matrices[name] = (Matrix(f"{name}.weight", transposed=F.is_conv1d(module)), shape)
        if getattr(module, "bias", None) is not None:
            biases[name] = f"{name}.bias"
    for module_name, module in experts.items():
        count = F.expert_count(module, family)
        names = [f"{module_name}.{param}.{e}" for param in family.experts.params for e in range(count)]
        chosen = [name for name in names if config.quantizes(name, family)]
        if chosen and len(chosen) < len(names):
            raise UsageError(
                f"--include/--exclude select {len(chosen)} of the {len(names)} expert matrices of {module_name}; "
                "select all of an experts module's matrices or none (the routing module holds one kind)"
            )
        for name in chosen:
            full, _, expert = name.rpartition(".")
            if full in params:
                shape = tuple(getattr(module, full.rpartition(".")[2]).shape[1:])
                matrices[name] = (Matrix(full, expert=int(expert)), shape)
    return matrices, biases, tuple(tied)


def _channel_scores(plan: Plan, config: QuantConfig, stats) -> dict[str, torch.Tensor]:
    """One read of every selected weight: each channel's 2-bit-over-4-bit error, Hessian-weighted if
    known, and in predicted KL (output-Fisher-weighted) if the statistics carry the output Fisher."""
    with_fisher = stats is not None and stats.has_fisher
    return {
        name: hessian_score(plan.weight(name), hessian(stats, name, lay.in_features), config,
                            fisher(stats, name, lay.out_features) if with_fisher else None)
        for name, lay in plan.linears.items()
    }  # fmt: skip


def fisher(stats: CalibStats, linear: str, out_features: int) -> torch.Tensor:
    """``linear``'s output Fisher ``[out_features]`` from statistics that carry one for every Linear."""
    found = stats.fisher(linear)
    if found is None or found.shape != (out_features,):
        raise StatsFileError(
            f"{stats.file_label} has no output Fisher of size {out_features} for {linear}; recalibrate with the "
            "same --include/--exclude (llmq calibrate takes them too)"
        )
    return found


def hessian(stats: CalibStats | None, linear: str, in_features: int) -> torch.Tensor | None:
    """The Hessian of ``linear``'s input from ``stats`` (None without); a Linear the stats do not
    cover is an error, never a silent fall back to round-to-nearest."""
    if stats is None:
        return None
    found = stats.hessian(linear)
    if found is None or found.shape != (in_features, in_features):
        raise StatsFileError(
            f"{stats.file_label} has no Hessian of size {in_features} for {linear}; recalibrate with the same "
            "--include/--exclude (llmq calibrate takes them too)"
        )
    return found


def _default_dense_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
