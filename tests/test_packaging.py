"""The installed package: console script, version, and no heavy work at import."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import llmq


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_cli_import_loads_neither_torch_nor_datasets():
    loaded = json.loads(_python("import sys, llmq.cli; print(__import__('json').dumps(sorted(sys.modules)))"))
    assert "datasets" not in loaded and "torch" not in loaded and "transformers" not in loaded


def test_runtime_modules_do_not_import_datasets():
    modules = ", ".join(
        f"llmq.runtime.{m}" for m in ("sources.text", "eval.perplexity", "decode.generate", "sources.models", "loader")
    )
    code = f"import sys, {modules}; print('datasets' in sys.modules)"
    assert _python(code).strip() == "False"


def test_console_script_version_and_help():
    exe = shutil.which("llmq") or str(__import__("pathlib").Path(sys.executable).parent / "llmq")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"llmq {llmq.__version__}"
    help_text = subprocess.run([exe, "--help"], capture_output=True, text=True).stdout
    for word in ("generate", "eval", "quantize", "inspect", "calibrate", "profile", "demo", "Q4_1"):
        assert word in help_text
    assert "Planned" not in help_text  # every command is built
    usage = subprocess.run([exe, "profile"], capture_output=True, text=True)
    assert usage.returncode == 2 and "Missing argument" in usage.stderr


def test_json_stdout_is_pure_in_a_real_process(tiny_model):
    exe = str(__import__("pathlib").Path(sys.executable).parent / "llmq")
    proc = subprocess.run(
        [exe, "generate", str(tiny_model), "-p", "It was", "-n", "3", "--json"],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["new_tokens"] == 3 or json.loads(proc.stdout)["stop_reason"] == "eos"


def test_the_repo_cuda_folder_does_not_shadow_nvidia_cuda():
    """CuPy imports NVIDIA's top-level ``cuda`` package; llmq's kernels live in ``llmq.cuda`` only."""
    import importlib.util
    from pathlib import Path

    import llmq

    spec = importlib.util.find_spec("cuda")
    repo_cuda = (Path(llmq.__file__).parent / "cuda").resolve()
    found = [Path(p).resolve() for p in (spec.submodule_search_locations or [])] if spec else []
    assert repo_cuda not in found, "the repo root is on sys.path; run tests through the pytest entry point"


COMMANDS = (["quantize"], ["calibrate"], ["inspect"], ["verify"], ["generate"], ["profile"], ["eval", "ppl"],
            ["eval", "kld"], [])  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "llmq")
def test_help_shows_flags_without_a_value(cli, command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    result = cli(*command, "--help")
    assert result.code == 0 and "--help" in result.stdout
    assert "<bool>" not in result.stdout  # a flag takes no value; typer would print one


def test_help_keeps_text_that_looks_like_markup(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert "Hessian, E[x²])" in cli("calibrate", "--help").stdout


def test_every_model_loading_command_offers_the_same_loading_options(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    shared = ("--device ", "--device-map", "--max-memory", "--dtype", "--backend", "--seed", "--revision",
              "--trust-remote-code")  # fmt: skip
    for command in (["generate"], ["profile"], ["eval", "ppl"], ["eval", "kld"]):
        text = cli(*command, "--help").stdout
        assert [option for option in shared if option not in text] == [], command


def test_every_test_runs_under_a_time_limit(pytestconfig, request):
    """A hang fails one test (pytest-timeout, from the test extra) instead of holding CI to its end."""
    assert pytestconfig.pluginmanager.hasplugin("timeout"), "pytest-timeout is missing: bash scripts/setup.sh"
    assert float(pytestconfig.getini("timeout")) >= 600
    assert pytestconfig.getini("timeout_method") == "signal"  # the test fails, the run goes on
    assert request.node.get_closest_marker("timeout") is None  # this one has the suite's limit


def test_a_test_that_overruns_its_limit_fails(pytester):
    pytester.makepyfile("import time\n\ndef test_sleeps():\n    time.sleep(30)\n")
    result = pytester.runpytest_subprocess("-p", "timeout", "--timeout", "1", timeout=60)
    result.assert_outcomes(failed=1)
    assert "Timeout" in result.stdout.str()
