"""The processes a learning run spans: one, or several launched by ``torchrun``.

``World`` is the loop's only view of them: its rank, their count, the device this process
learns on, and the few collectives the methods need (sums, an "any rank" flag, full tensors of
sharded ones). With one process every collective is the identity, so the methods run the same
code either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ProxSparseError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device | None = None  # this process's learning device (None: the model's)

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, plots, checkpoints and writes the export."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.size > 1

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over all processes (in place; returned)."""
        if self.sharded:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any process (e.g. a Ctrl-C one rank saw)."""
        if not self.sharded:
            return flag
        value = torch.tensor([float(flag)], device=self.collective_device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier()

    @property
    def collective_device(self) -> torch.device:
        return self.device if self.device is not None else torch.device("cpu")


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current_world(device: str = "") -> World:
    """The world this process belongs to. Under ``torchrun`` (WORLD_SIZE > 1) it joins the
    process group once (nccl on CUDA, gloo on CPU); each rank learns on ``cuda:LOCAL_RANK``
    where CUDA is asked for or, with ``device=""``, available, else on the CPU."""
    if not launched_by_torchrun():
        return World(device=torch.device(device) if device else None)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    kind = torch.device(device).type if device else (
        "cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ProxSparseError("this process cannot see a CUDA device: launch torchrun on a "
                                  "machine with GPUs, or learn on the CPU (--learn-device cpu)")
        place = torch.device("cuda", local_rank)
        torch.cuda.set_device(place)
    elif kind == "cpu":
        place = torch.device("cpu")
    else:
        raise ProxSparseError(f"multi-process learning runs on cuda or cpu, not {kind!r}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    if dist.get_world_size() != size:
        raise ProxSparseError("the process group's size differs from WORLD_SIZE")
    return World(rank=rank, size=size, device=place)


def row_shard(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's rows of ``tensor``: FSDP2's split along dim 0 (a view, no copy)."""
    if not world.sharded:
        return tensor
    chunks = torch.chunk(tensor, world.size, dim=0)
    return chunks[world.rank] if world.rank < len(chunks) else tensor[:0]


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly sharded) tensor this process holds."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a (possibly sharded) tensor; a collective every rank must call."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (full-sized) placed as ``like`` is: sharded the same way if ``like`` is a
    sharded tensor, else as is. Every rank holds ``value``, so nothing is communicated."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return value
    return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh,
                             like.placements, src_data_rank=None)


def gather_to_main(tensor: torch.Tensor, world: World) -> torch.Tensor | None:
    """The whole of ``tensor`` in host memory on rank 0, None elsewhere (a collective: every
    rank calls it; the others drop their copy at once)."""
    whole = full(tensor).detach()
    return whole.cpu() if world.is_main else None


def gather_optimizer_state(optimizer: torch.optim.Optimizer, world: World) -> dict | None:
    """On rank 0, the optimizer's state dict with every sharded state gathered whole, in host
    memory (None on the other ranks; a collective); loads back into an optimizer of the same
    parameters, sharded in any way, with :func:`load_optimizer_state`."""
    from .optimizers import plain_state

    saved = optimizer.state_dict()
    state = {}
    for index, values in saved["state"].items():
        state[index] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                value = plain_state(full(value))
                value = _cpu(value) if world.is_main else None
            state[index][key] = value
    return {**saved, "state": state} if world.is_main else None


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a :func:`gather_optimizer_state` dict, sharding each state like its parameter."""
    from .optimizers import pop_quantised, restore_quantised

    saved = {**saved, "state": {i: dict(v) for i, v in saved["state"].items()}}
    quantised = pop_quantised(saved)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, values in saved["state"].items():
        param = params[int(index)]
        state[index] = {key: shard_like(value, param)
                        if isinstance(value, torch.Tensor) and value.dim() > 0 else value
                        for key, value in values.items()}
    optimizer.load_state_dict({**saved, "state": state})
    restore_quantised(optimizer, quantised)


def _cpu(value):
    return {k: v.cpu() for k, v in value.items()} if isinstance(value, dict) else value.cpu()


@torch.no_grad()
def clip_grad_norm_(params: list[torch.Tensor], max_norm: float, world: World) -> torch.Tensor:
    """Scale the gradients so that their global norm is at most ``max_norm``; returns the norm.

    The squares are summed in float64, per process over the rows it holds, then over the
    processes: the same norm, to float64 rounding, whichever way the rows are split, so the
    float32 scale (and so the learned mask) does not depend on the number of processes.
    (torch's clip_grad_norm_ sums float32 partial norms, whose last bits depend on the split.)
    """
    grads = [local(p.grad) for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for grad in grads:
        total += torch.linalg.vector_norm(grad, dtype=torch.float64).square()
    norm = world.all_sum(total).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0).float()
    for grad in grads:
        grad.mul_(scale.to(grad.device, grad.dtype))
    return norm
