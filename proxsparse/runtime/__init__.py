"""Running N:M models fast and small: the packed format, its backends and the module swap.

    import proxsparse as ps
    ps.sparsify(model)            # every 2:4 target nn.Linear -> PackedLinear (in place)
    model.generate(...)           # runs on the packed kernel
    ps.densify(model)             # back to dense nn.Linear
"""

from .backends import BACKENDS, Backend, CpuKernel, CudaSemiStructured, Reference, choose_backend
from .format import PackedWeight, pack, unpack
from .module import PackedLinear, densify, packed_layers, sparsify

__all__ = [
    "BACKENDS", "Backend", "CpuKernel", "CudaSemiStructured", "PackedLinear", "PackedWeight",
    "Reference", "choose_backend", "densify", "pack", "packed_layers", "sparsify", "unpack",
]
