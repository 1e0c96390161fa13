"""Presets: the bits per weight in their --help summaries are what the layouts give on the demo model's shapes."""

from __future__ import annotations

import re

import pytest

from llmq.errors import UsageError
from llmq.quant.config import PRESETS, preset_config
from llmq.quant.linear import plan_layout
from llmq.runtime.format.accounting import account

# SmolLM2-135M's Linear shapes per decoder layer (30 layers): q, k, v, o, gate, up, down.
DEMO_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_summary_states_the_bits_per_weight_of_the_demo_shapes(name):
    config = preset_config(name)
    layouts = {f"l{i}": plan_layout(n, k, config) for i, (n, k) in enumerate(DEMO_SHAPES)}
    stated = float(re.search(r"(\d+\.\d+) bpw", PRESETS[name].summary).group(1))
    assert account(layouts, {}).bits_per_weight == pytest.approx(stated, abs=0.005)


def test_overrides_apply_and_are_validated():
    assert preset_config("mixed", g1=64).g1 == 64
    assert preset_config("4bit", g1=None).stripe_fraction == 1.0
    with pytest.raises(UsageError, match="unknown preset"):
        preset_config("nope")
    with pytest.raises(UsageError, match="--g2 0"):
        preset_config("mixed", g2=0)
