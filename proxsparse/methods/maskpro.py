"""MaskPro: learn the N:M mask as a probability distribution over each group (DESIGN.md §3).

The weights stay frozen at their pretrained values. Every group of M weights holds M logits π,
starting at C·m0 for a prior mask m0. Each step draws a mask (N distinct positions per group,
sampled without replacement from softmax(π)), measures the language-model loss L_t under it with
a forward pass only, and follows a policy-gradient (REINFORCE) estimate:

    π ← π − η·(L_t − L_0 − δ)·∇π log p(mask | π)

L_0 is the loss of the prior mask on the same windows (a paired comparison: what the windows
themselves cost cancels out) and δ the moving average of L_t − L_0 before this step, a baseline
that lowers the variance. The final mask is the top-N logits of every group.

Layout: per layer, the logits and everything derived from them are ``[M, groups]``, position
first. Every per-position operation is then one contiguous pass over all groups of the layer,
several times faster on CPU than reducing a trailing dimension of size M.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import COUNT, NON_NEGATIVE, POSITIVE, STEPS, ProxSparseError, check_options
from ..export import load_masks
from ..learning import (
    LearningMethod,
    Placement,
    current_world,
    learn,
)
from ..models import Target
from ..nm import groups, pack_mask, topn_mask, unpack_mask
from .base import LearningConfig, Pruner, option

MAX_N = 4  # log p(set) sums over the N! orders a set can be drawn in: 24 for N = 4
BASELINE_DECAY = 0.99  # δ ← 0.99·δ + 0.01·(L_t − L_0)
TINY = 1e-30  # floor on a draw probability: an entry not drawn yet can always be drawn
FAR = 1e9  # beyond any logit: pushes an entry out of a min or max


@dataclass
class MaskProConfig(LearningConfig):
    prior: str = option("magnitude", "the mask learning starts from: magnitude, wanda, "
                                     "sparsegpt or proxsparse (computed first), or a mask file "
                                     "or proxsparse output directory")
    logit_scale: float = option(10.0, "C: every group's logits start at C times the prior "
                                      "mask (larger: closer to the prior)")
    lr: float = option(50.0, "policy-gradient step size (eta, as published, with the loss a "
                             "mean over tokens)")
    steps: int = option(1000, "policy-gradient steps, each one mask drawn and one forward "
                              "pass; 0: no learning, the prior mask is the result")
    batch_size: int = option(1, "calibration windows per step")
    checkpoint_every: int = 100
    method = "maskpro"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_options(self, logit_scale=POSITIVE, lr=NON_NEGATIVE, steps=STEPS,
                      batch_size=COUNT)


# --- sampling N of M without replacement, and the log-probability of the drawn set ---


def sample_sets(
    logits: torch.Tensor, n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw N distinct positions per group from softmax(``logits`` ``[M, G]``) without
    replacement; returns their indices ``[N, G]`` in draw order."""
    return _draw(logits.softmax(0), n, generator)[0]


def set_log_prob(logits: torch.Tensor, picks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(set) of the unordered sets ``picks`` ``[N, G]`` drawn without replacement from
    softmax(``logits`` ``[M, G]``), ``[G]``, and its gradient with respect to the logits."""
    p = logits.softmax(0)
    return _log_prob_and_grad(p, picks, never=p.scatter(0, picks, 0.0).sum(0))


def _draw(
    p: torch.Tensor, n: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """N successive inverse-CDF draws from the columns of ``p`` ``[M, G]``, each from what is
    left, all groups at once. Returns the picks ``[N, G]`` and what is left (``p`` with the
    drawn entries zeroed)."""
    m = p.shape[0]
    left = p.clamp_min(TINY)
    uniform = torch.rand((n, p.shape[1]), generator=generator, device=p.device, dtype=p.dtype)
    picks = []
    for draw in range(n):
        cum = [left[0]]
        for k in range(1, m):
            cum.append(cum[-1] + left[k])
        # u < 1 keeps the target below the total, so a drawn (zero) entry is never landed on.
        target = uniform[draw] * cum[-1]
        pick = (torch.stack(cum[:-1]) <= target).sum(0, dtype=torch.uint8).long()
        left.scatter_(0, pick.unsqueeze(0), 0.0)
        picks.append(pick)
    return torch.stack(picks), left


@functools.cache
def _later(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[N!, N−1, N]``: for every order the N picks can be drawn in and every draw k ≥ 1,
    which picks are drawn at k or later (still left)."""
    orders = torch.tensor(list(itertools.permutations(range(n))))  # orders[σ, k]: pick at draw k
    position = orders.argsort(-1)  # position[σ, j]: the draw of pick j
    draws = torch.arange(1, n).view(1, -1, 1)
    return (position.unsqueeze(1) >= draws).to(device, dtype)


def _log_prob_and_grad(
    p: torch.Tensor, picks: torch.Tensor, never: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(set) and ∇π log p(set), from the probabilities ``p`` ``[M, G]``, the picks and the
    mass ``never`` drawn.

    p(set) sums, over the N! orders the set can be drawn in, Π_k p_(k) / (mass left at draw k).
    For one order, ∇ log of that product is 1_set − Σ_k softmax(π over what is left at draw k);
    ∇ log p(set) averages these, each order weighted by its share of p(set). The first draw has
    all the mass (1) in every order, so it adds p to the gradient and nothing to the shares.
    The mass left is summed from the entries still there, never taken as 1 − (what was drawn),
    so it stays accurate when the drawn entries hold nearly all the mass.
    """
    n = picks.shape[0]
    if n > MAX_N:
        raise ProxSparseError(f"maskpro supports N ≤ {MAX_N} (it sums over the N! orders of a "
                              "drawn set); use a pattern such as 2:4 or 4:8, or another method")
    later = _later(n, p.device, p.dtype).flatten(0, 1)  # [N!·(N−1), N]
    picked = p.gather(0, picks)
    left = (later @ picked + never).view(math.factorial(n), n - 1, p.shape[1])  # [N!, N−1, G]
    log_share = -left.log().sum(1)  # log of each order's product, less Σ log p_pick
    # A pick is in the softmax of the draws up to its own; the entries never drawn in all.
    weighted = (log_share.softmax(0).unsqueeze(1) / left).flatten(0, 1)
    per_pick = 1 + later.T @ weighted
    per_rest = 1 + weighted.sum(0)
    log_prob = picked.log().sum(0) + log_share.logsumexp(0)
    grad = (p * -per_rest).scatter_(0, picks, 1 - picked * per_pick)
    return log_prob, grad


def _grad_of_pairs(p: torch.Tensor, kept: torch.Tensor, never: torch.Tensor) -> torch.Tensor:
    """∇π log p(set) for N = 2 in closed form from the kept mask ``[M, G]`` (0/1): the same
    result as ``_log_prob_and_grad`` with no gather or scatter, the costliest steps on CPU.

    With r_i = 1 / (p_i + never) for the two picks (the mass left if i is drawn second),
    R = Σ r and Q = Σ r²: ∂/∂π_i = 1 − p_i(1 + r_i²/R) for a pick, −p_l(1 + Q/R) otherwise.
    """
    r = kept / (p + never)
    squares = r.square()
    return kept - p * (1 + (squares + (1 - kept) * squares.sum(0)) / r.sum(0))


def window_losses(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of every window ``[b]``. The windows have equal lengths, so the mean
    of these is the loss of the batch."""
    logits = model(batch, use_cache=False).logits[:, :-1]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
    return loss.view(len(batch), -1).mean(-1)


# --- the method on the learning loop ---


@dataclass
class _Layer:
    """One target layer, each tensor ``[M, groups]``.

    Memory per weight, besides the pretrained copy: the logits as float16 offsets from C·prior
    (2 bytes), the prior (1 byte), and this step's gradient in float16 (2 bytes). An offset
    starts at 0 and only moves where the policy gradient moves it, so half precision resolves
    the updates (≈1e-3 relative) at half the memory of float32 logits.
    """

    weight: torch.Tensor  # a view of the live weight, rewritten as pretrained × mask
    pretrained: torch.Tensor
    prior: torch.Tensor  # uint8 0/1
    offset: torch.Tensor  # float16: logits − C·prior
    grad: torch.Tensor | None = None  # float16 ∇π log p(this step's mask)

    def logits(self, scale: float, prior: torch.Tensor | None = None) -> torch.Tensor:
        # Explicit casts: CPU kernels mixing dtypes are many times slower than float-only ones.
        prior = self.prior.float() if prior is None else prior
        return self.offset.float().add_(prior, alpha=scale)

    def show(self, mask: torch.Tensor) -> None:
        torch.mul(self.pretrained, mask, out=self.weight)


class MaskPro(Pruner):
    config_class = MaskProConfig

    def select_masks(self, model, targets, calib, progress=True):
        cfg: MaskProConfig = self.config
        if cfg.nm.n > MAX_N:
            raise ProxSparseError(f"maskpro supports N ≤ {MAX_N} (it sums over the N! orders of "
                                  f"a drawn set), not {cfg.nm}; use e.g. 2:4 or 4:8, or "
                                  "proxsparse")
        world = current_world(cfg.learn_device)
        run = cfg.open_run(targets, calib)
        with Placement(model, targets, world, cfg.learn_dtype) as placement:
            learning = MaskProLearning(cfg, placement, calib, progress)
            try:
                return learn(learning, placement.model, run, cfg, steps=cfg.steps,
                             windows=calib.shape[0], world=world, progress=progress)
            finally:
                learning.show_pretrained()  # however it ends, the weights are the pretrained


class MaskProLearning(LearningMethod):
    """MaskPro's state and step on the shared loop: per layer the logits (as offsets from
    C·prior), the paired prior losses L_0, the baseline δ and the sampler's generator."""

    name = "maskpro"
    backprop = False

    def __init__(self, cfg: MaskProConfig, placement: Placement, calib: torch.Tensor,
                 progress: bool) -> None:
        self.cfg, self.placement, self.calib, self.progress = cfg, placement, calib, progress
        self.targets = placement.targets
        self.device = self.targets[0].module.weight.device
        self.changed = None  # groups whose top-N logits differ from the prior, as last counted
        self.layers: list[_Layer] = []

    def show_pretrained(self) -> None:
        """Put the pretrained weights back (the steps write pretrained × sampled mask)."""
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.copy_(layer.pretrained)

    def _by_position(self, x: torch.Tensor) -> torch.Tensor:
        return groups(x, self.cfg.nm.m).flatten(0, 1).t()

    def setup(self, state: dict | None) -> None:
        cfg, targets, device = self.cfg, self.targets, self.device
        weights = [self._by_position(t.module.weight.detach()) for t in targets]
        pretrained = [w.contiguous() for w in weights]  # the one copy of the pretrained weights
        if state is None:
            model = self.placement.model
            try:
                priors = self._prior_masks(model, targets, self.calib, self.progress)
            finally:
                with torch.no_grad():  # Wanda and SparseGPT write into the weights
                    for weight, w0 in zip(weights, pretrained, strict=True):
                        weight.copy_(w0)
        else:
            self._check_state(state)
            priors = {t.name: unpack_mask(packed, tuple(t.module.weight.shape), cfg.nm)
                      for t, packed in zip(targets, state["priors"], strict=True)}
        self.layers = []
        for target, weight, w0 in zip(targets, weights, pretrained, strict=True):
            prior = self._by_position(priors[target.name].to(device, torch.uint8)).contiguous()
            self.layers.append(_Layer(weight, w0, prior,
                                      torch.zeros_like(w0, dtype=torch.float16)))
        del weights, pretrained, priors
        count = self.calib.shape[0]
        self.generator = torch.Generator(device).manual_seed(cfg.seed)
        self.baseline = torch.zeros((), device=device)  # δ
        self.prior_loss = torch.zeros(count, device=device)  # L_0 per window, filled lazily
        self.known = torch.zeros(count, dtype=torch.bool)  # host-side: which are filled
        if state is not None:
            for layer, offset in zip(self.layers, state["offsets"], strict=True):
                layer.offset.copy_(offset)
            self.baseline = state["baseline"].to(device)
            self.prior_loss, self.known = state["prior_loss"].to(device), state["known"]
            self.generator.set_state(state["generator"])

    def step(self, step, batches):
        cfg, layers, model = self.cfg, self.layers, self.placement.model
        windows = torch.cat(batches)
        self._fill_prior_losses(model, windows)
        explored = self._sample(layers, self.generator)
        loss = torch.cat([window_losses(model, self.calib[b].to(self.device))
                          for b in batches]).mean()
        residual = loss - self.prior_loss[windows.to(self.device)].mean()
        advantage = residual - self.baseline
        self.baseline = BASELINE_DECAY * self.baseline + (1 - BASELINE_DECAY) * residual
        self._update(layers, cfg.lr * advantage)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps or self.changed is None:
            self.changed = self._changed(layers)  # a full pass over the logits: not every step
        return {"loss": loss, "prior_loss": loss - residual, "residual": residual,
                "baseline": self.baseline, "explored": explored, "changed": self.changed}

    def postfix(self, latest):
        return {"loss": f"{latest['loss']:.3f}", "L0": f"{latest['prior_loss']:.3f}",
                "delta": f"{latest['baseline']:+.2g}", "changed": int(latest["changed"])}

    def title(self):
        cfg = self.cfg
        return f"MaskPro {cfg.nm}: prior={cfg.prior}, C={cfg.logit_scale}, lr={cfg.lr}"

    def state_dict(self):
        return {
            "priors": [pack_mask(layer.prior.t().contiguous().bool(), self.cfg.nm)
                       for layer in self.layers],
            "offsets": [layer.offset.cpu() for layer in self.layers],
            "baseline": self.baseline.cpu(),
            "prior_loss": self.prior_loss.cpu(),
            "known": self.known.clone(),
            "generator": self.generator.get_state(),
        }

    def _check_state(self, state: dict) -> None:
        kinds = {"priors": list, "offsets": list, "baseline": torch.Tensor,
                 "prior_loss": torch.Tensor, "known": torch.Tensor, "generator": torch.Tensor}
        if not all(isinstance(state.get(k), kind) for k, kind in kinds.items()):
            raise ProxSparseError("the checkpoint holds no MaskPro state; delete the run "
                                  "directory to start afresh")

    def finish(self):
        cfg, nm = self.cfg, self.cfg.nm
        self.show_pretrained()
        if int(self._changed(self.layers)) == 0:
            warnings.warn(f"MaskPro ended on its prior mask: no group's top-{nm.n} logits changed "
                          f"in {cfg.steps} steps, so the result is the {cfg.prior!r} mask. More "
                          "steps or a smaller --logit-scale let it explore more (a much larger "
                          "--lr makes it unstable).", stacklevel=2)
        masks = {}
        for target, layer in zip(self.targets, self.layers, strict=True):
            logits = layer.logits(cfg.logit_scale).t().reshape(target.module.weight.shape)
            masks[target.name] = topn_mask(logits, nm)
        return masks

    # --- pieces of the step ---

    def _fill_prior_losses(self, model, windows: torch.Tensor) -> None:
        """L_0 of the windows not seen yet: one forward with the prior mask, once per window."""
        missing = windows[~self.known[windows]]
        if len(missing) == 0:
            return
        for layer in self.layers:
            layer.show(layer.prior.float())
        self.prior_loss[missing.to(self.device)] = window_losses(
            model, self.calib[missing].to(self.device))
        self.known[missing] = True

    def _sample(self, layers: list[_Layer], generator: torch.Generator) -> torch.Tensor:
        """Sample this step's mask of every layer, put it on the weights and keep the gradient
        of its log-probability for the update. Returns how many groups the sample moved off the
        prior."""
        cfg: MaskProConfig = self.cfg
        explored = torch.zeros((), device=layers[0].offset.device)
        for layer in layers:
            prior = layer.prior.float()
            p = layer.logits(cfg.logit_scale, prior).softmax(0)
            picks, left = _draw(p, cfg.nm.n, generator)
            mask = 1 - left.sign()  # the drawn entries are exactly the zeros left
            if cfg.nm.n == 2:
                grad = _grad_of_pairs(p, mask, never=left.sum(0))
            else:
                grad = _log_prob_and_grad(p, picks, never=left.sum(0))[1]
            layer.grad = grad.half()
            layer.show(mask)
            explored = explored + (mask * prior).sum(0).lt(cfg.nm.n - 0.5).sum()
        return explored

    def _changed(self, layers: list[_Layer]) -> torch.Tensor:
        """How many groups' top-N logits differ from the prior now."""
        changed = torch.zeros((), device=layers[0].offset.device)
        for layer in layers:
            prior = layer.prior.float()
            logits = layer.logits(self.cfg.logit_scale, prior)
            # The top-N is still the prior while every kept logit beats every dropped one.
            highest_dropped = logits.add(prior, alpha=-FAR).amax(0)
            lowest_kept = logits.add(1 - prior, alpha=FAR).amin(0)
            changed = changed + highest_dropped.ge(lowest_kept).sum()
        return changed

    def _update(self, layers: list[_Layer], step_size: torch.Tensor) -> None:
        """π ← π − step_size·∇π log p(this step's mask)."""
        for layer in layers:
            layer.offset.copy_(torch.addcmul(layer.offset.float(), layer.grad.float(),
                                             step_size, value=-1))
            layer.grad = None

    def _prior_masks(self, model, targets: list[Target], calib, progress) -> dict:
        """m0: another method's masks on the same windows, or a saved mask file."""
        from . import PRUNERS, config_for, pruner_for  # here: the registry imports this module

        cfg: MaskProConfig = self.cfg
        if cfg.prior in PRUNERS and cfg.prior != cfg.method:
            prior = config_for(cfg.prior, nm=cfg.nm, include=cfg.include, ignore=cfg.ignore,
                               seed=cfg.seed)
            return pruner_for(prior).select_masks(model, targets, calib, progress)
        if not Path(cfg.prior).exists():
            methods = ", ".join(m for m in PRUNERS if m != cfg.method)
            raise ProxSparseError(f"--prior {cfg.prior!r} is neither a method ({methods}) nor "
                                  "a mask file or proxsparse output directory")
        masks, nm = load_masks(cfg.prior)
        if nm != cfg.nm:
            raise ProxSparseError(f"the prior masks in {cfg.prior} are {nm}, not {cfg.nm}: "
                                  f"use --nm {nm} or another prior")
        for target in targets:
            shape = tuple(target.module.weight.shape)
            if target.name not in masks or tuple(masks[target.name].shape) != shape:
                raise ProxSparseError(f"the prior masks in {cfg.prior} have no {shape} mask for "
                                      f"{target.name}: they were made for another model or "
                                      "other layers")
        return masks
