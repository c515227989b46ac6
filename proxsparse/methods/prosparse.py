"""ProSparse (DESIGN.md §9): the L1 schedule and penalty on the MLP activations.

The tensor maths of the method, ahead of its learning loop (issue #14):

- the staged λ schedule: stages end at shares of the run; inside a stage whose λ rises, λ
  follows a sine ramp from the previous stage's value, η = ½·(sin(−π/2 + π·p) + 1) with p the
  progress through the stage; a stage with the same λ as the one before holds it;
- the penalty λ·Σ_layers mean_tokens ‖x₁‖₁ over the activated gates of the gated MLPs,
  collected by forward hooks as a differentiable sum (no host sync).

The method itself (ReLU substitution, training on the shared loop, FATReLU at the end, the
export) is not registered yet: ``proxsparse prune --method prosparse`` does not exist.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ProxSparseError
from ..gated_mlp import gated_mlps


def parse_stages(text: str) -> list[tuple[float, float]]:
    """``"0.1:0,0.5:0.005,1:0.05"`` → ``[(0.1, 0.0), (0.5, 0.005), (1.0, 0.05)]``: each stage
    ends at a share of the steps and holds (or ramps to) its λ. Shares rise strictly to 1;
    λ never falls."""
    try:
        stages = [(float(end), float(lam)) for end, lam in
                  (item.split(":") for item in text.split(",") if item.strip())]
    except ValueError as err:
        raise ProxSparseError(f"--stages {text!r}: give END:LAMBDA pairs separated by commas, "
                              "e.g. 0.1:0,0.5:0.005,1:0.05") from err
    ends = [end for end, _ in stages]
    lams = [lam for _, lam in stages]
    if not stages or ends[-1] != 1.0 or any(b <= a for a, b in zip([0.0, *ends], ends,
                                                                    strict=False)):
        raise ProxSparseError(f"--stages {text!r}: the stage ends must rise strictly from "
                              "above 0 to exactly 1 (shares of the steps)")
    if any(lam < 0 or not math.isfinite(lam) for lam in lams) or any(
            b < a for a, b in zip(lams, lams[1:], strict=False)):
        raise ProxSparseError(f"--stages {text!r}: each stage's lambda must be ≥ 0 and no "
                              "smaller than the one before")
    return stages


def l1_lambda(step: int, total: int, stages: list[tuple[float, float]]) -> float:
    """λ at ``step`` of ``total`` (0-based): the sine ramp inside the stage holding the step."""
    position = (step + 1) / total  # the share of the run done after this step
    start, previous = 0.0, 0.0
    for end, lam in stages:
        if position <= end + 1e-12:
            progress = (position - start) / (end - start)
            eta = 0.5 * (math.sin(-math.pi / 2 + math.pi * progress) + 1)
            return previous + eta * (lam - previous)
        start, previous = end, lam
    return stages[-1][1]


class ActivationL1:
    """Context manager: while open, ``total`` is Σ_layers mean over tokens of ‖act(gate(x))‖₁
    for the forward passes run since the last ``reset()``, with its autograd graph."""

    def __init__(self, model: nn.Module) -> None:
        self.mlps = gated_mlps(model)
        self.total: torch.Tensor | None = None
        self._handles = []

    def __enter__(self) -> ActivationL1:
        for mlp in self.mlps:
            act = getattr(mlp.module, "act_fn", None)
            if not isinstance(act, nn.Module):
                raise ProxSparseError(f"{mlp.name} has no activation module to penalise")
            self._handles.append(act.register_forward_hook(self._add))
        return self

    def _add(self, _module, _args, output: torch.Tensor) -> None:
        term = output.abs().sum(-1).mean()  # ‖x₁‖₁ per token, averaged over the tokens
        self.total = term if self.total is None else self.total + term

    def reset(self) -> None:
        self.total = None

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
