"""Block-by-block calibration for the one-shot layer-wise methods (Wanda, SparseGPT).

The calibration windows run through the decoder blocks one block at a time, as one batch. Each
block is fed the outputs of the already-pruned blocks before it. Inside a block, a forward
pre-hook on every target linear hands its input to the method, which prunes the layer before
the layer runs: later sublayers of the block (o_proj after q/k/v, down_proj after gate/up) then
see the outputs of the pruned earlier ones, all in a single forward pass per block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import Target, decoder_blocks


class _Captured(Exception):
    """Raised by a hook to stop the model's forward once block 0's input is captured."""


def capture_block_inputs(model: nn.Module, calib: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Hidden states entering block 0 for all windows, and the keyword arguments it receives."""
    first = decoder_blocks(model)[0]
    captured: dict = {}

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured["hidden"], captured["kwargs"] = hidden, {**kwargs}
        raise _Captured

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        model(calib.to(device), use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    captured["kwargs"].pop("hidden_states", None)
    return captured["hidden"], captured["kwargs"]


@torch.no_grad()
def prune_blockwise(
    model: nn.Module,
    targets: list[Target],
    calib: torch.Tensor,
    prune_layer: Callable[[Target, torch.Tensor], None],
    progress: bool = True,
    device: torch.device | str | None = None,
) -> None:
    """Call ``prune_layer(target, inputs)`` for every target, in forward order, block by block.

    ``inputs`` is the layer's input for all calibration tokens, ``[windows, seqlen, in]``.
    ``prune_layer`` must leave the layer pruned: its forward runs right after.
    With ``device``, each block moves there for its turn and back after it, with the hidden
    states on ``device`` throughout: only one block is ever on that device.
    """
    outside = [t.name for t in targets if t.block is None]
    if outside:
        raise ValueError(
            f"layer-wise methods prune layers inside decoder blocks only; not: {outside}"
        )
    blocks = decoder_blocks(model)
    by_block: dict[int, list[Target]] = {}
    for target in targets:
        by_block.setdefault(target.block, []).append(target)

    hidden, kwargs = capture_block_inputs(model, calib)
    home = hidden.device
    if device is not None:
        hidden, kwargs = _to(hidden, device), _to(kwargs, device)
    done: set[str] = set()
    last = max(by_block)
    for index in tqdm(range(last + 1), desc="blocks", disable=not progress):
        block = blocks[index]
        if device is not None:
            block.to(device)
        handles = []
        for target in by_block.get(index, []):

            def hook(_module, args, target=target):
                prune_layer(target, args[0])
                done.add(target.name)

            handles.append(target.module.register_forward_pre_hook(hook))
        try:
            hidden = block(hidden, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
            if device is not None:
                block.to(home)
        if isinstance(hidden, tuple):  # older block APIs return (hidden, ...)
            hidden = hidden[0]
    missing = [t.name for t in targets if t.name not in done]
    if missing:
        raise RuntimeError(f"these layers never ran during calibration: {missing}")


def _to(value, device):
    """``value`` with every tensor in it (through tuples, lists and dicts) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value
