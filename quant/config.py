"""The quantization config and its named presets.

Everything that changes the packed bits lives in :class:`QuantConfig`; it is written into every
artifact's manifest. Presets carry their bits per weight *as measured* on the demo model (the
number includes every scale, zero, padding bit and the permutation); ``docs/benchmarks.md``
has the command that measured them.
"""

from __future__ import annotations

import enum
import fnmatch
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from llmq.errors import UsageError

if TYPE_CHECKING:
    from llmq.runtime.sources.families import Family


class Rounding(str, enum.Enum):
    """How each group's scale and zero are chosen."""

    minmax = "minmax"  # plain min/max of the group
    search = "search"  # the min/max candidates and shrunken ranges, keep the lowest squared error


class Selection(str, enum.Enum):
    """How the input channels of the 4-bit stripes are ranked."""

    auto = "auto"  # hessian when calibration statistics are given, range otherwise
    range = "range"  # data-free: how far each channel stretches its 2-bit groups' ranges
    hessian = "hessian"  # 2-bit-over-4-bit error weighted by E[x_c^2]; needs calibration


class Refine(str, enum.Enum):
    """What runs after GPTQ to bring the quantized model closer to the fp32 one."""

    none = "none"
    block = "block"  # block-wise reconstruction: each decoder block's stored numbers tuned to its fp32 outputs
    e2e = "e2e"  # block, then the scales and norms of the whole model tuned to the fp32 model's outputs (KL)

    @property
    def tunes(self) -> bool:
        return self != Refine.none


class Allocation(str, enum.Enum):
    """How the 4-bit stripes are shared among the Linears."""

    uniform = "uniform"  # every Linear keeps the config's stripe fraction
    budget = "budget"  # the uniform plan's bits (or target_bits), spread over the Linears by sensitivity


class RefineInputs(str, enum.Enum):
    """What a block is given while it learns to reproduce the fp32 block's outputs."""

    quantized = "quantized"  # the outputs of the refined blocks before it: what it sees at inference
    fp = "fp"  # the fp32 blocks' outputs: the same inputs as its targets'


def _as_enum(kind: type[enum.Enum], value, option: str):
    """``value`` (a member or its string) as a member of ``kind``; a :class:`UsageError` naming ``option`` if none."""
    try:
        return kind(value)
    except ValueError:
        raise UsageError(f"{option} {value!r} must be one of {', '.join(k.value for k in kind)}") from None


class RefineCodes(str, enum.Enum):
    """Where block refinement starts the 2-bit and 4-bit codes."""

    gptq = "gptq"  # GPTQ's codes, which move only with --refine-lr above 0 (the default before 2026-12-01)
    # each code at the fp32 weight's unrounded position under GPTQ's scales, moved by signed steps
    # (AutoRound's start); a block keeps the result only if it beats GPTQ's codes, else GPTQ's refine
    lean = "lean"


# The codes' signed step per optimiser step when none is given: from GPTQ's codes, flips made
# blocks worse (docs/method.md); from the leaning start, 0.02 x 50 decaying steps lets a code drift
# about half a unit, as AutoRound bounds its offsets.
DEFAULT_CODE_LR = {RefineCodes.gptq: 0.0, RefineCodes.lean: 0.02}


@dataclass(frozen=True)
class RefineSettings:
    """Block-wise reconstruction (:mod:`llmq.quant.refine`).

    steps      optimiser steps per block
    batch      calibration windows per step
    codes      see :class:`RefineCodes`
    lr         signed-gradient step of the integers (codes, scale codes, 4-bit zeros), in code units,
               decayed linearly to 0; an integer moves once its steps add up to half a unit.
               None: ``DEFAULT_CODE_LR[codes]`` (a run resolves it, so manifests carry the number)
    scale_lr   Adam's rate on the fp16 scales' log-multipliers
    inputs     see :class:`RefineInputs`
    e2e_steps, e2e_batch, e2e_lr   ``--refine e2e``'s stage after the blocks (:mod:`llmq.quant.e2e`):
               optimiser steps over the whole model, windows per step, Adam's rate
    """

    steps: int = 50
    batch: int = 4
    codes: RefineCodes = RefineCodes.lean  # measured better on every point and both texts (docs/benchmarks.md)
    lr: float | None = None
    scale_lr: float = 0.01
    inputs: RefineInputs = RefineInputs.quantized
    e2e_steps: int = 32
    e2e_batch: int = 2
    e2e_lr: float = 0.001

    def __post_init__(self) -> None:  # the enums' strings, as a script or a manifest writes them
        for name, kind in (("inputs", RefineInputs), ("codes", RefineCodes)):
            object.__setattr__(self, name, _as_enum(kind, getattr(self, name), f"--refine-{name}"))

    @property
    def code_lr(self) -> float:
        """The integers' signed step: ``lr``, or the default for where the codes start."""
        return DEFAULT_CODE_LR[self.codes] if self.lr is None else self.lr

    def check(self) -> None:
        if self.steps < 1:
            raise UsageError(f"--refine-steps {self.steps} must be at least 1")
        if self.batch < 1:
            raise UsageError(f"--refine-batch {self.batch} must be at least 1")
        if not 0.0 <= self.code_lr <= 0.5:
            raise UsageError(f"--refine-lr {self.lr} must be between 0 and 0.5 (code units per step)")
        if self.codes == RefineCodes.lean and self.code_lr == 0.0:
            raise UsageError("--refine-codes lean moves the codes from the fp32 weights; give --refine-lr above 0")
        if not 0.0 <= self.scale_lr <= 0.1:
            raise UsageError(f"--refine-scale-lr {self.scale_lr} must be between 0 and 0.1")
        if self.e2e_steps < 1 or self.e2e_batch < 1:
            raise UsageError(f"--e2e-steps {self.e2e_steps} and --e2e-batch {self.e2e_batch} must be at least 1")
        if not 0.0 <= self.e2e_lr <= 0.1:
            raise UsageError(f"--e2e-lr {self.e2e_lr} must be between 0 and 0.1")

    def block_only(self) -> RefineSettings:
        """These settings with the end-to-end stage's at their defaults."""
        return replace(self, e2e_steps=RefineSettings.e2e_steps, e2e_batch=RefineSettings.e2e_batch,
                       e2e_lr=RefineSettings.e2e_lr)  # fmt: skip

    def held_out(self, windows: int) -> int:
        """How many of ``windows`` judge whether a block got better, never trained on: one in eight."""
        return max(1, windows // 8)


# What a calibrated run refines with unless told (docs/benchmarks.md has the measurement behind it).
DEFAULT_REFINE = Refine.block

# Calibration windows, and tokens per window: 32k tokens, what every calibrated benchmark used.
DEFAULT_SAMPLES, DEFAULT_SEQ_LEN = 64, 512

# The matrices inside the decoder blocks; embeddings, norms and the LM head stay 16-bit by default.
DECODER_LAYERS = "*.layers.*"
DEFAULT_INCLUDE = (DECODER_LAYERS,)


@dataclass(frozen=True)
class QuantConfig:
    g1: int = 32  # 2-bit group size along the input dimension
    g2: int = 16  # first-order scales per FP16 second-order scale
    g4: int = 64  # 4-bit group size; also the width unit of a 4-bit stripe
    stripe_fraction: float = 0.25  # share of input channels kept in 4-bit stripes
    scale_bits: int = 6  # first-order scale code width (the meta byte has room for 6)
    outlier_fraction: float = 0.0  # share of 2-bit weights kept as sparse fp16 corrections
    rounding: Rounding = Rounding.search
    selection: Selection = Selection.auto
    gptq_damp: float = 0.01  # GPTQ dampening, as a fraction of the Hessian's mean diagonal
    gptq_block: int = 128  # columns per lazy-update block (speed only: the result is the same up to rounding)
    # GPTQ in descending E[x^2] order within each part (the permutation); None: on when calibrated
    act_order: bool | None = None
    include: tuple[str, ...] = DEFAULT_INCLUDE  # fnmatch patterns on matrix names (Linear, Conv1D, expert)
    exclude: tuple[str, ...] = field(default_factory=tuple)
    # Model-wide bits per weight: stripes spread over the Linears by sensitivity (replaces stripe_fraction)
    target_bits: float | None = None
    # None: budget when the calibration statistics carry the output Fisher (predicted KL), uniform
    # otherwise; a run resolves it into target_bits (make_plan), so manifests carry only that
    allocation: Allocation | None = None
    # After GPTQ; None: block when calibrated, none otherwise (resolved by for_run)
    refine: Refine | None = None
    refine_settings: RefineSettings = field(default_factory=RefineSettings)

    def __post_init__(self) -> None:  # the enums' strings and single patterns, as a script may write them
        for name, kind in (("rounding", Rounding), ("selection", Selection), ("refine", Refine),
                           ("allocation", Allocation)):  # fmt: skip
            value = getattr(self, name)
            if value is None and name in ("refine", "allocation"):
                continue
            object.__setattr__(self, name, _as_enum(kind, value, f"--{name}"))
        for name in ("include", "exclude"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))

    def check(self) -> None:
        """Raise :class:`UsageError` naming the first invalid value."""
        from llmq.runtime.format.layout import MAX_SCALE_BITS

        if self.g1 < 16 or self.g1 % 16:
            raise UsageError(f"--g1 {self.g1} must be a positive multiple of 16")
        if self.g4 < 8 or self.g4 % 8:
            raise UsageError(f"--g4 {self.g4} must be a positive multiple of 8")
        if self.g2 < 1:
            raise UsageError(f"--g2 {self.g2} must be at least 1")
        if not 1 <= self.scale_bits <= MAX_SCALE_BITS:
            raise UsageError(f"--scale-bits {self.scale_bits} must be between 1 and {MAX_SCALE_BITS}")
        if not 0.0 <= self.stripe_fraction <= 1.0:
            raise UsageError(f"--stripe-fraction {self.stripe_fraction} must be between 0 and 1")
        if not 0.0 <= self.outlier_fraction <= 0.05:
            raise UsageError(f"--outliers {self.outlier_fraction} must be between 0 and 0.05 (5% of 2-bit weights)")
        if not 0.0 < self.gptq_damp <= 1.0:
            raise UsageError(f"--damp {self.gptq_damp} must be in (0, 1]")
        if self.gptq_block < 1:
            raise UsageError(f"--gptq-block {self.gptq_block} must be at least 1")
        if not self.include:
            raise UsageError("--include needs at least one pattern")
        if self.target_bits is not None and self.allocation == Allocation.uniform:
            raise UsageError("--target-bits spreads the stripes by sensitivity; drop --allocation uniform")
        self.refine_settings.check()

    def for_run(self, calibrated: bool) -> QuantConfig:
        """This config as a run uses it: checked against whether the run has calibration statistics,
        with act-order decided (on with them, as measured best; meaningless without)."""
        if self.selection == Selection.hessian and not calibrated:
            raise UsageError(
                "--selection hessian ranks channels with calibration statistics; add --calib or --calib-data"
            )
        if self.act_order and not calibrated:
            raise UsageError("--act-order orders GPTQ by calibration statistics; add --calib or --calib-data")
        if self.refine is not None and self.refine.tunes and not calibrated:
            raise UsageError(
                f"--refine {self.refine.value} tunes the blocks on calibration text; add --calib-data or --calib"
            )
        refine = self.refine or (DEFAULT_REFINE if calibrated else Refine.none)
        if refine == Refine.none and self.refine_settings != RefineSettings():
            raise UsageError("--refine-* settings tune --refine block, which this run does not do; drop them")
        if refine != Refine.e2e and self.refine_settings != self.refine_settings.block_only():
            raise UsageError("--e2e-* settings tune --refine e2e, which this run does not do; drop them")
        settings = replace(self.refine_settings, lr=self.refine_settings.code_lr)  # manifests carry the number
        act_order = calibrated if self.act_order is None else self.act_order
        return replace(self, act_order=act_order, refine=refine, refine_settings=settings)

    def selects(self, module_name: str, layers: str) -> bool:
        """Whether the matrix ``module_name`` is quantized. The pattern ``*.layers.*`` (the default
        include) stands for the model's decoder layers wherever its family keeps them (``layers``,
        from the architecture table: ``transformer.h`` for GPT-2 and Falcon); others match as written."""
        in_layers = module_name.startswith(layers + ".")
        included = any(in_layers if p == DECODER_LAYERS else fnmatch.fnmatchcase(module_name, p) for p in self.include)
        return included and not any(fnmatch.fnmatchcase(module_name, p) for p in self.exclude)

    def quantizes(self, module_name: str, family: Family) -> bool:
        """:meth:`selects`, less the family's gates and routers, which stay 16-bit."""
        return self.selects(module_name, family.layers) and not family.keeps_dense(module_name)

    def to_json(self) -> dict:
        data = asdict(self)
        data["rounding"] = self.rounding.value
        data["selection"] = self.selection.value
        data["include"], data["exclude"] = list(self.include), list(self.exclude)
        if self.target_bits is None:  # as manifests before the field existed: a fixed stripe fraction
            del data["target_bits"]
        del data["allocation"]  # a run resolves it into target_bits
        data["refine"] = None if self.refine is None else self.refine.value
        data["refine_settings"]["inputs"] = self.refine_settings.inputs.value
        data["refine_settings"]["codes"] = self.refine_settings.codes.value
        if self.refine == Refine.none:  # as manifests before refinement existed
            del data["refine"], data["refine_settings"]
        elif self.refine != Refine.e2e:  # as block refinement's manifests before the end-to-end stage existed
            for key in ("e2e_steps", "e2e_batch", "e2e_lr"):
                del data["refine_settings"][key]
        return data

    @classmethod
    def from_json(cls, data: dict) -> QuantConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown quantization config keys: {sorted(unknown)}")
        values = dict(data)
        if "rounding" in values:
            values["rounding"] = Rounding(values["rounding"])
        if "selection" in values:
            values["selection"] = Selection(values["selection"])
        refine = values.get("refine", Refine.none.value)  # absent: written before refinement existed
        values["refine"] = None if refine is None else Refine(refine)
        if "refine_settings" in values:  # without "codes": written before the leaning start, from GPTQ's
            values["refine_settings"] = RefineSettings(**{"codes": RefineCodes.gptq.value} | values["refine_settings"])
        for key in ("include", "exclude"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    config: QuantConfig


# The bits per weight in each summary were measured on the demo model (every scale, zero,
# padding bit and permutation index counted); larger matrices amortise the permutation better.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("mixed", "2-bit g32 + 25% 4-bit stripes, 2.83 bpw (default)", QuantConfig()),
        Preset("mixed-wide", "2-bit g16 + 25% 4-bit stripes, 3.06 bpw", QuantConfig(g1=16)),
        Preset("2bit", "pure 2-bit g16 with second-order scales, 2.66 bpw", QuantConfig(g1=16, stripe_fraction=0.0)),
        Preset("4bit", "pure 4-bit g64, 4.42 bpw", QuantConfig(stripe_fraction=1.0)),
    )
}
DEFAULT_PRESET = "mixed"


def refine_settings(**overrides) -> RefineSettings | None:
    """The default :class:`RefineSettings` with the non-None ``overrides``; None when none is given."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(RefineSettings(), **given) if given else None


def preset_config(name: str = DEFAULT_PRESET, **overrides) -> QuantConfig:
    """The preset's config with the non-None ``overrides`` applied, validated."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if "target_bits" in given and "stripe_fraction" in given:
        raise UsageError("--target-bits chooses the stripes per Linear; drop --stripe-fraction")
    config = replace(PRESETS[name].config, **given)
    config.check()
    return config
