"""Decode speed of the activation-skipping MLP against the dense MLP, side by side in one run.

Model mode (a ReLU-style checkpoint, e.g. a ProSparse output): the decode inputs every gated MLP
sees while the model generates from a prompt are recorded; then, token after token, all MLPs run
in model order (as decoding reads them: each layer's weights come from memory, not from a cache
warmed by the same layer), dense and skipping, alternating in every round (median of rounds).
End to end: greedy decode tokens/s of the whole model, dense MLPs against skipping ones
(`--sparsify`: the other N:M layers packed too, for a 2:4 model), alternating; and whether both
produce the same tokens.

Synthetic mode (`--synthetic H,I,LAYERS`): random gated MLPs of that shape whose FATReLU
threshold is set so that the given share of the activations is zero.

    python bench/skip_mlp_speed.py OUT_DIR --threads 2 --out bench/results/skip_mlp_speed.md
    python bench/skip_mlp_speed.py --synthetic 576,1536,30 --sparsities 0.5,0.7,0.8,0.9
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

import proxsparse as ps
from proxsparse.gated_mlp import FATReLU, gated_mlps
from proxsparse.runtime.module import set_module
from proxsparse.runtime.skip_mlp import SkippingMLP
from proxsparse.runtime.speed import decode_time

PROMPT = "The history of the city begins"
HEADER = ("| model | gate zeros (decode) | gate/up/down rows | MLP dense tok/s | MLP skip tok/s "
          "| MLP speed-up | e2e dense tok/s | e2e skip tok/s | e2e speed-up | same tokens |\n"
          "|---|---:|---|---:|---:|---:|---:|---:|---:|---|\n")
SYNTHETIC_HEADER = ("| shape (H × I × layers) | zeros | MLP dense tok/s | MLP skip tok/s "
                    "| MLP speed-up |\n|---|---:|---:|---:|---:|\n")


def token_major(mlps: list[nn.Module], inputs: list[list[torch.Tensor]]) -> Callable[[], float]:
    """A timer of one decode pass: for each token, every MLP in order on its input."""
    def run() -> float:
        start = time.perf_counter()
        for step in range(len(inputs[0])):
            for module, tokens in zip(mlps, inputs, strict=True):
                module(tokens[step])
        return time.perf_counter() - start
    return run


def alternate(timers: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds of each timer, the timers alternating in every round (one warm-up)."""
    for timer in timers.values():
        timer()
    times = {form: [] for form in timers}
    for _ in range(repeats):
        for form, timer in timers.items():
            times[form].append(timer())
    return {form: statistics.median(t) for form, t in times.items()}


def model_mode(args) -> str:
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
    recorded = [inputs[name] for name in dense]

    def use(modules: dict) -> None:
        for name, module in modules.items():
            set_module(model, name, module)
        if args.sparsify:
            (ps.sparsify if modules is skipping else ps.densify)(model)

    def e2e(modules: dict) -> Callable[[], float]:
        def run() -> float:
            use(modules)
            return decode_time(model, prompt, args.new_tokens)
        return run

    outputs = {}
    for form, modules in (("dense", dense), ("skip", skipping)):
        use(modules)
        outputs[form] = model.generate(prompt, max_new_tokens=args.new_tokens,
                                       min_new_tokens=args.new_tokens, do_sample=False,
                                       pad_token_id=0)
    mlp = alternate({"dense": token_major(list(dense.values()), recorded),
                     "skip": token_major(list(skipping.values()), recorded)}, args.repeats)
    whole = alternate({"dense": e2e(dense), "skip": e2e(skipping)}, args.repeats)
    tokens = len(recorded[0])
    kept = statistics.mean(
        float((m.module.act_fn(m.module.gate_proj(torch.cat(inputs[m.name]))) != 0)
              .float().mean()) for m in mlps)
    same = torch.equal(outputs["dense"], outputs["skip"])
    layout = "/".join(next(iter(skipping.values())).layouts.get(side, "module")
                      for side in ("gate", "up", "down"))
    label = args.label or args.model
    if args.sparsify:
        label += " (other N:M layers packed)"
    return (f"| {label} | {1 - kept:.1%} | {layout} | {tokens / mlp['dense']:.1f} | "
            f"{tokens / mlp['skip']:.1f} | **{mlp['dense'] / mlp['skip']:.2f}x** | "
            f"{1 / whole['dense']:.1f} | {1 / whole['skip']:.1f} | "
            f"**{whole['dense'] / whole['skip']:.2f}x** | {'yes' if same else 'no'} |")


def synthetic_mode(args) -> list[str]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    hidden, intermediate, layers = (int(v) for v in args.synthetic.split(","))
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, hidden_act="relu")
    rows = []
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        torch.manual_seed(0)
        mlps, inputs = [], []
        for _ in range(layers):
            mlp = LlamaMLP(config).requires_grad_(False)
            tokens = torch.randn(args.new_tokens, 1, hidden)
            gate = mlp.gate_proj(tokens).flatten()
            mlp.act_fn = FATReLU(max(0.0, torch.quantile(gate[:2 ** 24], sparsity).item()))
            mlps.append(mlp)
            inputs.append(list(tokens))
        skipping = [SkippingMLP(m) for m in mlps]
        zeros = statistics.mean(float((m.act_fn(m.gate_proj(torch.cat(x))) == 0).float().mean())
                                for m, x in zip(mlps, inputs, strict=True))
        seconds = alternate({"dense": token_major(mlps, inputs),
                             "skip": token_major(skipping, inputs)}, args.repeats)
        tokens = args.new_tokens
        row = (f"| {hidden} × {intermediate} × {layers} | {zeros:.1%} | "
               f"{tokens / seconds['dense']:.1f} | {tokens / seconds['skip']:.1f} | "
               f"**{seconds['dense'] / seconds['skip']:.2f}x** |")
        print(row, flush=True)
        rows.append(row)
        del mlps, skipping
    return rows


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?")
    parser.add_argument("--synthetic", default=None, metavar="H,I,LAYERS")
    parser.add_argument("--sparsities", default="0.5,0.7,0.8,0.9")
    parser.add_argument("--sparsify", action="store_true",
                        help="end to end: pack the model's other N:M layers too")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--label", default=None)
    parser.add_argument("--out", type=Path, default=None, help="append rows to this markdown")
    args = parser.parse_args()
    if (args.model is None) == (args.synthetic is None):
        parser.error("give a model directory or --synthetic H,I,LAYERS")
    torch.set_num_threads(args.threads)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if args.synthetic:
        rows = synthetic_mode(args)
        header = SYNTHETIC_HEADER
        command = f"--synthetic {args.synthetic} --sparsities {args.sparsities}"
    else:
        rows = [model_mode(args)]
        print(rows[0])
        header = HEADER
        command = f"{args.model}{' --sparsify' if args.sparsify else ''}"
    if args.out:
        with args.out.open("a") as f:
            f.write(f"\n`python bench/skip_mlp_speed.py {command} --threads {args.threads} "
                    f"--repeats {args.repeats}` ({stamp}; {args.threads} threads, nothing else "
                    f"running; {args.new_tokens} decode tokens, median of {args.repeats} "
                    "alternating rounds)\n\n" + header + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
