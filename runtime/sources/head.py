"""A causal LM's output head run on given last-layer outputs, a slice of positions at a time.

Logits over a large vocabulary are the largest tensors a forward pass makes: a 2,048-token
window over Qwen's 152k-token vocabulary is 1.2 GB in float32, and its softmax as much again.
Each position's logits depend on that position's last-layer output only, so they can be made a
slice of positions at a time. What comes after the decoder layers differs by family (a final
norm, the head, Gemma's soft-capping, scaled logits), so it is not re-implemented here: the
model's own forward runs with every decoder layer replaced by a stand-in that hands back the
given outputs, and zero ``inputs_embeds`` in place of token ids (the embedding is never needed).
"""

from __future__ import annotations

import contextlib

import torch

# Logits computed at once, in floats (64 MB): bounds the memory of a pass through the output head.
HEAD_CHUNK_ELEMENTS = 1 << 24


class OutputHead:
    """``model``'s layers after its decoder ``layers`` (a ModuleList of it), as one callable.

    returns_tuple  whether a decoder layer returns a tuple (the stand-ins must do the same)
    """

    def __init__(self, model, layers: torch.nn.ModuleList, returns_tuple: bool) -> None:
        self.model, self.layers, self.returns_tuple = model, layers, returns_tuple

    @property
    def chunk(self) -> int:
        """Positions whose logits are made at once: about :data:`HEAD_CHUNK_ELEMENTS` floats."""
        return max(1, HEAD_CHUNK_ELEMENTS // self.model.config.get_text_config().vocab_size)

    def slices(self, begin: int, end: int) -> list[tuple[int, int]]:
        """Positions ``[begin, end)`` cut into slices of at most :attr:`chunk`, all of about one size:
        a product of one or a few rows can take another BLAS path, with other rounding."""
        count = -(-(end - begin) // self.chunk)
        cuts = [begin + (end - begin) * i // count for i in range(count + 1)]
        return list(zip(cuts[:-1], cuts[1:], strict=True))

    def logits(self, final: torch.Tensor) -> torch.Tensor:
        """The model's logits [B, L, V] where its last decoder layer gives ``final`` [B, L, H],
        differentiable in ``final``."""
        with self._standing_in(final):
            return self.model(inputs_embeds=torch.zeros_like(final), use_cache=False).logits

    @contextlib.contextmanager
    def _standing_in(self, final: torch.Tensor):
        layers, returns_tuple, saved = self.layers, self.returns_tuple, list(self.layers)

        class Replay(torch.nn.Module):
            def forward(self, *args, **kw):
                hidden = final if self is layers[0] else args[0]
                return (hidden,) if returns_tuple else hidden

        try:
            for index in range(len(layers)):
                layers[index] = Replay()
            yield
        finally:
            for index, layer in enumerate(saved):
                layers[index] = layer


def last_layer_output(model, layers: torch.nn.ModuleList, ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Run ``model`` on ``ids`` [B, L] with logits for the last position only; returns the last decoder
    layer's output [B, L, H] and whether the layers return tuples."""
    seen: list = []
    hook = layers[-1].register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        model(ids, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    output = seen[-1]
    return (output[0], True) if isinstance(output, tuple) else (output, False)
