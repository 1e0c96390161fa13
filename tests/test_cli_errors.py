"""Bad input: a clear one-line error, the right exit code, nothing on stdout, nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llmq.runtime.sources import text as text_module

from conftest import TINY_CONTEXT


def _assert_error(result, code: int, *fragments: str) -> None:
    assert result.code == code, (result.code, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_missing_model_path(cli, workdir):
    for command in (["eval", "ppl"], ["generate", "-p", "hi"]):
        _assert_error(cli(*command, "./no-such-model"), 1, "model path './no-such-model' does not exist")
    cache = Path(os.environ["LLMQ_CACHE_DIR"])
    assert _tree(workdir) == set() and _tree(cache) == set()


def test_hub_id_offline_says_hub_unreachable_and_how_to_use_a_folder(cli, workdir):
    result = cli("eval", "ppl", "some-org/some-model", "--dataset", "austen")
    _assert_error(result, 1, "could not reach the Hugging Face hub", "some-org/some-model", "local folder")
    assert _tree(workdir) == set()


def test_folder_without_config(cli, workdir):
    (workdir / "empty").mkdir()
    _assert_error(cli("eval", "ppl", str(workdir / "empty")), 1, "no config.json")


def test_folder_with_only_pickle_weights_is_refused(cli, workdir, tiny_model):
    folder = workdir / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    _assert_error(cli("generate", str(folder), "-p", "x"), 1, "pytorch_model.bin", "does not load pickle")


def test_folder_that_is_not_a_causal_lm(cli, workdir):
    from transformers import ViTConfig

    folder = workdir / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(folder)
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    _assert_error(cli("eval", "ppl", str(folder), "--dataset", "austen"), 1, "is not a causal language model", "'vit'")


def test_remote_code_needs_the_flag(cli, workdir, tiny_model):
    folder = workdir / "remote"
    folder.mkdir()
    config = json.loads((tiny_model / "config.json").read_text())
    config["model_type"] = "my-custom-lm"  # unknown to transformers: only the folder's code could build it
    config["auto_map"] = {"AutoConfig": "custom.MyConfig", "AutoModelForCausalLM": "custom.MyModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text("raise SystemExit('this code must never run')\n")
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    _assert_error(cli("eval", "ppl", str(folder), "--dataset", "austen"), 1, "--trust-remote-code")


@pytest.mark.parametrize("content", [None, "", "  \n\n"])
def test_missing_or_empty_text_file(cli, workdir, tiny_model, content):
    path = workdir / "text.txt"
    if content is not None:
        path.write_text(content)
    expected = "does not exist" if content is None else "is empty"
    _assert_error(cli("eval", "ppl", str(tiny_model), "--text-file", str(path)), 1, f"text file {path} {expected}")


def test_bad_text_fails_before_the_demo_model_is_built(cli, workdir):
    _assert_error(cli("eval", "ppl", "demo", "--text-file", "missing.txt"), 1, "does not exist")
    cache = Path(os.environ["LLMQ_CACHE_DIR"])
    assert _tree(workdir) == set() and _tree(cache) == set()


def test_text_shorter_than_one_window_names_both_counts(cli, workdir, tiny_model):
    path = workdir / "short.txt"
    path.write_text("It is a truth universally acknowledged.")
    result = cli("eval", "ppl", str(tiny_model), "--text-file", str(path), "--seq-len", "64")
    _assert_error(result, 1, "one window needs 64")
    assert "tokens" in result.stderr and "has " in result.stderr


@pytest.mark.parametrize("value", ["0", "-5", "1"])
def test_seq_len_too_small_is_a_usage_error(cli, tiny_model, value):
    result = cli("eval", "ppl", str(tiny_model), "--dataset", "austen", "--seq-len", value)
    assert result.code == 2 and result.stdout == ""
    assert "--seq-len" in result.stderr


def test_seq_len_over_context_is_a_usage_error(cli, tiny_model):
    result = cli("eval", "ppl", str(tiny_model), "--dataset", "austen", "--seq-len", str(TINY_CONTEXT + 1))
    _assert_error(result, 2, f"--seq-len {TINY_CONTEXT + 1} is longer than the model's context of {TINY_CONTEXT}")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--seq-len", "64", "--stride", "65"], "--stride 65 must be between 1 and --seq-len (64)"),
        (["--seq-len", "64", "--max-tokens", "32"], "--max-tokens 32 is less than one window"),
    ],
)
def test_protocol_ranges_are_usage_errors(cli, tiny_model, args, fragment):
    _assert_error(cli("eval", "ppl", str(tiny_model), "--dataset", "austen", *args), 2, fragment)


def test_dataset_and_text_file_together_is_a_usage_error(cli, workdir, tiny_model):
    path = workdir / "t.txt"
    path.write_text("words " * 100)
    _assert_error(cli("eval", "ppl", str(tiny_model), "--dataset", "austen", "--text-file", str(path)), 2, "not both")


def test_sampling_options_without_temperature_are_usage_errors(cli, tiny_model):
    _assert_error(cli("generate", str(tiny_model), "-p", "hi", "--top-p", "0.9"), 2, "only apply when sampling")


def test_generate_without_prompt_is_a_usage_error(cli, tiny_model):
    _assert_error(cli("generate", str(tiny_model)), 2, "--prompt")


def test_prompt_errors_come_before_the_demo_model_is_built(cli):
    _assert_error(cli("generate", "demo", "-p", ""), 2, "the prompt is empty")
    _assert_error(cli("generate", "demo", "-p", "hi", "--system", "x"), 2, "--system only applies with --chat")
    cache = Path(os.environ["LLMQ_CACHE_DIR"])
    assert _tree(cache) == set()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_an_error_not_a_fallback(cli, tiny_model):
    _assert_error(cli("generate", str(tiny_model), "-p", "hi", "--device", "cuda"), 1, "no CUDA GPU is visible")


def test_debug_env_shows_the_traceback(cli, monkeypatch):
    monkeypatch.setenv("LLMQ_DEBUG", "1")
    result = cli("eval", "ppl", "./missing")
    assert result.code == 1 and "Traceback" in result.stderr and "does not exist" in result.stderr


def test_unknown_option_is_exit_2(cli):
    assert cli("eval", "ppl", "demo", "--no-such-flag").code == 2


def test_an_offline_hub_id_fails_on_the_hub_before_any_text_is_fetched(cli, workdir, monkeypatch):
    """wikitext2 (the default text) would be fetched through `datasets`; the model is resolved first."""
    import time

    fetched = []
    monkeypatch.setattr(text_module, "_load_wikitext2", lambda split: fetched.append(split))
    start = time.perf_counter()
    result = cli("eval", "ppl", "some-org/some-model")
    _assert_error(result, 1, "could not reach the Hugging Face hub")
    assert fetched == [] and time.perf_counter() - start < 10
