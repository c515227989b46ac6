"""ProSparse's maths: the staged sine schedule of λ and the L1 penalty on the activations."""

import math

import pytest
import torch

from proxsparse.errors import ProxSparseError
from proxsparse.gated_mlp import gated_mlps, substitute_relu
from proxsparse.methods.prosparse import ActivationL1, l1_lambda, parse_stages
from tests.conftest import make_model


def test_sine_ramp_at_stage_boundaries_and_midpoints():
    stages = parse_stages("0.1:0,0.5:0.005,0.6:0.005,1:0.05")
    total = 100
    values = [l1_lambda(s, total, stages) for s in range(total)]
    assert values[9] == 0.0  # the warm-up stage holds 0
    assert values[49] == pytest.approx(0.005)  # the end of the first ramp reaches its λ
    assert values[29] == pytest.approx(0.0025)  # halfway through a ramp: η = 1/2
    progress = (0.15 - 0.1) / 0.4  # after step 14: 15% of the run, 1/8 into the ramp
    assert values[14] == pytest.approx(0.005 * 0.5 * (math.sin(-math.pi / 2 + math.pi
                                                                * progress) + 1))
    assert values[50:60] == pytest.approx([0.005] * 10)  # a holding stage
    assert values[-1] == pytest.approx(0.05)
    assert all(b >= a - 1e-15 for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize("text, problem", [
    ("0.5:0.1", "exactly 1"), ("0.5:0.1,0.4:0.2,1:0.3", "rise strictly"),
    ("0.5:0.2,1:0.1", "no smaller"), ("a:b", "END:LAMBDA"), ("1:-1", "≥ 0")])
def test_bad_stages_are_refused(text, problem):
    with pytest.raises(ProxSparseError, match=problem):
        parse_stages(text)


def test_activation_l1_and_its_gradient_match_a_direct_computation(tokenizer, calib):
    model = make_model(len(tokenizer))
    substitute_relu(model)
    batch = calib[:2]
    with ActivationL1(model) as penalty:
        model(batch)
        total = penalty.total
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    acts = []
    hooks = [m.module.act_fn.register_forward_hook(lambda _m, _a, out: acts.append(out))
             for m in gated_mlps(model)]
    model(batch)
    for h in hooks:
        h.remove()
    expected = sum(a.abs().sum(-1).mean() for a in acts)
    expected.backward()
    torch.testing.assert_close(total, expected)
    for name, param in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], param.grad)
    assert any("gate_proj" in n for n in grads)  # it reaches the gates


# --- the method ---

def prosparse_run(tokenizer, calib, **settings):
    from proxsparse import ProSparseConfig, prune

    model = make_model(len(tokenizer))
    config = ProSparseConfig(**{"steps": 6, "lr": 2e-3, "batch_size": 2, **settings})
    return model, prune(model, config, calib, progress=False)


def zero_share(model, calib) -> float:
    from proxsparse.gated_mlp import ActivationSparsity

    with ActivationSparsity(model) as meter, torch.no_grad():
        model(calib)
    return meter.shares()["overall"]


def test_prosparse_swaps_in_fatrelu_and_the_l1_term_raises_sparsity(tokenizer, calib):
    from proxsparse.gated_mlp import FATReLU

    plain, result = prosparse_run(tokenizer, calib, stages="1:0", threshold=0.0)
    assert result.masks == {}
    assert all(isinstance(m.module.act_fn, FATReLU) for m in gated_mlps(plain))
    assert plain.config.hidden_act == "relu"
    penalised, _ = prosparse_run(tokenizer, calib, stages="0.2:0,1:2.0", threshold=0.0)
    assert zero_share(penalised, calib) > zero_share(plain, calib) + 0.05
    thresholded, _ = prosparse_run(tokenizer, calib, stages="1:0", threshold=0.05)
    assert zero_share(thresholded, calib) > zero_share(plain, calib)
    assert all(m.module.act_fn.threshold == 0.05 for m in gated_mlps(thresholded))


def test_threshold_for_sparsity_reaches_the_target_share_of_zeros(tokenizer, calib):
    from proxsparse.gated_mlp import FATReLU, threshold_for_sparsity

    model = make_model(len(tokenizer))
    substitute_relu(model)
    relu = zero_share(model, calib)
    assert threshold_for_sparsity(model, calib, relu / 2) == 0.0  # ReLU already does
    threshold = threshold_for_sparsity(model, calib, 0.8, per_layer=1 << 20)
    for mlp in gated_mlps(model):
        mlp.module.act_fn = FATReLU(threshold)
    assert zero_share(model, calib) == pytest.approx(0.8, abs=0.01)
    # ProSparse's --target-sparsity: set for the last quarter of the run, then checked again
    for adapt in (0.0, 0.5):
        trained, _ = prosparse_run(tokenizer, calib, stages="1:0", target_sparsity=0.9,
                                   adapt=adapt)
        assert all(m.module.act_fn.threshold > 0.01 for m in gated_mlps(trained))
        assert zero_share(trained, calib) >= 0.9 - 0.03
    with pytest.raises(ProxSparseError, match="target_sparsity|target-sparsity"):
        from proxsparse import ProSparseConfig

        ProSparseConfig(target_sparsity=1.5)


def test_prosparse_export_reloads_with_its_threshold(model_dir, tmp_path, capsys):
    import json

    from transformers import AutoModelForCausalLM

    from proxsparse import load_model
    from proxsparse.cli import main

    out = tmp_path / "out"
    assert main(["prune", "--model", model_dir, "--method", "prosparse", "--steps", "2",
                 "--calib-windows", "4", "--seqlen", "32", "--out", str(out), "--quiet"]) == 0
    assert "prosparse finished" in capsys.readouterr().out
    meta = json.loads((out / "proxsparse.json").read_text())
    assert meta["activation"] == {"kind": "fatrelu", "threshold": 0.01}
    model, _ = load_model(str(out))
    assert all(m.module.act_fn.threshold == 0.01 for m in gated_mlps(model))
    plain = AutoModelForCausalLM.from_pretrained(out)  # plain transformers: ReLU
    assert plain.config.hidden_act == "relu"
    assert main(["verify", str(out)]) == 0
    # ProSparse, then 2:4 weights: the 2:4 export keeps the activation's threshold
    sparse = tmp_path / "sparse"
    assert main(["prune", "--model", str(out), "--method", "magnitude", "--out", str(sparse),
                 "--quiet"]) == 0
    meta = json.loads((sparse / "proxsparse.json").read_text())
    assert meta["method"] == "magnitude"
    assert meta["activation"] == {"kind": "fatrelu", "threshold": 0.01}
    model, _ = load_model(str(sparse))
    assert all(m.module.act_fn.threshold == 0.01 for m in gated_mlps(model))
    # both run faster with the activation-skipping MLP: alone, and beside packed 2:4 layers
    for source, packed in ((out, 0), (sparse, 8)):  # 8: q/k/v/o of the two blocks
        capsys.readouterr()
        assert main(["speed", str(source), "--skip-activation-zeros", "--new-tokens", "4",
                     "--prefill-tokens", "16", "--repeats", "1", "--json", "--quiet"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert (result["packed_layers"], result["skipping_mlps"]) == (packed, 2)
        assert result["max_relative_logit_difference"] < 1e-3
    assert result["target_bytes_ratio"] < 0.6


def test_prosparse_refuses_a_model_without_gated_mlps_and_a_learning_copy(tokenizer, calib):
    from proxsparse import ProSparseConfig, prune

    model = make_model(len(tokenizer))
    with pytest.raises(ProxSparseError, match="in place"):
        prune(model, ProSparseConfig(steps=1, learn_dtype="bfloat16"), calib, progress=False)
    with pytest.raises(ProxSparseError, match="stages"):
        ProSparseConfig(stages="0.5:1")
