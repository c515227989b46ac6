"""The run directory: what it writes, what it removes, what it refuses to resume from."""

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from proxsparse.errors import ProxSparseError
from proxsparse.runlog import CHECKPOINT_FILE, LOG_FILE, RunDir, fingerprint
from tests.conftest import WritesAMarker, damage, own_run_dir


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
        run.save_checkpoint({"step": 1})
        raise KeyboardInterrupt
    assert (tmp_path / "run" / CHECKPOINT_FILE).is_file()
    RunDir(tmp_path / "run").remove()
    assert not (tmp_path / "run").exists()


def test_remove_keeps_a_directory_it_did_not_create(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    run = RunDir(tmp_path)
    run.save_checkpoint({"step": 1})
    (tmp_path / (CHECKPOINT_FILE + ".tmp")).write_bytes(b"half a save")
    run.remove()
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_malicious_checkpoint_executes_nothing(tmp_path):
    run_dir = own_run_dir(tmp_path / "run")
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "identity": {}, "payload": WritesAMarker(marker)},
               run_dir / CHECKPOINT_FILE)
    with pytest.raises(ProxSparseError, match="objects other than tensors") as err:
        RunDir(run_dir, resume=True).load_checkpoint({"step": int})
    assert str(run_dir / CHECKPOINT_FILE) in str(err.value) and "--resume" in str(err.value)
    assert not marker.exists()


def test_a_checkpoint_without_its_fields_is_refused(tmp_path):
    run_dir = own_run_dir(tmp_path / "run")
    with pytest.raises(ProxSparseError, match="no valid params"):
        RunDir(run_dir, resume=True).load_checkpoint({"step": int, "params": list})


STATE = {"step": 3, "params": [torch.arange(64, dtype=torch.float32)],
         "schedule": {"base_lrs": [0.001], "betas": (0.9, 0.999)}}


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_damaged_checkpoint_bytes_are_refused_or_harmless(data):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = own_run_dir(Path(tmp) / "run")
        RunDir(run_dir, identity={"lr": 0.001}).save_checkpoint(STATE)
        path = run_dir / CHECKPOINT_FILE
        damage(path, data)
        try:
            state = RunDir(run_dir, resume=True, identity={"lr": 0.001}).load_checkpoint(
                {"step": int, "params": list, "schedule": dict})
        except ProxSparseError as err:
            assert "corrupt" in str(err) or "settings differ" in str(err)
            return
        assert state["step"] == 3 and torch.equal(state["params"][0], STATE["params"][0])
        assert state["schedule"] == STATE["schedule"]


@pytest.mark.parametrize("log", [b"{not json\n", b"\xff\xfe\n", b'{"loss": 1.0}\n', b"[1]\n"])
def test_a_corrupt_log_is_refused_on_resume(tmp_path, log):
    run_dir = own_run_dir(tmp_path / "run")
    (run_dir / LOG_FILE).write_bytes(log)
    with pytest.raises(ProxSparseError, match="corrupt"):
        RunDir(run_dir, resume=True)


def test_the_log_is_flushed_with_every_checkpoint(tmp_path):
    run = RunDir(tmp_path / "run")
    for step in range(3):
        run.record(step, loss=torch.tensor(float(step)))
    run.save_checkpoint({"step": 3})  # a kill now loses no logged step
    rows = RunDir(tmp_path / "run", resume=True).history
    assert [row["step"] for row in rows] == [0, 1, 2]


def test_fingerprint_sees_shapes_dtypes_and_values():
    weights = [torch.randn(64, 128), torch.randn(32, 64).bfloat16()]
    same = [w.clone() for w in weights]
    assert fingerprint(weights) == fingerprint(same)
    same[0][0, 0] += 1
    assert fingerprint(weights) != fingerprint(same)
    assert fingerprint(weights) != fingerprint([weights[0].view(128, 64), weights[1]])
    assert fingerprint(weights) != fingerprint([weights[0].double(), weights[1]])
