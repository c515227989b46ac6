"""The packed runtime: format round trips, every backend and instruction set against the
dense-with-zeros layer, the module swap, packed checkpoints, and the CLI commands."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import proxsparse as ps
from proxsparse.errors import ProxSparseError
from proxsparse.nm import NM, topn_mask
from proxsparse.runtime import CpuKernel, PackedLinear, Reference, pack, unpack
from proxsparse.runtime.checkpoint import PACKED_FILE, load_packed
from proxsparse.runtime.kernels import KernelUnavailable, nm24
from tests.conftest import can_compile

needs_kernel = pytest.mark.skipif(not can_compile(), reason="no C++ toolchain for the kernel")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def nm_weight(out: int, in_features: int, nm: NM, seed: int = 0, scale: float = 1.0,
              holes: float = 0.0) -> torch.Tensor:
    """A random exact N:M weight; ``holes`` zeroes a share of the kept entries too."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, in_features, generator=generator) * scale
    weight *= topn_mask(weight.abs(), nm)
    if holes:
        weight *= torch.rand(out, in_features, generator=generator) >= holes
    return weight


def linear_of(weight: torch.Tensor, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias:
            linear.bias.copy_(torch.randn(weight.shape[0],
                                          generator=torch.Generator().manual_seed(seed + 1)))
    return linear


# --- the format ---

@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 40), groups=st.integers(1, 40),
       nm=st.sampled_from([(2, 4), (1, 4), (4, 8), (2, 8), (1, 2)]),
       holes=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 10_000))
def test_pack_then_unpack_is_exact(out, groups, nm, holes, seed):
    nm = NM(*nm)
    weight = nm_weight(out, groups * nm.m, nm, seed, holes=holes)
    packed = pack(weight, nm)
    assert torch.equal(unpack(packed), weight)
    assert packed.values.shape[1] % (32 // {2: 1, 4: 2, 8: 4}[nm.m]) == 0


def test_packed_bytes_at_2_4():
    weight = nm_weight(64, 4096, NM())
    assert pack(weight).nbytes / (weight.numel() * 4) == pytest.approx(2.125 / 4)
    assert pack(weight, dtype=torch.bfloat16).nbytes / (weight.numel() * 4) == pytest.approx(
        1.125 / 4)


@pytest.mark.parametrize("make_bad, message", [
    (lambda w: w.fill_(1.0), "is not 2:4"),
    (lambda w: w.index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("nan"))),
     "NaN or Inf"),
])
def test_pack_refuses_a_layer_that_is_not_exact(make_bad, message):
    weight = make_bad(nm_weight(8, 16, NM()))
    with pytest.raises(ProxSparseError, match=message):
        pack(weight, "2:4", name="layers.0.q")


def test_pack_refuses_a_ragged_input():
    with pytest.raises(ProxSparseError, match="not a multiple of M=4"):
        pack(torch.zeros(4, 6), "2:4")


# --- backends against the dense-with-zeros layer ---

ISAS = ["avx512", "avx2", "portable"]


def check_layer(layer: torch.nn.Module, linear: torch.nn.Linear, tokens: int, seed: int = 0,
                values_dtype: torch.dtype | None = None) -> None:
    x = torch.randn(tokens, linear.in_features, generator=torch.Generator().manual_seed(seed))
    weight = linear.weight.detach()
    if values_dtype is not None:
        weight = weight.to(values_dtype).float()
    expected = x.double() @ weight.double().T + linear.bias.detach().double()
    with torch.no_grad():
        got = layer(x).double()
    tolerance = 1e-5 * (x.abs().double() @ weight.abs().double().T).max() + 1e-6
    assert (got - expected).abs().max() <= tolerance


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 70), groups=st.integers(1, 40), tokens=st.integers(1, 20),
       isa=st.sampled_from(ISAS), bf16=st.booleans(), holes=st.sampled_from([0.0, 0.5]),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 10_000))
def test_kernel_equals_the_dense_layer(out, groups, tokens, isa, bf16, holes, scale, seed):
    linear = linear_of(nm_weight(out, groups * 4, NM(), seed, scale, holes), seed=seed)
    dtype = torch.bfloat16 if bf16 else None
    layer = PackedLinear.from_linear(linear, backend=CpuKernel(isa), values_dtype=dtype)
    check_layer(layer, linear, tokens, seed, dtype)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 7, 8, 15, 16, 17, 64, 129])
def test_kernel_batch_sizes_and_threads(threads, tokens):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        linear = linear_of(nm_weight(203, 4 * 75, NM(), seed=tokens))  # ragged rows and words
        check_layer(PackedLinear.from_linear(linear, backend="cpu"), linear, tokens)
        bf16 = PackedLinear.from_linear(linear, backend="cpu", values_dtype=torch.bfloat16)
        check_layer(bf16, linear, tokens, values_dtype=torch.bfloat16)
    finally:
        torch.set_num_threads(previous)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_on_wide_rows(threads):
    """Rows of ≥ 2048 inputs take the two-blocks-at-a-time decode path (and a ragged tail)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        linear = linear_of(nm_weight(8 * 7 + 3, 4096, NM(), seed=12))
        for values_dtype in (None, torch.bfloat16):
            layer = PackedLinear.from_linear(linear, backend="cpu", values_dtype=values_dtype)
            check_layer(layer, linear, 1, values_dtype=values_dtype)
    finally:
        torch.set_num_threads(previous)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
def test_reference_and_kernel_agree(isa):
    linear = linear_of(nm_weight(96, 128, NM(), seed=3))
    x = torch.randn(5, 2, 128)
    with torch.no_grad():
        kernel = PackedLinear.from_linear(linear, backend=CpuKernel(isa))(x)
        reference = PackedLinear.from_linear(linear, backend="reference")(x)
    assert kernel.shape == (5, 2, 96)
    torch.testing.assert_close(kernel, reference, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("values_dtype", [None, torch.bfloat16])
def test_prefill_unpacks_slab_by_slab(values_dtype):
    backend = CpuKernel()
    backend.max_kernel_tokens, backend.slab_bytes = 4, 1  # slabs of 8 rows, a ragged last one
    backend.prefill = "unpack"
    linear = linear_of(nm_weight(203, 4 * 75, NM(), seed=9))
    layer = PackedLinear.from_linear(linear, backend=backend, values_dtype=values_dtype)
    for tokens in (5, 33):
        check_layer(layer, linear, tokens, values_dtype=values_dtype)


@needs_kernel
def test_prefill_runs_the_kernel_in_token_chunks():
    backend = CpuKernel()
    backend.max_kernel_tokens, backend.prefill = 8, "kernel"
    linear = linear_of(nm_weight(40, 4 * 33, NM(), seed=11))
    layer = PackedLinear.from_linear(linear, backend=backend)
    for tokens in (8, 9, 30):
        check_layer(layer, linear, tokens)


@needs_kernel
def test_the_kernel_layout_restores_the_canonical_format():
    linear = linear_of(nm_weight(37, 4 * 21, NM(), seed=5))
    layer = PackedLinear.from_linear(linear, backend="cpu")
    canonical = pack(linear.weight)
    restored = layer.packed()
    assert torch.equal(restored.values, canonical.values)
    assert torch.equal(restored.indices, canonical.indices)
    assert torch.equal(layer.to_linear().weight, linear.weight)


@needs_kernel
def test_kernel_unpack_into_bf16_and_fp16():
    linear = linear_of(nm_weight(16, 64, NM(), seed=2))
    layer = PackedLinear.from_linear(linear, backend="cpu")
    for dtype in (torch.bfloat16, torch.float16):
        dense = torch.empty(16, 64, dtype=dtype)
        nm24().unpack(layer.tiles, 16, 64, 1, torch.float32, dense, 0)
        assert torch.equal(dense, linear.weight.detach().to(dtype))


def test_auto_falls_back_to_the_reference_with_a_warning(monkeypatch):
    from proxsparse.runtime import backends

    def unavailable():
        raise KernelUnavailable("no compiler here")

    monkeypatch.setattr(backends, "nm24", unavailable)
    backends._warn_fallback.cache_clear()
    linear = linear_of(nm_weight(8, 32, NM()))
    with pytest.warns(UserWarning, match="reference backend.*no compiler here"):
        layer = PackedLinear.from_linear(linear)
    assert isinstance(layer.backend, Reference)
    check_layer(layer, linear, 3)
    with pytest.raises(ProxSparseError, match="backend 'cpu' cannot run"):
        PackedLinear.from_linear(linear, backend="cpu")
    backends._warn_fallback.cache_clear()


def test_unknown_backend_is_refused():
    with pytest.raises(ProxSparseError, match="unknown backend 'tpu'"):
        PackedLinear.from_linear(linear_of(nm_weight(4, 8, NM())), backend="tpu")


def test_general_nm_runs_on_the_reference_backend():
    linear = linear_of(nm_weight(12, 32, NM(4, 8), seed=4))
    layer = PackedLinear.from_linear(linear, NM(4, 8), backend="auto")
    assert layer.backend.name == "reference"
    check_layer(layer, linear, 4)


@needs_cuda
def test_cuda_semi_structured_equals_the_dense_layer():
    weight = nm_weight(128, 128, NM()).half().cuda()
    linear = linear_of(weight.float().cpu()).half().cuda()
    layer = PackedLinear.from_linear(linear, backend="cuda")
    x = torch.randn(32, 128, device="cuda", dtype=torch.half)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-2, atol=1e-2)


# --- the module swap on a model ---

def pruned(model, method="magnitude"):
    ps.prune(model, ps.config_for(method, nm="2:4"), None, progress=False)
    return model


@needs_kernel
def test_sparsify_and_densify_keep_the_outputs(model, tokenizer):
    model = pruned(model)
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense_logits = model(ids).logits
        dense_tokens = model.generate(ids[:1], max_new_tokens=8, do_sample=False, pad_token_id=0)
    layers = ps.sparsify(model)
    assert len(layers) == 14 and all(layer.backend.name == "cpu" for layer in layers.values())
    assert not any(isinstance(m, torch.nn.Linear) and "layers" in name
                   for name, m in model.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense_logits, rtol=1e-4, atol=1e-4)
        tokens = model.generate(ids[:1], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, dense_tokens)
    assert ps.densify(model) == 14
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense_logits, rtol=1e-5, atol=1e-5)


def test_sparsify_refuses_a_dense_layer_and_changes_nothing(model):
    model = pruned(model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.fill_(0.5)
    with pytest.raises(ProxSparseError, match=r"model\.layers\.1\.mlp\.up_proj is not 2:4"):
        ps.sparsify(model, backend="reference")
    assert not ps.runtime.packed_layers(model)


# --- packed checkpoints ---

@pytest.fixture
def pruned_dir(tmp_path, model_dir, capsys):
    from proxsparse.cli import main

    out = tmp_path / "pruned"
    assert main(["prune", "--model", model_dir, "--method", "magnitude", "--out", str(out),
                 "--quiet"]) == 0
    capsys.readouterr()
    return out


@needs_kernel
@pytest.mark.parametrize("values_dtype", ["float32", "bfloat16"])
def test_pack_then_load_gives_the_same_outputs(tmp_path, pruned_dir, capsys, values_dtype):
    from proxsparse.cli import main

    out = tmp_path / "packed"
    assert main(["pack", str(pruned_dir), str(out), "--values-dtype", values_dtype,
                 "--quiet"]) == 0
    assert "packed 14 2:4 layers" in capsys.readouterr().out
    assert (out / PACKED_FILE).is_file() and not (out / "model.safetensors").exists()
    meta = json.loads((out / "proxsparse.json").read_text())
    assert meta["packed"]["values_dtype"] == values_dtype and meta["method"] == "magnitude"

    dense, tokenizer = ps.load_model(str(pruned_dir))
    packed, _ = ps.load_model(str(out))
    assert len(ps.runtime.packed_layers(packed)) == 14
    if values_dtype == "bfloat16":
        for name in ps.runtime.packed_layers(packed):
            weight = dense.get_submodule(name).weight
            with torch.no_grad():
                weight.copy_(weight.to(torch.bfloat16).float())
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    on_disk = (out / PACKED_FILE).stat().st_size
    assert on_disk < (pruned_dir / "model.safetensors").stat().st_size


def test_a_corrupt_packed_checkpoint_is_refused(tmp_path, pruned_dir, capsys):
    from proxsparse.cli import main

    out = tmp_path / "packed"
    assert main(["pack", str(pruned_dir), str(out), "--quiet"]) == 0
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / PACKED_FILE)
    name = "model.layers.0.mlp.up_proj.packed_values"
    tensors[name] = tensors[name][:, :8].contiguous()
    save_file(tensors, out / PACKED_FILE)
    with pytest.raises(ProxSparseError, match="does not match its recorded shape"):
        load_packed(out)
    (out / PACKED_FILE).write_bytes(b"not safetensors")
    code = main(["generate", str(out), "--prompt", "hi", "--quiet"])
    assert code == 2 and "not a readable packed checkpoint" in capsys.readouterr().err


def test_plain_transformers_refuses_a_packed_checkpoint(tmp_path, pruned_dir):
    from transformers import AutoModelForCausalLM

    from proxsparse.cli import main

    out = tmp_path / "packed"
    assert main(["pack", str(pruned_dir), str(out), "--quiet"]) == 0
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(out)


def test_pack_refuses_a_dense_model(tmp_path, model_dir, capsys):
    from proxsparse.cli import main

    code = main(["pack", model_dir, str(tmp_path / "packed"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not 2:4" in err and err.count("\n") == 1
    assert not (tmp_path / "packed").exists()


# --- generate and speed ---

@needs_kernel
def test_generate_runs_packed_and_dense_alike(tmp_path, pruned_dir, capsys):
    from proxsparse.cli import main

    out = tmp_path / "packed"
    assert main(["pack", str(pruned_dir), str(out), "--quiet"]) == 0
    capsys.readouterr()
    texts = []
    for model in (pruned_dir, out):
        assert main(["generate", str(model), "--prompt", "The quick", "--max-new-tokens", "6",
                     "--quiet"]) == 0
        captured = capsys.readouterr()
        assert "tokens/s" in captured.err
        texts.append(captured.out)
    assert texts[0] == texts[1]


@needs_kernel
def test_speed_reports_both_forms(pruned_dir, capsys):
    from proxsparse.cli import main

    assert main(["speed", str(pruned_dir), "--new-tokens", "4", "--prefill-tokens", "20",
                 "--repeats", "1", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["same_tokens"] is True and result["max_relative_logit_difference"] < 1e-4
    assert result["packed_layers"] == 14 and result["backend"] == "cpu"
    assert result["dense"]["decode_tokens_per_s"] > 0 and result["packed"]["model_bytes"] > 0
    assert result["target_bytes_ratio"] == pytest.approx(2.125 / 4, rel=0.05)


def test_verify_checks_a_packed_checkpoint(tmp_path, pruned_dir, model_dir, capsys):
    from proxsparse.cli import main

    for source, name in ((pruned_dir, "packed"), (model_dir, "dense-packed")):
        out = tmp_path / name
        nm_flag = [] if source == pruned_dir else ["--nm", "2:4"]
        if source == model_dir:  # a plain checkpoint made N:M by hand, without metadata
            source = tmp_path / "by-hand"
            model, tokenizer = ps.load_model(model_dir)
            ps.prune(model, ps.config_for("magnitude"), None, progress=False)
            model.save_pretrained(source)
            tokenizer.save_pretrained(source)
        assert main(["pack", str(source), str(out), *nm_flag, "--quiet"]) == 0
        capsys.readouterr()
        assert main(["verify", str(out), "--quiet"]) == 0
        assert "14/14 layers valid 2:4" in capsys.readouterr().out
