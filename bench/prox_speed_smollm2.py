"""The general N:M prox on SmolLM2-135M's own weights, as a ProxSparse run sees them.

bench/prox_speed_nm.py times the kernel on synthetic weights; this times one whole proximal
step of a ProxSparse learning run at N:M (default 4:8): every target layer's pretrained
weights seen through their input scales (the default ``input_scaled``: Wanda's score), with
each layer's λ1 from ``layer_lambdas``, at three points of the λ1 ramp (the first step's
1/64 of λ1, half, all of it). These are the weights of the first step: later steps see weights
the loss gradient and earlier proxes have moved. The fourth row stands in for those from the
regulariser's side only: its input is the output of --repeat (16) proxes at full λ1, no loss
gradient between them. One thread unless --threads.

    python bench/prox_speed_smollm2.py [--nm 4:8] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prox_speed import best_time  # noqa: E402
from prox_speed_nm import vector_isa  # noqa: E402

import proxsparse as ps  # noqa: E402
from proxsparse.activations import input_feature_norms  # noqa: E402
from proxsparse.methods.proxsparse import (  # noqa: E402
    ProxSparseConfig,
    column_scale,
    layer_lambdas,
    ramp,
)
from proxsparse.prox import prox_nm  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def whole_prox(inputs: list[torch.Tensor], lambdas: list[float], factor: float,
               n: int, m: int) -> list[torch.Tensor]:
    return [prox_nm(x, lam * factor, n, m, compiled=True)
            for x, lam in zip(inputs, lambdas, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nm", default="4:8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=16,
                        help="proxes at full λ1 before the last row's input")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    cfg = ProxSparseConfig(nm=args.nm)
    n, m = cfg.nm.n, cfg.nm.m
    steps = 128  # the §6 setting: one pass over 128 windows

    model, tokenizer = ps.load_model("smollm2-135m")
    targets, _ = ps.find_targets(model, cfg.nm)
    calib = ps.calibration_windows(tokenizer, "builtin", cfg.norm_windows, 512)
    norms = input_feature_norms(model.eval(), targets, calib)
    weights = [t.module.weight.detach().float() for t in targets]
    scales = [column_scale(norms[t.name]) for t in targets]
    lambdas = layer_lambdas(weights, cfg, scales)
    seen = [w * s for w, s in zip(weights, scales, strict=True)]
    numel = sum(x.numel() for x in seen)
    whole_prox([x[:1] for x in seen], lambdas, 1.0, n, m)  # builds or loads the kernel

    settled = seen
    for _ in range(args.repeat):
        settled = whole_prox(settled, lambdas, 1.0, n, m)
    first = ramp(0, steps, cfg.lambda1_ramp)
    cases = [(f"step 1 (λ1 × {first:.4f})", seen, first),
             ("half-way up the ramp (λ1 × 0.5)", seen, 0.5),
             ("full λ1", seen, 1.0),
             (f"after {args.repeat} proxes at full λ1, full λ1", settled, 1.0)]
    rows = []
    for name, inputs, factor in cases:
        outputs: list[torch.Tensor] = []  # the last timed call's, for the counts below

        def step(inputs=inputs, factor=factor, outputs=outputs) -> None:
            outputs[:] = whole_prox(inputs, lambdas, factor, n, m)

        seconds = best_time(step, args.reps)
        out = torch.cat([u.reshape(-1, m) for u in outputs])
        nnz = (out != 0).sum(1)
        shares = " / ".join(f"{100 * (nnz == k).double().mean().item():.0f}%"
                            for k in range(n, m + 1))
        rows.append(f"| {name} | {seconds:.2f} | {numel / seconds / 1e6:.1f} | {shares} |")
        print(rows[-1], flush=True)

    now = datetime.datetime.now(datetime.timezone.utc)
    text = "\n".join([
        f"# The {n}:{m} prox on SmolLM2-135M's weights, as a ProxSparse run sees them",
        "",
        f"One proximal step over all {len(seen)} target layers ({numel / 1e6:.1f} M weights), "
        "pretrained weights times their input scales, each layer's λ1 from the defaults "
        f"(λ1 {cfg.lambda1}, scaled per layer); best of {args.reps}. The last row's input is "
        f"the output of {args.repeat} proxes at full λ1 (the regulariser alone).",
        "",
        "| input | seconds | M weights/s | groups by nnz (N..M) |",
        "|---|---:|---:|---|",
        *rows,
        "",
        f"- command: `python bench/prox_speed_smollm2.py --nm {n}:{m} --threads {args.threads} "
        f"--repeat {args.repeat}`",
        f"- date: {now:%a %b %d %H:%M:%S UTC %Y}",
        f"- {args.threads} thread(s), torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"widest vectors: {vector_isa()}",
        f"- load average before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f}",
        "",
    ])
    out_path = RESULTS / f"prox_speed_smollm2_{n}of{m}.md"
    out_path.write_text(text)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
