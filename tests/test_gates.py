"""Quality gates: eval ppl --max-ratio, eval kld --max-mean/--min-top1, profile --min-speedup.

A failed gate exits 3 (not 1, not 2) with one line naming the value, the threshold and the margin;
the JSON carries the gates and the verdict; the baseline's result can be cached.
"""

from __future__ import annotations

import json

import pytest

from llmq.runtime.eval.gates import GATE_FAILED, Gate

TEXT = ("--dataset", "austen", "--seq-len", "64", "--max-tokens", "512")


def test_a_gate_passes_inside_its_bar_and_fails_outside():
    assert Gate("ppl_ratio", "--max-ratio", 1.2, 1.5, at_most=True).passed
    assert Gate("ppl_ratio", "--max-ratio", 1.5, 1.5, at_most=True).passed  # the bar itself passes
    failed = Gate("ppl_ratio", "--max-ratio", 1.6, 1.5, at_most=True)
    assert not failed.passed and failed.margin == pytest.approx(-0.1)
    assert "FAILED" in failed.line() and "1.6000" in failed.line() and "1.5" in failed.line()
    assert "-0.1000" in failed.line()
    assert not Gate("top1_agreement", "--min-top1", 0.7, 0.8, at_most=False).passed
    assert not Gate("kl_mean", "--max-mean", float("nan"), 1.0, at_most=True).passed  # NaN never passes


def _ppl(cli, artifact, model, *options):
    result = cli("eval", "ppl", str(artifact), *TEXT, "--baseline", str(model), "--json", *options)
    return result, (json.loads(result.stdout) if result.stdout else None)


def test_ppl_ratio_gate_passes_fails_with_exit_3_and_caches_the_baseline(cli, tiny_artifact, tiny_model):
    result, doc = _ppl(cli, tiny_artifact, tiny_model, "--max-ratio", "1000", "--cache-baseline")
    assert result.code == 0, result.stderr
    alone = json.loads(cli("eval", "ppl", str(tiny_model), *TEXT, "--json").stdout)["result"]
    assert doc["baseline"]["result"]["ppl"] == pytest.approx(alone["ppl"], rel=1e-6)
    assert doc["baseline"]["cached"] is False
    assert doc["ppl_ratio"] == pytest.approx(doc["result"]["ppl"] / alone["ppl"])
    assert doc["verdict"] == "pass" and doc["gates"][0]["metric"] == "ppl_ratio"
    assert "gate passed: ppl_ratio" in result.stderr
    # just under the measured ratio: the same run fails, with the gate's own exit code
    bar = doc["ppl_ratio"] * 0.999
    failed, failed_doc = _ppl(cli, tiny_artifact, tiny_model, "--max-ratio", str(bar), "--cache-baseline")
    assert failed.code == GATE_FAILED, failed.stderr
    assert failed_doc["verdict"] == "fail" and failed_doc["gates"][0]["passed"] is False
    assert failed_doc["baseline"]["cached"] is True  # the second run read the baseline from the cache
    assert failed_doc["baseline"]["result"]["ppl"] == doc["baseline"]["result"]["ppl"]
    line = next(x for x in failed.stderr.splitlines() if x.startswith("gate FAILED"))
    assert f"{doc['ppl_ratio']:.4f}" in line and "--max-ratio" in line and "margin -" in line
    # another protocol is another cache key
    _, other = _ppl(cli, tiny_artifact, tiny_model, "--cache-baseline", "--stride", "32")
    assert other["baseline"]["cached"] is False


def test_markdown_output_carries_the_table_and_the_gates(cli, tiny_artifact, tiny_model):
    result = cli("eval", "ppl", str(tiny_artifact), *TEXT, "--baseline", str(tiny_model), "--md", "--max-ratio", "1000")
    assert result.code == 0, result.stderr
    assert "| model | role | perplexity |" in result.stdout
    assert "perplexity ratio, model / baseline" in result.stdout
    assert "| ppl_ratio |" in result.stdout and "| pass |" in result.stdout


@pytest.mark.parametrize(
    "options, message",
    [
        (("--max-ratio", "1.5"), "add --baseline MODEL"),
        (("--cache-baseline",), "add --baseline MODEL"),
        (("--max-ratio", "-1", "--baseline", "demo"), "--max-ratio -1.0 must be at least 0"),
        (("--json", "--md"), "give one"),
    ],
)
def test_gate_options_out_of_place_are_usage_errors(cli, tiny_artifact, options, message):
    result = cli("eval", "ppl", str(tiny_artifact), *TEXT, *options)
    assert result.code == 2 and message in result.stderr


def test_kld_gates(cli, tiny_artifact, tiny_model):
    base = ("eval", "kld", str(tiny_artifact), "--base", str(tiny_model), *TEXT, "--json")
    ok = cli(*base, "--max-mean", "100", "--min-top1", "0")
    assert ok.code == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["verdict"] == "pass" and [g["metric"] for g in doc["gates"]] == ["kl_mean", "top1_agreement"]
    failed = cli(*base, "--max-mean", "0")  # a quantized model is never exactly its base
    assert failed.code == GATE_FAILED and json.loads(failed.stdout)["verdict"] == "fail"
    assert "gate FAILED: kl_mean" in failed.stderr
    assert cli(*base, "--min-top1", "1.5").code == 2


def test_profile_speedup_gate(cli, tiny_artifact):
    base = ("profile", str(tiny_artifact), "--prompt-len", "8", "--gen-len", "2", "--reps", "1", "--warmup", "0",
            "--breakdown-steps", "0", "--json")  # fmt: skip
    assert cli(*base, "--min-speedup", "1.0").code == 2  # needs --baseline
    failed = cli(*base, "--baseline", "--min-speedup", "1000000")
    assert failed.code == GATE_FAILED, failed.stderr
    doc = json.loads(failed.stdout)
    assert doc["gates"][0]["metric"] == "decode_speedup_batch1"
    assert doc["gates"][0]["measured"] == pytest.approx(doc["speedup"][0]["decode"])
