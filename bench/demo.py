"""`make demo`: prune SmolLM2-135M to 2:4 and compare perplexity before and after.

Calibration: 32 windows of 512 tokens of the built-in offline text. Evaluation: the first 32
windows of 512 tokens of WikiText-2 test (the shared copy beside the project when present,
otherwise the hub). A few minutes on a laptop-class CPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import proxsparse as ps

WIKITEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"


def main() -> None:
    model, tokenizer = ps.load_model("smollm2-135m")
    text = str(WIKITEXT) if WIKITEXT.exists() else "wikitext2"
    windows = ps.eval_windows(ps.tokenize(tokenizer, ps.load_text(text)), 512, 32)
    calib = ps.calibration_windows(tokenizer, "builtin", 32, 512, seed=0)
    dense = {k: v.clone() for k, v in model.state_dict().items()}

    rows = [("dense", ps.perplexity(model, windows).ppl, 0.0)]
    for config in (ps.MagnitudeConfig(), ps.WandaConfig(), ps.SparseGPTConfig()):
        model.load_state_dict(dense)
        start = time.perf_counter()
        result = ps.prune(model, config, calib)
        seconds = time.perf_counter() - start
        rows.append((f"{config.method} 2:4", ps.perplexity(model, windows).ppl, seconds))
        assert all(check.valid for check in ps.verify(model, list(result.masks), config.nm))

    print(f"\nSmolLM2-135M, WikiText-2 ({windows.numel()} tokens), calibration 32x512 builtin")
    print(f"{'model':<16}{'perplexity':>12}{'prune s':>10}")
    for name, ppl, seconds in rows:
        print(f"{name:<16}{ppl:>12.2f}{seconds:>10.1f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
