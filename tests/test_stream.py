"""quant/stream.py: a model walked one decoder layer at a time holds what it needs and no more."""

from __future__ import annotations

import pytest
import torch

from llmq.quant.calibrate import calibration_windows
from llmq.quant.stream import LayerStream
from llmq.runtime.sources import models, text

from conftest import build_tiny_model


def _stream(folder) -> LayerStream:
    source = models.resolve_model(str(folder), progress=False)
    calib = text.load_text(text.Dataset.austen, None, text.Split.calib).text[:20_000]
    return LayerStream(source, models.load_config(source), calibration_windows(source, calib, 2, 32, 0),
                       torch.device("cpu"))  # fmt: skip


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_token_embeddings_are_dropped_once_the_first_inputs_are_known_unless_the_head_is_them(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    folder = build_tiny_model(tmp_path / "m", tie_embeddings=tied)
    stream = _stream(folder)
    assert stream.model.get_input_embeddings().weight.device.type == ("cpu" if tied else "meta")
    stream.load_rest()  # the head; a dropped embedding stays dropped
    assert stream.model.get_input_embeddings().weight.device.type == ("cpu" if tied else "meta")
    whole = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    final = torch.randn(1, 32, whole.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = whole.lm_head(whole.model.norm(final))
        assert torch.equal(stream.logits(final), expected)
        sliced = torch.cat([stream.logits(final[:, :7]), stream.logits(final[:, 7:])], 1)
        torch.testing.assert_close(sliced, expected, rtol=1e-6, atol=1e-6)  # a 7-row product: another BLAS path


def test_the_output_head_pass_checks_for_a_stop_before_each_slice(tmp_path):
    stream = _stream(build_tiny_model(tmp_path / "m"))
    final = [torch.zeros(1, 32, stream.model.config.hidden_size) for _ in range(3)]
    calls = []

    def stop():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stream.after_layers(final, stop)
    assert len(calls) == 2  # it stopped at the second check, not after every window
