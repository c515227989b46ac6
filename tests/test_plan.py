"""`proxsparse plan`: the predicted peak memory of ProxSparse learning, from a config alone."""

import json

import pytest
import torch
from transformers import LlamaConfig

from proxsparse import ProxSparseConfig
from proxsparse.cli import main, shipped_configs
from proxsparse.learning.memory import CPU_RUNTIME, GB, devices_needed, plan_proxsparse

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320, tie_word_embeddings=False)


def test_plan_of_a_tiny_config_matches_the_hand_count():
    """hidden 64, MLP 128, 2 blocks, kv width 32, vocab 320, float32 in place on the CPU."""
    plan = plan_proxsparse(LlamaConfig(**TINY), model_dtype=torch.float32, device="cpu",
                           seqlen=16)
    # per block: q, o 64·64; k, v 32·64; gate, up 128·64; down 64·128
    targets = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)
    total = targets + 2 * 320 * 64 + 2 * 2 * 64 + 64  # embeddings, lm_head, norms
    assert (plan.target_params, plan.total_params) == (targets, total)
    assert plan.parts["weights"] == 4 * total
    assert plan.parts["w0"] == plan.parts["gradients"] == 4 * targets
    assert plan.parts["optimizer"] == 8 * targets
    per_block = 4 * (4 * 64 + 2 * 32 + 4 * 128) + 8 * 64
    logits = 16 * (4 * 320 + 4 * 64 / 2) + 16 * 320 * (4 + 4)
    assert plan.parts["activations"] == 16 * 2 * per_block + logits
    assert plan.parts["workspace"] == 4 * (128 * 64) * 4  # the λ2 term of the largest layer
    # backward starts with every activation and no gradient, ends with every gradient
    assert plan.parts["runtime"] == CPU_RUNTIME
    assert plan.peak == 4 * total + 12 * targets + CPU_RUNTIME + max(
        plan.parts["activations"], 4 * targets + plan.parts["workspace"])


def test_memory_lean_defaults_on_an_accelerator():
    """bfloat16, W0 in host memory, gradient checkpointing: 8 bytes per target parameter on
    the device; two processes halve the sharded state."""
    config = LlamaConfig(**TINY)
    one = plan_proxsparse(config, device="cuda", seqlen=16)
    assert one.parts["w0"] == 0 and one.notes
    assert one.bytes_per_target_param() == pytest.approx(
        8 + 2 * (one.total_params - one.target_params) / one.target_params)
    two = plan_proxsparse(config, device="cuda", processes=2, seqlen=16)
    assert two.parts["optimizer"] == one.parts["optimizer"] / 2
    assert two.parts["gradients"] == one.parts["gradients"] / 2
    off = plan_proxsparse(config, ProxSparseConfig(gradient_checkpointing="off"), device="cuda",
                          seqlen=16)
    assert off.parts["activations"] > one.parts["activations"]


def test_devices_needed_doubles_until_the_plan_fits():
    config = LlamaConfig(**TINY)

    def plan_for(processes):
        return plan_proxsparse(config, device="cuda", processes=processes, seqlen=16)

    one = plan_for(1).peak
    assert devices_needed(plan_for, one) == 1
    assert devices_needed(plan_for, one * 0.7) in (2, 4)
    assert devices_needed(plan_for, 1.0) is None


@pytest.mark.parametrize("name, fits", [("llama-2-7b", True), ("llama-3.1-8b", True),
                                        ("qwen2.5-14b", False)])
def test_shipped_configs_and_their_verdict_on_one_80_gb_gpu(name, fits, capsys):
    assert name in shipped_configs()
    assert main(["plan", "--model", name, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] is fits
    assert report["devices_needed"] == (1 if fits else 2)
    assert report["peak_gb"] * GB > report["target_params"] * 8


def test_plan_reads_a_checkpoint_directory_and_refuses_a_bad_option(model_dir, capsys):
    assert main(["plan", "--model", model_dir, "--device", "cpu", "--dtype", "float32",
                 "--seqlen", "32"]) == 0
    out = capsys.readouterr().out
    assert "predicted peak per device" in out and "fits in 80 GB" in out
    assert main(["plan", "--model", model_dir, "--learn-dtype", "int8"]) == 2
    assert "--learn-dtype" in capsys.readouterr().err
