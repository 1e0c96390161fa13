"""llmq: range-aware mixed 2/4-bit quantization of HuggingFace causal LMs, and a runtime for it.

Subpackages: ``llmq.cli`` (the ``llmq`` command), ``llmq.quant`` (quantize, offline),
``llmq.runtime`` (load and run), ``llmq.cuda`` (GPU kernels). Importing any of them does no work.
"""

__version__ = "0.1.0"
