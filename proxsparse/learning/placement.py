"""Where the learned weights live while a method learns, and where the pretrained ones stay.

Two placements behind one interface:

- in place: the method learns the model's own weights, on the model's device, in its dtype;
  the pretrained values it needs are copied once (to ``w0_device``) and written back at the end.
- a learning copy: the model stays as it was, in host memory, and serves as the pretrained
  weights; the method learns a copy on the learning device, in the learning dtype, sharded by
  rows over the processes with FSDP2 (``fully_shard``) when there are several. The copy is
  built empty (meta device) and filled shard by shard, so no process ever holds a second full
  model on the device.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ProxSparseError
from ..models import Target, decoder_blocks
from .distributed import World, local, row_shard


def accelerator(device: torch.device) -> bool:
    return device.type not in ("cpu", "meta")


def learning_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on accelerators, the model's own dtype on the CPU."""
    if name == "auto":
        return torch.bfloat16 if accelerator(device) else model_dtype
    return getattr(torch, name)


class Placement:
    """The model a method's steps run (``model``), its targets there, and the pretrained
    weights, on every rank only this rank's rows of them."""

    def __init__(self, original: nn.Module, targets: list[Target], world: World,
                 dtype: str = "auto", w0_device: str = "") -> None:
        self.original, self.world = original, world
        model_device = targets[0].module.weight.device
        self.device = world.device or model_device
        model_dtype = targets[0].module.weight.dtype
        self.dtype = learning_dtype(dtype, model_dtype, self.device)
        self.in_place = (not world.sharded and self.device == model_device
                         and self.dtype == model_dtype)
        if self.in_place:
            self.model, self.targets = original, targets
            default_w0 = "cpu" if accelerator(self.device) else ""
            self.w0_device = torch.device(w0_device or default_w0 or self.device)
        else:
            self.model = _learning_copy(original, self.dtype, self.device, world)
            modules = dict(self.model.named_modules())
            self.targets = [Target(t.name, modules[t.name], t.block) for t in targets]
            self.w0_device = model_device
        self._requires_grad = {p: p.requires_grad for p in self.model.parameters()}
        self._kept: tuple[list[nn.Parameter], list[torch.Tensor]] = ([], [])

    def __enter__(self) -> Placement:
        return self

    def __exit__(self, *exc) -> None:
        """However learning ends, the model is left as it was before it."""
        if self.model is not None:
            self.restore()

    def names(self, params: list[nn.Parameter]) -> list[str]:
        by_id = {id(p): name for name, p in self.model.named_parameters()}
        return [by_id[id(p)] for p in params]

    def pretrained(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """W0 of each of ``params`` (parameters of ``model``), this rank's rows: a copy on
        ``w0_device`` in place, a view of the untouched original otherwise."""
        if self.in_place:
            kept = [p.detach().to(self.w0_device, copy=True) for p in params]
        else:
            originals = dict(self.original.named_parameters())
            kept = [row_shard(originals[name].detach(), self.world)
                    for name in self.names(params)]
        self._kept = (params, kept)
        return kept

    def original_weight(self, target: Target) -> torch.Tensor:
        """The full pretrained weight of a target (the live one in place, before learning)."""
        return self.original.get_submodule(target.name).weight.detach()

    def train_only(self, params: list[nn.Parameter]) -> None:
        """Let exactly ``params`` learn."""
        chosen = {id(p) for p in params}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in chosen)

    def restore(self) -> None:
        """Undo learning: in place, the pretrained values go back; a copy is dropped."""
        for param, flag in self._requires_grad.items():
            param.requires_grad_(flag)
        if self.in_place:
            with torch.no_grad():
                for param, w0 in zip(*self._kept, strict=True):
                    param.copy_(w0)
        self.model, self.targets, self._kept = None, [], ([], [])


def _learning_copy(original: nn.Module, dtype: torch.dtype, device: torch.device,
                   world: World) -> nn.Module:
    """An empty copy of ``original`` (meta device, no memory), sharded with FSDP2 when there
    are several processes, then allocated on ``device`` and filled from the original."""
    build = getattr(type(original), "_from_config", None)
    config = getattr(original, "config", None)
    if build is None or config is None:
        raise ProxSparseError(f"learning on another device or dtype, or with several "
                              f"processes, needs a Hugging Face model; {type(original).__name__}"
                              " is not one: move and cast the model first")
    with torch.device("meta"):
        clone = build(config, dtype=dtype)
    clone.to(dtype)
    if world.sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world.size,))
        for block in decoder_blocks(clone):
            fully_shard(block, mesh=mesh)
        fully_shard(clone, mesh=mesh)
    clone.to_empty(device=device)
    originals = dict(original.named_parameters())
    with torch.no_grad():
        for name, param in clone.named_parameters():
            mine, source = local(param), row_shard(originals[name].detach(), world)
            if mine.shape != source.shape:
                raise RuntimeError(f"internal error: shard of {name} is {tuple(mine.shape)}, "
                                   f"expected {tuple(source.shape)}")
            mine.copy_(source)
        buffers = dict(original.named_buffers())
        for name, buffer in clone.named_buffers():
            buffer.copy_(buffers[name])
    clone.train(original.training)
    return clone
