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
from ..learning import (
    LearningMethod,
    Placement,
    current_world,
    launched_by_torchrun,
    learn,
    lm_loss_backward,
)
from ..learning.distributed import (
    clip_grad_norm_,
    full,
    local,
)
from ..learning.optimizers import (
    STATES,
    adamw,
    load_training_state,
    lr_factor,
    training_state,
)
from ..models import check_device
from ..nm import NM, groups, topn_mask
from ..prox import prox_nm
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
    gradient_checkpointing: str = option("auto", "recompute activations in the backward pass "
                                                 "(on/off): less memory, slower steps; auto: "
                                                 "on accelerators only")
    w0_device: str = option("", "device of the pretrained copy of the weights when learning in "
                                "place (\"\": host memory on accelerators, else beside the "
                                "weights)", cli_default="host memory on accelerators")
    input_scaled: bool = option(True, "regularise |W_ij|*||X_j|| (Wanda's score) instead of "
                                      "|W_ij|: the first mask is Wanda's")
    norm_windows: int = option(32, "calibration windows that measure the input norms ||X_j|| "
                                   "for --input-scaled")
    reconstruct: bool = option(False, "after choosing the mask, re-fit the kept weights by "
                                      "SparseGPT's update")
    optimizer_states: str = option("auto", "precision of AdamW's two states: auto (the "
                                           "learning dtype), 8bit (torchao's AdamW8bit: 2 bytes "
                                           "per weight for both; pip install torchao)")
    compile_prox: bool = option(True, "compiled proximal step (2:4: torch.compile; 4:8 and "
                                      "other M=4/8 patterns on the CPU: a C++ kernel) and "
                                      "lambda2 term (only for models of 5M target weights or "
                                      "more)")
    method = "proxsparse"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_options(self, lambda1=NON_NEGATIVE, lambda1_scaling=("layer", "absolute"),
                      lambda1_ramp=SHARE, lambda2=NON_NEGATIVE, epsilon=POSITIVE,
                      lr=NON_NEGATIVE, steps=STEPS, batch_size=COUNT, warmup=SHARE,
                      max_grad_norm=POSITIVE, norm_windows=COUNT)
        if isinstance(self.gradient_checkpointing, bool):
            self.gradient_checkpointing = "on" if self.gradient_checkpointing else "off"
        check_options(self, gradient_checkpointing=("auto", "on", "off"),
                      optimizer_states=STATES)
        if self.w0_device:
            check_device(self.w0_device, flag="--w0-device")

    def checkpoints_activations(self, device: torch.device) -> bool:
        """Whether gradient checkpointing is on when learning on ``device``."""
        if self.gradient_checkpointing == "auto":
            return device.type not in ("cpu", "meta")
        return self.gradient_checkpointing == "on"


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


def column_scale(input_norm: torch.Tensor) -> torch.Tensor:
    """The column scales the regulariser sees a layer through: its input norms ‖X_j‖ at RMS 1,
    floored at 1e-3 (silent features are pruned first, and no 1/0 maps the prox back)."""
    scale = input_norm / input_norm.square().mean().sqrt().clamp_min(1e-12)
    return scale.clamp_min(1e-3)


def ramp(step: int, total: int, share: float) -> float:
    """λ1 multiplier: linear from 1/warm to 1 over the first ``share`` of the steps, then 1."""
    warm = math.ceil(share * total)
    return 1.0 if step >= warm else (step + 1) / warm


def nm_done(weights: list[torch.Tensor], nm: NM) -> torch.Tensor:
    """How many groups already hold at most N non-zeros (a tensor: no host sync)."""
    return sum((groups(w, nm.m) != 0).sum(-1).le(nm.n).sum() for w in weights)


class StepRegularisers:
    """What each learning step adds besides the loss gradient: the λ2 term's gradient, before
    the optimiser step, and the prox of λ1·R on the weights, after it.

    ``params`` (whole or sharded), ``pretrained`` (W0, the rows this process holds),
    ``lambdas`` (λ1 per layer) and ``scales`` (the column scales the regulariser sees the
    weights through, or None) are aligned lists. With
    ``compiled`` both go through compiled code (the prox's fused 2:4 kernel or the C++ N:M
    kernel; one fused pass for λ2); if compilation fails, a warning is given and the eager
    code, same result, takes over.
    """

    def __init__(self, cfg: ProxSparseConfig, params: list[torch.Tensor],
                 pretrained: list[torch.Tensor], lambdas: list[float],
                 scales: list[torch.Tensor | None], compiled: bool = False) -> None:
        self.cfg, self.params, self.pretrained = cfg, params, pretrained
        self.lambdas, self.scales, self.compiled = lambdas, scales, compiled

    @property
    def weights(self) -> list[torch.Tensor]:
        """The weights this process holds (its rows of each, with several processes)."""
        return [local(p) for p in self.params]

    @torch.no_grad()
    def add_lambda2_grad(self) -> torch.Tensor:
        """Adds λ2·∇(λ2 term) to every weight's .grad; returns the term's value (times λ2)."""
        cfg = self.cfg
        total = torch.zeros((), device=self.weights[0].device)
        if cfg.lambda2 == 0:
            return total
        for param, w0 in zip(self.params, self.pretrained, strict=True):
            total += self._call(_compiled_add_lambda2_grad(), add_lambda2_grad,
                                local(param), w0, local(param.grad), cfg.epsilon, cfg.lambda2)
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
    multi_process = True

    def select_masks(self, model, targets, calib, progress=True):
        cfg: ProxSparseConfig = self.config
        if cfg.optimizer_states == "8bit" and launched_by_torchrun():
            raise ProxSparseError("--optimizer-states 8bit runs in one process (its sharded "
                                  "states are not tested here): drop it under torchrun")
        world = current_world(cfg.learn_device)
        steps = cfg.steps or math.ceil(calib.shape[0] / cfg.batch_size)
        run = cfg.open_run(targets, calib, writer=world.is_main)
        with Placement(model, targets, world, cfg.learn_dtype, cfg.w0_device) as placement:
            learning = ProxSparseLearning(cfg, placement, calib, steps, progress)
            masks = learn(learning, placement.model, run, cfg, steps=steps,
                          windows=calib.shape[0], world=world,
                          gradient_checkpointing=cfg.checkpoints_activations(placement.device),
                          progress=progress)
        if cfg.reconstruct:
            reconstruct(model, targets, calib, masks, cfg.nm, progress=progress)
        return masks


class ProxSparseLearning(LearningMethod):
    """ProxSparse's state and step on the shared loop: the learned weights (this rank's rows),
    their pretrained values, AdamW and its schedule, and the two regularisers."""

    name = "proxsparse"
    backprop = True

    def __init__(self, cfg: ProxSparseConfig, placement: Placement, calib: torch.Tensor,
                 steps: int, progress: bool) -> None:
        self.cfg, self.placement, self.calib = cfg, placement, calib
        self.steps, self.progress = steps, progress
        self.device = placement.targets[0].module.weight.device

    def setup(self, state: dict | None) -> None:
        cfg, placement = self.cfg, self.placement
        self.params = [t.module.weight for t in placement.targets]
        self.scales = self._input_scales()
        self.trainable = self._trainable()
        self.pretrained = dict(zip(map(id, self.trainable), placement.pretrained(self.trainable),
                                   strict=True))
        self.regularisers = StepRegularisers(
            cfg, self.params, [self.pretrained[id(w)] for w in self.params],
            layer_lambdas([placement.original_weight(t) for t in placement.targets], cfg,
                          self.scales),
            self.scales,
            compiled=cfg.compile_prox and sum(w.numel() for w in self.params) >= 5_000_000)
        self.total_groups = sum(w.numel() // cfg.nm.m for w in self.params)
        self.optimizer = adamw(self.trainable, cfg.lr, cfg.optimizer_states)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.steps, cfg.warmup))
        if state is not None:
            load_training_state(state, self.trainable, self.optimizer, self.schedule,
                                placement.world)

    def step(self, step, batches):
        cfg, world = self.cfg, self.placement.world
        loss = lm_loss_backward(self.placement.model, self.calib, batches, self.device)
        reg = self.regularisers.add_lambda2_grad()
        clip_grad_norm_(self.trainable, cfg.max_grad_norm, world)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.regularisers.prox_(ramp(step, self.steps, cfg.lambda1_ramp))
        done = nm_done(self.regularisers.weights, cfg.nm)
        if world.sharded:  # the metrics of the whole model: sums over the ranks
            loss = world.all_sum(loss) / world.size
            reg, done = world.all_sum(reg), world.all_sum(done)
        return {"loss": loss, "lambda2_term": reg, "nm_share": done / self.total_groups}

    def postfix(self, latest):
        return {"loss": f"{latest['loss']:.3f}", "nm": f"{latest['nm_share']:.3f}",
                "l2": f"{latest['lambda2_term']:.3g}"}

    def title(self):
        cfg = self.cfg
        return f"ProxSparse {cfg.nm}: λ1={cfg.lambda1}, λ2={cfg.lambda2}, lr={cfg.lr}"

    def state_dict(self):
        return training_state(self.trainable, self.optimizer, self.schedule,
                              self.placement.world)

    def finish(self):
        cfg = self.cfg
        masks = {}
        with torch.no_grad():
            for target, param, s in zip(self.placement.targets, self.params, self.scales,
                                        strict=True):
                score = full(param).abs()
                masks[target.name] = topn_mask(score if s is None else score * s, cfg.nm)
        self.placement.restore()  # the pretrained values back; the caller applies the masks
        return masks

    # --- pieces of the setup ---

    def _input_scales(self) -> list[torch.Tensor | None]:
        """Per-layer column scales the regulariser sees the weights through: ‖X_j‖ normalised
        to RMS 1 with ``input_scaled`` (so the first mask is Wanda's), else None (none). Every
        rank measures them on the same windows, so they agree without communication."""
        cfg, targets = self.cfg, self.placement.targets
        if not cfg.input_scaled:
            return [None] * len(targets)
        model = self.placement.model
        was_training = model.training
        model.eval()
        try:
            norms = input_feature_norms(model, targets, self.calib[: cfg.norm_windows],
                                        progress=self.progress and self.placement.world.is_main)
        finally:
            model.train(was_training)
        return [column_scale(norms[target.name].to(self.device)) for target in targets]

    def _trainable(self) -> list[nn.Parameter]:
        params = (list(self.placement.model.parameters()) if self.cfg.train_all
                  else list(self.params))
        self.placement.train_only(params)
        return params
