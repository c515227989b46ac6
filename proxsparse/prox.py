"""The N:M regulariser of ProxSparse and its exact group-wise proximal operator.

For a group w of M consecutive weights along the input dimension, the regulariser is
R(w) = e_{N+1}(|w|), the elementary symmetric polynomial of degree N+1 of the magnitudes (for 2:4:
|w1 w2 w3| + |w1 w2 w4| + |w1 w3 w4| + |w2 w3 w4|); it is zero exactly when at most N entries are
non-zero. ``prox_nm`` returns, for every group z, argmin_w 1/2 ||w - z||^2 + lam * R(w).

How it is solved (DESIGN.md section 2): the minimiser keeps the signs of z and the order of
a = |z|, so each group is sorted by magnitude; its support is the top-k of a for some k in N..M.
k = N is a itself on the top N (zero penalty). For k > N the candidate is a local minimum of the
smooth problem on the top-k face; every candidate is built and the one with the smallest
objective is kept. Candidates are only ever feasible points whose objective is evaluated, so a
face without a valid minimum simply loses the comparison.

* 2:4 (``_prox24``): both faces reduce exactly to one scalar equation psi(v) = 0 with psi convex,
  whose rightmost root is the face's only possible local minimum. Newton's method started to the
  right of that root converges monotonically, so a fixed number of steps reaches float
  precision without any data-dependent control flow.
* other N:M (``_prox_general``, slower): on each face, damped Newton steps (Hessian shifted to be
  positive definite, best of a few step lengths, never increasing the objective) from two starts:
  the best point on the ray t * a and the lower face's candidate with a small new entry. For
  M = 4 and 8 the same solver also runs as a C++ kernel (``compiled=True``), one group per vector
  lane, skipping the faces that bounds prove hold no minimum and stopping each group's
  iterations once it can no longer improve.

Everything is tensor code without host synchronisation or data-dependent iteration counts; on the
CPU groups are processed in chunks so that the many elementwise passes stay in cache.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# 2:4 Newton steps on the top-3 and the full face: the fewest that keep every group within float
# rounding of a float64 solve in stress tests (bench/prox_steps.py: one step fewer on either face
# does not)
_NEWTON_STEPS_3, _NEWTON_STEPS_4 = 5, 4
_CPU_CHUNK = 65536  # groups per chunk on the CPU (fastest in measurements: cache vs call overhead)
_COMPILED_CHUNK = 32768  # groups per chunk of the compiled kernel (fastest measured)
_NEWTON_ITERS = 8  # general N:M: damped Newton iterations per face and start ...
_STEP_LENGTHS = (1.0, 0.5, 0.125)  # ... each trying these step lengths
_RAY_STEPS = 8
_ELL_MIN, _ELL_MAX = 1e-20, 1e12  # range of the scaled lam used to *build* 2:4 candidates


def _check(weight: Tensor, n: int, m: int) -> None:
    if not 1 <= n < m:
        raise ValueError(f"N:M sparsity needs 1 <= n < m, got n={n}, m={m}")
    if weight.dim() < 1 or weight.shape[-1] % m != 0:
        raise ValueError(f"last dimension of the weight ({tuple(weight.shape)}) must be a "
                         f"multiple of m={m}")


def _esp(x: Tensor, r: int) -> Tensor:
    """e_r over the last dimension of ``x`` (r >= 0), by the usual one-pass recursion."""
    e = [torch.ones_like(x[..., 0])] + [torch.zeros_like(x[..., 0]) for _ in range(r)]
    for j in range(x.shape[-1]):
        for d in range(r, 0, -1):
            e[d] = e[d] + x[..., j] * e[d - 1]
    return e[r]


def nm_penalty_groups(weight: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """R of every group: shape ``[..., in/m]`` for a weight ``[..., in]``."""
    _check(weight, n, m)
    groups = weight.reshape(*weight.shape[:-1], weight.shape[-1] // m, m)
    return _esp(groups.abs(), n + 1)


def nm_penalty(weight: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """R summed over all groups of ``weight`` (a 0-d tensor, differentiable)."""
    return nm_penalty_groups(weight, n, m).sum()


def prox_nm(
    weight: Tensor, lam: float | Tensor, n: int = 2, m: int = 4, compiled: bool = False
) -> Tensor:
    """Group-wise proximal operator of ``lam * R``: same shape, dtype and device as ``weight``.

    ``lam`` may be a python number or a 0-d tensor on the weight's device or the CPU (a tensor is
    never read on the host, so it can change between calls at no cost). Computation is in
    float32 (float64 stays float64); the result is cast back to the weight's dtype.

    ``compiled=True`` runs float32 on compiled code: 2:4 through ``torch.compile``, which fuses
    its many elementwise passes into one (several times faster; the first call compiles for about
    a minute, so it pays off on large models or many calls), and other N:M with M = 4 or 8 on
    the CPU through a C++ kernel (runtime/kernels/prox_nm_cpu.cpp, the same solver one group per
    vector lane; built on first use, and the tensor code with a warning where it cannot be
    built).
    Other cases ignore it.
    """
    _check(weight, n, m)
    if not isinstance(lam, Tensor) and lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    ctype = torch.promote_types(weight.dtype, torch.float32)
    z = weight.detach().reshape(-1, m)
    lam_t = lam.detach().to(ctype) if isinstance(lam, Tensor) else float(lam)
    # chunks keep the CPU's many passes in cache; an accelerator takes every group at once
    on_cpu = z.device.type == "cpu"
    chunk = _CPU_CHUNK if on_cpu else max(z.shape[0], 1)
    if (n, m) == (2, 4):
        if compiled and ctype == torch.float32:
            # a tensor lam, so that a new value does not trigger a new compilation
            lam_t = torch.as_tensor(lam_t, dtype=ctype, device=z.device)
            out = _prox24_by_chunks(z, lam_t, ctype, _compiled_chunk24(),
                                    _COMPILED_CHUNK if on_cpu else chunk)
        else:
            out = _prox24_by_chunks(z, lam_t, ctype, _chunk24, chunk)
        return out.reshape(weight.shape).to(weight.dtype)
    if compiled and on_cpu and ctype == torch.float32 and m in (4, 8):
        kernel = _general_kernel()
        if kernel is not None:
            lam_f = float(lam_t)  # a CPU value: reading it costs no device synchronisation
            return kernel.prox(z.to(ctype).contiguous(), lam_f, n, m).reshape(
                weight.shape).to(weight.dtype)
    out = torch.empty(z.shape, dtype=ctype, device=z.device)
    for start in range(0, z.shape[0], chunk):
        zc, oc = z[start:start + chunk].to(ctype), out[start:start + chunk]
        vals, order = zc.abs().sort(dim=1, descending=True)
        oc.scatter_(1, order, _prox_general(vals, lam_t, n))
        torch.copysign(oc, zc, out=oc)
    return out.reshape(weight.shape).to(weight.dtype)


@functools.cache
def _general_kernel():
    """The compiled general N:M prox module, or None (with one warning) where it cannot be
    built: no compiler, no ninja, not x86/ARM with GCC vector extensions."""
    from .runtime.kernels import KernelUnavailable
    from .runtime.kernels import prox_nm as build

    try:
        return build()
    except KernelUnavailable as err:
        warnings.warn(f"the compiled N:M prox could not be built ({err}); using the tensor "
                      "code (same result, much slower)", stacklevel=3)
        return None


def _prox24_by_chunks(z: Tensor, lam: Tensor | float, ctype: torch.dtype, kernel,
                      chunk: int) -> Tensor:
    """2:4 prox of groups ``z`` [G, 4], ``chunk`` groups at a time through ``kernel`` (the
    position-first ``_chunk24`` or its compiled form), in ``ctype``.

    Each chunk is transposed to [4, chunk] and back. On the CPU numpy does the transposes: its
    strided copy is several times faster than torch's, which would otherwise cost a sixth of the
    time.
    """
    out = torch.empty(z.shape, dtype=ctype, device=z.device)
    on_cpu = z.device.type == "cpu"
    for start in range(0, z.shape[0], chunk):
        zc, oc = z[start:start + chunk].to(ctype), out[start:start + chunk]
        if on_cpu:
            rows = torch.from_numpy(np.ascontiguousarray(zc.numpy().T))
            np.copyto(oc.numpy(), kernel(rows, lam).numpy().T)
        else:
            oc.copy_(kernel(zc.t().contiguous(), lam).t())
    return out


@functools.cache
def _compiled_chunk24():
    # dynamic sizes: one compilation serves every chunk length, as fast as a static one
    return torch.compile(_chunk24, dynamic=True)


def _chunk24(z: Tensor, lam: Tensor | float) -> Tensor:
    """2:4 prox of groups laid out position-first, ``z`` [4, G] (row i: entry i of every group),
    signs included; returns [4, G]. Rows are contiguous, so every pass is a vectorised loop."""
    a = z.abs().unbind(0)
    rank = _ranks4(a)
    # the r-th largest magnitude: the entry of rank r (ranks are a permutation of 0..3)
    u = _prox24([_of_rank(rank, a, r) for r in range(4)], lam)
    # each entry takes the solution of its rank: no sort, no scatter, all elementwise
    return torch.copysign(torch.stack([_select(u, r) for r in rank]), z)


# --------------------------------------------------------------------------------------------
# 2:4. Each group's four magnitudes are handled as four [G] tensors, largest first.
# --------------------------------------------------------------------------------------------


def _ranks4(a: Sequence[Tensor]) -> list[Tensor]:
    """Rank of each of 4 entries by decreasing magnitude, ties in position order (0 = largest).

    Comparisons only, so that the compiled kernel stays one vectorised elementwise loop (a sort
    and the scatter back are several times slower there).
    """
    return [sum(((a[i] >= a[j]) if i < j else (a[i] > a[j])).to(a[j].dtype)
                for i in range(4) if i != j) for j in range(4)]


def _of_rank(rank: Sequence[Tensor], a: Sequence[Tensor], r: int) -> Tensor:
    """Per group, the entry of ``a`` whose rank is ``r``."""
    return _first_where([rank[j] == r for j in range(3)], a)


def _select(values: Sequence[Tensor], index: Tensor) -> Tensor:
    """Per group, ``values[index]`` (``index`` holds 0..3)."""
    return _first_where([index == k for k in range(3)], values)


def _first_where(conditions: Sequence[Tensor], values: Sequence[Tensor]) -> Tensor:
    """Per group, ``values[k]`` for the first true ``conditions[k]``, else the last value."""
    out = values[-1]
    for condition, value in zip(reversed(conditions), reversed(values[:-1]), strict=True):
        out = torch.where(condition, value, out)
    return out


# The maths of 2:4. For sorted magnitudes a1 >= a2 >= a3 >= a4 the group is scaled by a1
# (b = a / a1, ell = lam * a1) so that candidates are scored in well-scaled numbers, and built in
# "lam = 1 units" (alpha = ell * b, candidate = u / ell), where stationarity reads
#   u_i - alpha_i + e2(u without u_i) = 0   for every i on the face (top-k positive).
# With p = e1(u), each u_i is a root of u^2 + (1 - p) u + e2 - alpha_i = 0, and the identity
# sum_i (alpha_i - u_i) = (k - 2) e2 fixes e2 from p. A local minimum uses the "+" root for all
# entries but possibly the smallest; y = +-sqrt(discriminant of the smallest) joins its two
# branches, and the consistency sum_i u_i = p becomes one scalar equation psi = 0:
#   k = 3: psi(eta) = eta + sum_{c in s, c1, c2} (sqrt((1 + eta)^2 + 4c) - 1), eta = y - 1,
#          s = alpha1 + alpha2, c_i = alpha_i - alpha3; then p = sqrt((1 + eta)^2 + 4s) - 1;
#   k = 4: psi = 2p + (y - 1) + sum_{i<4} (sqrt(p^2 + d_i) - 1), d_i = 1 - 2A + 4 alpha_i,
#          p^2 = y^2 - d4; the variable is y where d4 < 0 and p where d4 >= 0 (there the "-"
#          branch is infeasible).
# psi is convex in its variable, and the face's local minimum, if any, is its rightmost root (a
# left root is a saddle). The smallest entry grows with the variable, so u_k = alpha_k (an upper
# bound for any stationary point) lies right of that root; so does the branch point y = 0 when
# psi(y = 0) >= 0 (dpsi = 1 there), else the root lies right of it. Newton's method from such a
# start decreases monotonically to the root; iterates stay in [u_k = 0, u_k = alpha_k]. Terms
# sqrt(x) - 1 are written as (x - 1) / (sqrt(x) + 1) so that small ell (u close to alpha) keeps
# its relative precision.


def _roots(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """sqrt(x), 1 / sqrt(x) and 1 / (sqrt(x) + 1) for x > 0, with one square root and one
    division (square roots and divisions dominate the kernel; a reciprocal square root costs
    one of each)."""
    root = x.sqrt()
    inv = 1 / (root * (root + 1))
    return root, (root + 1) * inv, root * inv


def _face3(al1: Tensor, al2: Tensor, al3: Tensor, steps: int = _NEWTON_STEPS_3) -> list[Tensor]:
    """Candidate on the top-3 face, in lam = 1 units."""
    s4, c14, c24 = 4 * (al1 + al2), 4 * (al1 - al3), 4 * (al2 - al3)
    tiny = torch.finfo(al1.dtype).tiny  # keeps rsqrt finite at the branch point of a tie
    lo = s4 * -0.25  # u3 = 0
    hi = al3 + lo / (1 + al3)  # u3 = alpha3
    # psi(-1) (branch point y = 0, where dpsi = 1) tells on which side of it the root lies
    minus = (s4.sqrt() + c14.sqrt() + c24.sqrt()) >= 4
    eta = torch.where(minus, hi.clamp_max(-1), hi)
    lo = torch.where(minus, lo, lo.clamp_min(-1))
    one = torch.ones_like(eta)
    for _ in range(steps):
        t = eta + 1
        q = t.square()
        base = torch.addcmul(eta, eta, t)  # (1 + eta)^2 - 1
        psi, rsum = eta, torch.zeros_like(eta)
        for c4 in (s4, c14, c24):
            _, inv_root, inv_root1 = _roots(q + (c4 + tiny))
            psi = torch.addcmul(psi, base + c4, inv_root1)  # + sqrt(x) - 1
            rsum = rsum + inv_root
        dpsi = torch.addcmul(one, rsum, t).clamp_min_(1e-30)
        eta = torch.clamp(torch.addcdiv(eta, psi, dpsi, value=-1), lo, hi)
    q, base = (eta + 1).square(), torch.addcmul(eta, eta, eta + 1)
    p, r1, r2 = ((base + c4) / (q + c4).sqrt_().add_(1) for c4 in (s4, c14, c24))
    return [(p + r1) * 0.5, (p + r2) * 0.5, (p + eta) * 0.5]


def _face4(al1: Tensor, al2: Tensor, al3: Tensor, al4: Tensor,
           steps: int = _NEWTON_STEPS_4) -> list[Tensor]:
    """Candidate on the full face, in lam = 1 units."""
    A = al1 + al2 + al3 + al4
    tiny = torch.finfo(A.dtype).tiny
    d4m1 = 4 * al4 - 2 * A  # d4 - 1, without cancellation
    use_y = (d4m1 < -1).to(A.dtype)  # 1: variable y (d4 < 0); 0: variable p
    ad4 = (d4m1 + 1).abs_()
    # discriminant of entry i is v^2 + 1 + dm1[i]
    dm1 = [torch.lerp(4 * al - 2 * A, 4 * (al - al4) - 1, use_y) for al in (al1, al2, al3)]
    den = 2 * al4 + 1
    p_hi = (2 * al4 * al4 + A) / den  # u4 = alpha4
    p_lo = A - 2 * al4  # u4 = 0
    hi, lo = torch.lerp(p_hi, den - p_hi, use_y), torch.lerp(p_lo, 1 - p_lo, use_y)
    # with variable y, psi(0) (branch point, where dpsi = 1) tells on which side the root lies
    psi0 = 2 * (ad4.sqrt() + (al1 - al4).sqrt() + (al2 - al4).sqrt() + (al3 - al4).sqrt()) - 4
    minus = (psi0 >= 0).to(A.dtype) * use_y
    v = torch.lerp(hi, hi.clamp_max(0), minus)
    lo = torch.lerp(lo, lo.clamp_min(0), use_y - minus)

    dp1 = [(dm + 1).clamp_min_(tiny) for dm in dm1]
    ad4t = ad4 + tiny

    def terms(v: Tensor) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
        v2 = v.square()
        g, rg, inv_g1 = _roots(v2 + ad4t)  # g = sqrt(v^2 + |d4|): p if use_y else y
        p = torch.lerp(v, g, use_y)
        ym1 = torch.lerp((v2 + d4m1) * inv_g1, v - 1, use_y)
        qs, rs = [], []
        for dm, dp in zip(dm1, dp1, strict=True):
            _, r, inv1 = _roots(v2 + dp)
            qs.append((v2 + dm) * inv1)  # sqrt(p^2 + d_i) - 1
            rs.append(r)
        return rg, p, ym1, qs, rs

    for _ in range(steps):
        rg, p, ym1, qs, rs = terms(v)
        psi = torch.add(ym1, p, alpha=2).add_(qs[0]).add_(qs[1]).add_(qs[2])
        vg = v * rg
        dpsi = torch.addcmul(vg + 2, use_y, vg - 1)  # 2 dp/dv + dy/dv
        dpsi.addcmul_(v, rs[0].add_(rs[1]).add_(rs[2])).clamp_min_(1e-30)
        v = torch.clamp(torch.addcdiv(v, psi, dpsi, value=-1), lo, hi)
    _, p, ym1, qs, _ = terms(v)
    return [(p + qs[0]) * 0.5, (p + qs[1]) * 0.5, (p + qs[2]) * 0.5, (p + ym1) * 0.5]


def _prox24(a: Sequence[Tensor], lam: Tensor | float,
            steps: tuple[int, int] = (_NEWTON_STEPS_3, _NEWTON_STEPS_4)) -> list[Tensor]:
    """2:4 prox of sorted magnitudes ``a`` (four [G] tensors, the largest first), with
    ``steps`` Newton steps on the top-3 and on the full face."""
    a1 = a[0].clamp_min(torch.finfo(a[0].dtype).tiny)
    b2, b3, b4 = a[1] / a1, a[2] / a1, a[3] / a1
    ell = lam * a1
    ell_c = ell.clamp(_ELL_MIN, _ELL_MAX)
    al2, al3, al4 = b2 * ell_c, b3 * ell_c, b4 * ell_c
    inv = 1 / ell_c
    # candidates in units of a1; rounding residue below zero is clipped (stays feasible)
    c3 = [(x * inv).clamp_min(0) for x in _face3(ell_c, al2, al3, steps[0])]
    c4 = [(x * inv).clamp_min(0) for x in _face4(ell_c, al2, al3, al4, steps[1])]
    obj2 = (b3 * b3 + b4 * b4) * 0.5
    obj3 = ((c3[0] - 1).square() + (c3[1] - b2).square() + (c3[2] - b3).square() + b4 * b4) * 0.5
    obj3 = obj3 + ell * (c3[0] * c3[1] * c3[2])
    obj4 = ((c4[0] - 1).square() + (c4[1] - b2).square() + (c4[2] - b3).square()
            + (c4[3] - b4).square()) * 0.5
    obj4 = obj4 + ell * ((c4[0] + c4[1]) * (c4[2] * c4[3]) + c4[0] * c4[1] * (c4[2] + c4[3]))
    # lam == 0 is the identity, returned exactly rather than through the solver's rounding
    ident = ell == 0
    use4 = (obj4 < obj2) & (obj4 < obj3)
    use3 = obj3 < obj2
    zero = torch.zeros_like(a1)
    out: list[Tensor] = []
    for i in range(4):
        top2 = a[i] if i < 2 else zero
        x = torch.where(use4, c4[i] * a1, torch.where(use3, c3[i] * a1 if i < 3 else zero, top2))
        x = torch.where(ident, a[i], x)
        # the exact solution has u_i <= a_i and keeps the order; enforce both against rounding
        out.append(torch.minimum(x, a[i] if i == 0 else torch.minimum(a[i], out[-1])))
    return out


# --------------------------------------------------------------------------------------------
# General N:M. Groups scaled by their largest magnitude (b = a / a1, ell = lam * a1^(n-1)).
# --------------------------------------------------------------------------------------------


def _face_objective(u: Tensor, b: Tensor, ell: Tensor, n: int) -> Tensor:
    """Objective (in units of a1^2) of the point u on the top-k face, zeros elsewhere."""
    k = u.shape[1]
    return 0.5 * ((u - b[:, :k]) ** 2).sum(1) + 0.5 * (b[:, k:] ** 2).sum(1) \
        + ell * _esp(u, n + 1)


def _leave_one_out(u: Tensor, n: int) -> Tensor:
    """``[G, k, n + 1]``: e_r(u without u_i) for r = 0..n, by the recursion on masked copies."""
    k = u.shape[1]
    x = u[:, None, :] * (1 - torch.eye(k, dtype=u.dtype, device=u.device))  # [G, i, l]
    e = [torch.ones_like(x[..., 0])] + [torch.zeros_like(x[..., 0]) for _ in range(n)]
    for j in range(k):
        for d in range(n, 0, -1):
            e[d] = e[d] + x[..., j] * e[d - 1]
    return torch.stack(e, -1)


def _solve_descent(h: Tensor, g: Tensor) -> Tensor:
    """Solve h x = g for every group by a Cholesky factorisation written out over the (small)
    matrix entries, vectorised over groups (much faster than batched LAPACK calls on tiny
    matrices). A pivot that is not safely positive is replaced by its magnitude (at least 1e-3):
    the factorisation is then of a positive definite modification of h, so x is a descent
    direction even where h is indefinite."""
    k = h.shape[1]
    low: dict[tuple[int, int], Tensor] = {}
    for j in range(k):
        d = h[:, j, j] - sum((low[j, p].square() for p in range(j)), torch.zeros_like(g[:, 0]))
        low[j, j] = torch.where(d > 1e-6, d, d.abs().clamp_min(1e-3)).sqrt()
        for i in range(j + 1, k):
            acc = sum((low[i, p] * low[j, p] for p in range(j)), torch.zeros_like(g[:, 0]))
            low[i, j] = (h[:, i, j] - acc) / low[j, j]
    y: list[Tensor] = []
    for i in range(k):
        acc = sum((low[i, p] * y[p] for p in range(i)), torch.zeros_like(g[:, 0]))
        y.append((g[:, i] - acc) / low[i, i])
    x: list[Tensor] = [torch.zeros_like(g[:, 0])] * k
    for i in reversed(range(k)):
        acc = sum((low[p, i] * x[p] for p in range(i + 1, k)), torch.zeros_like(g[:, 0]))
        x[i] = (y[i] - acc) / low[i, i]
    return torch.stack(x, 1)


def _damped_newton(u: Tensor, b: Tensor, ell: Tensor, n: int) -> Tensor:
    """Fixed number of Newton steps on the face of ``u`` (entries kept positive).

    Each direction is a descent direction (``_solve_descent``); of a few step lengths the one with
    the smallest objective is taken (none if none helps), so the objective never increases.
    """
    k = u.shape[1]
    eye = torch.eye(k, dtype=u.dtype, device=u.device)
    upper = torch.ones(k, k, dtype=torch.bool, device=u.device).triu(1)
    obj = _face_objective(u, b, ell, n)
    for _ in range(_NEWTON_ITERS):
        loo = _leave_one_out(u, n)
        grad = u - b[:, :k] + ell[:, None] * loo[..., n]
        # e_{n-1}(u without i, j) = sum_t (-u_j)^t e_{n-1-t}(u without i), with j the smaller one
        powers = torch.stack([(-u) ** t for t in range(n)], -1)  # [G, j, t]
        cross = torch.einsum("git,gjt->gij", loo[..., :n].flip(-1), powers).masked_fill(~upper, 0)
        hess = eye + ell[:, None, None] * (cross + cross.transpose(1, 2))
        step = _solve_descent(hess, grad)
        for t in _STEP_LENGTHS:
            new = u - t * step
            new_obj = _face_objective(new, b, ell, n)
            ok = (new > 0).all(1) & (new_obj < obj) & new.isfinite().all(1)
            u = torch.where(ok[:, None], new, u)
            obj = torch.where(ok, new_obj, obj)
    return u


def _prox_general(a: Tensor, lam: Tensor | float, n: int) -> Tensor:
    """N:M prox of groups sorted by decreasing magnitude, ``[G, m]`` -> ``[G, m]``."""
    g, m = a.shape
    a1 = a[:, :1].clamp_min(torch.finfo(a.dtype).tiny)
    b = a / a1
    ell = (lam * a1[:, 0] ** (n - 1)).expand(g)
    best = torch.cat([b[:, :n], torch.zeros_like(b[:, n:])], 1)
    best_obj = 0.5 * (b[:, n:] ** 2).sum(1)
    top_n = torch.ones_like(best_obj, dtype=torch.bool)  # the top-n candidate is still best
    prev = best[:, :n]  # the face below's candidate, to continue from
    for k in range(n + 1, m + 1):
        bk = b[:, :k]
        # start 1: the best point on the ray t * b (a convex scalar equation in t, Newton from 1)
        nb2, ek = (bk * bk).sum(1), (n + 1) * ell * _esp(bk, n + 1)
        t = torch.ones_like(nb2)
        for _ in range(_RAY_STEPS):
            t = t - ((t - 1) * nb2 + ek * t**n) / (nb2 + n * ek * t ** (n - 1)).clamp_min(1e-30)
        # start 2: the face below's candidate with a small new entry (minima with a small u_k)
        starts = [t[:, None] * bk, torch.cat([prev, 1e-3 * bk[:, -1:]], 1)]
        u = _damped_newton(torch.cat(starts, 0), b.repeat(2, 1), ell.repeat(2), n)
        obj = _face_objective(u, b.repeat(2, 1), ell.repeat(2), n).view(2, g)
        u = u.view(2, g, k)
        pick = obj[1] < obj[0]
        u_k, obj_k = torch.where(pick[:, None], u[1], u[0]), torch.where(pick, obj[1], obj[0])
        better = obj_k < best_obj
        best = torch.where(better[:, None], torch.cat([u_k, torch.zeros_like(b[:, k:])], 1), best)
        best_obj = torch.where(better, obj_k, best_obj)
        top_n = top_n & ~better
        prev = u_k
    # the top-n candidate and lam = 0 (the identity) are returned exactly; otherwise enforce
    # u <= a and the order of a, which the exact solution has, against rounding. Sorting u
    # never raises the objective (R is symmetric, and sorted u against sorted a maximises
    # u . a), where a running minimum could: tied entries of a may end unordered, as
    # minimisers do on a flat valley (1:8 with ell = 1 and equal entries). Clipping an entry
    # that exceeds a_j down to it lowers both terms.
    keep = torch.cat([a[:, :n], torch.zeros_like(a[:, n:])], 1)
    out = torch.minimum(best.sort(1, descending=True).values * a1, a)
    return torch.where((ell == 0)[:, None], a, torch.where(top_n[:, None], keep, out))
