"""Stress check of the compiled general N:M prox against the tests' float64 reference.

Wider than the unit tests (which must stay quick): every N from 1 to 7 at M = 8 and 1:4, 3:4,
two seeds, eight units lam * scale^(n-1) from 0.001 to 30, two scales, on the tests' adversarial
groups (ties, zeros, near-ties, one dominant entry) and on randn. For each pattern it reports the
worst excess of the kernel's objective over the reference, as a fraction of the tests' tolerance
(<= 0 means never worse; a pass is < 1). Takes ~7 minutes at one thread.

    python bench/prox_stress_nm.py [--out bench/results/prox_stress_nm.md]
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from proxsparse.prox import prox_nm  # noqa: E402
from tests.test_prox import (  # noqa: E402
    objective,
    random_groups,
    reference_prox,
    sorted_magnitudes,
    tolerance,
)

PATTERNS = [(n, 8) for n in range(1, 8)] + [(1, 4), (3, 4)]
SEEDS = (11, 12)
UNITS = (0.001, 0.01, 0.1, 0.4, 1.0, 3.0, 10.0, 30.0)
SCALES = (1e-3, 1.0)
GROUPS = 160


def worst_excess(n: int, m: int) -> float:
    """Largest (kernel objective - reference objective) / tolerance over all cases."""
    worst = -float("inf")
    for seed in SEEDS:
        gen = torch.Generator().manual_seed(seed)
        inputs = [random_groups(m, GROUPS, seed), torch.randn(GROUPS, m, generator=gen)]
        for base in inputs:
            for scale in SCALES:
                w = base * scale
                a = sorted_magnitudes(w, m)
                for unit in UNITS:
                    lam = unit / scale ** (n - 1)
                    lam_t = torch.full((len(a),), lam, dtype=torch.float64)
                    _, ref = reference_prox(a, lam_t, n)
                    ours = objective(sorted_magnitudes(prox_nm(w, lam, n, m, compiled=True), m),
                                     a, lam_t, n)
                    excess = ((ours - ref) / tolerance(a, ref)).max().item()
                    worst = max(worst, excess)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/prox_stress_nm.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for n, m in PATTERNS:
        excess = worst_excess(n, m)
        verdict = "pass" if excess < 1 else "FAIL"
        rows.append(f"| {n}:{m} | {excess:.3f} | {verdict} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        "# General N:M prox: stress check against the float64 reference",
        "",
        f"{GROUPS} groups per case; seeds {SEEDS}; tests' adversarial groups and randn; "
        f"scales {SCALES}; units lam * scale^(n-1) {UNITS}. \"worst\" is the largest excess of "
        "the compiled kernel's objective over the reference, in units of the tests' tolerance "
        "(1e-6 relative plus the float32 output floor); <= 0: never worse, < 1: pass.",
        "",
        "| N:M | worst excess / tolerance | verdict |",
        "|---|---|---|",
        *rows,
        "",
        "- command: `python bench/prox_stress_nm.py`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%a %b %d %H:%M:%S UTC %Y}",
        f"- 1 thread, torch {torch.__version__}",
        "",
    ])
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
