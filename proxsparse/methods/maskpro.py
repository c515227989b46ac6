"""MaskPro: learn the N:M mask as a probability distribution over each group (DESIGN.md §3).

The weights stay frozen at their pretrained values. Every group of M weights holds M logits π,
starting at C·m0 for a prior mask m0. Each step draws a mask (N distinct positions per group,
sampled without replacement from softmax(π)), measures the language-model loss L_t under it with
a forward pass only, and follows a policy-gradient (REINFORCE) estimate:

    π ← π − η·(L_t − L_0 − δ)·∇π log p(mask | π)

L_0 is the loss of the prior mask on the same windows (a paired comparison: what the windows
themselves cost cancels out) and δ the moving average of L_t − L_0 before this step, a baseline
that lowers the variance. The final mask is the top-N logits of every group.

``samples`` > 1 draws several masks per step on the same windows and takes each one's
advantage against the mean loss of the others (a leave-one-out baseline) instead of L_0 + δ.

``reward="layer"`` (a variance-reduced variant; weights frozen, no backpropagation, the same
logits, sampler and REINFORCE update): one loss value per forward pass is shared by every group
of the model (26.5 M on SmolLM2-135M), far too weak a signal for a CPU budget. Instead, in the
block-by-block driver Wanda and SparseGPT use, each layer learns from its own output error on
the inputs the layers learned before it give, and each group from its own share of its row's
error: the error of the sampled mask less the error of the same mask with that group put back
to the prior (a baseline that depends only on the other groups' draws, so the estimate stays
unbiased). Several samples per step add a leave-one-out baseline. See ``learn_layer``.
``shrinkage`` s measures that error on (1 − s)·XᵀX + s·diag(XᵀX): at 1 only each input's
own energy counts, and the best N:M mask is then Wanda's.

Layout: per layer, the logits and everything derived from them are ``[M, groups]``, position
first. Every per-position operation is then one contiguous pass over all groups of the layer,
several times faster on CPU than reducing a trailing dimension of size M.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..blockwise import prune_blockwise
from ..errors import COUNT, NON_NEGATIVE, POSITIVE, SHARE, STEPS, ProxSparseError, check_options
from ..export import load_masks
from ..learning import (
    LearningMethod,
    Placement,
    current_world,
    learn,
)
from ..models import Target
from ..nm import NM, groups, pack_mask, topn_mask, unpack_mask
from .base import LearningConfig, Pruner, option
from .sparsegpt import _one_cpu_thread

MAX_N = 4  # log p(set) sums over the N! orders a set can be drawn in: 24 for N = 4
BASELINE_DECAY = 0.99  # δ ← 0.99·δ + 0.01·(L_t − L_0)
TINY = 1e-30  # floor on a draw probability: an entry not drawn yet can always be drawn
FAR = 1e9  # beyond any logit: pushes an entry out of a min or max
SMALL_LAYER = 1 << 21  # weights × samples under which the layer reward learns on one thread


REWARDS = ("loss", "layer")
# Each reward's own defaults of the settings that mean different things under it.
REWARD_DEFAULTS = {
    "loss": {"logit_scale": 10.0, "lr": 50.0, "steps": 1000, "samples": 1},
    "layer": {"logit_scale": 2.0, "lr": 2.0, "steps": 16, "samples": 8},
}


@dataclass
class MaskProConfig(LearningConfig):
    prior: str = option("magnitude", "the mask learning starts from: magnitude, wanda, "
                                     "sparsegpt or proxsparse (computed first), or a mask file "
                                     "or proxsparse output directory")
    reward: str = option("loss", "what a sampled mask is judged by: loss (as published: the "
                                 "model's loss, one value per forward pass shared by every "
                                 "group) or layer (each layer's own output error, per output "
                                 "row, with each group's share of it: the error the mask "
                                 "makes less the error it makes with that group put back to "
                                 "the prior; learned block by block, each layer on the inputs "
                                 "the layers learned before it give)")
    logit_scale: float | None = option(
        None, "C: every group's logits start at C times the prior mask (larger: closer to the "
              "prior)", kind=float, cli_default="10 with --reward loss, 2 with --reward layer")
    lr: float | None = option(
        None, "policy-gradient step size (eta; with --reward loss as published, the loss a "
              "mean over tokens; with --reward layer in logits per step, the advantages "
              "normalised per output row)", kind=float,
        cli_default="50 with --reward loss, 2 with --reward layer")
    steps: int | None = option(
        None, "policy-gradient steps (with --reward layer: per layer); 0: no learning, the "
              "prior mask is the result", kind=int,
        cli_default="1000 with --reward loss, 16 with --reward layer")
    samples: int | None = option(
        None, "masks drawn per step; with more than one, each sample's advantage is taken "
              "against the mean of the others (a leave-one-out baseline). --reward loss: one "
              "forward pass per sample", kind=int,
        cli_default="1 with --reward loss, 8 with --reward layer")
    balanced: bool = option(False, "--reward layer: scale every calibration token's input to "
                                   "the same norm in each layer's error, so that no token (an "
                                   "attention-sink position with massive activations) outweighs "
                                   "the others")
    shrinkage: float = option(0.0, "--reward layer: judge masks by the output error on the "
                                   "inputs' Gram matrix shrunk towards its diagonal, "
                                   "(1 - s)·XᵀX + s·diag(XᵀX): 0 the full error, 1 only each "
                                   "input's own energy, whose best N:M mask is Wanda's "
                                   "(correlations fitted on one calibration text may not "
                                   "carry over to other text)")
    batch_size: int = option(1, "calibration windows per step (--reward loss; with --reward "
                                "layer every window counts in every step)")
    checkpoint_every: int = 100
    method = "maskpro"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_options(self, reward=REWARDS)
        for name, value in REWARD_DEFAULTS[self.reward].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        check_options(self, logit_scale=POSITIVE, lr=NON_NEGATIVE, steps=STEPS,
                      batch_size=COUNT, samples=COUNT, shrinkage=SHARE)
        if self.reward == "layer" and self.resume:
            raise ProxSparseError("--resume does not apply to --reward layer: it learns in one "
                                  "block-by-block pass and keeps no checkpoint; run it afresh")


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


# --- the layer reward: each layer learns from its own output error, block by block ---


def gram(inputs: torch.Tensor, balanced: bool = False, shrinkage: float = 0.0) -> torch.Tensor:
    """XᵀX / tokens of a layer's input ``[..., in]``, float32: the output error of a weight
    change Δ (one row) is Δ·XᵀX·Δ. ``balanced``: every token's input scaled to the median
    token norm first, so that no token (an attention-sink position whose activations are
    hundreds of times larger) outweighs the others: each token's error counts relative to its
    own size. ``shrinkage`` s: (1 − s)·XᵀX + s·diag(XᵀX)."""
    flat = inputs.reshape(-1, inputs.shape[-1]).float()
    if balanced:
        norms = flat.norm(dim=1, keepdim=True)
        flat = flat * (norms.median() / norms.clamp_min(TINY))
    h = flat.T @ flat / flat.shape[0]
    if shrinkage:
        diagonal = h.diagonal().clone()
        h.mul_(1 - shrinkage).diagonal().copy_(diagonal)
    return h


def row_errors(dropped: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Output error of every row of ``dropped`` ``[..., out, in]`` (the weights a mask removes)
    on inputs of Gram matrix ``h``: ``[..., out]``."""
    return ((dropped @ h) * dropped).sum(-1)


@dataclass
class LayerResult:
    """What the layer reward learned for one layer."""

    mask: torch.Tensor  # bool [out, in]
    prior_error: torch.Tensor  # Σ over rows of the output error of the prior mask
    error: torch.Tensor  # the same for ``mask``
    changed: torch.Tensor  # groups whose kept set differs from the prior's


def learn_layer(
    weight: torch.Tensor, prior: torch.Tensor, h: torch.Tensor, nm: NM, *, steps: int,
    samples: int, lr: float, logit_scale: float, generator: torch.Generator,
    counterfactual: bool = True, leave_one_out: bool = True,
) -> LayerResult:
    """MaskPro on one layer with its own output error as the reward (``reward="layer"``).

    ``weight`` ``[out, in]`` stays frozen; ``prior`` is the 0/1 prior mask; ``h`` the Gram
    matrix of the layer's inputs. Every step draws ``samples`` masks (N of M without
    replacement from softmax(π) per group, π starting at C·prior) and judges each group by its
    share of its row's output error: the error of the sampled mask less the error of the same
    mask with that group put back to the prior's choice. That baseline depends only on the
    other groups' draws, so the policy gradient stays unbiased, while the reward of a group is
    no longer shared by every other group of the model (or of its row). With several samples,
    each one's reward is taken against the mean of the others (leave-one-out), then scaled by
    its row's root-mean-square, and π ← π − lr·mean(advantage·∇π log p(set)).

    The final mask is the top-N logits of every group, kept for a row only where it makes a
    smaller output error than the prior (rows are independent in this error).

    Two switches exist for ablations (bench/maskpro_layer_ablation.py): without
    ``counterfactual`` every group of a row is judged by the row's whole error; without
    ``leave_one_out`` the baseline of that row error is the prior's error.
    """
    out_features, in_features = weight.shape
    m, n, k = nm.m, nm.n, samples
    width = in_features // m  # groups per row
    w = weight.detach().float()
    prior = prior.to(w.dtype)
    dropped_prior = w * (1 - prior)
    # Position-first layout [M, k·G] as in the rest of the module, sample j in columns
    # j·G … (j+1)·G; only the matrix product runs on rows [k, out, in].
    prior_k = groups(prior, m).flatten(0, 1).t().repeat(1, k)
    w_k = groups(w, m).flatten(0, 1).t().repeat(1, k)
    # h's diagonal M×M blocks [M, M, 1, width]: the error of a change inside one group
    diagonal = h.view(width, m, width, m).diagonal(dim1=0, dim2=2).unsqueeze(2).contiguous()
    logits = prior_k[:, : out_features * width].mul(logit_scale)
    for _ in range(steps):
        p = logits.softmax(0).repeat(1, k)
        picks, left = _draw(p, n, generator)
        kept = 1 - left.sign()
        if n == 2:
            grad = _grad_of_pairs(p, kept, never=left.sum(0))
        else:
            grad = _log_prob_and_grad(p, picks, never=left.sum(0))[1]
        rows = (w_k - w_k * kept).t().reshape(k, out_features, in_features)
        if counterfactual:
            pulled = (rows @ h).view(-1, m).t()  # Δ·h: the error's linear term, [M, k·G]
            back = w_k * (kept - prior_k)  # the change that restores each group to the prior
            change = torch.mul(pulled, 2, out=torch.empty_like(kept))  # contiguous, as kept
            for j in range(m):  # + h_gg·back, per group
                change += (diagonal[:, j] * back[j].view(1, -1, width)).view(m, -1)
            # error(sample) − error(sample with the group back at the prior), [k, G]
            reward = -(back * change).sum(0).view(k, -1)
        else:  # the row's error, shared by all its groups
            reward = row_errors(rows, h).unsqueeze(-1).expand(k, out_features, width)
            reward = reward.reshape(k, -1)
        if leave_one_out and k > 1:
            reward = reward - (reward.sum(0) - reward) / (k - 1)
        elif not counterfactual:
            at_prior = row_errors(dropped_prior, h).repeat_interleave(width)
            reward = reward - at_prior.unsqueeze(0)
        scale = reward.view(k, out_features, width).square().mean((0, 2)).sqrt()
        advantage = reward.view(k, out_features, width) / scale.clamp_min(TINY).view(1, -1, 1)
        logits -= (lr / k) * (grad.view(m, k, -1) * advantage.view(1, k, -1)).sum(1)
    final = topn_mask(logits.t().reshape(out_features, in_features), nm).to(w.dtype)
    errors = row_errors(torch.stack([w * (1 - final), dropped_prior]), h)
    better = errors[0] <= errors[1]
    mask = torch.where(better.unsqueeze(1), final, prior).bool()
    changed = groups(mask != prior.bool(), m).any(-1).sum()
    return LayerResult(mask, errors[1].sum(), torch.where(better, errors[0], errors[1]).sum(),
                       changed)


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
        if cfg.reward == "layer":
            return self._learn_by_layer(model, targets, calib, progress)
        world = current_world(cfg.learn_device)
        run = cfg.open_run(targets, calib)
        with Placement(model, targets, world, cfg.learn_dtype) as placement:
            learning = MaskProLearning(cfg, placement, calib, progress)
            try:
                return learn(learning, placement.model, run, cfg, steps=cfg.steps,
                             windows=calib.shape[0], world=world, progress=progress)
            finally:
                learning.show_pretrained()  # however it ends, the weights are the pretrained


    @torch.no_grad()
    def _learn_by_layer(self, model, targets, calib, progress) -> dict[str, torch.Tensor]:
        """``reward="layer"``: one block-by-block pass (as Wanda and SparseGPT run); each layer
        learns its mask from its own output error on the inputs of the layers learned before
        it, then runs masked for the layers after it. The weights end pretrained."""
        cfg: MaskProConfig = self.config
        pretrained = {t.name: t.module.weight.detach().clone() for t in targets}
        try:
            priors = _prior_masks(cfg, model, targets, calib, progress)
        finally:  # Wanda and SparseGPT write into the weights
            for t in targets:
                t.module.weight.copy_(pretrained[t.name])
        generator = None
        masks: dict[str, torch.Tensor] = {}
        cache: dict = {"input": None, "gram": None}
        self.layer_results: dict[str, LayerResult] = {}

        def prune_layer(target, inputs):
            nonlocal generator
            weight = target.module.weight
            if generator is None:
                generator = torch.Generator(weight.device).manual_seed(cfg.seed)
            # q/k/v (and gate/up) receive the same tensor: one Gram matrix for them
            if cache["input"] is not inputs:
                cache["input"], cache["gram"] = inputs, gram(inputs, cfg.balanced, cfg.shrinkage)
            # a small layer's steps are many tiny operations: on the CPU, worker threads only
            # add synchronisation (many times slower when other processes share the cores)
            small = weight.numel() * cfg.samples < SMALL_LAYER
            with _one_cpu_thread(weight.device) if small else contextlib.nullcontext():
                result = learn_layer(weight, priors[target.name].to(weight.device),
                                     cache["gram"], cfg.nm, steps=cfg.steps,
                                     samples=cfg.samples, lr=cfg.lr,
                                     logit_scale=cfg.logit_scale, generator=generator)
            weight.mul_(result.mask)
            masks[target.name] = result.mask
            self.layer_results[target.name] = result

        try:
            prune_blockwise(model, targets, calib, prune_layer, progress,
                            device=cfg.learn_device or None)
        finally:
            cache.clear()
            for t in targets:
                t.module.weight.copy_(pretrained[t.name])
        if progress and self.layer_results:
            before = sum(float(r.prior_error) for r in self.layer_results.values())
            after = sum(float(r.error) for r in self.layer_results.values())
            moved = sum(int(r.changed) for r in self.layer_results.values())
            print(f"MaskPro (layer reward): {moved} groups left the {cfg.prior} prior; summed "
                  f"layer output error {after / before:.4f}x the prior's")
        if cfg.steps and not any(int(r.changed) for r in self.layer_results.values()):
            warnings.warn(f"MaskPro ended on its prior mask: no group changed in {cfg.steps} "
                          f"steps per layer, so the result is the {cfg.prior!r} mask. More "
                          "--steps, --samples or --lr, or a smaller --logit-scale, let it "
                          "explore more.", stacklevel=2)
        return masks


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
        prior_loss = self.prior_loss[windows.to(self.device)].mean()
        if cfg.samples == 1:  # as published: against L_0 and the moving baseline δ
            explored = self._sample(layers, self.generator)
            loss = self._loss(model, batches)
            residual = loss - prior_loss
            advantage = residual - self.baseline
            self._update(layers, cfg.lr * advantage)
        else:  # K masks on the same windows, each against the mean of the others
            explored, losses, grads = 0, [], []
            for _ in range(cfg.samples):
                explored = explored + self._sample(layers, self.generator)
                losses.append(self._loss(model, batches))
                grads.append([layer.grad for layer in layers])
            losses = torch.stack(losses)
            k = cfg.samples
            advantages = losses - (losses.sum() - losses) / (k - 1)
            for i, layer in enumerate(layers):
                step_ = sum(a * g[i].float() for a, g in zip(advantages, grads, strict=True))
                layer.offset.copy_(layer.offset.float().sub_(step_, alpha=cfg.lr / k))
                layer.grad = None
            del grads
            explored, loss = explored / k, losses.mean()
            residual = loss - prior_loss
        self.baseline = BASELINE_DECAY * self.baseline + (1 - BASELINE_DECAY) * residual
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps or self.changed is None:
            self.changed = self._changed(layers)  # a full pass over the logits: not every step
        return {"loss": loss, "prior_loss": loss - residual, "residual": residual,
                "baseline": self.baseline, "explored": explored, "changed": self.changed}

    def _loss(self, model, batches) -> torch.Tensor:
        """The loss of the mask on the weights over this step's windows."""
        return torch.cat([window_losses(model, self.calib[b].to(self.device))
                          for b in batches]).mean()

    def postfix(self, latest):
        return {"loss": f"{latest['loss']:.3f}", "L0": f"{latest['prior_loss']:.3f}",
                "delta": f"{latest['baseline']:+.2g}", "changed": int(latest["changed"])}

    def title(self):
        cfg = self.cfg
        samples = f", {cfg.samples} samples" if cfg.samples > 1 else ""
        return f"MaskPro {cfg.nm}: prior={cfg.prior}, C={cfg.logit_scale}, lr={cfg.lr}{samples}"

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
        return _prior_masks(self.cfg, model, targets, calib, progress)


def _prior_masks(cfg: MaskProConfig, model, targets: list[Target], calib, progress) -> dict:
    """m0: another method's masks on the same windows, or a saved mask file."""
    from . import PRUNERS, config_for, pruner_for  # here: the registry imports this module

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
