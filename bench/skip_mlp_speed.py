"""Decode speed of the activation-skipping MLP against the dense MLP, side by side in one run.

MLP level: the decode inputs every gated MLP sees while the model generates from a prompt are
recorded, then each MLP runs them one token at a time, dense and skipping, alternating in every
round (median of rounds). End to end: greedy decode tokens/s of the whole model, dense MLPs
against skipping ones, alternating. Also checks that both produce the same tokens.

    python bench/skip_mlp_speed.py OUT_DIR --threads 2 --out bench/results/skip_mlp_speed.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import proxsparse as ps
from proxsparse.gated_mlp import gated_mlps
from proxsparse.runtime.module import set_module
from proxsparse.runtime.skip_mlp import SkippingMLP
from proxsparse.runtime.speed import decode_time

PROMPT = "The history of the city begins"


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--label", default=None)
    parser.add_argument("--out", type=Path, default=None, help="append a row to this markdown")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = ps.load_model(args.model, progress=False)
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    mlps = gated_mlps(model)

    inputs = {m.name: [] for m in mlps}  # decode tokens only (one per call)
    hooks = [m.module.register_forward_pre_hook(
        lambda _m, a, name=m.name: inputs[name].append(a[0].reshape(-1, a[0].shape[-1]).clone())
        if a[0].shape[-2] == 1 else None) for m in mlps]
    model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                   do_sample=False, pad_token_id=0)
    for hook in hooks:
        hook.remove()
    dense = {m.name: m.module for m in mlps}
    skipping = {m.name: SkippingMLP(m.module) for m in mlps}

    def run_mlps(modules: dict) -> float:
        start = time.perf_counter()
        for name, module in modules.items():
            for token in inputs[name]:
                module(token)
        return time.perf_counter() - start

    def use(modules: dict) -> None:
        for name, module in modules.items():
            set_module(model, name, module)

    def greedy(modules: dict) -> torch.Tensor:
        use(modules)
        return model.generate(prompt, max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    outputs = {}
    for form, modules in (("dense", dense), ("skip", skipping)):  # warm-up, and the tokens
        run_mlps(modules)
        outputs[form] = greedy(modules)
    mlp_times = {"dense": [], "skip": []}
    e2e_times = {"dense": [], "skip": []}
    for _ in range(args.repeats):
        for form, modules in (("dense", dense), ("skip", skipping)):
            mlp_times[form].append(run_mlps(modules))
            use(modules)
            e2e_times[form].append(decode_time(model, prompt, args.new_tokens))
    tokens = sum(len(v) for v in inputs.values()) / len(mlps)
    mlp = {f: tokens / statistics.median(t) for f, t in mlp_times.items()}
    e2e = {f: 1 / statistics.median(t) for f, t in e2e_times.items()}
    kept = statistics.mean(
        float((m.module.act_fn(m.module.gate_proj(torch.cat(inputs[m.name]))) != 0)
              .float().mean()) for m in mlps)
    same = torch.equal(outputs["dense"], outputs["skip"])
    layout = next(iter(skipping.values())).layouts
    row = (f"| {args.label or args.model} | {1 - kept:.1%} | {layout['up']}/{layout['down']} | "
           f"{mlp['dense']:.1f} | {mlp['skip']:.1f} | **{mlp['skip'] / mlp['dense']:.2f}x** | "
           f"{e2e['dense']:.1f} | {e2e['skip']:.1f} | **{e2e['skip'] / e2e['dense']:.2f}x** | "
           f"{'yes' if same else 'no'} |")
    print(row)
    if args.out:
        if not args.out.exists():
            stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            args.out.write_text(
                "# Activation-skipping MLP decode against the dense MLP\n\n"
                f"`python bench/skip_mlp_speed.py MODEL --threads {args.threads}` ({stamp}; "
                f"{args.threads} threads, nothing else running; {args.new_tokens} greedy tokens "
                f"from \"{PROMPT}\", median of {args.repeats} alternating rounds). MLP tok/s: "
                "all 30 MLPs on the recorded decode inputs, one token per call; end to end: "
                "model.generate with the KV cache. Gate zeros: share of zero activated-gate "
                "entries over those decode tokens.\n\n"
                "| model | gate zeros (decode) | up/down rows | MLP dense tok/s | MLP skip tok/s "
                "| MLP speed-up | e2e dense tok/s | e2e skip tok/s | e2e speed-up | same tokens |\n"
                "|---|---:|---|---:|---:|---:|---:|---:|---:|---|\n")
        with args.out.open("a") as f:
            f.write(row + "\n")


if __name__ == "__main__":
    main()
