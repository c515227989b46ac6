"""Zero-shot tasks through lm-evaluation-harness, offline: a local multiple-choice task (ten
sentence completions in tests/zeroshot_tasks) on a tiny random model and on SmolLM2."""

import json
from pathlib import Path

import pytest

import proxsparse as ps
from proxsparse.cli import main
from proxsparse.zeroshot import load_tasks, zero_shot

TASKS = Path(__file__).parent / "zeroshot_tasks"
ITEMS = 10  # lines of sentences.jsonl
BOTH = "proxsparse_sentences,proxsparse_sentences_quoted"


def run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_api_scores_local_tasks_from_any_working_directory(model, tokenizer, tmp_path,
                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)  # data_files are relative to the YAML, not to here
    pad = tokenizer.pad_token
    result = ps.zero_shot(model, tokenizer, BOTH, include_path=TASKS, progress=False)
    assert list(result.scores) == BOTH.split(",") and result.leaves == BOTH.split(",")
    for score in result.scores.values():
        assert score.samples == ITEMS and score.num_fewshot == 0
        assert set(score.metrics) == {"acc", "acc_norm"}
        assert all(0 <= v <= 1 for v in score.metrics.values())
        assert score.stderr["acc"] is not None
    accs = [s.metrics["acc"] for s in result.scores.values()]
    assert result.mean("acc") == pytest.approx(sum(accs) / 2)
    table = result.table()
    assert "proxsparse_sentences_quoted" in table and "mean acc over 2 tasks" in table
    assert json.loads(json.dumps(result.as_dict()))["tasks"]["proxsparse_sentences"]["samples"] \
        == ITEMS
    assert tokenizer.pad_token == pad  # lm_eval set a pad token on a copy, not on ours


def test_limit_and_few_shot(model, tokenizer):
    result = zero_shot(model, tokenizer, ["proxsparse_sentences"], include_path=str(TASKS),
                       limit=3, num_fewshot=2, batch_size=2, progress=False)
    score = result.scores["proxsparse_sentences"]
    assert score.samples == 3 and score.num_fewshot == 2 and result.limit == 3


def test_packed_model_scores_as_its_dense_twin(model, tokenizer):
    ps.prune(model, ps.MagnitudeConfig(), None, progress=False)
    tasks = load_tasks("proxsparse_sentences", TASKS, progress=False)
    dense = zero_shot(model, tokenizer, tasks, progress=False)
    ps.sparsify(model, backend="reference")
    assert isinstance(model.model.layers[0].mlp.up_proj, ps.PackedLinear)
    packed = zero_shot(model, tokenizer, tasks, progress=False)
    assert packed.as_dict()["tasks"] == dense.as_dict()["tasks"]


def test_a_task_yaml_given_by_path(model, tokenizer):
    result = zero_shot(model, tokenizer, str(TASKS / "sentences.yaml"), progress=False,
                       limit=2)
    assert list(result.scores) == ["proxsparse_sentences"]


def test_cli_tasks_table_and_json(capsys, model_dir):
    code, out, err = run(capsys, "eval", model_dir, "--tasks", BOTH, "--include-path", TASKS,
                         "--quiet")
    assert code == 0, err
    assert err == ""
    assert "perplexity" not in out  # --tasks alone: no perplexity run
    assert "proxsparse_sentences " in out and "mean acc over 2 tasks" in out

    code, out, err = run(capsys, "eval", model_dir, "--tasks", "proxsparse_sentences",
                         "--include-path", TASKS, "--limit", 4, "--text", "builtin",
                         "--seqlen", 32, "--max-windows", 2, "--json", "--quiet")
    assert code == 0, err
    result = json.loads(out)
    assert result["windows"] == 2 and result["ppl"] > 1
    task = result["zero_shot"]["tasks"]["proxsparse_sentences"]
    assert task["samples"] == 4 and 0 <= task["acc"] <= 1


def one_error_line(code, err, message):
    assert code == 2, err
    assert err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_unknown_task_is_one_clear_line(capsys):
    # no model is loaded: the tasks are checked first ("missing-model" does not exist)
    code, _, err = run(capsys, "eval", "missing-model", "--tasks", "proxsparse_sentences,nope",
                       "--include-path", TASKS, "--quiet")
    one_error_line(code, err, "unknown task 'nope'")


def test_bad_zero_shot_options_are_one_clear_line(capsys, tmp_path):
    bad_data = tmp_path / "tasks"
    bad_data.mkdir()
    yaml = (TASKS / "sentences.yaml").read_text().replace("sentences.jsonl", "absent.jsonl")
    (bad_data / "broken.yaml").write_text(yaml.replace("proxsparse_sentences", "broken_task"))
    cases = [
        (["--tasks", " , "], "--tasks names no task"),
        (["--tasks", "proxsparse_sentences", "--include-path", TASKS, "--limit", 0],
         "--limit must be a positive integer"),
        (["--tasks", "proxsparse_sentences", "--include-path", TASKS, "--num-fewshot", -1],
         "--num-fewshot must be an integer ≥ 0"),
        (["--limit", 5], "add --tasks"),
        (["--tasks", "proxsparse_sentences", "--include-path", tmp_path / "none"],
         "is not a directory"),
        (["--tasks", "proxsparse_sentences", "--include-path", TASKS, "--activation-sparsity"],
         "add --text"),
        (["--tasks", "broken_task", "--include-path", bad_data],
         "task 'broken_task': cannot load its data"),
    ]
    for flags, message in cases:
        code, _, err = run(capsys, "eval", "missing-model", *flags, "--quiet")
        one_error_line(code, err, message)


def test_smollm2_pruned_scores_differ_from_dense():
    model, tokenizer = ps.load_model("smollm2-135m")
    tasks = load_tasks("proxsparse_sentences", TASKS, progress=False)
    dense = zero_shot(model, tokenizer, tasks, batch_size=8, progress=False)
    ps.prune(model, ps.MagnitudeConfig(), None, progress=False)  # needs no calibration
    pruned = zero_shot(model, tokenizer, tasks, batch_size=8, progress=False)
    dense_acc = dense.scores["proxsparse_sentences"].metrics
    pruned_acc = pruned.scores["proxsparse_sentences"].metrics
    assert dense_acc["acc"] >= 0.9  # the ten completions are easy for the dense model
    assert pruned_acc != dense_acc and pruned_acc["acc"] < dense_acc["acc"]
