"""llmq's quantization method in transformers' registry, registered without importing transformers.

``AutoModelForCausalLM.from_pretrained(ARTIFACT)`` needs transformers to know the ``llmq``
quantization method (:mod:`llmq.runtime.hf_quantizer`). ``import llmq`` calls :func:`install`,
which imports nothing heavy:

* if transformers' quantizer registry (``transformers.quantizers.auto``) is already imported,
  llmq registers at once;
* otherwise a post-import hook on ``sys.meta_path`` waits for that module and registers right
  after it has run, then removes itself; imports of every other module pass through untouched.

So ``import llmq`` stays free of torch and transformers, and the import order of ``llmq`` and
``transformers`` does not matter. :func:`register_with_transformers` registers explicitly (and
imports transformers); a second registration does nothing.

A registration that fails at ``import llmq`` or inside the hook (a transformers whose registry has
changed) must not make ``import llmq``, or every ``import transformers`` in a process that imported
llmq, fail, llmq's own commands included: it is reported as a :class:`RuntimeWarning` naming the
error, and loading artifacts through ``from_pretrained`` then fails with transformers' own error;
``llmq.load`` is unaffected. :func:`register_with_transformers` raises it.
"""

from __future__ import annotations

import importlib
import sys
import warnings

REGISTRY = "transformers.quantizers.auto"  # defines register_quantizer / register_quantization_config


def register_with_transformers() -> None:
    """Register the ``llmq`` quantization config and quantizer with transformers (imports it)."""
    # Imported by name, like llmq/__init__.py's lazy exports: this module sits at the package's
    # base, which imports nothing above it at import time (tests/test_layers.py).
    importlib.import_module("llmq.runtime.hf_quantizer").register()


def install() -> None:
    """Arrange registration: now if transformers' registry is imported, else right after it is."""
    if REGISTRY in sys.modules:
        _register_or_warn()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


class _RegisterAfterImport:
    """A ``sys.meta_path`` finder that finds nothing itself: for :data:`REGISTRY` it asks the other
    finders and wraps the loader they return so that registration runs after the module has run.
    Duck-typed: importing ``importlib.abc`` would cost more than the rest of ``import llmq``."""

    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY:
            return None
        sys.meta_path.remove(self)  # once; and the search below must not find this finder again
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenRegister(spec.loader)
                else:
                    warnings.warn(_FAILED.format(f"{REGISTRY} has a loader llmq cannot follow"), RuntimeWarning, 2)
                return spec
        return None


class _ThenRegister:
    """The registry's own loader, then :func:`register_with_transformers`; every other attribute
    (``get_source`` for tracebacks, ``get_filename``...) is the wrapped loader's."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _register_or_warn()

    def __getattr__(self, name):
        return getattr(self._loader, name)


def _register_or_warn() -> None:
    try:
        register_with_transformers()
    except Exception as err:  # reported, not raised: see the module docstring
        warnings.warn(_FAILED.format(repr(err)), RuntimeWarning, 3)


_FAILED = (
    "llmq could not register its quantization method with transformers ({}); "
    "AutoModelForCausalLM.from_pretrained cannot load llmq artifacts in this process, llmq.load can"
)
