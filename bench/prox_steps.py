"""How many Newton steps the 2:4 prox needs: float32 objective excess against a float64 solve.

Every group's float32 result is scored (float64) against the same algorithm run in float64 with
40 steps per face, and the excess is divided by the float-rounding tolerance that
tests/test_prox.py allows (1e-6 of the objective plus the float32 floor). Groups are stress cases
(near-ties, exact ties, zeros, one dominant entry, tiny last entries) with lam * max|w| spread
log-uniformly over 0.03..30, so every regime (2, 3 or 4 non-zeros) is hit.

    python bench/prox_steps.py            # writes bench/results/prox_steps.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

import torch

from proxsparse import prox

STEP_PAIRS = [(4, 3), (4, 4), (5, 3), (5, 4), (6, 5)]


def stress_groups(g: int, gen: torch.Generator) -> torch.Tensor:
    """[g, 4] magnitudes sorted in decreasing order, an eighth in each of six hard families."""
    w = torch.rand(g, 4, generator=gen)
    q = g // 8
    w[:q, 1:] = w[:q, :1] * (1 + 1e-3 * torch.rand(q, 3, generator=gen))  # near-ties
    w[q:2 * q, 1:] = w[q:2 * q, :1]  # exact ties
    w[2 * q:3 * q, -1] = 0
    w[3 * q:4 * q, 1:] *= 1e-3  # one dominant entry
    w[4 * q:5 * q, -1] *= 1e-4  # a tiny last entry
    w[5 * q:6 * q, 2:] *= torch.rand(q, 1, generator=gen) * 0.1
    return w.sort(1, descending=True).values


def objective(u: torch.Tensor, a: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    u, a = u.double(), a.double()
    return 0.5 * ((u - a) ** 2).sum(1) + lam.double() * prox.nm_penalty_groups(u)[:, 0]


def solve(a: torch.Tensor, lam: torch.Tensor, steps3: int, steps4: int) -> torch.Tensor:
    return torch.stack(prox._prox24(list(a.unbind(1)), lam, steps=(steps3, steps4)), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=400_000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/prox_steps.md"))
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    a = stress_groups(args.groups, gen)
    unit = 10 ** (torch.rand(args.groups, generator=gen) * 3 - 1.5)
    lam = unit / a[:, 0].clamp_min(1e-30)
    a64 = a.double()
    ref = objective(solve(a64, lam.double(), 40, 40), a64, lam)
    tol = 1e-6 * ref + 1e-12 * 0.5 * (a64 ** 2).sum(1)
    lines = [
        "# 2:4 prox: Newton steps against float rounding", "",
        f"{args.groups:,} stress groups (see bench/prox_steps.py); excess = (float32 objective "
        "- float64 40-step objective) / tolerance of tests/test_prox.py. Over 1 fails the tests.",
        "", "| steps top-3 face | steps full face | max excess | groups over 1 | groups over 0.1 |",
        "|---|---|---|---|---|",
    ]
    for steps3, steps4 in STEP_PAIRS:
        excess = (objective(solve(a, lam, steps3, steps4), a64, lam) - ref) / tol
        chosen = " (default)" if (steps3, steps4) == (prox._NEWTON_STEPS_3,
                                                        prox._NEWTON_STEPS_4) else ""
        lines.append(f"| {steps3}{chosen} | {steps4} | {excess.max():.3g} | "
                     f"{int((excess > 1).sum())} | {int((excess > 0.1).sum())} |")
        print(lines[-1], flush=True)
    lines += ["", "- command: `python bench/prox_steps.py`",
              f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
              f"- torch {torch.__version__}, {platform.machine()}"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
