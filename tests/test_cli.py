"""Tests for the command line: a tiny zo-tune run, resume, zo-eval, plugins and usage errors (exit code 2)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from safetensors.torch import load_file

import metrics
from zo_objectives.cli import eval_main, tune_main
from zo_objectives.models import load_model, tiny_random_model

# make_scheduler(last_step=...) on --resume steps the scheduler before any optimizer step, by design
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")

BASE = ["--model", "tiny-random", "--task", "sst2", "--train-size", "32", "--batch-size", "8", "--no-progress"]
FILES = ["config.json", "metrics.jsonl", "eval.json", "curve.png", "trajectory.json", "model.safetensors"]


def tune(*args: str) -> int:
    return tune_main([*BASE, *args])


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """4 steps with evaluations every 2, run once for the module."""
    run = tmp_path_factory.mktemp("runs") / "straight"
    code = tune("--steps", "4", "--eval-every", "2", "--eval-size", "16", "--output-dir", str(run))
    return code, run


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tune_writes_the_run_folder(straight_run):
    code, run = straight_run
    assert code == 0
    for name in FILES:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    log = rows(run)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all("loss" in r and "objective" in r for r in log)
    assert [("eval" in r) for r in log] == [False, True, False, True]
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "sst2" and config["objective"] == "accuracy" and config["steps"] == 4
    assert config["train_examples"] == 32 and config["eval_examples"] == 16
    result = json.loads((run / "eval.json").read_text())
    assert result["metric"] == "accuracy" and result["examples"] == 16 and result["steps"] == 4
    assert 0 <= result["before"] <= 1 and result["after"] == log[-1]["eval"]
    checkpoint = json.loads((run / "trajectory.json").read_text())
    assert checkpoint["step"] == 4 and len(checkpoint["optimizer"]["mezo"]["trajectory"]) == 4
    assert (run / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_file(run / "model.safetensors")


def test_resume_equals_straight_run(straight_run, tmp_path):
    _, straight = straight_run
    run = tmp_path / "resumed"
    assert tune("--steps", "2", "--eval-every", "2", "--eval-size", "4", "--output-dir", str(run)) == 0
    assert [r["step"] for r in rows(run)] == [1, 2]
    assert tune("--steps", "4", "--eval-every", "2", "--eval-size", "4", "--output-dir", str(run), "--resume") == 0
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4]
    assert json.loads((run / "trajectory.json").read_text())["step"] == 4
    a, b = load_file(run / "model.safetensors"), load_file(straight / "model.safetensors")
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and the tuned weights are not the base weights
    base = dict(tiny_random_model(vocab_size=len(load_model("tiny-random")[1])).named_parameters())
    assert any(not torch.equal(base[name].detach(), a[name]) for name in a)


def test_eval_main_on_a_run_folder(straight_run, capsys):
    _, run = straight_run
    capsys.readouterr()
    assert eval_main(["--run", str(run), "--task", "sst2", "--eval-size", "16", "--batch-size", "8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["metric"] == "accuracy" and result["examples"] == 16 and result["run"] == str(run)
    assert result["value"] == json.loads((run / "eval.json").read_text())["after"]


PLUGIN = '''
from metrics import register_metric


@register_metric("plugin_first_label_rate")
def plugin_first_label_rate(predictions, references):
    return sum(p == 0 for p in predictions) / len(predictions)
'''


def test_plugin_registers_a_metric_objective(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(metrics, "_REGISTRY", dict(metrics._REGISTRY))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zo_test_plugin.py").write_text(PLUGIN)
    run = tmp_path / "run"
    run.mkdir()
    (run / "stale.txt").write_text("an earlier run")  # an existing folder, replaced with --overwrite
    try:
        code = tune("--plugin", "zo_test_plugin", "--objective", "plugin_first_label_rate", "--steps", "1",
                    "--eval-size", "4", "--output-dir", str(run), "--overwrite")
    finally:
        sys.modules.pop("zo_test_plugin", None)
    assert code == 0, capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["objective"] == "plugin_first_label_rate"
    assert len(rows(run)) == 1


@pytest.mark.parametrize("args,needle", [
    (["--task", "no_such_task"], "no_such_task"),
    (["--objective", "no_such_objective"], "no_such_objective"),
    (["--plugin", "no_such_plugin_module"], "no_such_plugin_module"),
    (["--steps", "0"], "--steps"),
    (["--eval-size", "-3"], "--eval-size"),
    (["--model", "/nonexistent/no-such-model"], "no-such-model"),
    (["--objective", "f1", "--metric-form", "log"], "per-example"),
    (["--metric-support", "model"], "generation task"),
])
def test_bad_input_returns_2_naming_the_problem(args, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    code = tune("--steps", "1", "--output-dir", str(tmp_path / "run"), *args)
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and "error" in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_objective_lists_options(tmp_path, capsys):
    assert tune("--objective", "acc", "--output-dir", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "cross_entropy" in err and "accuracy" in err


def test_existing_run_folder_needs_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    assert tune("--steps", "1", "--output-dir", str(run)) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--resume" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").read_text() == "{}\n"  # untouched


def test_resume_without_checkpoint_returns_2(tmp_path, capsys):
    assert tune("--steps", "1", "--output-dir", str(tmp_path / "empty"), "--resume") == 2
    assert "trajectory.json" in capsys.readouterr().err


def test_eval_main_bad_input_returns_2(tmp_path, capsys):
    assert eval_main(["--model", "tiny-random", "--task", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert eval_main(["--model", "tiny-random", "--shots", "-1"]) == 2
    assert "--shots" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:task .reviews. has no dev_path")
def test_custom_data_file_trains_and_bad_files_return_2(tmp_path, capsys):
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"review {i} was {'fine' if i % 2 else 'awful'},{i % 2}\n"
                                             for i in range(12)))
    custom = ["--data", str(data), "--template", "{text}. It was", "--label-words", " bad", " good"]
    assert tune(*custom, "--steps", "1", "--eval-size", "4", "--output-dir", str(tmp_path / "ok")) == 0
    capsys.readouterr()
    missing = ["--data", str(data), "--template", "{review}. It was", "--label-words", " bad", " good"]
    assert tune(*missing, "--steps", "1", "--output-dir", str(tmp_path / "a")) == 2
    err = capsys.readouterr().err
    assert "review" in err and "text" in err  # names the missing column and the columns present
    long_word = ["--data", str(data), "--template", "{text}. It was", "--label-words", " bad", " zxqvbnm"]
    assert tune(*long_word, "--steps", "1", "--output-dir", str(tmp_path / "b")) == 2
    assert "zxqvbnm" in capsys.readouterr().err
    assert tune("--data", str(data), "--steps", "1", "--output-dir", str(tmp_path / "c")) == 2
    assert "--template" in capsys.readouterr().err


def test_squad_metric_objective_defaults_to_log_form_under_the_model(tmp_path, capsys):
    run = tmp_path / "squad"
    code = tune("--task", "squad", "--steps", "2", "--batch-size", "2", "--eval-size", "2", "--output-dir", str(run))
    assert code == 0, capsys.readouterr().err
    config = json.loads((run / "config.json").read_text())
    assert (config["objective"], config["smoothing"], config["form"], config["support"], config["lr"]) == (
        "squad_f1", 1.0, "log", "model", 1e-5)
    losses = [r["loss"] for r in rows(run)]
    assert len(losses) == 2 and all(math.isfinite(v) and v >= 0 for v in losses)  # -mean log E[F1] >= 0


def test_normalized_update_defaults_to_its_own_lr(tmp_path, capsys):
    run = tmp_path / "normalized"
    code = tune("--update", "normalized", "--steps", "2", "--batch-size", "2", "--eval-size", "2",
                "--output-dir", str(run))
    assert code == 0, capsys.readouterr().err
    config = json.loads((run / "config.json").read_text())
    assert (config["optimizer"]["update"], config["lr"]) == ("normalized", 1e-4)
    records = json.loads((run / "trajectory.json").read_text())["optimizer"]["mezo"]["trajectory"]
    assert [r["second_moment"][1] for r in records] == [1, 2]
    assert abs(records[0]["grads"][0]) == pytest.approx(1.0)  # the first estimate is its own RMS
    with pytest.raises(SystemExit) as exit_info:
        tune("--update", "adam", "--steps", "1", "--output-dir", str(tmp_path / "bad"))
    assert exit_info.value.code == 2
    assert "normalized" in capsys.readouterr().err  # names the accepted values
