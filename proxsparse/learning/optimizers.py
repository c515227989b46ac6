"""AdamW for the learned weights, with its two states in the weights' dtype or in 8 bits.

``8bit`` is torchao's ``AdamW8bit`` (block-wise quantised states, ~2 bytes per weight for both
instead of 4 in bfloat16 or 8 in float32), an optional dependency: ``pip install torchao``.
"""

from __future__ import annotations

import math

import torch

from ..errors import ProxSparseError

STATES = ("auto", "8bit")
BETAS = (0.9, 0.999)


def adamw(params: list[torch.nn.Parameter], lr: float, states: str = "auto"
          ) -> torch.optim.Optimizer:
    """AdamW without weight decay. ``auto``: states in the weights' dtype, updated one
    parameter at a time (``foreach=False``: no temporary the size of all the weights)."""
    if states == "auto":
        return torch.optim.AdamW(params, lr=lr, betas=BETAS, weight_decay=0.0, foreach=False)
    try:
        from torchao.optim import AdamW8bit
    except ImportError as err:
        raise ProxSparseError("--optimizer-states 8bit needs torchao: pip install torchao "
                              "(or pip install 'proxsparse[scale]')") from err
    return AdamW8bit(params, lr=lr, betas=BETAS, weight_decay=0.0)


def quantised(value: torch.Tensor) -> bool:
    """Whether ``value`` is a quantised optimizer state (a tensor subclass that dequantises)."""
    kind = type(value)
    return kind not in (torch.Tensor, torch.nn.Parameter) and (
        getattr(kind, "dequantize", torch.Tensor.dequantize) is not torch.Tensor.dequantize)


def plain_state(value: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """An optimizer state in plain tensors, for a checkpoint that loads with weights_only: a
    quantised one as the plain tensors it is made of (its codes and scales, exactly)."""
    if not quantised(value):
        return value
    names, _ = value.__tensor_flatten__()
    return {name: getattr(value, name) for name in names}


def pop_quantised(saved: dict) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """Take the quantised states (stored as their parts) out of a saved optimizer state."""
    parts = {}
    for index, values in saved["state"].items():
        for key in [k for k, v in values.items() if isinstance(v, dict)]:
            parts[(int(index), key)] = values.pop(key)
    return parts


def restore_quantised(optimizer: torch.optim.Optimizer,
                      parts: dict[tuple[int, str], dict[str, torch.Tensor]]) -> None:
    """Put the quantised states back after ``load_state_dict``: each one created as the
    optimizer creates it, then filled with its saved codes and scales."""
    if not parts:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for (index, key), saved in parts.items():
        param = params[index]
        buffer = optimizer._new_buffer(param, key == "exp_avg")  # signed: the first moment
        names, _ = buffer.__tensor_flatten__()
        with torch.no_grad():
            for name in names:
                getattr(buffer, name).copy_(saved[name])
        optimizer.state[param][key] = buffer


def training_state(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                   schedule, world) -> dict:
    """A checkpoint of learned weights, their optimizer and its schedule, gathered whole on
    rank 0 (a collective; the other ranks hold None in it)."""
    from .distributed import gather_optimizer_state, gather_to_main

    return {"params": [gather_to_main(p, world) for p in params],
            "optimizer": gather_optimizer_state(optimizer, world),
            "schedule": schedule.state_dict()}


def load_training_state(state: dict, params: list[torch.nn.Parameter],
                        optimizer: torch.optim.Optimizer, schedule, world) -> None:
    """Restore a :func:`training_state`, each rank taking its rows."""
    from .distributed import load_optimizer_state, local, row_shard

    if not (isinstance(state.get("params"), list) and isinstance(state.get("optimizer"), dict)
            and isinstance(state.get("schedule"), dict)
            and len(state["params"]) == len(params)):
        raise ProxSparseError("the checkpoint holds no learning state for these weights; "
                              "delete the run directory to start afresh")
    with torch.no_grad():
        for param, value in zip(params, state["params"], strict=True):
            local(param).copy_(row_shard(value, world))
    load_optimizer_state(optimizer, state["optimizer"])
    schedule.load_state_dict(state["schedule"])


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` share of the steps, then linear decay to 0."""
    warm = max(1, math.ceil(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))
