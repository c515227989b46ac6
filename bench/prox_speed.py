"""Speed of ``proxsparse.prox.prox_nm`` (2:4) against the paper's solver and one elementwise pass.

For a 4096x4096 matrix and SmolLM2-135M's layer shapes, with weights = scale * randn at scale 0.02
and 1.0 and lam = 0.3 / scale (a regime where groups end with 2, 3 and 4 non-zeros), it reports
the throughput of prox_nm, of the paper's solver (bench/paper_prox.py) and of ``torch.abs(w)``
into a new tensor, the speed ratios, the share of groups by number of non-zeros, and the largest
per-group objective gap ours - paper (<= 0 up to rounding means never worse). Times are the best
of several repetitions (the paper's solver is slow: fewer, and on 4096x4096 it runs on the first
1024 rows only, which gives its per-weight rate: it does its 100 sweeps on any large layer).
Writes bench/results/prox_speed.md with one table per thread setting.

    python bench/prox_speed.py [--threads 2,1] [--out bench/results/prox_speed.md]
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

from proxsparse.prox import nm_penalty_groups, prox_nm  # noqa: E402

SHAPES = [("4096x4096", (4096, 4096)), ("q/o 576x576", (576, 576)), ("k/v 192x576", (192, 576)),
          ("gate/up 1536x576", (1536, 576)), ("down 576x1536", (576, 1536))]
SCALES = (0.02, 1.0)
LAM_TIMES_SCALE = 0.3


def best_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def group_objective(u: torch.Tensor, w: torch.Tensor, lam: float) -> torch.Tensor:
    """1/2 ||u - w||^2 + lam R(u) per group, in float64."""
    u, w = u.double(), w.double()
    return 0.5 * ((u - w) ** 2).reshape(-1, 4).sum(1) + lam * nm_penalty_groups(u).reshape(-1)


PAPER_ROWS_BIG = 1024


def measure(shape: tuple[int, int], scale: float, seed: int, compiled: bool = False) -> dict:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    lam = LAM_TIMES_SCALE / scale
    big = w.numel() > 4_000_000
    prox_nm(w[:64], lam, compiled=compiled)  # warm-up (and compilation)
    t_abs = best_time(lambda: torch.abs(w), 20)
    buf = torch.empty_like(w)
    t_abs_out = best_time(lambda: torch.abs(w, out=buf), 20)
    t_ours = best_time(lambda: prox_nm(w, lam, compiled=compiled), 3 if big else 10)
    wp = w[:PAPER_ROWS_BIG] if big else w  # the paper's solver: same rate, fewer rows
    start = time.perf_counter()
    paper = paper_prox(wp, lam)
    t_paper = (time.perf_counter() - start) * w.numel() / wp.numel()
    if not big:
        t_paper = min(t_paper, best_time(lambda: paper_prox(w, lam), 1))
    ours = prox_nm(w, lam, compiled=compiled)
    o_ours, o_paper = group_objective(ours[:len(wp)], wp, lam), group_objective(paper, wp, lam)
    gap = o_ours - o_paper
    nnz = (ours.reshape(-1, 4) != 0).sum(1)
    return dict(n=w.numel(), t_abs=t_abs, t_abs_out=t_abs_out, t_ours=t_ours, t_paper=t_paper,
                gap_abs=gap.max().item(), gap_rel=(gap / o_paper.clamp_min(1e-300)).max().item(),
                total_rel=(o_ours.sum() / o_paper.sum() - 1).item(),
                share=[(nnz == k).double().mean().item() for k in (2, 3, 4)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="2,1", help="comma-separated thread counts")
    parser.add_argument("--out", default="")
    parser.add_argument("--compiled", action="store_true", help="time prox_nm(compiled=True)")
    args = parser.parse_args()
    name = "prox_speed_compiled.md" if args.compiled else "prox_speed.md"
    args.out = args.out or str(Path(__file__).parent / "results" / name)
    load_before = os.getloadavg()

    header = ("| layer | scale | ours M w/s | paper M w/s | abs M w/s (out=) | ours vs paper | "
              "ours time / abs time | max gap ours-paper: abs / rel | total obj ours/paper-1 | "
              "groups with 2 / 3 / 4 nnz |\n|" + "---|" * 10)
    tables = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        rows = [f"### {threads} thread{'s' if threads > 1 else ''}\n", header]
        print(f"{threads} threads", flush=True)
        for i, (name, shape) in enumerate(SHAPES):
            for scale in SCALES:
                r = measure(shape, scale, seed=i, compiled=args.compiled)
                mw = {k: r["n"] / r[k] / 1e6 for k in ("t_ours", "t_paper", "t_abs", "t_abs_out")}
                row = (f"| {name} | {scale:g} | {mw['t_ours']:.1f} | {mw['t_paper']:.2f} | "
                       f"{mw['t_abs']:.0f} ({mw['t_abs_out']:.0f}) | "
                       f"{r['t_paper'] / r['t_ours']:.0f}x | {r['t_ours'] / r['t_abs']:.0f}x | "
                       f"{r['gap_abs']:.2e} / {r['gap_rel']:.1e} | {r['total_rel']:.1e} | "
                       + " / ".join(f"{100 * s:.0f}%" for s in r["share"]) + " |")
                rows.append(row)
                print(row, flush=True)
        tables.append("\n".join(rows))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y")
    flag = " --compiled" if args.compiled else ""
    variant = "torch.compile'd (`compiled=True`)" if args.compiled else "eager"
    text = f"""# prox_nm speed (2:4, {variant})

`prox_nm` (proxsparse/prox.py) against the paper's alternating solver (bench/paper_prox.py:
exact coordinate descent per candidate support from u = 0, up to 100 sweeps, host-side stop
test) and one elementwise pass (`torch.abs(w)` into a new tensor). Weights = scale * randn,
lam = {LAM_TIMES_SCALE} / scale. "M w/s" = million weights per second (best of several runs; the
paper's solver: best of 2, and on 4096x4096 one run on the first {PAPER_ROWS_BIG} rows, where the
gap is measured too). "max gap" is the largest per-group objective difference
(1/2 ||u - w||^2 + lam R(u), float64), ours minus paper: <= 0 up to rounding means ours is never
worse; "rel" divides by the paper's objective of that group; "total" compares the summed
objectives. The last column is the share of groups by number of non-zeros in our result.
"abs" writes into a new tensor (as specified); on 4096x4096 that 64 MiB allocation is often
fresh memory whose page faults dominate (~30 ms instead of ~5 ms), depending on the allocator's
state, so the "(out=)" rate into a preallocated tensor is shown beside it.

{(chr(10) * 2).join(tables)}

- command: `python bench/prox_speed.py --threads {args.threads}{flag}`
- date: {now}
- torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs
- load average before / after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} (other jobs
  share this machine; timings vary with their load)
"""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
