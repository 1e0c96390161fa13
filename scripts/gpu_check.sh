#!/usr/bin/env bash
# Everything llmq needs checked on a GPU, in one run, with results written to OUT_DIR:
#
#   scripts/gpu_check.sh OUT_DIR
#
#   1. install llmq into the present environment with --no-deps (the GPU image has torch,
#      CuPy, transformers, ...; it has no network and no `datasets`);
#   2. `pytest -m gpu`: every kernel path against the fp32 reference (NaN-poisoned outputs,
#      two runs bit-identical), the demo artifact's first 32 greedy tokens on both backends,
#      GPTQ and rounding on the GPU (junit XML and log);
#   3. scripts/bench_kernels.py: GEMV/GEMM/dequant paths against torch.matmul fp16 for the
#      Llama-2-7B shapes at batch 1, 4, 16, 64 (kernels.json);
#   4. scripts/bench_e2e.py: a random-weight Llama-2-7B-shaped model generated, quantized and
#      profiled here, decode tokens/s against fp16 (e2e.json); then the same artifact profiled
#      with the static KV cache and the decode step as a CUDA graph (e2e-graph.json);
#   5. scripts/bench_quantize_layer.py: one decoder layer of Llama-2-7B's shape and one of a
#      70B's quantized on the GPU by the default path (calibration, Fisher, GPTQ, refinement),
#      timed, with the whole models' times projected (quantize_layers.json).
#
#   scripts/gpu_check.sh OUT_DIR STEP...   runs only the named steps (e.g. quantize_layers);
#                                          environment and install always run
#
# Each step's exit code and time go to OUT_DIR/summary.json; a failing step does not stop the
# later ones, and the script exits non-zero if any step failed. Budget: the step timeouts add
# up to 12.2 minutes as a hard ceiling, above the device tool's 10 minutes a command: with
# timeout_s 600 the last step may be cut (each shape's record is written as it finishes), or
# run it alone afterwards. The expected total on an H100 is about 7 minutes (an estimate: this
# script has not run on a GPU yet). The demo artifact must be present at
# .llmq-demo/demo.llmq (or $LLMQ_DEMO_ARTIFACT): build it with `bash scripts/demo.sh` on a CPU
# machine, since the GPU image cannot (no gguf package, no network).
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR [STEP...]}
shift
ONLY=" $* "
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python}
WORK=${LLMQ_GPU_WORK:-${TMPDIR:-/tmp}/llmq-gpu-check}
SUMMARY="$OUT/summary.json"
echo "[" > "$SUMMARY"
failed=0
first=1

step() {  # step NAME TIMEOUT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    case "$name" in environment|install) ;; *) [ "$ONLY" = "  " ] || [[ "$ONLY" == *" $name "* ]] || return 0 ;; esac
    echo "[gpu_check $(date -u +%H:%M:%S)] $name: $*" | tee -a "$OUT/gpu_check.log"
    local start rc
    start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local seconds=$(( $(date +%s) - start ))
    echo "[gpu_check $(date -u +%H:%M:%S)] $name: exit $rc after ${seconds}s" | tee -a "$OUT/gpu_check.log"
    tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/gpu_check.log"
    [ $first -eq 1 ] || echo "," >> "$SUMMARY"
    first=0
    printf '  {"step": "%s", "exit": %d, "seconds": %d, "log": "%s.log"}' "$name" "$rc" "$seconds" "$name" >> "$SUMMARY"
    [ "$rc" -eq 0 ] || failed=1
    return 0
}

step environment 20 bash -c "nvidia-smi; $PYTHON -P -c 'import torch, cupy, transformers; print(torch.__version__, torch.version.cuda, cupy.__version__, transformers.__version__, torch.cuda.get_device_name())'"
step install 60 "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
# The pytest entry point, not `python -m pytest`: -m puts the repo root on sys.path, where the
# root's cuda/ folder would shadow NVIDIA's `cuda` package that CuPy imports.
PYTEST=$(dirname "$(command -v "$PYTHON")")/pytest
[ -x "$PYTEST" ] || PYTEST=pytest
# Only the files that hold gpu tests: the others import hypothesis and gguf, which the GPU image
# lacks, and a collection error would stop the whole run (tests/test_gpu_scripts.py checks these
# files import without them).
GPU_TEST_FILES=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
step pytest_gpu 120 "$PYTEST" -m gpu -q -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" $GPU_TEST_FILES
step bench_kernels 90 "$PYTHON" scripts/bench_kernels.py --out "$OUT/kernels.json"
step bench_e2e 210 "$PYTHON" scripts/bench_e2e.py --work "$WORK" --out "$OUT/e2e.json"
step bench_e2e_graph 80 "$PYTHON" scripts/bench_e2e.py --work "$WORK" --out "$OUT/e2e-graph.json" --reuse --decode graph
rm -rf "$WORK"
step quantize_layers 150 "$PYTHON" scripts/bench_quantize_layer.py --work "$WORK-layers" --device cuda \
    --out "$OUT/quantize_layers.json"
echo "" >> "$SUMMARY"
echo "]" >> "$SUMMARY"
echo "[gpu_check] results in $OUT (summary.json); any step failed: $failed" | tee -a "$OUT/gpu_check.log"
exit $failed
