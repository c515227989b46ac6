"""The one learning loop every learned method runs on.

A method (:class:`LearningMethod`) supplies its state, one step and its final masks. The loop
owns the rest: which windows each step (and each process) sees, train or eval mode and
gradient checkpointing, the progress bar, the log and its plot, checkpoints and ``--resume``,
and Ctrl-C, which stops at a step boundary with a checkpoint.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ProxSparseError
from ..runlog import DeferredInterrupt, RunDir
from .distributed import World

CHECKPOINT_FIELDS = {"step": int, "method": dict}


class LearningMethod(ABC):
    """One learned method, as the loop sees it."""

    name: ClassVar[str]
    backprop: ClassVar[bool]  # learns through autograd (train mode); else forward passes only

    @abstractmethod
    def setup(self, state: dict | None) -> None:
        """Build the method's state: afresh, or from a checkpoint's ``state``."""

    @abstractmethod
    def step(self, step: int, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """One learning step on this process's share of the step's windows (indices into the
        calibration set, one tensor per micro-batch). Returns the step's metrics as tensors
        (logged in batches: the loop never waits on them)."""

    @abstractmethod
    def state_dict(self) -> dict:
        """What a checkpoint keeps (tensors and plain values). Every rank calls it (it may
        gather sharded state); only rank 0's is saved, so the others may hold None in it."""

    @abstractmethod
    def finish(self) -> dict[str, torch.Tensor]:
        """The keep-mask of every target, full-sized, on every rank."""

    def postfix(self, latest: dict) -> dict[str, str]:
        """What the progress bar shows of the latest logged row."""
        return {}

    def title(self) -> str:
        """Title of the loss plot."""
        return self.name


def step_windows(step: int, count: int, batch_size: int, seed: int) -> torch.Tensor:
    """The calibration windows of ``step``: a seeded shuffle of all ``count`` windows per epoch,
    cut into batches (a last partial batch of an epoch is left out)."""
    epoch, index = divmod(step, count // batch_size)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch))
    return order[index * batch_size: (index + 1) * batch_size]


def rank_batches(windows: torch.Tensor, world: World, micro_batch_size: int) -> list[torch.Tensor]:
    """This process's share of a step's windows (contiguous, equal shares), in micro-batches
    of ``micro_batch_size`` (0: the whole share at once)."""
    share = len(windows) // world.size
    mine = windows[world.rank * share: (world.rank + 1) * share]
    return list(mine.split(micro_batch_size or share))


def lm_loss_backward(model: nn.Module, calib: torch.Tensor, batches: list[torch.Tensor],
                     device: torch.device) -> torch.Tensor:
    """Backpropagate the language-model loss of a step's windows (``batches``: indices into
    ``calib``, one tensor per micro-batch), each micro-batch weighted by its share of the
    windows, so the gradients sum to those of the mean; returns that mean loss (detached)."""
    share = sum(len(b) for b in batches)
    loss = torch.zeros((), device=device)
    for windows in batches:
        batch = calib[windows].to(device)
        part = model(batch, labels=batch, use_cache=False).loss
        if len(batches) > 1:
            part = part * (len(windows) / share)
        part.backward()
        loss += part.detach()
    return loss


def check_batching(batch_size: int, windows: int, world: World, micro_batch_size: int) -> None:
    """Refuse a batch the calibration set or the processes cannot share out evenly."""
    if batch_size > windows:
        raise ProxSparseError(f"--batch-size {batch_size} exceeds the {windows} calibration "
                              "windows: lower it or add --calib-windows")
    if batch_size % world.size:
        raise ProxSparseError(f"--batch-size {batch_size} does not split evenly over "
                              f"{world.size} processes: use a multiple of {world.size}")
    share = batch_size // world.size
    if micro_batch_size and share % micro_batch_size:
        raise ProxSparseError(f"--micro-batch-size {micro_batch_size} does not divide the "
                              f"{share} windows each process takes per step")


def learn(
    method: LearningMethod,
    model: nn.Module,
    run: RunDir,
    config,
    *,
    steps: int,
    windows: int,
    world: World,
    gradient_checkpointing: bool = False,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Run ``method`` for ``steps`` steps on ``model`` (the module its steps run; with several
    processes, the sharded one) over ``windows`` calibration windows, with the batching,
    logging and checkpoint settings of ``config`` (a ``LearningConfig`` with a
    ``batch_size``), and return its masks."""
    batch_size, micro_batch_size = config.batch_size, config.micro_batch_size
    log_every, checkpoint_every, resume = config.log_every, config.checkpoint_every, config.resume
    seed = config.seed
    check_batching(batch_size, windows, world, micro_batch_size)
    state = run.load_checkpoint(CHECKPOINT_FIELDS) if resume else None
    method.setup(state["method"] if state is not None else None)
    start = min(state["step"], steps) if state is not None else 0

    was_training = model.training
    checkpointing = gradient_checkpointing and method.backprop
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train(method.backprop)  # Llama-style blocks have no dropout: train mode is for autograd
    bar = tqdm(range(start, steps), desc=method.name, disable=not (progress and world.is_main),
               initial=start, total=steps)
    try:
        with run, DeferredInterrupt() as interrupt, torch.set_grad_enabled(method.backprop):
            for step in bar:
                batches = rank_batches(step_windows(step, windows, batch_size, seed), world,
                                       micro_batch_size)
                run.record(step, **method.step(step, batches))
                done = step + 1
                stop = world.any(interrupt.requested)
                if done % log_every == 0 or done == steps or stop:
                    latest = run.flush()
                    bar.set_postfix(method.postfix(latest))
                if done % checkpoint_every == 0 or stop:
                    checkpoint = {"step": done, "method": method.state_dict()}
                    if world.is_main:
                        run.save_checkpoint(checkpoint)
                    world.barrier()
                if stop:
                    raise KeyboardInterrupt
    finally:
        bar.close()
        if checkpointing:
            model.gradient_checkpointing_disable()
        model.train(was_training)
    run.finish(method.title())
    return method.finish()
