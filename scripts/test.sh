#!/usr/bin/env bash
# The test suite, including the slow real-model tests; GPU tests skip themselves without a GPU.
# Extra arguments go to pytest (e.g. `-m "not slow"` for a quick run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
set +e
# The pytest entry point, not `python -m pytest`: `-m` puts the repo root on sys.path, and then the
# repo's cuda/ folder (llmq.cuda) shadows NVIDIA's top-level `cuda` package that CuPy imports.
"${LLMQ_VENV:-.venv}/bin/pytest" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    # pytest's "no tests collected": only possible when the arguments select nothing.
    echo "test.sh: no tests matched the given selection" >&2
    exit 0
fi
exit "$rc"
