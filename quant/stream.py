"""A source model run one decoder layer at a time from its checkpoint; never whole in memory.

A meta-device skeleton gets the parameters that come before its decoder layers (embeddings,
position tables; not an untied output head). One forward with every decoder layer replaced by a
recorder learns what each layer is given besides its hidden state (Gemma 2/3 give local and
global layers different masks and rotary tables); the first layer runs for real once, so its
return type is known. Then a caller loads each layer in turn, runs it on the windows and drops
it. Where the layers are, and how experts are stored, comes from the architecture table.
Calibration and block-wise refinement both walk a model this way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from llmq.runtime.sources import families as F
from llmq.runtime.sources.checkpoint import Checkpoint
from llmq.runtime.sources.experts import RoutedExperts
from llmq.runtime.sources.head import OutputHead
from llmq.runtime.sources.models import ModelSource


class _Captured(Exception):
    pass


class LayerStream:
    """``windows`` ([S, L] token ids) of ``source``'s model, ready to go through its layers in order.

    hidden    each window's hidden state entering the first layer, [1, L, H] each, on ``device``
    family    the model's row of the architecture table; ``model`` its skeleton, ``checkpoint`` its files
    """

    def __init__(self, source: ModelSource, model_config, windows: torch.Tensor, device: torch.device):
        self.device = device
        self.model = _skeleton_outside_layers(model_config, device)
        self.family = F.family_of(self.model, model_config)
        self.layers = F.decoder_layers(self.model, self.family)
        self.checkpoint = Checkpoint.of(source.path, self.model, self.family)
        self.windows = windows
        # Each layer still on the meta device, so a dropped one can be loaded again (a backward pass
        # walks the layers a second time, last to first); meta modules cost no memory.
        self._templates = [copy.deepcopy(layer) for layer in self.layers]
        before = [n for n, _ in self.model.named_parameters() if _before_layers(n, self.family, self.model)]
        self._load(before)
        self._load_layer(0)
        self.hidden, self.inputs, self.returns_tuple = _layer_inputs(self.model, self.layers, windows.to(device))
        self._freed: set[str] = set()  # parameters dropped for good, never loaded again
        self._free_input_embeddings()

    def __len__(self) -> int:
        return len(self.layers)

    def layer(self, index: int) -> torch.nn.Module:
        """Decoder layer ``index`` loaded from the checkpoint, its experts as one Linear per matrix;
        loaded again if it was dropped."""
        if isinstance(self.layers[index], torch.nn.Identity):
            self.layers[index] = copy.deepcopy(self._templates[index])
        layer = self.layers[index]
        if any(p.device.type == "meta" for p in layer.parameters()):
            self._load_layer(index)
        _unfuse_experts(layer, self.family)
        return layer

    def call(self, index: int, layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """``layer`` (layer ``index``, or a stand-in for it) on hidden states [B, L, H], as the model calls it."""
        extra, kwargs = self.inputs[index]
        output = layer(hidden, *extra, **kwargs)
        return output[0] if isinstance(output, tuple) else output

    def drop(self, index: int) -> None:
        """Free layer ``index``'s weights before the next is loaded."""
        self.layers[index] = torch.nn.Identity()

    def after_layers(self, final: list[torch.Tensor], stop: Callable[[], None] = lambda: None) -> None:
        """Run the rest of the model (final norm, output head: loaded now) on each window's output of
        the last layer, which stands in for the whole stack; hooks on those modules see their inputs.
        The layers are as they were afterwards (a backward pass may load them again). ``stop`` is
        called before each slice of a window: a head over a 262k-token vocabulary takes seconds per window."""
        self.load_rest()
        with torch.inference_mode():
            for hidden in final:
                for start, end in self.head.slices(0, hidden.shape[1]):
                    stop()
                    self.logits(hidden[:, start:end])

    def load_rest(self) -> None:
        """Load what comes after the decoder layers (final norm, output head), fp32 and frozen."""
        self.model.tie_weights()  # a tied head is the embedding loaded before the layers, not a checkpoint tensor
        self._load([n for n, p in self.model.named_parameters() if p.device.type == "meta" and n not in self._freed])
        self.model.requires_grad_(False)

    @property
    def head(self) -> OutputHead:
        """What comes after the decoder layers, run on given last-layer outputs (:meth:`logits`)."""
        return OutputHead(self.model, self.layers, self.returns_tuple)

    def logits(self, final: torch.Tensor) -> torch.Tensor:
        """The model's logits [1, L, V] where its last decoder layer gives ``final`` [1, L, H]: the
        rest of the model (final norm, head, any soft-capping) as its own forward runs it,
        differentiable in ``final`` (:class:`~llmq.runtime.sources.head.OutputHead`: the embedding
        is not used). A caller may pass a window's positions a slice at a time. Needs
        :meth:`load_rest` first."""
        return self.head.logits(final)

    def _free_input_embeddings(self) -> None:
        """Drop the token embeddings once the first layer's inputs are known, unless the output head
        is the same matrix: nothing reads them after that (:meth:`logits` does not)."""
        from accelerate.utils import set_module_tensor_to_device

        self.model.tie_weights()  # a skeleton on meta is tied only when asked
        embeddings, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        if head is not None and head.weight is embeddings.weight:
            return
        name = _module_name(self.model, embeddings) + ".weight"
        set_module_tensor_to_device(self.model, name, "meta")
        self._freed.add(name)

    def _load_layer(self, index: int) -> torch.nn.Module:
        layer = self.layers[index]
        prefix = f"{self.family.layers}.{index}"
        self._load([f"{prefix}.{n}" for n, _ in layer.named_parameters()])
        return layer

    def _load(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            set_module_tensor_to_device(self.model, name, self.device, value=self.checkpoint.read(name).float())


def _skeleton_outside_layers(model_config, device: torch.device):
    """The model with parameters on meta and real buffers (rotary tables) on ``device``."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    for buffer_name, buffer in list(model.named_buffers()):
        set_module_tensor_to_device(model, buffer_name, device, value=buffer)
    return model.eval()


def _before_layers(name: str, family: F.Family, model) -> bool:
    """Parameters outside the decoder layers that a forward can use before them: all of them but an
    output head of its own (never reached before the first layer, and often the largest matrix)."""
    head = model.get_output_embeddings()
    own_head = head is not None and head.weight is not model.get_input_embeddings().weight
    return family.layer_of(name) is None and not (own_head and name.startswith(_module_name(model, head) + "."))


def _module_name(model, target) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def _layer_inputs(model, layers, windows: torch.Tensor):
    """What the model's forward passes its decoder layers, learned without loading more than the first:
    each window's hidden state entering layer 0; per layer, the other arguments it gets (masks,
    positions, rotary tables: Gemma 2/3 give local and global layers different ones), which are the
    same for every window of one length; and whether a layer returns a tuple."""
    hidden: list[torch.Tensor] = []
    inputs: list[tuple[tuple, dict] | None] = [None] * len(layers)
    originals = list(layers)
    first = originals[0]
    returns_tuple = [False]

    class Recorder(torch.nn.Module):
        """Stands in for layer ``index``; the first runs for real once, so its output type is known."""

        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index

        def forward(self, *args, **kw):
            if self.index == 0:
                hidden.append(args[0])
            if inputs[self.index] is None:
                inputs[self.index] = (args[1:], kw)
            elif self.index == 0:
                raise _Captured  # later windows: only the first layer's input is new
            if self.index == len(layers) - 1:
                raise _Captured
            if self.index > 0:
                return (args[0],) if returns_tuple[0] else args[0]
            out = first(*args, **kw)
            returns_tuple[0] = isinstance(out, tuple)
            return out

    for index in range(len(layers)):
        layers[index] = Recorder(index)
    with torch.no_grad():  # not inference_mode: refinement trains through the masks and rotary tables kept here
        for window in windows:
            try:
                model(window[None], use_cache=False)
            except _Captured:
                pass
    for index, layer in enumerate(originals):
        layers[index] = layer
    return hidden, inputs, returns_tuple[0]


def _unfuse_experts(layer, family: F.Family) -> None:
    """The layer's fused experts, if it has any, as one ``nn.Linear`` per expert matrix (sharing their
    memory), so each expert's input can be hooked."""
    if family.experts is None:
        return
    parent, _, child = family.experts.module.rpartition(".")
    try:
        owner = layer.get_submodule(parent) if parent else layer
        fused = getattr(owner, child)
    except AttributeError:
        return  # a dense layer of a model that mixes dense and MoE layers
    if isinstance(fused, RoutedExperts):
        return  # unfused already: the layer was handed out before and kept
    setattr(owner, child, RoutedExperts.from_fused(fused, family.experts))
