#!/usr/bin/env python3
"""How long each long command takes to stop after SIGTERM (or Ctrl-C), on the demo model.

    python scripts/stop_latency.py --out docs/data/stop_latency.json            # idle, then loaded
    python scripts/stop_latency.py --out docs/data/stop_latency.json --load 0   # idle only
    python scripts/stop_latency.py --out default_path.json --only "quantize default, calibrate" ...

Each command is started as a child with SIGINT at its default, the script waits for a line the
command prints once its main loop is under way (or for its first shard, for quantize), sends the
signal, and times until the process has exited: the stop latency a user or a scheduler sees. It
checks the exit code (130) and that nothing partial is left where the output would go. "Loaded"
runs the same with ``--load`` CPU-bound processes (a busy Python loop each) beside it; 2 on a
2-core machine is the issue's condition.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import command_line, provenance

# command -> (arguments with OUT for a scratch folder, the stderr text that says the loop is running)
COMMANDS = {
    "calibrate": (["calibrate", "demo", "-o", "OUT/demo.stats", "--dataset", "austen", "--force"], "calibration:"),
    "quantize": (["quantize", "demo", "-o", "OUT/demo.llmq", "--no-calib"], None),  # waits for a shard instead
    "eval ppl": (["eval", "ppl", "demo", "--dataset", "austen"], "running "),
    "eval kld": (["eval", "kld", "OUT/a.llmq", "--base", "demo", "--dataset", "austen"], "running "),
    "generate": (
        ["generate", "demo", "-p", "Once upon a time", "--max-new-tokens", "8000", "--temperature", "1"],
        "STDOUT",
    ),  # fmt: skip
    "profile": (["profile", "demo", "--reps", "100000", "--breakdown-steps", "0"], "timing model"),
    "verify": (["verify", "OUT/a.llmq"], "DECODING"),  # prints nothing before its result
}
# The same run as "profile", signalled 3 s after the marker (DELAY): "profile" is stopped as its
# timed rounds begin, this one while they run, so it shows how long the round under way takes to
# reach its next check.
COMMANDS["profile, mid-rounds"] = COMMANDS["profile"]
DELAY = {"profile, mid-rounds": 3.0}
# The default quantize path, signalled as each of its phases begins (the log line that ends the one
# before). 16 windows of the default 512 tokens and 4 refinement steps: a window, a layer and a step
# cost what the default's do, and the later phases are reached in minutes.
DEFAULT_PATH = ["quantize", "demo", "-o", "OUT/demo.llmq", "--samples", "16", "--refine-steps", "4"]
PHASE_BEGINS = {"calibrate": "calibration:", "fisher": "calibrate: ", "plan": "fisher: ", "gptq": "plan: ",
                "refine": "quantize: "}  # fmt: skip
COMMANDS.update({f"quantize default, {phase}": (DEFAULT_PATH, line) for phase, line in PHASE_BEGINS.items()})


def _busy() -> None:
    while True:
        pass


def _child(args: list[str], scratch: Path) -> subprocess.Popen:
    argv = [a.replace("OUT", str(scratch)) for a in args]
    return subprocess.Popen(
        [sys.executable, "-m", "llmq.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def _bytes_read(pid: int) -> int:
    """Bytes the process has read so far (``rchar`` in Linux's ``/proc/PID/io``)."""
    io = Path(f"/proc/{pid}/io").read_text().splitlines()
    return int(next(line for line in io if line.startswith("rchar:")).split()[1])


def _wait_until_running(proc: subprocess.Popen, marker: str | None, scratch: Path) -> None:
    if marker == "STDOUT":
        assert proc.stdout.read(1), "generate printed nothing"
    elif marker == "DECODING":  # verify read every file once for the checksums: now it decodes the shards
        checksummed = sum(p.stat().st_size for p in (scratch / "a.llmq").iterdir())
        while _bytes_read(proc.pid) < checksummed:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.01)
    elif marker is None:
        while not list(scratch.glob(".demo.llmq.partial-*/shard-*.safetensors")):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
    else:
        for line in proc.stderr:
            if marker in line:
                return
        raise AssertionError(f"ended without printing {marker!r}: {proc.communicate()}")


def measure(name: str, scratch: Path, sig: int) -> dict:
    args, marker = COMMANDS[name]
    before = sorted(p.name for p in scratch.iterdir())
    proc = _child(args, scratch)
    try:
        _wait_until_running(proc, marker, scratch)
        time.sleep(DELAY.get(name, 0.0))
        assert proc.poll() is None, proc.communicate()
        sent = time.perf_counter()
        proc.send_signal(sig)
        _, stderr = proc.communicate()
        latency = time.perf_counter() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    left = sorted(p.name for p in scratch.iterdir() if p.name not in before)
    # quantize keeps its finished layers for --resume in a hidden checkpoint folder, by design
    partial = [n for n in left if not n.startswith(".demo.llmq.partial-stopped-")]
    for leftover in left:
        path = scratch / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    message = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return {"command": name, "signal": signal.Signals(sig).name, "seconds": round(latency, 3),
            "exit_code": proc.returncode, "left_behind": partial, "message": message}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--load", type=int, default=2, help="CPU-bound processes beside the loaded runs (0: none)")
    parser.add_argument("--only", nargs="+", choices=list(COMMANDS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        subprocess.run([sys.executable, "-m", "llmq.cli", "quantize", "demo", "-o", str(scratch / "a.llmq"),
                        "--no-calib", "--preset", "4bit", "-q"], check=True)  # fmt: skip
        for loaded in [False] + ([True] if args.load else []):
            burners = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(args.load if loaded else 0)]
            for b in burners:
                b.start()
            try:
                for name in args.only or COMMANDS:
                    for sig in (signal.SIGTERM, signal.SIGINT):
                        row = measure(name, scratch, sig) | {"load": len(burners)}
                        print(json.dumps(row), file=sys.stderr)
                        rows.append(row)
            finally:
                for b in burners:
                    b.terminate()
    record = {**provenance(command_line()),
              "model": "demo (SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF)",
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
              "rows": rows}  # fmt: skip
    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
