"""Perplexity, prune time and peak memory per method in the DESIGN.md §6 setting.

    python bench/quality.py                              # dense, magnitude, wanda, sparsegpt
    python bench/quality.py --methods wanda --nm 4:8     # add or refresh rows
    python bench/quality.py --table-only                 # re-render the table and plot
    python bench/quality.py --reconstruct-from proxsparse-2of4   # a row's masks + OBS re-fit

Each row runs in its own process (so its peak memory is its own) and is stored as
``bench/results/quality/<label>.json``; the table ``bench/results/quality.md`` and the plot
``bench/results/quality.png`` are rendered from every stored row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ROWS = RESULTS / "quality"
MASKS = ROOT / "bench" / "work" / "masks"  # each row's masks (not committed), for re-use
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
# Measured by the project lead with llm-compressor 0.14 in this setting (DESIGN.md §6).
PEER = {"sparsegpt": (221.6, 451), "wanda": (260.1, 285)}
ORDER = ["dense", "magnitude", "wanda", "sparsegpt", "proxsparse", "maskpro"]


def run_row(args: argparse.Namespace, method: str) -> dict:
    import torch

    import proxsparse as ps
    from proxsparse.export import save_masks

    torch.manual_seed(0)
    model, tokenizer = ps.load_model(args.model)
    windows = ps.eval_windows(ps.tokenize(tokenizer, ps.load_text(str(args.eval_text))),
                              args.seqlen, args.eval_windows)
    seconds, settings = 0.0, {}
    if args.reconstruct_from:
        seconds, settings = reconstruct_row(args, model, tokenizer)
    elif method != "dense":
        defaults = ps.config_for(method, nm=args.nm, seed=args.seed)
        overrides = {}
        for key, value in (kv.split("=", 1) for kv in args.set):
            kind = type(getattr(defaults, key))
            overrides[key] = (value.lower() in ("1", "true", "yes") if kind is bool
                              else kind(value))
        # built with the overrides: checked, and defaults that follow a setting (MaskPro's
        # reward) follow it
        config = ps.config_for(method, nm=args.nm, seed=args.seed, **overrides)
        settings = config.settings()
        calib = ps.calibration_windows(tokenizer, args.calib, args.calib_windows, args.seqlen,
                                       args.seed)
        start = time.perf_counter()
        result = ps.prune(model, config, calib)
        seconds = time.perf_counter() - start
        MASKS.mkdir(parents=True, exist_ok=True)
        save_masks(MASKS / f"{label_of(method, args.nm, args.label_suffix)}.safetensors",
                   result.masks, config.nm)
    result = ps.perplexity(model, windows)
    return {
        "method": method, "nm": args.nm if method != "dense" else "-", "ppl": result.ppl,
        "tokens": result.tokens, "windows": result.windows, "prune_seconds": round(seconds, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "settings": settings, "calib": f"{args.calib} {args.calib_windows}x{args.seqlen}",
        "model": args.model, "torch_threads": torch.get_num_threads(),
        "load_average": round(os.getloadavg()[1], 1),  # other jobs on the cores skew timings
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python bench/quality.py " + " ".join(_user_args(method)),
    }


def reconstruct_row(args: argparse.Namespace, model, tokenizer) -> tuple[float, dict]:
    """Apply the masks a stored row learned, then re-fit the kept weights by SparseGPT's OBS
    update on the same calibration windows. Prune seconds = the row's + the re-fit's."""
    import proxsparse as ps
    from proxsparse.methods.sparsegpt import reconstruct

    source = json.loads((ROWS / f"{args.reconstruct_from}.json").read_text())
    masks, nm = ps.load_masks(MASKS / f"{args.reconstruct_from}.safetensors")
    targets, _ = ps.find_targets(model, nm)  # the re-fit needs the dense weights: no masking
    calib = ps.calibration_windows(tokenizer, args.calib, args.calib_windows, args.seqlen,
                                   args.seed)
    start = time.perf_counter()
    reconstruct(model, [t for t in targets if t.name in masks], calib, masks, nm)
    seconds = time.perf_counter() - start
    return source["prune_seconds"] + seconds, {**source["settings"], "reconstruct": True}


def _user_args(method: str) -> list[str]:
    """The command that reproduces one row: this run's arguments for that method alone."""
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg in ("--row", "--methods"):
            skip = not skip
            continue
        argv.append(arg)
    return ["--methods", method, *argv]


def label_of(method: str, nm: str, suffix: str) -> str:
    name = method if method == "dense" else f"{method}-{nm.replace(':', 'of')}"
    return name + (f"-{suffix}" if suffix else "")


def suffix_of(label: str, method: str, nm: str) -> str:
    """The inverse of ``label_of``: the suffix a row's label carries."""
    return label.removeprefix(label_of(method, nm, "")).lstrip("-")


def render() -> None:
    rows = [json.loads(p.read_text()) | {"label": p.stem} for p in sorted(ROWS.glob("*.json"))]
    rows.sort(key=lambda r: (r["nm"] != "-", r["nm"], ORDER.index(r["method"])
                             if r["method"] in ORDER else 99, r["label"]))
    lines = [
        "# Perplexity after N:M pruning: SmolLM2-135M-Instruct, CPU",
        "",
        "Setting (DESIGN.md §6): calibration on the built-in offline text (128 windows × 512 "
        "tokens, seed 0); evaluation on the first 128 windows × 512 tokens of the WikiText-2 "
        "test split (65,408 predicted tokens), fp32, 2 CPU threads. Every projection of the 30 "
        "decoder blocks is pruned; embeddings and lm_head stay dense. Peak memory is the peak "
        "RSS of the process that loaded, pruned and evaluated the model. Load avg is the machine's "
        "5-minute load average when the row finished (2 cores: above 2 means other jobs were "
        "competing and the prune time is pessimistic; rows before it was recorded show '-', and "
        "were all measured at a load of about 3-4).",
        "",
        "| label | method | N:M | PPL | prune s | peak RSS GiB | threads | load avg | "
        "settings (vs. today's defaults) | date |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in _non_default(r).items()) or "defaults"
        lines.append(f"| {r['label']} | {r['method']} | {r['nm']} | {r['ppl']:.2f} | "
                     f"{r['prune_seconds']:.0f} | {r['peak_rss_gib']:.2f} | "
                     f"{r.get('torch_threads', 2)} | {r.get('load_average', '-')} | {settings} | "
                     f"{r['date']} |")
    lines += ["", "Peer reference (llm-compressor 0.14, measured in the same setting, "
              "DESIGN.md §6): " + "; ".join(f"{m} PPL {p} in {s} s" for m, (p, s) in PEER.items()),
              "", "Commands that reproduce the rows (settings spelled out against today's "
              "defaults):", ""]
    lines += [f"    {reproduce(r)}" for r in rows]
    (RESULTS / "quality.md").write_text("\n".join(lines) + "\n")
    plot(rows)


BOOKKEEPING = {"run_dir", "resume", "log_every", "checkpoint_every"}


def _non_default(row: dict) -> dict:
    """The row's settings that differ from the method's current defaults."""
    if row["method"] == "dense":
        return {}
    import proxsparse as ps

    defaults = ps.config_for(row["method"]).settings()
    return {k: v for k, v in row["settings"].items()
            if k not in BOOKKEEPING and (k not in defaults or defaults[k] != v)}


def reproduce(row: dict) -> str:
    """The command that reproduces a row with today's code: every setting that differs from
    today's defaults is spelled out (a stored command line would silently change meaning when a
    default changes)."""
    method = row["method"]
    parts = ["python bench/quality.py", "--methods", method]
    if method != "dense" and row["nm"] != "2:4":
        parts += ["--nm", row["nm"]]
    suffix = suffix_of(row["label"], method, row["nm"])
    if row["settings"].get("reconstruct") and suffix.endswith("reconstructed"):
        source = row["label"].removesuffix("-reconstructed")
        return f"{' '.join(parts[:1])} --reconstruct-from {source}"
    if suffix:
        parts += ["--label-suffix", suffix]
    parts += [f"--set {k}={v}" for k, v in _non_default(row).items()]
    return " ".join(parts)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    labels = [r["label"] for r in rows]
    # a linear axis up to 2x SparseGPT's peer figure: the rows that matter differ by ~10%, and
    # a failed run (PPL 1e5 and more) would squeeze them on a log axis; its bar is cut, with
    # its value written beside it
    limit = 2 * PEER["sparsegpt"][0]
    ax.barh(labels, [min(r["ppl"], limit) for r in rows], color="#4c72b0")
    for (method, (ppl, _)), color in zip(PEER.items(), ("#dd8452", "#55a868"), strict=False):
        ax.axvline(ppl, linestyle="--", color=color, linewidth=1,
                   label=f"llm-compressor {method} ({ppl})")
    ax.set_xlim(0, limit * 1.5)
    ax.invert_yaxis()
    ax.set_xlabel("WikiText-2 perplexity (lower is better; bars cut at "
                  f"{limit:,.0f})")
    ax.set_title("SmolLM2-135M, 2:4 and N:M pruning")
    ax.legend(loc="lower right", fontsize=8)
    for y, r in enumerate(rows):
        cut = r["ppl"] > limit
        ax.text(min(r["ppl"], limit), y, f" {r['ppl']:,.1f}{' (cut)' if cut else ''}",
                va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "quality.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="dense,magnitude,wanda,sparsegpt")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nm", default="2:4")
    parser.add_argument("--calib", default="builtin")
    parser.add_argument("--calib-windows", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=128)
    parser.add_argument("--eval-text", type=Path, default=WIKITEXT)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a method setting, e.g. --set lambda1=0.5")
    parser.add_argument("--label-suffix", default="")
    parser.add_argument("--reconstruct-from", metavar="LABEL",
                        help="new row LABEL-reconstructed: that row's masks, kept weights re-fit")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in-process
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()

    if args.reconstruct_from:
        source = json.loads((ROWS / f"{args.reconstruct_from}.json").read_text())
        args.methods, args.nm = source["method"], source["nm"]
        source_suffix = suffix_of(args.reconstruct_from, source["method"], source["nm"])
        args.label_suffix = "-".join(filter(None, [source_suffix, "reconstructed"]))
    if args.row:
        row = run_row(args, args.row)
        ROWS.mkdir(parents=True, exist_ok=True)
        (ROWS / f"{label_of(args.row, args.nm, args.label_suffix)}.json").write_text(
            json.dumps(row, indent=2) + "\n")
        print(json.dumps(row))
        return
    if not args.table_only:
        for method in args.methods.split(","):
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--row", method], check=True)
    render()


if __name__ == "__main__":
    main()
