"""A gated MLP that skips the zeros of its activation at decode (ProSparse, DESIGN.md §9).

Per token: compute the gate, keep the positions where the activated gate is non-zero, and
multiply only those rows of up_proj and those columns of down_proj. The result equals the dense
MLP's up to float rounding, because every skipped term is an exact zero.

This is the reference path in plain torch: it gathers the kept rows (``index_select``), so it
reads them twice; it is exact but not yet faster than the dense MLP. Prefill (more than
``max_tokens`` tokens per call) runs the dense MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from ..gated_mlp import gated_mlps


class SkippingMLP(nn.Module):
    def __init__(self, mlp: nn.Module, max_tokens: int = 1) -> None:
        super().__init__()
        self.dense = mlp
        self.max_tokens = max_tokens
        # down_proj's columns as rows, so that the kept ones are contiguous to gather
        self.register_buffer("down_rows", mlp.down_proj.weight.detach().t().contiguous(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] > self.max_tokens:
            return self.dense(x)
        mlp = self.dense
        out = []
        for token in flat:
            activated = mlp.act_fn(mlp.gate_proj(token))
            kept = activated.nonzero().squeeze(-1)
            up = torch.nn.functional.linear(token, mlp.up_proj.weight.index_select(0, kept),
                                            None if mlp.up_proj.bias is None
                                            else mlp.up_proj.bias.index_select(0, kept))
            y = (activated.index_select(0, kept) * up) @ self.down_rows.index_select(0, kept)
            if mlp.down_proj.bias is not None:
                y = y + mlp.down_proj.bias
            out.append(y)
        return torch.stack(out).reshape(*x.shape[:-1], -1)


def skip_activation_zeros(model: nn.Module, max_tokens: int = 1) -> int:
    """Swap every gated MLP of ``model`` for a :class:`SkippingMLP`; returns how many."""
    from .module import set_module

    mlps = gated_mlps(model)
    for mlp in mlps:
        set_module(model, mlp.name, SkippingMLP(mlp.module, max_tokens))
    return len(mlps)
