"""runtime/loader.py: an artifact's quantized weights dense or packed, and the choice between them."""

from __future__ import annotations

import json

import pytest
import torch

from llmq.errors import UsageError
from llmq.runtime.loader import open_for_run
from llmq.runtime.options import LoadOptions
from llmq.runtime.qlinear import QuantLinear


def _quant_linears(model) -> list[QuantLinear]:
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


def test_packed_weights_give_the_dense_models_logits_and_hold_no_dense_weight(tiny_artifact):
    ids = torch.arange(3, 40)[None]
    dense = open_for_run(str(tiny_artifact), LoadOptions(weights="dense")).load()
    packed = open_for_run(str(tiny_artifact), LoadOptions(weights="packed")).load()
    assert all(m.weight.numel() > 0 for m in _quant_linears(dense))
    assert all(m.weight.numel() == 0 and m.decode_dtype == torch.float32 for m in _quant_linears(packed))
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, packed(ids).logits)  # the same decode, only later
    assert "packed" in repr(_quant_linears(packed)[0])


def test_auto_keeps_dense_weights_where_they_fit_and_packs_them_with_a_notice_where_not(cli, tiny_artifact,
                                                                                           monkeypatch):  # fmt: skip
    args = ("eval", "ppl", str(tiny_artifact), "--dataset", "austen", "--seq-len", "32", "--max-tokens", "64", "--json")
    roomy = cli(*args)
    assert roomy.code == 0 and "weights: packed" not in roomy.stderr
    monkeypatch.setattr("llmq.runtime.loader.available_memory_bytes", lambda: 1000)  # 1 kB free
    tight = cli(*args)
    assert tight.code == 0, tight.stderr
    assert (
        "weights: packed, each quantized Linear decoded as it runs" in tight.stderr
        and "--weights dense" in tight.stderr
    )
    assert json.loads(tight.stdout)["result"]["ppl"] == json.loads(roomy.stdout)["result"]["ppl"]
    forced = cli(*args, "--weights", "dense")  # asked for: no notice, no switch
    assert forced.code == 0 and "weights: packed" not in forced.stderr


def test_packed_weights_for_a_plain_model_are_a_usage_error(cli, tiny_model):
    with pytest.raises(UsageError, match="--weights packed applies to an artifact on the torch backend"):
        open_for_run(str(tiny_model), LoadOptions(weights="packed"))
    result = cli("generate", str(tiny_model), "-p", "hi", "-n", "1", "--weights", "packed")
    assert result.code == 2 and "--weights packed applies to an artifact" in result.stderr


def test_an_unknown_weights_value_names_the_choices():
    with pytest.raises(UsageError, match="--weights 'sparse' must be one of auto, dense, packed"):
        LoadOptions(weights="sparse")
