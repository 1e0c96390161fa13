"""Resolve a MODEL argument to a local HF folder and load it as a causal LM.

A MODEL is one of three things, checked in this order:

1. ``demo``: the embedded demo model (:mod:`llmq.runtime.sources.demo`). The name is reserved; write
   ``./demo`` for a local folder that happens to be called ``demo``.
2. A path that exists: a local HF folder (``config.json``, tokenizer, ``*.safetensors``).
3. A hub id (``org/name``): fetched with ``huggingface_hub`` into its usual cache, or taken
   from that cache when offline.

Something that looks like a path but does not exist is an error, never a hub lookup, and a hub
id is never replaced by anything else. Only safetensors weights are loaded: llmq does not
unpickle checkpoints.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmq.errors import HubUnreachableError, ModelSourceError
from llmq.runtime.format import artifact
from llmq.runtime.sources import demo
from llmq.runtime.sources.feedback import LOGGED, Feedback

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# Config, tokenizer and safetensors weights only; *.bin / *.pt pickles are never downloaded.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


ModelSpec = str | os.PathLike  # "demo", a local folder, a hub id "org/name", or a .llmq artifact


def spec_string(spec: ModelSpec) -> str:
    """MODEL as the command line spells it. A path object is always a path: ``Path("demo")`` is the
    folder ``./demo``, never the embedded demo, and ``Path("org/name")`` is never a hub id."""
    if not isinstance(spec, os.PathLike):
        return spec
    text = os.fspath(spec)
    return text if text.startswith(("/", ".", "~")) else f"./{text}"


class SourceKind(str, enum.Enum):
    demo = "demo"
    folder = "folder"
    artifact = "artifact"  # a .llmq directory written by `llmq quantize`
    hub = "hub"


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from. ``path`` is always a local folder once resolved."""

    spec: str
    kind: SourceKind
    path: Path
    label: str
    revision: str | None = None

    def to_json(self) -> dict:
        """The ``model`` object of every JSON result: what was asked for and what it resolved to."""
        return {
            "spec": self.spec,
            "kind": self.kind.value,
            "path": str(self.path),
            "label": self.label,
            "revision": self.revision,
        }


def check_model_spec(spec: ModelSpec, revision: str | None = None) -> SourceKind:
    """What MODEL names, checked without building or downloading anything."""
    spec = spec_string(spec)
    if spec == demo.DEMO_NAME:
        kind = SourceKind.demo
    elif Path(spec).expanduser().exists():
        path = Path(spec).expanduser()
        if artifact.is_artifact(path):
            return _no_revision(SourceKind.artifact, spec, revision)
        check_model_folder(path)
        kind = SourceKind.folder
    elif _looks_like_path(spec) or not _HUB_ID.match(spec):
        raise ModelSourceError(
            f"model path {spec!r} does not exist; give an existing HF model folder, a hub id "
            f"like org/name, or '{demo.DEMO_NAME}'"
        )
    else:
        kind = SourceKind.hub
    return _no_revision(kind, spec, revision)


def _no_revision(kind: SourceKind, spec: str, revision: str | None) -> SourceKind:
    if revision is not None and kind != SourceKind.hub:
        raise ModelSourceError(f"--revision applies to hub ids, but {spec!r} is a {kind.value} model")
    return kind


def resolve_model(
    spec: ModelSpec, *, revision: str | None = None, progress: bool = True, log: Callable[[str], None] | None = None
) -> ModelSource:
    """Map the user's MODEL string to a local folder, building the demo or fetching from the hub if needed."""
    spec = spec_string(spec)
    kind = check_model_spec(spec, revision)
    if kind == SourceKind.demo:
        return ModelSource(spec, kind, demo.ensure_demo_model(progress, log), demo.DEMO_LABEL)
    if kind == SourceKind.folder:
        path = Path(spec).expanduser().resolve()
        return ModelSource(spec, kind, path, f"local folder {path}")
    if kind == SourceKind.artifact:
        path = Path(spec).expanduser().resolve()
        manifest = artifact.open_artifact(path)
        label = manifest.source.label if manifest.source else "unknown source"
        return ModelSource(spec, kind, path, f"llmq artifact {path} (quantized from {label})")
    folder = _fetch_from_hub(spec, revision)
    check_model_folder(folder)
    rev = f"@{revision}" if revision else ""
    return ModelSource(spec, kind, folder, f"hub model {spec}{rev}", revision)


def open_model(
    spec: ModelSpec,
    revision: str | None = None,
    trust_remote_code: bool = False,
    feedback: Feedback = LOGGED,
    role: str = "model",
) -> tuple[ModelSource, Any]:
    """Resolve MODEL (building the demo or fetching from the hub if needed) and read its config;
    ``role`` names it in the log line (``model``, ``base``)."""
    source = resolve_model(spec, revision=revision, progress=feedback.show_progress, log=feedback.info)
    feedback.info(f"{role}: {source.label}")
    return source, load_config(source, trust_remote_code)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1 or spec.endswith("/")


def _fetch_from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))
    except LocalEntryNotFoundError as err:
        raise HubUnreachableError(
            f"could not reach the Hugging Face hub to fetch {repo_id!r}, and it is not in the local HF "
            "cache; download it on a machine with network (e.g. `hf download "
            f"{repo_id} --local-dir DIR`) and pass the local folder DIR instead"
        ) from err
    except GatedRepoError as err:
        raise ModelSourceError(
            f"hub model {repo_id!r} is gated; accept its license and log in with `hf auth login`"
        ) from err
    except RepositoryNotFoundError as err:
        raise ModelSourceError(
            f"hub model {repo_id!r} does not exist (or is private and you are not logged in)"
        ) from err


def check_model_folder(path: Path) -> None:
    """Fail unless ``path`` is a folder holding a causal-LM config and safetensors weights."""
    if not path.is_dir():
        raise ModelSourceError(f"{path} is a file; give the model's folder (with config.json) instead")
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{path} is not a HF model folder: it has no config.json")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = (
            f" (it has {', '.join(pickles)}: llmq does not load pickle checkpoints; convert them to safetensors)"
            if pickles
            else ""
        )
        raise ModelSourceError(f"{path} has no *.safetensors weights{hint}")


def load_config(source: ModelSource, trust_remote_code: bool = False):
    """Load and check the config: it must describe a model AutoModelForCausalLM can build."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ModelSourceError(
                f"{source.spec} needs custom code from its folder to load; pass --trust-remote-code "
                "only if you trust that code"
            ) from err
        raise ModelSourceError(f"{source.path}/config.json cannot be read: {err}") from err
    except OSError as err:
        raise ModelSourceError(f"{source.path}/config.json cannot be read: {err}") from err
    remote_causal = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not remote_causal:
        arch = ", ".join(getattr(config, "architectures", None) or []) or "unknown architecture"
        raise ModelSourceError(
            f"{source.spec} is not a causal language model (model_type {config.model_type!r}, {arch}); "
            "llmq works on decoder-only LMs such as Llama, Mistral or Qwen"
        )
    return config


def context_length(config) -> int | None:
    """The longest sequence the model was built for, if its config says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"the tokenizer in {source.path} cannot be loaded: {err}") from err
