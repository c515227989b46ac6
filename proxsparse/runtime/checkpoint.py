"""Packed checkpoints: the target weights stored packed in safetensors beside the rest.

A packed directory holds the model's ``config.json``, its tokenizer files, ``proxsparse.json``
(with a ``packed`` section) and ``packed.safetensors``: every dense tensor of the model except
the packed layers' weights, and for each packed layer ``<name>.packed_values`` and
``<name>.packed_indices`` (the canonical format of ``format.py``). There is deliberately no
``model.safetensors``: plain transformers refuses the directory instead of filling the missing
weights with random values. ``load_packed`` (and ``proxsparse.load_model``) load it straight
into packed layers: the dense target weights never exist in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ProxSparseError
from ..nm import NM
from .format import PackedWeight, index_bits
from .module import PackedLinear, packed_layers

PACKED_FILE = "packed.safetensors"
FORMAT = "proxsparse-packed-v1"
VALUES, INDICES = ".packed_values", ".packed_indices"


def is_packed_checkpoint(path: str | Path) -> bool:
    return (Path(path) / PACKED_FILE).is_file()


def write_packed(model: nn.Module, directory: Path) -> dict:
    """Write ``packed.safetensors`` for a sparsified model into ``directory`` (the caller
    stages the directory and adds config, tokenizer and metadata). Returns the ``packed``
    metadata section."""
    layers = packed_layers(model)
    if not layers:
        raise ProxSparseError("the model has no packed layer: call sparsify(model) first")
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner in layers:
            continue  # the backend's own buffers; the canonical form is stored below
        tensors[name] = tensor
    for name, layer in layers.items():
        packed = layer.packed()
        tensors[name + VALUES] = packed.values
        tensors[name + INDICES] = packed.indices
        if layer.bias is not None:
            tensors[name + ".bias"] = layer.bias.detach()
    tensors = {k: v.detach().cpu().contiguous() for k, v in _untied(tensors).items()}
    nms = {str(layer.nm) for layer in layers.values()}
    section = {
        "format": FORMAT,
        "nm": nms.pop() if len(nms) == 1 else None,
        "layers": {name: {"shape": [layer.out_features, layer.in_features], "nm": str(layer.nm)}
                   for name, layer in layers.items()},
        "values_dtype": str(next(iter(layers.values())).values_dtype).removeprefix("torch."),
    }
    save_file(dict(sorted(tensors.items())), str(directory / PACKED_FILE),
              metadata={"format": FORMAT})
    return section


def _untied(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied embeddings): keep the first name."""
    seen: dict[tuple, str] = {}
    kept = {}
    for name, tensor in tensors.items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype) if tensor.numel() else (name,)
        if key in seen:
            continue
        seen[key] = name
        kept[name] = tensor
    return kept


def load_packed(directory: str | Path, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", backend: str = "auto") -> nn.Module:
    """Build the model of a packed checkpoint with its packed layers (no dense target weight
    is ever materialised). ``dtype`` is that of the dense parts; packed values keep the
    precision they were stored in."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    metadata_path = directory / "proxsparse.json"
    try:
        section = json.loads(metadata_path.read_text())["packed"]
        layers = section["layers"]
        tensors = load_file(str(directory / PACKED_FILE))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise ProxSparseError(f"{directory} is not a readable packed checkpoint "
                              f"({type(err).__name__}: {err}); re-create it with "
                              "proxsparse pack") from err
    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    for name, spec in layers.items():
        try:
            values, indices = tensors.pop(name + VALUES), tensors.pop(name + INDICES)
        except KeyError as err:
            raise ProxSparseError(f"{directory}/{PACKED_FILE} lacks the packed weight of {name}: "
                                  "the file is incomplete; re-create it") from err
        packed = _checked(PackedWeight(values.to(device), indices.to(device), spec["shape"][1],
                                       NM.parse(spec["nm"])), spec["shape"], name)
        bias = tensors.pop(name + ".bias", None)
        layer = PackedLinear(packed, None if bias is None else bias.to(device, dtype), backend)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    missing = model.load_state_dict(
        {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()},
        strict=False, assign=True).missing_keys
    model.tie_weights()
    unset = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    unset += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if unset:
        raise ProxSparseError(f"{directory}/{PACKED_FILE} lacks {len(unset)} tensors of the model "
                              f"(e.g. {unset[0]}; missing {missing[:3]}): re-create it")
    return model.eval()


def _checked(packed: PackedWeight, shape: list[int], name: str) -> PackedWeight:
    """Refuse packed tensors whose sizes disagree with the recorded layer shape."""
    out, in_features = shape
    per_word = 32 // index_bits(packed.nm.m)
    ok = (packed.values.dim() == 2 and packed.indices.dim() == 2
          and packed.indices.dtype == torch.int32
          and packed.values.shape[0] == out == packed.indices.shape[0]
          and packed.values.shape[1] == packed.indices.shape[1] * per_word
          and packed.values.shape[1] * packed.nm.m >= in_features * packed.nm.n
          and in_features % packed.nm.m == 0)
    if ok and packed.indices.numel():
        from .format import positions

        ok = int(positions(packed).max()) < packed.nm.m
    if not ok:
        raise ProxSparseError(f"packed weight of {name} does not match its recorded shape "
                              f"{tuple(shape)}: the checkpoint is corrupt; re-create it")
    return packed
