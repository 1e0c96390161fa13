"""Choosing the backend: auto falls back with a notice, an explicit cuda never falls back."""

from __future__ import annotations

import json

import pytest
import torch

from llmq.errors import DeviceError
from llmq.runtime.backend import Backend, resolve_backend


def test_auto_on_a_cpu_picks_torch_and_says_why():
    backend, notice = resolve_backend(Backend.auto, torch.device("cpu"), torch.float32)
    assert backend == Backend.torch
    assert notice.startswith("backend: torch") and "cpu" in notice


def test_auto_keeps_the_torch_path_on_a_gpu_until_the_kernels_are_verified(monkeypatch):
    from llmq.runtime import backend, cuda_backend

    monkeypatch.setattr(cuda_backend, "cuda_unavailable_reason", lambda device, dtype: None)  # a working GPU
    chosen, notice = resolve_backend(Backend.auto, torch.device("cuda"), torch.float16)
    assert chosen == Backend.torch and "not been verified on a GPU" in notice
    assert resolve_backend(Backend.cuda, torch.device("cuda"), torch.float16) == (Backend.cuda, None)
    monkeypatch.setattr(backend, "KERNELS_VERIFIED", True)
    assert resolve_backend(Backend.auto, torch.device("cuda"), torch.float16) == (Backend.cuda, None)


def test_explicit_cuda_without_a_gpu_is_an_error_not_a_fallback():
    with pytest.raises(DeviceError, match="--backend cuda cannot run here.*use --backend torch"):
        resolve_backend(Backend.cuda, torch.device("cpu"), torch.float32)


def test_torch_is_always_available():
    assert resolve_backend(Backend.torch, torch.device("cpu"), torch.bfloat16) == (Backend.torch, None)


def test_cli_reports_the_backend_and_the_notice(cli, tiny_artifact):
    result = cli("generate", str(tiny_artifact), "-p", "hello", "-n", "2", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["backend"] == "torch"
    assert "backend: torch (exact reference decoder), because the device is cpu" in result.stderr
    quiet = cli("generate", str(tiny_artifact), "-p", "hello", "-n", "2", "--backend", "torch", "--json")
    assert "backend:" not in quiet.stderr


def test_cli_backend_cuda_on_a_cpu_exits_1(cli, tiny_artifact):
    result = cli("eval", "ppl", str(tiny_artifact), "--dataset", "austen", "--max-tokens", "64", "--seq-len", "32",
                 "--backend", "cuda")  # fmt: skip
    assert result.code == 1
    assert "--backend cuda cannot run here" in result.stderr


def test_cli_backend_cuda_on_a_plain_model_is_a_usage_error(cli, tiny_model):
    result = cli("generate", str(tiny_model), "-p", "hi", "-n", "1", "--backend", "cuda")
    assert result.code == 2
    assert "applies to llmq artifacts" in result.stderr


def test_a_plain_model_has_no_backend_in_json(cli, tiny_model):
    result = cli("generate", str(tiny_model), "-p", "hi", "-n", "1", "--json")
    assert json.loads(result.stdout)["backend"] is None


def test_the_torch_backend_keeps_a_dense_weight_and_says_so(tiny_artifact):
    from llmq.runtime.loader import load_model
    from llmq.runtime.qlinear import QuantLinear
    from llmq.runtime.sources import models

    source = models.resolve_model(str(tiny_artifact), progress=False)
    lm = load_model(source, models.load_config(source), torch.device("cpu"), torch.float32)
    layers = [m for m in lm.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.backend == "torch" and m.weight.numel() > 0 for m in layers)
    assert "backend=torch" in repr(layers[0])
