"""Wanda: score |W_ij| · ‖X_j‖₂ (the input feature's norm over calibration tokens), top-N per group.

Runs block by block (see ``blockwise``): each layer's input norms come from the outputs of the
already-pruned layers before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..blockwise import prune_blockwise
from ..nm import topn_mask
from .base import OneShotConfig, Pruner


@dataclass
class WandaConfig(OneShotConfig):
    method = "wanda"


class Wanda(Pruner):
    config_class = WandaConfig

    def select_masks(self, model, targets, calib, progress=True):
        masks: dict[str, torch.Tensor] = {}
        cache: dict = {"input": None, "norms": None}

        def prune_layer(target, inputs):
            # q/k/v (and gate/up) receive the same tensor: compute its norms once.
            if cache["input"] is not inputs:
                flat = inputs.reshape(-1, inputs.shape[-1]).float()
                cache["input"], cache["norms"] = inputs, flat.square().sum(0).sqrt()
            weight = target.module.weight
            mask = topn_mask(weight.abs().float() * cache["norms"], self.config.nm)
            weight.mul_(mask)
            masks[target.name] = mask

        prune_blockwise(model, targets, calib, prune_layer, progress,
                        device=self.config.offload or None)
        return masks
