import json

import pytest
import torch

from proxsparse import NM, ProxSparseConfig, prune
from proxsparse.learning.optimizers import lr_factor
from proxsparse.methods import proxsparse as method
from proxsparse.nm import is_valid_nm, mask_is_exact
from proxsparse.runlog import LOG_FILE, PLOT_FILE
from tests.conftest import can_compile, make_model


def test_lambda2_gradient_matches_autograd():
    torch.manual_seed(0)
    w0 = torch.randn(8, 16, dtype=torch.float64)
    w0[0, :4] = 0.0  # sgn⁺(0) = +1
    weight = (w0 + 0.3 * torch.randn_like(w0)).requires_grad_(True)
    scale = w0 + 0.1 * torch.where(w0 >= 0, 1.0, -1.0)
    reference = ((weight / scale) * (weight - w0)).square().sum()
    reference.backward()
    value, grad = method.lambda2_term(weight.detach(), w0, 0.1)
    torch.testing.assert_close(value, reference.detach())
    torch.testing.assert_close(grad, weight.grad)
    # it vanishes at W = W0 and at W = 0
    assert float(method.lambda2_term(w0, w0, 0.1)[0]) == 0.0
    assert float(method.lambda2_term(torch.zeros_like(w0), w0, 0.1)[0]) == 0.0


def test_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 20, 0.1) for s in range(20)]
    assert factors[:2] == [0.5, 1.0]
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))
    assert factors[-1] == pytest.approx(1 / 18)


def learn(tokenizer, calib, **settings):
    model = make_model(len(tokenizer))
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    # λ1 values below are absolute (the tiny model's weights are ~0.02)
    config = ProxSparseConfig(**{"steps": 6, "lr": 1e-3, "lambda1_scaling": "absolute",
                                 **settings})
    return model, pretrained, prune(model, config, calib, progress=False)


def test_learned_masks_are_exact_and_keep_pretrained_weights(tokenizer, calib):
    model, pretrained, result = learn(tokenizer, calib, lambda1=5.0)
    for name, mask in result.masks.items():
        assert mask_is_exact(mask, NM(2, 4))
        weight = model.get_submodule(name).weight
        assert is_valid_nm(weight, NM(2, 4))
        torch.testing.assert_close(weight, pretrained[name + ".weight"] * mask, rtol=0, atol=0)
    untouched = [k for k in pretrained if not any(k.startswith(n) for n in result.masks)]
    assert all(torch.equal(model.state_dict()[k], pretrained[k]) for k in untouched)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("nm", ["1:4", "4:8"])
def test_other_patterns(tokenizer, calib, nm):
    _, _, result = learn(tokenizer, calib, lambda1=5.0, nm=nm)
    assert all(mask_is_exact(m, NM.parse(nm)) for m in result.masks.values())


def test_share_of_nm_groups_rises_with_lambda1(tokenizer, calib, tmp_path):
    shares = []
    for lam in (0.0, 20.0, 2000.0):
        run_dir = tmp_path / f"run-{lam}"
        learn(tokenizer, calib, lambda1=lam, run_dir=str(run_dir), log_every=2)
        rows = [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(6))
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
        shares.append(rows[-1]["nm_share"])
    assert shares[0] < 0.01 and shares[0] < shares[1] < shares[2] and shares[2] > 0.99
    assert (tmp_path / "run-2000.0" / PLOT_FILE).stat().st_size > 1000


def test_same_seed_same_mask(tokenizer, calib):
    a = learn(tokenizer, calib, lambda1=5.0)[2].masks
    b = learn(tokenizer, calib, lambda1=5.0)[2].masks
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_all_restores_every_pretrained_parameter(tokenizer, calib):
    model, pretrained, result = learn(tokenizer, calib, lambda1=5.0, train_all=True)
    for key, value in model.state_dict().items():
        layer = key.removesuffix(".weight")
        expected = pretrained[key] * result.masks[layer] if layer in result.masks else \
            pretrained[key]
        assert torch.equal(value, expected), key


def test_input_scaled_regulariser_starts_from_the_wanda_mask(tokenizer, calib):
    """With no learning (lr 0, λ1 0) the input-scaled mask is top-N of |W|·‖X_j‖, measured on
    the dense model: a one-shot Wanda mask."""
    from proxsparse.activations import input_feature_norms
    from proxsparse.models import find_targets
    from proxsparse.nm import topn_mask

    model = make_model(len(tokenizer))
    targets, _ = find_targets(model, NM(2, 4))
    norms = input_feature_norms(model, targets, calib[:4], progress=False)
    expected = {t.name: topn_mask(t.module.weight.detach().abs() * norms[t.name], NM(2, 4))
                for t in targets}
    config = ProxSparseConfig(steps=2, lr=0.0, lambda1=0.0, lambda2=0.0, input_scaled=True,
                              norm_windows=4)
    result = prune(model, config, calib, progress=False)
    plain = prune(make_model(len(tokenizer)),
                  ProxSparseConfig(steps=2, lr=0.0, lambda1=0.0, input_scaled=False),
                  calib, progress=False)
    assert all(torch.equal(result.masks[n], expected[n]) for n in expected)
    assert any(not torch.equal(plain.masks[n], expected[n]) for n in expected)


def test_reconstruct_changes_only_kept_weights_and_keeps_the_mask(tokenizer, calib):
    model, pretrained, result = learn(tokenizer, calib, lambda1=5.0)
    rebuilt, _, again = learn(tokenizer, calib, lambda1=5.0, reconstruct=True)
    changed = 0
    for name, mask in result.masks.items():
        assert torch.equal(again.masks[name], mask)
        weight = rebuilt.get_submodule(name).weight
        assert is_valid_nm(weight, NM(2, 4))
        changed += int(not torch.equal(weight, pretrained[name + ".weight"] * mask))
    assert changed > 0


def regularisers(weights, compiled, lambda2=0.0):
    pretrained = [w.detach().clone() for w in weights]
    return method.StepRegularisers(ProxSparseConfig(lambda2=lambda2), weights, pretrained,
                                   [0.5] * len(weights), [None] * len(weights), compiled)


def test_failed_compilation_falls_back_to_the_eager_prox(monkeypatch):
    eager = method.prox_nm

    def no_compiler(weight, lam, n, m, compiled=False):
        if compiled:
            raise RuntimeError("InductorError: no C++ compiler found\nmore detail")
        return eager(weight, lam, n, m)

    monkeypatch.setattr(method, "prox_nm", no_compiler)
    weight = torch.randn(8, 16)
    regs = regularisers([weight.clone()], compiled=True)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        regs.prox_()
    assert torch.equal(regs.weights[0], eager(weight, 0.5, 2, 4)) and regs.compiled is False


@pytest.mark.skipif(not can_compile(), reason="no C++ compiler for torch.compile")
def test_compiled_lambda2_term_matches_eager():
    torch.manual_seed(0)
    grads = []
    for compiled in (False, True):
        weights = [torch.randn(shape) for shape in ((8, 16), (24, 16))]
        for w in weights:
            w.grad = torch.ones_like(w)
        regs = regularisers(weights, compiled, lambda2=0.1)
        with torch.no_grad():
            for w in weights:
                w.mul_(0.9)  # away from W0, so the term is not zero
        grads.append((regs.add_lambda2_grad(), [w.grad for w in weights]))
        torch.manual_seed(0)
    (value, eager), (value_c, compiled_grads) = grads
    assert regs.compiled and float(value) > 0
    torch.testing.assert_close(value_c, value)
    for a, b in zip(eager, compiled_grads, strict=True):
        torch.testing.assert_close(a, b)
