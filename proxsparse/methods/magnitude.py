"""Magnitude: keep the N largest |W| of every group. No calibration data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..nm import topn_mask
from .base import PruneConfig, Pruner


@dataclass
class MagnitudeConfig(PruneConfig):
    method = "magnitude"


class Magnitude(Pruner):
    config_class = MagnitudeConfig
    needs_calibration = False
    permutation_score = "magnitude"

    @torch.no_grad()
    def select_masks(self, model, targets, calib=None, progress=True):
        return {t.name: topn_mask(t.module.weight.abs(), self.config.nm) for t in targets}
