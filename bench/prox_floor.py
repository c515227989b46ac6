"""Ceiling of the compiled 2:4 prox on this CPU: its square roots and divisions alone.

The compiled kernel (``proxsparse.prox._chunk24`` through torch.compile) performs 45 square roots
and 56 divisions or reciprocals per group of 4, counted in inductor's generated code
(``TORCH_LOGS=output_code``). This times a fused kernel that does only those, over the same
[4, 32768] position-first chunk, twice: as independent operations (the best case for the CPU's
pipelines) and as the dependent chains that Newton's method makes them (each step needs the
last). No exact prox built on the same algorithm can run faster than these rates.

    python bench/prox_floor.py [--threads 1]      # writes bench/results/prox_floor.md
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch

from proxsparse import prox

SQRTS, DIVISIONS = 45, 56


def independent(x: torch.Tensor) -> torch.Tensor:
    a, b, c, d = x.unbind(0)
    acc = torch.zeros_like(a)
    for i in range(SQRTS):
        acc = acc + (a * (0.5 + i) + (b, c, d)[i % 3]).sqrt()
    for i in range(DIVISIONS):
        acc = acc + (b, c)[i % 2] / (a * (1.5 + i) + d)
    return acc


def chained(x: torch.Tensor) -> torch.Tensor:
    a, b, c, d = x.unbind(0)
    acc, s, t = torch.zeros_like(a), a, a
    for i in range(SQRTS):
        s = (s * 0.5 + (b, c, d)[i % 3]).sqrt()
        acc = acc + s
    for i in range(DIVISIONS):
        t = (b, c)[i % 2] / (t + d)
        acc = acc + t
    return acc


def rate(fn, x: torch.Tensor, lam: torch.Tensor | None = None) -> float:
    """Million weights per second (4 per group), best of 7 rounds of 50 calls."""
    args = (x,) if lam is None else (x, lam)
    fn(*args)
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(50):
            fn(*args)
        best = min(best, (time.perf_counter() - start) / 50)
    return x.numel() / best / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/prox_floor.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.rand(4, prox._COMPILED_CHUNK, generator=torch.Generator().manual_seed(0)) + 0.5
    rows = [
        ("square roots and divisions only, independent",
         rate(torch.compile(independent, dynamic=True), x)),
        ("square roots and divisions only, in Newton-like chains",
         rate(torch.compile(chained, dynamic=True), x)),
        ("the whole 2:4 kernel (`_chunk24`, compiled)",
         rate(torch.compile(prox._chunk24, dynamic=True), x * 0.02, torch.tensor(15.0))),
    ]
    lines = ["# Compiled 2:4 prox: the ceiling set by its square roots and divisions", "",
             f"{SQRTS} square roots and {DIVISIONS} divisions per group of 4, over one "
             f"[4, {x.shape[1]}] chunk, {args.threads} thread(s). M w/s = million weights per "
             "second.", "", "| kernel | M w/s |", "|---|---:|"]
    lines += [f"| {name} | {value:.0f} |" for name, value in rows]
    lines += ["", f"- command: `python bench/prox_floor.py --threads {args.threads}`",
              f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
              f"- torch {torch.__version__}"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
