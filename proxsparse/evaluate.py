"""Perplexity on consecutive non-overlapping windows (DESIGN.md §5)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int  # predicted tokens
    windows: int

    def as_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "windows": self.windows}


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> Perplexity:
    """exp(mean loss over every predicted token of every window)."""
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in tqdm(range(0, len(windows), batch_size), desc="eval", disable=not progress,
                      unit_scale=batch_size, unit="win"):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    nll = float(total) / tokens
    return Perplexity(math.exp(nll), nll, tokens, windows.shape[0])
