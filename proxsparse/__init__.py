"""proxsparse: learned N:M semi-structured sparsity for causal language models.

    from proxsparse import prune, WandaConfig, calibration_windows, load_model
    model, tokenizer = load_model("smollm2-135m")
    calib = calibration_windows(tokenizer, "builtin", num_windows=128, seqlen=512)
    result = prune(model, WandaConfig(nm="2:4"), calib)
    sparsify(model)  # packed 2:4 layers: smaller, and faster at decode
    zero_shot(model, tokenizer, "boolq,rte").table()  # lm_eval tasks (the eval extra)
"""

from .api import PruneResult, describe, prune
from .data import calibration_windows, eval_windows, load_text, tokenize
from .errors import ProxSparseError
from .evaluate import Perplexity, perplexity
from .export import apply_masks, load_masks, save, verify
from .learning.memory import MemoryPlan, plan_proxsparse
from .methods import (
    MagnitudeConfig,
    MaskProConfig,
    ProSparseConfig,
    ProxSparseConfig,
    PruneConfig,
    SparseGPTConfig,
    WandaConfig,
    config_for,
)
from .models import find_targets, load_model
from .nm import NM
from .runtime import PackedLinear, densify, sparsify
from .zeroshot import TaskSet, ZeroShot, load_tasks, zero_shot

__all__ = [
    "NM", "MagnitudeConfig", "MaskProConfig", "MemoryPlan", "PackedLinear", "Perplexity",
    "PruneConfig", "PruneResult",
    "ProSparseConfig", "ProxSparseConfig", "ProxSparseError",
    "SparseGPTConfig", "TaskSet", "WandaConfig", "ZeroShot", "apply_masks", "calibration_windows",
    "config_for",
    "describe", "eval_windows", "find_targets", "load_masks", "load_model", "load_text",
    "densify", "load_tasks", "perplexity", "plan_proxsparse", "prune", "save", "sparsify",
    "tokenize", "verify", "zero_shot",
]
