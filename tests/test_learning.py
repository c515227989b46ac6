"""The shared learning loop: batching, placement, and resume/interrupt for every learned method
(written once, run for each)."""

import json
import os
import signal

import pytest
import torch

from proxsparse import MaskProConfig, ProSparseConfig, ProxSparseConfig, prune
from proxsparse.errors import ProxSparseError
from proxsparse.learning import World, check_batching, rank_batches, step_windows
from proxsparse.methods.maskpro import MaskProLearning
from proxsparse.methods.prosparse import ProSparseLearning
from proxsparse.methods.proxsparse import ProxSparseLearning
from proxsparse.nm import NM, is_valid_nm, mask_is_exact
from proxsparse.runlog import CHECKPOINT_FILE, LOG_FILE
from tests.conftest import make_model

# Settings under which each method moves its mask within a few steps of the tiny model.
METHODS = {
    "proxsparse": (ProxSparseConfig, ProxSparseLearning,
                   dict(lr=1e-3, lambda1=5.0, lambda1_scaling="absolute")),
    "maskpro": (MaskProConfig, MaskProLearning, dict(lr=500.0, logit_scale=2.0)),
    # the target-sparsity threshold is set at step 2: a resumed run must learn with it too
    "prosparse": (ProSparseConfig, ProSparseLearning,
                  dict(lr=1e-3, stages="0.25:0,1:0.05", target_sparsity=0.8, adapt=0.75)),
}
MASK_METHODS = ["proxsparse", "maskpro"]


def outcome(run) -> tuple[dict, dict]:
    """What a learning run produced: its masks and the model's weights."""
    model, result = run
    return result.masks, {k: v.clone() for k, v in model.state_dict().items()}


def same_outcome(a: tuple[dict, dict], b: tuple[dict, dict]) -> bool:
    return same(a[0], b[0]) and same(a[1], b[1])


def learn(tokenizer, calib, method, **settings):
    config_class, _, defaults = METHODS[method]
    model = make_model(len(tokenizer))
    config = config_class(**{"steps": 8, **defaults, **settings})
    return model, prune(model, config, calib, progress=False)


def crash_in_step(monkeypatch, learning_class, crash_at: int) -> None:
    """Make ``learning_class``'s step raise (as a killed process stops) at step ``crash_at``;
    undo with ``monkeypatch.undo()``."""
    real_step = learning_class.step

    def step_or_crash(self, step, batches):
        if step == crash_at:
            raise RuntimeError("killed")
        return real_step(self, step, batches)

    monkeypatch.setattr(learning_class, "step", step_or_crash)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_windows_are_a_seeded_shuffle_per_epoch():
    epoch = torch.cat([step_windows(s, 8, 2, seed=0) for s in range(4)])
    assert sorted(epoch.tolist()) == list(range(8))  # every window once per epoch
    assert torch.equal(epoch, torch.cat([step_windows(s, 8, 2, seed=0) for s in range(4)]))
    assert not torch.equal(epoch, torch.cat([step_windows(s, 8, 2, seed=0) for s in range(4, 8)]))


def test_each_rank_takes_an_equal_share_in_micro_batches():
    windows = torch.arange(8)
    shares = [rank_batches(windows, World(rank=r, size=2), micro_batch_size=2) for r in range(2)]
    assert [[b.tolist() for b in s] for s in shares] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    assert [b.tolist() for b in rank_batches(windows, World(), 0)] == [list(range(8))]


@pytest.mark.parametrize("batch, world, micro, problem", [
    (9, 1, 0, "exceeds the 8"), (3, 2, 0, "does not split evenly"), (4, 2, 3, "does not divide")])
def test_batches_that_cannot_be_shared_out_are_refused(batch, world, micro, problem):
    with pytest.raises(ProxSparseError, match=problem):
        check_batching(batch, 8, World(rank=0, size=world), micro)


@pytest.mark.parametrize("method", METHODS)
def test_interrupted_run_resumes_to_the_same_mask(tokenizer, calib, tmp_path, monkeypatch,
                                                  method):
    """Ctrl-C in step 3 stops at the step's end with a checkpoint; --resume then finishes with
    the mask of a run never interrupted, and a log of every step."""
    settings = dict(checkpoint_every=100, log_every=3)
    reference = outcome(learn(tokenizer, calib, method, **settings))
    learning_class = METHODS[method][1]
    real_step = learning_class.step

    def step_then_ctrl_c(self, step, batches):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, step, batches)

    run_dir = str(tmp_path / "run")
    monkeypatch.setattr(learning_class, "step", step_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        learn(tokenizer, calib, method, run_dir=run_dir, **settings)
    monkeypatch.setattr(learning_class, "step", real_step)
    assert torch.load(f"{run_dir}/{CHECKPOINT_FILE}", weights_only=True)["step"] == 4

    resumed = outcome(learn(tokenizer, calib, method, run_dir=run_dir, resume=True, **settings))
    assert same_outcome(reference, resumed)
    steps = [json.loads(line)["step"] for line in open(f"{run_dir}/{LOG_FILE}").read().splitlines()]
    assert steps == list(range(8))
    with pytest.raises(ProxSparseError, match="settings differ"):
        learn(tokenizer, calib, method, run_dir=run_dir, resume=True, **settings, lr=0.5)


@pytest.mark.parametrize("method", METHODS)
def test_a_crash_after_a_checkpoint_resumes_to_the_same_mask(tokenizer, calib, tmp_path,
                                                             monkeypatch, method):
    """A run killed mid-step (here: an error in step 5) resumes from its last checkpoint
    (step 4) to the uninterrupted run's mask; the model is left as it was before learning."""
    settings = dict(checkpoint_every=2)
    reference = outcome(learn(tokenizer, calib, method, **settings))
    run_dir = str(tmp_path / "run")
    crash_in_step(monkeypatch, METHODS[method][1], 5)
    model = make_model(len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config_class, _, defaults = METHODS[method]
    with pytest.raises(RuntimeError, match="killed"):
        prune(model, config_class(steps=8, run_dir=run_dir, **defaults, **settings), calib,
              progress=False)
    if METHODS[method][0] is not ProSparseConfig:  # it changes the model by design
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    monkeypatch.undo()
    resumed = outcome(learn(tokenizer, calib, method, run_dir=run_dir, resume=True, **settings))
    assert same_outcome(reference, resumed)


@pytest.mark.parametrize("method", MASK_METHODS)
def test_learning_a_bfloat16_copy_keeps_the_float32_model_as_the_pretrained_weights(
        tokenizer, calib, method):
    model = make_model(len(tokenizer))
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    config_class, _, defaults = METHODS[method]
    result = prune(model, config_class(steps=4, learn_dtype="bfloat16", **defaults), calib,
                   progress=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for name, mask in result.masks.items():
        assert mask_is_exact(mask, NM(2, 4))
        weight = model.get_submodule(name).weight
        assert is_valid_nm(weight, NM(2, 4))
        assert torch.equal(weight, pretrained[name + ".weight"] * mask)
    float32 = learn(tokenizer, calib, method, steps=4)[1].masks
    assert not same(float32, result.masks)  # it learned in bfloat16, not float32


def test_micro_batches_sum_to_the_batch_gradient(tokenizer, calib):
    """Two micro-batches of one window learn what one batch of two does, to float rounding:
    the masks agree on nearly every group."""
    whole = learn(tokenizer, calib, "proxsparse", batch_size=2, steps=4)[1].masks
    micro = learn(tokenizer, calib, "proxsparse", batch_size=2, steps=4,
                  micro_batch_size=1)[1].masks
    differing = sum(int((whole[k] != micro[k]).sum()) for k in whole)
    assert differing <= 0.01 * sum(m.numel() for m in whole.values())


def test_8bit_optimizer_states_learn_and_resume_exactly(tokenizer, calib, tmp_path, monkeypatch):
    """torchao's AdamW8bit: a quarter of float32 states' bytes; a run resumed from its
    checkpoint (states stored dequantised, quantised again on load) ends on the same mask."""
    pytest.importorskip("torchao")
    settings = dict(optimizer_states="8bit", checkpoint_every=2, steps=6)
    model, result = learn(tokenizer, calib, "proxsparse", **settings)
    assert all(mask_is_exact(m, NM(2, 4)) for m in result.masks.values())
    float32 = learn(tokenizer, calib, "proxsparse", steps=6)[1].masks
    assert not same(float32, result.masks)

    run_dir = str(tmp_path / "run")
    crash_in_step(monkeypatch, ProxSparseLearning, 3)
    with pytest.raises(RuntimeError, match="killed"):
        learn(tokenizer, calib, "proxsparse", run_dir=run_dir, **settings)
    monkeypatch.undo()
    resumed = learn(tokenizer, calib, "proxsparse", run_dir=run_dir, resume=True,
                    **settings)[1].masks
    assert same(result.masks, resumed)


def test_clipping_scales_to_the_float64_global_norm():
    from proxsparse.learning.distributed import clip_grad_norm_

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 16)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    expected = torch.cat([p.grad.double().flatten() for p in params]).norm()
    before = [p.grad.clone() for p in params]
    norm = clip_grad_norm_(params, 1.0, World())
    torch.testing.assert_close(norm, expected)
    after = torch.cat([p.grad.double().flatten() for p in params]).norm()
    assert float(after) == pytest.approx(1.0, rel=1e-5)
    assert clip_grad_norm_(params, 10.0, World()) < 10  # under the limit: left as it is
    assert all(torch.allclose(p.grad * float(norm), b) for p, b in zip(params, before, strict=True))
