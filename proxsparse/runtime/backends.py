"""Interchangeable execution backends of a packed N:M layer, behind one small interface.

- ``cpu``: the compiled kernel (kernels/nm24_cpu.cpp): 2:4, fp32 or bf16 values, AVX-512 /
  AVX2 / portable code chosen at run time. It multiplies the packed weight directly; at
  prefill, large layers in chunks of ``max_kernel_tokens`` tokens and small ones by unpacking
  them for the dense matrix product (``prefill``: "auto", "kernel" or "unpack").
- ``cuda``: torch's ``to_sparse_semi_structured`` (2:4, fp16/bf16, CUDA only).
- ``reference``: plain torch, any N:M, any device; correct everywhere, not fast.

A backend turns the canonical :class:`PackedWeight` into the tensors it computes from
(``prepare``), back again (``restore``), and computes the layer (``linear``).
"""

from __future__ import annotations

import functools
import math
import warnings
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from ..errors import ProxSparseError
from .format import PackedWeight, pack, unpack
from .kernels import ISAS, KernelUnavailable, nm24

if TYPE_CHECKING:
    from .module import PackedLinear

Storage = dict[str, torch.Tensor]


class Backend(ABC):
    name: ClassVar[str]

    def unsupported(self, packed: PackedWeight, device: torch.device) -> str | None:
        """Why this backend cannot run ``packed`` on ``device``, or None when it can."""
        return None

    @abstractmethod
    def prepare(self, packed: PackedWeight) -> Storage:
        """The tensors this backend computes from; the layer holds them as buffers."""

    @abstractmethod
    def restore(self, layer: PackedLinear) -> PackedWeight:
        """The canonical packed weight of a layer prepared by this backend."""

    @abstractmethod
    def linear(self, layer: PackedLinear, x: torch.Tensor) -> torch.Tensor: ...


class Reference(Backend):
    """Unpack and multiply: the definition of the packed layer's output."""

    name = "reference"

    def prepare(self, packed):
        return {"values": packed.values, "indices": packed.indices}

    def restore(self, layer):
        return PackedWeight(layer.values, layer.indices, layer.in_features, layer.nm)

    def linear(self, layer, x):
        return F.linear(x, unpack(self.restore(layer), dtype=x.dtype), _bias(layer, x))


ROWS_PER_BLOCK, WORDS_PER_TILE = 8, 2  # the kernel's tile (see nm24_cpu.cpp)


class CpuKernel(Backend):
    """The compiled 2:4 kernel over its tiled layout (8 rows x 64 inputs per tile)."""

    name = "cpu"
    # Prefill (more tokens than max_kernel_tokens): "kernel" runs the packed product on chunks
    # of that many tokens; "unpack" unpacks the weight slab by slab for the dense product;
    # "auto" unpacks a layer that fits one slab (the dense product then reads it from cache:
    # SmolLM2's layers, 1.03x dense against 0.92x chunked) and chunks larger ones (7B shapes:
    # 1.06-1.23x against 0.95-1.05x unpacked; bench/results/runtime_speed.md).
    max_kernel_tokens = 128
    prefill = "auto"
    slab_bytes = 8 * 2**20  # rows unpacked at a time for the dense product: stays in cache

    def __init__(self, isa: str = "best") -> None:
        if isa != "best" and isa not in ISAS:
            raise ProxSparseError(f"unknown instruction set {isa!r}: best or one of {list(ISAS)}")
        self.isa = -1 if isa == "best" else ISAS[isa]
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def _prefill_unpacks(self, layer: PackedLinear, x: torch.Tensor) -> bool:
        if self.prefill == "auto":
            return layer.out_features * layer.in_features * x.element_size() <= self.slab_bytes
        return self.prefill == "unpack"

    def _unpacked_product(self, layer: PackedLinear, x: torch.Tensor, pairs: int) -> torch.Tensor:
        """Prefill: compute-bound, so the dense matrix product wins. The weight is unpacked a
        slab of rows at a time into a cache-sized workspace and multiplied at once, so the
        dense weight never travels to memory (a small layer is one slab)."""
        out, in_features = layer.out_features, layer.in_features
        flat = x.reshape(-1, in_features)
        rows = max(ROWS_PER_BLOCK, self.slab_bytes // (in_features * x.element_size())
                   // ROWS_PER_BLOCK * ROWS_PER_BLOCK)
        workspace = self._workspace(min(rows, out) * in_features, x.dtype)
        if rows >= out:
            weight = workspace.view(out, in_features)
            nm24().unpack(layer.tiles, out, in_features, pairs, layer.values_dtype, weight, 0)
            return F.linear(x, weight, _bias(layer, x))
        y = torch.empty(flat.shape[0], out, dtype=x.dtype)
        part = torch.empty(flat.shape[0], rows, dtype=x.dtype)
        for row0 in range(0, out, rows):
            slab = workspace[: min(rows, out - row0) * in_features].view(-1, in_features)
            nm24().unpack(layer.tiles, out, in_features, pairs, layer.values_dtype, slab, row0)
            block = part[:, : slab.shape[0]]
            torch.mm(flat, slab.T, out=block)
            y[:, row0 : row0 + slab.shape[0]] = block
        if layer.bias is not None:
            y += layer.bias.to(x.dtype)
        return y.view(*x.shape[:-1], out)

    def _workspace(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """One dense buffer, reused by every layer's prefill: freshly allocated memory would
        cost more in page faults than the unpacking. Grows to the largest layer."""
        buffer = self._buffers.get(dtype)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[dtype] = torch.empty(numel, dtype=dtype)
        return buffer[:numel]

    def unsupported(self, packed, device):
        if torch.device(device).type != "cpu":
            return "the compiled kernel runs on the CPU only"
        if (packed.nm.n, packed.nm.m) != (2, 4):
            return f"the compiled kernel handles 2:4, not {packed.nm}"
        dtype = packed.values.dtype
        if dtype not in (torch.float32, torch.bfloat16):
            return f"the compiled kernel takes float32 or bfloat16 values, not {dtype}"
        try:
            nm24()
        except KernelUnavailable as err:
            return f"the compiled kernel is unavailable ({err})"
        return None

    def prepare(self, packed):
        out, words = packed.indices.shape
        blocks, pairs = math.ceil(out / ROWS_PER_BLOCK), math.ceil(words / WORDS_PER_TILE)
        rows, width = blocks * ROWS_PER_BLOCK, pairs * WORDS_PER_TILE
        indices = F.pad(packed.indices, (0, width - words, 0, rows - out))
        values = F.pad(packed.values, (0, (width - words) * 16, 0, rows - out))
        indices = indices.view(blocks, ROWS_PER_BLOCK, pairs, WORDS_PER_TILE).permute(0, 2, 3, 1)
        values = values.view(blocks, ROWS_PER_BLOCK, pairs, WORDS_PER_TILE, 16)
        values = values.permute(0, 2, 3, 1, 4)
        tiles = torch.cat([_bytes(indices, blocks, pairs), _bytes(values, blocks, pairs)], -1)
        return {"tiles": tiles.reshape(-1)}

    def restore(self, layer):
        out, in_features, dtype = layer.out_features, layer.in_features, layer.values_dtype
        words = math.ceil(in_features / 32)
        blocks, pairs = math.ceil(out / ROWS_PER_BLOCK), math.ceil(words / WORDS_PER_TILE)
        tiles = layer.tiles.view(blocks, pairs, -1)
        index_bytes = WORDS_PER_TILE * ROWS_PER_BLOCK * 4
        indices = tiles[..., :index_bytes].contiguous().view(torch.int32)
        indices = indices.view(blocks, pairs, WORDS_PER_TILE, ROWS_PER_BLOCK).permute(0, 3, 1, 2)
        values = tiles[..., index_bytes:].contiguous().view(dtype)
        values = values.view(blocks, pairs, WORDS_PER_TILE, ROWS_PER_BLOCK, 16)
        values = values.permute(0, 3, 1, 2, 4)
        indices = indices.reshape(blocks * ROWS_PER_BLOCK, -1)[:out, :words].contiguous()
        values = values.reshape(blocks * ROWS_PER_BLOCK, -1)[:out, : words * 16].contiguous()
        return PackedWeight(values, indices, in_features, layer.nm)

    def linear(self, layer, x):
        out, in_features = layer.out_features, layer.in_features
        tiles, dtype = layer.tiles, layer.values_dtype
        pairs = math.ceil(math.ceil(in_features / 32) / WORDS_PER_TILE)
        tokens = x.numel() // in_features
        if tokens > self.max_kernel_tokens and self._prefill_unpacks(layer, x):
            return self._unpacked_product(layer, x, pairs)
        flat = x.reshape(tokens, in_features).to(torch.float32)
        if pairs * 64 != in_features:
            flat = F.pad(flat, (0, pairs * 64 - in_features))
        flat = flat.contiguous()
        chunk = self.max_kernel_tokens  # prefill: token chunks that stay in cache
        parts = [nm24().matmul(flat[t : t + chunk], tiles, out, dtype, self.isa)
                 for t in range(0, tokens, chunk)]
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
        if layer.bias is not None:
            y += layer.bias
        return y.to(x.dtype).view(*x.shape[:-1], out)


def _bias(layer: PackedLinear, x: torch.Tensor) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.to(x.dtype)


def _bytes(tensor: torch.Tensor, blocks: int, pairs: int) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8).reshape(blocks, pairs, -1)


class CudaSemiStructured(Backend):
    """torch's semi-structured sparse tensors (CUTLASS / cuSPARSELt), 2:4 fp16/bf16 on CUDA."""

    name = "cuda"

    def unsupported(self, packed, device):
        if torch.device(device).type != "cuda" or not torch.cuda.is_available():
            return "torch's semi-structured sparsity needs a CUDA device"
        if (packed.nm.n, packed.nm.m) != (2, 4):
            return f"torch's semi-structured sparsity handles 2:4, not {packed.nm}"
        if packed.values.dtype not in (torch.float16, torch.bfloat16):
            return "torch's semi-structured sparsity takes float16 or bfloat16 values"
        return None

    def prepare(self, packed):
        from torch.sparse import to_sparse_semi_structured

        try:
            return {"weight": to_sparse_semi_structured(unpack(packed))}
        except Exception as err:  # shape or hardware constraints of the CUDA kernels
            raise ProxSparseError(f"torch's semi-structured format refused a {packed.shape} "
                                  f"layer ({str(err).splitlines()[0]}); use backend "
                                  "'reference'") from err

    def restore(self, layer):
        return pack(layer.weight.to_dense(), layer.nm)

    def linear(self, layer, x):
        flat = x.reshape(-1, layer.in_features)  # the sparse product takes 2-D inputs
        y = F.linear(flat, layer.weight, _bias(layer, x))
        return y.view(*x.shape[:-1], layer.out_features)


BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in (CpuKernel, CudaSemiStructured,
                                                                Reference)}


def choose_backend(name: str | Backend, packed: PackedWeight,
                   device: torch.device | str) -> Backend:
    """The backend called ``name`` (or, for ``"auto"``, the fastest one that runs ``packed`` on
    ``device``; or a :class:`Backend` instance); refuses a backend that cannot run it."""
    if isinstance(name, Backend):
        reason = name.unsupported(packed, device)
        if reason:
            raise ProxSparseError(f"backend {name.name!r} cannot run this model: {reason}")
        return name
    if name == "auto":
        for candidate in ("cpu", "cuda"):
            if _instance(candidate).unsupported(packed, device) is None:
                return _instance(candidate)
        reason = _instance("cpu" if torch.device(device).type == "cpu" else "cuda").unsupported(
            packed, device)
        _warn_fallback(reason)
        return _instance("reference")
    if name not in BACKENDS:
        raise ProxSparseError(f"unknown backend {name!r}: choose auto or one of "
                              f"{', '.join(BACKENDS)}")
    backend = _instance(name)
    reason = backend.unsupported(packed, device)
    if reason:
        raise ProxSparseError(f"backend {name!r} cannot run this model: {reason}; "
                              "use --backend auto or reference")
    return backend


@functools.cache
def _instance(name: str) -> Backend:
    return BACKENDS[name]()


@functools.cache
def _warn_fallback(reason: str | None) -> None:
    warnings.warn(f"packed layers use the plain-torch reference backend (correct, not fast): "
                  f"{reason}", stacklevel=4)
