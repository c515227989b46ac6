"""AdamW for the learned weights, with its two states in the weights' dtype or in 8 bits.

``8bit`` is torchao's ``AdamW8bit`` (block-wise quantised states, ~2 bytes per weight for both
instead of 4 in bfloat16 or 8 in float32), an optional dependency: ``pip install torchao``.
"""

from __future__ import annotations

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
