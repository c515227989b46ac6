"""The learning engine: one loop for every learned method, where its weights live, and the
processes it spans (FSDP2 under torchrun)."""

from .distributed import World, current_world, launched_by_torchrun
from .loop import (
    LearningMethod,
    check_batching,
    learn,
    lm_loss_backward,
    rank_batches,
    step_windows,
)
from .placement import Placement

__all__ = ["LearningMethod", "Placement", "World", "check_batching", "current_world",
           "launched_by_torchrun", "learn", "lm_loss_backward", "rank_batches",
           "step_windows"]
