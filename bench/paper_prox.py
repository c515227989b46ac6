"""The ProxSparse paper's own proximal solver, as described in DESIGN.md section 2.

This is the accuracy and speed reference for ``proxsparse.prox.prox_nm``; it is not used by the
package. For every candidate support (the top-k magnitudes of a group, k = n+1..m) it runs
exact coordinate descent from u = 0, sweeping the coordinates from the smallest magnitude to the
largest and setting ``u_i = max(a_i - lam * dR/du_i, 0)`` with the others held. It stops after
``max_sweeps`` sweeps or as soon as the summed absolute change of a sweep (over the whole layer)
falls below ``tol``, a host-side test every sweep as in the original. Per group it then keeps the
candidate (top-n as is, or one of the top-k solutions) with the smallest objective.

Vectorised over the groups of a layer; general N:M.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _esp_columns(cols: list[Tensor], r: int) -> Tensor:
    """Elementary symmetric polynomial of degree ``r`` (>= 1) of the given same-shape tensors."""
    e: list[Tensor | None] = [None] * (r + 1)  # e[d] of the columns seen so far; None = 0
    for x in cols:
        for d in range(r, 1, -1):
            if e[d - 1] is not None:
                e[d] = x * e[d - 1] if e[d] is None else e[d] + x * e[d - 1]
        e[1] = x if e[1] is None else e[1] + x
    return e[r] if e[r] is not None else torch.zeros_like(cols[0])


def paper_prox(weight: Tensor, lam: float, n: int = 2, m: int = 4, max_sweeps: int = 100,
               tol: float = 1e-8) -> Tensor:
    """Group-wise prox of ``lam * R`` (R = e_{n+1} of the magnitudes) by the paper's method."""
    shape, dtype = weight.shape, weight.dtype
    z = weight.detach().reshape(-1, m).to(torch.promote_types(dtype, torch.float32))
    a, order = z.abs().sort(dim=1, descending=True)
    cols = list(a.unbind(1))
    zero = torch.zeros_like(cols[0])

    best = [c if i < n else zero for i, c in enumerate(cols)]
    best_obj = 0.5 * sum(c * c for c in cols[n:])
    for k in range(n + 1, m + 1):
        u = [zero.clone() for _ in range(k)]
        for _ in range(max_sweeps):
            change = torch.zeros((), dtype=a.dtype, device=a.device)
            for i in reversed(range(k)):  # smallest magnitude first
                others = u[:i] + u[i + 1:]
                new = (cols[i] - lam * _esp_columns(others, n)).clamp_min(0)
                change = change + (new - u[i]).abs().sum()
                u[i] = new
            if change.item() < tol:
                break
        cand = u + [zero] * (m - k)
        obj = 0.5 * sum((c - x) ** 2 for c, x in zip(cand, cols, strict=True))
        obj = obj + lam * _esp_columns(u, n + 1)
        better = obj < best_obj
        best = [torch.where(better, c, b) for c, b in zip(cand, best, strict=True)]
        best_obj = torch.where(better, obj, best_obj)

    out = torch.empty_like(a).scatter_(1, order, torch.stack(best, 1))
    return (out * z.sign()).reshape(shape).to(dtype)
