"""The general N:M prox kernel of an earlier commit against this tree's, side by side.

Builds proxsparse/runtime/kernels/prox_nm_cpu.cpp as it was at ``--base`` (from git) beside
the current one, then times both on the same inputs in one run, alternating them so that both
see the same machine load: SmolLM2's gate/up shape (1536x576), weights 0.02 * randn and
lam = unit / 0.02^(n-1) at the three units of bench/prox_speed_nm.py, and its "learned" input
(every group N-sparse, the rest at 2% of the scale; unit 0.3). It also checks that the
two agree: the largest per-group objective of the current kernel minus the base's, relative
(<= 0 up to rounding: never worse).

    python bench/prox_nm_ab.py --base 03df8a7 [--threads 1] [--out bench/results/prox_nm_ab.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prox_speed import best_time  # noqa: E402
from prox_speed_nm import UNITS, group_objective, vector_isa, weights  # noqa: E402

from proxsparse.runtime.kernels import _put_ninja_on_path  # noqa: E402
from proxsparse.runtime.kernels import prox_nm as current_kernel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "proxsparse/runtime/kernels/prox_nm_cpu.cpp"
SHAPE = (1536, 576)
PATTERNS = [(4, 8), (2, 8)]
REPS = 5


def base_kernel(commit: str, build_dir: Path):
    from torch.utils.cpp_extension import load

    text = subprocess.run(["git", "show", f"{commit}:{SOURCE}"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    source = build_dir / "prox_nm_base.cpp"
    source.write_text(text)
    _put_ninja_on_path()
    return load(name="proxsparse_prox_nm_base", sources=[str(source)],
                extra_cflags=["-O3", "-std=c++17", "-fopenmp", "-march=native",
                              "-fno-math-errno"],
                extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)


def alternate_times(base, current, w: torch.Tensor, lam: float, n: int,
                    m: int) -> tuple[float, float]:
    """Best times of both kernels, measured alternately so that both see the same load."""
    times: dict[str, list[float]] = {"base": [], "current": []}
    for _ in range(2):
        for name, kernel in (("base", base), ("current", current)):
            times[name].append(best_time(lambda k=kernel: k.prox(w, lam, n, m), REPS))
    return min(times["base"]), min(times["current"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="commit whose kernel is the baseline")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/prox_nm_ab.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        base = base_kernel(args.base, Path(tmp))
    current = current_kernel()
    rows = []
    for n, m in PATTERNS:
        for unit, learned in [(u, False) for u in UNITS] + [(0.3, True)]:
            w = weights(SHAPE, n, m, learned, seed=0)
            lam = unit / 0.02 ** (n - 1)
            t_base, t_cur = alternate_times(base, current, w, lam, n, m)
            base_obj = group_objective(base.prox(w, lam, n, m), w, lam, n, m)
            gap = group_objective(current.prox(w, lam, n, m), w, lam, n, m) - base_obj
            rel = (gap / base_obj).max().item()
            kind = f"{unit:g}, learned" if learned else f"{unit:g}"
            row = (f"| {n}:{m} | {kind} | {w.numel() / t_base / 1e6:.1f} | "
                   f"{w.numel() / t_cur / 1e6:.1f} | {t_base / t_cur:.2f}x | {rel:.1e} |")
            rows.append(row)
            print(row, flush=True)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y")
    text = f"""# General N:M prox kernel: {args.base} against this tree

`prox` of {SOURCE} built at `{args.base}` ("base") and in this tree ("current"), both with
-O3 -march=native, timed alternately on the same {SHAPE[0]}x{SHAPE[1]} weights (0.02 * randn,
lam = unit / 0.02^(n-1); "learned" as in bench/prox_speed_nm.py), best of {REPS} x 2; M w/s =
million weights per second. "gap" is the largest per-group objective of current minus base,
relative (<= 0 up to rounding: never worse).

| N:M | unit, input | base M w/s | current M w/s | speed-up | max rel gap |
|---|---|---|---|---|---|
{chr(10).join(rows)}

- command: `python bench/prox_nm_ab.py --base {args.base} --threads {args.threads}`
- date: {now}
- {args.threads} thread(s), torch {torch.__version__}, {os.cpu_count()} CPUs, widest vectors: \
{vector_isa()}
- load average before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f}
"""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
