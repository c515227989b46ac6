"""The command line, in-process: the happy path and one clear line for each bad input."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from proxsparse.cli import main
from proxsparse.data import builtin_text
from proxsparse.errors import ProxSparseError
from tests.conftest import (
    WritesAMarker,
    make_model,
    make_tokenizer,
    own_run_dir,
    write_custom_code_model,
)


def run(capsys, *argv):
    capsys.readouterr()  # only what this command prints
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def calibration_file(tmp_path) -> Path:
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    return text


def test_prune_eval_verify(tmp_path, capsys, model_dir):
    text = calibration_file(tmp_path)
    out = tmp_path / "pruned"
    code, stdout, _ = run(capsys, "prune", "--model", model_dir, "--method", "sparsegpt",
                          "--calib", text, "--calib-windows", 4, "--seqlen", 32,
                          "--blocksize", 32, "--out", out, "--quiet")
    assert code == 0, stdout
    assert "pruned 14 layers to 2:4" in stdout
    meta = json.loads((out / "proxsparse.json").read_text())
    assert meta["method"] == "sparsegpt" and meta["nm"] == "2:4"
    assert meta["hyperparameters"] == {"blocksize": 32, "dampening": 0.01, "offload": ""}
    assert meta["calibration"] == {"source": str(text), "windows": 4, "seqlen": 32, "seed": 0}
    assert len(meta["layers"]) == 14 and meta["skipped"] == {}

    code, stdout, _ = run(capsys, "eval", out, "--text", text, "--seqlen", 32,
                          "--max-windows", 3, "--json", "--quiet")
    result = json.loads(stdout)
    assert code == 0 and result["windows"] == 3 and result["tokens"] == 3 * 31
    assert result["ppl"] > 1

    code, stdout, _ = run(capsys, "verify", out)
    assert code == 0 and "14/14 layers valid 2:4" in stdout

    weights = load_file(out / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] = torch.ones_like(
        weights["model.layers.1.mlp.up_proj.weight"])
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    code, stdout, err = run(capsys, "verify", out)
    assert code == 1 and "model.layers.1.mlp.up_proj" in err and "13/14" in stdout


def test_finetuned_magnitude_reads_calibration_and_stays_exact(tmp_path, capsys, model_dir):
    out = tmp_path / "tuned"
    code, stdout, _ = run(capsys, "prune", "--model", model_dir, "--method", "magnitude",
                          "--calib", calibration_file(tmp_path), "--calib-windows", 4,
                          "--seqlen", 32,
                          "--finetune-steps", 2, "--finetune-lr", 1e-3, "--out", out, "--quiet")
    assert code == 0, stdout
    meta = json.loads((out / "proxsparse.json").read_text())
    assert meta["hyperparameters"] == {"finetune_steps": 2, "finetune_lr": 1e-3}
    assert meta["calibration"]["windows"] == 4
    code, stdout, _ = run(capsys, "verify", out)
    assert code == 0 and "14/14 layers valid 2:4" in stdout


def test_skipped_layers_are_listed_in_the_metadata(tmp_path, capsys, odd_model_dir):
    out = tmp_path / "pruned"
    code, stdout, _ = run(capsys, "prune", "--model", odd_model_dir, "--method", "magnitude",
                          "--nm", "4:8", "--out", out, "--quiet")
    assert code == 0 and "skipped 2" in stdout
    meta = json.loads((out / "proxsparse.json").read_text())
    assert set(meta["skipped"]) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    assert run(capsys, "verify", out)[0] == 0


def write_nan_model(tmp_path, model_dir):
    import shutil

    bad = tmp_path / "nan-model"
    shutil.copytree(model_dir, bad)
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    return bad


def copy_model(tmp_path, model_dir, name):
    import shutil

    return Path(shutil.copytree(model_dir, tmp_path / name))


def bad_inputs(tmp_path, model_dir):
    """Label -> (prune options after the defaults, text the error line must hold)."""
    (tmp_path / "broken.gguf").write_bytes(b"GGUF but not really")
    (tmp_path / "ggufs").mkdir()
    (tmp_path / "ggufs" / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("a few words")
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "papers").mkdir()
    (tmp_path / "papers" / "draft.txt").write_text("mine")
    source = copy_model(tmp_path, model_dir, "source-model")
    nested = copy_model(tmp_path, model_dir, "models/tiny")
    evil = own_run_dir(tmp_path / "evil.run")
    torch.save({"step": 1, "payload": WritesAMarker(tmp_path / "pwned")}, evil / "checkpoint.pt")
    bad_log = own_run_dir(tmp_path / "bad-log.run")
    (bad_log / "log.jsonl").write_text("{half a line")
    learn = ["--model", model_dir, "--method", "proxsparse", "--resume", "--run-dir"]
    proxsparse, maskpro, sparsegpt = (["--model", model_dir, "--method", method]
                                      for method in ("proxsparse", "maskpro", "sparsegpt"))
    missing_cuda = "cuda:99" if torch.cuda.is_available() else "cuda"
    return {
        "missing model dir": (["--model", tmp_path / "nope" / "model.gguf"], "not found"),
        "not a checkpoint": (["--model", tmp_path / "notamodel"], "no config.json"),
        "corrupt gguf": (["--model", tmp_path / "broken.gguf"], "corrupt"),
        "hub unreachable": (["--model", "no-such-org/no-such-model"], "local directory"),
        "n >= m": (["--model", model_dir, "--nm", "4:4"], "0 < N < M"),
        "non-numeric nm": (["--model", model_dir, "--nm", "two:four"], "two integers"),
        "m divides no width": (["--model", model_dir, "--nm", "2:3"],
                               "input size (64, 128) is not a multiple of M=3; use a pattern "
                               "whose M divides them, e.g. --nm 2:4"),
        "empty calib": (["--model", model_dir, "--calib", tmp_path / "empty.txt"], "no text"),
        "short calib": (["--model", model_dir, "--calib", tmp_path / "short.txt"],
                        "shorter than one window"),
        "missing calib": (["--model", model_dir, "--calib", tmp_path / "none.txt"], "not found"),
        "nan weights": (["--model", write_nan_model(tmp_path, model_dir)], "NaN or Inf"),
        "nothing matched": (["--model", model_dir, "--ignore", "*"], "no target layer matched"),
        "foreign option": (["--model", model_dir, "--blocksize", "64"],
                           "does not apply to method wanda"),
        # a learning run given bad input leaves no run directory either
        "learning, nan weights": ([*proxsparse, "--model", tmp_path / "nan-model"], "NaN or Inf"),
        "learning, nothing matched": ([*maskpro, "--include", "nope"], "no target layer"),
        "learning, out not empty": ([*proxsparse, "--out", tmp_path / "papers"], "not empty"),
        "learning, no windows": ([*proxsparse, "--calib-windows", 0], "--calib-windows must"),
        # outputs that would delete what is not ours
        "out is the working dir": (["--model", model_dir, "--out", ".", "--overwrite"],
                                   "current directory"),
        "out holds the working dir": (["--model", model_dir, "--out", tmp_path, "--overwrite"],
                                      "current directory"),
        "out is the model": (["--model", source, "--out", source, "--overwrite"],
                             "holds the model"),
        "out holds the model": (["--model", nested, "--out", nested.parent, "--overwrite"],
                                "holds the model"),
        "out inside the model": (["--model", source, "--out", source / "pruned"],
                                 "inside the model"),
        "out holds the gguf": (["--model", tmp_path / "ggufs" / "m.gguf", "--out",
                                tmp_path / "ggufs", "--overwrite"], "holds the model"),
        "overwrite a foreign dir": (["--model", model_dir, "--out", tmp_path / "papers",
                                     "--overwrite"], "not a proxsparse output"),
        "out holds the run dir": (["--model", model_dir, "--method", "proxsparse", "--run-dir",
                                   tmp_path / "out" / "run"], "holds the run directory"),
        "out not writable": (["--model", model_dir, "--out", "/proc/x"], "cannot write"),
        "out under a file": (["--model", model_dir, "--out", tmp_path / "short.txt" / "x"],
                             "cannot write"),
        "calib is a directory": (["--model", model_dir, "--calib", tmp_path / "notamodel"],
                                 "is a directory"),
        "no such device": (["--model", model_dir, "--device", "tpu9"], "not a torch device"),
        "device not here": (["--model", model_dir, "--device", missing_cuda], "not available"),
        "w0 device": ([*proxsparse, "--w0-device", "tpu9"], "--w0-device 'tpu9'"),
        "calib windows 0": (["--model", model_dir, "--calib-windows", 0], "--calib-windows must"),
        "seqlen 1": (["--model", model_dir, "--seqlen", 1], "--seqlen must be an integer ≥ 2"),
        "lambda1 < 0": ([*proxsparse, "--lambda1", -1], "--lambda1 must be a finite number ≥ 0"),
        "lambda1 nan": ([*proxsparse, "--lambda1", "nan"], "--lambda1 must be"),
        "lambda1 scaling": ([*proxsparse, "--lambda1-scaling", "rms"], "'layer' or 'absolute'"),
        "lr < 0": ([*proxsparse, "--lr", -1], "--lr must be"),
        "epsilon 0": ([*proxsparse, "--epsilon", 0], "--epsilon must be a finite number > 0"),
        "warmup > 1": ([*proxsparse, "--warmup", 2], "--warmup must be a number from 0 to 1"),
        "batch size 0": ([*proxsparse, "--batch-size", 0], "--batch-size must be"),
        "steps < 0": ([*proxsparse, "--steps", -5], "--steps must be an integer ≥ 0"),
        "checkpoint every 0": ([*proxsparse, "--checkpoint-every", 0], "--checkpoint-every"),
        "log every 0": ([*proxsparse, "--log-every", 0], "--log-every must be"),
        "norm windows 0": ([*proxsparse, "--norm-windows", 0], "--norm-windows must be"),
        "logit scale 0": ([*maskpro, "--logit-scale", 0], "--logit-scale must be"),
        "maskpro steps < 0": ([*maskpro, "--steps", -1], "--steps must be"),
        "blocksize 0": ([*sparsegpt, "--blocksize", 0], "--blocksize must be a positive"),
        "blocksize 6": ([*sparsegpt, "--blocksize", 6], "multiple of M=4"),
        "dampening < 0": ([*sparsegpt, "--dampening", -0.1], "--dampening must be"),
        "seed too large": (["--model", model_dir, "--seed", 2**64], "--seed must be"),
        "run dir is a file": ([*proxsparse, "--run-dir", tmp_path / "short.txt"], "is a file"),
        # run files that could run code or lie about the run
        "malicious checkpoint": ([*learn, evil], "objects other than tensors"),
        "corrupt log": ([*learn, bad_log], "bad-log.run/log.jsonl: it is corrupt"),
    }


def snapshot(*roots) -> dict:
    """Every file and directory under ``roots``: a file's size and modification time."""
    tree = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            tree[path] = (path.stat().st_size, path.stat().st_mtime_ns) if path.is_file() else None
    return tree


def assert_one_error_line(label, code, err, message) -> None:
    assert code == 2, (label, err)
    assert err.startswith("error: ") and message in err, (label, err)
    assert err.count("\n") == 1 and "Traceback" not in err, (label, err)


def test_bad_inputs_get_one_clear_line_and_write_nothing(tmp_path, capsys, model_dir,
                                                        monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = bad_inputs(tmp_path, model_dir)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for label, (args, message) in cases.items():
        before = snapshot(tmp_path, model_dir)
        argv = ["prune", "--method", "wanda", "--seqlen", 32, "--calib-windows", 2, "--quiet",
                "--out", tmp_path / "out", *args]
        code, _, err = run(capsys, *argv)
        assert_one_error_line(label, code, err, message)
        assert snapshot(tmp_path, model_dir) == before, label


def bad_files(tmp_path, model_dir):
    """Label -> (a command on damaged files, text the error line must hold)."""
    import shutil

    good = tmp_path / "good"
    assert main(["prune", "--model", str(model_dir), "--method", "magnitude", "--out", str(good),
                 "--quiet"]) == 0

    def damaged(name, file, change):
        copy = Path(shutil.copytree(good, tmp_path / name))
        (copy / file).write_bytes(change((copy / file).read_bytes()))
        return copy

    def flip(offset):
        return lambda raw: raw[:offset] + bytes([raw[offset] ^ 0x10]) + raw[offset + 1:]

    masks, meta = "masks.safetensors", "proxsparse.json"
    return {
        "mask data flipped": (["verify", damaged("flipped", masks, flip(-3))], "checksum"),
        "mask header flipped": (["verify", damaged("header", masks, flip(12))], "is damaged"),
        "mask truncated": (["verify", damaged("truncated", masks, lambda raw: raw[:-7])],
                           "is damaged"),
        "mask file empty": (["verify", damaged("empty", masks, lambda raw: b"")], "is damaged"),
        "metadata not json": (["verify", damaged("json", meta, lambda raw: raw[:-9])],
                              "is damaged"),
        "metadata not ours": (["verify", damaged("foreign", meta, lambda raw: b"[1, 2]")],
                              "not proxsparse metadata"),
        "eval batch size 0": (["eval", good, "--batch-size", 0], "--batch-size must be"),
        "eval no such device": (["eval", good, "--device", "tpu9"], "not a torch device"),
    }


def test_damaged_files_get_one_clear_line(tmp_path, capsys, model_dir):
    for label, (argv, message) in bad_files(tmp_path, model_dir).items():
        before = snapshot(tmp_path, model_dir)
        code, _, err = run(capsys, *argv, "--quiet")
        assert_one_error_line(label, code, err, message)
        assert snapshot(tmp_path, model_dir) == before, label


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_traceback(capsys, model_dir, monkeypatch, tmp_path, how):
    argv = ["prune", "--model", model_dir, "--method", "magnitude", "--nm", "4:4", "--out",
            tmp_path / "out"]
    if how == "flag":
        argv.append("--debug")
    else:
        monkeypatch.setenv("PROXSPARSE_DEBUG", "1")
    with pytest.raises(ProxSparseError, match="0 < N < M"):
        main([str(a) for a in argv])


def test_non_empty_output_is_refused_before_work(tmp_path, capsys, model_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    code, _, err = run(capsys, "prune", "--model", model_dir, "--method", "magnitude",
                       "--out", out)
    assert code == 2 and "--overwrite" in err


def test_verify_needs_a_directory(capsys, tmp_path):
    code, _, err = run(capsys, "verify", tmp_path / "missing")
    assert code == 2 and "not a directory" in err


@pytest.mark.parametrize("flag, value", [("--seqlen", 1), ("--max-windows", 0),
                                         ("--batch-size", 0)])
def test_eval_rejects_bad_window_settings(capsys, flag, value):
    code, _, err = run(capsys, "eval", "x", flag, value)
    assert_one_error_line(flag, code, err, f"{flag} must be")


def test_warnings_are_one_plain_line(tmp_path, capsys, model_dir):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    code, _, err = run(capsys, "prune", "--model", model_dir, "--method", "maskpro",
                       "--steps", 0, "--calib", text, "--calib-windows", 4, "--seqlen", 32,
                       "--out", tmp_path / "out", "--quiet")
    assert code == 0
    assert "warning: MaskPro ended on its prior mask" in err
    assert "UserWarning" not in err and ".py:" not in err


def learn_argv(model_dir, out, *extra):
    return ["prune", "--model", model_dir, "--method", "proxsparse", "--calib-windows", 2,
            "--seqlen", 32, "--steps", 2, "--checkpoint-every", 1, "--out", out, "--quiet",
            *extra]


def test_run_dir_keeps_the_files_it_did_not_write(tmp_path, capsys, model_dir):
    important = tmp_path / "important"
    important.mkdir()
    (important / "thesis.txt").write_text("years of work")
    code, _, err = run(capsys, *learn_argv(model_dir, tmp_path / "out", "--run-dir", important))
    assert code == 0, err
    assert [p.name for p in important.iterdir()] == ["thesis.txt"]
    assert (important / "thesis.txt").read_text() == "years of work"
    assert (tmp_path / "out" / "log.jsonl").is_file()


def test_run_dir_the_run_created_is_removed(tmp_path, capsys, model_dir):
    code, _, err = run(capsys, *learn_argv(model_dir, tmp_path / "out", "--run-dir",
                                           tmp_path / "fresh"))
    assert code == 0, err
    code, _, err = run(capsys, *learn_argv(model_dir, tmp_path / "out2"))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out2"]


def test_run_dir_with_foreign_run_files_is_refused(tmp_path, capsys, model_dir):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "log.jsonl").write_text("my own log\n")
    code, _, err = run(capsys, *learn_argv(model_dir, tmp_path / "out", "--run-dir", mine))
    assert code == 2 and "not written by a proxsparse run" in err
    assert (mine / "log.jsonl").read_text() == "my own log\n" and not (tmp_path / "out").exists()


def test_overwrite_replaces_an_earlier_output(tmp_path, capsys, model_dir):
    argv = ["prune", "--model", model_dir, "--method", "magnitude", "--out", tmp_path / "out",
            "--quiet"]
    assert run(capsys, *argv)[0] == 0
    (tmp_path / "out" / "stale.txt").write_text("from the earlier run")
    code, _, err = run(capsys, *argv, "--overwrite")
    assert code == 0, err
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("command", ["prune", "eval"])
def test_a_model_with_its_own_code_is_refused_without_running_it(tmp_path, capsys, model_dir,
                                                                  monkeypatch, command):
    marker = tmp_path / "pwned"
    custom = write_custom_code_model(tmp_path / "custom", model_dir, marker)

    def no_prompt(*args):
        raise AssertionError("prompted on stdin")

    monkeypatch.setattr("builtins.input", no_prompt)
    monkeypatch.setattr("sys.stdin", None)
    argv = (["prune", "--model", custom, "--method", "magnitude", "--out", tmp_path / "out"]
            if command == "prune" else ["eval", custom, "--text", "builtin"])
    code, _, err = run(capsys, *argv)
    assert_one_error_line(command, code, err, "--trust-remote-code")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_resume_refuses_other_inputs_and_keeps_a_whole_log(tmp_path, capsys, model_dir,
                                                           monkeypatch):
    from proxsparse.methods import proxsparse as method

    text = tmp_path / "calib.txt"
    text.write_text(builtin_text()[:20000])
    out = tmp_path / "out"
    argv = [*learn_argv(model_dir, out, "--calib", text), "--steps", 6, "--checkpoint-every", 2,
            "--log-every", 5]
    calls = {"n": 0}
    real_prox = method.prox_nm

    def prox_then_killed(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 14 * 3 + 1:  # during step 3 (14 layers a step), no flush since 0
            raise RuntimeError("killed")
        return real_prox(*args, **kwargs)

    monkeypatch.setattr(method, "prox_nm", prox_then_killed)
    with pytest.raises(RuntimeError, match="killed"):
        run(capsys, *argv)
    monkeypatch.setattr(method, "prox_nm", real_prox)
    assert (tmp_path / "out.run" / "checkpoint.pt").is_file()

    moved = copy_model(tmp_path, model_dir, "moved")
    other = tmp_path / "other"
    make_model(320, seed=1).save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    for flags, differs in [(["--model", moved], "model"),
                           (["--model", other], "model, weights"),
                           (["--calib", "builtin"], "calib, calibration"),
                           (["--calib-windows", 3], "calib_windows, calibration"),
                           (["--seqlen", 16], "calibration, seqlen"),
                           (["--nm", "1:4"], "nm"),
                           (["--lambda1", 0.5], "lambda1")]:
        before = snapshot(tmp_path)
        code, _, err = run(capsys, *argv, "--resume", *flags)
        assert_one_error_line(flags, code, err, f"differ from the interrupted run ({differs});")
        assert snapshot(tmp_path) == before

    code, _, err = run(capsys, *argv, "--resume")
    assert code == 0, err
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == list(range(6))
    assert not (tmp_path / "out.run").exists()


def test_seqlen_past_the_model_positions_is_warned(tmp_path, capsys, model_dir):
    code, _, err = run(capsys, "eval", model_dir, "--text", "builtin", "--seqlen", 300,
                       "--max-windows", 1, "--quiet")
    assert code == 0 and "warning: --seqlen 300 exceeds the 256 positions" in err


def run_process(*argv, endpoint: str, cache: Path):
    """The command in a fresh process, online (no HF_HUB_OFFLINE) against ``endpoint``."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(cache), OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", "proxsparse.cli", *map(str, argv)],
                          capture_output=True, text=True, env=env, timeout=300)


def prune_hub_id(tmp_path, model, endpoint):
    return run_process("prune", "--model", model, "--method", "magnitude", "--out",
                       tmp_path / "out", "--quiet", endpoint=endpoint, cache=tmp_path / "cache")


def test_unreachable_hub_is_one_line_without_retries(tmp_path):
    # nothing listens on port 9: every connection is refused at once
    done = prune_hub_id(tmp_path, "no-such-org/no-such-model", "http://127.0.0.1:9")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: cannot load model 'no-such-org/no-such-model': the "
                                  "Hugging Face hub (http://127.0.0.1:9) cannot be reached")
    assert done.stderr.count("\n") == 1 and "Retry" not in done.stderr, done.stderr
    assert done.stdout == "" and not (tmp_path / "out").exists()


def test_unreachable_hub_loads_a_cached_model(tmp_path, model_dir):
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--some-org--tiny"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    done = prune_hub_id(tmp_path, "some-org/tiny", "http://127.0.0.1:9")
    assert done.returncode == 0, done.stderr
    assert "pruned 14 layers to 2:4" in done.stdout and "Retry" not in done.stderr


def test_hub_without_the_repo_is_one_line(tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NoSuchRepo(BaseHTTPRequestHandler):
        def do_HEAD(self):  # what the hub answers for an id it does not have
            self.send_response(401)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("X-Error-Message", "Repository not found")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NoSuchRepo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = prune_hub_id(tmp_path, "no-such-org/no-such-model",
                            f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: no model 'no-such-org/no-such-model' on the Hugging "
                                  "Face hub"), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


def test_a_missing_path_that_is_no_hub_id_is_not_looked_up(tmp_path, capsys):
    code, _, err = run(capsys, "prune", "--model", tmp_path / "missing", "--method",
                       "magnitude", "--out", tmp_path / "out")
    assert_one_error_line("missing path", code, err, "no such local path, and not a hub id")


def test_a_reachable_hub_loads_as_before(monkeypatch):
    import huggingface_hub

    from proxsparse.models import _hub_access

    asked = []
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata",
                        lambda url, timeout: asked.append(url))
    assert _hub_access("some-org/tiny") == {} and asked == []  # offline (the tests): not asked
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    assert _hub_access("some-org/tiny") == {}  # online: transformers downloads as it always did
    assert asked and asked[0].endswith("/some-org/tiny/resolve/main/config.json")


def test_prune_help_describes_every_method_option(capsys, monkeypatch):
    import dataclasses

    from proxsparse.cli import method_options
    from proxsparse.methods import PRUNERS
    from proxsparse.methods.base import field_help

    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: no wrapping
    with pytest.raises(SystemExit) as done:
        main(["prune", "--help"])
    assert done.value.code == 0
    entries = []  # one per option: its line, and the next one where the name is long
    for line in capsys.readouterr().out.split("method options:")[1].splitlines():
        if line.startswith("  -"):
            entries.append(line)
        elif line.strip():
            entries[-1] += line
    described = {" ".join(entry.split()[:1]).rstrip(","): " ".join(entry.split())
                 for entry in entries}
    assert len(described) == len(method_options())
    for method, cls in PRUNERS.items():
        for field in dataclasses.fields(cls.config_class):
            if field.name in ("hyperparameters", "context"):
                continue  # what the caller knows, not a setting
            text = field_help(cls.config_class, field.name)  # every setting has one
            assert len(text) > 20, (method, field.name)
            flag = "--" + field.name.replace("_", "-")
            if flag in described:
                assert text in described[flag], (method, flag)
                assert method in described[flag], (method, flag)
    assert "--steps STEPS proxsparse: optimizer steps; 0: one pass over the calibration windows" \
        in described["--steps"]
    assert "default 50 for proxsparse, 100 for maskpro" in described["--checkpoint-every"]


def test_quiet_silences_the_gguf_conversion_bar(capsys):
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from proxsparse.models import _gguf_progress

    def convert():  # as transformers converts a GGUF file's tensors
        for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass

    capsys.readouterr()
    with _gguf_progress(enabled=False):
        convert()
    assert capsys.readouterr().err == ""
    with _gguf_progress(enabled=True):
        convert()
    assert "de-quantizing GGUF tensors" in capsys.readouterr().err
    convert()  # restored after the load
    assert "de-quantizing GGUF tensors" in capsys.readouterr().err
