"""Optional dependencies (the plot, data and eval extras): the base install imports without
them, and each piece that needs one says which extra to install, in one line."""

import subprocess
import sys
from pathlib import Path

import pytest

import proxsparse as ps
from proxsparse import data
from proxsparse.cli import main
from proxsparse.errors import ProxSparseError
from proxsparse.runlog import LOG_FILE, PLOT_FILE, RunDir

OPTIONAL = ("matplotlib", "datasets", "pyarrow", "lm_eval", "torchao")
ROOT = Path(__file__).resolve().parents[1]


def block(monkeypatch, *modules: str) -> None:
    """Make ``import module`` fail as if the package were not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_the_base_install_imports_without_the_extras():
    code = (
        "import importlib.abc, sys\n"
        f"blocked = {OPTIONAL!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in blocked:\n"
        "            raise ModuleNotFoundError(name, name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import proxsparse, proxsparse.cli\n"
        "proxsparse.cli.build_parser()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in blocked))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_missing_lm_eval_names_the_eval_extra(monkeypatch, model, tokenizer, capsys):
    block(monkeypatch, "lm_eval")
    with pytest.raises(ProxSparseError, match=r"pip install 'proxsparse\[eval\]'"):
        ps.zero_shot(model, tokenizer, "boolq")
    capsys.readouterr()
    code = main(["eval", "missing-model", "--tasks", "boolq", "--quiet"])  # before any load
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err == ("error: zero-shot evaluation (--tasks) needs lm_eval: "
                   "pip install 'proxsparse[eval]'\n")


@pytest.mark.parametrize("source", ["import nothing_of_that_name_here", "__version__ = '0.6.0'"])
def test_a_broken_or_foreign_lm_eval_is_one_line(monkeypatch, tmp_path, model, tokenizer,
                                                 source):
    fake = tmp_path / "lm_eval"
    fake.mkdir()
    (fake / "__init__.py").write_text(source + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] == "lm_eval"]:
        monkeypatch.delitem(sys.modules, name)
    expected = "does not import" if "import" in source else "needs lm_eval 0.4 or 0.5, found 0.6.0"
    try:
        with pytest.raises(ProxSparseError, match=expected):
            ps.zero_shot(model, tokenizer, "boolq")
    finally:  # drop the fake; monkeypatch then puts back any real lm_eval it removed
        for name in [m for m in sys.modules if m.split(".")[0] == "lm_eval"]:
            del sys.modules[name]


def test_missing_datasets_names_the_data_extra(monkeypatch):
    block(monkeypatch, "datasets")
    for source in data.HUB_SOURCES:
        with pytest.raises(ProxSparseError, match=r"needs datasets: pip install "
                                                  r"'proxsparse\[data\]'"):
            data.load_text(source)


def test_missing_pyarrow_names_the_data_extra(monkeypatch, tmp_path):
    block(monkeypatch, "pyarrow", "pyarrow.parquet")
    path = tmp_path / "text.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ProxSparseError, match=r"reading text.parquet needs pyarrow: "
                                              r"pip install 'proxsparse\[data\]'"):
        data.load_text(str(path))


def test_missing_matplotlib_skips_the_plot_with_a_note(monkeypatch, tmp_path):
    import torch

    block(monkeypatch, "matplotlib", "matplotlib.pyplot")
    run = RunDir(tmp_path / "run")
    run.record(0, loss=torch.tensor(1.0))
    with pytest.warns(UserWarning, match=r"progress.png not drawn: .* pip install "
                                         r"'proxsparse\[plot\]'"):
        run.finish("a run")
    assert (tmp_path / "run" / LOG_FILE).is_file()
    assert not (tmp_path / "run" / PLOT_FILE).exists()


def test_a_learning_run_without_matplotlib_finishes(monkeypatch, tmp_path, capsys, model_dir):
    block(monkeypatch, "matplotlib", "matplotlib.pyplot")
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["prune", "--model", model_dir, "--method", "proxsparse", "--calib-windows", "2",
                 "--seqlen", "32", "--steps", "2", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    note = ("warning: progress.png not drawn: the progress plot needs matplotlib: "
            "pip install 'proxsparse[plot]'\n")
    assert err.count(note) == 1
    assert (out / LOG_FILE).is_file() and not (out / PLOT_FILE).exists()
