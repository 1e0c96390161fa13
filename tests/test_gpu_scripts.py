"""The GPU check's scripts work end to end at a size a CPU can run, so the GPU run is not their first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_e2e_builds_quantizes_and_profiles_a_small_random_llama(tmp_path):
    out = tmp_path / "e2e.json"
    tiny = ["--hidden", "64", "--intermediate", "128", "--heads", "4", "--vocab", "256", "--layers", "2"]
    run = ["--prompt-len", "8", "--gen-len", "2", "--reps", "2", "--batches", "1,3"]
    script = str(ROOT / "scripts" / "bench_e2e.py")
    subprocess.run(
        [sys.executable, script, "--work", str(tmp_path), "--out", str(out), *tiny, *run],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    doc = json.loads(out.read_text())
    assert doc["model"]["config"]["num_hidden_layers"] == 2 and doc["quantize_seconds"] > 0
    assert [s["batch"] for s in doc["profile"]["speedup"]] == [1, 3]
    assert [r["label"] for r in doc["profile"]["runs"]] == ["llmq", "dense baseline"]
    assert not (tmp_path / "random-llama").exists()  # the fp16 folder is removed unless --keep
    assert (tmp_path / "random-llama.llmq" / "manifest.json").is_file()


def test_bench_e2e_refuses_a_7b_model_on_a_cpu(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_e2e.py"), "--work", str(tmp_path), "--out", str(tmp_path / "x")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode != 0 and "no CUDA GPU here" in done.stderr
    assert not any(tmp_path.iterdir())


def test_bench_kernels_table_from_a_recorded_row():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_kernels
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    path = {"seconds": 2e-6, "gbps": 3000.0, "speedup_vs_fp16": 5.0, "rel_error": 2e-4}
    row = {"n": 4096, "k": 4096, "batch": 1, "torch_fp16": {"seconds": 1e-5}, "paths": {"gemv": path, "auto": path}}
    table = bench_kernels.markdown([row], copy_gbps=3000.0)
    assert "| 4096x4096 | 1 | 10.0 | 2.0 | 5.00x | 3000 (100%) | 2.0 | — | — | 2.0e-04 |" in table


def test_gpu_check_script_is_valid_bash_and_uses_the_pytest_entry_point():
    script = ROOT / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "-m pytest" not in text.replace("`python -m pytest`", "")
    assert '"$PYTEST" -m gpu' in text


def test_the_gpu_test_files_import_without_what_the_gpu_image_lacks():
    """The GPU image has no hypothesis, gguf, datasets or rdata: the files gpu_check.sh runs must not need them."""
    files = sorted(p.stem for p in (ROOT / "tests").glob("test_*.py") if "pytest.mark.gpu" in p.read_text())
    assert {"test_cuda_kernels", "test_gptq", "test_decode"} <= set(files)
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'hypothesis', 'gguf', 'datasets', 'rdata'}:\n"
        "            raise ImportError(f'{name} is not on the GPU image')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "import conftest\n"
        f"for name in {files!r}:\n"
        "    __import__(name)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_bench_quantize_layer_quantizes_a_slice_and_projects_the_whole_model(tmp_path):
    out, work = tmp_path / "layers.json", tmp_path / "work"
    script = str(ROOT / "scripts" / "bench_quantize_layer.py")
    run = ["--shapes", "tiny", "--layers", "2", "--samples", "4", "--seq-len", "32", "--refine-steps", "2"]
    subprocess.run([sys.executable, script, "--work", str(work), "--out", str(out), "--device", "cpu", *run],
                   check=True, capture_output=True, text=True)  # fmt: skip
    (point,) = json.loads(out.read_text())["points"]
    assert point["shape"] == "tiny" and point["layers"] == 2 and point["peak_gpu_allocated_bytes"] is None
    assert (
        set(point["stages_seconds"]) == {"calibrate", "fisher", "plan", "quantize", "refine"}
        and point["peak_rss_bytes"] > 0
    )
    assert set(point["stages_peak_rss_mb"]) == set(point["stages_seconds"])
    assert point["forecast"]["command"].startswith("llmq quantize MODEL -o OUT --dry-run --samples 4")
    assert set(point["forecast"]["phases"]) >= {"calibrate", "quantize", "refine"} and point["forecast"]["seconds"] >= 0
    whole = point["estimate_whole_model"]
    assert whole["what"].startswith("an estimate") and whole["layers"] == 2
    assert whole["stages_seconds"]["refine"] == round(point["stages_seconds"]["refine"], 1)  # 2 of 2 layers
    assert not work.exists()  # the fp16 folders and artifacts are removed


def test_bench_quantize_layer_rtn_measures_refinement_without_calibration(tmp_path):
    out, work = tmp_path / "refine.json", tmp_path / "work"
    script = str(ROOT / "scripts" / "bench_quantize_layer.py")
    run = ["--shapes", "tiny", "--samples", "4", "--seq-len", "32", "--refine-steps", "2", "--rtn"]
    subprocess.run([sys.executable, script, "--work", str(work), "--out", str(out), "--device", "cpu", *run],
                   check=True, capture_output=True, text=True)  # fmt: skip
    (point,) = json.loads(out.read_text())["points"]
    assert point["rtn"] and set(point["stages_seconds"]) == {"plan", "quantize", "refine"}
    assert set(point["stages_peak_rss_mb"]) == set(point["stages_seconds"]) and "refine" in point["forecast"]["phases"]


def test_gpu_check_runs_only_the_steps_named(tmp_path):
    """``gpu_check.sh OUT STEP...`` (a second device command within the 10-minute limit): the named
    steps and the two it always needs; commands stubbed by PYTHON=echo, so nothing heavy runs."""
    subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path), "quantize_layers"],
                   env={"PATH": "/usr/bin:/bin", "PYTHON": "echo"}, capture_output=True, text=True)  # fmt: skip
    steps = [row["step"] for row in json.loads((tmp_path / "summary.json").read_text())]
    assert steps == ["environment", "install", "quantize_layers"]
    assert "bench_quantize_layer.py" in (tmp_path / "quantize_layers.log").read_text()
