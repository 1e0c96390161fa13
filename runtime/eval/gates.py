"""Quality gates: a measured value held against a threshold, so a CI script can fail on quality.

A failed gate is not an error: the command ran and measured, and the model missed the bar. The
CLI therefore exits with its own code, :data:`GATE_FAILED` (3), distinct from an error (1) and a
usage error (2), and prints one line per gate naming the measured value, the threshold and the
margin. The margin is signed so that a positive margin always means "passed with room to spare".
A measured NaN fails every gate (no comparison with NaN holds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmq.errors import UsageError

GATE_FAILED = 3  # the CLI's exit code when any gate fails (docs/cli.md, "Exit codes")


@dataclass(frozen=True)
class Gate:
    """One threshold and what was measured against it.

    metric     what was measured, as the JSON names it (``ppl_ratio``, ``kl_mean``, ...)
    option     the option that set the threshold (``--max-ratio``), for the message
    measured   the measured value
    threshold  the bar
    at_most    True: passes when ``measured <= threshold``; False: when ``measured >= threshold``
    """

    metric: str
    option: str
    measured: float
    threshold: float
    at_most: bool

    @property
    def passed(self) -> bool:
        return self.measured <= self.threshold if self.at_most else self.measured >= self.threshold

    @property
    def margin(self) -> float:
        """How far inside the bar the measurement is: positive passes, negative fails."""
        return self.threshold - self.measured if self.at_most else self.measured - self.threshold

    def line(self) -> str:
        relation = "<=" if self.at_most else ">="
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"gate {verdict}: {self.metric} {self.measured:.4f}, required {relation} {self.threshold:g} "
            f"({self.option}); margin {self.margin:+.4f}"
        )

    def to_json(self) -> dict:
        return {
            "metric": self.metric,
            "option": self.option,
            "measured": self.measured,
            "threshold": self.threshold,
            "relation": "<=" if self.at_most else ">=",
            "margin": self.margin,
            "passed": self.passed,
        }


def at_most(metric: str, option: str, measured: float, threshold: float | None) -> list[Gate]:
    """A gate requiring ``measured <= threshold``, or none when no threshold was given."""
    return [] if threshold is None else [Gate(metric, option, float(measured), threshold, at_most=True)]


def at_least(metric: str, option: str, measured: float, threshold: float | None) -> list[Gate]:
    """A gate requiring ``measured >= threshold``, or none when no threshold was given."""
    return [] if threshold is None else [Gate(metric, option, float(measured), threshold, at_most=False)]


def check_threshold(option: str, value: float | None, low: float, high: float = math.inf) -> None:
    """A threshold outside ``[low, high]`` (or NaN) is a usage error naming the option."""
    if value is not None and not low <= value <= high:
        upper = "" if high == math.inf else f" and at most {high:g}"
        raise UsageError(f"{option} {value} must be at least {low:g}{upper}")


def verdict(gates: list[Gate]) -> dict:
    """The ``gates`` and ``verdict`` keys of a command's JSON; empty when no gate was set."""
    if not gates:
        return {}
    return {"gates": [g.to_json() for g in gates], "verdict": "pass" if all(g.passed for g in gates) else "fail"}
