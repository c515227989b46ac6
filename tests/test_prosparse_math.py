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
