"""The N:M regulariser and its proximal operator (proxsparse.prox).

prox_nm is checked against an independent float64 reference (every support top-k, each smooth
subproblem solved from several starts by exact coordinate descent and Newton polishing, best
objective kept) and against the paper's own solver (bench/paper_prox.py), plus properties.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from proxsparse.prox import nm_penalty, nm_penalty_groups, prox_nm
from tests.conftest import can_compile

_spec = importlib.util.spec_from_file_location(
    "paper_prox", Path(__file__).resolve().parents[1] / "bench" / "paper_prox.py")
paper_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paper_module)
paper_prox = paper_module.paper_prox

PATTERNS = [(2, 4), (1, 4), (3, 4), (2, 8), (4, 8)]


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many small ops, which one thread does fastest (and a busy machine's
    second core only slows them down)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ float64 reference


def esp(x: torch.Tensor, r: int) -> torch.Tensor:
    """e_r over the last dimension."""
    e = [torch.ones_like(x[..., 0])] + [torch.zeros_like(x[..., 0])] * r
    for j in range(x.shape[-1]):
        for d in range(r, 0, -1):
            e[d] = e[d] + x[..., j] * e[d - 1]
    return e[r]


def objective(u: torch.Tensor, a: torch.Tensor, lam: torch.Tensor, n: int) -> torch.Tensor:
    """1/2 ||u - a||^2 + lam e_{n+1}(|u|) per group (float64)."""
    u, a = u.double(), a.double()
    return 0.5 * ((u - a) ** 2).sum(-1) + lam * esp(u.abs(), n + 1)


def _leave_out(u: torch.Tensor, r: int, drop: int) -> torch.Tensor:
    """e_r of u without one coordinate ([G, k]) or without two ([G, k, k])."""
    k = u.shape[1]
    keep = 1 - torch.eye(k, dtype=u.dtype)
    if drop == 1:
        return esp(u[:, None, :] * keep, r)
    return esp(u[:, None, None, :] * keep[:, None, :] * keep[None, :, :], r)


def reference_prox(a: torch.Tensor, lam: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best point over all top-k supports for sorted magnitudes ``a`` [G, m] (float64).

    Each face is solved from nine starts (zero, a and shrunk copies, a with a tiny last entry,
    the best point so far, random points) by exact coordinate descent, then Newton polishing
    that is kept only where it lowers the objective."""
    g, m = a.shape
    gen = torch.Generator().manual_seed(0)
    best = torch.cat([a[:, :n], torch.zeros_like(a[:, n:])], 1)
    best_obj = objective(best, a, lam, n)
    for k in range(n + 1, m + 1):
        ak = a[:, :k]
        small_last = ak.clone()
        small_last[:, -1] *= 1e-3
        starts = [torch.zeros_like(ak), ak, 0.5 * ak, 0.7 * ak, small_last, best[:, :k]]
        starts += [ak * torch.rand(ak.shape, generator=gen, dtype=a.dtype) for _ in range(3)]
        s = len(starts)
        u, aa, ll = torch.cat(starts), ak.repeat(s, 1), lam.repeat(s)
        keep = 1 - torch.eye(k, dtype=a.dtype)
        for _ in range(30):  # exact coordinate descent (each coordinate problem is a parabola)
            for i in reversed(range(k)):
                u[:, i] = (aa[:, i] - ll * esp(u * keep[i], n)).clamp_min(0)
        rest = torch.zeros(len(u), m - k, dtype=a.dtype)
        obj = objective(torch.cat([u, rest], 1), a.repeat(s, 1), ll, n)
        eye = torch.eye(k, dtype=a.dtype)
        for _ in range(30):  # Newton polish on the face, kept only where it helps
            grad = u - aa + ll[:, None] * _leave_out(u, n, 1)
            hess = eye + ll[:, None, None] * _leave_out(u, n - 1, 2) * keep
            step, _ = torch.linalg.solve_ex(hess, grad.unsqueeze(-1))
            new = u - step.squeeze(-1)
            new_obj = objective(torch.cat([new, rest], 1), a.repeat(s, 1), ll, n)
            ok = (new > 0).all(1) & (new_obj < obj) & new.isfinite().all(1)
            u = torch.where(ok[:, None], new, u)
            obj = torch.where(ok, new_obj, obj)
        obj, pick = obj.view(s, g).min(0)
        u = u.view(s, g, k)[pick, torch.arange(g)]
        better = obj < best_obj
        best = torch.where(better[:, None], torch.cat([u, rest[:g]], 1), best)
        best_obj = torch.where(better, obj, best_obj)
    return best, best_obj


def sorted_magnitudes(w: torch.Tensor, m: int) -> torch.Tensor:
    return w.double().reshape(-1, m).abs().sort(-1, descending=True).values


def tolerance(a: torch.Tensor, ref_obj: torch.Tensor) -> torch.Tensor:
    """Float rounding of the objective: 1e-6 of it, plus the float32 rounding floor of the
    outputs (an error of eps32 * max|a| per entry changes the objective by ~eps32^2 |a|^2)."""
    return 1e-6 * ref_obj + 1e-12 * 0.5 * (a ** 2).sum(-1)


def assert_meets_reference(w: torch.Tensor, u: torch.Tensor, lam: float, n: int, m: int,
                           context: object = None) -> None:
    """Every group of the prox ``u`` of ``w`` is never worse than the float64 reference."""
    a = sorted_magnitudes(w, m)
    lam_t = torch.full((len(a),), lam, dtype=torch.float64)
    _, ref_obj = reference_prox(a, lam_t, n)
    ours = objective(sorted_magnitudes(u, m), a, lam_t, n)
    assert (ours <= ref_obj + tolerance(a, ref_obj)).all(), (context, (ours - ref_obj).max())


def random_groups(m: int, g: int, seed: int) -> torch.Tensor:
    """[g, m] float32 groups at scales 1e-4..1e2 with ties, zeros, negative values and groups
    dominated by one entry; ``lam * scale^(n-1)`` then sets the regime."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(g, m, generator=gen)
    q = g // 6
    w[:q, 1:] = w[:q, :1] * (1 + 1e-3 * torch.rand(q, m - 1, generator=gen))
    w[q:2 * q, 1:] = w[q:2 * q, :1]  # exact ties (up to sign below)
    w[2 * q:3 * q, -2:] = 0
    w[3 * q:4 * q, 1:] *= 1e-3
    return w * torch.where(torch.rand(g, m, generator=gen) < 0.5, -1.0, 1.0)


def _general_kernel_builds() -> bool:
    from proxsparse.prox import _general_kernel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip reason says it
        return _general_kernel() is not None


needs_kernel = pytest.mark.skipif(not can_compile() or not _general_kernel_builds(),
                                  reason="no C++ toolchain for the compiled N:M prox")


# ------------------------------------------------------------------ accuracy


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("scale", [1e-4, 1.0, 100.0])
def test_never_worse_than_float64_reference(n: int, m: int, scale: float) -> None:
    w = random_groups(m, 120 if m == 4 else 18, seed=n * 10 + m) * scale
    for unit in (0.05, 0.4, 0.8, 1.2, 5.0):  # lam * scale^(n-1): every regime
        lam = unit / scale ** (n - 1)
        assert_meets_reference(w, prox_nm(w, lam, n, m), lam, n, m, unit)


@pytest.mark.parametrize("scale", [1e-4, 0.02, 100.0])
def test_2_4_large_batch_matches_reference(scale: float) -> None:
    """One call on a layer-like tensor (one lam), many regimes through the lam grid."""
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(24, 256, generator=gen) * scale
    for unit in (0.05, 0.4, 0.8, 1.2, 3.0):
        lam = unit / scale
        u = prox_nm(w, lam)
        a = sorted_magnitudes(w, 4)
        lam_t = torch.full((a.shape[0],), lam, dtype=torch.float64)
        _, ref_obj = reference_prox(a, lam_t, 2)
        ours = objective(sorted_magnitudes(u, 4), a, lam_t, 2)
        assert (ours <= ref_obj + tolerance(a, ref_obj)).all(), (unit, (ours - ref_obj).max())


@pytest.mark.parametrize("n,m", [(2, 4), (3, 4), (2, 8)])
def test_never_worse_than_paper_solver(n: int, m: int) -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(32, 8 * m, generator=gen)
    a = sorted_magnitudes(w, m)
    for lam in (0.1, 0.5, 1.0, 2.0):
        lam_t = torch.full((a.shape[0],), lam, dtype=torch.float64)
        ours = objective(sorted_magnitudes(prox_nm(w, lam, n, m), m), a, lam_t, n)
        paper = objective(sorted_magnitudes(paper_prox(w, lam, n, m), m), a, lam_t, n)
        assert (ours <= paper + tolerance(a, paper)).all(), (lam, (ours - paper).max())


def test_2_4_hard_cases() -> None:
    """Near-degenerate groups: a face minimum with a tiny smallest entry, ties, a zero."""
    rows = [[1.0, 0.9392693, 0.6763716, 0.0169106],  # top-3 minimum on the "-" branch
            [1.0, 0.7557689, 0.6046464, 0.4577513],
            [0.9565392, 0.7254961, 0.4938052, 0.2589386],  # top-3 vs all-4 within rounding
            [0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0],
            [0.4971884, 5.822336e-06, 1.224588e-06, 5.366427e-09]]
    w = torch.tensor(rows)
    a = sorted_magnitudes(w, 4)
    for lam in (0.05, 0.22487996, 0.5, 0.71991420, 0.8, 1.0, 1.5):
        lam_t = torch.full((len(rows),), lam, dtype=torch.float64)
        _, ref_obj = reference_prox(a, lam_t, 2)
        ours = objective(sorted_magnitudes(prox_nm(w, lam), 4), a, lam_t, 2)
        assert (ours <= ref_obj + tolerance(a, ref_obj)).all(), (lam, ours - ref_obj)


def _tensor_general(w: torch.Tensor, lam: float) -> torch.Tensor:
    from proxsparse.prox import _prox_general

    return _prox_general(sorted_magnitudes(w, 4).float(), lam, 2)


def _kernel_general(w: torch.Tensor, lam: float) -> torch.Tensor:
    from proxsparse.runtime.kernels import prox_nm as build

    return build().prox(w, lam, 2, 4)


@pytest.mark.parametrize("general,seed", [(_tensor_general, 5),
                                          pytest.param(_kernel_general, 9, marks=needs_kernel)])
def test_general_path_agrees_with_the_2_4_path(general, seed: int) -> None:
    """The general N:M solver (tensor code or the C++ kernel), run on 2:4 groups, finds the
    same objectives."""
    w = random_groups(4, 300, seed=seed)
    a = sorted_magnitudes(w, 4)
    for lam in (0.3, 0.8, 1.2):
        lam_t = torch.full((len(a),), lam, dtype=torch.float64)
        fast = objective(sorted_magnitudes(prox_nm(w, lam), 4), a, lam_t, 2)
        other = objective(sorted_magnitudes(general(w, lam).double(), 4), a, lam_t, 2)
        assert torch.allclose(fast, other, rtol=1e-5, atol=1e-12 * float(a.max()) ** 2)


# ------------------------------------------------------------------ properties

SCALES = [1e-4, 1e-2, 1.0, 1e2]


@st.composite
def weights(draw, m: int):
    """A [rows, m * groups] float32 weight with zeros, ties and negative values."""
    rows, groups = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    scale = draw(st.sampled_from(SCALES))
    level = st.one_of(st.just(0.0), st.just(1.0), st.just(0.5),
                      st.floats(0.0078125, 1.0, allow_nan=False, width=32))
    mags = draw(st.lists(level, min_size=rows * groups * m, max_size=rows * groups * m))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=len(mags), max_size=len(mags)))
    w = torch.tensor(mags) * torch.tensor(signs) * scale
    return w.reshape(rows, groups * m).float()


@st.composite
def case(draw):
    n, m = draw(st.sampled_from(PATTERNS))
    w = draw(weights(m))
    scale = float(w.abs().max()) or 1.0
    unit = draw(st.one_of(st.just(0.0), st.floats(1e-3, 30.0), st.just(1e9)))
    return n, m, w, unit / scale ** (n - 1)


@settings(max_examples=150, deadline=None)
@given(case())
def test_properties(c) -> None:
    n, m, w, lam = c
    check_properties(w, prox_nm(w, lam, n, m), n, m, lam)


def check_properties(w: torch.Tensor, u: torch.Tensor, n: int, m: int, lam: float) -> None:
    assert u.shape == w.shape and u.dtype == w.dtype
    assert torch.isfinite(u).all()
    gw, gu = w.reshape(-1, m), u.reshape(-1, m)
    # signs kept (or zero), magnitudes never grow, order of magnitudes kept within a group
    assert ((gu == 0) | (torch.sign(gu) == torch.sign(gw))).all()
    assert (gu.abs() <= gw.abs()).all()
    order = gw.abs().sort(dim=1, descending=True, stable=True).indices
    mags = gu.abs().gather(1, order)
    assert (mags[:, 1:] <= mags[:, :-1]).all()
    nnz_in, nnz_out = (gw != 0).sum(1), (gu != 0).sum(1)
    assert ((nnz_out >= torch.clamp(nnz_in, max=n)) & (nnz_out <= nnz_in)).all()
    if lam == 0:
        assert torch.equal(u, w)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(PATTERNS), st.data())
def test_huge_lam_keeps_exactly_the_top_n(pattern, data) -> None:
    n, m = pattern
    w = data.draw(weights(m))
    # a bounded dynamic range (or exact zeros) so that "huge" is huge for every group
    w = torch.where(w.abs() < 0.01 * w.abs().max(), torch.zeros_like(w), w)
    scale = float(w.abs().max()) or 1.0
    u = prox_nm(w, 1e6 / scale ** (n - 1), n, m)
    g = w.reshape(-1, m)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(
        1, g.abs().sort(dim=1, descending=True, stable=True).indices[:, :n], True)
    assert torch.equal(u.reshape(-1, m), torch.where(keep, g, torch.zeros_like(g)))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(PATTERNS), st.data())
def test_penalty_is_zero_exactly_for_n_sparse_groups(pattern, data) -> None:
    n, m = pattern
    w = data.draw(weights(m))
    per_group = nm_penalty_groups(w, n, m)
    nnz = (w.reshape(*w.shape[:-1], -1, m) != 0).sum(-1)
    assert torch.equal(per_group == 0, nnz <= n)


# ------------------------------------------------------------------ penalty


@pytest.mark.parametrize("n,m", PATTERNS)
def test_penalty_matches_the_subset_sum(n: int, m: int) -> None:
    w = torch.randn(3, 4 * m, dtype=torch.float64)
    groups = w.reshape(3, 4, m).abs()
    subsets = itertools.combinations(range(m), n + 1)
    brute = sum(math.prod(groups[..., i] for i in s) for s in subsets)
    assert torch.allclose(nm_penalty_groups(w, n, m), brute)
    assert torch.allclose(nm_penalty(w, n, m), brute.sum())
    assert nm_penalty(w, n, m).dim() == 0


def test_penalty_2_4_formula_and_gradient() -> None:
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0, 0.0, 5.0, 0.0, 6.0]], requires_grad=True)
    # 1*2*3 + 1*2*4 + 1*3*4 + 2*3*4 = 50; the second group has two non-zeros
    assert nm_penalty(w).item() == 50.0
    nm_penalty(w).backward()
    assert torch.allclose(w.grad[0, :4], torch.tensor([26.0, -19.0, 14.0, -11.0]))


# ------------------------------------------------------------------ API


def test_lam_zero_is_identity_and_tensor_lam_matches_float() -> None:
    w = torch.randn(16, 64)
    assert torch.equal(prox_nm(w, 0.0), w)
    assert torch.equal(prox_nm(w, torch.tensor(0.0)), w)
    assert torch.equal(prox_nm(w, torch.tensor(0.7)), prox_nm(w, 0.7))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_dtype_and_shape_preserved(dtype: torch.dtype) -> None:
    w = torch.randn(2, 3, 16).to(dtype)
    u = prox_nm(w, 0.6)
    assert u.dtype == dtype and u.shape == w.shape
    expected = prox_nm(w.double(), 0.6).to(dtype)  # computed in float32 or more, cast back
    assert torch.allclose(u.double(), expected.double(), rtol=1e-2, atol=1e-3)


def test_chunks_do_not_change_the_result() -> None:
    """More groups than one CPU chunk: same answer as processing each half on its own."""
    w = torch.randn(2400, 256)  # 153600 groups, more than two CPU chunks
    u = prox_nm(w, 0.8)
    assert torch.equal(u[:600], prox_nm(w[:600], 0.8))
    assert torch.equal(u[600:], prox_nm(w[600:], 0.8))


@pytest.mark.parametrize("kwargs,match", [
    (dict(w=torch.zeros(2, 6), lam=0.1), "multiple of m=4"),
    (dict(w=torch.zeros(2, 8), lam=0.1, n=4, m=4), "1 <= n < m"),
    (dict(w=torch.zeros(2, 8), lam=0.1, n=0, m=4), "1 <= n < m"),
    (dict(w=torch.zeros(2, 8), lam=-0.1), "lam must be >= 0"),
])
def test_errors(kwargs, match: str) -> None:
    w, lam = kwargs.pop("w"), kwargs.pop("lam")
    with pytest.raises(ValueError, match=match):
        prox_nm(w, lam, **kwargs)
    if "lam" not in match:
        with pytest.raises(ValueError, match=match):
            nm_penalty(w, **kwargs)


@pytest.mark.skipif(not can_compile(), reason="no C++ compiler or Python headers for "
                    "torch.compile (the learning loop then falls back to the eager prox)")
def test_compiled_2_4_is_exact_too() -> None:
    """The torch.compile'd 2:4 path (one fused kernel) is held to the same float64 reference,
    across scales and regimes, in one compilation (lam is passed as a tensor)."""
    for scale in (1e-4, 1.0, 100.0):
        w = random_groups(4, 240, seed=11) * scale
        a = sorted_magnitudes(w, 4)
        for unit in (0.05, 0.8, 5.0):
            lam = unit / scale
            lam_t = torch.full((len(a),), lam, dtype=torch.float64)
            _, ref_obj = reference_prox(a, lam_t, 2)
            u = prox_nm(w, lam, compiled=True)
            ours = objective(sorted_magnitudes(u, 4), a, lam_t, 2)
            assert (ours <= ref_obj + tolerance(a, ref_obj)).all(), (scale, unit)
            assert torch.equal(u.sign() * (u != 0), w.sign() * (u != 0))


@pytest.mark.skipif(not can_compile(), reason="no C++ compiler or Python headers for "
                    "torch.compile (the learning loop then falls back to the eager prox)")
def test_compiled_chunks_do_not_change_the_result() -> None:
    """More groups than one compiled chunk, the last one shorter: every chunk size runs through
    the same kernel and gives the answer of the tensor processed on its own."""
    from proxsparse.prox import _COMPILED_CHUNK

    rows = (2 * _COMPILED_CHUNK + 1000) // 64
    w = torch.randn(rows, 256, generator=torch.Generator().manual_seed(2)) * 0.02
    u = prox_nm(w, 40.0, compiled=True)
    assert torch.equal(u[:100], prox_nm(w[:100], 40.0, compiled=True))
    assert torch.equal(u[-7:], prox_nm(w[-7:], 40.0, compiled=True))
    eager = prox_nm(w, 40.0)
    a = sorted_magnitudes(w, 4)
    lam_t = torch.full((len(a),), 40.0, dtype=torch.float64)
    ours = objective(sorted_magnitudes(u, 4), a, lam_t, 2)
    theirs = objective(sorted_magnitudes(eager, 4), a, lam_t, 2)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------ compiled general N:M


GENERAL = [(1, 4), (3, 4), (2, 8), (4, 8), (1, 8), (7, 8)]


@needs_kernel
@pytest.mark.parametrize("n,m", GENERAL)
@pytest.mark.parametrize("scale", [1e-4, 1.0, 100.0])
def test_compiled_general_never_worse_than_float64_reference(n: int, m: int,
                                                             scale: float) -> None:
    """The C++ N:M kernel is held to the same contract as the tensor solver; more groups than
    one block of 16, and a count that is not a multiple of it."""
    w = random_groups(m, 121 if m == 4 else 37, seed=n * 10 + m + 1) * scale
    for unit in (0.01, 0.4, 1.2, 5.0):
        lam = unit / scale ** (n - 1)
        u = prox_nm(w, lam, n, m, compiled=True)
        assert_meets_reference(w, u, lam, n, m, unit)
        assert torch.equal(u.sign() * (u != 0), w.sign() * (u != 0))


@needs_kernel
@settings(max_examples=150, deadline=None)
@given(case())
def test_compiled_general_properties(c) -> None:
    n, m, w, lam = c
    check_properties(w, prox_nm(w, lam, n, m, compiled=True), n, m, lam)
    gw = w.reshape(-1, m)
    huge = prox_nm(torch.where(gw.abs() < 0.01 * gw.abs().max(), 0.0, gw), 1e6 / (
        float(gw.abs().max()) or 1.0) ** (n - 1), n, m, compiled=True)
    assert ((huge != 0).sum(1) <= n).all()


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_kernel)])
@pytest.mark.parametrize("n,m", [(1, 4), (1, 8)])
def test_flat_valley_of_tied_entries(compiled: bool, n: int, m: int) -> None:
    """1:M with all entries equal and ell = lam * a1^(n-1) = 1: every point with sum(u) = a1 on
    any face is a minimiser, so a solver ends anywhere on that valley, its entries unordered;
    putting them in the order of a must not cost objective."""
    for scale in (0.02, 1.0, 7.0):
        w = torch.full((5, m), scale)
        u = prox_nm(w, 1.0, n, m, compiled=compiled)
        assert_meets_reference(w, u, 1.0, n, m, scale)
        check_properties(w, u, n, m, 1.0)


@needs_kernel
def test_compiled_general_is_the_same_on_any_thread_count() -> None:
    """Groups are independent: two threads and one give the same bits, and a slice of the
    tensor gives the slice of the answer, as does a shuffle of its groups."""
    w = torch.randn(300, 576, generator=torch.Generator().manual_seed(4)) * 0.02
    lam = 0.03 / 0.02 ** 4
    one = prox_nm(w, lam, 4, 8, compiled=True)
    torch.set_num_threads(2)
    assert torch.equal(prox_nm(w, lam, 4, 8, compiled=True), one)
    assert torch.equal(prox_nm(w[7:13], lam, 4, 8, compiled=True), one[7:13])
    # the kernel orders groups by the faces they need, so shuffled groups share blocks with
    # other groups: each group's answer must not change
    order = torch.randperm(w.numel() // 8, generator=torch.Generator().manual_seed(5))
    shuffled = prox_nm(w.reshape(-1, 8)[order], lam, 4, 8, compiled=True)
    assert torch.equal(shuffled, one.reshape(-1, 8)[order])


@needs_kernel
@pytest.mark.parametrize("n,m", [(4, 8), (2, 8), (1, 4), (3, 4)])
def test_compiled_general_top_n_certificate_is_exact(n: int, m: int) -> None:
    """Groups that already hold N large entries and a small tail (a learning run near its end)
    are where the kernel skips its faces on a certificate of top-N optimality: the answer still
    meets the float64 reference, both where the certificate holds and just around its edges."""
    gen = torch.Generator().manual_seed(n * 10 + m)
    w = torch.randn(48, m, generator=gen)
    tail = w.abs().argsort(1, descending=True)[:, n:]
    for shrink in (0.3, 0.05, 0.01):
        wt = w.clone()
        wt.scatter_(1, tail, w.gather(1, tail) * shrink)
        for scale in (1e-3, 1.0):
            ws = wt * scale
            for unit in (0.05, 0.3, 1.0, 3.0):
                lam = unit / scale ** (n - 1)
                assert_meets_reference(ws, prox_nm(ws, lam, n, m, compiled=True), lam, n, m,
                                       (shrink, scale, unit))
