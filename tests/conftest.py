"""Shared fixtures: a tiny random Llama with a real BPE tokenizer, and an in-process CLI runner.

The tiny model is built from a transformers config (no download) so most tests run in
milliseconds; tests marked ``slow`` use the real demo model, built once per session into a
temporary cache directory.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester"]  # runs a pytest of its own: test_packaging's time-limit test

TINY_CONTEXT = 128


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliResult:
    """Run ``llmq ARGS`` in this process through the real entry point, exit-code mapping included."""
    from llmq.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _argv(["llmq", *args]):
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _argv(argv: list[str]):
    import sys

    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """Every test gets its own llmq cache and an offline HF hub with an empty cache."""
    hf_home = tmp_path_factory.mktemp("hf-home")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("LLMQ_DEBUG", raising=False)
    monkeypatch.setenv("LLMQ_CACHE_DIR", str(tmp_path_factory.mktemp("llmq-cache")))


def _train_tokenizer(texts: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_tiny_model(
    folder: Path,
    *,
    seed: int = 0,
    chat_template: str | None = None,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    tie_embeddings: bool = False,
) -> Path:
    """A 2-layer random Llama (hidden 64 unless told) with a 400-token BPE vocabulary, saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmq.runtime.sources.text import Dataset, Split, load_text

    sample = load_text(Dataset.austen, None, Split.calib).text[:200_000]
    tokenizer = _train_tokenizer([sample])
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=TINY_CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_embeddings,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-chat"), chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model, tmp_path_factory) -> Path:
    """The tiny model quantized once per session (default preset, g4 16, round-to-nearest); read-only."""
    out = tmp_path_factory.mktemp("tiny-artifact") / "tiny.llmq"
    result = run_cli("quantize", str(tiny_model), "-o", str(out), "--g4", "16", "--no-calib", "-q")
    assert result.code == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """A cache directory holding the demo model, converted once for the whole session."""
    return tmp_path_factory.mktemp("demo-cache")


@pytest.fixture(scope="session")
def demo_artifact_path() -> Path:
    """The demo artifact that ``scripts/demo.sh`` builds, or ``$LLMQ_DEMO_ARTIFACT``.

    GPU machines cannot build it (they have no ``gguf`` package and no network), so it has to
    be built on a CPU machine and brought along; a missing artifact fails the test, it does not skip.
    """
    default = Path(__file__).resolve().parents[1] / ".llmq-demo" / "demo.llmq"
    path = Path(os.environ.get("LLMQ_DEMO_ARTIFACT", default))
    if not (path / "manifest.json").is_file():
        pytest.fail(
            f"no demo artifact at {path}: build it with `bash scripts/demo.sh` on a CPU machine and copy "
            ".llmq-demo/demo.llmq here, or set LLMQ_DEMO_ARTIFACT"
        )
    return path


@pytest.fixture
def children():
    """Start ``llmq`` children with SIGINT set as asked (not inherited: a test run from a background
    job would hand them an ignored SIGINT); every one is killed when the test ends, pass or fail."""
    started: list[subprocess.Popen] = []

    def start(*args: str, sigint=signal.SIG_DFL, env: dict | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmq.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )  # fmt: skip
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


def interrupt_shard_writes(monkeypatch, shards: int) -> None:
    """Make the artifact writer raise KeyboardInterrupt (a simulated Ctrl-C) after ``shards`` shards."""
    from llmq.quant import writer as W

    real = W.ArtifactWriter.write_shard
    calls = {"n": 0}

    def write_shard(self, index, tensors):
        calls["n"] += 1
        if calls["n"] > shards:
            raise KeyboardInterrupt("simulated Ctrl-C")
        return real(self, index, tensors)

    monkeypatch.setattr(W.ArtifactWriter, "write_shard", write_shard)
