#!/usr/bin/env bash
# The test suite, including the slow real-model tests; GPU tests skip themselves without a GPU.
# Extra arguments go to pytest (e.g. `-m "not slow"` for a quick run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
set +e
"${LLMQ_VENV:-.venv}/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    # pytest's "no tests collected": only possible when the arguments select nothing.
    echo "test.sh: no tests matched the given selection" >&2
    exit 0
fi
exit "$rc"
