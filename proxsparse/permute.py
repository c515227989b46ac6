"""Channel permutation for N:M (DESIGN.md §10): reorder a layer's input channels so that its N:M
groups keep more of the score, only where the reorder is exact and free at inference.

For ``y = W x``, permuting W's columns and x's entries by the same order leaves y unchanged, and
x comes permuted for free where its producer's rows can be permuted with it:

- ``down_proj`` reads the MLP intermediate ``act(gate_proj x) * up_proj x``: permute the rows
  (and biases) of ``gate_proj`` and ``up_proj``;
- ``o_proj`` reads the heads' outputs ``softmax(q k^T) v``: permute ``v_proj``'s rows inside
  each key/value head; every query head that reads that kv head carries the same order into
  its block of ``o_proj``'s columns.

The model stays a plain checkpoint (weights permuted, no index at run time) whose dense outputs
equal the original's. The layers that read the residual stream (q/k/v, gate/up) would need the
whole stream permuted; ``bench/permute_gain.py`` measures what that would buy.

The search raises the kept score, the sum over rows of the N largest scores of every group:
each round pairs the groups at random and re-splits every pair's 2M channels into two groups
the best of all ways (M = 4: 35 splits; larger M: every single swap), keeping a change only
where it raises the pair's kept score. Vectorised over pairs and heads; a seed fixes the
pairings, so the result is deterministic.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .activations import input_feature_norms
from .errors import ProxSparseError
from .gated_mlp import gated_mlps
from .models import Target, decoder_blocks
from .nm import NM

SCORES = ("magnitude", "wanda")  # |W|, or |W| times the input channel's norm on calibration
_MAX_SPLITS = 70  # more splits of a pair than this: try single swaps instead
_ROW_CHUNK = 64  # rows scored at a time (bounds the [rows, pairs, splits, M] temporaries)
_NORM_WINDOWS = 16  # calibration windows that measure the input norms of the wanda score


@dataclass
class Site:
    """A layer whose input channels can be permuted for free, with the layers producing them.

    The reader's columns form ``heads`` blocks of ``width`` channels, each permuted by its own
    order; ``repeats`` consecutive column blocks share one order (query heads of one kv head).
    The producers' rows hold ``heads`` blocks of ``width`` (the MLP: one block).
    """

    name: str
    reader: nn.Linear
    producers: list[nn.Linear]
    heads: int
    width: int
    repeats: int = 1

    def column_index(self, orders: Tensor) -> Tensor:
        """The reader's new column order from per-head orders ``[heads, width]``."""
        blocks = orders.repeat_interleave(self.repeats, 0)  # [heads * repeats, width]
        offsets = torch.arange(len(blocks))[:, None] * self.width
        return (blocks + offsets).reshape(-1)

    def row_index(self, orders: Tensor) -> Tensor:
        offsets = torch.arange(self.heads)[:, None] * self.width
        return (orders + offsets).reshape(-1)

    def scores(self, score: Tensor) -> Tensor:
        """``[heads, rows, width]``: the reader's score seen by each head's order (the rows of
        every query head sharing a kv head stacked)."""
        out = score.shape[0]
        blocks = score.view(out, self.heads, self.repeats, self.width)
        return blocks.permute(1, 2, 0, 3).reshape(self.heads, self.repeats * out, self.width)


def find_sites(model: nn.Module, targets: list[Target]) -> list[Site]:
    """Every free permutation site whose reader is a target: down_proj of each gated MLP and
    o_proj of each attention with a v_proj (Llama, Qwen, Mistral, Gemma and alike)."""
    names = {id(t.module): t.name for t in targets}
    sites: list[Site] = []
    mlps = {id(mlp.module): mlp for mlp in _gated_mlps_or_none(model)}
    for block in decoder_blocks(model):
        for module in block.modules():
            if id(module) in mlps:
                down = module.down_proj
                if id(down) in names:
                    sites.append(Site(names[id(down)], down, [module.gate_proj, module.up_proj],
                                      heads=1, width=down.in_features))
            v, o = getattr(module, "v_proj", None), getattr(module, "o_proj", None)
            if isinstance(v, nn.Linear) and isinstance(o, nn.Linear) and id(o) in names:
                kv_heads = _kv_heads(model, module, v)
                width = v.out_features // kv_heads
                if kv_heads * width == v.out_features and o.in_features % v.out_features == 0:
                    sites.append(Site(names[id(o)], o, [v], heads=kv_heads, width=width,
                                      repeats=o.in_features // v.out_features))
    return sites


def _gated_mlps_or_none(model: nn.Module) -> list:
    try:
        return gated_mlps(model)
    except ProxSparseError:  # no gated MLP: only attention sites
        return []


def _kv_heads(model: nn.Module, attention: nn.Module, v: nn.Linear) -> int:
    config = getattr(model, "config", None)
    head_dim = getattr(attention, "head_dim", None) or getattr(config, "head_dim", None)
    if head_dim:
        return v.out_features // int(head_dim)
    heads = getattr(config, "num_attention_heads", 1)
    return getattr(config, "num_key_value_heads", None) or heads


def kept_score(score: Tensor, nm: NM) -> Tensor:
    """Per leading index, the sum of the N largest entries of every group of the last dim
    (``[..., rows, C]`` -> ``[...]``), in float64."""
    grouped = score.reshape(*score.shape[:-1], -1, nm.m)
    return grouped.topk(nm.n, dim=-1).values.double().sum((-1, -2, -3))


def _splits(m: int) -> tuple[Tensor, Tensor]:
    """Ways to deal a pair's 2m channels into two groups of m: ``[S, m]`` positions of the
    first group and of the second, the unchanged split first."""
    everything = set(range(2 * m))
    if math.comb(2 * m - 1, m - 1) <= _MAX_SPLITS:
        # channel 0 always in the first group: each split once
        firsts = [(0, *rest) for rest in itertools.combinations(range(1, 2 * m), m - 1)]
    else:
        firsts = [tuple(range(m))]
        for i, j in itertools.product(range(m), range(m, 2 * m)):
            firsts.append(tuple(sorted((set(range(m)) - {i}) | {j})))
    seconds = [tuple(sorted(everything - set(f))) for f in firsts]
    return torch.tensor(firsts), torch.tensor(seconds)


def search_orders(score: Tensor, nm: NM, rounds: int = 25, seed: int = 0) -> Tensor:
    """Column orders ``[B, C]`` that raise the kept N:M score of ``score`` ``[B, rows, C]``
    (one order per leading index); never lower it: the identity is where a search starts and
    a change is kept only where it raises a pair's kept score."""
    batch, rows, width = score.shape
    groups = width // nm.m
    order = torch.arange(width).repeat(batch, 1)
    if groups < 2:
        return order
    firsts, seconds = _splits(nm.m)
    score = score.float()
    generator = torch.Generator().manual_seed(seed)
    pairs = groups // 2
    for _ in range(rounds):
        shuffle = torch.randperm(groups, generator=generator)
        left, right = shuffle[:pairs], shuffle[pairs:2 * pairs]
        channels = order.view(batch, groups, nm.m)
        pair = torch.cat([channels[:, left], channels[:, right]], 2)  # [B, P, 2m]
        totals = torch.zeros(batch, pairs, len(firsts), dtype=torch.float64)
        for start in range(0, rows, _ROW_CHUNK):
            chunk = score[:, start:start + _ROW_CHUNK]  # [B, r, C]
            r = chunk.shape[1]
            values = chunk.gather(2, pair.view(batch, 1, -1).expand(batch, r, -1))
            values = values.view(batch, r, pairs, 2 * nm.m)
            kept = (values[..., firsts].topk(nm.n, -1).values.sum(-1)
                    + values[..., seconds].topk(nm.n, -1).values.sum(-1))  # [B, r, P, S]
            totals += kept.double().sum(1)
        best = totals.argmax(-1)  # [B, P]
        gain = totals.gather(-1, best[..., None])[..., 0] - totals[..., 0]
        better = gain > 1e-9 * totals[..., 0].abs()  # float ties are not gains
        new_left = pair.gather(2, firsts[best])
        new_right = pair.gather(2, seconds[best])
        keep = better[..., None]
        channels[:, left] = torch.where(keep, new_left, channels[:, left])
        channels[:, right] = torch.where(keep, new_right, channels[:, right])
    return order


def reorder(score: Tensor, orders: Tensor) -> Tensor:
    """``score`` ``[B, rows, C]`` with the columns of each leading index in its order."""
    return score.gather(2, orders[:, None].expand_as(score))


@dataclass
class Permutation:
    """What was done at one site: the reader's new column order and the kept-score gain."""

    columns: list[int]
    kept_before: float
    kept_after: float

    def as_dict(self) -> dict:
        gain = self.kept_after / self.kept_before - 1 if self.kept_before else 0.0
        return {"columns": self.columns, "kept_score_gain": round(gain, 6)}


@torch.no_grad()
def permute_channels(
    model: nn.Module,
    targets: list[Target],
    nm: NM,
    score: str = "wanda",
    calib: Tensor | None = None,
    rounds: int = 25,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Permutation]:
    """Permute, in place, the input channels of every free site among ``targets`` (and their
    producers' rows) to raise the kept N:M score; returns each site's permutation.

    ``score``: ``magnitude`` (|W|) or ``wanda`` (|W| times the input channel's norm over the
    first windows of ``calib``). The model's dense outputs do not change.
    """
    if score not in SCORES:
        raise ValueError(f"unknown permutation score {score!r}: one of {SCORES}")
    sites = find_sites(model, targets)
    norms = {}
    if score == "wanda":
        if calib is None:
            raise ValueError("the wanda permutation score needs calibration windows")
        readers = {site.name for site in sites}
        norms = input_feature_norms(model, [t for t in targets if t.name in readers],
                                    calib[:_NORM_WINDOWS], progress=progress)
    done: dict[str, Permutation] = {}
    for site in tqdm(sites, desc="permuting channels", disable=not progress, leave=False):
        weight = site.reader.weight.detach().float().abs()
        if site.name in norms:
            weight = weight * norms[site.name]
        blocks = site.scores(weight.cpu())
        orders = search_orders(blocks, nm, rounds, seed)
        before = float(kept_score(blocks, nm).sum())
        after = float(kept_score(reorder(blocks, orders), nm).sum())
        _apply(site, orders)
        done[site.name] = Permutation(site.column_index(orders).tolist(), before, after)
    return done


def _apply(site: Site, orders: Tensor) -> None:
    columns = site.column_index(orders).to(site.reader.weight.device)
    site.reader.weight.data = site.reader.weight.data[:, columns].contiguous()
    rows = site.row_index(orders)
    for producer in site.producers:
        index = rows.to(producer.weight.device)
        producer.weight.data = producer.weight.data[index].contiguous()
        if producer.bias is not None:
            producer.bias.data = producer.bias.data[index].contiguous()


__all__ = ["SCORES", "Permutation", "Site", "find_sites", "kept_score", "permute_channels",
           "reorder", "search_orders"]
