"""SparseGPT: layer-wise optimal-brain-surgeon reconstruction with an N:M mask (DESIGN.md §4).

For each layer, with H = 2XᵀX/n (+ damping) from its calibration inputs, columns are visited
left to right in blocks; at the start of every group of M columns the group's mask is chosen by
the saliency w² / [H⁻¹]²_jj, and each pruned column's error is spread over the columns not yet
visited through the Cholesky factor of H⁻¹. The kept weights change; the pruned ones become 0.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..blockwise import prune_blockwise
from ..errors import COUNT, NON_NEGATIVE, ProxSparseError, check_options
from ..nm import NM, topn_mask
from .base import OneShotConfig, Pruner, option


@dataclass
class SparseGPTConfig(OneShotConfig):
    blocksize: int = option(128, "columns per block of the lazy batch update (a multiple of "
                                 "M): a speed setting, the method stays the same")
    dampening: float = option(0.01, "share of the mean Hessian diagonal added to its diagonal, "
                                    "which keeps the inverse stable")
    method = "sparsegpt"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_options(self, blocksize=COUNT, dampening=NON_NEGATIVE)
        if self.blocksize % self.nm.m:
            raise ProxSparseError(f"--blocksize must be a multiple of M={self.nm.m} (the columns "
                                  f"of a group), got {self.blocksize}")


def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """2XᵀX/n over all calibration tokens, in float32."""
    flat = inputs.reshape(-1, inputs.shape[-1]).float()
    return flat.T @ flat * (2.0 / flat.shape[0])


@contextmanager
def _one_cpu_thread(device: torch.device):
    """The column loop below is thousands of tiny operations: on the CPU, worker threads only
    add synchronisation, which costs up to 50x when another process shares the cores."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sparsegpt_prune(
    weight: torch.Tensor, hess: torch.Tensor, nm: NM, blocksize: int = 128,
    dampening: float = 0.01, mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(new_weight, keep_mask)`` for one layer; ``weight`` is ``[out, in]``.

    With ``mask`` given, the mask is fixed and only the kept weights are reconstructed.
    """
    w = weight.detach().to(hess.dtype).clone()  # work in the Hessian's precision
    h = hess.clone()
    if blocksize % nm.m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={nm.m}")

    dead = torch.diag(h) == 0  # features never active in calibration: prunable for free
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(dampening * torch.diag(h).mean())
    try:
        factor = torch.linalg.cholesky(h)
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
    except torch.linalg.LinAlgError as err:
        raise ProxSparseError(
            "SparseGPT: the layer Hessian is not positive definite; raise the dampening "
            "(--dampening 0.1) or give more calibration windows"
        ) from err

    keep = torch.zeros_like(w, dtype=torch.bool)
    fixed = None if mask is None else mask.to(w.device, torch.bool)
    with _one_cpu_thread(w.device):
        _obs_sweep(w, hinv, keep, nm, blocksize, fixed)
    return w.to(weight.dtype), keep


def _obs_sweep(w: torch.Tensor, hinv: torch.Tensor, keep: torch.Tensor, nm: NM,
               blocksize: int, fixed: torch.Tensor | None = None) -> None:
    """Visit the columns left to right, choosing each group's mask (or taking it from
    ``fixed``) and spreading the pruning error onto the columns not yet visited; updates ``w``
    and ``keep`` in place."""
    columns = w.shape[1]
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        block = w[:, start:end].clone()
        hblock = hinv[start:end, start:end]
        errors = torch.zeros_like(block)
        for g in range(0, end - start, nm.m):
            cols = slice(g, g + nm.m)
            if fixed is None:
                saliency = block[:, cols].square() / hblock.diagonal()[cols].square()
                keep_group = topn_mask(saliency, nm)
            else:
                keep_group = fixed[:, start + g : start + g + nm.m]
            # Visit the group's columns in order; a pruned entry's error moves onto the later
            # columns of the group here and onto the rest of the block in one product below.
            group = block[:, cols].clone()
            hgroup = hblock[cols, cols]
            for j in range(nm.m):
                err = torch.where(keep_group[:, j], 0.0, group[:, j]) / hgroup[j, j]
                group[:, j + 1 :] -= err.unsqueeze(1) * hgroup[j, j + 1 :]
                errors[:, g + j] = err
            block[:, cols] = group * keep_group
            block[:, g + nm.m :] -= errors[:, cols] @ hblock[cols, g + nm.m :]
            keep[:, start + g : start + g + nm.m] = keep_group
        w[:, start:end] = block
        w[:, end:] -= errors @ hinv[start:end, end:]


def obs_blockwise(
    model: torch.nn.Module, targets: list, calib: torch.Tensor, nm: NM, blocksize: int = 128,
    dampening: float = 0.01, fixed: dict[str, torch.Tensor] | None = None,
    progress: bool = True, device: str | None = None,
) -> dict[str, torch.Tensor]:
    """SparseGPT over the model, block by block on the already-pruned model's activations:
    every target is pruned and its kept weights re-fitted in place. With ``fixed`` (a mask per
    target), those masks are kept as given and only the kept weights change. With ``device``,
    each block runs there in turn (see ``prune_blockwise``). Returns the masks.
    """
    masks: dict[str, torch.Tensor] = {}
    cache: dict = {"input": None, "hessian": None}

    def prune_layer(target, inputs):
        if cache["input"] is not inputs:  # q/k/v and gate/up share their input
            cache["input"], cache["hessian"] = inputs, hessian(inputs)
        weight = target.module.weight
        given = None if fixed is None else fixed[target.name].to(weight.device)
        if given is not None and not weight.masked_fill(given, 0).any():
            raise ProxSparseError(
                f"reconstruct needs the dense weights, but {target.name} is already masked: "
                "reload the dense model and pass its masks instead")
        new_weight, mask = sparsegpt_prune(weight, cache["hessian"], nm, blocksize, dampening,
                                           given)
        weight.copy_(new_weight * mask)
        masks[target.name] = mask

    prune_blockwise(model, targets, calib, prune_layer, progress, device=device)
    return masks


def reconstruct(
    model: torch.nn.Module, targets: list, calib: torch.Tensor, masks: dict[str, torch.Tensor],
    nm: NM, blocksize: int = 128, dampening: float = 0.01, progress: bool = True,
) -> None:
    """Keep every mask as given and re-fit the kept weights by SparseGPT's OBS update (the
    weights must still be dense). This changes the kept weights."""
    obs_blockwise(model, targets, calib, nm, blocksize, dampening, masks, progress)


class SparseGPT(Pruner):
    config_class = SparseGPTConfig

    def select_masks(self, model, targets, calib, progress=True):
        cfg: SparseGPTConfig = self.config
        return obs_blockwise(model, targets, calib, cfg.nm, cfg.blocksize, cfg.dampening,
                             progress=progress, device=cfg.offload or None)
