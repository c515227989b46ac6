import json

import pytest
import torch

from proxsparse import data
from proxsparse.errors import ProxSparseError


def test_builtin_text_is_long_enough_for_the_benchmark_setting(tokenizer):
    assert len(data.builtin_text()) > 400_000


def test_calibration_windows_are_reproducible(tokenizer):
    a = data.calibration_windows(tokenizer, "builtin", 6, 16, seed=3)
    b = data.calibration_windows(tokenizer, "builtin", 6, 16, seed=3)
    c = data.calibration_windows(tokenizer, "builtin", 6, 16, seed=4)
    assert a.shape == (6, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eval_windows_are_consecutive_and_drop_the_remainder():
    ids = torch.arange(103)
    windows = data.eval_windows(ids, 10)
    assert windows.shape == (10, 10) and torch.equal(windows.flatten(), ids[:100])
    assert data.eval_windows(ids, 10, max_windows=3).shape == (3, 10)
    with pytest.raises(ProxSparseError, match="shorter than one window"):
        data.eval_windows(ids, 200)


def test_local_sources(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"line one\r\nline two\r\n")
    assert data.load_text(str(tmp_path / "a.txt")) == "line one\nline two\n"
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": "y"}))
    assert data.load_text(str(tmp_path / "b.jsonl")) == "x\n\ny"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p", "q"]}), tmp_path / "c.parquet")
    assert data.load_text(str(tmp_path / "c.parquet")) == "p\n\nq"


@pytest.mark.parametrize("content,message", [
    (b"", "holds no text"),
    (b"\xff\xfe\xfa", "not UTF-8"),
])
def test_bad_local_files(tmp_path, content, message):
    (tmp_path / "bad.txt").write_bytes(content)
    with pytest.raises(ProxSparseError, match=message):
        data.load_text(str(tmp_path / "bad.txt"))


def test_bad_jsonl(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ProxSparseError, match="'text'"):
        data.load_text(str(tmp_path / "bad.jsonl"))


def test_missing_file():
    with pytest.raises(ProxSparseError, match="not found"):
        data.load_text("/nonexistent/calib.txt")


def test_short_calibration_text(tmp_path, tokenizer):
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ProxSparseError, match="shorter than one window"):
        data.calibration_windows(tokenizer, str(tmp_path / "short.txt"), 4, 512)


def test_unreachable_hub_suggests_offline_sources(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for source in ("c4", "wikitext2"):
        with pytest.raises(ProxSparseError, match="builtin"):
            data.load_text(source)


def test_readme_python_example_shows_an_offline_text_source():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python\n", 1)[1].split("\n## ", 1)[0]
    sources = re.findall(r'load_text\("([^"]+)"\)', section)
    offline = [s for s in sources if s not in data.HUB_SOURCES]
    assert offline, f"the Python example only shows hub sources {sources}"
    for source in offline:
        path = root / source
        if source == "builtin" or path.is_file():  # the shared folder is not always there
            assert len(data.load_text(str(path) if path.is_file() else source)) > 100_000
