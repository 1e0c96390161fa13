"""The CI script in docs/ci.md, run as written on the demo model: it passes with a sensible
threshold, and exits with the gate's code (3) when the perplexity ratio bar is set to 1.0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmq.runtime.eval.gates import GATE_FAILED

DOC = Path(__file__).resolve().parents[1] / "docs" / "ci.md"
# 4-bit round-to-nearest keeps the run short (the quantize step takes about a minute here); the
# script's commands are the same with any quantize options. Measured with these options: ppl
# ratio 1.26, mean KL 0.33, top-1 agreement 0.64, so the bars below pass with room.
QUANTIZE = "--preset 4bit --no-calib"
EVAL = "--dataset austen --seq-len 512 --max-tokens 4096"


def _script() -> str:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, "docs/ci.md should hold exactly one bash block: the script"
    return blocks[0]


def _run(tmp_path: Path, max_ratio: str) -> subprocess.CompletedProcess:
    script = tmp_path / "ci.sh"
    script.write_text(_script())
    env = {
        **os.environ, "LLMQ": str(Path(sys.executable).with_name("llmq")), "MODEL": "demo",
        "OUT": str(tmp_path / "demo.llmq"), "MAX_RATIO": max_ratio, "MAX_KL": "0.5", "MIN_TOP1": "0.55",
        "QUANTIZE_OPTIONS": QUANTIZE, "EVAL_OPTIONS": EVAL, "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
    }  # fmt: skip
    # its own process group, so the llmq commands it starts go with it if the test fails or times out
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=1800)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.timeout(2 * 1800 + 300)  # two runs of the script, each given up to 1800 s below
def test_the_ci_script_passes_then_fails_with_the_gate_code(tmp_path):
    passed = _run(tmp_path, "1.5")
    assert passed.returncode == 0, passed.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "## llmq: demo" in summary and "| ppl_ratio |" in summary and "| kl_mean |" in summary
    assert "**FAIL**" not in summary
    assert "gate passed: ppl_ratio" in passed.stderr
    failed = _run(tmp_path, "1.0")
    assert failed.returncode == GATE_FAILED, failed.stderr[-3000:]
    assert re.search(r"gate FAILED: ppl_ratio [\d.]+, required <= 1 \(--max-ratio\); margin -", failed.stderr)
    # the original model's results came from the cache the first run wrote
    assert "baseline (cached)" in (tmp_path / "summary.md").read_text()
    assert "gate passed: kl_mean" in failed.stderr  # the other gates still ran and passed
