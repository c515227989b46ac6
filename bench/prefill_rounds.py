"""Round-by-round prefill speed of a packed model against its dense-with-zeros form.

Prefill of a small model takes about a second here, and one round's ratio swings widely with
the machine's state; this prints the spread of many alternating rounds (each form warmed once
before its timed call), to read the median of ``proxsparse speed`` against.

    python bench/prefill_rounds.py runs/smollm2-sparsegpt [--threads 1] [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from proxsparse import data
from proxsparse.cli import _checkpoint_targets
from proxsparse.models import load_model
from proxsparse.runtime import sparsify
from proxsparse.runtime.speed import LayerSwap, prefill_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a pruned 2:4 checkpoint directory")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, progress=False)
    layers, nm = _checkpoint_targets(args.model, None)
    sparsify(model, nm, backend="cpu", layers=layers)
    swap = LayerSwap(model)
    ids = data.tokenize(tokenizer, data.builtin_text())[: args.tokens].view(1, -1)
    ratios = []
    for _ in range(args.rounds):
        seconds = {}
        for form in ("dense", "packed"):
            swap.use(form)
            prefill_time(model, ids)
            seconds[form] = prefill_time(model, ids)
        ratios.append(seconds["dense"] / seconds["packed"])
    ratios.sort()
    print(f"threads {args.threads}: packed/dense prefill speed per round over {args.rounds} "
          f"rounds: min {ratios[0]:.3f}, median {statistics.median(ratios):.3f}, "
          f"max {ratios[-1]:.3f}")


if __name__ == "__main__":
    main()
