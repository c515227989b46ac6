"""The working directory of a learning run: a JSON-lines log, a plot, and a resumable checkpoint.

Metrics are recorded as tensors and written in batches, so the training loop never waits for
the device to report a number at every step.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from .errors import ProxSparseError, first_line
from .extras import missing_message

LOG_FILE = "log.jsonl"
PLOT_FILE = "progress.png"
CHECKPOINT_FILE = "checkpoint.pt"
RUN_FILES = (LOG_FILE, PLOT_FILE, CHECKPOINT_FILE)  # what a run writes; nothing else is removed
MARKER_FILE = ".proxsparse-run"  # {"created": bool}: the directory holds a run's files


class RunDir:
    """Log, plot and checkpoint of one learning run. ``path=None`` keeps metrics in memory only.

    Nothing is written until the first log flush or checkpoint. A directory the run creates is
    marked (``.proxsparse-run``); :meth:`remove` deletes only the run's own files and then the
    directory, if the run created it and nothing else is left in it.
    """

    def __init__(self, path: str | Path | None, resume: bool = False,
                 identity: dict | None = None, writer: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.resume = resume
        self.writer = writer  # False: reads checkpoints, writes nothing (ranks > 0)
        self.identity = identity or {}  # what a checkpoint must match to be resumed
        self.pending: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.history: list[dict] = []
        self.opened = False
        if self.path is None:
            return
        check_run_dir(self.path)
        if resume and (self.path / LOG_FILE).exists():
            self.history = self._read_log(self.path / LOG_FILE)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """A run that fails before its first checkpoint leaves nothing behind."""
        if kind is not None and self.path is not None and self.writer:
            if not (self.path / CHECKPOINT_FILE).exists():
                self.remove()

    def _open(self) -> Path:
        """The directory, created (and marked as the run's) at the first write. A fresh run
        drops what an earlier run left there."""
        if not self.opened:
            if not self.path.is_dir():
                self.path.mkdir(parents=True)
                (self.path / MARKER_FILE).write_text(json.dumps({"created": True}) + "\n")
            elif not (self.path / MARKER_FILE).exists():
                (self.path / MARKER_FILE).write_text(json.dumps({"created": False}) + "\n")
            if not self.resume:
                for name in RUN_FILES:
                    (self.path / name).unlink(missing_ok=True)
            self.opened = True
        return self.path

    def remove(self) -> None:
        """Delete the run's own files, then the directory if the run created it and it is now
        empty. Anything else in it is left alone."""
        if self.path is None or not self.path.is_dir() or not self.writer:
            return
        marker = self.path / MARKER_FILE
        created = _read_marker(marker).get("created") is True
        for name in RUN_FILES:
            for path in (self.path / name, self.path / (name + ".tmp")):
                if path.is_file() or path.is_symlink():
                    path.unlink()
        marker.unlink(missing_ok=True)
        if created and not any(self.path.iterdir()):
            self.path.rmdir()

    def record(self, step: int, **metrics: torch.Tensor) -> None:
        """Keep this step's metrics (detached tensors) until the next ``flush``."""
        self.pending.append((step, {k: v.detach() for k, v in metrics.items()}))

    def flush(self) -> dict | None:
        """Write pending metrics (one host sync for all of them); return the latest row."""
        if not self.pending:
            return self.history[-1] if self.history else None
        names = list(self.pending[0][1])
        values = torch.stack([torch.stack([m[n].float() for n in names]) for _, m in self.pending])
        rows = [{"step": step, **dict(zip(names, row, strict=True))}
                for (step, _), row in zip(self.pending, values.cpu().tolist(), strict=True)]
        self.pending.clear()
        # Rows past the resume point were logged by the interrupted run: replace them.
        self.history = [r for r in self.history if r["step"] < rows[0]["step"]] + rows
        if self.path is not None and self.writer:
            _atomic_write_text(self._open() / LOG_FILE,
                               "".join(json.dumps(r) + "\n" for r in self.history))
        return rows[-1]

    def finish(self, title: str) -> None:
        """The last flush and the plot (a failure here, too, leaves nothing without a
        checkpoint)."""
        with self:
            self.flush()
            self.plot(title)

    def plot(self, title: str) -> Path | None:
        """Each logged metric against the step, one panel each, as ``progress.png``; without
        matplotlib (the ``plot`` extra) a one-line warning says it is skipped."""
        if self.path is None or not self.history or not self.writer:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            warnings.warn(f"{PLOT_FILE} not drawn: "
                          + missing_message("matplotlib", "the progress plot"), stacklevel=2)
            return None

        names = [k for k in self.history[0] if k != "step"]
        fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.2 * len(names)), sharex=True,
                                 squeeze=False)
        steps = [r["step"] for r in self.history]
        for ax, name in zip(axes[:, 0], names, strict=True):
            ax.plot(steps, [r[name] for r in self.history], linewidth=1)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(title)
        fig.tight_layout()
        out = self._open() / PLOT_FILE
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    # --- checkpoints ---

    def save_checkpoint(self, state: dict) -> None:
        """Flush the log, then save ``state`` (atomically) with the run's identity, so that a
        run resumed from it (even after a kill) has a log of every step."""
        if self.path is None or not self.writer:
            return
        self.flush()
        tmp = self._open() / (CHECKPOINT_FILE + ".tmp")
        torch.save({**state, "identity": self.identity}, tmp)
        os.replace(tmp, self.path / CHECKPOINT_FILE)

    def load_checkpoint(self, fields: dict[str, type]) -> dict | None:
        """The saved state, or None; refuses a checkpoint of a run with another identity, and a
        file that is damaged (checksums), holds more than tensors and plain values (loading it
        executes nothing), or lacks any of ``fields`` (name -> type)."""
        if self.path is None or not (self.path / CHECKPOINT_FILE).exists():
            return None
        state = self._read_checkpoint(self.path / CHECKPOINT_FILE)
        saved = state.get("identity", {})
        if saved != self.identity:
            changed = sorted(k for k in self.identity.keys() | saved.keys()
                             if self.identity.get(k) != saved.get(k))
            raise ProxSparseError(
                f"cannot resume from {self.path}: the inputs or settings differ from the "
                f"interrupted run ({', '.join(changed)}); use the same ones, or delete that "
                "directory")
        missing = [name for name, kind in fields.items() if not isinstance(state.get(name), kind)]
        if missing:
            raise self._unreadable(self.path / CHECKPOINT_FILE, f"no valid {', '.join(missing)}")
        return state

    def _read_log(self, path: Path) -> list[dict]:
        try:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
        except (OSError, ValueError) as err:  # ValueError: not JSON, not UTF-8
            raise self._unreadable(path, first_line(err)) from err
        if not all(isinstance(row, dict) and isinstance(row.get("step"), int) for row in rows):
            raise self._unreadable(path, "a line is not a logged step")
        return rows

    def _read_checkpoint(self, path: Path) -> dict:
        try:
            with zipfile.ZipFile(path) as archive:  # torch.load does not check the CRCs
                damaged = archive.testzip()
            if damaged is not None:
                raise ValueError(f"{damaged} fails its checksum")
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise self._unreadable(path, "it holds objects other than tensors and plain "
                                         "values, so proxsparse did not write it") from err
        except Exception as err:  # a damaged file surfaces as many exception types
            raise self._unreadable(path, first_line(err)) from err
        if not isinstance(state, dict) or not isinstance(state.get("identity", {}), dict):
            raise self._unreadable(path, "not a proxsparse checkpoint")
        return state

    def _unreadable(self, path: Path, reason: str) -> ProxSparseError:
        return ProxSparseError(f"cannot resume from {path}: it is corrupt ({reason}); delete "
                               f"{self.path} to start afresh, or run without --resume")

    def files(self) -> list[Path]:
        """The log and plot, to copy beside an exported model."""
        if self.path is None:
            return []
        return [p for p in (self.path / LOG_FILE, self.path / PLOT_FILE) if p.exists()]


def fingerprint(tensors: list[torch.Tensor], samples: int = 4096) -> str:
    """A short digest of the tensors' shapes and dtypes and the exact bits of ``samples``
    evenly spaced values of each (all of a smaller one), read with one host transfer."""
    picked = []
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)
        bits = flat[:: max(1, flat.numel() // samples)][:samples]
        picked.append(bits.view(_SAME_SIZE_INT[bits.element_size()]).long())
    values = torch.cat(picked).cpu() if picked else torch.zeros(0, dtype=torch.long)
    digest = hashlib.sha256(repr([(tuple(t.shape), str(t.dtype)) for t in tensors]).encode())
    digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def check_run_dir(path: Path) -> None:
    """Refuse a run directory that is a file, or that holds files of the run's names which no
    proxsparse run wrote (they would be overwritten, then removed)."""
    if path.exists() and not path.is_dir():
        raise ProxSparseError(f"run directory {str(path)!r} is a file: give a directory")
    if path.is_dir() and not (path / MARKER_FILE).exists():
        foreign = [name for name in RUN_FILES if (path / name).exists()]
        if foreign:
            raise ProxSparseError(
                f"run directory {str(path)!r} already holds {', '.join(foreign)}, not written "
                "by a proxsparse run: choose another --run-dir")


def _read_marker(path: Path) -> dict:
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class DeferredInterrupt:
    """Context manager: Ctrl-C (SIGINT) sets ``requested`` instead of interrupting mid-step, so
    the loop can stop at a step boundary with a consistent checkpoint. A second Ctrl-C
    interrupts at once. Outside the main thread it does nothing."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> DeferredInterrupt:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
