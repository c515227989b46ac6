"""Speed of the general N:M prox (4:8, 2:8): the compiled kernel against the tensor solver and
the paper's solver, on SmolLM2-135M's layer shapes.

Weights = 0.02 * randn (SmolLM2's scale), lam = unit / 0.02^(n-1) for three units that span
the regimes of the solver: most groups above N non-zeros (small lam, early in training),
groups spread over every face, and nearly all groups at top-N. A fourth kind of input,
"learned", is what the prox sees late in a run: every group already N-sparse, its other
entries perturbed to 2% of the scale (as by a few optimizer steps), at the middle unit; there
the kernel's top-N certificate skips most blocks' faces.
"M w/s" = million weights per second, best of several runs; the tensor solver
(``prox_nm(compiled=False)``) and the paper's solver (bench/paper_prox.py) run on the first
rows only (they are 100-1000x slower), which gives their per-weight rate. "gap" is the largest
per-group objective difference (1/2 ||u - w||^2 + lam R(u), float64) of the kernel minus the
other solver, relative to that group's objective: <= 0 up to rounding means never worse.

    python bench/prox_speed_nm.py [--threads 1,2] [--out bench/results/prox_speed_nm.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_prox import paper_prox  # noqa: E402
from prox_speed import best_time  # noqa: E402

from proxsparse.prox import nm_penalty_groups, prox_nm  # noqa: E402

SHAPES = [("q/o 576x576", (576, 576)), ("k/v 192x576", (192, 576)),
          ("gate/up 1536x576", (1536, 576)), ("down 576x1536", (576, 1536))]
PATTERNS = [(4, 8), (2, 8)]
UNITS = (0.03, 0.3, 3.0)
SCALE = 0.02
SLOW_ROWS = 16  # rows the tensor and paper solvers run on


def vector_isa() -> str:
    """The widest x86 vector extension of this CPU (the kernel is built for it)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "unknown"
    return next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"),
                                         ("sse4_2", "SSE4.2")) if flag in flags), "other")


def group_objective(u: torch.Tensor, w: torch.Tensor, lam: float, n: int, m: int) -> torch.Tensor:
    u, w = u.double(), w.double()
    return (0.5 * ((u - w) ** 2).reshape(-1, m).sum(1)
            + lam * nm_penalty_groups(u, n, m).reshape(-1))


def weights(shape: tuple[int, int], n: int, m: int, learned: bool, seed: int) -> torch.Tensor:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * SCALE
    if learned:  # N kept per group, the rest small
        g = w.view(-1, m)
        tail = g.abs().argsort(1, descending=True)[:, n:]
        g.scatter_(1, tail, g.gather(1, tail) * 0.02)
    return w


def measure(shape: tuple[int, int], n: int, m: int, unit: float, seed: int,
            learned: bool = False) -> dict:
    w = weights(shape, n, m, learned, seed)
    lam = unit / SCALE ** (n - 1)
    prox_nm(w[:4], lam, n, m, compiled=True)  # builds or loads the kernel
    t_kernel = best_time(lambda: prox_nm(w, lam, n, m, compiled=True), 5)
    slow = w[:SLOW_ROWS]
    t_tensor = best_time(lambda: prox_nm(slow, lam, n, m), 1) * w.numel() / slow.numel()
    start = time.perf_counter()
    paper = paper_prox(slow, lam, n, m)
    t_paper = (time.perf_counter() - start) * w.numel() / slow.numel()
    ours = prox_nm(w, lam, n, m, compiled=True)
    o_ours = group_objective(ours[:SLOW_ROWS], slow, lam, n, m)
    o_tensor = group_objective(prox_nm(slow.double(), lam, n, m), slow, lam, n, m)
    o_paper = group_objective(paper, slow, lam, n, m)
    nnz = (ours.reshape(-1, m) != 0).sum(1)
    return dict(mws=[w.numel() / t / 1e6 for t in (t_kernel, t_tensor, t_paper)],
                gap_tensor=((o_ours - o_tensor) / o_tensor.clamp_min(1e-300)).max().item(),
                gap_paper=((o_ours - o_paper) / o_paper.clamp_min(1e-300)).max().item(),
                share=[(nnz == k).double().mean().item() for k in range(n, m + 1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"
                                             / "prox_speed_nm.md"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    header = ("| N:M | layer | unit, input | kernel M w/s | tensor M w/s | paper M w/s | "
              "kernel vs tensor | max rel gap vs tensor (float64) / vs paper | "
              "groups by nnz (N..M) |\n|" + "---|" * 9)
    tables = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        rows = [f"### {threads} thread{'s' if threads > 1 else ''}\n", header]
        for n, m in PATTERNS:
            for i, (name, shape) in enumerate(SHAPES):
                for unit, learned in [(u, False) for u in UNITS] + [(UNITS[1], True)]:
                    r = measure(shape, n, m, unit, seed=i, learned=learned)
                    k, t, p = r["mws"]
                    kind = f"{unit:g}, learned" if learned else f"{unit:g}"
                    row = (f"| {n}:{m} | {name} | {kind} | {k:.1f} | {t:.3f} | {p:.2f} | "
                           f"{k / t:.0f}x | {r['gap_tensor']:.1e} / {r['gap_paper']:.1e} | "
                           + " / ".join(f"{100 * s:.0f}%" for s in r["share"]) + " |")
                    rows.append(row)
                    print(f"{threads} thr {row}", flush=True)
        tables.append("\n".join(rows))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y")
    text = f"""# General N:M prox speed (compiled kernel)

`prox_nm(..., compiled=True)` for N:M other than 2:4 runs the C++ kernel
(proxsparse/runtime/kernels/prox_nm_cpu.cpp); "tensor" is the same solver in tensor code
(`compiled=False`, float32) and "paper" the paper's alternating solver (bench/paper_prox.py),
both timed on the first {SLOW_ROWS} rows. Weights = {SCALE} * randn, lam = unit / {SCALE}^(n-1).
The gap vs tensor compares with the tensor solver run in float64.

{(chr(10) * 2).join(tables)}

- command: `python bench/prox_speed_nm.py --threads {args.threads}`
- date: {now}
- torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, \
widest vectors: {vector_isa()}
- load average before / after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f}
"""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
