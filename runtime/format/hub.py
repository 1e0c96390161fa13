"""The two files that let ``transformers`` see an artifact as a quantized model (``docs/format.md``).

* ``config.json`` is the source model's, copied, with one key added: ``quantization_config``
  ``{"quant_method": "llmq", "format_version": 1}``. It is what makes ``from_pretrained`` hand
  the artifact to llmq's quantizer (:mod:`llmq.runtime.hf_quantizer`) once llmq is imported.
* ``llmq.safetensors.index.json`` (:data:`~llmq.runtime.format.artifact.WEIGHTS_INDEX`) is a
  safetensors index in the hub's shape: every tensor of every shard, and their total size. Only
  llmq's quantizer points ``transformers`` at it; it is deliberately not named
  ``model.safetensors.index.json``, so ``transformers`` without llmq finds no weights and stops
  with its own error instead of loading the dense tensors around randomly initialized Linears.

Both are written by ``llmq quantize`` before the manifest's checksums are taken, so ``llmq verify``
covers them like every other file. Pure functions of their inputs: the same run writes the same bytes.
"""

from __future__ import annotations

import json
import math
from typing import Any

from llmq.errors import ModelSourceError
from llmq.runtime.format.artifact import expected_tensors
from llmq.runtime.format.manifest import FORMAT_NAME, FORMAT_VERSION, Manifest

QUANT_METHOD = "llmq"  # transformers' name for the method: config.json's quantization_config.quant_method


def quantization_config() -> dict[str, Any]:
    """``config.json``'s ``quantization_config``: the method and the artifact format it needs.

    Nothing else: the manifest is the one record of how the model was quantized."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION}


def config_with_quantization(source_text: str, where: str) -> str:
    """The source model's ``config.json`` (its text, ``source_text``) with :func:`quantization_config`
    set; keys keep their order. A source config that already had a ``quantization_config`` (it
    described the source's own weights, which the artifact no longer holds) gets llmq's instead.
    ``where`` names the file in errors."""
    try:
        config = json.loads(source_text)
    except json.JSONDecodeError as err:
        raise ModelSourceError(f"{where} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ModelSourceError(f"{where} must hold a JSON object, not a {type(config).__name__}")
    config["quantization_config"] = quantization_config()
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"


def weights_index(manifest: Manifest) -> str:
    """The safetensors index of the artifact's shards (``{"metadata", "weight_map"}``), as text.

    ``weight_map`` maps every tensor the manifest predicts to its shard, sorted by name;
    ``metadata.total_size`` is their data bytes (headers not counted), as the hub expects."""
    tensors = expected_tensors(manifest)
    total = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in tensors.values())
    document = {
        "metadata": {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "total_size": total},
        "weight_map": {name: tensors[name][0] for name in sorted(tensors)},
    }
    return json.dumps(document, indent=2) + "\n"
