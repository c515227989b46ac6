"""Zero-shot accuracy with EleutherAI's lm-evaluation-harness (DESIGN.md §5, §12).

``zero_shot`` wraps the model in memory (dense, pruned or packed) in lm_eval's ``HFLM`` and runs
``simple_evaluate`` on named tasks: lm_eval's own (``boolq``, ``arc_easy``, ..., whose data come
from the Hugging Face hub) or task YAMLs in local folders (``include_path``), which can read
local files (``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``). A local
task's data are loaded with the working directory set to its YAML's folder, so its relative
``data_files`` paths are relative to the YAML.

lm_eval is an optional dependency: ``pip install 'proxsparse[eval]'``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any
from unittest import mock

from torch import nn

from .errors import COUNT, STEPS, ProxSparseError, check_options, first_line
from .extras import require

# The seven tasks of the ProxSparse paper (DESIGN.md §5).
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
               "openbookqa")
PURPOSE = "zero-shot evaluation (--tasks)"


@dataclass
class TaskScore:
    """One task's (or group's) scores: metric -> value, and its standard error where known."""

    task: str
    metrics: dict[str, float]
    stderr: dict[str, float | None]
    samples: int | None  # items scored (after --limit); None for a group
    num_fewshot: int | None

    def as_dict(self) -> dict[str, Any]:
        return {**self.metrics, **{f"{k}_stderr": v for k, v in self.stderr.items()},
                "samples": self.samples, "num_fewshot": self.num_fewshot}


@dataclass
class ZeroShot:
    """Scores of every task evaluated, in lm_eval's order; ``leaves`` are the tasks that are not
    groups (the mean runs over them)."""

    scores: dict[str, TaskScore]
    leaves: list[str]
    seconds: float
    limit: int | None

    def mean(self, metric: str = "acc") -> float | None:
        """The unweighted mean of ``metric`` over the tasks (not groups) that report it."""
        values = [self.scores[t].metrics[metric] for t in self.leaves
                  if metric in self.scores[t].metrics]
        return sum(values) / len(values) if values else None

    def as_dict(self) -> dict[str, Any]:
        return {"tasks": {name: score.as_dict() for name, score in self.scores.items()},
                "mean_acc": self.mean("acc"), "limit": self.limit,
                "seconds": round(self.seconds, 2)}

    def table(self) -> str:
        """One row per task and metric, then the mean accuracy."""
        width = max([len("task"), *(len(name) for name in self.scores)])
        lines = [f"{'task':<{width}}  {'metric':<10} {'value':>7} {'± stderr':>9} "
                 f"{'items':>6} {'shots':>5}"]
        for name, score in self.scores.items():
            for i, (metric, value) in enumerate(score.metrics.items()):
                error = score.stderr.get(metric)
                first = i == 0
                lines.append(
                    f"{name if first else '':<{width}}  {metric:<10} {value:7.4f} "
                    f"{'' if error is None else f'± {error:.4f}':>9} "
                    f"{(score.samples if first and score.samples is not None else ''):>6} "
                    f"{(score.num_fewshot if first and score.num_fewshot is not None else ''):>5}")
        mean = self.mean("acc")
        if mean is not None and len(self.leaves) > 1:
            count = sum("acc" in self.scores[t].metrics for t in self.leaves)
            lines.append(f"mean acc over {count} tasks: {mean:.4f}")
        return "\n".join(lines)


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"boolq,rte"`` or ``["boolq", "rte"]`` -> the names, without blanks or repeats."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(item.strip() for item in items if item.strip()))
    if not names:
        raise ProxSparseError("--tasks names no task: give comma-separated lm_eval task names, "
                              "e.g. --tasks boolq,rte")
    return names


def lm_eval_module() -> ModuleType:
    """lm_eval, checked to be a 0.4 or 0.5 release, or one line saying how to install it."""
    lm_eval = require("lm_eval", PURPOSE)
    version = getattr(lm_eval, "__version__", "unknown")
    if not str(version).startswith(("0.4.", "0.5.")):
        raise ProxSparseError(f"{PURPOSE} needs lm_eval 0.4 or 0.5, found {version}: "
                              "pip install 'proxsparse[eval]'")
    return lm_eval


@dataclass
class TaskSet:
    """Tasks built by lm_eval with their data loaded: evaluate several models on them with
    :func:`zero_shot` (with the same ``num_fewshot``: an evaluation sets it on the tasks)."""

    names: list[str]
    manager: Any  # lm_eval's TaskManager
    loaded: list  # lm_eval Task and Group objects, as simple_evaluate takes them (0.4)
    task_dict: dict  # TaskManager.load's {"tasks", "groups", "group_map"} of all names (0.5)


def load_tasks(
    tasks: str | Sequence[str],
    include_path: str | Path | Sequence[str | Path] | None = None,
    progress: bool = True,
) -> TaskSet:
    """Find and build lm_eval tasks and load their data (downloads for lm_eval's own tasks);
    one clear line for a missing lm_eval, an unknown name or data that cannot be had.

    ``tasks``: names (or one comma-separated string) of lm_eval tasks, groups or tags, of tasks
    defined by YAML files in the ``include_path`` folders, or paths of task YAML files.
    """
    names = [str(Path(n).resolve()) if _yaml_file(n) else n for n in parse_tasks(tasks)]
    lm_eval_module()
    manager = _task_manager(names, _include_paths(include_path))
    task_dict: dict = {"tasks": {}, "groups": {}, "group_map": {}}
    for name in names:
        for key, items in _load_task(manager, name, progress).items():
            task_dict[key].update(items)
    children = {child for kids in task_dict["group_map"].values() for child in kids}
    groups = [g for n, g in task_dict["groups"].items() if n not in children]
    loaded = groups or list(task_dict["tasks"].values())
    return TaskSet(names, manager, loaded, task_dict)


def zero_shot(
    model: nn.Module,
    tokenizer,
    tasks: str | Sequence[str] | TaskSet,
    *,
    batch_size: int = 4,
    limit: int | None = None,
    num_fewshot: int | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    progress: bool = True,
) -> ZeroShot:
    """Accuracy of ``model`` (in memory, as it is: dense, pruned or packed) on lm_eval tasks.

    ``tasks``: as :func:`load_tasks` takes them (with ``include_path``), or its result.
    ``limit``: at most this many items per task (a quick look; the paper's numbers use every
    item). ``num_fewshot``: examples in each prompt (default: each task's own, 0 for the
    paper's seven).
    """
    options = {"batch_size": (batch_size, COUNT), "limit": (limit, COUNT),
               "num_fewshot": (num_fewshot, STEPS)}
    given = {name: option for name, option in options.items() if option[0] is not None}
    check_options(SimpleNamespace(**{name: value for name, (value, _) in given.items()}),
                  **{name: rule for name, (_, rule) in given.items()})
    task_set = tasks if isinstance(tasks, TaskSet) else load_tasks(tasks, include_path, progress)
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    start = time.perf_counter()
    if _takes_task_objects():
        tasks_given, manager = task_set.loaded, task_set.manager
    else:  # 0.5 loads named tasks through task_manager.load: hand it the loaded ones
        tasks_given, manager = task_set.names, _Loaded(task_set.task_dict)
    with _lm_eval_output(progress), _no_git_lookup(evaluator):
        # HFLM sets a pad token on the tokenizer it is given: give it a copy.
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        results = evaluator.simple_evaluate(
            model=lm, tasks=tasks_given, task_manager=manager,
            num_fewshot=num_fewshot, limit=limit, log_samples=False)
    return _scores(results, time.perf_counter() - start, limit)


def _takes_task_objects() -> bool:
    """lm_eval 0.4's simple_evaluate takes built Task objects; 0.5's takes names only."""
    import lm_eval

    return str(getattr(lm_eval, "__version__", "")).startswith("0.4.")


@dataclass
class _Loaded:
    """Stands in for lm_eval 0.5's TaskManager inside simple_evaluate: its ``load`` returns
    the tasks already built (their data read in their YAML's folder), not a second copy."""

    task_dict: dict

    def load(self, specs, overrides=None) -> dict:
        return self.task_dict


@contextlib.contextmanager
def _no_git_lookup(evaluator) -> Iterator[None]:
    """simple_evaluate records the git commit of the working directory by running ``git
    describe``, which prints "fatal: not a git repository" outside one: not ours to record."""
    if not hasattr(evaluator, "get_git_commit_hash"):
        yield
        return
    with mock.patch.object(evaluator, "get_git_commit_hash", lambda: None):
        yield


def _include_paths(include_path) -> list[Path]:
    if include_path is None:
        return []
    items = [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
    paths = [Path(item).resolve() for item in items]  # tasks load in their YAML's folder
    for path in paths:
        if not path.is_dir():
            raise ProxSparseError(f"--include-path {str(path)!r} is not a directory: give a "
                                  "folder that holds task YAML files")
    return paths


def _task_manager(names: list[str], paths: list[Path]):
    """lm_eval's task index: of the local folders alone when they define every named task
    (indexing lm_eval's own thousands of tasks takes seconds), else of both."""
    from lm_eval.tasks import TaskManager

    if paths:
        local = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
        if all(name in local.all_tasks or _yaml_file(name) for name in names):
            return local
    manager = TaskManager(include_path=[str(p) for p in paths] or None)
    unknown = [name for name in names if name not in manager.all_tasks and not _yaml_file(name)]
    if unknown:
        where = " nor in --include-path" if paths else ""
        raise ProxSparseError(
            f"unknown task {', '.join(repr(n) for n in unknown)}: not an lm_eval task, group "
            f"or tag{where} (`lm-eval ls tasks` lists them)")
    return manager


def _yaml_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def _load_task(manager, name: str, progress: bool) -> dict:
    """The task or group ``name`` built by lm_eval with its data loaded (lm_eval 0.5 reads
    data lazily: read here, in the YAML's folder), as TaskManager.load returns it; one clear
    line when its data cannot be had."""
    folder = _local_folder(manager, name)
    try:
        with _lm_eval_output(progress), _working_directory(folder):
            loaded = manager.load([name])
            for task in loaded["tasks"].values():
                getattr(task, "dataset", None)
    except Exception as err:  # network, file and format errors come in many types
        hint = ("check the task's YAML and its data files (paths relative to the YAML's folder)"
                if folder is not None else
                "with no network, run local task YAMLs (--include-path)")
        raise ProxSparseError(f"task {name!r}: cannot load its data ({type(err).__name__}: "
                              f"{first_line(err)}); {hint}") from err
    return {key: dict(loaded.get(key, {})) for key in ("tasks", "groups", "group_map")}


def _local_folder(manager, name: str) -> Path | None:
    """The folder of a task's YAML when it is the user's (a path, or found under an include
    path), not one of lm_eval's own."""
    if _yaml_file(name):
        return Path(name).parent
    # lm_eval 0.4 names the index task_index, 0.5 _task_index (entries keep yaml_path)
    index = getattr(manager, "task_index", None) or getattr(manager, "_task_index", {})
    entry = index.get(name)
    path = getattr(entry, "yaml_path", None)
    if path is None:
        return None
    import lm_eval

    own = Path(lm_eval.__file__).resolve().parent
    path = Path(path).resolve()
    return None if path.is_relative_to(own) else path.parent


@contextlib.contextmanager
def _working_directory(folder: Path | None) -> Iterator[None]:
    """Run in ``folder`` (when given): lm_eval and datasets read a local task's relative
    ``data_files`` from the working directory; here they are relative to the YAML."""
    if folder is None:
        yield
        return
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def _lm_eval_output(progress: bool) -> Iterator[None]:
    """lm_eval's log at errors only (its warnings speak of its own command line), and, when
    ``progress`` is off, its progress bars (on stderr) dropped."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.ExitStack() as stack:
            if not progress:
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
            yield
    finally:
        logger.setLevel(level)


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _scores(results: dict, seconds: float, limit: int | None) -> ZeroShot:
    """lm_eval's results dictionary -> the scores of each task and group."""
    scores: dict[str, TaskScore] = {}
    shots = results.get("n-shot", {})
    samples = results.get("n-samples", {})
    for name, row in results["results"].items():
        metrics: dict[str, float] = {}
        stderr: dict[str, float | None] = {}
        for key, value in row.items():  # "acc,none": metric "acc" under filter "none"
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or _number(value) is None:
                continue
            label = metric if filt == "none" else f"{metric}[{filt}]"
            metrics[label] = _number(value)
            stderr[label] = _number(row.get(f"{metric}_stderr,{filt}"))
        count = samples.get(name, {}).get("effective")
        scores[name] = TaskScore(name, metrics, stderr, count, shots.get(name))
    groups = {g for g, kids in results.get("group_subtasks", {}).items() if kids}
    leaves = [name for name in scores if name not in groups]
    return ZeroShot(scores, leaves, seconds, limit)


__all__ = ["PAPER_TASKS", "TaskScore", "TaskSet", "ZeroShot", "load_tasks", "lm_eval_module",
           "parse_tasks", "zero_shot"]
