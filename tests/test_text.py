"""Text sources: the embedded Austen splits, files, and the wikitext2 preparation."""

from __future__ import annotations

import hashlib
import sys
import types

import pytest

from llmq.errors import TextSourceError, UsageError
from llmq.runtime.sources import text
from llmq.runtime.sources.text import Dataset, Split, load_text


def test_austen_splits_are_different_novels():
    evaluation = load_text(Dataset.austen, None, Split.eval)
    calibration = load_text(Dataset.austen, None, Split.calib)
    assert evaluation.source == "austen:persuasion" and evaluation.text.startswith("Persuasion")
    assert (
        calibration.source == "austen:pride-and-prejudice" and "PRIDE AND PREJUDICE" in calibration.text[:200].upper()
    )
    assert len(evaluation.text) > 400_000 and len(calibration.text) > 600_000


def test_text_file_round_trip(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Hello, world.\n", encoding="utf-8")
    loaded = load_text(None, path, Split.eval)
    assert loaded.text == "Hello, world.\n" and loaded.source == f"file:{path}"


def test_binary_file_is_rejected(tmp_path):
    path = tmp_path / "b.bin"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(TextSourceError, match="not UTF-8"):
        load_text(None, path, Split.eval)


def test_directory_is_rejected(tmp_path):
    with pytest.raises(TextSourceError, match="not a regular file"):
        load_text(None, tmp_path, Split.eval)


def test_neither_source_is_a_usage_error():
    with pytest.raises(UsageError):
        load_text(None, None, Split.eval)


def test_default_applies_only_when_neither_source_is_given(tmp_path):
    assert load_text(None, None, Split.eval, default=Dataset.austen).source == "austen:persuasion"
    path = tmp_path / "t.txt"
    path.write_text("text")
    assert load_text(None, path, Split.eval, default=Dataset.austen).source == f"file:{path}"


def test_wikitext_rows_are_joined_with_blank_lines():
    assert text.join_wikitext_rows(["a", "", " = b = ", "c"]) == "a\n\n\n\n = b = \n\nc"


def _fake_datasets(monkeypatch, load):
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load))


def test_wikitext2_uses_test_split_for_eval_and_train_for_calibration(monkeypatch):
    calls = []

    def load(name, config, split):
        calls.append((name, config, split))
        return {"text": [f"{split} row 1", f"{split} row 2"]}

    _fake_datasets(monkeypatch, load)
    assert load_text(Dataset.wikitext2, None, Split.eval).text == "test row 1\n\ntest row 2"
    assert load_text(Dataset.wikitext2, None, Split.calib).source == "wikitext2:wikitext-2-raw-v1:train"
    assert calls == [
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "train"),
    ]


def test_wikitext2_offline_error_points_at_the_embedded_text(monkeypatch):
    def load(*args, **kwargs):
        raise ConnectionError("no network")

    _fake_datasets(monkeypatch, load)
    with pytest.raises(TextSourceError, match="--dataset austen"):
        load_text(Dataset.wikitext2, None, Split.eval)


def test_a_source_label_loads_the_same_text_again(tmp_path, monkeypatch):
    path = tmp_path / "notes.txt"
    path.write_text("a short text\n", encoding="utf-8")
    for loaded in (load_text(Dataset.austen, None, Split.calib), load_text(Dataset.austen, None, Split.eval),
                   load_text(None, path, Split.calib)):  # fmt: skip
        assert text.from_source(loaded.source) == loaded
    _fake_datasets(monkeypatch, lambda name, config, split: {"text": [f"{split} row"]})
    assert text.from_source("wikitext2:wikitext-2-raw-v1:train").text == "train row"
    for label in ("my-notes", "austen:emma", "wikitext2:wikitext-103-raw-v1:train"):
        with pytest.raises(TextSourceError, match=f"the calibration text '{label}' is not one llmq can load again"):
            text.from_source(label)


def test_the_builtin_mix_joins_prose_technical_text_and_code():
    mix = load_text(Dataset.mix, None, Split.calib)
    prose = load_text(Dataset.austen, None, Split.calib).text
    assert mix.source == "mix:prose-two-thirds+technical+code" and text.from_source(mix.source) == mix
    assert mix.text.startswith(prose[:10_000]) and "Persuasion" not in mix.text
    assert "def " in mix.text and "class " in mix.text and "expression" in mix.text
    assert 700_000 < len(mix.text) < 800_000  # 500,000 characters of prose, then two of about 125,000
    technical = mix.text.index(text._embedded("mix-technical.txt", "mix.json")[:10_000])
    assert 0.64 < technical / len(mix.text) < 0.69 and prose.startswith(mix.text[: technical - 3])  # two thirds prose
    assert prose[technical - 3 : technical - 1] == "\n\n"  # the novel is cut at a paragraph's end
    code = mix.text.index(text._embedded("mix-code.txt", "mix.json")[:10_000])
    assert 0.15 < (code - technical) / len(mix.text) < 0.18 and 0.15 < 1 - code / len(mix.text) < 0.18
    with pytest.raises(TextSourceError, match="the built-in mix is calibration text only"):
        load_text(Dataset.mix, None, Split.eval)


def test_the_first_mix_a_third_prose_still_loads_for_the_stats_files_that_name_it():
    first = text.from_source("mix:prose+technical+code")
    now = load_text(Dataset.mix, None, Split.calib)
    technical, code = (text._embedded(name, "mix.json") for name in ("mix-technical.txt", "mix-code.txt"))
    cut = first.text.index(technical)
    assert first.source == "mix:prose+technical+code" and 0.3 < cut / len(first.text) < 0.36  # a third prose
    assert first.text[cut:] == f"{technical}\n\n\n{code}"  # the whole technical text and code
    assert now.text.startswith(first.text[: cut - 3])  # the same novel, cut sooner
    # the exact text stats files of the first mix were collected on: refinement samples its windows again
    assert hashlib.sha256(first.text.encode()).hexdigest().startswith("bde6219992c5fa3c5ad9a0c7eecfa9d0")


def test_an_embedded_text_that_fails_its_checksum_is_refused(tmp_path, monkeypatch):
    from importlib import resources

    data = tmp_path / "data"
    data.mkdir()
    real = resources.files("llmq.runtime.sources").joinpath("data")
    for name in ("mix.json", "mix-code.txt"):
        (data / name).write_bytes(real.joinpath(name).read_bytes())
    monkeypatch.setattr(text.resources, "files", lambda package: tmp_path)
    assert text._embedded("mix-code.txt", "mix.json").startswith(real.joinpath("mix-code.txt").read_text()[:100])
    (data / "mix-code.txt").write_bytes(real.joinpath("mix-code.txt").read_bytes() + b" ")
    with pytest.raises(TextSourceError, match="the embedded text mix-code.txt does not match its checksum"):
        text._embedded("mix-code.txt", "mix.json")
