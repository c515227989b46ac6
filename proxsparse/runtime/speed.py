"""Dense against fast, side by side in one process: decode and prefill speed, weight bytes,
and whether the fast model produces the dense model's tokens. The fast forms are packed N:M
layers and activation-skipping MLPs (either or both); "packed" names the fast form."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .module import packed_layers, set_module


@dataclass
class Speed:
    label: str
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    target_weight_bytes: int
    model_bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each shared tensor counted once."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


class LayerSwap:
    """Both forms of every fast module (packed layer, activation-skipping MLP), to switch a
    model between dense and fast."""

    def __init__(self, model: nn.Module) -> None:
        from .skip_mlp import SkippingMLP

        self.model = model
        self.skipping = {name: m for name, m in model.named_modules()
                         if isinstance(m, SkippingMLP)}
        self.packed_layers = {name: m for name, m in packed_layers(model).items()
                              if not any(name.startswith(f"{mlp}.") for mlp in self.skipping)}
        self.packed = {**self.packed_layers, **self.skipping}
        self.dense = {name: m.to_linear() for name, m in self.packed_layers.items()}
        self.dense.update({name: m.to_dense() for name, m in self.skipping.items()})

    def use(self, form: str) -> None:
        for name, layer in (self.packed if form == "packed" else self.dense).items():
            set_module(self.model, name, layer)

    def target_bytes(self, form: str) -> int:
        if form == "packed":
            return sum(layer.weight_nbytes for layer in self.packed.values())
        return sum(model_bytes(m) for m in self.dense.values())


@torch.no_grad()
def _generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, **extra):
    return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0, **extra)


@torch.no_grad()
def decode_time(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds per generated token after the first (greedy, KV cache): the time of
    ``new_tokens`` minus that of one, so the prompt's prefill is left out."""
    start = time.perf_counter()
    _generate(model, prompt, 1)
    one = time.perf_counter() - start
    start = time.perf_counter()
    _generate(model, prompt, new_tokens)
    return (time.perf_counter() - start - one) / max(1, new_tokens - 1)


@torch.no_grad()
def prefill_time(model: nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(ids, use_cache=True)
    return time.perf_counter() - start


def compare(model: nn.Module, prompt: torch.Tensor, prefill_ids: torch.Tensor,
            new_tokens: int = 128, repeats: int = 3, progress=None) -> dict:
    """Measure ``model`` (which holds packed layers) packed and dense, alternating the two in
    every round (so both see the same machine state); medians over ``repeats`` rounds."""
    swap = LayerSwap(model)
    if not swap.packed:
        raise ValueError("the model has no packed layer nor activation-skipping MLP: sparsify "
                         "it (or skip_activation_zeros) first")
    times = {form: {"decode": [], "prefill": []} for form in ("dense", "packed")}
    outputs = {}
    for form in ("dense", "packed"):  # warm-up, and the tokens and logits to compare
        swap.use(form)
        outputs[form] = _generate(model, prompt, new_tokens, output_logits=True,
                                  return_dict_in_generate=True)
        prefill_time(model, prefill_ids)
    for _ in range(repeats):
        for form in ("dense", "packed"):
            swap.use(form)
            times[form]["decode"].append(decode_time(model, prompt, new_tokens))
            prefill_time(model, prefill_ids)  # warm: the decode runs before left other caches
            times[form]["prefill"].append(prefill_time(model, prefill_ids))
            if progress is not None:
                progress()
    swap.use("packed")
    rows = {}
    for form in ("dense", "packed"):
        decode = statistics.median(times[form]["decode"])
        prefill = statistics.median(times[form]["prefill"])
        swap.use(form)
        rows[form] = Speed(form, 1 / decode, prefill_ids.numel() / prefill,
                           swap.target_bytes(form), model_bytes(model))
    swap.use("packed")
    dense, packed = outputs["dense"], outputs["packed"]
    same = torch.equal(dense.sequences, packed.sequences)
    steps = min(len(dense.logits), len(packed.logits))
    relative = max(
        float((a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-30))
        for a, b in zip(dense.logits[:steps], packed.logits[:steps], strict=True))
    return {
        "dense": rows["dense"].as_dict(),
        "packed": rows["packed"].as_dict(),
        "decode_speedup": rows["packed"].decode_tokens_per_s / rows["dense"].decode_tokens_per_s,
        "prefill_speedup": (rows["packed"].prefill_tokens_per_s
                            / rows["dense"].prefill_tokens_per_s),
        "target_bytes_ratio": rows["packed"].target_weight_bytes
        / rows["dense"].target_weight_bytes,
        "same_tokens": same,
        "max_relative_logit_difference": relative,
        "new_tokens": new_tokens,
        "prefill_tokens": prefill_ids.numel(),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "packed_layers": len(swap.packed_layers),
        "skipping_mlps": len(swap.skipping),
        "backend": (next(iter(swap.packed_layers.values())).backend.name
                    if swap.packed_layers else "none"),
    }


