"""The compiled CPU kernels: built on first use with torch's cpp_extension, then cached.

The build needs a C++ compiler and ninja (a dependency of proxsparse) and nothing from the
network. torch keeps the built library under ``TORCH_EXTENSIONS_DIR`` (by default
``~/.cache/torch_extensions``) and rebuilds it only when the source changes.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).parent

# What the kernel may use, best first; tests force the lower ones to check every path.
ISAS = {"avx512": 2, "avx2": 1, "portable": 0}


class KernelUnavailable(RuntimeError):
    """The compiled kernel cannot be built or loaded here (the message says why)."""


@functools.cache
def nm24() -> ModuleType:
    """The compiled 2:4 kernel module (``matmul``, ``unpack``, ``best_isa``)."""
    return _build("nm24_cpu")


@functools.cache
def skip_mlp() -> ModuleType:
    """The compiled activation-skipping MLP module (``skip_mlp``, ``to_bitmap``,
    ``from_bitmap``, ``vectorised``)."""
    return _build("skip_mlp_cpu")


@functools.cache
def prox_nm() -> ModuleType:
    """The compiled N:M prox module (``prox``: M = 4 and 8, any N < M, float32)."""
    # built for this machine's vector width (it is built where it runs; 4x faster on AVX-512
    # than a generic build); without errno, a vector's square roots are one instruction
    return _build("prox_nm_cpu", ["-march=native", "-fno-math-errno"])


def _build(stem: str, flags: Sequence[str] = ()) -> ModuleType:
    _put_ninja_on_path()
    try:
        from torch.utils.cpp_extension import load

        # -fopenmp: at::parallel_for is OpenMP in torch's CPU builds, and only threads when
        # the extension itself is compiled with it (without, it silently runs on one thread)
        return load(name=f"proxsparse_{stem}", sources=[str(HERE / f"{stem}.cpp")],
                    extra_cflags=["-O3", "-std=c++17", "-fopenmp", *flags],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # no compiler, no ninja, unsupported platform, ...
        text = str(err).strip().splitlines()
        raise KernelUnavailable(text[0] if text else type(err).__name__) from err


def _put_ninja_on_path() -> None:
    """cpp_extension looks for ninja on PATH; the pip package puts it beside the interpreter,
    which is not on PATH when a virtual environment is used without activating it."""
    candidates = [Path(sys.executable).parent]
    try:
        import ninja

        candidates.insert(0, Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    path = os.environ.get("PATH", "").split(os.pathsep)
    for folder in candidates:
        if (folder / "ninja").exists() and str(folder) not in path:
            os.environ["PATH"] = os.pathsep.join([str(folder), *path])
            return
