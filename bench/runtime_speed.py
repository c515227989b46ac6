"""Packed 2:4 against dense, side by side in one process: layer products and a whole model.

Layers: random exact 2:4 weights of Llama-7B shapes (4096x4096, 11008x4096, 4096x11008), for
each thread count and batch size: torch's dense fp32 ``F.linear`` (and bf16, for reference),
the packed kernel with fp32 values and with bf16 values. The variants run in turn inside every
round (same machine state for all); the median of the rounds is reported, with the weight
bytes streamed per second and, beside it, this machine's plain streaming rate (a sum over a
256 MiB fp32 tensor at the same thread count).

Model: a pruned 2:4 checkpoint (``--model``, e.g. a SparseGPT export of SmolLM2-135M) through
``proxsparse.runtime.speed.compare``: greedy decode of ``--new-tokens`` tokens and a prefill of
512 tokens, dense-with-zeros and packed alternating, and whether the tokens are the same.

    python bench/runtime_speed.py --model runs/smollm2-sparsegpt [--threads 1,2]

Writes bench/results/runtime_speed.{md,json,png}.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from proxsparse.nm import NM, topn_mask
from proxsparse.runtime import PackedLinear

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
BATCHES = (1, 4, 16, 64, 128, 512)
COLD_BYTES = 96 * 2**20  # > the 32 MiB last-level cache of this machine


def sparse_weight(out: int, in_features: int) -> torch.Tensor:
    weight = torch.randn(out, in_features, generator=torch.Generator().manual_seed(0))
    return weight * topn_mask(weight.abs(), NM())


def call_time(fn, min_seconds: float = 0.05) -> float:
    """Mean seconds per call over at least ``min_seconds``."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def _rotating(fn, items: list):
    """A call of ``fn`` on the next of ``items`` each time."""
    state = {"next": 0}

    def call():
        item = items[state["next"] % len(items)]
        state["next"] += 1
        return fn(item)

    return call


def streaming_rate() -> float:
    data = torch.ones(64 * 2**20)
    data.sum()
    seconds = statistics.median(call_time(data.sum, 0.2) for _ in range(5))
    return data.numel() * 4 / seconds / 1e9


@torch.no_grad()
def layer_rows(threads: int, rounds: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    stream = streaming_rate()
    for out, in_features in SHAPES:
        weight = sparse_weight(out, in_features)
        linear = torch.nn.Linear(in_features, out, bias=False)
        linear.weight.data = weight
        dense = {"dense fp32": weight, "dense bf16": weight.bfloat16()}
        packed = {
            "packed fp32": PackedLinear.from_linear(linear, backend="cpu"),
            "packed bf16": PackedLinear.from_linear(linear, backend="cpu",
                                                    values_dtype=torch.bfloat16),
        }
        nbytes = {**{k: w.numel() * w.element_size() for k, w in dense.items()},
                  **{k: layer.weight_nbytes for k, layer in packed.items()}}
        # Copies enough to outgrow the last-level cache, used in turn: every call reads its
        # weight from memory, as a model's layers do (a lone 4096x4096 packed layer fits L3).
        copies = {k: [copy.deepcopy(v) for _ in range(-(-COLD_BYTES // nbytes[k]))]
                  for k, v in {**dense, **packed}.items()}
        for batch in BATCHES:
            x = torch.randn(batch, in_features)
            inputs = {torch.float32: x, torch.bfloat16: x.bfloat16()}
            variants = {name: _rotating(lambda w, xx=inputs[dense[name].dtype]: F.linear(xx, w),
                                        copies[name]) for name in dense}
            variants.update({name: _rotating(lambda layer, xx=x: layer(xx), copies[name])
                             for name in packed})
            times = {name: [] for name in variants}
            for _ in range(rounds):
                for name, fn in variants.items():
                    times[name].append(call_time(fn))
            base = statistics.median(times["dense fp32"])
            for name in variants:
                seconds = statistics.median(times[name])
                rows.append({
                    "threads": threads, "shape": f"{out}x{in_features}", "batch": batch,
                    "variant": name, "ms": seconds * 1e3,
                    "weight_GBps": nbytes[name] / seconds / 1e9,
                    "stream_GBps": stream, "speedup_vs_dense_fp32": base / seconds,
                })
            print(f"threads {threads} {out}x{in_features} batch {batch}: " + ", ".join(
                f"{r['variant']} {r['speedup_vs_dense_fp32']:.2f}x" for r in rows[-4:]),
                file=sys.stderr, flush=True)
    return rows


def model_rows(model_dir: str, threads: int, new_tokens: int, repeats: int) -> dict:
    from proxsparse import data
    from proxsparse.cli import _checkpoint_targets
    from proxsparse.models import load_model
    from proxsparse.runtime import sparsify
    from proxsparse.runtime.speed import compare

    torch.set_num_threads(threads)
    model, tokenizer = load_model(model_dir)
    layers, nm = _checkpoint_targets(model_dir, None)
    sparsify(model, nm, backend="cpu", layers=layers)
    prompt = tokenizer("The history of the city begins", return_tensors="pt").input_ids
    prefill = data.tokenize(tokenizer, data.builtin_text())[:512].view(1, -1)
    result = compare(model, prompt, prefill, new_tokens, repeats)
    print(f"threads {threads} model: decode {result['decode_speedup']:.2f}x, prefill "
          f"{result['prefill_speedup']:.2f}x, same tokens {result['same_tokens']}",
          file=sys.stderr, flush=True)
    return result


def write_markdown(path: Path, layers: list[dict], models: list[dict], command: str,
                   load: str) -> None:
    lines = [
        "# Packed 2:4 runtime against dense (CPU)", "",
        f"`{command}` — {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{load}.", "",
        "Speed-up = dense fp32 time / variant time, measured in the same rounds (median). "
        "GB/s = weight bytes read per second (dense fp32: 4 B/weight; packed fp32 2.125; "
        "packed bf16 1.125; dense bf16 2); 'stream' is a plain fp32 sum at the same thread "
        "count, this machine's practical read rate. Each variant cycles through copies of its "
        "weight totalling ≥ 96 MiB, so every call reads its weight from memory, not from the "
        "32 MiB L3.", "",
    ]
    if layers:
        lines += ["## Layers", "",
                  "| threads | shape | batch | variant | ms | GB/s | stream GB/s | speed-up |",
                  "|---:|---|---:|---|---:|---:|---:|---:|"]
        for r in layers:
            lines.append(f"| {r['threads']} | {r['shape']} | {r['batch']} | {r['variant']} | "
                         f"{r['ms']:.3f} | {r['weight_GBps']:.1f} | {r['stream_GBps']:.1f} | "
                         f"{r['speedup_vs_dense_fp32']:.2f}x |")
        lines.append("")
    if models:
        lines += ["## Model", "",
                  "| threads | form | decode tok/s | prefill tok/s | target MiB | model MiB |",
                  "|---:|---|---:|---:|---:|---:|"]
        for m in models:
            for form in ("dense", "packed"):
                row = m[form]
                lines.append(f"| {m['threads']} | {form} | {row['decode_tokens_per_s']:.1f} | "
                             f"{row['prefill_tokens_per_s']:.1f} | "
                             f"{row['target_weight_bytes'] / 2**20:.1f} | "
                             f"{row['model_bytes'] / 2**20:.1f} |")
            lines.append(f"| {m['threads']} | **packed / dense** | "
                         f"**{m['decode_speedup']:.2f}x** | **{m['prefill_speedup']:.2f}x** | "
                         f"**{m['target_bytes_ratio']:.3f}x** | |")
        lines += ["", "Greedy decode of {} new tokens; same tokens as dense-with-zeros: {}; "
                  "largest relative logit difference {}.".format(
                      models[0]["new_tokens"],
                      ", ".join(str(m["same_tokens"]) for m in models),
                      ", ".join(f"{m['max_relative_logit_difference']:.1e}" for m in models)), ""]
    path.write_text("\n".join(lines))


def plot(path: Path, layers: list[dict], models: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode = [r for r in layers if r["batch"] == 1 and r["variant"] != "dense fp32"]
    labels = sorted({(r["threads"], r["shape"]) for r in decode})
    variants = ["dense bf16", "packed fp32", "packed bf16"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(variants)
    for k, variant in enumerate(variants):
        values = [next(r["speedup_vs_dense_fp32"] for r in decode
                       if (r["threads"], r["shape"]) == label and r["variant"] == variant)
                  for label in labels]
        axes[0].bar([i + k * width for i in range(len(labels))], values, width, label=variant)
    axes[0].axhline(1, color="k", linewidth=0.8)
    axes[0].axhline(1.6, color="r", linewidth=0.8, linestyle="--", label="target 1.6x")
    axes[0].set_xticks([i + width for i in range(len(labels))],
                       [f"{s}\n{t} thr" for t, s in labels], fontsize=8)
    axes[0].set_ylabel("speed-up over dense fp32")
    axes[0].set_title("matrix x vector (batch 1)")
    axes[0].legend(fontsize=8)
    if models:
        names = [f"{m['threads']} thr" for m in models]
        axes[1].bar([i - 0.2 for i in range(len(models))], [m["decode_speedup"] for m in models],
                    0.4, label="decode")
        axes[1].bar([i + 0.2 for i in range(len(models))], [m["prefill_speedup"] for m in models],
                    0.4, label="prefill 512")
        axes[1].axhline(1, color="k", linewidth=0.8)
        axes[1].set_xticks(range(len(models)), names)
        axes[1].set_title("SmolLM2-135M 2:4, end to end")
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--model", default=None, help="a pruned 2:4 checkpoint directory")
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/runtime_speed")
    parser.add_argument("--load", default="nothing else running",
                        help="what else ran on the machine, for the record")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    layers = [] if args.skip_layers else [r for t in threads for r in layer_rows(t, args.rounds)]
    models = []
    if args.model:
        for t in threads:
            models.append({"threads": t, **model_rows(args.model, t, args.new_tokens,
                                                        args.repeats)})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/runtime_speed.py " + " ".join(sys.argv[1:])
    out.with_suffix(".json").write_text(json.dumps({"command": command, "layers": layers,
                                                    "models": models}, indent=1))
    write_markdown(out.with_suffix(".md"), layers, models, command, args.load)
    if layers:
        plot(out.with_suffix(".png"), layers, models)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
