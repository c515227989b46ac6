"""Predicted peak memory of a ProxSparse learning run, per device, from the model's config alone.

The model is built on the meta device (no weights are read or allocated), so the target layers
and every parameter count are exact. What is added to them:

- weights: every parameter in the learning dtype (divided over the processes with FSDP2, plus
  the full parameters of the two blocks FSDP2 holds gathered at a time, and of the root module);
- W0: the pretrained values of the trainable weights, where they are kept (in place: on
  ``w0_device``; with a learning copy: the model itself, in host memory);
- gradients and AdamW's two states, in the learning dtype, divided over the processes;
- activations saved for the backward pass, per token of a micro-batch, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` on Llama blocks (transformers 5, sdpa):
  per block ``b·(4h + 2·kv + 4i) + 8h`` bytes (``b`` bytes per element, ``h`` hidden, ``kv``
  the key/value width, ``i`` the MLP width; the two RMSNorms keep float32 copies), ``b·h`` per
  block with gradient checkpointing (plus one block recomputed), and ``4V`` for the float32
  log-softmax of the loss;
- the gradient of the loss's logits (float32 and the learning dtype) at the start of backward;
- the peak: the backward pass starts with every activation and no gradient and ends with every
  gradient and no activation, so the activations and the gradients (with the step's workspace
  after them) are not counted together;
- on the CPU, a fixed 0.12 GB the process holds once it has run a step (``CPU_RUNTIME``);
- the optimizer step's workspace (after the activations are freed): the larger of the prox's
  (two float32 copies of the largest layer, measured) and the λ2 term's. AdamW updates one
  parameter at a time (``foreach=False``), so it needs no temporary the size of all weights.

``bench/plan_accuracy.py`` checks the prediction against measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GB = 1e9
# What a CPU process holds beyond its tensors once it has run a learning step (the code and
# JIT kernels it loaded, the allocator's small-block pools): the peak of a 2-block model of
# hidden size 64 above the process's memory before the model, 0.11-0.13 GB measured here.
CPU_RUNTIME = 0.12 * GB


@dataclass
class MemoryPlan:
    """Bytes per device, by part; ``fits(capacity)`` and ``devices_needed(capacity)``."""

    parts: dict[str, float]
    processes: int
    device: str
    target_params: int
    trainable_params: int
    total_params: int
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        """Weights, W0 and AdamW states, plus the larger of the two moments the backward pass
        runs between: at its start every saved activation is alive and no gradient exists yet;
        at its end every gradient exists, the activations are freed, and the step's workspace
        follows. In between, each block frees its activations as its gradients appear."""
        p = self.parts
        held = sum(v for k, v in p.items() if k not in ("activations", "gradients", "workspace"))
        return held + max(p["activations"], p["gradients"] + p["workspace"])

    def bytes_per_target_param(self) -> float:
        """Weights, gradients, optimizer and W0 of the targets, per target parameter."""
        static = sum(self.parts[k] for k in ("weights", "w0", "gradients", "optimizer"))
        return static * self.processes / max(self.target_params, 1)

    def table(self) -> str:
        rows = [f"  {name:<12} {value / GB:9.2f} GB" for name, value in self.parts.items()]
        return "\n".join(rows + [f"  {'peak':<12} {self.peak / GB:9.2f} GB  (weights, W0 and "
                                  "optimizer, plus activations or gradients + workspace)"])


def plan_proxsparse(
    config,
    settings=None,
    *,
    model_dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    processes: int = 1,
    seqlen: int = 4096,
) -> MemoryPlan:
    """The predicted peak of one of ``processes`` processes learning ProxSparse with
    ``settings`` (a ``ProxSparseConfig``; default: the defaults) on ``device`` (a device
    kind: cuda or cpu), for a model of this transformers ``config`` loaded in
    ``model_dtype``, on windows of ``seqlen`` tokens."""
    from ..methods import ProxSparseConfig

    settings = settings or ProxSparseConfig()
    from ..models import find_targets
    from .placement import accelerator, learning_dtype

    kind = torch.device(device)
    on_accelerator = accelerator(kind)
    learn_dtype = learning_dtype(settings.learn_dtype, model_dtype, kind)
    gradient_checkpointing = settings.checkpoints_activations(kind)
    share = max(1, settings.batch_size // processes)  # windows per process and step
    micro_batch_size = settings.micro_batch_size or share
    train_all, w0_device = settings.train_all, settings.w0_device
    notes = []
    if settings.batch_size % processes:
        notes.append(f"--batch-size {settings.batch_size} does not split over {processes} "
                     f"processes: a run needs a multiple of {processes} (planned with "
                     f"{share} window per process)")
    b = torch.empty((), dtype=learn_dtype).element_size()
    b0 = torch.empty((), dtype=model_dtype).element_size()
    model = _meta_model(config, learn_dtype)
    targets, _ = find_targets(model, settings.nm, settings.include, settings.ignore)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    target = sum(t.module.weight.numel() for t in targets)
    trainable = total if train_all else target
    in_place = processes == 1 and learn_dtype == model_dtype
    shared = processes

    from ..models import decoder_blocks

    blocks = decoder_blocks(model)
    block = max(sum(p.numel() for p in blk.parameters()) for blk in blocks)
    in_blocks = sum(p.numel() for p in blocks.parameters())
    weights = total * b / shared
    if processes > 1:  # FSDP2: the root's parameters stay gathered, and two blocks at a time
        weights += (total - in_blocks + 2 * block) * b * (1 - 1 / shared)
    if in_place:
        w0_where = w0_device or ("cpu" if on_accelerator else device)
        w0 = trainable * b0 if torch.device(w0_where).type == kind.type else 0.0
        if not w0:
            notes.append(f"W0 ({trainable * b0 / GB:.1f} GB) is in host memory, not on the "
                         "device")
    else:
        w0 = total * b0 if not on_accelerator else 0.0  # the model itself, in host memory
        if on_accelerator:
            notes.append(f"the pretrained model ({total * b0 / GB:.1f} GB) is in host memory, "
                         "one copy per process")
    gradients = trainable * b / shared
    # AdamW's two states: in the learning dtype, or 8 bits with a float32 scale per 256
    per_state = 1 + 4 / 256 if settings.optimizer_states == "8bit" else b
    optimizer = 2 * trainable * per_state / shared

    h = config.hidden_size
    i = getattr(config, "intermediate_size", 4 * h)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    kv_width = kv * (getattr(config, "head_dim", None) or h // heads)
    vocab, layers = config.vocab_size, len(blocks)
    tokens = seqlen * micro_batch_size
    per_block = b * (4 * h + 2 * kv_width + 4 * i) + 8 * h
    if gradient_checkpointing:
        saved = tokens * (layers * b * h + per_block)
    else:
        saved = tokens * layers * per_block
    # saved tensors, the loss's float32 log-softmax, and the gradient of its logits
    activations = saved + tokens * (4 * vocab + b * h / 2) + tokens * vocab * (4 + b)
    largest = max(t.module.weight.numel() for t in targets) / shared
    workspace = max(2 * largest * 4,  # the prox of the largest layer (float32)
                    4 * largest * b)  # the λ2 term of the largest layer; AdamW's update of
    # one parameter at a time (foreach=False) needs less
    parts = {"weights": weights, "w0": w0, "gradients": gradients, "optimizer": optimizer,
             "activations": activations, "workspace": workspace,
             "runtime": CPU_RUNTIME if kind.type == "cpu" else 0.0}
    if processes > 1:
        whole = trainable * (b + 2 * per_state)
        notes.append(f"at each checkpoint rank 0 gathers the whole learning state in host "
                     f"memory (about {whole / GB:.1f} GB)")
    if kind.type != "cpu":
        notes.append("not predicted: the CUDA context and the allocator's slack")
    return MemoryPlan(parts, processes, device, target, trainable, total, notes)


def devices_needed(plan_for, capacity: float, most: int = 64) -> int | None:
    """The fewest processes (1, 2, 4, ...) whose per-device peak fits ``capacity`` bytes;
    ``plan_for(processes)`` gives the plan. None if even ``most`` do not."""
    count = 1
    while count <= most:
        if plan_for(count).peak <= capacity:
            return count
        count *= 2
    return None


def _meta_model(config, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_config(spec: str, trust_remote_code: bool = False):
    """A model config from a hub id, a checkpoint directory, or a config JSON file."""
    import json
    from pathlib import Path

    from transformers import AutoConfig

    from ..errors import ProxSparseError

    path = Path(spec)
    if path.is_file() and path.suffix == ".json":
        raw = json.loads(path.read_text())
        if "model_type" not in raw:
            raise ProxSparseError(f"{spec} has no model_type: give a transformers config.json")
        kind = raw.pop("model_type")
        return AutoConfig.for_model(kind, **raw)
    from ..models import resolve

    source, gguf = resolve(spec)
    try:
        return AutoConfig.from_pretrained(source, gguf_file=gguf,
                                          trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ProxSparseError(f"cannot read the config of {spec!r}: give a hub id, a checkpoint "
                              f"directory or a config .json ({str(err).splitlines()[0]})") from err
