"""A gated MLP that skips the zeros of its activation at decode (ProSparse, DESIGN.md §9).

Per token: compute the gate densely, keep the positions where the activated gate is non-zero,
and read only those rows of up_proj and those columns of down_proj. The result equals the dense
MLP's up to float rounding, because every skipped term is an exact zero.

Weights are held once, as rows: gate_proj's and up_proj's weights as they are, down_proj's
transposed (its columns as rows), each either dense or, where at most ``BITMAP_DENSITY`` of a
matrix is non-zero (an N:M-pruned one), as bitmap rows (the non-zeros and a bit per input; 2.125
bytes per weight at 2:4 instead of 4). The compiled kernel (kernels/skip_mlp_cpu.cpp) runs the
decode tokens, gate included when the activation is a (thresholded) ReLU; without it, or on
another device, a plain-torch path gathers the kept rows (exact, not fast). Prefill (more than
``max_tokens`` tokens per call) multiplies the dense matrices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..gated_mlp import FATReLU, dense_weight, gated_mlps
from .kernels import KernelUnavailable, skip_mlp

BITMAP_DENSITY = 0.9  # bitmap rows cost 4 bytes per non-zero + 1 bit per weight


class SkippingMLP(nn.Module):
    """Inference-only replacement of a gated MLP ``down(act(gate(x)) * up(x))`` whose
    projections are dense or packed linears.

    With the kernel and a (thresholded) ReLU activation, the gate's weight is held as rows too
    and the kernel computes it. Otherwise ``gate_proj`` stays the module it was (a dense linear,
    or a packed one) and runs before the kernel."""

    def __init__(self, mlp: nn.Module, max_tokens: int = 1, kernel: bool = True) -> None:
        super().__init__()
        self.act_fn, self.max_tokens = mlp.act_fn, max_tokens
        for side in ("up_proj", "down_proj"):
            if getattr(mlp, side).bias is not None:
                raise ValueError(f"SkippingMLP takes bias-free {side}")
        up, down = dense_weight(mlp.up_proj), dense_weight(mlp.down_proj)
        self.hidden = up.shape[1]
        self.kernel = kernel and _kernel_here(up)
        self.threshold = _relu_threshold(self.act_fn)
        self.fused_gate = (self.kernel and self.threshold is not None
                           and getattr(mlp.gate_proj, "bias", None) is None)
        rows = {"up": up, "down": down.t()}
        if self.fused_gate:
            rows["gate"] = dense_weight(mlp.gate_proj)
        else:
            self.gate_proj = mlp.gate_proj
        self.layouts = {}
        for side, weight in rows.items():
            bitmap = (self.kernel and weight.dtype == torch.float32
                      and weight.count_nonzero() <= BITMAP_DENSITY * weight.numel())
            self.layouts[side] = "bitmap" if bitmap else "dense"
            if bitmap:
                values, masks, offsets = skip_mlp().to_bitmap(weight.contiguous())
            else:
                values, masks, offsets = weight.contiguous(), _EMPTY_SHORT, _EMPTY_LONG
            if self.kernel:  # 2 MiB pages: the kept rows are scattered (1.2x faster measured)
                values = skip_mlp().huge_page_copy(values)
            self.register_buffer(f"{side}_values", values)
            self.register_buffer(f"{side}_masks", masks)
            self.register_buffer(f"{side}_offsets", offsets)

    def rows(self, side: str) -> torch.Tensor:
        """gate_proj's or up_proj's weight (``"gate"``, ``"up"``) or down_proj's transposed
        (``"down"``), dense."""
        if side == "gate" and not self.fused_gate:
            return self.gate_proj.weight
        values = getattr(self, f"{side}_values")
        if self.layouts[side] == "dense":
            return values
        return skip_mlp().from_bitmap(values, getattr(self, f"{side}_masks"),
                                      getattr(self, f"{side}_offsets"), self.hidden)

    def _gate(self, flat: torch.Tensor) -> torch.Tensor:
        if self.fused_gate:
            return F.linear(flat, self.rows("gate").to(flat.dtype))
        return self.gate_proj(flat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] > self.max_tokens:
            up, down = self.rows("up"), self.rows("down")
            activated = self.act_fn(self._gate(flat))
            y = (activated * F.linear(flat, up.to(x.dtype))) @ down.to(x.dtype)
        elif self.kernel:
            activated = _NO_ACT if self.fused_gate else self.act_fn(self._gate(flat)).float()
            y = skip_mlp().skip_mlp(
                flat.float(), activated, *self._side("gate"), self.threshold or 0.0,
                *self._side("up"),
                *self._side("down"), True)
        else:
            activated = self.act_fn(self._gate(flat))
            y = torch.stack([self._token(t, a) for t, a in zip(flat, activated, strict=True)])
        return y.to(x.dtype).reshape(x.shape)

    def _side(self, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if side == "gate" and not self.fused_gate:
            return _NO_ACT, _EMPTY_SHORT, _EMPTY_LONG
        return (getattr(self, f"{side}_values"), getattr(self, f"{side}_masks"),
                getattr(self, f"{side}_offsets"))

    def _token(self, token: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        """The plain-torch decode: gather the kept rows (each read twice: exact, not fast)."""
        kept = activated.nonzero().squeeze(-1)
        up = self.rows("up").index_select(0, kept).to(token.dtype)
        down = self.rows("down").index_select(0, kept).to(token.dtype)
        return (activated.index_select(0, kept) * (up @ token)) @ down

    def to_dense(self) -> nn.Module:
        """The gated MLP this replaces, with plain linears (for side-by-side timing)."""
        gate = _linear(self.rows("gate").clone() if self.fused_gate
                       else dense_weight(self.gate_proj).clone())
        return _DenseMLP(gate, self.act_fn, self.rows("up").clone(),
                         self.rows("down").t().contiguous())

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the gate and of the up and down rows as held."""
        from .speed import model_bytes

        return model_bytes(self)

    def extra_repr(self) -> str:
        layouts = ", ".join(f"{side}={layout}" for side, layout in self.layouts.items())
        return (f"hidden={self.hidden}, {layouts}, kernel={self.kernel}, "
                f"fused_gate={self.fused_gate}, max_tokens={self.max_tokens}")


def _relu_threshold(act: nn.Module) -> float | None:
    """The threshold of a (thresholded) ReLU activation, which the kernel computes itself;
    None for any other activation."""
    if isinstance(act, FATReLU):
        return act.threshold
    return 0.0 if isinstance(act, nn.ReLU) else None


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


class _DenseMLP(nn.Module):
    def __init__(self, gate: nn.Module, act: nn.Module, up: torch.Tensor,
                 down: torch.Tensor) -> None:
        super().__init__()
        self.gate_proj, self.act_fn = gate, act
        self.up_proj, self.down_proj = _linear(up), _linear(down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


_EMPTY_SHORT = torch.empty(0, dtype=torch.int16)
_EMPTY_LONG = torch.empty(0, dtype=torch.int64)
_NO_ACT = torch.empty(0, dtype=torch.float32)  # the kernel computes the activated gate itself


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

    To compose with packed N:M weights, call this before ``sparsify``: gate (with a ReLU-style
    activation), up and down become bitmap rows here, and ``sparsify`` then packs the other
    N:M layers (and the gate where it stayed a linear)."""
    from .module import set_module

    mlps = gated_mlps(model)
    for mlp in mlps:
        set_module(model, mlp.name, SkippingMLP(mlp.module, max_tokens, kernel))
    return len(mlps)
