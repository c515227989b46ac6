"""FATReLU threshold sweep of an activation-sparse model: perplexity and zeros per threshold.

ProSparse's last step replaces ReLU by FATReLU (DESIGN.md §9): activations below the threshold
become zero. The L1 stage shrinks the activations, so a threshold removes more of them at less
cost than on a model trained without it. This script measures, per threshold, the share of
zeros entering every down_proj and the perplexity on the same windows, so a threshold can be
chosen on one text (e.g. held-out built-in text) and reported on another.

    python bench/prosparse_threshold.py runs/ps --thresholds 0,0.01,0.05,0.1 \\
        --text builtin --windows 32 --out bench/results/prosparse_threshold.md
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

import torch

import proxsparse as ps
from proxsparse.gated_mlp import ActivationSparsity, FATReLU, gated_mlps


def sweep(model, windows: torch.Tensor,
          thresholds: list[float]) -> list[tuple[float, float, float]]:
    """(threshold, perplexity, share of zeros) per threshold, on the same windows."""
    rows = []
    for threshold in thresholds:
        for mlp in gated_mlps(model):
            mlp.module.act_fn = FATReLU(threshold)
        with ActivationSparsity(model) as meter:
            ppl = ps.perplexity(model, windows, progress=False).ppl
        rows.append((threshold, ppl, meter.shares()["overall"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+", help="output directories of ReLU-style models")
    parser.add_argument("--thresholds", default="0,0.01,0.05,0.1,0.2")
    parser.add_argument("--text", default="builtin", help="builtin, a local file, ...")
    parser.add_argument("--tail", type=int, default=0,
                        help="use only the last N characters of the text (held-out built-in "
                             "text: the calibration draws from all of it)")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="append a table to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    lines = []
    for path in args.models:
        model, tokenizer = ps.load_model(path, progress=False)
        text = ps.load_text(args.text)
        text = text[-args.tail:] if args.tail else text
        windows = ps.eval_windows(ps.tokenize(tokenizer, text), args.seqlen, args.windows)
        for threshold, ppl, zeros in sweep(model, windows, thresholds):
            line = f"| {path} | {threshold:g} | {ppl:.2f} | {zeros:.1%} |"
            print(line, flush=True)
            lines.append(line)
    if args.out:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with args.out.open("a") as f:
            f.write(f"\n`python bench/prosparse_threshold.py {' '.join(args.models)} "
                    f"--thresholds {args.thresholds} --text {args.text} --tail {args.tail} "
                    f"--windows {args.windows} --seqlen {args.seqlen}` ({stamp}, "
                    f"{args.threads} threads)\n\n"
                    "| model | threshold | PPL | zeros entering down_proj |\n|---|---:|---:|---:|\n"
                    + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
