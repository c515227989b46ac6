"""The small public API: ``prune(model, config, calib)`` makes a model N:M sparse in place."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ProxSparseError
from .finetune import FinetuneSettings, finetune
from .gated_mlp import activation_metadata
from .learning.distributed import launched_by_torchrun
from .methods import PruneConfig, pruner_for
from .models import check_finite, find_targets
from .nm import is_valid_nm, mask_is_exact
from .permute import Permutation, permute_channels


@dataclass
class PruneResult:
    """What ``prune`` did: the keep-mask of every target layer and per-layer statistics."""

    config: PruneConfig
    masks: dict[str, torch.Tensor]
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    permutations: dict[str, Permutation] = field(default_factory=dict)  # --permute's, by reader

    def layer_stats(self, model: nn.Module) -> dict[str, dict]:
        modules = dict(model.named_modules())
        stats = {}
        for name in self.masks:
            weight = modules[name].weight
            stats[name] = {
                "shape": list(weight.shape),
                "sparsity": round(float((weight == 0).float().mean()), 6),
            }
        return stats


def prune(
    model: nn.Module,
    config: PruneConfig,
    calib: torch.Tensor | None = None,
    progress: bool = True,
) -> PruneResult:
    """Make every target layer of ``model`` N:M sparse, in place (then, with
    ``config.finetune_steps``, let the kept weights learn under the masks).

    ``calib`` holds calibration token windows ``[windows, seqlen]`` for the methods that need
    them (see ``proxsparse.data.calibration_windows``). Returns the masks and statistics.
    """
    targets, skipped = find_targets(model, config.nm, config.include, config.ignore)
    check_finite(targets)
    pruner = pruner_for(config)
    if launched_by_torchrun() and not pruner.multi_process:
        raise ProxSparseError(f"{config.method} runs in one process: run it without torchrun "
                              "(proxsparse learns across processes)")
    if pruner.needs_calibration and calib is None:
        raise ProxSparseError(f"method {config.method!r} needs calibration windows (calib=...)")
    if config.finetune_steps:
        if not pruner.makes_masks:
            raise ProxSparseError(f"{config.method} makes no N:M masks, so there is nothing to "
                                  "fine-tune under them: drop --finetune-steps")
        if calib is None:
            raise ProxSparseError("--finetune-steps learns on calibration windows: pass "
                                  "calib=... (the CLI reads --calib)")
        if launched_by_torchrun():
            raise ProxSparseError("--finetune-steps runs in one process: run it without "
                                  "torchrun")

    torch.manual_seed(config.seed)
    start = time.perf_counter()
    permutations = {}
    if config.permute:
        permutations = permute_channels(
            model, targets, config.nm, pruner.permutation_score,
            calib if pruner.needs_calibration else None, config.permute_rounds, config.seed,
            progress)
    masks = pruner.select_masks(model, targets, calib, progress=progress)
    if not pruner.makes_masks:  # the method changed the model otherwise: no N:M layer
        return PruneResult(config, {}, skipped, time.perf_counter() - start)
    with torch.no_grad():
        for target in targets:
            weight = target.module.weight
            weight.mul_(masks[target.name].to(weight.device, weight.dtype))
    if config.finetune_steps:
        finetune(model, targets, masks, calib,
                 FinetuneSettings(config.finetune_steps, config.finetune_lr, seed=config.seed),
                 progress)
    seconds = time.perf_counter() - start

    for target in targets:
        if not (mask_is_exact(masks[target.name], config.nm)
                and is_valid_nm(target.module.weight, config.nm)):
            raise RuntimeError(f"internal error: {target.name} is not valid {config.nm}")
    return PruneResult(config, {t.name: masks[t.name].cpu() for t in targets}, skipped, seconds,
                       permutations)


def describe(result: PruneResult, model: nn.Module, **context) -> dict:
    """The metadata written beside an exported model: how it was made, layer by layer."""
    from importlib.metadata import version

    config = result.config
    return {
        "tool": "proxsparse",
        "version": version("proxsparse"),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "method": config.method,
        "nm": str(config.nm),
        "include": list(config.include),
        "ignore": list(config.ignore),
        "seed": config.seed,
        "hyperparameters": config.settings(),
        "prune_seconds": round(result.seconds, 2),
        **activation_metadata(model),
        **context,
        "targets": list(result.masks),
        "skipped": result.skipped,
        "layers": result.layer_stats(model),
        # each permuted reader's new column order: column j holds original input channel
        # columns[j]; its producers' rows follow (gate/up: the same order; v_proj: the order
        # of each kv head's block)
        **({"permutations": {name: p.as_dict() for name, p in result.permutations.items()}}
           if result.permutations else {}),
    }
