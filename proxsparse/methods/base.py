"""The interface every mask-selection method implements."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..errors import COUNT, POSITIVE, SEED, STEPS, check_options
from ..models import Target, check_device
from ..nm import NM
from ..runlog import RunDir, check_run_dir, fingerprint


def option(default, help: str, **metadata):
    """A config field with the one description of its setting, shown by ``prune --help``
    (``cli_default``: the default the command line shows when it differs from ``default``;
    ``kind``: the value's type where the default is None, resolved from other settings)."""
    return field(default=default, metadata={"help": help, **metadata})


def field_help(cls: type, name: str) -> str:
    """The description of config field ``name`` of ``cls``: from the class that gave it one (a
    subclass may change a default without repeating the description)."""
    for klass in cls.__mro__:
        fields = getattr(klass, "__dataclass_fields__", {})
        if name in fields and fields[name].metadata.get("help"):
            return fields[name].metadata["help"]
    raise KeyError(f"{cls.__name__}.{name} has no description: give it option(..., help=...)")


def field_default_text(cls: type, name: str) -> str:
    """The default of a field as ``prune --help`` shows it."""
    field_ = {f.name: f for f in dataclasses.fields(cls)}[name]
    for klass in cls.__mro__:
        fields = getattr(klass, "__dataclass_fields__", {})
        if name in fields and "cli_default" in fields[name].metadata:
            return fields[name].metadata["cli_default"]
    return repr(field_.default) if field_.default == "" else str(field_.default)


@dataclass
class PruneConfig:
    """Settings shared by every method. Each method subclasses it with its own knobs."""

    nm: NM | str = option("2:4", "N:M pattern: keep N of every M consecutive weights along a "
                                 "layer's input")
    include: tuple[str, ...] = option((), "glob patterns over linear layer names (e.g. "
                                          "'*.mlp.*' or 'lm_head'); they replace the default "
                                          "targets, every linear in the decoder blocks")
    ignore: tuple[str, ...] = option((), "glob patterns of linear layer names to leave dense")
    seed: int = option(0, "seed of the learning methods' random draws (and of --permute's "
                          "search)")
    permute: bool = option(False, "first reorder the input channels of down_proj (with the "
                                  "rows of gate/up) and of o_proj (with v_proj's rows inside "
                                  "each head) so that the N:M groups keep more of the score: "
                                  "exact and free at inference, the export stays a plain "
                                  "checkpoint (DESIGN.md §10)")
    permute_rounds: int = option(25, "rounds of --permute's pair-exchange search per layer")
    finetune_steps: int = option(0, "after the masks are chosen, let the kept weights of the "
                                    "pruned layers learn for this many steps (AdamW on the "
                                    "calibration windows, one per step; the masks stay as "
                                    "chosen); 0: off, the weights stay as the method left them")
    finetune_lr: float = option(1e-4, "peak learning rate of --finetune-steps (linear warm-up "
                                      "over the first tenth of the steps, then linear decay)")
    hyperparameters: dict = field(default_factory=dict, repr=False, compare=False)
    # What the caller knows of the inputs (model id, calibration source, windows, seqlen): part
    # of a learning run's identity, so that --resume refuses a run on other inputs.
    context: dict = field(default_factory=dict, repr=False, compare=False)

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        """Every option is checked here, when the config is built (the one place)."""
        self.nm = NM.parse(self.nm)
        self.include, self.ignore = tuple(self.include), tuple(self.ignore)
        check_options(self, seed=SEED, permute_rounds=COUNT, finetune_steps=STEPS,
                      finetune_lr=POSITIVE)

    def settings(self) -> dict:
        """The method's own knobs, for the export metadata."""
        shared = {f for f in PruneConfig.__dataclass_fields__}
        return {**{k: v for k, v in vars(self).items() if k not in shared},
                **self.permutation(), **self.finetuning()}

    def identity(self) -> dict:
        """Every setting that shapes the result: what a resumed run must share with the run it
        continues (where and how often a run logs or saves does not count)."""
        bookkeeping = {"run_dir", "resume", "log_every", "checkpoint_every"}
        return {**{k: v for k, v in self.settings().items() if k not in bookkeeping},
                "nm": str(self.nm), "seed": self.seed, "include": list(self.include),
                "ignore": list(self.ignore), **self.context}

    def permutation(self) -> dict:
        """The --permute settings, where they are on (a run without them keeps its identity)."""
        return {"permute": True, "permute_rounds": self.permute_rounds} if self.permute else {}

    def finetuning(self) -> dict:
        """The --finetune-steps settings, where it is on."""
        if not self.finetune_steps:
            return {}
        return {"finetune_steps": self.finetune_steps, "finetune_lr": self.finetune_lr}


@dataclass
class OneShotConfig(PruneConfig):
    """Settings of the block-by-block one-shot methods (Wanda, SparseGPT)."""

    offload: str = option("", "device that runs each decoder block in turn (e.g. cuda) while "
                              "the model stays where it was loaded (--device cpu: host "
                              "memory), so a model larger than the device prunes; \"\": "
                              "where the model is", cli_default="where the model is")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.offload:
            check_device(self.offload, flag="--offload")


@dataclass
class LearningConfig(PruneConfig):
    """Settings every learning method shares: where its run lives and how often it reports."""

    run_dir: str = option("", "directory of the run's log, loss plot and checkpoints while it "
                              "learns; they move into the output at the end. From Python, "
                              "\"\" keeps nothing on disk", cli_default="<out>.run")
    resume: bool = option(False, "continue an interrupted run from the checkpoint in its run "
                                 "directory; refused unless the model, calibration and settings "
                                 "are the same")
    checkpoint_every: int = option(50, "save a checkpoint (for --resume) every this many steps")
    log_every: int = option(10, "write the log and update the progress bar every this many "
                                "steps")
    micro_batch_size: int = option(0, "windows per forward pass: a step's windows run in "
                                      "micro-batches of this size, their gradients summed (less "
                                      "activation memory); 0: all of a process's windows at "
                                      "once")
    learn_dtype: str = option("auto", "dtype of the weights while learning: float32, bfloat16 "
                                      "or float16; auto: bfloat16 on accelerators, the model's "
                                      "dtype on the CPU. Another dtype than the model's learns "
                                      "a copy and keeps the model as the pretrained weights")
    learn_device: str = option("", "device to learn on (\"\": the model's; under torchrun, "
                                   "cuda:LOCAL_RANK where CUDA is available, else cpu). "
                                   "Another device than the model's learns a copy there and "
                                   "keeps the model, in host memory, as the pretrained weights",
                               cli_default="the model's")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_options(self, checkpoint_every=COUNT, log_every=COUNT,
                      micro_batch_size=STEPS,
                      learn_dtype=("auto", "float32", "bfloat16", "float16"))
        if self.learn_device:
            check_device(self.learn_device, flag="--learn-device")
        if self.run_dir:
            check_run_dir(Path(self.run_dir))

    def open_run(self, targets: list[Target], calib: torch.Tensor,
                 writer: bool = True) -> RunDir:
        """This run's directory. Its checkpoints resume only a run of the same identity: the
        settings, the ``context``, a fingerprint of the target weights (taken now, before any
        learning) and one of the calibration tokens. ``writer=False`` (every process but the
        first of a multi-process run) reads its checkpoints and writes nothing."""
        identity = {**self.identity(),
                    "weights": fingerprint([t.module.weight for t in targets]),
                    "calibration": fingerprint([calib], samples=calib.numel())}
        return RunDir(self.run_dir or None, resume=self.resume, identity=identity,
                      writer=writer)


class Pruner(ABC):
    """Chooses an N:M keep-mask for every target layer.

    ``select_masks`` returns a boolean mask per target (``True`` = keep, exactly N per group).
    It may rewrite the kept weights (SparseGPT does); the caller then zeroes the dropped ones.
    """

    config_class: ClassVar[type[PruneConfig]] = PruneConfig
    needs_calibration: ClassVar[bool] = True
    multi_process: ClassVar[bool] = False  # learns across the processes torchrun launches
    makes_masks: ClassVar[bool] = True  # False: it changes the model otherwise (ProSparse)
    # what --permute raises the kept share of: "wanda" (|W| times input norms) or "magnitude"
    permutation_score: ClassVar[str] = "wanda"

    def __init__(self, config: PruneConfig) -> None:
        self.config = config

    @abstractmethod
    def select_masks(
        self,
        model: nn.Module,
        targets: list[Target],
        calib: torch.Tensor | None,
        progress: bool = True,
    ) -> dict[str, torch.Tensor]: ...
