"""Activation sparsity: the gated MLPs, the ReLU substitution, the zero meter, the skipping MLP."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig

from proxsparse.errors import ProxSparseError
from proxsparse.gated_mlp import ActivationSparsity, FATReLU, gated_mlps, substitute_relu
from proxsparse.runtime.skip_mlp import SkippingMLP, skip_activation_zeros
from tests.conftest import make_model


def test_relu_substitution_changes_only_the_activation(tokenizer):
    model = make_model(len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mlps = substitute_relu(model)
    assert [m.name for m in mlps] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(isinstance(m.module.act_fn, FATReLU) for m in mlps)
    assert model.config.hidden_act == "relu"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(3, 64)
    mlp = mlps[0].module
    expected = mlp.down_proj(torch.relu(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), expected)


def test_fatrelu_keeps_values_at_or_above_its_threshold():
    x = torch.tensor([-1.0, 0.0, 0.005, 0.01, 0.5])
    assert torch.equal(FATReLU(0.01)(x), torch.tensor([0.0, 0.0, 0.0, 0.01, 0.5]))
    assert torch.equal(FATReLU(0.0)(x), torch.relu(x))


def test_a_model_without_gated_mlps_is_refused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    with pytest.raises(ProxSparseError, match="no gated MLP"):
        gated_mlps(Plain())


def test_meter_counts_the_zeros_entering_down_proj(tokenizer, calib):
    model = make_model(len(tokenizer))
    with ActivationSparsity(model) as meter:
        model(calib[:2])
    silu = meter.shares()
    assert silu["overall"] == 0.0  # SiLU is never exactly 0
    substitute_relu(model)
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach()))
    with ActivationSparsity(model) as meter:
        model(calib[:2])
    hook.remove()
    relu = meter.shares()
    assert relu["model.layers.0.mlp"] == pytest.approx(float((seen[0] == 0).float().mean()))
    assert 0.3 < relu["overall"] < 0.7  # about half of a random gate is negative
    assert relu["overall"] == pytest.approx(
        (relu["model.layers.0.mlp"] + relu["model.layers.1.mlp"]) / 2)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("threshold", [0.0, 0.05])
def test_skipping_mlp_equals_the_dense_mlp(tokenizer, calib, threshold, kernel):
    model = make_model(len(tokenizer))
    substitute_relu(model, threshold)
    x = torch.randn(1, 3, 64)
    prefill = torch.randn(1, 5, 64)
    dense = [(m.module(x), m.module(prefill)) for m in gated_mlps(model)]
    assert skip_activation_zeros(model, max_tokens=3, kernel=kernel) == 2
    skipping = [m for m in model.modules() if isinstance(m, SkippingMLP)]
    for mlp, (expected, expected_prefill) in zip(skipping, dense, strict=True):
        assert mlp.kernel == mlp.fused_gate == kernel
        assert set(mlp.layouts.values()) == {"dense"} and len(mlp.layouts) == 2 + kernel
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mlp(prefill), expected_prefill)
        torch.testing.assert_close(mlp.to_dense()(x), expected)
    with torch.no_grad():
        out = model.generate(calib[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


@pytest.mark.parametrize("hidden", [64, 72])  # 72: a row that is not whole 16-input words
def test_skipping_mlp_on_two_of_four_weights_reads_bitmap_rows(hidden):
    from transformers.models.llama.modeling_llama import LlamaMLP

    from proxsparse.nm import NM, topn_mask

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=96, hidden_act="relu",
                         num_attention_heads=4)
    mlp = LlamaMLP(config)
    with torch.no_grad():
        for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            linear.weight.mul_(topn_mask(linear.weight.abs(), NM(2, 4)))
    x = torch.randn(2, hidden)
    skipping = SkippingMLP(mlp, max_tokens=2)
    assert skipping.layouts == {"gate": "bitmap", "up": "bitmap", "down": "bitmap"}
    dense_bytes = 3 * mlp.up_proj.weight.numel() * 4
    assert skipping.weight_nbytes < 0.6 * dense_bytes
    torch.testing.assert_close(skipping(x), mlp(x), rtol=1e-5, atol=1e-5)
    prefill = torch.randn(4, hidden)
    torch.testing.assert_close(skipping(prefill), mlp(prefill), rtol=1e-5, atol=1e-5)


def test_skipping_mlp_takes_packed_layers_and_runs_a_gate_it_cannot_fuse_first():
    """Packed 2:4 projections (a packed checkpoint) become bitmap rows, the gate included; a
    non-ReLU activation keeps its gate a module run before the kernel. Both give the dense
    MLP's output."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    from proxsparse.nm import NM, topn_mask
    from proxsparse.runtime.module import PackedLinear

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=96, hidden_act="relu"))
    x = torch.randn(1, 64)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            linear = getattr(mlp, name)
            linear.weight.mul_(topn_mask(linear.weight.abs(), NM(2, 4)))
        expected = mlp(x)
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(mlp, name, PackedLinear.from_linear(getattr(mlp, name)))
    skipping = SkippingMLP(mlp)
    assert skipping.fused_gate
    assert skipping.layouts == {"gate": "bitmap", "up": "bitmap", "down": "bitmap"}
    torch.testing.assert_close(skipping(x), expected, rtol=1e-5, atol=1e-6)
    gelu = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=96, hidden_act="gelu"))
    skipping = SkippingMLP(gelu)
    assert not skipping.fused_gate and skipping.gate_proj is gelu.gate_proj
    torch.testing.assert_close(skipping(x), gelu(x), rtol=1e-5, atol=1e-6)


def test_skipping_mlp_in_bfloat16():
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=96, hidden_act="relu"))
    mlp = mlp.to(torch.bfloat16)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    skipping = SkippingMLP(mlp)
    assert skipping.layouts["up"] == "dense" and skipping.up_values.dtype == torch.bfloat16
    torch.testing.assert_close(skipping(x).float(), mlp(x).float(), rtol=2e-2, atol=2e-2)


def test_eval_reports_activation_sparsity(model_dir, capsys, tmp_path):
    import json

    from proxsparse.cli import main

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 100)
    assert main(["eval", model_dir, "--text", str(text), "--seqlen", "32", "--max-windows", "2",
                 "--activation-sparsity", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["activation_sparsity"]) == {"model.layers.0.mlp", "model.layers.1.mlp",
                                                  "overall"}
    assert report["activation_sparsity"]["overall"] == 0.0  # SiLU
    assert main(["eval", model_dir, "--text", str(text), "--seqlen", "32", "--max-windows", "2",
                 "--activation-sparsity", "--quiet"]) == 0
    assert "overall (mean over layers)" in capsys.readouterr().out
