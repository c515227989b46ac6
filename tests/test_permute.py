"""Channel permutation (--permute): exact on every supported family, never a lower kept score,
deterministic, recorded in the export."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import proxsparse as ps
from proxsparse.cli import main
from proxsparse.models import find_targets
from proxsparse.nm import NM
from proxsparse.permute import find_sites, kept_score, permute_channels, search_orders

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # biased q/k/v: v's bias moves too
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
}


def family_model(name: str, seed: int = 0):
    config_name, model_name, extra = FAMILIES[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, **extra)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # random biases where the family has them, so that moving them counts
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_()
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("score", ["magnitude", "wanda"])
def test_dense_outputs_do_not_change(family, score):
    model = family_model(family)
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(tokens).logits
    targets, _ = find_targets(model, NM(2, 4))
    done = permute_channels(model, targets, NM(2, 4), score, calib=tokens, rounds=20,
                            progress=False)
    # both sites of both blocks, each moved, each keeping at least as much of the score
    assert len(done) == 4 and {n.rsplit(".", 1)[1] for n in done} == {"down_proj", "o_proj"}
    assert all(p.columns != sorted(p.columns) for p in done.values())
    assert all(p.kept_after >= p.kept_before for p in done.values())
    assert any(p.kept_after > p.kept_before for p in done.values())
    with torch.no_grad():
        after = model(tokens).logits
    torch.testing.assert_close(after, before, atol=2e-5, rtol=1e-5)


def test_attention_site_keeps_each_kv_head_order_for_its_query_heads():
    model = family_model("llama")
    targets, _ = find_targets(model, NM(2, 4))
    site = next(s for s in find_sites(model, targets) if s.name.endswith("o_proj"))
    assert (site.heads, site.width, site.repeats) == (2, 16, 2)
    orders = torch.stack([torch.randperm(16), torch.randperm(16)])
    columns = site.column_index(orders)
    # query heads 0, 1 read kv head 0; 2, 3 read kv head 1
    for head in range(4):
        block = columns[head * 16:(head + 1) * 16] - head * 16
        assert torch.equal(block, orders[head // 2])
    assert torch.equal(site.row_index(orders)[16:] - 16, orders[1])


@pytest.mark.parametrize("nm", [NM(2, 4), NM(4, 8), NM(1, 4)])
def test_search_never_lowers_the_kept_score_and_is_seeded(nm):
    score = torch.rand(3, 40, 64, generator=torch.Generator().manual_seed(0)) ** 4
    orders = search_orders(score, nm, rounds=15, seed=3)
    assert all(torch.equal(o.sort().values, torch.arange(64)) for o in orders)  # permutations
    permuted = score.gather(2, orders[:, None].expand_as(score))
    gain = kept_score(permuted, nm) - kept_score(score, nm)
    assert (gain > 0).all()
    assert torch.equal(orders, search_orders(score, nm, rounds=15, seed=3))
    assert not torch.equal(orders, search_orders(score, nm, rounds=15, seed=4))


def test_search_finds_the_separating_order():
    # channels 0..3 strong, 4..7 weak: identity groups already separate them, but interleaved
    # strong/weak columns (s w s w | s w s w) keep more at 2:4 than (s s s s | w w w w)
    strong, weak = torch.full((8, 4), 10.0), torch.full((8, 4), 1.0)
    score = torch.cat([strong, weak], 1)[None]
    orders = search_orders(score, NM(2, 4), rounds=10, seed=0)
    permuted = score.gather(2, orders[:, None].expand_as(score))
    assert kept_score(permuted, NM(2, 4)).item() == pytest.approx(8 * 2 * (10 + 10))
    assert kept_score(score, NM(2, 4)).item() == pytest.approx(8 * (20 + 2))


def test_prune_with_permute_records_the_orders(tokenizer, model, calib):
    config = ps.WandaConfig(permute=True, permute_rounds=5)
    result = ps.prune(model, config, calib, progress=False)
    meta = ps.describe(result, model)
    assert set(meta["permutations"]) == {f"model.layers.{i}.{p}" for i in range(2)
                                         for p in ("mlp.down_proj", "self_attn.o_proj")}
    for name, entry in meta["permutations"].items():
        width = dict(model.named_modules())[name].in_features
        assert sorted(entry["columns"]) == list(range(width)) and entry["kept_score_gain"] >= 0
    assert config.identity()["permute"] is True
    assert "permute" not in ps.WandaConfig().identity()


def test_cli_permute_exports_a_plain_checkpoint(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["prune", "--model", model_dir, "--method", "magnitude", "--permute",
                 "--permute-rounds", "3", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((out / "proxsparse.json").read_text())
    assert len(meta["permutations"]) == 4
    reloaded, _ = ps.load_model(str(out))
    assert all(not hasattr(m, "index") for m in reloaded.modules())  # no run-time index


def test_prosparse_refuses_permute():
    with pytest.raises(ps.ProxSparseError, match="--permute reorders channels for N:M masks"):
        ps.ProSparseConfig(permute=True)
