"""The Python API at its boundary: what a script passes is checked like what the shell passes."""

from __future__ import annotations

from pathlib import Path

import pytest

import llmq
from llmq.errors import HubUnreachableError, ModelSourceError, StatsFileError, UsageError

SMALL = {"samples": 2, "seq_len": 16}


def test_a_path_object_is_always_a_local_path(tmp_path, monkeypatch):
    from llmq.runtime.sources.models import check_model_spec

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError, match="model path './demo' does not exist"):
        check_model_spec(Path("demo"))
    with pytest.raises(ModelSourceError, match="'./org/name' does not exist"):
        check_model_spec(Path("org/name"))


def test_statistics_of_another_model_are_refused(tiny_model, tmp_path):
    from conftest import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=1)
    stats = llmq.calibrate(other, "austen", **SMALL)
    with pytest.raises(StatsFileError, match="made for another model"):
        llmq.quantize(tiny_model, tmp_path / "x.llmq", llmq.QuantConfig(g4=16), calib=stats)
    assert not (tmp_path / "x.llmq").exists()


def test_inline_calibration_takes_a_text_in_memory(tiny_model, tmp_path):
    from llmq.runtime.sources.text import Dataset, Split, load_text

    text = llmq.Text("my-notes", load_text(Dataset.austen, None, Split.calib).text[:20_000])
    manifest = llmq.quantize(
        tiny_model, tmp_path / "x.llmq", llmq.QuantConfig(g4=16), calib_data=llmq.CalibData(text, **SMALL)
    )
    assert manifest.calibration["dataset"] == "my-notes" and manifest.quantization["act_order"] is True
    assert manifest.quantization["refine"] == "block"  # refined on the text in memory, not reloaded by label


def test_enum_options_accept_their_strings(tiny_artifact):
    report = llmq.generate(tiny_artifact, "hello", max_new_tokens=2, decode="static")
    assert report.to_json()["decode"] == "static"
    config = llmq.QuantConfig(selection="range", rounding="minmax", include="*.mlp.*")
    assert config.to_json()["selection"] == "range" and config.include == ("*.mlp.*",)
    with pytest.raises(UsageError, match="--rounding 'nearest' must be one of minmax, search"):
        llmq.QuantConfig(rounding="nearest")


def test_a_baseline_is_refused_before_a_model_is_fetched():
    with pytest.raises(UsageError, match="--baseline compares an llmq artifact"):
        llmq.profile("some-org/some-model", baseline=True)


def test_kld_applies_a_revision_to_the_hub_id_among_its_models(tiny_artifact, tiny_model):
    options = llmq.LoadOptions(revision="main")
    with pytest.raises(HubUnreachableError):  # the revision was accepted for the base: it is the hub id
        llmq.kld(tiny_artifact, "some-org/some-model", "austen", seq_len=32, options=options)
    with pytest.raises(ModelSourceError, match="--revision applies to hub ids"):
        llmq.kld(tiny_artifact, tiny_model, "austen", seq_len=32, options=options)
