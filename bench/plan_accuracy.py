"""`proxsparse plan` against measured peaks: ProxSparse learning on random Llama configs.

    python bench/plan_accuracy.py      # every size below -> bench/results/plan_accuracy.md
    python bench/plan_accuracy.py --only llama-100m

Each size runs in its own process: it builds the model from its config (random weights, in
the row's dtype), learns ProxSparse for 2 steps on random tokens (1 window per step), and
reports the peak resident memory above what the process held before the model existed
(``ru_maxrss`` less the RSS just before), beside what ``plan`` predicts for the same options.
It also counts the bytes of the learning state itself (weights, W0, gradients, AdamW states)
per target parameter. The prox is not compiled here (``compile_prox=False``): compilation
costs host memory of its own that a GPU run does not have on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "plan_accuracy.md"
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
               tie_word_embeddings=True, max_position_embeddings=8192)
SIZES = {
    "smollm2-135m-fp32": (SMOLLM2, "float32", 512),
    "smollm2-135m-bf16": (SMOLLM2, "bfloat16", 512),
    "llama-100m": (dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                        num_attention_heads=12, num_key_value_heads=4, vocab_size=32000),
                   "bfloat16", 256),
    "llama-400m": (dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                        num_attention_heads=16, num_key_value_heads=8, vocab_size=32000),
                   "bfloat16", 256),
    "llama-1b": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
                 "bfloat16", 128),
}


def planned(name: str):
    """What ``plan`` predicts for a size (the same options as the measurement)."""
    import torch
    from transformers import LlamaConfig

    from proxsparse.learning.memory import plan_proxsparse

    fields, dtype_name, seqlen = SIZES[name]
    return plan_proxsparse(LlamaConfig(**fields), model_dtype=getattr(torch, dtype_name),
                           device="cpu", seqlen=seqlen)


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def measure(name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import proxsparse as ps
    from proxsparse.methods import proxsparse as method

    torch.manual_seed(0)
    fields, dtype_name, seqlen = SIZES[name]
    config = LlamaConfig(**fields)
    dtype = getattr(torch, dtype_name)
    calib = torch.randint(0, config.vocab_size, (2, seqlen))
    state: dict = {}
    step = method.ProxSparseLearning.step

    def counting_step(self, *args):  # count the learning state once it all exists
        metrics = step(self, *args)
        if not state:
            opt = [v for s in self.optimizer.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor) and v.dim()]
            model = self.placement.model
            state.update(
                weights=sum(p.numel() * p.element_size() for p in model.parameters()),
                w0=sum(t.numel() * t.element_size() for t in self.pretrained.values()),
                gradients=sum(p.numel() * p.element_size() for p in self.trainable),
                optimizer=sum(t.numel() * t.element_size() for t in opt),
                target_weights=sum(p.numel() * p.element_size() for p in self.params),
                targets=sum(p.numel() for p in self.params))
        return metrics

    method.ProxSparseLearning.step = counting_step
    before = rss()
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    ps.prune(model, ps.ProxSparseConfig(steps=2, batch_size=1, norm_windows=2,
                                        compile_prox=False), calib, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    plan = planned(name)
    static = sum(state[k] for k in ("target_weights", "w0", "gradients", "optimizer"))
    return {"name": name, "dtype": dtype_name, "seqlen": seqlen, "params": plan.total_params,
            "targets": state["targets"], "measured_gb": peak / 1e9, "planned_gb": plan.peak / 1e9,
            "error": plan.peak / peak - 1, "state_bytes_per_target": static / state["targets"],
            "planned_parts_gb": {k: v / 1e9 for k, v in plan.parts.items()},
            "measured_state_gb": {k: v / 1e9 for k, v in state.items() if k != "targets"}}


def replan(rows: list[dict]) -> None:
    """Each row's prediction from the plan as it is now (it needs no measurement)."""
    for row in rows:
        plan = planned(row["name"])
        row["planned_gb"] = plan.peak / 1e9
        row["planned_parts_gb"] = {k: v / 1e9 for k, v in plan.parts.items()}
        row["error"] = row["planned_gb"] / row["measured_live_gb"] - 1
        row["error_glibc"] = row["planned_gb"] / row["measured_glibc_gb"] - 1


def render(rows: list[dict], command: str, when: str) -> str:
    lines = [
        "# `proxsparse plan` against measured peaks (ProxSparse learning, CPU)", "",
        f"`{command}`, measured {when}. Peak = `ru_maxrss` of the process less its RSS before "
        "the model was built; 2 steps of 1 window; random weights; prox not compiled; "
        "1 torch thread.",
        "",
        "- *live*: with `MALLOC_MMAP_THRESHOLD_=65536`, so glibc returns every freed tensor to "
        "the system and the peak is that of the memory in use (what a device allocator's "
        "peak counts). The plan is validated against this column.",
        "- *glibc default*: glibc's adaptive threshold keeps freed mid-sized tensors in its heap, "
        "so the resident peak is higher; what a CPU user sees without the setting.", "",
        "| model | params | target params | dtype | seqlen | measured peak, live | planned "
        "| error | measured peak, glibc default | learning state of the targets, bytes per "
        "target param (W, W0, grad, AdamW) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.0f} M | {r['targets'] / 1e6:.0f} M "
                     f"| {r['dtype']} | {r['seqlen']} | {r['measured_live_gb']:.2f} GB "
                     f"| {r['planned_gb']:.2f} GB | {r['error']:+.1%} "
                     f"| {r['measured_glibc_gb']:.2f} GB ({r['error_glibc']:+.1%}) "
                     f"| {r['state_bytes_per_target']:.2f} |")
    lines += ["", "Planned parts (GB):", ""]
    for r in rows:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["planned_parts_gb"].items())
        lines.append(f"- {r['name']}: {parts}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated sizes (default: all)")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--table-only", action="store_true",
                        help="re-render from the stored measurements with the current plan")
    args = parser.parse_args()
    if args.table_only:
        path = OUT.with_suffix(".json")
        stored = json.loads(path.read_text())
        if isinstance(stored, list):  # as first written: the rows alone
            when = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
            stored = {"command": "python bench/plan_accuracy.py", "rows": stored,
                      "date": when.strftime("%Y-%m-%d %H:%M UTC")}
            path.write_text(json.dumps(stored, indent=2) + "\n")
        replan(stored["rows"])
        OUT.write_text(render(stored["rows"], stored["command"], stored["date"]))
        return
    if args.row:
        print(json.dumps(measure(args.row)))
        return
    rows = []
    for name in (args.only.split(",") if args.only else SIZES):
        row = None
        for allocator, env in (("live", {"MALLOC_MMAP_THRESHOLD_": "65536"}), ("glibc", {})):
            out = subprocess.run([sys.executable, __file__, "--row", name], check=True,
                                 capture_output=True, text=True,
                                 env={**os.environ, **env}).stdout
            measured = json.loads(out.strip().splitlines()[-1])
            row = row or measured
            row[f"measured_{allocator}_gb"] = measured["measured_gb"]
        row["error"] = row["planned_gb"] / row["measured_live_gb"] - 1
        row["error_glibc"] = row["planned_gb"] / row["measured_glibc_gb"] - 1
        rows.append(row)
        print(json.dumps(row), flush=True)
    command = "python bench/plan_accuracy.py" + (f" --only {args.only}" if args.only else "")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    replan(rows)
    if not args.only:
        OUT.write_text(render(rows, command, when))
        OUT.with_suffix(".json").write_text(json.dumps(
            {"command": command, "date": when, "rows": rows}, indent=2) + "\n")
    else:
        print(render(rows, command, when))


if __name__ == "__main__":
    main()
