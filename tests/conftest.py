"""Tiny randomly initialised Llama-style models and a small tokenizer, built in the tests."""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network; hub lookups fail at once

import pytest  # noqa: E402
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from proxsparse.data import builtin_text

torch.set_num_threads(2)


def make_tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([builtin_text()[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")


def make_model(vocab_size: int, intermediate_size: int = 128, seed: int = 0) -> LlamaForCausalLM:
    """Two decoder blocks, hidden 64; ``intermediate_size`` not a multiple of 4 gives a
    down_proj that N:M must skip."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=intermediate_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def model(tokenizer) -> LlamaForCausalLM:
    return make_model(len(tokenizer))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer) -> str:
    """A saved tiny checkpoint (with its tokenizer), as a user's local model directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def odd_model_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny checkpoint whose down_proj input (66) is not a multiple of 4."""
    path = tmp_path_factory.mktemp("tiny-llama-odd")
    make_model(len(tokenizer), intermediate_size=66).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def calib(tokenizer) -> torch.Tensor:
    from proxsparse.data import calibration_windows

    return calibration_windows(tokenizer, "builtin", num_windows=8, seqlen=32, seed=0)


def can_compile() -> bool:
    """torch.compile on the CPU builds C++: it needs a compiler and the Python headers."""
    compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    return bool(compiler) and (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()


class WritesAMarker:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a pickle can run."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def own_run_dir(path):
    """A run directory as a proxsparse run leaves it (with its marker file)."""
    from proxsparse.runlog import RunDir

    RunDir(path).save_checkpoint({"step": 1})
    return path


def write_custom_code_model(path, model_dir, marker) -> Path:
    """A copy of ``model_dir`` whose config names its own Python code (``auto_map``); importing
    that code writes ``marker``."""
    import json

    shutil.copytree(model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="evil-llama", auto_map={
        "AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (path / "config.json").write_text(json.dumps(config))
    (path / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                  "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                  "class EvilConfig(LlamaConfig):\n    model_type = 'evil-llama'\n"
                                  "class EvilModel(LlamaForCausalLM):\n"
                                  "    config_class = EvilConfig\n")
    return path


def damage(path: Path, data) -> None:
    """Truncate the file at ``path``, or flip one of its bits (drawn by hypothesis ``data``)."""
    from hypothesis import strategies as st

    raw = bytearray(path.read_bytes())
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    path.write_bytes(bytes(raw))
