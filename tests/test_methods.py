import pytest
import torch

from proxsparse import NM, find_targets, prune
from proxsparse.blockwise import capture_block_inputs
from proxsparse.errors import ProxSparseError
from proxsparse.methods import config_for
from proxsparse.methods.sparsegpt import hessian, sparsegpt_prune
from proxsparse.nm import is_valid_nm, mask_is_exact, topn_mask
from tests.conftest import make_model

METHODS = ["magnitude", "wanda", "sparsegpt"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("nm", ["2:4", "1:4", "4:8"])
def test_every_target_becomes_exact_nm(model, calib, method, nm):
    result = prune(model, config_for(method, nm=nm), calib, progress=False)
    pattern = NM.parse(nm)
    modules = dict(model.named_modules())
    assert len(result.masks) == 14  # 7 projections x 2 blocks
    for name, mask in result.masks.items():
        assert mask_is_exact(mask, pattern)
        weight = modules[name].weight
        assert is_valid_nm(weight, pattern)
        assert not bool((weight[~mask] != 0).any())
        assert result.layer_stats(model)[name]["sparsity"] >= 1 - pattern.density - 1e-6
    assert modules["lm_head"].weight.count_nonzero() == modules["lm_head"].weight.numel()


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_mask(tokenizer, calib, method):
    masks = [prune(make_model(len(tokenizer)), config_for(method), calib, progress=False).masks
             for _ in range(2)]
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_layer_with_odd_input_size_is_skipped_and_listed(tokenizer, calib):
    model = make_model(len(tokenizer), intermediate_size=66)
    result = prune(model, config_for("wanda"), calib, progress=False)
    assert set(result.skipped) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert "multiple of M=4" in result.skipped["model.layers.0.mlp.down_proj"]
    assert len(result.masks) == 12


@pytest.mark.parametrize("nm, sizes, advice", [
    ("2:3", "(64, 128)", "--nm 2:4"),  # hidden 64, intermediate 128
    ("1:5", "(64, 128)", "--nm 2:4"),
    ("3:5", "(64, 66)", "--nm 1:2"),  # down_proj's 66 = 2 * 33
    ("2:4", "(66)", "--nm 1:2"),  # --include down_proj alone: 66 = 2 * 33
])
def test_no_layer_fits_m_says_why_and_what_fits(tokenizer, caplog, nm, sizes, advice):
    model = make_model(len(tokenizer), intermediate_size=66 if "66" in sizes else 128)
    include = ("*.down_proj",) if sizes == "(66)" else ()
    with pytest.raises(ProxSparseError) as raised:
        find_targets(model, NM.parse(nm), include=include)
    message = str(raised.value)
    assert f"input size {sizes} is not a multiple of M={NM.parse(nm).m}" in message, message
    assert message.endswith(f"e.g. {advice}"), message
    assert "skipping" not in caplog.text  # the error alone, not a warning per layer first


def test_no_common_factor_suggests_include(tokenizer):
    model = make_model(len(tokenizer), intermediate_size=65)
    with pytest.raises(ProxSparseError, match=r"\(64, 65\).*no M > 1 divides them all"):
        find_targets(model, NM(3, 7))


def test_include_and_ignore(model):
    targets, _ = find_targets(model, NM(2, 4), include=("*.mlp.*",), ignore=("*.down_proj",))
    assert sorted(t.name.split(".")[-1] for t in targets) == ["gate_proj"] * 2 + ["up_proj"] * 2
    targets, _ = find_targets(model, NM(2, 4), include=("lm_head",))
    assert [t.name for t in targets] == ["lm_head"]
    with pytest.raises(ProxSparseError, match="no target layer matched"):
        find_targets(model, NM(2, 4), ignore=("*",))


def test_a_weight_tied_to_the_embeddings_is_refused(model):
    model.lm_head.weight = model.model.embed_tokens.weight
    with pytest.raises(ProxSparseError, match="shares its weight with model.embed_tokens"):
        find_targets(model, NM(2, 4), include=("lm_head",))
    assert len(find_targets(model, NM(2, 4))[0]) == 14  # the blocks' own layers are fine


def test_nan_weights_are_refused(model, calib):
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(ProxSparseError, match="NaN or Inf"):
        prune(model, config_for("magnitude"), calib, progress=False)


def test_wanda_scores_weight_times_input_norm(model, calib):
    """The first q_proj sees the normed embeddings: its mask must follow |W|·‖X_j‖."""
    hidden, _ = capture_block_inputs(model, calib)
    layer = model.model.layers[0]
    with torch.no_grad():
        x = layer.input_layernorm(hidden)
    weight = layer.self_attn.q_proj.weight.detach().clone()
    expected = topn_mask(weight.abs() * x.reshape(-1, 64).norm(dim=0), NM(2, 4))
    result = prune(model, config_for("wanda"), calib, progress=False)
    assert torch.equal(result.masks["model.layers.0.self_attn.q_proj"], expected)
    assert not torch.equal(expected, topn_mask(weight.abs(), NM(2, 4)))


def naive_sparsegpt(weight, hess, nm, blocksize, damp):
    """Column-at-a-time OBS, written as plainly as possible, to check the grouped version."""
    w, h = weight.double().clone(), hess.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    keep = torch.zeros_like(w, dtype=torch.bool)
    for j in range(w.shape[1]):
        if j % nm.m == 0:
            sal = w[:, j:j + nm.m] ** 2 / hinv.diagonal()[j:j + nm.m] ** 2
            keep[:, j:j + nm.m] = topn_mask(sal, nm)
        q = torch.where(keep[:, j], w[:, j], 0.0)
        err = (w[:, j] - q) / hinv[j, j]
        w[:, j:] -= err.unsqueeze(1) * hinv[j, j:].unsqueeze(0)
        w[:, j] = q
    return w, keep


@pytest.mark.parametrize("nm", [NM(2, 4), NM(4, 8)])
def test_sparsegpt_matches_the_column_by_column_algorithm(nm):
    torch.manual_seed(0)
    weight, x = torch.randn(24, 64), torch.randn(512, 64) @ torch.randn(64, 64)
    hess = hessian(x.double()).double()
    new_weight, keep = sparsegpt_prune(weight.double(), hess, nm, blocksize=16, dampening=0.01)
    ref_weight, ref_keep = naive_sparsegpt(weight, hess, nm, 16, 0.01)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new_weight, ref_weight)


def test_sparsegpt_reconstructs_layer_output_better_than_wanda_mask():
    torch.manual_seed(1)
    weight, x = torch.randn(32, 64), torch.randn(1024, 64) @ torch.randn(64, 64)
    new_weight, keep = sparsegpt_prune(weight, hessian(x), NM(2, 4))
    wanda_weight = weight * topn_mask(weight.abs() * x.norm(dim=0), NM(2, 4))
    err_sparsegpt = (x @ (new_weight * keep).T - x @ weight.T).norm()
    err_wanda = (x @ wanda_weight.T - x @ weight.T).norm()
    assert err_sparsegpt < 0.9 * err_wanda


def test_methods_that_need_calibration_say_so(model):
    with pytest.raises(ProxSparseError, match="calibration"):
        prune(model, config_for("wanda"), None, progress=False)


def test_unknown_method():
    with pytest.raises(ProxSparseError, match="unknown method"):
        config_for("sparsest")


def test_sparsegpt_with_a_fixed_mask_keeps_it_and_beats_plain_masking():
    torch.manual_seed(2)
    weight, x = torch.randn(32, 64), torch.randn(1024, 64) @ torch.randn(64, 64)
    wanda_mask = topn_mask(weight.abs() * x.norm(dim=0), NM(2, 4))
    new_weight, keep = sparsegpt_prune(weight, hessian(x), NM(2, 4), mask=wanda_mask)
    assert torch.equal(keep, wanda_mask)
    err_fixed = (x @ (new_weight * keep).T - x @ weight.T).norm()
    err_plain = (x @ (weight * wanda_mask).T - x @ weight.T).norm()
    # the best any re-fit under this mask can do: least squares, row by row
    best = torch.zeros_like(weight)
    for row in range(weight.shape[0]):
        cols = wanda_mask[row]
        best[row, cols] = torch.linalg.lstsq(x[:, cols], x @ weight[row]).solution
    err_best = (x @ best.T - x @ weight.T).norm()
    assert err_best <= err_fixed < 0.95 * err_plain


def test_reconstruct_refuses_weights_that_are_already_masked(model, calib):
    from proxsparse.methods.sparsegpt import reconstruct

    targets, _ = find_targets(model, NM(2, 4))
    masks = {t.name: topn_mask(t.module.weight.detach().abs(), NM(2, 4)) for t in targets}
    with torch.no_grad():
        for t in targets:
            t.module.weight.mul_(masks[t.name])
    with pytest.raises(ProxSparseError, match="dense weights"):
        reconstruct(model, targets, calib, masks, NM(2, 4), progress=False)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_offload_moves_one_block_at_a_time_and_prunes_the_same(tokenizer, calib, method,
                                                               monkeypatch):
    """--offload: each block goes to the device for its turn and back, in order (on this CPU
    machine the device is the CPU: the masks are those of a run without offload)."""
    from proxsparse.models import decoder_blocks

    plain = make_model(len(tokenizer))
    reference = prune(plain, config_for(method), calib, progress=False).masks
    model = make_model(len(tokenizer))
    blocks = {id(b): i for i, b in enumerate(decoder_blocks(model))}
    moves = []
    real_to = torch.nn.Module.to

    def spy(self, *args, **kwargs):
        if id(self) in blocks:
            moves.append((blocks[id(self)], str(args[0] if args else kwargs.get("device"))))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy)
    masks = prune(model, config_for(method, offload="cpu"), calib, progress=False).masks
    assert moves == [(0, "cpu"), (0, "cpu"), (1, "cpu"), (1, "cpu")]
    assert all(torch.equal(reference[k], masks[k]) for k in reference)
    with pytest.raises(ProxSparseError, match="--offload"):
        config_for(method, offload="tpu:0")
