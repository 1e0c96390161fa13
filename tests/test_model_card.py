"""The artifact's model card (README.md) and its HF files: written by quantize, covered by the
manifest's checksums, hub-readable metadata, and perplexities recorded into it afterwards."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest

import llmq
from llmq.errors import ArtifactError, ArtifactWriteError, UsageError
from llmq.runtime.format import artifact as A
from llmq.runtime.format import card as C
from llmq.runtime.format.hub import QUANT_METHOD
from llmq.runtime.format.manifest import FORMAT_VERSION, SourceRecord

yaml = pytest.importorskip("yaml")  # a transformers dependency; used here only to check the YAML

ENTRY = {"text": "austen:persuasion", "seq_len": 64, "stride": 64, "max_tokens": 1024, "ppl": 123.456789,
         "ppl_stderr": 4.5, "tokens_scored": 1008, "dtype": "fp32", "backend": "torch"}  # fmt: skip


def front_matter(path: Path) -> dict:
    text = (path / A.CARD).read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture
def artifact(tiny_artifact, tmp_path) -> Path:
    """A writable copy of the session's tiny artifact."""
    return Path(shutil.copytree(tiny_artifact, tmp_path / "tiny.llmq"))


def drop_card(path: Path) -> None:
    """Make ``path`` an artifact as written before llmq wrote cards: no README.md, none listed."""
    manifest = A.read_manifest(path)
    (path / A.CARD).unlink()
    files = {k: v for k, v in manifest.files.items() if k != A.CARD}
    (path / "manifest.json").write_text(dataclasses.replace(manifest, files=files).to_text(), encoding="utf-8")


def test_quantize_writes_a_card_index_and_config_that_the_checksums_cover(tiny_artifact):
    manifest = A.open_artifact(tiny_artifact)  # every checksum verified, README.md's included
    assert {A.CARD, A.WEIGHTS_INDEX, "config.json"} <= set(manifest.files)
    config = json.loads((tiny_artifact / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION}
    index = json.loads((tiny_artifact / A.WEIGHTS_INDEX).read_text())
    expected = A.expected_tensors(manifest)
    assert index["weight_map"] == {name: shard for name, (shard, _, _) in expected.items()}
    assert index["metadata"]["total_size"] == sum(
        math.prod(shape) * dtype.itemsize for _, dtype, shape in expected.values()
    )

    front = front_matter(tiny_artifact)
    assert front["library_name"] == "llmq" and "base_model" not in front  # a local folder is no hub id
    assert {"llmq", "quantized", "2-bit", "4-bit"} <= set(front["tags"])
    q = front["quantization"]
    assert q["bits_per_weight"] == manifest.accounting_record["bits_per_weight"]
    assert (q["g1"], q["g2"], q["g4"]) == (32, 16, 16) and q["calibration"] is None
    assert q["source_spec"] == manifest.source.spec and "llmq_results" not in front
    body = (tiny_artifact / A.CARD).read_text()
    assert "llmq.load(" in body and "AutoModelForCausalLM.from_pretrained(" in body and "import llmq" in body


def test_the_card_names_a_hub_source_as_base_model_and_the_calibration(tiny_artifact):
    manifest = A.read_manifest(tiny_artifact)
    hub = dataclasses.replace(
        manifest,
        source=SourceRecord("org/model", "hub", "hub model org/model", "abc123", {}),
        calibration={"dataset": "austen:pride-and-prejudice", "samples": 64, "seq_len": 512, "seed": 3, "tokens": 9},
    )
    text = C.render_card(hub)
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == "org/model" and front["base_model_relation"] == "quantized"
    assert front["quantization"]["source_revision"] == "abc123"
    assert front["quantization"]["calibration"] == {
        "dataset": "austen:pride-and-prejudice", "samples": 64, "seq_len": 512, "seed": 3, "tokens": 9,
    }  # fmt: skip
    assert "calibrated on `austen:pride-and-prejudice`: 64 windows of 512 tokens, seed 3" in text
    assert C.render_card(hub) == text  # deterministic: a resumed run writes the same bytes


def test_the_source_models_own_card_is_never_copied(tiny_model, tmp_path):
    source = Path(shutil.copytree(tiny_model, tmp_path / "source"))
    (source / "README.md").write_text("---\nlicense: mit\n---\nSOURCE CARD\n")
    (source / A.WEIGHTS_INDEX).write_text("{}")
    out = tmp_path / "out.llmq"
    llmq.quantize(source, out, llmq.QuantConfig(g4=16), calib_data=None)
    card = (out / A.CARD).read_text()
    assert "SOURCE CARD" not in card and front_matter(out)["library_name"] == "llmq"
    assert json.loads((out / A.WEIGHTS_INDEX).read_text())["weight_map"]  # llmq's index, not the source's
    assert llmq.verify(out).ok


def test_a_recorded_perplexity_is_in_the_card_and_verify_still_passes(artifact, cli):
    before = A.read_manifest(artifact)
    record = C.record_perplexity(artifact, ENTRY)
    assert record.ppl == ENTRY["ppl"] and record.llmq_version == llmq.__version__ and len(record.date) == 10

    result = cli("verify", str(artifact))
    assert result.code == 0, result.stderr
    after = A.open_artifact(artifact)
    assert {k: v for k, v in after.files.items() if k != A.CARD} == {
        k: v for k, v in before.files.items() if k != A.CARD
    }
    assert after.files[A.CARD] != before.files[A.CARD]

    front = front_matter(artifact)
    assert front["llmq_results"] == [record.to_json()]
    [result_entry] = front["model-index"][0]["results"]
    assert result_entry["metrics"][0] == {
        "type": "perplexity",
        "value": ENTRY["ppl"],
        "name": "perplexity (seq_len 64, stride 64, first 1024 tokens)",
        "args": {"seq_len": 64, "stride": 64, "max_tokens": 1024},
    }
    assert result_entry["dataset"] == {"type": "austen:persuasion", "name": "austen:persuasion"}
    assert (
        "| `austen:persuasion` | seq_len 64, stride 64, first 1024 tokens | 123.4568 | 4.5 |"
        in (artifact / A.CARD).read_text()
    )

    # Another protocol adds a row; the same text, protocol, dtype and backend replaces its row.
    C.record_perplexity(artifact, ENTRY | {"seq_len": 32, "stride": 16, "ppl": 150.0})
    C.record_perplexity(artifact, ENTRY | {"ppl": 120.0, "date": "2024-01-02"})
    records = front_matter(artifact)["llmq_results"]
    rows = [(r["seq_len"], r["ppl"], r["date"]) for r in records]
    assert rows == [(32, 150.0, record.date), (64, 120.0, "2024-01-02")]
    assert llmq.verify(artifact).ok


def test_the_hub_reads_the_cards_metadata(artifact):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    C.record_perplexity(artifact, ENTRY | {"text": "wikitext2:wikitext-2-raw-v1:test", "max_tokens": None})
    card = huggingface_hub.ModelCard((artifact / A.CARD).read_text())
    assert card.data.library_name == "llmq" and "quantized" in card.data.tags
    [result] = card.data.eval_results
    assert (result.dataset_type, result.dataset_config, result.dataset_split) == (
        "Salesforce/wikitext", "wikitext-2-raw-v1", "test",
    )  # fmt: skip
    assert (result.metric_type, result.metric_value) == ("perplexity", ENTRY["ppl"])
    assert result.task_type == "text-generation"


def test_a_perplexity_report_becomes_a_record(artifact):
    report = llmq.perplexity(artifact, "austen", seq_len=32, max_tokens=256)
    entry = C.perplexity_entry(report.to_json())
    record = C.record_perplexity(artifact, entry)
    assert record.ppl == report.result.ppl and record.text == report.text_source and record.max_tokens == 256
    assert front_matter(artifact)["llmq_results"][0]["ppl"] == report.result.ppl
    assert llmq.verify(artifact).ok


def test_a_tampered_card_fails_verify_and_takes_no_record(artifact, cli):
    card = artifact / A.CARD
    card.write_text(card.read_text().replace("bits per weight", "bits per w8ight"))  # same size
    result = cli("verify", str(artifact))
    assert result.code == 1 and "README.md" in result.stderr and "checksum mismatch" in result.stderr
    with pytest.raises(ArtifactError, match="README.md: checksum mismatch"):
        C.record_perplexity(artifact, ENTRY)
    with pytest.raises(ArtifactError, match="README.md"):
        llmq.load(artifact, llmq.LoadOptions(device="cpu"))


def test_an_artifact_without_a_card_loads_verifies_and_gets_one(artifact):
    drop_card(artifact)
    assert llmq.verify(artifact).ok
    assert llmq.load(artifact, llmq.LoadOptions(device="cpu")) is not None
    (artifact / A.CARD).write_text("someone's notes\n")  # not listed: not llmq's to overwrite
    with pytest.raises(ArtifactError, match="the manifest does not list it"):
        C.record_perplexity(artifact, ENTRY)
    (artifact / A.CARD).unlink()
    C.record_perplexity(artifact, ENTRY)
    assert A.CARD in A.open_artifact(artifact).files and llmq.verify(artifact).ok
    assert front_matter(artifact)["llmq_results"][0]["ppl"] == ENTRY["ppl"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"text": None}, "'text' must be a non-empty string"),
        ({"ppl": float("nan")}, "'ppl' must be a finite number"),
        ({"ppl": 0.5}, "'ppl' must be at least 1"),
        ({"seq_len": True}, "'seq_len' must be a positive integer"),
        ({"max_tokens": 0}, "'max_tokens' must be a positive integer or null"),
        ({"date": "30/11/2025"}, "'date' must be YYYY-MM-DD"),
        ({"tokens": 5}, r"unknown key\(s\) \['tokens'\]"),
    ],
)
def test_a_bad_record_is_refused_and_nothing_changes(artifact, change, message):
    before = {p.name: p.read_bytes() for p in artifact.iterdir()}
    with pytest.raises(UsageError, match=message):
        C.record_perplexity(artifact, ENTRY | change)
    with pytest.raises(UsageError, match="needs 'stride'"):
        C.record_perplexity(artifact, {k: v for k, v in ENTRY.items() if k != "stride"})
    assert {p.name: p.read_bytes() for p in artifact.iterdir()} == before


@pytest.mark.parametrize(
    "label",
    ['say "hi": #1', "two\nlines", "tab\tand \\ back", "café 😀", "line\u2028sep\x85nel", "c1 \x9b ctl", "yes", "1e5"],
)
def test_any_label_survives_the_yaml(artifact, label):
    C.record_perplexity(artifact, ENTRY | {"text": label, "ppl": 1e20, "ppl_stderr": 1e-05})
    [record] = front_matter(artifact)["llmq_results"]  # a YAML 1.1 parser reads the same values
    assert record["text"] == label and record["ppl"] == 1e20 and record["ppl_stderr"] == 1e-05
    assert front_matter(artifact)["model-index"][0]["results"][0]["dataset"]["name"] == label
    assert C.read_records((artifact / A.CARD).read_text(encoding="utf-8"), artifact)[0].text == label


def test_a_record_interrupted_between_its_renames_is_completed_by_the_next(artifact, monkeypatch):
    def fail(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(C, "_put_card", fail)
    with pytest.raises(ArtifactWriteError, match="the next record_perplexity completes the card"):
        C.record_perplexity(artifact, ENTRY)
    assert (artifact / C.PENDING_CARD).exists()
    with pytest.raises(ArtifactError, match=r"README.md: \d+ bytes, the manifest says"):  # new manifest, old card
        A.open_artifact(artifact)
    monkeypatch.undo()
    C.record_perplexity(artifact, ENTRY | {"seq_len": 32})
    assert [r["seq_len"] for r in front_matter(artifact)["llmq_results"]] == [64, 32]
    assert not (artifact / C.PENDING_CARD).exists() and llmq.verify(artifact).ok


def test_a_stop_signal_between_the_renames_acts_only_after_both(artifact, monkeypatch):
    real = C.os.replace

    def replace_then_signal(src, dst):
        real(src, dst)
        if Path(dst).name == A.MANIFEST:  # the first of the two renames
            os.kill(os.getpid(), signal.SIGTERM)

    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        monkeypatch.setattr(C.os, "replace", replace_then_signal)
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            C.record_perplexity(artifact, ENTRY)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not (artifact / C.PENDING_CARD).exists()  # the card's rename came before the stop
    assert front_matter(artifact)["llmq_results"][0]["ppl"] == ENTRY["ppl"] and llmq.verify(artifact).ok


def test_a_record_that_failed_before_any_rename_leaves_the_artifact_as_it_was(artifact, monkeypatch):
    before = {p.name: p.read_bytes() for p in artifact.iterdir()}
    real = C.os.replace

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C.os, "replace", fail)
    with pytest.raises(ArtifactWriteError, match="No space left on device"):
        C.record_perplexity(artifact, ENTRY)
    monkeypatch.setattr(C.os, "replace", real)
    assert {p.name: p.read_bytes() for p in artifact.iterdir() if not p.name.startswith(".")} == before
    C.record_perplexity(artifact, ENTRY)  # the leftovers are cleaned up
    assert not [p for p in artifact.iterdir() if p.name.startswith(".")] and llmq.verify(artifact).ok


def test_concurrent_records_all_land(artifact):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: C.record_perplexity(artifact, ENTRY | {"seq_len": n}), [8, 16, 24, 32]))
    assert sorted(r["seq_len"] for r in front_matter(artifact)["llmq_results"]) == [8, 16, 24, 32]
    assert llmq.verify(artifact).ok


def test_eval_ppl_record_writes_the_measured_result_into_the_card(artifact, cli, tiny_model):
    text = ("--dataset", "austen", "--seq-len", "64", "--max-tokens", "256")
    result = cli("eval", "ppl", str(artifact), *text, "--record", "--json")
    assert result.code == 0, result.stderr
    measured = json.loads(result.stdout)["result"]["ppl"]
    card = (artifact / A.CARD).read_text()
    [record] = C.read_records(card, artifact)
    assert record.ppl == measured and record.text == "austen:persuasion"
    assert cli("verify", str(artifact), "-q").code == 0
    refused = cli("eval", "ppl", str(tiny_model), *text, "--record")
    assert refused.code == 2 and "is not an artifact" in refused.stderr
