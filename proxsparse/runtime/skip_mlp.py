"""A gated MLP that skips the zeros of its activation at decode (ProSparse, DESIGN.md §9).

Per token: compute the gate densely, keep the positions where the activated gate is non-zero,
and read only those rows of up_proj and those columns of down_proj. The result equals the dense
MLP's up to float rounding, because every skipped term is an exact zero.

Weights are held once, as rows: up_proj's weight as it is, down_proj's transposed (its columns
as rows), each either dense or, where at most ``BITMAP_DENSITY`` of a matrix is non-zero (an
N:M-pruned one), as bitmap rows (the non-zeros and a bit per input; 2.125 bytes per weight at
2:4 instead of 4). The compiled kernel (kernels/skip_mlp_cpu.cpp) runs the decode tokens; without
it, or on another device, a plain-torch path gathers the kept rows (exact, not fast). Prefill
(more than ``max_tokens`` tokens per call) multiplies the dense matrices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..gated_mlp import gated_mlps
from .kernels import KernelUnavailable, skip_mlp

BITMAP_DENSITY = 0.9  # bitmap rows cost 4 bytes per non-zero + 1 bit per weight


class SkippingMLP(nn.Module):
    """Inference-only replacement of a gated MLP ``down(act(gate(x)) * up(x))``.

    ``gate`` is kept as the module it was (a dense linear, or a packed one when the model was
    sparsified first: see :func:`skip_activation_zeros`)."""

    def __init__(self, mlp: nn.Module, max_tokens: int = 1, kernel: bool = True) -> None:
        super().__init__()
        self.gate_proj, self.act_fn, self.max_tokens = mlp.gate_proj, mlp.act_fn, max_tokens
        for side in ("up_proj", "down_proj"):
            if getattr(mlp, side).bias is not None:
                raise ValueError(f"SkippingMLP takes bias-free {side}")
        self.hidden = mlp.up_proj.in_features
        self.kernel = kernel and _kernel_here(mlp.up_proj.weight)
        rows = {"up": mlp.up_proj.weight.detach(), "down": mlp.down_proj.weight.detach().t()}
        self.layouts = {}
        for side, weight in rows.items():
            bitmap = (self.kernel and weight.dtype == torch.float32
                      and weight.count_nonzero() <= BITMAP_DENSITY * weight.numel())
            self.layouts[side] = "bitmap" if bitmap else "dense"
            if bitmap:
                values, masks, offsets = skip_mlp().to_bitmap(weight.contiguous())
            else:
                values, masks, offsets = weight.contiguous(), _EMPTY_SHORT, _EMPTY_LONG
            self.register_buffer(f"{side}_values", values)
            self.register_buffer(f"{side}_masks", masks)
            self.register_buffer(f"{side}_offsets", offsets)

    def rows(self, side: str) -> torch.Tensor:
        """up_proj's weight (``"up"``) or down_proj's transposed (``"down"``), dense."""
        values = getattr(self, f"{side}_values")
        if self.layouts[side] == "dense":
            return values
        return skip_mlp().from_bitmap(values, getattr(self, f"{side}_masks"),
                                      getattr(self, f"{side}_offsets"), self.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        activated = self.act_fn(self.gate_proj(flat))
        if flat.shape[0] > self.max_tokens:
            up, down = self.rows("up"), self.rows("down")
            y = (activated * F.linear(flat, up.to(x.dtype))) @ down.to(x.dtype)
        elif self.kernel:
            y = skip_mlp().skip_mlp(
                flat.float(), activated.float(), self.up_values, self.up_masks,
                self.up_offsets, self.down_values, self.down_masks, self.down_offsets, True)
        else:
            y = torch.stack([self._token(t, a) for t, a in zip(flat, activated, strict=True)])
        return y.to(x.dtype).reshape(x.shape)

    def _token(self, token: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        """The plain-torch decode: gather the kept rows (each read twice: exact, not fast)."""
        kept = activated.nonzero().squeeze(-1)
        up = self.rows("up").index_select(0, kept).to(token.dtype)
        down = self.rows("down").index_select(0, kept).to(token.dtype)
        return (activated.index_select(0, kept) * (up @ token)) @ down

    def to_dense(self) -> nn.Module:
        """The gated MLP this replaces, with plain linears (for side-by-side timing)."""
        return _DenseMLP(self.gate_proj, self.act_fn, self.rows("up").clone(),
                         self.rows("down").t().contiguous())

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the gate and of the up and down rows as held."""
        from .speed import model_bytes

        return model_bytes(self)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, up={self.layouts['up']}, down={self.layouts['down']}, "
                f"kernel={self.kernel}, max_tokens={self.max_tokens}")


class _DenseMLP(nn.Module):
    def __init__(self, gate: nn.Module, act: nn.Module, up: torch.Tensor,
                 down: torch.Tensor) -> None:
        super().__init__()
        self.gate_proj, self.act_fn = gate, act
        self.up_proj = nn.Linear(up.shape[1], up.shape[0], bias=False, dtype=up.dtype)
        self.down_proj = nn.Linear(down.shape[1], down.shape[0], bias=False, dtype=down.dtype)
        with torch.no_grad():
            self.up_proj.weight.copy_(up)
            self.down_proj.weight.copy_(down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


_EMPTY_SHORT = torch.empty(0, dtype=torch.int16)
_EMPTY_LONG = torch.empty(0, dtype=torch.int64)


def _kernel_here(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        skip_mlp()
    except KernelUnavailable:
        return False
    return True


def skip_activation_zeros(model: nn.Module, max_tokens: int = 1, kernel: bool = True) -> int:
    """Swap every gated MLP of ``model`` for a :class:`SkippingMLP`; returns how many.

    To compose with packed N:M weights, call this before ``sparsify``: up and down become
    bitmap rows here, and ``sparsify`` then packs the gate with the other N:M layers."""
    from .module import set_module

    mlps = gated_mlps(model)
    for mlp in mlps:
        set_module(model, mlp.name, SkippingMLP(mlp.module, max_tokens, kernel))
    return len(mlps)
