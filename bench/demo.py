"""`make demo`: prune SmolLM2-135M to 2:4 with the one-shot baselines and with ProxSparse (a
demo-sized learning run), print each one's WikiText-2 perplexity and wall time, then run the
ProxSparse model packed and print its decode speed against the same model dense.

Calibration: windows of the built-in offline text. Evaluation: the first windows of WikiText-2
test (the shared copy beside the project when present, otherwise the hub: the data extra).
Every size (and the model and text) is a flag, or a DEMO_* environment variable for `make demo`,
e.g. a smoke test:

    DEMO_CALIB_WINDOWS=2 DEMO_EVAL_WINDOWS=2 DEMO_SEQLEN=64 DEMO_PROXSPARSE_STEPS=2 \\
        DEMO_NEW_TOKENS=8 DEMO_REPEATS=1 make demo
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import proxsparse as ps
from proxsparse.runtime.speed import compare

WIKITEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"
METHODS = ("magnitude", "wanda", "sparsegpt", "proxsparse")
PROMPT = "The history of the city begins"
PREFILL_TOKENS = 128  # the speed comparison times a prefill too; the demo shows the decode


@dataclass
class Row:
    name: str
    ppl: float
    prune_s: float
    row_s: float  # prune + evaluation (+ restoring the dense weights)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def env(name: str, default: int | str) -> int | str:
        value = os.environ.get(f"DEMO_{name}", default)
        if isinstance(default, int):
            try:
                return int(value)
            except ValueError:
                sys.exit(f"error: DEMO_{name} must be an integer, got {value!r}")
        return value

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=env("MODEL", "smollm2-135m"))
    p.add_argument("--text", default=env("TEXT", str(WIKITEXT) if WIKITEXT.exists()
                                          else "wikitext2"),
                   help="evaluation text (default: WikiText-2 test, the shared copy or the hub)")
    p.add_argument("--methods", default=env("METHODS", ",".join(METHODS)),
                   help="comma-separated, in order (default: %(default)s)")
    p.add_argument("--calib-windows", type=int, default=env("CALIB_WINDOWS", 32))
    p.add_argument("--eval-windows", type=int, default=env("EVAL_WINDOWS", 32))
    p.add_argument("--seqlen", type=int, default=env("SEQLEN", 512))
    p.add_argument("--proxsparse-steps", type=int, default=env("PROXSPARSE_STEPS", 0),
                   help="0: one pass over the calibration windows (default)")
    p.add_argument("--new-tokens", type=int, default=env("NEW_TOKENS", 64),
                   help="greedy tokens per decode run (default %(default)s)")
    p.add_argument("--repeats", type=int, default=env("REPEATS", 3),
                   help="decode rounds, dense and packed alternating; median (default "
                        "%(default)s)")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    if min(args.calib_windows, args.eval_windows, args.repeats) < 1 or args.seqlen < 2 \
            or args.new_tokens < 2 or args.proxsparse_steps < 0:
        p.error("windows and --repeats must be ≥ 1, --seqlen and --new-tokens ≥ 2, "
                "--proxsparse-steps ≥ 0")
    return args


def config_for(method: str, args: argparse.Namespace) -> ps.PruneConfig:
    if method == "proxsparse":  # the defaults, on the demo's windows
        return ps.ProxSparseConfig(steps=args.proxsparse_steps,
                                   norm_windows=min(32, args.calib_windows))
    return ps.config_for(method)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    model, tokenizer = ps.load_model(args.model)
    windows = ps.eval_windows(ps.tokenize(tokenizer, ps.load_text(args.text)), args.seqlen,
                              args.eval_windows)
    calib = ps.calibration_windows(tokenizer, "builtin", args.calib_windows, args.seqlen,
                                   seed=0)
    dense = {k: v.clone() for k, v in model.state_dict().items()}

    row_start = time.perf_counter()
    rows = [Row("dense", ps.perplexity(model, windows).ppl, 0.0, 0.0)]
    rows[0].row_s = time.perf_counter() - row_start
    for method in args.methods:
        row_start = time.perf_counter()
        model.load_state_dict(dense)
        config = config_for(method, args)
        result = ps.prune(model, config, calib)
        assert all(check.valid for check in ps.verify(model, list(result.masks), config.nm))
        ppl = ps.perplexity(model, windows).ppl
        rows.append(Row(f"{method} 2:4", ppl, result.seconds, time.perf_counter() - row_start))

    steps = args.proxsparse_steps or args.calib_windows
    learned = (f"; ProxSparse: its defaults, {steps} steps of one window (README Results: 128)"
               if "proxsparse" in args.methods else "")
    evaluated = "WikiText-2" if args.text in (str(WIKITEXT), "wikitext2") else args.text
    print(f"\n{args.model}, {evaluated} ({windows.numel()} tokens), calibration "
          f"{args.calib_windows}x{args.seqlen} builtin{learned}")
    print(f"{'model':<18}{'perplexity':>12}{'prune s':>10}{'row s':>9}")
    for row in rows:
        print(f"{row.name:<18}{row.ppl:>12.2f}{row.prune_s:>10.1f}{row.row_s:>9.1f}")

    if args.methods:
        print_speed(model, tokenizer, rows[-1].name, args)
    print(f"\ndemo wall time {time.perf_counter() - start:.0f} s "
          f"(torch threads: {torch.get_num_threads()})")


def print_speed(model, tokenizer, name: str, args: argparse.Namespace) -> None:
    """The last pruned model, packed (proxsparse.sparsify) against itself dense with zeros."""
    ps.sparsify(model)
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    from proxsparse.data import builtin_text

    prefill = ps.tokenize(tokenizer, builtin_text())[:PREFILL_TOKENS].view(1, -1)
    result = compare(model, prompt, prefill, args.new_tokens, args.repeats)
    dense, packed = result["dense"], result["packed"]
    print(f"\n{name}, greedy decode of {args.new_tokens} tokens, median of {args.repeats} "
          f"(torch threads: {result['threads']}, backend {result['backend']}):")
    for row in (dense, packed):
        print(f"  {row['label']:<7}{row['decode_tokens_per_s']:>8.1f} tokens/s   target "
              f"weights {row['target_weight_bytes'] / 2**20:6.1f} MiB")
    print(f"  packed decodes {result['decode_speedup']:.2f}x as fast as dense; same greedy "
          f"tokens: {'yes' if result['same_tokens'] else 'no'}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
