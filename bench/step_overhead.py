"""Time split of one ProxSparse learning step on SmolLM2-135M (DESIGN.md §7 target:
prox + λ2 term ≤ 5% of forward+backward).

    python bench/step_overhead.py [--steps 3] [--seqlen 512] [--batch 1] [--compiled]

The λ2 term and the prox are timed through ``StepRegularisers``, the object the learning loop
uses, with the default input-scaled regulariser (column scales of RMS 1; the values do not
change the cost).

Writes bench/results/step_overhead.md.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import proxsparse as ps
from proxsparse.methods.proxsparse import ProxSparseConfig, StepRegularisers

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1, help="windows per step")
    parser.add_argument("--lambda1", type=float, default=0.25)
    parser.add_argument("--compiled", action="store_true",
                        help="torch.compile the prox and the λ2 term (in the warm-up step)")
    args = parser.parse_args()

    model, tokenizer = ps.load_model("smollm2-135m")
    targets, _ = ps.find_targets(model, ps.NM(2, 4))
    weights = [t.module.weight for t in targets]
    for p in model.parameters():
        p.requires_grad_(any(p is w for w in weights))
    pretrained = [w.detach().clone() for w in weights]
    scales = [torch.rand(w.shape[1]).add_(0.5) for w in weights]
    scales = [c / c.square().mean().sqrt() for c in scales]
    regularisers = StepRegularisers(ProxSparseConfig(), weights, pretrained,
                                    [args.lambda1] * len(weights), scales, args.compiled)
    optimizer = torch.optim.AdamW(weights, lr=1e-4, weight_decay=0.0)
    calib = ps.calibration_windows(tokenizer, "builtin", (args.steps + 1) * args.batch,
                                   args.seqlen)
    model.train()

    parts = {"forward+backward": [], "lambda2 term": [], "clip+AdamW": [], "prox": []}
    for step in range(args.steps + 1):  # step 0 warms up and is not counted
        batch = calib[step * args.batch : (step + 1) * args.batch]
        t0 = time.perf_counter()
        model(batch, labels=batch, use_cache=False).loss.backward()
        t1 = time.perf_counter()
        regularisers.add_lambda2_grad()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(weights, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        regularisers.prox_()
        t4 = time.perf_counter()
        if step:
            for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                parts[key].append(value)

    mean = {k: sum(v) / len(v) for k, v in parts.items()}
    fwd_bwd = mean["forward+backward"]
    overhead = mean["prox"] + mean["lambda2 term"]
    numel = sum(w.numel() for w in weights)
    lines = [
        "# ProxSparse step overhead: SmolLM2-135M, CPU",
        "",
        f"One learning step on {args.batch} x {args.seqlen} tokens, fp32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; {len(weights)} target "
        f"layers, {numel / 1e6:.1f} M target weights; mean of {args.steps} steps after one "
        f"warm-up step. Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}.",
        "",
        "| part | seconds | share of forward+backward |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {v:.3f} | {100 * v / fwd_bwd:.1f}% |" for k, v in mean.items()]
    lines += [
        "",
        f"**prox + λ2 term: {overhead:.3f} s = {100 * overhead / fwd_bwd:.1f}% of "
        "forward+backward** (target ≤ 5%).",
        "",
        f"Command: `python bench/step_overhead.py --steps {args.steps} --seqlen {args.seqlen} "
        f"--batch {args.batch} --lambda1 {args.lambda1}{' --compiled' if args.compiled else ''}`",
        "",
        f"Prox and λ2 term: {'torch.compile' if args.compiled else 'eager'}. Load average while "
        f"measured: {os.getloadavg()[1]:.2f} (2 cores; above 2 means other jobs shared them).",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "step_overhead" + ("_compiled" if args.compiled else "") \
        + (f"_batch{args.batch}" if args.batch != 1 else "") + ".md"
    (RESULTS / name).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
