"""llmq: range-aware mixed 2/4-bit quantization of HuggingFace causal LMs, and a runtime for it.

The Python API (``docs/api.md``) is importable from here and does what the ``llmq`` commands do::

    import llmq
    stats = llmq.calibrate("demo", "austen", samples=32)
    manifest = llmq.quantize("demo", "demo.llmq", calib=stats)
    report = llmq.perplexity("demo.llmq", "austen", max_tokens=4096)
    model = llmq.load("demo.llmq")            # a transformers model

Subpackages: ``llmq.cli`` (the ``llmq`` command), ``llmq.quant`` (quantize, offline),
``llmq.runtime`` (load and run), ``llmq.cuda`` (GPU kernels). Importing any of them, or this
package, does no work: each name below is imported when it is first used. The one thing
``import llmq`` sets up is transformers' registration of the ``llmq`` quantization method
(``llmq/hf.py``), which waits for transformers to be imported.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "calibrate": "llmq.quant.api",
    "quantize": "llmq.quant.api",
    "estimate": "llmq.quant.api",
    "CalibData": "llmq.quant.api",
    "QuantizeEstimate": "llmq.quant.api",
    "QuantConfig": "llmq.quant.config",
    "RefineSettings": "llmq.quant.config",
    "PRESETS": "llmq.quant.config",
    "preset_config": "llmq.quant.config",
    "CalibStats": "llmq.quant.statsfile",
    "load": "llmq.runtime.api",
    "perplexity": "llmq.runtime.api",
    "kld": "llmq.runtime.api",
    "generate": "llmq.runtime.api",
    "profile": "llmq.runtime.api",
    "verify": "llmq.runtime.api",
    "inspect": "llmq.runtime.api",
    "evaluate_tasks": "llmq.runtime.eval.tasks",
    "TasksReport": "llmq.runtime.eval.tasks",
    "PerplexityReport": "llmq.runtime.api",
    "KldReport": "llmq.runtime.api",
    "GenerateReport": "llmq.runtime.api",
    "ProfileReport": "llmq.runtime.api",
    "VerifyReport": "llmq.runtime.format.verify",
    "Manifest": "llmq.runtime.format.manifest",
    "LoadOptions": "llmq.runtime.options",
    "Backend": "llmq.runtime.backend",
    "DecodeMode": "llmq.runtime.decode.modes",
    "DType": "llmq.runtime.sources.device",
    "Dataset": "llmq.runtime.sources.text",
    "Text": "llmq.runtime.sources.text",
    "TextRequest": "llmq.runtime.sources.text",
    "Feedback": "llmq.runtime.sources.feedback",
    "LlmqError": "llmq.errors",
    "register_with_transformers": "llmq.hf",
    "record_perplexity": "llmq.runtime.format.card",
    "perplexity_entry": "llmq.runtime.format.card",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llmq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


# transformers learns the "llmq" quantization method (AutoModelForCausalLM.from_pretrained of an
# artifact) when its quantizer registry is imported, before or after llmq; this imports neither.
from llmq.hf import install as _install_hf  # noqa: E402

_install_hf()
