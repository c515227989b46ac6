"""The packed N:M weight format (DESIGN.md §8), in plain torch.

A weight ``[out, in]`` whose every group of M consecutive inputs holds at most N non-zeros is
stored as

- ``values``  ``[out, padded]``: the N kept values of every group, in input order;
- ``indices`` ``[out, words]`` int32: the in-group position of each kept value, ``bits`` bits
  each (2 for M = 4), packed from the low bits up, ``32 // bits`` values per word.

Rows are padded with zero values (position 0) to a whole number of words, so every word is
full: for 2:4 one word covers 16 values, i.e. 32 inputs. Bytes per weight at 2:4: fp32 values
2 + 0.125 for the positions (dense: 4); bf16 values 1 + 0.125 (dense: 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ProxSparseError
from ..nm import NM, groups


def index_bits(m: int) -> int:
    """Bits per in-group position: 1, 2 or 4 (a power of two, so words hold whole values)."""
    if m > 16:
        raise ProxSparseError(f"the packed format holds N:M with M ≤ 16, not M={m}")
    return 1 if m <= 2 else 2 if m <= 4 else 4


@dataclass
class PackedWeight:
    """One packed N:M weight (see the module docstring for the layout)."""

    values: torch.Tensor
    indices: torch.Tensor
    in_features: int
    nm: NM

    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        return (self.values.numel() * self.values.element_size()
                + self.indices.numel() * self.indices.element_size())

    def to(self, device=None, dtype: torch.dtype | None = None) -> PackedWeight:
        """Move to ``device`` and/or cast the values to ``dtype`` (positions are unchanged)."""
        values = self.values.to(device=device, dtype=dtype or self.values.dtype)
        return PackedWeight(values, self.indices.to(device), self.in_features, self.nm)


def _padded_values(in_features: int, nm: NM) -> int:
    per_word = 32 // index_bits(nm.m)
    return math.ceil(in_features // nm.m * nm.n / per_word) * per_word


def pack(weight: torch.Tensor, nm: NM | str = "2:4", name: str = "weight",
         dtype: torch.dtype | None = None) -> PackedWeight:
    """Pack a dense N:M weight. Refuses (one clear error naming ``name``) a weight that is not
    N:M, holds NaN/Inf, or whose input size is not a multiple of M."""
    nm = NM.parse(nm)
    if weight.dim() != 2:
        raise ProxSparseError(f"{name}: only 2-D weights can be packed, got {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if in_features % nm.m:
        raise ProxSparseError(f"{name}: input size {in_features} is not a multiple of M={nm.m}; "
                              "leave this layer dense (--ignore)")
    weight = weight.detach()
    if not bool(torch.isfinite(weight).all()):
        raise ProxSparseError(f"{name} holds NaN or Inf weights: it cannot be packed")
    grouped = groups(weight, nm.m)
    nonzero = grouped != 0
    worst = int(nonzero.sum(-1).max()) if nonzero.numel() else 0
    if worst > nm.n:
        raise ProxSparseError(f"{name} is not {nm}: a group of {nm.m} holds {worst} non-zeros; "
                              "prune it first (proxsparse prune) or pack with the right --nm")
    # Keep every non-zero, then the lowest free positions; store them in input order.
    position = torch.arange(nm.m, device=weight.device)
    key = nonzero.to(torch.int16) * nm.m + (nm.m - 1 - position).to(torch.int16)
    kept = torch.topk(key, nm.n, dim=-1).indices.sort(dim=-1).values
    values = torch.gather(grouped, -1, kept).reshape(out_features, -1)
    padded = _padded_values(in_features, nm)
    pad = padded - values.shape[1]
    values = torch.nn.functional.pad(values, (0, pad)).to(dtype or weight.dtype).contiguous()
    kept = torch.nn.functional.pad(kept.reshape(out_features, -1), (0, pad))
    return PackedWeight(values, _pack_positions(kept, index_bits(nm.m)), in_features, nm)


def _pack_positions(positions: torch.Tensor, bits: int) -> torch.Tensor:
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=positions.device, dtype=torch.int64) * bits
    words = (positions.to(torch.int64).view(positions.shape[0], -1, per_word) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits, as int32
    return words.to(torch.int32).contiguous()


def positions(packed: PackedWeight) -> torch.Tensor:
    """The in-group position of every stored value, ``[out, padded]`` int64."""
    bits = index_bits(packed.nm.m)
    shifts = torch.arange(32 // bits, device=packed.indices.device, dtype=torch.int64) * bits
    words = packed.indices.to(torch.int64) & 0xFFFFFFFF
    return ((words.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(packed.out_features, -1)


def unpack(packed: PackedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense ``[out, in]`` weight: the kept values at their positions, zeros elsewhere."""
    nm = packed.nm
    padded = packed.values.shape[1]
    column = (torch.arange(padded, device=packed.values.device) // nm.n * nm.m
              + positions(packed))
    width = padded // nm.n * nm.m
    dense = torch.zeros(packed.out_features, width, dtype=dtype or packed.values.dtype,
                        device=packed.values.device)
    dense.scatter_(1, column, packed.values.to(dense.dtype))
    return dense[:, : packed.in_features].contiguous()
