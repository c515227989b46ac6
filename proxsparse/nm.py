"""N:M groups: masks, validity checks and the compact on-disk mask encoding.

A weight ``[out, in]`` is viewed as ``[out, in/M, M]``: every run of M consecutive inputs of one
output row is a group, and an N:M mask keeps N entries of each group.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from .errors import ProxSparseError


@dataclass(frozen=True)
class NM:
    """An N:M pattern: keep ``n`` of every ``m`` consecutive weights along the input dimension."""

    n: int = 2
    m: int = 4

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or not 0 < self.n < self.m:
            raise ProxSparseError(
                f"invalid N:M pattern {self.n}:{self.m}: need integers with 0 < N < M, e.g. 2:4"
            )

    @classmethod
    def parse(cls, text: str | NM | tuple[int, int]) -> NM:
        """Read ``"2:4"`` (or an ``NM`` or an ``(n, m)`` pair)."""
        if isinstance(text, NM):
            return text
        if isinstance(text, tuple):
            return cls(*text)
        parts = str(text).split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ProxSparseError(
                f"cannot read N:M pattern {text!r}: write it as two integers like 2:4"
            )
        return cls(int(parts[0]), int(parts[1]))

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def density(self) -> float:
        return self.n / self.m


def groups(weight: torch.Tensor, m: int) -> torch.Tensor:
    """View ``[out, in]`` as ``[out, in/m, m]`` (no copy)."""
    out_features, in_features = weight.shape
    if in_features % m:
        raise ValueError(f"input size {in_features} is not a multiple of M={m}")
    return weight.view(out_features, in_features // m, m)


def topn_mask(scores: torch.Tensor, nm: NM) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest scores of every group.

    Ties are broken by ``torch.topk``: deterministic for a given input and device. This matters
    on dequantized (GGUF) weights, where about 15% of SmolLM2's groups tie at the boundary; it is
    the convention behind the magnitude anchor of DESIGN.md §6.
    """
    grouped = groups(scores, nm.m)
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    mask.scatter_(-1, torch.topk(grouped, nm.n, dim=-1).indices, True)
    return mask.view_as(scores)


def nonzeros_per_group(weight: torch.Tensor, m: int) -> torch.Tensor:
    return (groups(weight, m) != 0).sum(-1)


def is_valid_nm(weight: torch.Tensor, nm: NM) -> bool:
    """True when no group holds more than ``n`` non-zeros."""
    return bool((nonzeros_per_group(weight, nm.m) <= nm.n).all())


def mask_is_exact(mask: torch.Tensor, nm: NM) -> bool:
    """True when every group of the mask keeps exactly ``n`` entries."""
    return bool((groups(mask, nm.m).sum(-1) == nm.n).all())


# --- compact encoding: the index of the kept pattern, ceil(log2(C(M, N))) bits per group ---


def patterns(nm: NM) -> torch.Tensor:
    """All C(M, N) keep-patterns of a group, ``[P, M]`` bool, in lexicographic order."""
    rows = [[i in kept for i in range(nm.m)] for kept in itertools.combinations(range(nm.m), nm.n)]
    return torch.tensor(rows, dtype=torch.bool)


def bits_per_group(nm: NM) -> int:
    return max(1, math.ceil(math.log2(math.comb(nm.m, nm.n))))


def _pattern_codes(nm: NM) -> torch.Tensor:
    """Lookup from a group's bitmask (sum of 2**i over kept i) to its pattern index."""
    table = torch.full((2**nm.m,), -1, dtype=torch.long)
    bitmasks = (patterns(nm).long() << torch.arange(nm.m)).sum(-1)
    table[bitmasks] = torch.arange(len(bitmasks))
    return table


def pack_mask(mask: torch.Tensor, nm: NM) -> torch.Tensor:
    """Encode an exact N:M mask as a flat uint8 bit stream of pattern indices."""
    if not mask_is_exact(mask, nm):
        raise ValueError(f"mask is not exact {nm}: every group must keep exactly {nm.n}")
    grouped = groups(mask.cpu(), nm.m).reshape(-1, nm.m).long()
    index = _pattern_codes(nm)[(grouped << torch.arange(nm.m)).sum(-1)]
    width = bits_per_group(nm)
    bits = (index.unsqueeze(-1) >> torch.arange(width - 1, -1, -1)) & 1
    bits = bits.flatten()
    bits = torch.cat([bits, bits.new_zeros(-len(bits) % 8)])
    return (bits.view(-1, 8) << torch.arange(7, -1, -1)).sum(-1).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, int], nm: NM) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: the boolean mask of the given weight shape."""
    out_features, in_features = shape
    num_groups = out_features * in_features // nm.m
    width = bits_per_group(nm)
    bits = (packed.long().unsqueeze(-1) >> torch.arange(7, -1, -1)) & 1
    bits = bits.flatten()[: num_groups * width].view(num_groups, width)
    index = (bits << torch.arange(width - 1, -1, -1)).sum(-1)
    if int(index.max()) >= math.comb(nm.m, nm.n):
        raise ValueError("mask data is corrupt: a pattern index is out of range")
    return patterns(nm)[index].view(out_features, in_features)
