"""ProSparse (DESIGN.md §9): the L1 schedule and penalty on the MLP activations.

The tensor maths of the method, ahead of its learning loop (issue #14):

- the staged λ schedule: stages end at shares of the run; inside a stage whose λ rises, λ
  follows a sine ramp from the previous stage's value, η = ½·(sin(−π/2 + π·p) + 1) with p the
  progress through the stage; a stage with the same λ as the one before holds it;
- the penalty λ·Σ_layers mean_tokens ‖x₁‖₁ over the activated gates of the gated MLPs,
  collected by forward hooks as a differentiable sum (no host sync).

Then the method on the shared loop: ReLU in every gated MLP, learning with the L1 term on the
LM loss, FATReLU at the end. It learns in place, in one process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import COUNT, NON_NEGATIVE, POSITIVE, SHARE, STEPS, ProxSparseError, check_options
from ..gated_mlp import FATReLU, gated_mlps, substitute_relu, threshold_for_sparsity
from ..learning import (
    LearningMethod,
    Placement,
    current_world,
    learn,
)
from ..learning.distributed import (
    clip_grad_norm_,
)
from ..learning.optimizers import adamw, load_training_state, lr_factor, training_state
from .base import LearningConfig, Pruner, option


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


TARGET_WINDOWS = 8  # calibration windows that set the threshold of --target-sparsity


class ActivationL1:
    """Context manager: while open, ``total`` is Σ_layers mean over tokens of ‖act(gate(x))‖₁
    for the forward passes run since the last ``reset()``, with its autograd graph, and
    ``zeros`` the share of exact zeros among those activations (detached)."""

    def __init__(self, model: nn.Module) -> None:
        self.mlps = gated_mlps(model)
        self.total: torch.Tensor | None = None
        self._zeros: list[torch.Tensor] = []
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
        self._zeros.append((output.detach() == 0).float().mean())

    @property
    def zeros(self) -> torch.Tensor:
        return torch.stack(self._zeros).mean()

    def reset(self) -> None:
        self.total = None
        self._zeros = []

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# --- the method on the shared learning loop ---

@dataclass
class ProSparseConfig(LearningConfig):
    """Defaults sized for this machine's budget; DESIGN.md §9 has the published 7B schedule."""

    stages: str = option("0.1:0,0.4:0.0005,0.7:0.002,1:0.002",
                         "the L1 schedule: END:LAMBDA stages, END a share of the steps; inside "
                         "a rising stage lambda follows a sine ramp, a stage with the previous "
                         "lambda holds it")
    threshold: float = option(0.01, "FATReLU threshold set at the end: activations below it "
                                    "become 0 (0: plain ReLU)")
    target_sparsity: float = option(0.0, "at the end, raise the FATReLU threshold above "
                                         "--threshold until this share of the MLP activations "
                                         "is zero on calibration windows (0: off)")
    adapt: float = option(0.25, "with --target-sparsity: the share of the steps, at the end, "
                                "that learn with that threshold in place, so the model adapts "
                                "to it (0: it is set after the last step)")
    train: str = option("all", "which parameters learn: all, or mlp (the gated MLPs only)")
    lr: float = option(3e-5, "AdamW learning rate (peak, after the warm-up)")
    steps: int = option(0, "optimizer steps; 0: one pass over the calibration windows")
    batch_size: int = option(1, "calibration windows per step")
    warmup: float = option(0.1, "share of the steps with a linear learning-rate warm-up, then "
                                "linear decay to 0")
    max_grad_norm: float = option(1.0, "clip the gradient to this norm before every step")
    method = "prosparse"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_options(self, threshold=NON_NEGATIVE, target_sparsity=SHARE, adapt=SHARE,
                      train=("all", "mlp"),
                      lr=NON_NEGATIVE, steps=STEPS, batch_size=COUNT, warmup=SHARE,
                      max_grad_norm=POSITIVE)
        parse_stages(self.stages)
        if self.permute:
            raise ProxSparseError("--permute reorders channels for N:M masks, which prosparse "
                                  "does not make: permute when pruning its output to N:M")


class ProSparse(Pruner):
    """Activation sparsity: ReLU in every gated MLP, then learning with the staged L1 penalty,
    then FATReLU. It changes weights and the activation, and makes no N:M mask."""

    config_class = ProSparseConfig
    makes_masks = False

    def select_masks(self, model, targets, calib, progress=True):
        cfg: ProSparseConfig = self.config
        world = current_world(cfg.learn_device)
        steps = cfg.steps or math.ceil(calib.shape[0] / cfg.batch_size)
        run = cfg.open_run(targets, calib)
        with Placement(model, targets, world, cfg.learn_dtype) as placement:
            if not placement.in_place:
                raise ProxSparseError("prosparse learns the model in place: load it in the "
                                      "learning dtype on the learning device (--dtype, "
                                      "--device) and leave --learn-dtype/--learn-device unset")
            learning = ProSparseLearning(cfg, placement, calib, steps)
            learn(learning, placement.model, run, cfg, steps=steps, windows=calib.shape[0],
                  world=world, progress=progress)
        return {}


class ProSparseLearning(LearningMethod):
    name = "prosparse"
    backprop = True

    def __init__(self, cfg: ProSparseConfig, placement: Placement, calib: torch.Tensor,
                 steps: int) -> None:
        self.cfg, self.placement, self.calib, self.steps = cfg, placement, calib, steps
        self.stages = parse_stages(cfg.stages)
        self.model = placement.model
        self.device = next(self.model.parameters()).device
        self.threshold = 0.0  # of the FATReLU the model learns with (ReLU until adapt_step)
        adapting = cfg.target_sparsity > 0 and cfg.adapt > 0
        self.adapt_step = steps - max(1, round(cfg.adapt * steps)) if adapting else None

    def setup(self, state):
        cfg = self.cfg
        mlps = substitute_relu(self.model, 0.0)
        if state is not None:
            self._use_threshold(float(state.get("threshold", 0.0)))
        if cfg.train == "mlp":
            self.trainable = [p for m in mlps for p in m.module.parameters()]
        else:
            self.trainable = list(self.model.parameters())
        self.placement.train_only(self.trainable)
        self.penalty = ActivationL1(self.model)
        self.optimizer = adamw(self.trainable, cfg.lr)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.steps, cfg.warmup))
        if state is not None:
            load_training_state(state, self.trainable, self.optimizer, self.schedule,
                                self.placement.world)

    def _use_threshold(self, threshold: float) -> None:
        self.threshold = threshold
        for mlp in gated_mlps(self.model):
            mlp.module.act_fn = FATReLU(threshold)

    def _target_threshold(self) -> float:
        """The threshold that zeroes --target-sparsity of the activations now (never lower
        than --threshold or the one in use)."""
        target = threshold_for_sparsity(self.model, self.calib[:TARGET_WINDOWS],
                                        self.cfg.target_sparsity, seed=self.cfg.seed)
        return max(self.cfg.threshold, self.threshold, target)

    def step(self, step, batches):
        if step == self.adapt_step:
            self._use_threshold(self._target_threshold())
        lam = l1_lambda(step, self.steps, self.stages)
        share = sum(len(b) for b in batches)
        loss = torch.zeros((), device=self.device)
        l1 = torch.zeros((), device=self.device)
        zeros = torch.zeros((), device=self.device)
        with self.penalty:
            for windows in batches:
                batch = self.calib[windows].to(self.device)
                self.penalty.reset()
                lm = self.placement.model(batch, labels=batch, use_cache=False).loss
                term = self.penalty.total
                weight = len(windows) / share
                ((lm + lam * term) * weight).backward()
                loss += lm.detach() * weight
                l1 += term.detach() * weight
                zeros += self.penalty.zeros * weight
        clip_grad_norm_(self.trainable, self.cfg.max_grad_norm, self.placement.world)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "l1": l1, "zeros": zeros, "lambda": torch.tensor(lam)}

    def postfix(self, latest):
        return {"loss": f"{latest['loss']:.3f}", "l1": f"{latest['l1']:.3g}",
                "zeros": f"{latest['zeros']:.1%}",
                "lambda": f"{latest['lambda']:.2g}"}

    def title(self):
        return f"ProSparse: stages {self.cfg.stages}, lr={self.cfg.lr}"

    def state_dict(self):
        return {**training_state(self.trainable, self.optimizer, self.schedule,
                                 self.placement.world), "threshold": self.threshold}

    def finish(self):
        if self.cfg.target_sparsity > 0:  # again: adapting may have moved the activations
            self._use_threshold(self._target_threshold())
        else:
            self._use_threshold(max(self.cfg.threshold, self.threshold))
        return {}
