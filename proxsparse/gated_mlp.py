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
            if all(_is_linear(getattr(module, p, None)) for p in PROJECTIONS):
                found.append(GatedMLP(f"{_prefix(model, block)}.{name}".strip("."), module,
                                      index))
                break
    if not found:
        raise ProxSparseError(
            f"{type(model).__name__} has no gated MLP (gate_proj, up_proj and down_proj linears "
            "in its decoder blocks): activation sparsity needs a Llama-, Qwen-, Mistral- or "
            "Gemma-style MLP")
    return found


def _is_linear(module: object) -> bool:
    """A linear layer, dense or packed (a runtime PackedLinear turns back into one)."""
    return isinstance(module, nn.Linear) or callable(getattr(module, "to_linear", None))


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The weight of a linear layer, dense or packed, as a dense tensor (no gradient)."""
    return (linear if isinstance(linear, nn.Linear) else linear.to_linear()).weight.detach()


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


@torch.no_grad()
def threshold_for_sparsity(model: nn.Module, windows: torch.Tensor, target: float,
                           per_layer: int = 1 << 16, seed: int = 0) -> float:
    """The FATReLU threshold at which ``target`` of the MLP activations are zero on
    ``windows`` (the mean over layers of each layer's share, as the meter reports it).

    A position is zero when its gate output is below the threshold (or not positive), so the
    threshold is a quantile of the gate outputs, pooled with the same number sampled from
    every layer (``per_layer``, drawn at random with ``seed``). Returns 0.0 when plain ReLU
    already reaches the target."""
    mlps = gated_mlps(model)
    generator = torch.Generator().manual_seed(seed)
    per_call = max(1, per_layer // len(windows))
    samples: list[list[torch.Tensor]] = [[] for _ in mlps]

    def keep(index: int, output: torch.Tensor) -> None:
        flat = output.detach().reshape(-1).float().cpu()
        pick = torch.randint(flat.numel(), (min(per_call, flat.numel()),), generator=generator)
        samples[index].append(flat[pick])

    handles = [mlp.module.gate_proj.register_forward_hook(
        lambda _m, _a, out, index=index: keep(index, out)) for index, mlp in enumerate(mlps)]
    device = next(model.parameters()).device
    try:
        for window in windows:
            model(window[None].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    pooled = torch.cat([torch.cat(layer) for layer in samples])
    rank = min(pooled.numel(), max(1, round(target * pooled.numel())))
    return max(0.0, float(pooled.kthvalue(rank).values))


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
