"""How much of the N:M score channel permutation keeps on SmolLM2-135M, where it is free (the
inputs of down_proj and o_proj, one order per layer) against one order of the whole residual
stream (every reader of the stream shares it: q/k/v and gate/up of all blocks, which would
also need the embeddings, every norm and every writer permuted).

Score: |W| (magnitude). Reports the kept score's relative gain per site kind and for the
residual stream, and the search time.

    python bench/permute_gain.py [--nm 2:4] [--rounds 25] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch

import proxsparse as ps
from proxsparse.models import decoder_blocks, find_targets
from proxsparse.nm import NM
from proxsparse.permute import find_sites, kept_score, reorder, search_orders

READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def gain(score: torch.Tensor, nm: NM, rounds: int) -> tuple[float, float]:
    start = time.perf_counter()
    orders = search_orders(score, nm, rounds, seed=0)
    seconds = time.perf_counter() - start
    after = kept_score(reorder(score, orders), nm).sum()
    return float(after / kept_score(score, nm).sum() - 1), seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nm", default="2:4")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    nm = NM.parse(args.nm)
    model, _ = ps.load_model("smollm2-135m")
    targets, _ = find_targets(model, nm)
    lines = [f"`python bench/permute_gain.py --nm {nm} --rounds {args.rounds}` "
             f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
             f"{torch.get_num_threads()} threads); score |W|; kept score = sum of the "
             f"{nm.n} largest |W| of every group", "",
             "| where | orders | kept-score gain | search s |", "|---|---:|---:|---:|"]
    for kind in ("down_proj", "o_proj"):
        gains, seconds = [], 0.0
        for site in find_sites(model, targets):
            if site.name.endswith(kind):
                g, s = gain(site.scores(site.reader.weight.detach().abs()), nm, args.rounds)
                gains.append(g)
                seconds += s
        mean = sum(gains) / len(gains)
        lines.append(f"| {kind} inputs (free) | one per layer ({len(gains)}) | "
                     f"{mean:+.3%} (mean) | {seconds:.0f} |")
        print(lines[-1], flush=True)
    stream = torch.cat([getattr(module, name).weight.detach().abs()
                        for block in decoder_blocks(model) for module in block.modules()
                        for name in READERS if isinstance(getattr(module, name, None),
                                                          torch.nn.Linear)])
    g, s = gain(stream[None], nm, args.rounds)
    lines.append(f"| residual stream (q/k/v/gate/up of every block) | one for the model | "
                 f"{g:+.3%} | {s:.0f} |")
    print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write("\n".join(lines) + "\n\n")
    else:
        sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
