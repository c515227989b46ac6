"""Mask-selection methods, one module each, all behind the ``Pruner`` interface."""

from __future__ import annotations

from ..errors import ProxSparseError
from .base import PruneConfig, Pruner
from .magnitude import Magnitude, MagnitudeConfig
from .maskpro import MaskPro, MaskProConfig
from .prosparse import ProSparse, ProSparseConfig
from .proxsparse import ProxSparse, ProxSparseConfig
from .sparsegpt import SparseGPT, SparseGPTConfig
from .wanda import Wanda, WandaConfig

PRUNERS: dict[str, type[Pruner]] = {
    cls.config_class.method: cls
    for cls in (Magnitude, Wanda, SparseGPT, ProxSparse, MaskPro, ProSparse)
}


def pruner_for(config: PruneConfig) -> Pruner:
    for cls in PRUNERS.values():
        if type(config) is cls.config_class:
            return cls(config)
    raise ProxSparseError(f"no method takes a {type(config).__name__}; use one of {list(PRUNERS)}")


def config_for(method: str, **settings) -> PruneConfig:
    """Build the config of a method by name, e.g. ``config_for("wanda", nm="2:4")``."""
    if method not in PRUNERS:
        raise ProxSparseError(f"unknown method {method!r}: choose one of {', '.join(PRUNERS)}")
    return PRUNERS[method].config_class(**settings)


__all__ = [
    "PRUNERS", "PruneConfig", "Pruner", "config_for", "pruner_for",
    "MagnitudeConfig", "WandaConfig", "SparseGPTConfig", "ProxSparseConfig", "MaskProConfig",
    "ProSparseConfig",
]
