"""Benchmark scripts that decide defaults: their records hold what the decision needs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_texts_split_names_committed_files_with_their_hashes():
    split = json.loads((ROOT / "docs" / "data" / "texts.json").read_text())
    assert set(split) == {"rule", "dev", "test"} and len(split["test"]) >= 2
    assert not set(split["dev"]) & set(split["test"])
    for entry in [*split["dev"].values(), *split["test"].values()]:
        if "path" in entry:
            text = (ROOT / entry["path"]).read_text(encoding="utf-8")
            assert hashlib.sha256(text.encode("utf-8")).hexdigest() == entry["sha256"], entry["path"]
            assert entry["option"] == f"--text-file {entry['path']}"


def test_no_test_text_module_is_in_the_calibration_mix():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from build_calib_mix import CODE_MODULES
        from build_eval_texts import TEST_CODE_MODULES
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert not set(TEST_CODE_MODULES) & set(CODE_MODULES)
    code = (ROOT / "docs" / "data" / "test-code.txt").read_text(encoding="utf-8")
    assert code.startswith(f"# {TEST_CODE_MODULES[0]}.py\n")


def test_bench_refine_steps_records_every_seed_and_step_count(tiny_model, tmp_path):
    out = tmp_path / "steps.json"
    run = ["--model", str(tiny_model), "--samples", "6", "--calib-seq-len", "32", "--steps", "2,1", "--seeds", "0,1",
           "--max-tokens", "128", "--seq-len", "64"]  # fmt: skip
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_refine_steps.py"), "--out", str(out), *run],
                   check=True, capture_output=True, text=True)  # fmt: skip
    record = json.loads(out.read_text())
    assert record["commit"] and record["cpu"] and record["date"]
    assert sorted((p["seed"], p["refine_steps"]) for p in record["points"]) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    names = set(record["texts"]["dev"]) | set(record["texts"]["test"])
    for point in record["points"]:
        assert set(point["ratio"]) == names and all(r > 0 for r in point["ratio"].values())
        assert point["quantize"]["stages_seconds"]["refine"] > 0
    summary = record["summary"]["2"]["ratio"]["persuasion"]
    ratios = [p["ratio"]["persuasion"] for p in record["points"] if p["refine_steps"] == 2]
    assert summary["n"] == 2 and summary["min"] == min(ratios) and summary["max"] == max(ratios)
