"""Masked fine-tuning: once a method has chosen the N:M masks, the kept weights learn.

The masks stay as chosen. Every pruned weight's gradient is zeroed before each AdamW step, so
its moments stay zero and its update is exactly zero: the model stays valid N:M. Only the
target layers learn; embeddings, norms and lm_head keep their values. The stage runs on the
shared learning loop (progress bar, log, Ctrl-C), one calibration window per step.

Published ProxSparse and MaskPro keep the pretrained weights under their mask, and Wanda and
magnitude change no weight; this stage is optional (``--finetune-steps``) and the same for
every method, so that methods compare on equal terms with it as without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .learning import LearningMethod, Placement, current_world, learn, lm_loss_backward
from .learning.distributed import clip_grad_norm_
from .learning.optimizers import adamw, lr_factor
from .models import Target
from .runlog import RunDir


@dataclass
class FinetuneSettings:
    """What the loop needs to know of the stage (the user sets ``steps`` and ``lr``)."""

    steps: int
    lr: float
    seed: int = 0
    batch_size: int = 1
    micro_batch_size: int = 0
    warmup: float = 0.1
    max_grad_norm: float = 1.0
    log_every: int = 10
    checkpoint_every: int = 1 << 30  # a short stage after the method: no checkpoints
    resume: bool = False


class MaskedFinetune(LearningMethod):
    """AdamW on the kept weights of the targets, the masks fixed."""

    name = "finetune"
    backprop = True

    def __init__(self, settings: FinetuneSettings, placement: Placement, calib: torch.Tensor,
                 masks: dict[str, torch.Tensor]) -> None:
        self.settings, self.placement, self.calib, self.masks = settings, placement, calib, masks

    def setup(self, state: dict | None) -> None:
        targets = self.placement.targets
        self.params = [t.module.weight for t in targets]
        self.keep = [self.masks[t.name].to(p.device, p.dtype)
                     for t, p in zip(targets, self.params, strict=True)]
        self.device = self.params[0].device
        self.placement.train_only(self.params)
        self.optimizer = adamw(self.params, self.settings.lr)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.settings.steps, self.settings.warmup))

    def step(self, step, batches):
        loss = lm_loss_backward(self.placement.model, self.calib, batches, self.device)
        with torch.no_grad():
            for param, keep in zip(self.params, self.keep, strict=True):
                if param.grad is not None:
                    param.grad.mul_(keep)
        clip_grad_norm_(self.params, self.settings.max_grad_norm, self.placement.world)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss}

    def postfix(self, latest):
        return {"loss": f"{latest['loss']:.3f}"}

    def title(self):
        return f"masked fine-tuning: lr={self.settings.lr}"

    def state_dict(self):
        return {}

    def finish(self):
        return self.masks


def finetune(
    model: torch.nn.Module, targets: list[Target], masks: dict[str, torch.Tensor],
    calib: torch.Tensor, settings: FinetuneSettings, progress: bool = True,
) -> None:
    """Let the kept weights of ``targets`` (already multiplied by ``masks``) learn for
    ``settings.steps`` steps on the calibration windows ``calib``, in place. One process only:
    ``prune`` refuses it under torchrun before any work."""
    world = current_world()
    with Placement(model, targets, world) as placement:
        learn(MaskedFinetune(settings, placement, calib, masks), placement.model, RunDir(None),
              settings, steps=settings.steps, windows=calib.shape[0], world=world,
              gradient_checkpointing=placement.device.type not in ("cpu", "meta"),
              progress=progress)
        if not placement.in_place:  # it learned a copy (another dtype): bring the weights back
            with torch.no_grad():
                for target, learned in zip(targets, placement.targets, strict=True):
                    target.module.weight.copy_(learned.module.weight)
