import math

import pytest
import torch

from proxsparse.errors import ProxSparseError
from proxsparse.nm import (
    NM,
    bits_per_group,
    is_valid_nm,
    mask_is_exact,
    pack_mask,
    patterns,
    topn_mask,
    unpack_mask,
)

PATTERNS = [NM(2, 4), NM(1, 4), NM(4, 8), NM(2, 8), NM(3, 4)]


@pytest.mark.parametrize("text,expected", [("2:4", NM(2, 4)), ("4:8", NM(4, 8)), (" 1:4", None)])
def test_parse(text, expected):
    if expected is None:
        assert NM.parse(text.strip()) == NM(1, 4)
    else:
        assert NM.parse(text) == expected


@pytest.mark.parametrize("text", ["4:4", "5:4", "0:4", "a:b", "2-4", "2:4:8", "", "2.5:4"])
def test_parse_rejects_bad_patterns(text):
    with pytest.raises(ProxSparseError, match="N:M"):
        NM.parse(text)


@pytest.mark.parametrize("nm", PATTERNS)
def test_topn_mask_keeps_the_largest_n_per_group(nm):
    scores = torch.randn(16, 8 * nm.m)
    mask = topn_mask(scores, nm)
    assert mask_is_exact(mask, nm)
    grouped, kept = scores.view(16, -1, nm.m), mask.view(16, -1, nm.m)
    smallest_kept = grouped.masked_fill(~kept, math.inf).amin(-1)
    largest_dropped = grouped.masked_fill(kept, -math.inf).amax(-1)
    assert bool((smallest_kept >= largest_dropped).all())


def test_topn_mask_is_exact_and_repeatable_under_ties():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 0.0]]).repeat(64, 1)
    mask = topn_mask(scores, NM(2, 4))
    assert mask_is_exact(mask, NM(2, 4)) and torch.equal(mask, topn_mask(scores, NM(2, 4)))
    assert bool(mask[:, 4].all()) and not bool(mask[:, 7].any())


def test_validity():
    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    assert is_valid_nm(weight, NM(2, 4))
    assert not is_valid_nm(weight, NM(1, 4))


@pytest.mark.parametrize("nm", PATTERNS)
def test_pack_roundtrip(nm):
    mask = topn_mask(torch.randn(12, 6 * nm.m), nm)
    packed = pack_mask(mask, nm)
    assert packed.dtype == torch.uint8
    assert torch.equal(unpack_mask(packed, tuple(mask.shape), nm), mask)
    assert len(patterns(nm)) == math.comb(nm.m, nm.n)


def test_two_four_mask_takes_three_bits_per_group():
    nm = NM(2, 4)
    mask = topn_mask(torch.randn(64, 256), nm)
    groups = mask.numel() // 4
    assert bits_per_group(nm) == 3
    assert pack_mask(mask, nm).numel() * 8 <= 3 * groups + 7


def test_pack_refuses_inexact_masks():
    mask = torch.zeros(2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="exact"):
        pack_mask(mask, NM(2, 4))
