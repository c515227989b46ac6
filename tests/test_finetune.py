import pytest
import torch

from proxsparse import NM, ProxSparseError, config_for, prune
from proxsparse.methods.maskpro import window_losses
from proxsparse.nm import is_valid_nm
from tests.conftest import make_model


def calib_loss(model, calib) -> float:
    model.eval()
    with torch.no_grad():
        return float(window_losses(model, calib).mean())


def test_finetuning_lowers_the_loss_and_keeps_the_masks(tokenizer, calib):
    plain, tuned = make_model(len(tokenizer)), make_model(len(tokenizer))
    before = {k: v.clone() for k, v in tuned.state_dict().items()}
    prune(plain, config_for("magnitude"), calib, progress=False)
    result = prune(tuned, config_for("magnitude", finetune_steps=8, finetune_lr=1e-3), calib,
                   progress=False)
    assert calib_loss(tuned, calib) < calib_loss(plain, calib)
    for name, mask in result.masks.items():
        weight = tuned.get_submodule(name).weight
        assert is_valid_nm(weight, NM(2, 4))
        assert torch.equal(weight != 0, mask)  # every pruned weight stayed exactly zero
        assert not torch.equal(weight, plain.get_submodule(name).weight)  # the kept ones learned
    untouched = [k for k in before if not any(k.startswith(n) for n in result.masks)]
    assert all(torch.equal(tuned.state_dict()[k], before[k]) for k in untouched)
    assert all(p.requires_grad for p in tuned.parameters())
    assert result.config.settings()["finetune_steps"] == 8


def test_finetuning_is_deterministic(tokenizer, calib):
    weights = []
    for _ in range(2):
        model = make_model(len(tokenizer))
        prune(model, config_for("wanda", finetune_steps=3, finetune_lr=1e-3), calib,
              progress=False)
        weights.append(model.model.layers[0].mlp.down_proj.weight.clone())
    assert torch.equal(*weights)


def test_finetuning_refuses_what_it_cannot_do(tokenizer, calib):
    with pytest.raises(ProxSparseError, match="calibration windows"):
        prune(make_model(len(tokenizer)), config_for("magnitude", finetune_steps=2), None,
              progress=False)
    with pytest.raises(ProxSparseError, match="a positive|> 0"):
        config_for("wanda", finetune_steps=2, finetune_lr=0.0)
    with pytest.raises(ProxSparseError, match="integer"):
        config_for("wanda", finetune_steps=-1)
    with pytest.raises(ProxSparseError, match="makes no N:M masks"):
        prune(make_model(len(tokenizer)), config_for("prosparse", finetune_steps=2), calib,
              progress=False)
