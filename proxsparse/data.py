"""Text sources and token windows for calibration and evaluation (DESIGN.md §5).

A *source* is ``builtin`` (Python's own documentation text: works with no network), ``c4`` or
``wikitext2`` (downloaded from the Hugging Face hub), or a local ``.txt`` / ``.jsonl`` /
``.parquet`` file. Calibration takes random windows with a fixed seed; evaluation cuts the text
into consecutive non-overlapping windows and drops the remainder. The hub sources need
``datasets``, parquet files ``pyarrow``: ``pip install 'proxsparse[data]'``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ProxSparseError, first_line
from .extras import require

HUB_SOURCES = ("c4", "wikitext2")
C4_SHARD = "en/c4-train.00000-of-01024.json.gz"


def builtin_text() -> str:
    """Python's documentation topics (``pydoc_data``), shipped with every CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def load_text(source: str) -> str:
    """The full text of a source as one string (for c4, a sample of documents joined)."""
    if source == "builtin":
        return builtin_text()
    if source == "wikitext2":
        return "\n\n".join(_hub_rows("wikitext", "wikitext-2-raw-v1", "test"))
    if source == "c4":
        return "\n\n".join(_hub_rows("allenai/c4", None, "train", data_files=C4_SHARD)[:20000])
    return _read_local(Path(source))


def _read_local(path: Path) -> str:
    if not path.exists():
        raise ProxSparseError(
            f"text source {str(path)!r} not found: give an existing .txt/.jsonl/.parquet file, "
            "'builtin' (offline), 'c4' or 'wikitext2' (download)"
        )
    if not path.is_file():
        raise ProxSparseError(f"text source {str(path)!r} is a directory: give a .txt, .jsonl "
                              "or .parquet file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
            text = "\n\n".join(_row_text(row, path) for row in rows)
        elif suffix == ".parquet":
            pq = require("pyarrow.parquet", f"reading {path.name}")
            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise ProxSparseError(f"{path}: parquet file has no 'text' column")
            text = "\n\n".join(str(t) for t in table.column("text").to_pylist())
        else:
            # newline="" keeps CRLF so it can be normalised explicitly (WikiText ships CRLF).
            with path.open(encoding="utf-8", newline="") as handle:
                text = handle.read().replace("\r\n", "\n")
    except UnicodeDecodeError as err:
        message = f"{path}: not UTF-8 text ({err.reason}); convert it to UTF-8"
        raise ProxSparseError(message) from err
    except json.JSONDecodeError as err:
        message = f"{path}: a line is not JSON ({err.msg}); write one object per line"
        raise ProxSparseError(message) from err
    except (OSError, ValueError) as err:  # unreadable, or a damaged parquet file
        message = f"{path}: cannot read it ({first_line(err)}); check the file"
        raise ProxSparseError(message) from err
    if not text.strip():
        raise ProxSparseError(f"{path}: the file holds no text; give a file with text in it")
    return text


def _row_text(row: object, path: Path) -> str:
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return row["text"]
    raise ProxSparseError(f"{path}: every JSON line needs a string field 'text'")


def _hub_rows(name: str, config: str | None, split: str, data_files: str | None = None) -> list:
    datasets = require("datasets", "loading c4 or wikitext2 from the hub")
    try:
        dataset = datasets.load_dataset(name, config, split=split, data_files=data_files)
    except Exception as err:  # network errors come in many types; all mean the same to a user
        raise ProxSparseError(
            f"cannot download {name!r} from the Hugging Face hub ({type(err).__name__}); "
            "with no network use --calib builtin or a local .txt/.jsonl/.parquet file"
        ) from err
    return list(dataset["text"])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D LongTensor, without special tokens."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def calibration_windows(
    tokenizer, source: str, num_windows: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """``[num_windows, seqlen]`` random windows of a source, reproducible from ``seed``."""
    return random_windows(tokenize(tokenizer, load_text(source)), num_windows, seqlen, seed,
                          source)


def random_windows(
    ids: torch.Tensor, num_windows: int, seqlen: int, seed: int = 0, source: str = "text"
) -> torch.Tensor:
    """``[num_windows, seqlen]`` windows at random offsets of the token ids ``ids``."""
    if len(ids) < seqlen:
        raise ProxSparseError(
            f"calibration text {source!r} has {len(ids)} tokens, shorter than one window of "
            f"{seqlen}; give more text or a smaller --seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen + 1, (num_windows,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping ``[w, seqlen]`` windows; the remainder is dropped."""
    count = len(ids) // seqlen
    if count == 0:
        raise ProxSparseError(
            f"evaluation text has {len(ids)} tokens, shorter than one window of {seqlen}; "
            "give more text or a smaller --seqlen"
        )
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seqlen].view(count, seqlen)
