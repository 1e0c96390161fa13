"""A mixture-of-experts layer's experts as one matrix module per expert, routed like transformers.

transformers stores a layer's experts as 3-D parameters (``gate_up_proj`` ``[E, 2I, H]`` and
``down_proj`` ``[E, H, I]``) of one module. llmq quantizes each expert's matrices on their own
(own groups, own stripes), so the model needs them as separate modules: calibration hooks each
expert's input, and the runtime holds one ``QuantLinear`` per expert matrix. :class:`RoutedExperts`
takes the place of the experts module and computes what transformers' eager implementation does:
for each expert, the tokens routed to it through ``act(gate) * up``, ``down``, weighted by the
router's weights and summed.
"""

from __future__ import annotations

import torch
from torch import nn

from llmq.errors import ModelSourceError

GATE_UP, DOWN = "gate_up_proj", "down_proj"


class RoutedExperts(nn.Module):
    """The experts of one layer. ``gate_up_proj[e]`` maps ``[T, H]`` to ``[T, 2I]`` (gate rows first,
    then up), ``down_proj[e]`` maps ``[T, I]`` to ``[T, H]``; any modules with that call signature."""

    def __init__(self, gate_up: list[nn.Module], down: list[nn.Module], act_fn):
        super().__init__()
        if len(gate_up) != len(down):
            raise ModelSourceError(f"experts: {len(gate_up)} gate/up matrices but {len(down)} down matrices")
        self.gate_up_proj = nn.ModuleList(gate_up)
        self.down_proj = nn.ModuleList(down)
        self.num_experts = len(gate_up)
        self.act_fn = act_fn

    @classmethod
    def from_fused(cls, module: nn.Module) -> RoutedExperts:
        """One ``nn.Linear`` per expert matrix, sharing the fused module's parameters' memory."""
        for name in (GATE_UP, DOWN):
            param = getattr(module, name, None)
            if not isinstance(param, torch.Tensor) or param.dim() != 3:
                shape = None if param is None else list(param.shape)
                raise ModelSourceError(
                    f"experts module {type(module).__name__}: expected a 3-D {name} [experts, out, in], got {shape}"
                )
        return cls([_linear(w) for w in module.gate_up_proj], [_linear(w) for w in module.down_proj], module.act_fn)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """hidden_states [T, H], top_k_index / top_k_weights [T, k] -> [T, H]."""
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():  # which experts got tokens; the routing itself is data, not learned here
            hits = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            used = torch.greater(hits.sum(dim=(-1, -2)), 0).nonzero()
        for expert in used[:, 0].tolist():
            if expert == self.num_experts:
                continue
            slot, token = torch.where(hits[expert])
            gate, up = self.gate_up_proj[expert](hidden_states[token]).chunk(2, dim=-1)
            expert_out = self.down_proj[expert](self.act_fn(gate) * up) * top_k_weights[token, slot, None]
            out.index_add_(0, token, expert_out.to(out.dtype))
        return out


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear
