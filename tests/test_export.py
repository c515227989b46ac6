import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from proxsparse import NM, apply_masks, load_masks, perplexity, prune, save, verify
from proxsparse.errors import ProxSparseError
from proxsparse.export import MASK_FILE, METADATA_FILE, read_metadata, save_masks
from proxsparse.methods import config_for
from proxsparse.nm import topn_mask
from tests.conftest import damage, make_model


def pruned(tokenizer, calib, method="sparsegpt", nm="2:4"):
    model = make_model(len(tokenizer))
    return model, prune(model, config_for(method, nm=nm), calib, progress=False)


def test_saved_checkpoint_reloads_with_plain_transformers(tmp_path, tokenizer, calib):
    model, result = pruned(tokenizer, calib)
    out = save(model, tokenizer, tmp_path / "out", result.masks, NM(2, 4), {"method": "x"})
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    windows = calib[:4]
    assert perplexity(reloaded, windows, progress=False) == perplexity(model, windows,
                                                                       progress=False)
    checks = verify(reloaded, list(result.masks), NM(2, 4), load_masks(out)[0])
    assert all(c.valid for c in checks) and len(checks) == 14
    assert json.loads((out / METADATA_FILE).read_text()) == {"method": "x"}


@pytest.mark.parametrize("nm", ["2:4", "1:4", "4:8"])
def test_mask_file_applied_to_the_dense_model_gives_the_pruned_model(tmp_path, tokenizer, calib,
                                                                     nm):
    model, result = pruned(tokenizer, calib, "wanda", nm)
    out = save(model, tokenizer, tmp_path / "out", result.masks, NM.parse(nm), {})
    masks, loaded_nm = load_masks(out)
    assert loaded_nm == NM.parse(nm)
    dense = make_model(len(tokenizer))
    apply_masks(dense, masks)
    for (name, a), (_, b) in zip(dense.state_dict().items(), model.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_mask_file_is_compact(tmp_path, tokenizer, calib):
    model, result = pruned(tokenizer, calib, "magnitude")
    out = save(model, tokenizer, tmp_path / "out", result.masks, NM(2, 4), {})
    groups = sum(m.numel() for m in result.masks.values()) // 4
    from safetensors.torch import load_file

    payload_bits = 8 * sum(t.numel() for t in load_file(out / MASK_FILE).values())
    assert payload_bits <= 3 * groups + 8 * len(result.masks)


def test_failed_save_leaves_nothing(tmp_path, tokenizer, calib, monkeypatch):
    model, result = pruned(tokenizer, calib, "magnitude")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("proxsparse.export.save_masks", broken)
    with pytest.raises(OSError):
        save(model, tokenizer, tmp_path / "out", result.masks, NM(2, 4), {})
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path, tokenizer, calib):
    model, result = pruned(tokenizer, calib, "magnitude")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ProxSparseError, match="--overwrite"):
        save(model, tokenizer, tmp_path / "out", result.masks, NM(2, 4), {})
    with pytest.raises(ProxSparseError, match="not a proxsparse output"):  # it deletes
        save(model, tokenizer, tmp_path / "out", result.masks, NM(2, 4), {}, overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    save(model, tokenizer, tmp_path / "new", result.masks, NM(2, 4), {})
    (tmp_path / "new" / "stale.txt").write_text("from the earlier run")
    save(model, tokenizer, tmp_path / "new", result.masks, NM(2, 4), {}, overwrite=True)
    assert not (tmp_path / "new" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]


def test_verify_flags_a_dense_group(tokenizer, calib):
    model, result = pruned(tokenizer, calib, "magnitude")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, :4] = 1.0
    checks = {c.name: c for c in verify(model, list(result.masks), NM(2, 4))}
    assert not checks["model.layers.0.mlp.up_proj"].valid
    assert checks["model.layers.0.mlp.up_proj"].max_nonzeros == 4
    assert sum(not c.valid for c in checks.values()) == 1


def small_masks() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {name: topn_mask(torch.randn(8, 16), NM(2, 4)) for name in ("a.proj", "b.proj")}


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_damaged_mask_bytes_are_refused_or_harmless(data):
    masks = small_masks()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MASK_FILE
        save_masks(path, masks, NM(2, 4))
        damage(path, data)
        try:
            loaded, nm = load_masks(path)
        except ProxSparseError:
            return
        assert nm == NM(2, 4) and loaded.keys() == masks.keys()
        assert all(torch.equal(loaded[k], masks[k]) for k in masks)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_any_metadata_bytes_are_refused_or_read(raw):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / METADATA_FILE).write_bytes(raw)
        try:
            metadata = read_metadata(tmp)
        except ProxSparseError:
            return
        assert isinstance(metadata["nm"], str) and isinstance(metadata["targets"], list)


def test_copies_left_by_a_killed_save_are_removed(tmp_path, tokenizer, calib):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    for name in (f".out.partial-{dead}", f".out.old-{dead}", ".out.partial-1",
                 f".other.partial-{dead}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    model, result = pruned(tokenizer, calib, "magnitude")
    save(model, tokenizer, tmp_path / "out", result.masks, NM(2, 4), {})
    # pid 1 still runs; another output's copies are not this save's business
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".other.partial-" + dead, ".out.partial-1", "out"]


SAVE_IN_A_PROCESS = """
import sys, torch
from proxsparse.export import save_masks
from proxsparse.nm import NM, topn_mask
torch.manual_seed(0)
names = ["model.layers.1.mlp.up_proj", "b.proj", "a.proj", "lm_head"]
masks = {name: topn_mask(torch.randn(8, 16), NM(2, 4)) for name in names}
if sys.argv[2] == "reversed":  # the same masks, built in another order
    masks = dict(reversed(masks.items()))
for copy in range(4):
    save_masks(f"{sys.argv[1]}-{copy}.safetensors", masks, NM(2, 4))
"""


def test_mask_file_is_byte_identical_across_processes(tmp_path):
    import os
    import subprocess
    import sys

    from safetensors import safe_open
    from safetensors.torch import load_file

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "OMP_NUM_THREADS": "1"}
    for run, order in (("first", "built"), ("second", "reversed")):
        subprocess.run([sys.executable, "-c", SAVE_IN_A_PROCESS, str(tmp_path / run), order],
                       check=True, env=env)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 8
    raw = files[0].read_bytes()
    assert all(path.read_bytes() == raw for path in files), "mask files differ"
    # still a plain safetensors file, and still a checked mask file
    header_size = int.from_bytes(raw[:8], "little")
    assert header_size % 8 == 0 and raw[8:9] == b"{"
    with safe_open(str(files[0]), framework="pt") as handle:
        assert set(handle.metadata()) == {"nm", "shapes", "sha256"}
        assert sorted(handle.keys()) == ["a.proj", "b.proj", "lm_head",
                                         "model.layers.1.mlp.up_proj"]
    assert all(t.dtype == torch.uint8 for t in load_file(str(files[0])).values())
    masks, nm = load_masks(files[0])
    assert nm == NM(2, 4) and len(masks) == 4
    assert all(mask.shape == (8, 16) and mask.dtype == torch.bool for mask in masks.values())


def test_written_safetensors_round_trip_every_dtype(tmp_path):
    from safetensors.torch import load_file

    from proxsparse.export import write_safetensors

    tensors = {
        "f32": torch.randn(3, 5), "bf16": torch.randn(4).bfloat16(),
        "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(7), "bool": torch.tensor([True, False, True]),
        "u8": torch.arange(9, dtype=torch.uint8).view(3, 3), "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5), "strided": torch.randn(4, 6)[:, ::2],
    }
    write_safetensors(tmp_path / "t.safetensors", tensors, {"k": "v"})
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
