"""Statistics of the inputs each target layer sees on calibration text."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import Target


@torch.no_grad()
def input_feature_norms(
    model: nn.Module,
    targets: list[Target],
    calib: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ over all calibration tokens for every input feature j of every target layer
    (Wanda's activation statistic), from forward passes of the model as it is."""
    sums: dict[str, torch.Tensor] = {}
    last: dict = {"input": None, "sq": None}

    def make_hook(name: str):
        def hook(_module, args):
            x = args[0]
            if last["input"] is not x:  # q/k/v and gate/up share one input tensor
                last["input"] = x
                last["sq"] = x.detach().reshape(-1, x.shape[-1]).float().square().sum(0)
            sums[name] = sums[name] + last["sq"] if name in sums else last["sq"].clone()
        return hook

    handles = [t.module.register_forward_pre_hook(make_hook(t.name)) for t in targets]
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, calib.shape[0], batch_size), desc="input norms",
                          disable=not progress):
            model(calib[start:start + batch_size].to(device), use_cache=False)
            last["input"] = None
    finally:
        for handle in handles:
            handle.remove()
    missing = [t.name for t in targets if t.name not in sums]
    if missing:
        raise RuntimeError(f"these layers never ran on the calibration text: {missing}")
    return {name: total.sqrt() for name, total in sums.items()}
