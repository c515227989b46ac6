"""The run directory: what it writes, what it removes, what it refuses to resume from."""

import pytest
import torch

from proxsparse.runlog import CHECKPOINT_FILE, LOG_FILE, RunDir


def test_nothing_is_written_before_the_first_flush(tmp_path):
    run = RunDir(tmp_path / "run")
    run.record(0, loss=torch.tensor(1.0))
    assert not (tmp_path / "run").exists()
    run.flush()
    assert (tmp_path / "run" / LOG_FILE).is_file()


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), RunDir(tmp_path / "a" / "run") as run:
        run.record(0, loss=torch.tensor(1.0))
        run.flush()
        raise RuntimeError("out of memory")
    assert list(tmp_path.iterdir()) == [tmp_path / "a"]  # only what the run created goes


def test_a_run_that_fails_after_a_checkpoint_keeps_it(tmp_path):
    with pytest.raises(KeyboardInterrupt), RunDir(tmp_path / "run") as run:
        run.record(0, loss=torch.tensor(1.0))
        run.save_checkpoint({"step": 1}, {})
        raise KeyboardInterrupt
    assert (tmp_path / "run" / CHECKPOINT_FILE).is_file()
    RunDir(tmp_path / "run").remove()
    assert not (tmp_path / "run").exists()


def test_remove_keeps_a_directory_it_did_not_create(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    run = RunDir(tmp_path)
    run.save_checkpoint({"step": 1}, {})
    (tmp_path / (CHECKPOINT_FILE + ".tmp")).write_bytes(b"half a save")
    run.remove()
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
