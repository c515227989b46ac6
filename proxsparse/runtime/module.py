"""The module swap: ``sparsify(model)`` replaces every N:M target ``nn.Linear`` by a
:class:`PackedLinear` that holds only the packed weight; ``densify(model)`` swaps back."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ProxSparseError
from ..models import find_targets
from ..nm import NM
from .backends import Backend, choose_backend
from .format import PackedWeight, pack, unpack


class PackedLinear(nn.Module):
    """A linear layer whose weight is stored packed N:M and computed by a backend.

    Inference only: the packed weight takes no gradient.
    """

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None,
                 backend: str | Backend = "auto") -> None:
        super().__init__()
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.nm, self.values_dtype = packed.nm, packed.values.dtype
        self.backend = choose_backend(backend, packed, packed.values.device)
        for name, tensor in self.backend.prepare(packed).items():
            self.register_buffer(name, tensor)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, nm: NM | str = "2:4", backend: str | Backend = "auto",
                    values_dtype: torch.dtype | None = None, name: str = "layer") -> PackedLinear:
        return cls(pack(linear.weight, nm, name=name, dtype=values_dtype), linear.bias, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.linear(self, x)

    def packed(self) -> PackedWeight:
        """The canonical packed weight (what a packed checkpoint stores)."""
        return self.backend.restore(self)

    def to_linear(self) -> nn.Linear:
        weight = unpack(self.packed())
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @property
    def weight_nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nm={self.nm}, values={str(self.values_dtype).removeprefix('torch.')}, "
                f"backend={self.backend.name}")


def sparsify(
    model: nn.Module,
    nm: NM | str = "2:4",
    backend: str | Backend = "auto",
    layers: list[str] | None = None,
    include: tuple[str, ...] = (),
    ignore: tuple[str, ...] = (),
    values_dtype: torch.dtype | None = None,
) -> dict[str, PackedLinear]:
    """Swap every N:M target ``nn.Linear`` of ``model`` (in place) for a packed layer.

    Targets are ``layers`` (qualified names) when given, else the usual target set
    (``include``/``ignore`` as in pruning). A target that is not exact N:M is refused with one
    error naming it, and the model is left as it was. ``values_dtype`` stores the kept values in
    another precision (e.g. ``torch.bfloat16``); the default keeps the layer's. Returns the new
    layers by name.
    """
    nm = NM.parse(nm)
    modules = dict(model.named_modules())
    if layers is None:
        layers = [t.name for t in find_targets(model, nm, tuple(include), tuple(ignore))[0]]
    packed = {}
    for name in layers:
        linear = modules.get(name)
        if isinstance(linear, PackedLinear):
            continue
        if not isinstance(linear, nn.Linear):
            raise ProxSparseError(f"{name!r} is not a linear layer of this model: "
                                  "check the layer names")
        packed[name] = PackedLinear.from_linear(linear, nm, backend, values_dtype, name)
    for name, layer in packed.items():  # swap only once every layer has packed
        set_module(model, name, layer)
    return packed


def densify(model: nn.Module) -> int:
    """Swap every :class:`PackedLinear` back for a dense ``nn.Linear`` (zeros included).
    Returns how many layers were swapped."""
    swapped = [(name, m) for name, m in model.named_modules() if isinstance(m, PackedLinear)]
    for name, layer in swapped:
        set_module(model, name, layer.to_linear())
    return len(swapped)


def packed_layers(model: nn.Module) -> dict[str, PackedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
