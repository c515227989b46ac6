"""The ``proxsparse`` command: prune, eval, verify."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path

from .errors import COUNT, POSITIVE, STEPS, WINDOW, ProxSparseError, check_options
from .learning.distributed import launched_by_torchrun
from .methods import PRUNERS, PruneConfig
from .methods.base import LearningConfig, field_default_text, field_help
from .runlog import CHECKPOINT_FILE, RunDir
from .zeroshot import PAPER_TASKS

SHARED_FIELDS = {f.name for f in dataclasses.fields(PruneConfig)}
PRUNE_EPILOG = """\
learning on several devices (ProxSparse): launch the same command with torchrun; each process
learns its rows of every weight (FSDP2), and rank 0 logs and writes --out:
  torchrun --standalone --nproc-per-node 8 -m proxsparse prune --model meta-llama/Llama-2-7b-hf \\
      --method proxsparse --dtype bfloat16 --device cuda --seqlen 4096 --out runs/llama2-7b
--device cuda under torchrun means cuda:LOCAL_RANK (nccl); on CPUs it is gloo. Add --resume
to continue a killed run (same number of processes). `proxsparse plan` predicts the memory.
"""


def method_options() -> dict[str, tuple[type, dict[str, object]]]:
    """Each method-specific config field -> (type, {method: its default})."""
    options: dict[str, tuple[type, dict[str, object]]] = {}
    for method, cls in PRUNERS.items():
        for field in dataclasses.fields(cls.config_class):
            if field.name in SHARED_FIELDS:
                continue
            # ``kind``: the type of a field whose default (None) depends on other settings
            kind = field.metadata.get("kind", type(field.default))
            kind, defaults = options.get(field.name, (kind, {}))
            options[field.name] = (kind, {**defaults, method: field.default})
    return options


def method_option_help(name: str) -> str:
    """``--help`` of a method option, from its config field's description: one text with the
    default per method, or, where methods mean different things by it, one text per method."""
    configs = {method: cls.config_class for method, cls in PRUNERS.items()
               if name in {f.name for f in dataclasses.fields(cls.config_class)}}
    texts = {method: field_help(cls, name) for method, cls in configs.items()}
    defaults = {method: field_default_text(cls, name) for method, cls in configs.items()}
    if len(set(texts.values())) == 1:
        if len(set(defaults.values())) == 1:
            default = next(iter(defaults.values()))
        else:
            default = ", ".join(f"{value} for {method}" for method, value in defaults.items())
        return f"{next(iter(texts.values()))} ({', '.join(configs)}; default {default})"
    return "; ".join(f"{method}: {texts[method]} (default {defaults[method]})"
                     for method in configs)


def _shared_help(name: str, extra: str = "") -> str:
    """``--help`` of a setting every method shares, from PruneConfig's description."""
    return field_help(PruneConfig, name) + extra


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxsparse", description="Learned N:M (2:4) sparsity for causal language models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "prune", help="prune a model to N:M and save the checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=PRUNE_EPILOG)
    p.add_argument("--model", required=True,
                   help="hub id, checkpoint directory, .gguf file, or alias smollm2-135m")
    p.add_argument("--method", required=True, choices=list(PRUNERS))
    p.add_argument("--nm", default="2:4", help=_shared_help("nm", " (default 2:4)"))
    p.add_argument("--calib", default="builtin",
                   help="calibration text: builtin (offline), c4, wikitext2, or a local file")
    p.add_argument("--calib-windows", type=int, default=128,
                   help="calibration windows, drawn at random offsets (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--seed", type=int, default=0,
                   help=_shared_help("seed", ", and of the calibration window draw (default 0)"))
    p.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help=_shared_help("include", ". Repeatable"))
    p.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                   help=_shared_help("ignore", ". Repeatable"))
    p.add_argument("--permute", action="store_true", help=_shared_help("permute"))
    p.add_argument("--permute-rounds", type=int, default=25,
                   help=_shared_help("permute_rounds", " (default 25)"))
    p.add_argument("--finetune-steps", type=int, default=0,
                   help=_shared_help("finetune_steps", " (default 0)"))
    p.add_argument("--finetune-lr", type=float, default=1e-4,
                   help=_shared_help("finetune_lr", " (default 1e-4)"))
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier proxsparse output at --out (only a directory with "
                        "a proxsparse.json; never the model or the working directory)")
    _add_runtime_args(p)
    _add_method_options(p)

    e = sub.add_parser(
        "eval", help="perplexity on consecutive windows, and/or zero-shot tasks (lm_eval)",
        description="Perplexity of a model on consecutive windows of a text (by default), or "
                    "its accuracy on lm-evaluation-harness tasks (--tasks; both when --text is "
                    "given too).")
    e.add_argument("model", help="hub id, checkpoint directory, .gguf file, or smollm2-135m")
    e.add_argument("--text", default=None,
                   help="evaluation text: wikitext2 (download; the default without --tasks), "
                        "builtin, or a local file")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--max-windows", type=int, default=128)
    e.add_argument("--batch-size", type=int, default=4,
                   help="windows (perplexity) or requests (tasks) per forward pass (default 4)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--activation-sparsity", action="store_true",
                   help="also the share of zeros in every gated MLP's intermediate (the input "
                        "of down_proj), per layer and overall, on the same windows")
    z = e.add_argument_group(
        "zero-shot tasks (lm-evaluation-harness: pip install 'proxsparse[eval]')")
    z.add_argument("--tasks", default=None, metavar="NAMES",
                   help="comma-separated lm_eval tasks, groups or tags (or task YAML files), "
                        f"e.g. {','.join(PAPER_TASKS[:2])} (the paper's seven: "
                        f"{' '.join(PAPER_TASKS)})")
    z.add_argument("--num-fewshot", type=int, default=None, metavar="N",
                   help="examples in each prompt (default: each task's own, 0 for the "
                        "paper's seven)")
    z.add_argument("--limit", type=int, default=None, metavar="N",
                   help="at most this many items per task (a quick look, not a score)")
    z.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of task YAML files (local tasks; relative data_files are "
                        "read from the YAML's folder). Repeatable")
    _add_runtime_args(e)

    v = sub.add_parser("verify", help="check that every target layer of a checkpoint is N:M")
    v.add_argument("model", help="a proxsparse output directory")
    v.add_argument("--nm", default=None, help="pattern to check when the directory has no "
                                              "proxsparse.json (default 2:4)")
    _add_runtime_args(v)
    _add_packed_runtime_commands(sub)
    _add_plan_command(sub)
    return parser


def _add_method_options(p: argparse.ArgumentParser, methods: tuple[str, ...] = ()) -> None:
    """One flag per config field of the methods (all of them by default)."""
    group = p.add_argument_group("method options")
    for name, (kind, owners) in method_options().items():
        if methods and not set(owners) & set(methods):
            continue
        flag = "--" + name.replace("_", "-")
        hint = method_option_help(name).replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                               default=None, help=hint)
        else:
            group.add_argument(flag, dest=name, type=kind, default=None, help=hint)


def _method_settings(args, method: str) -> dict:
    """The method options given on the command line; refuses one the method does not have."""
    settings = {}
    for name, (_, methods) in method_options().items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if method not in methods:
            flag = "--" + name.replace("_", "-")
            raise ProxSparseError(f"{flag} does not apply to method {method}; "
                                  f"it is an option of {', '.join(sorted(methods))}")
        settings[name] = value
    return settings


def _add_plan_command(sub) -> None:
    a = sub.add_parser(
        "plan", help="predict a learning run's peak memory per device from the model's config",
        description="Predicted peak memory per device of ProxSparse learning, from the model's "
                    "config alone (built on the meta device; no weights are read).")
    a.add_argument("--model", required=True,
                   help="hub id, checkpoint directory, config .json, or a shipped config: "
                        + ", ".join(shipped_configs()))
    a.add_argument("--method", default="proxsparse", choices=["proxsparse"])
    a.add_argument("--nm", default="2:4", help=_shared_help("nm", " (default 2:4)"))
    a.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help=_shared_help("include", ". Repeatable"))
    a.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                   help=_shared_help("ignore", ". Repeatable"))
    a.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="kind of device that learns (default cuda)")
    a.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype the model is loaded in (default bfloat16)")
    a.add_argument("--processes", type=int, default=1,
                   help="processes (one per device) under torchrun (default 1)")
    a.add_argument("--seqlen", type=int, default=4096, help="tokens per window (default 4096)")
    a.add_argument("--capacity-gb", type=float, default=80.0,
                   help="memory of one device, for the verdict (default 80)")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a.add_argument("--trust-remote-code", action="store_true",
                   help="allow a config that names its own Python code")
    a.add_argument("--debug", action="store_true", help="show the traceback of an error")
    _add_method_options(a, methods=("proxsparse",))


def _add_packed_runtime_commands(sub) -> None:
    """pack, generate, speed: running N:M models packed (proxsparse.runtime)."""
    k = sub.add_parser("pack", help="store a pruned checkpoint's N:M layers packed")
    k.add_argument("model", help="a proxsparse output directory (or any N:M checkpoint)")
    k.add_argument("out", help="output directory of the packed checkpoint (written atomically)")
    k.add_argument("--nm", default=None, help="pattern when the model has no proxsparse.json "
                                              "(default 2:4)")
    k.add_argument("--values-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="precision of the stored kept values (default: the model's dtype)")
    k.add_argument("--overwrite", action="store_true", help="replace a proxsparse output at OUT")
    _add_runtime_args(k)

    g = sub.add_parser("generate", help="generate text (packed checkpoints run packed)")
    g.add_argument("model", help="checkpoint directory, packed checkpoint, .gguf, hub id or alias")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    g.add_argument("--sparsify", action="store_true",
                   help="pack a dense N:M checkpoint's layers on load (a packed checkpoint "
                        "always runs packed)")
    _add_kernel_args(g)
    _add_runtime_args(g)

    s = sub.add_parser("speed", help="decode and prefill speed, dense against packed (and/or "
                                     "activation-skipping), in one run")
    s.add_argument("model", help="a pruned N:M checkpoint (dense with zeros) or a packed one; "
                                 "with --skip-activation-zeros, also a ProSparse output")
    s.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per decode run")
    s.add_argument("--prompt", default="The history of the city begins",
                   help="prompt of the decode runs")
    s.add_argument("--prefill-tokens", type=int, default=512)
    s.add_argument("--repeats", type=int, default=3, help="rounds; the median is reported")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    _add_kernel_args(s)
    _add_runtime_args(s)


def _add_kernel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "cuda", "reference"],
                   help="packed execution backend (auto: the compiled kernel where it runs)")
    p.add_argument("--values-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="precision of the packed values when packing on load")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--skip-activation-zeros", action="store_true",
                   help="decode the gated MLPs of a ReLU-style model (e.g. a ProSparse output) "
                        "over their non-zero activations only (composes with N:M weights)")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python code a model ships (auto_map in its config.json); off: "
                        "such a model is refused. Only for code you have read and trust")
    p.add_argument("--debug", action="store_true",
                   help="show the Python traceback of an error (or set PROXSPARSE_DEBUG=1)")


def _load(args):
    import torch
    import transformers

    from .models import load_model

    if args.quiet:
        transformers.utils.logging.disable_progress_bar()

    return load_model(args.model, getattr(torch, args.dtype), args.device,
                      trust_remote_code=getattr(args, "trust_remote_code", False),
                      progress=not args.quiet)


def _warn_past_positions(model, seqlen: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        warnings.warn(f"--seqlen {seqlen} exceeds the {limit} positions this model was made "
                      f"for: the windows' tail is out of its range; use --seqlen {limit} or less",
                      stacklevel=2)


def _run_dir(args) -> Path:
    """Where a learning run keeps its log, plot and checkpoints: --run-dir or <out>.run."""
    return Path(getattr(args, "run_dir", None) or f"{Path(args.out).resolve()}.run")


def cmd_prune(args) -> int:
    from . import api, data, export
    from .methods import config_for
    from .models import check_device, local_source

    method_settings = _method_settings(args, args.method)
    learning = issubclass(PRUNERS[args.method].config_class, LearningConfig)
    if learning:  # log, plot and checkpoints live here, written once the learning starts
        method_settings["run_dir"] = str(_run_dir(args))
    if launched_by_torchrun():
        if not PRUNERS[args.method].multi_process:
            raise ProxSparseError(f"{args.method} runs in one process: run it without "
                                  "torchrun (proxsparse learns across processes)")
        # every rank loads the model into host memory; the learning shards it onto its device
        method_settings.setdefault("learn_device", "" if args.device == "cpu" else args.device)
        args.device = "cpu"
    context = {"model": args.model, "calib": args.calib, "calib_windows": args.calib_windows,
               "seqlen": args.seqlen}  # with N:M and the settings: what --resume must match
    config = config_for(args.method, nm=args.nm, include=args.include, ignore=args.ignore,
                        seed=args.seed, permute=args.permute,
                        permute_rounds=args.permute_rounds, finetune_steps=args.finetune_steps,
                        finetune_lr=args.finetune_lr, context=context,
                        **method_settings)
    check_options(args, calib_windows=COUNT, seqlen=WINDOW)
    export.check_output_dir(args.out, args.overwrite, local_source(args.model),
                            Path(config.run_dir) if learning else None)
    check_device(args.device)
    needs_calibration = PRUNERS[args.method].needs_calibration or config.finetune_steps > 0
    text = data.load_text(args.calib) if needs_calibration else None  # fail before the load

    model, tokenizer = _load(args)
    _warn_past_positions(model, args.seqlen)
    calib = None
    if needs_calibration:
        ids = data.tokenize(tokenizer, text)
        calib = data.random_windows(ids, args.calib_windows, args.seqlen, args.seed, args.calib)
    result = api.prune(model, config, calib, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 writes the output
    metadata = api.describe(result, model, model_source=args.model, calibration={
        "source": args.calib, "windows": args.calib_windows, "seqlen": args.seqlen,
        "seed": args.seed} if calib is not None else None)
    run_dir = RunDir(config.run_dir if learning else None)
    out = export.save(model, tokenizer, args.out, result.masks, config.nm, metadata,
                      overwrite=args.overwrite, extra_files=tuple(run_dir.files()))
    run_dir.remove()  # the log and plot now live in the output; the checkpoint is done
    if not result.masks:
        print(f"{args.method} finished in {result.seconds:.1f}s; saved to {out}")
        return 0
    sparsity = sum(s["sparsity"] for s in metadata["layers"].values()) / len(result.masks)
    print(f"pruned {len(result.masks)} layers to {config.nm} with {args.method} in "
          f"{result.seconds:.1f}s (mean sparsity {sparsity:.3f}); "
          f"skipped {len(result.skipped)}; saved to {out}")
    return 0


def cmd_plan(args) -> int:
    import torch

    from .learning.memory import GB, devices_needed, load_config, plan_proxsparse
    from .methods import config_for

    check_options(args, processes=COUNT, seqlen=WINDOW, capacity_gb=POSITIVE)
    settings = config_for(args.method, nm=args.nm, include=args.include, ignore=args.ignore,
                          **_method_settings(args, args.method))
    config = load_config(shipped_configs().get(args.model, args.model),
                         trust_remote_code=args.trust_remote_code)
    dtype = getattr(torch, args.dtype)

    def plan_for(processes: int):
        return plan_proxsparse(config, settings, model_dtype=dtype, device=args.device,
                               processes=processes, seqlen=args.seqlen)

    plan = plan_for(args.processes)
    capacity = args.capacity_gb * GB
    needed = devices_needed(plan_for, capacity)
    if args.json:
        print(json.dumps({"model": args.model, "processes": args.processes,
                          "device": args.device, "seqlen": args.seqlen,
                          "parts_gb": {k: round(v / GB, 3) for k, v in plan.parts.items()},
                          "peak_gb": round(plan.peak / GB, 3),
                          "target_params": plan.target_params,
                          "state_bytes_per_target_param": round(plan.bytes_per_target_param(), 2),
                          "fits": plan.peak <= capacity, "capacity_gb": args.capacity_gb,
                          "devices_needed": needed, "notes": plan.notes}))
        return 0
    print(f"{args.model}: {plan.total_params / 1e9:.2f} B parameters, "
          f"{plan.target_params / 1e9:.2f} B in target layers; ProxSparse on "
          f"{args.processes} {args.device} process(es), {args.seqlen} tokens per window")
    print(f"predicted peak per device:\n{plan.table()}")
    for note in plan.notes:
        print(f"  note: {note}")
    verdict = "fits" if plan.peak <= capacity else "does not fit"
    count = (f"{needed} device(s) of {args.capacity_gb:g} GB needed with these options"
             if needed else f"no count of {args.capacity_gb:g} GB devices up to 64 is enough")
    print(f"{verdict} in {args.capacity_gb:g} GB per device; {count}")
    return 0


def shipped_configs() -> dict[str, str]:
    """Configs shipped with proxsparse (for ``plan`` without network): name -> path."""
    folder = Path(__file__).parent / "configs"
    return {p.stem: str(p) for p in sorted(folder.glob("*.json"))}


def cmd_eval(args) -> int:
    from . import data
    from .models import check_device

    check_options(args, seqlen=WINDOW, max_windows=COUNT, batch_size=COUNT)
    check_device(args.device)
    task_set = None
    if args.tasks is not None:  # the tasks and their data, before the model: fail early
        from .zeroshot import load_tasks

        if args.limit is not None:
            check_options(args, limit=COUNT)
        if args.num_fewshot is not None:
            check_options(args, num_fewshot=STEPS)
        task_set = load_tasks(args.tasks, args.include_path, progress=not args.quiet)
    elif args.limit is not None or args.num_fewshot is not None or args.include_path:
        raise ProxSparseError("--limit, --num-fewshot and --include-path apply to zero-shot "
                              "tasks: add --tasks")
    source = args.text if args.text is not None or task_set is not None else "wikitext2"
    if args.activation_sparsity and source is None:
        raise ProxSparseError("--activation-sparsity is measured on the perplexity windows: "
                              "add --text (e.g. --text builtin)")
    text = data.load_text(source) if source is not None else None
    model, tokenizer = _load(args)
    output = _eval_perplexity(args, model, tokenizer, text) if text is not None else {}
    scores = None
    if task_set is not None:
        from .zeroshot import zero_shot

        scores = zero_shot(model, tokenizer, task_set, batch_size=args.batch_size,
                           limit=args.limit, num_fewshot=args.num_fewshot,
                           progress=not args.quiet)
        output["zero_shot"] = scores.as_dict()
    if args.json:
        print(json.dumps(output))
        return 0
    if text is not None:
        print(f"perplexity {output['ppl']:.3f} over {output['tokens']} tokens "
              f"({output['windows']} windows of {args.seqlen})")
    shares = output.get("activation_sparsity")
    if shares is not None:
        print("share of zeros in the MLP intermediate (input of down_proj):")
        for name, share in shares.items():
            if name != "overall":
                print(f"  {name:<40} {share:7.2%}")
        print(f"  {'overall (mean over layers)':<40} {shares['overall']:7.2%}")
    if scores is not None:
        limit = f", at most {args.limit} items per task" if args.limit is not None else ""
        print(f"zero-shot (lm-evaluation-harness{limit}, {scores.seconds:.1f}s):")
        print(scores.table())
    return 0


def _eval_perplexity(args, model, tokenizer, text: str) -> dict:
    """``eval``'s perplexity (and --activation-sparsity) on the text's windows, as the JSON
    fields it prints."""
    import contextlib

    from . import data
    from .evaluate import perplexity
    from .gated_mlp import ActivationSparsity

    _warn_past_positions(model, args.seqlen)
    windows = data.eval_windows(data.tokenize(tokenizer, text), args.seqlen, args.max_windows)
    meter = ActivationSparsity(model) if args.activation_sparsity else contextlib.nullcontext()
    start = time.perf_counter()
    with meter:
        result = perplexity(model, windows, args.batch_size, progress=not args.quiet)
    output = {**result.as_dict(), "seconds": round(time.perf_counter() - start, 2)}
    if args.activation_sparsity:
        output["activation_sparsity"] = meter.shares()
    return output


def cmd_verify(args) -> int:
    from . import export
    from .models import find_targets
    from .nm import NM
    from .runtime import densify as ps_densify

    if not Path(args.model).is_dir():
        raise ProxSparseError(f"{args.model!r} is not a directory: give a saved checkpoint")
    metadata = export.read_metadata(args.model)
    has_masks = metadata is not None and (Path(args.model) / export.MASK_FILE).is_file()
    masks = export.load_masks(args.model)[0] if has_masks else None
    model, _ = _load(args)
    ps_densify(model)  # a packed checkpoint is checked on its unpacked weights
    if metadata is not None:
        nm, names = NM.parse(metadata["nm"]), metadata["targets"]
    else:
        nm = NM.parse(args.nm or "2:4")
        names = [t.name for t in find_targets(model, nm)[0]]
    checks = export.verify(model, names, nm, masks)
    bad = [c for c in checks if not c.valid]
    for check in checks:
        status = "ok " if check.valid else "BAD"
        print(f"{status} {check.name:50s} {str(check.shape):14s} sparsity {check.sparsity:.3f} "
              f"max nonzeros/group {check.max_nonzeros}")
    print(f"{len(checks) - len(bad)}/{len(checks)} layers valid {nm}")
    if bad:
        print("not N:M: " + ", ".join(c.name for c in bad), file=sys.stderr)
        return 1
    return 0


def _checkpoint_targets(model_dir: str, nm_flag: str | None):
    """(layer names, N:M) recorded in a proxsparse output, or (None, --nm) without metadata."""
    from . import export
    from .nm import NM

    metadata = export.read_metadata(model_dir) if Path(model_dir).is_dir() else None
    if metadata is not None and "targets" in metadata:
        nm = NM.parse(metadata["nm"])
        if nm_flag is not None and NM.parse(nm_flag) != nm:
            raise ProxSparseError(f"{model_dir} was pruned to {nm}, not {nm_flag}: drop --nm")
        return list(metadata["targets"]), nm
    return None, NM.parse(nm_flag or "2:4")


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


def _load_packed_model(args, *, sparsify: bool):
    """The model, packed: a packed checkpoint as it is, a dense N:M one packed on load."""
    import torch

    from .runtime import packed_layers
    from .runtime import sparsify as pack_layers

    if args.threads is not None:
        if args.threads < 1:
            raise ProxSparseError(f"--threads must be ≥ 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model, tokenizer = _load(args)
    if args.skip_activation_zeros:  # first: N:M gate/up/down become its bitmap rows
        from .runtime.skip_mlp import skip_activation_zeros

        skip_activation_zeros(model)
    if sparsify and not packed_layers(model):
        layers, nm = _checkpoint_targets(args.model, None)
        if args.skip_activation_zeros and layers:
            modules = dict(model.named_modules())
            layers = [name for name in layers if name in modules]  # not those inside the MLPs
        pack_layers(model, nm, backend=args.backend, layers=layers,
                    values_dtype=_dtype(args.values_dtype))
    return model, tokenizer


def cmd_pack(args) -> int:
    from . import export
    from .models import local_source
    from .runtime import packed_layers, sparsify
    from .runtime.checkpoint import write_packed
    from .runtime.speed import model_bytes

    layers, nm = _checkpoint_targets(args.model, args.nm)
    export.check_output_dir(args.out, args.overwrite, local_source(args.model))
    model, tokenizer = _load(args)
    if packed_layers(model):
        raise ProxSparseError(f"{args.model} is already packed")
    dense_bytes = model_bytes(model)
    sparsify(model, nm, backend="reference", layers=layers, values_dtype=_dtype(args.values_dtype))
    metadata = export.read_metadata(args.model) or {"nm": str(nm)}
    metadata.setdefault("targets", sorted(packed_layers(model)))
    with export.staged_output(args.out, args.overwrite) as staging:
        metadata["packed"] = write_packed(model, staging)
        model.config.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / export.METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    on_disk = sum(p.stat().st_size for p in Path(args.out).iterdir())
    print(f"packed {len(metadata['packed']['layers'])} {nm} layers: model "
          f"{dense_bytes / 2**20:.1f} MiB dense -> {model_bytes(model) / 2**20:.1f} MiB packed "
          f"in memory, {on_disk / 2**20:.1f} MiB on disk; saved to {args.out}")
    return 0


def cmd_generate(args) -> int:
    import torch

    if args.max_new_tokens < 1:
        raise ProxSparseError(f"--max-new-tokens must be ≥ 1, got {args.max_new_tokens}")
    model, tokenizer = _load_packed_model(args, sparsify=args.sparsify)
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ProxSparseError(f"{args.model} has no chat template: drop --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    ids = ids.to(args.device)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                             **(sampling if args.sample else {"do_sample": False}))
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    print(text)
    if not text.strip():
        print("(the model ended at once: it produced only special tokens such as end-of-text)",
              file=sys.stderr)
    print(f"[{len(new)} tokens in {seconds:.2f}s: {len(new) / seconds:.1f} tokens/s]",
          file=sys.stderr)
    return 0


def cmd_speed(args) -> int:
    import torch

    from . import data
    from .runtime.speed import compare

    if min(args.new_tokens, args.prefill_tokens, args.repeats) < 1 or args.new_tokens < 2:
        raise ProxSparseError("--new-tokens must be ≥ 2, --prefill-tokens and --repeats ≥ 1")
    model, tokenizer = _load_packed_model(args, sparsify=True)
    prompt = tokenizer(args.prompt, return_tensors="pt").input_ids.to(args.device)
    ids = data.tokenize(tokenizer, data.builtin_text())[: args.prefill_tokens]
    prefill = ids.view(1, -1).to(args.device)
    from tqdm.auto import tqdm

    with tqdm(total=args.repeats * 2, desc="speed", disable=args.quiet or args.json) as bar:
        result = compare(model, prompt, prefill, args.new_tokens, args.repeats, bar.update)
    result["model"] = args.model
    result["dtype"] = args.dtype
    if args.json:
        print(json.dumps(result))
        return 0
    dense, packed = result["dense"], result["packed"]
    print(f"{args.model}: {result['packed_layers']} packed layers (backend {result['backend']}), "
          f"{result['skipping_mlps']} activation-skipping MLPs, {torch.get_num_threads()} "
          f"threads, median of {args.repeats}")
    print(f"{'':8s} {'decode tok/s':>13s} {'prefill tok/s':>14s} {'target MiB':>11s} "
          f"{'model MiB':>10s}")
    for row in (dense, packed):
        print(f"{row['label']:8s} {row['decode_tokens_per_s']:13.1f} "
              f"{row['prefill_tokens_per_s']:14.1f} {row['target_weight_bytes'] / 2**20:11.1f} "
              f"{row['model_bytes'] / 2**20:10.1f}")
    print(f"speed-up: decode {result['decode_speedup']:.2f}x, prefill "
          f"{result['prefill_speedup']:.2f}x; target bytes {result['target_bytes_ratio']:.3f}x; "
          f"same greedy tokens: {'yes' if result['same_tokens'] else 'no'} (largest relative "
          f"logit difference {result['max_relative_logit_difference']:.1e})")
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)  # one line, without the source location


COMMANDS = {"prune": cmd_prune, "eval": cmd_eval, "verify": cmd_verify, "pack": cmd_pack,
            "generate": cmd_generate, "speed": cmd_speed, "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        with warnings.catch_warnings():  # restores the usual display on the way out
            warnings.showwarning = _show_warning
            return COMMANDS[args.command](args)
    except ProxSparseError as err:
        if getattr(args, "debug", False) or os.environ.get("PROXSPARSE_DEBUG", "0") != "0":
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if argv is None:  # the program, not a caller: another Ctrl-C now ends it, silently
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        print(f"interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130


def _resume_hint(args) -> str:
    """After Ctrl-C: how to continue, when a learning run has left a checkpoint."""
    resumable = args.command == "prune" and (_run_dir(args) / CHECKPOINT_FILE).is_file()
    return " (add --resume to continue from the checkpoint)" if resumable else ""


if __name__ == "__main__":
    sys.exit(main())
