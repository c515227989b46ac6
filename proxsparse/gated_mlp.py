"""Gated MLPs (Llama, Qwen, Mistral, Gemma, ...): ``down(act(gate(x)) * up(x))``.

Activation sparsity (ProSparse, DESIGN.md §9) lives here: finding the gated MLPs of a model,
swapping their activation for a (thresholded) ReLU, and metering the share of zeros in the MLP
intermediate ``x1 = act(gate(x)) * up(x)``, the input of ``down_proj``: every zero there is a
column of ``down_proj`` (and, where the activated gate is zero, a row of ``up_proj``) that a
decoder can skip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ProxSparseError
from .models import decoder_blocks

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ACTIVATION_KEYS = ("hidden_act", "hidden_activation")  # what configs call the MLP activation


@dataclass
class GatedMLP:
    name: str
    module: nn.Module
    block: int


def gated_mlps(model: nn.Module) -> list[GatedMLP]:
    """The gated MLP of every decoder block, in order; refuses a model without them."""
    found = []
    for index, block in enumerate(decoder_blocks(model)):
        for name, module in block.named_modules():
            if all(isinstance(getattr(module, p, None), nn.Linear) for p in PROJECTIONS):
                found.append(GatedMLP(f"{_prefix(model, block)}.{name}".strip("."), module,
                                      index))
                break
    if not found:
        raise ProxSparseError(
            f"{type(model).__name__} has no gated MLP (gate_proj, up_proj and down_proj linears "
            "in its decoder blocks): activation sparsity needs a Llama-, Qwen-, Mistral- or "
            "Gemma-style MLP")
    return found


def _prefix(model: nn.Module, block: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is block:
            return name
    return ""


class FATReLU(nn.Module):
    """x where x ≥ threshold, else 0 (ReLU at threshold 0): ProSparse's final activation."""

    def __init__(self, threshold: float = 0.0) -> None:
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.threshold == 0.0:
            return torch.relu(x)
        return torch.where(x >= self.threshold, x, torch.zeros((), dtype=x.dtype,
                                                                 device=x.device))

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


def substitute_relu(model: nn.Module, threshold: float = 0.0) -> list[GatedMLP]:
    """Replace the activation of every gated MLP by ``FATReLU(threshold)``, and say so in the
    config (``relu``: what plain transformers rebuilds; the threshold is proxsparse's)."""
    mlps = gated_mlps(model)
    for mlp in mlps:
        if not hasattr(mlp.module, "act_fn"):
            raise ProxSparseError(f"{mlp.name} has no act_fn to replace: this MLP computes its "
                                  "activation inline, which proxsparse cannot swap")
        mlp.module.act_fn = FATReLU(threshold)
    config = getattr(model, "config", None)
    for key in ACTIVATION_KEYS:
        if config is not None and hasattr(config, key):
            setattr(config, key, "relu")
    return mlps


def activation_metadata(model: nn.Module) -> dict:
    """What an export's proxsparse.json must say of the MLP activation when plain transformers
    has no name for it: the FATReLU threshold (its config.json says ``relu``). Recorded from
    the model itself, whichever method ran last (a ProSparse model pruned to 2:4 keeps it)."""
    try:
        acts = [getattr(mlp.module, "act_fn", None) for mlp in gated_mlps(model)]
    except ProxSparseError:
        return {}
    thresholds = {act.threshold for act in acts if isinstance(act, FATReLU)}
    if not thresholds:
        return {}
    if len(thresholds) > 1:
        raise ProxSparseError(f"the gated MLPs have different FATReLU thresholds "
                              f"{sorted(thresholds)}: give them one threshold before exporting")
    return {"activation": {"kind": "fatrelu", "threshold": thresholds.pop()}}


class ActivationSparsity:
    """Context manager: while open, counts the zeros entering every gated MLP's down_proj.

    Counts are kept as tensors (no host sync per forward); ``shares()`` reads them once.
    """

    def __init__(self, model: nn.Module) -> None:
        self.mlps = gated_mlps(model)
        self.zeros: list[torch.Tensor | None] = [None] * len(self.mlps)
        self.counts = [0] * len(self.mlps)
        self._handles = []

    def __enter__(self) -> ActivationSparsity:
        for index, mlp in enumerate(self.mlps):
            self._handles.append(mlp.module.down_proj.register_forward_pre_hook(
                lambda _module, args, index=index: self._count(index, args[0])))
        return self

    def _count(self, index: int, x: torch.Tensor) -> None:
        zeros = (x == 0).sum()
        self.zeros[index] = zeros if self.zeros[index] is None else self.zeros[index] + zeros
        self.counts[index] += x.numel()

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def shares(self) -> dict[str, float]:
        """Share of zeros per MLP (by name), and ``overall`` (the mean over the MLPs)."""
        if any(z is None for z in self.zeros):
            raise RuntimeError("an MLP never ran while the meter was open")
        values = (torch.stack(self.zeros).double().cpu()
                  / torch.tensor(self.counts, dtype=torch.float64)).tolist()
        shares = {mlp.name: value for mlp, value in zip(self.mlps, values, strict=True)}
        return {**shares, "overall": sum(values) / len(values)}
