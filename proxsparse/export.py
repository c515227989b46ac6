"""Saving pruned checkpoints atomically, the compact mask file, and N:M verification.

An output directory holds a plain Hugging Face checkpoint (loadable with
``AutoModelForCausalLM.from_pretrained``), ``masks.safetensors`` (per layer, the index of the
kept pattern of every group packed in ceil(log2 C(M,N)) bits: 3 bits per group for 2:4) and
``proxsparse.json`` (how the model was made).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .errors import ProxSparseError, first_line
from .nm import NM, is_valid_nm, nonzeros_per_group, pack_mask, unpack_mask

MASK_FILE = "masks.safetensors"
METADATA_FILE = "proxsparse.json"


def check_output_dir(
    out_dir: str | Path, overwrite: bool = False, source: Path | None = None,
    run_dir: Path | None = None,
) -> Path:
    """Fail early (before any long work) if ``out_dir`` may not be written: it is, or holds, the
    current directory, the model ``source`` or the ``run_dir``; it lies inside the source; it
    is a non-empty directory and not ``overwrite``, or not a proxsparse output (replacing
    deletes it); or its parent cannot be written."""
    out = Path(out_dir)
    where = out.resolve()
    held = {"the current directory": Path.cwd(), "the model": source, "the run directory": run_dir}
    for what, path in held.items():
        if path is not None and is_within(path, where):
            raise ProxSparseError(f"output {str(out)!r} is or holds {what} ({path}): "
                                  "choose a new directory for the output")
    if source is not None and is_within(where, source):
        raise ProxSparseError(f"output {str(out)!r} lies inside the model {str(source)!r}: "
                              "choose a directory outside it")
    if out.exists() and not out.is_dir():
        raise ProxSparseError(f"output {str(out)!r} exists and is a file: choose a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ProxSparseError(f"output directory {str(out)!r} is not empty: choose another "
                                  "or pass --overwrite")
        if not (out / METADATA_FILE).is_file():
            raise ProxSparseError(f"output directory {str(out)!r} is not empty and is not a "
                                  f"proxsparse output (no {METADATA_FILE}); --overwrite replaces "
                                  "only those: choose another directory")
    _check_writable(where)
    return out


def is_within(path: str | Path, parent: str | Path) -> bool:
    """True when ``path`` is ``parent`` or lies inside it (both resolved: links, ``..``)."""
    return Path(path).resolve().is_relative_to(Path(parent).resolve())


def _check_writable(out: Path) -> None:
    """Create and remove a directory where the output's staging directory will go."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    try:
        Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent)).rmdir()
    except OSError as err:
        raise ProxSparseError(f"cannot write the output in {str(parent)!r} "
                              f"({err.strerror or type(err).__name__}): choose another "
                              "directory") from err


def save(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    masks: dict[str, torch.Tensor],
    nm: NM,
    metadata: dict,
    overwrite: bool = False,
    extra_files: tuple[Path, ...] = (),
) -> Path:
    """Write checkpoint, mask file, metadata (and ``extra_files``, e.g. a training log) to
    ``out_dir``, all or nothing."""
    with staged_output(out_dir, overwrite) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        save_masks(staging / MASK_FILE, masks, nm)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        for path in extra_files:
            shutil.copy2(path, staging / Path(path).name)
    return Path(out_dir).resolve()


@contextmanager
def staged_output(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory beside ``out_dir``; on success it replaces ``out_dir`` in one
    rename, on any failure (Ctrl-C included) it is removed: all or nothing."""
    out = check_output_dir(out_dir, overwrite).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_copies(out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _remove_stale_copies(out: Path) -> None:
    """Staging and retired copies of ``out`` (``.<name>.partial-<pid>``, ``.<name>.old-<pid>``)
    left by a save whose process died (kill -9): no process of that id runs any more."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-([0-9]+)")
    for path in out.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and int(match[2]) > 0 and not _process_exists(int(match[2])):
            shutil.rmtree(path, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only checked
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _swap_into_place(staging: Path, out: Path) -> None:
    retired = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(retired)
    staging.rename(out)
    shutil.rmtree(retired, ignore_errors=True)


def save_masks(path: Path, masks: dict[str, torch.Tensor], nm: NM) -> None:
    """Write the packed masks; the same masks give the same bytes, in any process."""
    tensors = {name: pack_mask(mask, nm) for name, mask in masks.items()}
    header = {"nm": str(nm), "shapes": json.dumps({name: list(mask.shape)
                                                   for name, mask in masks.items()},
                                                  sort_keys=True)}
    write_safetensors(path, tensors, {**header, "sha256": _mask_digest(header, tensors)})


# safetensors' names of the torch dtypes written here
_SAFETENSORS_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
    torch.int32: "I32", torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float32: "F32", torch.float64: "F64",
}


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str]) -> None:
    """A safetensors file whose bytes depend on the tensors and metadata alone.

    safetensors' own writer keeps the metadata in a hash map, so the order of its keys (and the
    file's bytes) changes from process to process. Here: the 8-byte little-endian length of a
    JSON header with sorted keys (each tensor's dtype, shape and data offsets, tensors in name
    order, and ``__metadata__``), padded with spaces to a multiple of 8, then the tensors' raw
    little-endian bytes in name order.
    """
    if sys.byteorder != "little":  # the format is little-endian; raw bytes here are native
        raise ProxSparseError("writing safetensors needs a little-endian machine")
    header: dict[str, object] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    chunks, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"cannot write a {tensor.dtype} tensor ({name}) to safetensors")
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for raw in chunks:
            handle.write(raw)


def _mask_digest(header: dict[str, str], packed: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a mask file's nm, shapes and packed bits (safetensors keeps no checksum)."""
    digest = hashlib.sha256(json.dumps([header["nm"], header["shapes"]]).encode())
    for name in sorted(packed):
        digest.update(name.encode())
        digest.update(packed[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_masks(path: str | Path) -> tuple[dict[str, torch.Tensor], NM]:
    """Read a mask file (or the one inside a checkpoint directory) back to boolean masks."""
    path = Path(path)
    if path.is_dir():
        path = path / MASK_FILE
    if not path.is_file():
        raise ProxSparseError(f"no mask file at {str(path)!r}: give a proxsparse output directory")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        if "nm" not in header or "shapes" not in header:
            raise ProxSparseError(f"{path} is not a proxsparse mask file (no nm/shapes metadata)")
        nm = NM.parse(header["nm"])
        shapes = json.loads(header["shapes"])
        packed = load_file(str(path))
        if "sha256" in header and _mask_digest(header, packed) != header["sha256"]:
            raise ValueError("its checksum does not match its contents")
        masks = {name: unpack_mask(packed[name], tuple(shapes[name]), nm) for name in shapes}
    except ProxSparseError:
        raise
    except Exception as err:  # a damaged file surfaces as many exception types
        raise ProxSparseError(f"mask file {str(path)!r} is damaged ({first_line(err)}): "
                              "export the model again") from err
    return masks, nm


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every weight outside its mask (e.g. a dense model + a saved mask file)."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        if name not in modules:
            raise ProxSparseError(f"mask names layer {name!r}, which this model does not have")
        weight = modules[name].weight
        if tuple(weight.shape) != tuple(mask.shape):
            raise ProxSparseError(f"mask for {name} has shape {tuple(mask.shape)}, "
                                  f"the layer {tuple(weight.shape)}: wrong model for this mask")
        weight.mul_(mask.to(weight.device, weight.dtype))


@dataclass
class LayerCheck:
    name: str
    shape: tuple[int, int]
    sparsity: float
    max_nonzeros: int  # most non-zeros found in any group
    valid: bool


def verify(
    model: nn.Module, layer_names: list[str], nm: NM, masks: dict[str, torch.Tensor] | None = None
) -> list[LayerCheck]:
    """Check every named layer: no group of M holds more than N non-zeros, and, when ``masks``
    are given, no non-zero outside the layer's mask."""
    modules = dict(model.named_modules())
    checks = []
    for name in layer_names:
        if name not in modules:
            raise ProxSparseError(f"layer {name!r} named in the metadata is not in the model")
        weight = modules[name].weight.detach()
        counts = nonzeros_per_group(weight, nm.m)
        valid = is_valid_nm(weight, nm)
        if masks is not None:
            mask = masks.get(name)
            valid = valid and mask is not None and not bool(((weight != 0) & ~mask).any())
        checks.append(LayerCheck(
            name, tuple(weight.shape), float((weight == 0).float().mean()), int(counts.max()), valid
        ))
    return checks


def read_metadata(model_dir: str | Path) -> dict | None:
    """The directory's ``proxsparse.json`` (None when it has none); refuses a damaged one."""
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        return None
    fix = f"export the model again, or remove {METADATA_FILE} to check the N:M pattern alone"
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: not JSON, not UTF-8
        raise ProxSparseError(f"{str(path)!r} is damaged ({first_line(err)}): {fix}") from err
    valid = (isinstance(metadata, dict) and isinstance(metadata.get("nm"), str)
             and isinstance(metadata.get("targets"), list)
             and all(isinstance(name, str) for name in metadata["targets"]))
    if not valid:
        raise ProxSparseError(f"{str(path)!r} is not proxsparse metadata (no nm and targets): "
                              f"{fix}")
    return metadata
