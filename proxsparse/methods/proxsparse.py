"""ProxSparse: learn the N:M mask end to end by proximal gradient descent (DESIGN.md §2).

The target weights themselves are learned, starting from the pretrained W0. Every step takes
one AdamW step on the language-model loss plus the λ2 term, which pulls each weight back to its
pretrained value or to zero, then applies the proximal operator of λ1·R, which drives every
group towards N non-zeros. At the end the mask is the N largest |W| per group, and the
pretrained weights are kept under it: no weight is updated after the mask is chosen.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..activations import input_feature_norms
from ..errors import (
    COUNT,
    NON_NEGATIVE,
    POSITIVE,
    SHARE,
    STEPS,
    ProxSparseError,
    check_options,
)
from ..models import check_device
from ..nm import NM, groups, topn_mask
from ..prox import prox_nm
from ..runlog import DeferredInterrupt
from .base import LearningConfig, Pruner, option
from .sparsegpt import reconstruct


@dataclass
class ProxSparseConfig(LearningConfig):
    """Defaults: the best configuration measured on SmolLM2-135M (bench/results/quality.md).

    ``lambda1`` is relative to each layer's weight scale (``lambda1_scaling="layer"``); with
    ``"absolute"`` it means what the paper's λ1 means (Llama-2-7B: 0.25).
    """

    lambda1: float = option(0.05, "strength of the N:M regulariser (lambda1), applied by the "
                                  "proximal step after every optimizer step")
    lambda1_scaling: str = option("layer", "'layer': lambda1 is relative to each layer's "
                                           "weight scale; 'absolute': lambda1 as published "
                                           "(Llama-2-7B: 0.25)")
    lambda1_ramp: float = option(0.5, "share of the steps over which lambda1 rises linearly "
                                      "from 0 to its value")
    lambda2: float = option(0.1, "strength of the pull of every weight towards its pretrained "
                                 "value or 0 (lambda2); 0 switches it off")
    epsilon: float = option(0.1, "epsilon of the lambda2 term: added to |W0| in its "
                                 "denominator, so that weights near 0 stay finite")
    lr: float = option(5e-4, "AdamW learning rate (peak, after the warm-up)")
    steps: int = option(0, "optimizer steps; 0: one pass over the calibration windows "
                           "(windows / batch size steps)")
    batch_size: int = option(1, "calibration windows per step")
    warmup: float = option(0.1, "share of the steps with a linear learning-rate warm-up, then "
                                "linear decay to 0")
    max_grad_norm: float = option(1.0, "clip the gradient to this norm before every step")
    train_all: bool = option(False, "also let the non-target parameters learn (as the paper's "
                                    "code); they return to their pretrained values at the end")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass: "
                                                 "less memory, slower steps")
    w0_device: str = option("", "device of the pretrained copy of the weights, e.g. cpu to save "
                                "accelerator memory (\"\": beside the weights)",
                            cli_default="beside the weights")
    input_scaled: bool = option(True, "regularise |W_ij|*||X_j|| (Wanda's score) instead of "
                                      "|W_ij|: the first mask is Wanda's")
    norm_windows: int = option(32, "calibration windows that measure the input norms ||X_j|| "
                                   "for --input-scaled")
    reconstruct: bool = option(False, "after choosing the mask, re-fit the kept weights by "
                                      "SparseGPT's update")
    compile_prox: bool = option(True, "torch.compile the 2:4 proximal step and the lambda2 "
                                      "term (only for models of 5M target weights or more)")
    method = "proxsparse"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_options(self, lambda1=NON_NEGATIVE, lambda1_scaling=("layer", "absolute"),
                      lambda1_ramp=SHARE, lambda2=NON_NEGATIVE, epsilon=POSITIVE,
                      lr=NON_NEGATIVE, steps=STEPS, batch_size=COUNT, warmup=SHARE,
                      max_grad_norm=POSITIVE, norm_windows=COUNT)
        if self.w0_device:
            check_device(self.w0_device, flag="--w0-device")


def lambda2_term(
    weight: torch.Tensor, w0: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Value and gradient of ‖(W ⊘ (W0 + ε·sgn⁺(W0))) ⊙ (W − W0)‖² for one layer.

    Written out by hand rather than through autograd: a few elementwise passes, no graph.
    """
    w0 = w0.to(weight.device, weight.dtype)
    scale = w0 + torch.where(w0 >= 0, epsilon, -epsilon)
    residual = weight * (weight - w0) / scale
    grad = 2 * residual * (2 * weight - w0) / scale
    return residual.square().sum(), grad


def add_lambda2_grad(
    weight: torch.Tensor, w0: torch.Tensor, grad: torch.Tensor, epsilon: float, lambda2: float
) -> torch.Tensor:
    """Adds λ2·∇ of the λ2 term to ``grad`` in place and returns λ2 times its value."""
    value, term_grad = lambda2_term(weight, w0, epsilon)
    grad.add_(term_grad, alpha=lambda2)
    return value * lambda2


@functools.cache
def _compiled_add_lambda2_grad():
    # dynamic: one compilation for all layer shapes (an elementwise pass compiles quickly)
    return torch.compile(add_lambda2_grad, dynamic=True)


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` share of the steps, then linear decay to 0."""
    warm = max(1, math.ceil(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


def layer_lambdas(
    weights: list[torch.Tensor], cfg: ProxSparseConfig,
    column_scales: list[torch.Tensor | None] | None = None,
) -> list[float]:
    """λ1 for each layer.

    R is a product of N+1 magnitudes, so scaling a layer by s scales the prox's effective
    threshold by s^(N-1): with ``lambda1_scaling="layer"`` λ1 is divided by the layer's RMS
    weight to that power, making one λ1 act alike on every layer and every model. With
    ``column_scales`` the RMS is that of the weights the prox sees, W·diag(scale).
    """
    if cfg.lambda1_scaling == "absolute":
        return [cfg.lambda1] * len(weights)
    column_scales = column_scales or [None] * len(weights)
    scales = torch.stack([
        (w.detach().float() if c is None else w.detach().float() * c).square().mean().sqrt()
        for w, c in zip(weights, column_scales, strict=True)]).tolist()
    return [cfg.lambda1 / max(s, 1e-12) ** (cfg.nm.n - 1) for s in scales]


def ramp(step: int, total: int, share: float) -> float:
    """λ1 multiplier: linear from 1/warm to 1 over the first ``share`` of the steps, then 1."""
    warm = math.ceil(share * total)
    return 1.0 if step >= warm else (step + 1) / warm


def nm_share(weights: list[torch.Tensor], nm: NM) -> torch.Tensor:
    """Share of all groups that already hold at most N non-zeros (a tensor: no host sync)."""
    done = sum((groups(w, nm.m) != 0).sum(-1).le(nm.n).sum() for w in weights)
    total = sum(w.numel() // nm.m for w in weights)
    return done / total


class StepRegularisers:
    """What each learning step adds besides the loss gradient: the λ2 term's gradient, before
    the optimiser step, and the prox of λ1·R on the weights, after it.

    ``weights``, ``pretrained`` (W0), ``lambdas`` (λ1 per layer) and ``scales`` (the column
    scales the regulariser sees the weights through, or None) are aligned lists. With
    ``compiled`` both go through torch.compile (the prox's fused 2:4 kernel; one fused pass for
    λ2); if compilation fails, a warning is given and the eager code, same result, takes over.
    """

    def __init__(self, cfg: ProxSparseConfig, weights: list[torch.Tensor],
                 pretrained: list[torch.Tensor], lambdas: list[float],
                 scales: list[torch.Tensor | None], compiled: bool = False) -> None:
        self.cfg, self.weights, self.pretrained = cfg, weights, pretrained
        self.lambdas, self.scales, self.compiled = lambdas, scales, compiled

    @torch.no_grad()
    def add_lambda2_grad(self) -> torch.Tensor:
        """Adds λ2·∇(λ2 term) to every weight's .grad; returns the term's value (times λ2)."""
        cfg = self.cfg
        total = torch.zeros((), device=self.weights[0].device)
        if cfg.lambda2 == 0:
            return total
        for weight, w0 in zip(self.weights, self.pretrained, strict=True):
            total += self._call(_compiled_add_lambda2_grad(), add_lambda2_grad,
                                weight, w0, weight.grad, cfg.epsilon, cfg.lambda2)
        return total

    @torch.no_grad()
    def prox_(self, factor: float = 1.0) -> None:
        """Replaces every weight W by the prox of (factor·λ1)·R, taken at W·diag(scale) and
        mapped back to W's coordinates where the layer has column scales."""
        for weight, lam, scale in zip(self.weights, self.lambdas, self.scales, strict=True):
            if scale is None:
                weight.copy_(self._prox_nm(weight, lam * factor))
            else:
                torch.div(self._prox_nm(weight * scale, lam * factor), scale, out=weight)

    def _prox_nm(self, weight: torch.Tensor, lam: float) -> torch.Tensor:
        nm = self.cfg.nm
        return self._call(functools.partial(prox_nm, compiled=True), prox_nm,
                          weight, lam, nm.n, nm.m)

    def _call(self, compiled_fn, eager_fn, *args):
        """``compiled_fn(*args)`` while compilation works, else ``eager_fn(*args)``."""
        if self.compiled:
            try:
                return compiled_fn(*args)
            except Exception as err:  # no C++ compiler, unsupported platform, ...
                warnings.warn(f"torch.compile failed ({str(err).splitlines()[0]}); using eager "
                              "code for the prox and the λ2 term (slower, same result)",
                              stacklevel=3)
                self.compiled = False
        return eager_fn(*args)


class ProxSparse(Pruner):
    config_class = ProxSparseConfig

    def select_masks(self, model, targets, calib, progress=True):
        cfg: ProxSparseConfig = self.config
        if calib.shape[0] < cfg.batch_size:
            raise ProxSparseError(f"--batch-size {cfg.batch_size} exceeds the "
                                  f"{calib.shape[0]} calibration windows")
        steps = cfg.steps or math.ceil(calib.shape[0] / cfg.batch_size)
        weights = [t.module.weight for t in targets]
        scales = self._input_scales(model, targets, calib, progress)
        requires_grad = {p: p.requires_grad for p in model.parameters()}
        trainable = self._trainable(model, weights)
        w0_device = cfg.w0_device or None
        pretrained = {id(p): p.detach().to(w0_device, copy=True) for p in trainable}
        regularisers = StepRegularisers(
            cfg, weights, [pretrained[id(w)] for w in weights],
            layer_lambdas(weights, cfg, scales), scales,
            compiled=cfg.compile_prox and sum(w.numel() for w in weights) >= 5_000_000)

        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, steps, cfg.warmup))
        run = cfg.open_run(targets, calib)
        start = self._restore(run, trainable, optimizer, schedule, steps) if cfg.resume else 0

        device = weights[0].device
        was_training = model.training
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.train()  # Llama-style blocks have no dropout; needed for gradient checkpointing
        bar = tqdm(range(start, steps), desc="proxsparse", disable=not progress,
                   initial=start, total=steps)
        try:
            with run, DeferredInterrupt() as interrupt:
                for step in bar:
                    batch = self._batch(calib, step, cfg).to(device)
                    loss = model(batch, labels=batch, use_cache=False).loss
                    loss.backward()
                    reg = regularisers.add_lambda2_grad()
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                    regularisers.prox_(ramp(step, steps, cfg.lambda1_ramp))
                    run.record(step, loss=loss, lambda2_term=reg,
                               nm_share=nm_share(weights, cfg.nm))
                    done = step + 1
                    if done % cfg.log_every == 0 or done == steps or interrupt.requested:
                        latest = run.flush()
                        bar.set_postfix(loss=f"{latest['loss']:.3f}",
                                        nm=f"{latest['nm_share']:.3f}",
                                        l2=f"{latest['lambda2_term']:.3g}")
                    if done % cfg.checkpoint_every == 0 or interrupt.requested:
                        self._checkpoint(run, done, trainable, optimizer, schedule)
                    if interrupt.requested:
                        raise KeyboardInterrupt
        finally:
            bar.close()
            if cfg.gradient_checkpointing:
                model.gradient_checkpointing_disable()
            model.train(was_training)
            for param, flag in requires_grad.items():
                param.requires_grad_(flag)
        run.finish(f"ProxSparse {cfg.nm}: λ1={cfg.lambda1}, λ2={cfg.lambda2}, lr={cfg.lr}")

        masks = {}
        with torch.no_grad():
            for target, s in zip(targets, scales, strict=True):
                score = target.module.weight.abs()
                masks[target.name] = topn_mask(score if s is None else score * s, cfg.nm)
            for param in trainable:  # back to the pretrained values; the caller applies masks
                param.copy_(pretrained[id(param)])
        if cfg.reconstruct:
            reconstruct(model, targets, calib, masks, cfg.nm, progress=progress)
        return masks

    # --- pieces of the loop ---

    def _input_scales(self, model, targets, calib, progress) -> list[torch.Tensor | None]:
        """Per-layer column scales the regulariser sees the weights through: ‖X_j‖ normalised
        to RMS 1 with ``input_scaled`` (so the first mask is Wanda's), else None (none)."""
        if not self.config.input_scaled:
            return [None] * len(targets)
        was_training = model.training
        model.eval()
        try:
            norms = input_feature_norms(model, targets, calib[: self.config.norm_windows],
                                        progress=progress)
        finally:
            model.train(was_training)
        scales = []
        for target in targets:
            norm = norms[target.name].to(target.module.weight.device)
            norm = norm / norm.square().mean().sqrt().clamp_min(1e-12)
            scales.append(norm.clamp_min(1e-3))  # silent features: pruned first, no 1/0
        return scales

    def _trainable(self, model: nn.Module, weights: list[torch.Tensor]) -> list[nn.Parameter]:
        if self.config.train_all:
            params = list(model.parameters())
        else:
            target_ids = {id(w) for w in weights}
            for p in model.parameters():
                p.requires_grad_(id(p) in target_ids)
            params = list(weights)
        for p in params:
            p.requires_grad_(True)
        return params

    def _batch(self, calib: torch.Tensor, step: int, cfg: ProxSparseConfig) -> torch.Tensor:
        """Windows of this step: a seeded shuffle of the calibration set, one per epoch."""
        per_epoch = calib.shape[0] // cfg.batch_size
        epoch, index = divmod(step, per_epoch)
        order = torch.randperm(calib.shape[0],
                               generator=torch.Generator().manual_seed(cfg.seed + epoch))
        return calib[order[index * cfg.batch_size : (index + 1) * cfg.batch_size]]

    def _checkpoint(self, run, step, trainable, optimizer, schedule) -> None:
        run.save_checkpoint({
            "step": step,
            "params": [p.detach().cpu() for p in trainable],
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
        })

    def _restore(self, run, trainable, optimizer, schedule, steps) -> int:
        state = run.load_checkpoint({
            "step": int, "params": list, "optimizer": dict, "schedule": dict})
        if state is None:
            return 0
        with torch.no_grad():
            for param, value in zip(trainable, state["params"], strict=True):
                param.copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        return min(state["step"], steps)
