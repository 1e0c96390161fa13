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
from llmq.runtime.sources.families import Experts


class RoutedExperts(nn.Module):
    """The experts of one layer. ``gate_up[e]`` maps ``[T, H]`` to ``[T, 2I]`` (gate rows first, then
    up), ``down[e]`` maps ``[T, I]`` to ``[T, H]``: any modules with that call signature. They are
    registered under the fused parameters' names (``spec.gate_up``, ``spec.down``), so expert ``e``
    of ``gate_up_proj`` is the module ``gate_up_proj.e``."""

    def __init__(self, spec: Experts, gate_up: list[nn.Module], down: list[nn.Module], act_fn):
        super().__init__()
        if len(gate_up) != len(down):
            raise ModelSourceError(f"experts: {len(gate_up)} gate/up matrices but {len(down)} down matrices")
        self.names = spec.params
        self.add_module(spec.gate_up, nn.ModuleList(gate_up))
        self.add_module(spec.down, nn.ModuleList(down))
        self.num_experts = len(gate_up)
        self.act_fn = act_fn

    @classmethod
    def from_fused(cls, module: nn.Module, spec: Experts) -> RoutedExperts:
        """One ``nn.Linear`` per expert matrix, sharing the fused module's parameters' memory."""
        for name in spec.params:
            param = getattr(module, name, None)
            if not isinstance(param, torch.Tensor) or param.dim() != 3:
                shape = None if param is None else list(param.shape)
                raise ModelSourceError(
                    f"experts module {type(module).__name__}: expected a 3-D {name} [experts, out, in], got {shape}"
                )
        gate_up, down = ([_linear(w) for w in getattr(module, name)] for name in spec.params)
        return cls(spec, gate_up, down, getattr(module, spec.act))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """hidden_states [T, H], top_k_index / top_k_weights [T, k] -> [T, H]."""
        gate_up, down = (getattr(self, name) for name in self.names)
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():  # which experts got tokens; the routing itself is data, not learned here
            hits = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            used = torch.greater(hits.sum(dim=(-1, -2)), 0).nonzero()
        for expert in used[:, 0].tolist():
            if expert == self.num_experts:
                continue
            slot, token = torch.where(hits[expert])
            gate, up = gate_up[expert](hidden_states[token]).chunk(2, dim=-1)
            expert_out = down[expert](self.act_fn(gate) * up) * top_k_weights[token, slot, None]
            out.index_add_(0, token, expert_out.to(out.dtype))
        return out


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear
