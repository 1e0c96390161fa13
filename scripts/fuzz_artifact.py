"""Run the artifact reader fuzzer for longer than CI does, and record the counts.

    python scripts/fuzz_artifact.py --examples 2000 --out docs/data/fuzz.json

Runs ``tests/test_fuzz_artifact.py`` (through the pytest entry point of this environment) with
``LLMQ_FUZZ_EXAMPLES`` examples, not derandomized, and writes the outcome per mutation family
(refused with a clear error, accepted unchanged, accepted changed) plus the command, date and
wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report = args.out.with_suffix(".partial.json")
    env = {**os.environ, "LLMQ_FUZZ_EXAMPLES": str(args.examples), "LLMQ_FUZZ_REPORT": str(report.resolve())}
    pytest = Path(sys.executable).with_name("pytest")
    start = time.perf_counter()
    done = subprocess.run([str(pytest), "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_fuzz_artifact.py")],
                          env=env, cwd=ROOT)  # fmt: skip
    seconds = time.perf_counter() - start
    document = json.loads(report.read_text())
    report.unlink()
    document |= {
        "command": f"python scripts/fuzz_artifact.py --examples {args.examples} --out {args.out}",
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(seconds, 1),
        "pytest_exit": done.returncode,
    }
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(json.dumps({k: document[k] for k in ("examples", "seconds", "pytest_exit")}))
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
