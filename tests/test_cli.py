"""Tests for the command line: a tiny zo-tune run, resume, zo-eval, plugins and usage errors (exit code 2)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import metrics
from zo_objectives import cli
from zo_objectives.checkpoint import load_checkpoint
from zo_objectives.cli import eval_main, export_parser, tune_main, tune_parser
from zo_objectives.cli import tune as tune_run
from zo_objectives.config import DEFAULT_EPS, GREEDY_REWARD_EPS, OBJECTIVE_DEFAULTS, REWARD, TuneConfig, UsageError
from zo_objectives.estimators import UPDATES
from zo_objectives.models import DTYPES, PEFT_KINDS, load_model, tiny_random_model
from zo_objectives.runfolder import write_sealed

# make_scheduler(last_step=...) on --resume steps the scheduler before any optimizer step, by design
pytestmark = [pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`"),
              pytest.mark.filterwarnings("ignore:1 of 2 prompts cut from the left")]  # squad's long prompts

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
    # the loss minimized (log form: -mean log expected accuracy > 0) and the batch's expected accuracy
    assert all(r["loss"] > 0 and 0 < r["train/accuracy"] < 1 and "objective" not in r for r in log)
    assert [("eval" in r) for r in log] == [False, True, False, True]
    assert all(r["seconds"] > 0 and r["cpu_seconds"] > 0 for r in log)  # each step's wall and process CPU time
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "sst2" and config["objective"] == "accuracy" and config["steps"] == 4
    assert config["train_examples"] == 32 and config["eval_examples"] == 16
    result = json.loads((run / "eval.json").read_text())
    assert result["metric"] == "accuracy" and result["examples"] == 16 and result["steps"] == 4
    assert 0 <= result["before"] <= 1 and result["after"] == log[-1]["eval"]
    checkpoint = load_checkpoint(run)
    assert checkpoint["step"] == 4 and len(checkpoint["optimizer"]["mezo"]["trajectory"]) == 4
    assert (run / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_file(run / "model.safetensors")


def test_resume_equals_straight_run(straight_run, tmp_path):
    _, straight = straight_run
    run = tmp_path / "resumed"
    assert tune("--steps", "2", "--eval-every", "2", "--eval-size", "4", "--output-dir", str(run)) == 0
    assert [r["step"] for r in rows(run)] == [1, 2]
    # --eval-every, --no-progress and --steps may differ on resume; the other settings come from config.json
    assert tune_main(["--output-dir", str(run), "--resume", "--steps", "4", "--eval-every", "1"]) == 0
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
    assert eval_main(["--run", str(run), "--eval-size", "16", "--batch-size", "8"]) == 0  # the run's model and task
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["model"], result["task"], result["metric"], result["examples"], result["run"]) == (
        "tiny-random", "sst2", "accuracy", 16, str(run))
    assert result["value"] == json.loads((run / "eval.json").read_text())["after"]
    assert eval_main(["--run", str(run), "--model", "smollm2-135m"]) == 2
    assert "is not the model of --run" in capsys.readouterr().err


def test_eval_main_reads_a_config_file(tmp_path, capsys):
    config = tmp_path / "eval.json"
    config.write_text(json.dumps({"model": "tiny-random", "task": "sst2", "eval_size": 4, "batch_size": 4}))
    assert eval_main(["--config", str(config), "--eval-size", "2"]) == 0  # a flag beside the file overrides it
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["examples"] == 2
    config.write_text(json.dumps({"model": "tiny-random", "eval_sise": 4}))
    assert eval_main(["--config", str(config)]) == 2
    assert "unknown settings ['eval_sise']; accepted: model, task" in capsys.readouterr().err


def test_flags_come_from_the_config_fields():
    parser = tune_parser()
    options = {o: a for a in parser._actions for o in a.option_strings}
    for f in dataclasses.fields(TuneConfig):
        action = options["--" + f.name.replace("_", "-")]
        assert action.dest == f.name and action.help == f.metadata["help"], f.name
    assert tuple(options["--update"].choices) == UPDATES and tuple(options["--peft"].choices) == PEFT_KINDS
    assert tuple(options["--dtype"].choices) == ("auto", *DTYPES)
    assert options["--no-progress"].dest == "progress" and options["--no-eval-before"].dest == "eval_before"
    _, given = parser.given(["--plugin", "a", "--plugin", "b", "c", "--no-progress", "--lr", "1e-3"])
    assert given == {"plugin": ["a", "b", "c"], "progress": False, "lr": 1e-3}  # only what was given


def test_tune_from_python_and_from_config_json_rerun_the_run(straight_run, tmp_path):
    _, straight = straight_run
    saved = json.loads((straight / "config.json").read_text())
    assert (saved["lr"], saved["eps"], saved["smoothing"], saved["dtype"], saved["output_dir"]) == (
        1e-5, 1e-3, 1.0, "fp32", str(straight))
    config = TuneConfig(model="tiny-random", task="sst2", train_size=32, batch_size=8, progress=False, steps=4,
                        eval_every=2, eval_size=16, output_dir=str(tmp_path / "python"))
    summary = tune_run(config)
    assert summary["after"] == json.loads((straight / "eval.json").read_text())["after"]
    assert tune_main(["--config", str(straight / "config.json"), "--output-dir", str(tmp_path / "again")]) == 0
    for run in (tmp_path / "python", tmp_path / "again"):
        assert {**json.loads((run / "config.json").read_text()), "output_dir": str(straight)} == saved
        a, b = load_file(run / "model.safetensors"), load_file(straight / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, given = tune_parser().given(["--config", str(straight / "config.json"), "--steps", "2"])
    assert (given["steps"], given["lr"], given["eval_size"]) == (2, 1e-5, 16)  # flags beside the file override it


def test_resume_refuses_changed_settings_unless_allowed(tmp_path, capsys):
    run = tmp_path / "run"
    assert tune("--steps", "2", "--eval-every", "2", "--eval-size", "4", "--output-dir", str(run)) == 0
    config, _ = (run / "config.json").read_text(), capsys.readouterr()
    resume = ["--output-dir", str(run), "--resume", "--steps", "4"]
    assert tune_main([*resume, "--lr", "1e-3", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "settings differ" in err and "--batch-size 8 -> 4, --lr 1e-05 -> 0.001" in err
    assert "--allow-changed-settings" in err and len(err.strip().splitlines()) == 1
    assert tune_main([*resume, "--seed", "1", "--lr", "1e-3", "--allow-changed-settings"]) == 2
    assert "--seed 0 -> 1: cannot change on a resume" in capsys.readouterr().err
    with pytest.raises(UsageError, match=re.escape("settings differ from") + ".*--lr 1e-05 -> 0.001"):
        tune_run(TuneConfig.load(run / "config.json", steps=4, lr=1e-3), resume=True)  # the same from Python
    assert (run / "config.json").read_text() == config and len(rows(run)) == 2  # untouched
    assert tune_main([*resume, "--lr", "1e-3", "--batch-size", "4", "--allow-changed-settings"]) == 0
    assert [r["lr"] for r in rows(run)] == [1e-5, 1e-5, 1e-3, 1e-3]  # the new lr is the one used
    saved = json.loads((run / "config.json").read_text())
    assert (saved["lr"], saved["batch_size"], saved["steps"]) == (1e-3, 4, 4)
    assert saved["resumed"] == [{"step": 2, "changed": {"batch_size": [8, 4], "lr": [1e-5, 1e-3]}}]


REWARDS = '''
def short(prompts, completions, **columns):
    return [float(len(c.split()) <= 3) for c in completions]


def overlap(prompts, completions, answers, **columns):
    return [float(any(a in c for a in golds)) for c, golds in zip(completions, answers)]
'''


def test_reward_run_logs_each_reward_per_step(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    run = tmp_path / "run"
    code = tune("--task", "squad", "--reward", "my_rewards.py:short", "--reward", "./my_rewards.py:overlap",
                "--reward-weights", "0.5", "1", "--steps", "2", "--batch-size", "2", "--eval-size", "2",
                "--output-dir", str(run))
    assert code == 0, capsys.readouterr().err
    assert "evaluating tiny-random on 2 squad dev examples before tuning" in capsys.readouterr().err
    log = rows(run)
    assert len(log) == 2 and all(set(r["rewards"]) == {"short", "overlap"} for r in log)
    assert all(0 <= v <= 1 for r in log for v in r["rewards"].values())
    config = json.loads((run / "config.json").read_text())
    assert (config["objective"], config["reward_weights"], config["lr"], config["metric"]) == (
        "reward", [0.5, 1.0], OBJECTIVE_DEFAULTS[REWARD]["lr"], "reward")  # evaluated by its rewards (issue 25)
    summary = json.loads((run / "eval.json").read_text())
    assert summary["metric"] == "reward" and set(summary["rewards"]) == {"short", "overlap"}
    assert summary["after"] == pytest.approx(0.5 * summary["rewards"]["short"] + summary["rewards"]["overlap"])


TOPIC_REWARD = '''
import json


def topic_seen(prompts, completions, topic, level, **columns):
    with open("columns.jsonl", "a") as f:
        f.write(json.dumps({"prompts": prompts, "topic": topic, "level": level}) + "\\n")
    return [float(t in c) + 0.1 * lv for c, t, lv in zip(completions, topic, level)]
'''


def test_a_reward_task_tunes_on_its_checker_by_default(tmp_path, capsys):
    run = tmp_path / "arith"
    assert tune("--task", "arith", "--steps", "1", "--batch-size", "4", "--eval-size", "4", "--output-dir",
                str(run)) == 0, capsys.readouterr().err
    config = json.loads((run / "config.json").read_text())
    assert (config["reward"], config["objective"], config["metric"]) == (["answer_check"], "reward", "reward")
    assert set(json.loads((run / "eval.json").read_text())["rewards"]) == {"answer_check"}
    assert config["eps"] == OBJECTIVE_DEFAULTS[REWARD]["eps"]  # the measured setting (issue 34)
    runs = {name: tmp_path / name for name in ("sgd", "normalized", "sampled")}
    for name, extra in (("sgd", ["--update", "sgd"]), ("normalized", ["--update", "normalized"]),
                        ("sampled", ["--update", "normalized", "--reward-candidates", "2", "--sample-temperature",
                                     "1"])):
        assert tune("--task", "arith", "--steps", "1", "--batch-size", "4", "--eval-size", "4",
                    *extra, "--output-dir", str(runs[name])) == 0, capsys.readouterr().err
    eps = {name: json.loads((run / "config.json").read_text())["eps"] for name, run in runs.items()}
    # greedy completions: the eps that changes them (sgd: a reward's difference does not grow with eps, the
    # dtype's); sampled candidates are smooth in the weights: the dtype's
    assert eps == {"sgd": DEFAULT_EPS["fp32"], "normalized": GREEDY_REWARD_EPS, "sampled": DEFAULT_EPS["fp32"]}


def test_reward_run_on_a_jsonl_of_prompts(tmp_path, monkeypatch, capsys):
    """zo-tune --data prompts.jsonl --reward NAME --reward mod:fn: the file's columns reach the rewards, each
    reward's mean is logged per step, the held-out figure is the weighted reward of greedy completions."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "topics.py").write_text(TOPIC_REWARD)
    lines = [{"prompt": f"Say {w}:", "answer": w, "topic": w[:2], "level": i % 3}
             for i, w in enumerate(["cat", "dog", "sun", "sea", "red", "blue", "one", "two"])]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[:4]))
    run = tmp_path / "run"
    code = tune("--data", "prompts.jsonl", "--dev-data", "held.jsonl", "--reward", "exact_answer", "--reward",
                "topics.py:topic_seen", "--reward-weights", "1", "0.5", "--steps", "3", "--batch-size", "4",
                "--eval-every", "2", "--output-dir", str(run))
    assert code == 0, capsys.readouterr().err
    assert "dev reward before" in capsys.readouterr().err
    log = rows(run)
    assert [("eval" in r) for r in log] == [False, True, True]  # at --eval-every and at the end
    assert all(set(r["rewards"]) == {"exact_answer", "topic_seen"} for r in log)
    seen = [json.loads(line) for line in (tmp_path / "columns.jsonl").read_text().splitlines()]
    by_prompt = {r["prompt"]: r for r in lines}
    for call in seen:  # every call got the file's own columns, row by row
        assert call["topic"] == [by_prompt[p]["topic"] for p in call["prompts"]]
        assert call["level"] == [by_prompt[p]["level"] for p in call["prompts"]]
    summary = json.loads((run / "eval.json").read_text())
    assert summary["metric"] == "reward" and summary["examples"] == 4
    means = summary["rewards"]
    assert summary["after"] == pytest.approx(means["exact_answer"] + 0.5 * means["topic_seen"])
    assert summary["rewards"]["topic_seen"] >= 0.1 * (0 + 1 + 2 + 0) / 4  # the level column's credit at least
    assert (run / "curve.png").stat().st_size > 0
    assert json.loads((run / "config.json").read_text())["template"] == "{prompt}"  # the default for --reward
    capsys.readouterr()  # zo-eval --run of a reward run on prompts: one line (was "unknown --metric reward")
    assert eval_main(["--run", str(run), "--eval-size", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "tuned on rewards" in err and "eval.json" in err and len(err.splitlines()) == 1


def test_native_bf16_is_read_from_the_cpu_flags_or_probed(monkeypatch):
    from zo_objectives import models

    assert models.cpu_has_bf16("fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni")
    assert models.cpu_has_bf16("fpu sse2 avx2 amx_bf16 amx_tile")
    assert not models.cpu_has_bf16("fpu sse2 avx2 avx512f avx512_vnni avx512_fp16")  # no bf16 arithmetic
    assert not models.cpu_has_bf16("")
    monkeypatch.setattr(models, "_cpuinfo", lambda field: "fpu avx512_bf16" if field == "flags" else None)
    monkeypatch.setattr(models, "_bf16_matmul_is_fast", lambda: pytest.fail("probed although the flags tell"))
    assert models._detect_bf16()
    for fast in (True, False):  # no flags line (not Linux, not x86): the probe decides
        monkeypatch.setattr(models, "_cpuinfo", lambda field: None)
        monkeypatch.setattr(models, "_bf16_matmul_is_fast", lambda fast=fast: fast)
        assert models._detect_bf16() is fast
    for native, dtype in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(models, "_cpu_has_bf16_here", lambda native=native: native)
        assert models.auto_dtype("cpu") == dtype and models.auto_dtype("cuda") == "bf16"


def test_dtype_auto_picks_bf16_on_a_cpu_with_bf16_and_says_so(tmp_path, monkeypatch, capsys):
    from zo_objectives import models

    monkeypatch.setattr(models, "_cpu_has_bf16_here", lambda: True)
    run = tmp_path / "auto"
    assert tune("--steps", "1", "--eval-every", "0", "--eval-size", "4", "--output-dir", str(run)) == 0
    saved = json.loads((run / "config.json").read_text())
    assert (saved["dtype"], saved["eps"]) == ("bf16", 3e-3)
    assert saved["hardware"] == {"device": "cpu", "name": models.cpu_name(), "native_bf16": True}
    assert {t.dtype for t in load_file(run / "model.safetensors").values()} == {torch.bfloat16}
    err = capsys.readouterr().err
    assert err.count("--dtype auto: bf16 on cpu") == 1 and "native bf16 arithmetic)" in err
    assert "evaluating:" not in err  # --no-progress: no bar over the first evaluation either


def test_the_first_evaluation_shows_a_bar_over_the_dev_batches(tmp_path, monkeypatch, capsys):
    from zo_objectives import cli

    evaluate = importlib.import_module("zo_objectives.evaluate")

    class Constant:
        def predict(self, model, batch):
            return [0] * len(batch)

    examples = [{"prompt": str(i), "label": 0} for i in range(5)]
    assert evaluate.evaluate_model(None, Constant(), examples, metrics.get_metric("accuracy"), 2, progress=True) == 1.0
    err = capsys.readouterr().err
    assert "evaluating:" in err and "0/3 " in err  # a bar over the 3 batches
    evaluate.evaluate_model(None, Constant(), examples, metrics.get_metric("accuracy"), 2)
    assert "evaluating" not in capsys.readouterr().err
    shown, real = [], cli.predict_all  # zo-tune: a bar over the evaluation before tuning only (with progress)
    monkeypatch.setattr(cli, "predict_all", lambda *a, progress=False, **k: shown.append(progress) or real(*a, **k))
    for progress in (True, False):
        tune_run(TuneConfig(model="tiny-random", task="sst2", train_size=8, batch_size=4, steps=1, eval_every=0,
                            eval_size=4, progress=progress, output_dir=str(tmp_path / str(progress))))
    assert shown == [True, False, False, False]


def test_dtype_and_checkpoint_interval_reach_the_run(tmp_path, monkeypatch):
    saved_at = []
    train_module = importlib.import_module("zo_objectives.train")  # the module (the package exports the function)
    real = train_module.save_checkpoint
    monkeypatch.setattr(train_module, "save_checkpoint", lambda d, o, step, *rest: (saved_at.append(step),
                                                                                     real(d, o, step, *rest)))
    run = tmp_path / "bf16"
    assert tune("--dtype", "bf16", "--steps", "4", "--checkpoint-every", "2", "--eval-every", "0",
                "--eval-size", "4", "--no-eval-before", "--output-dir", str(run)) == 0
    saved = json.loads((run / "config.json").read_text())
    assert (saved["dtype"], saved["eps"]) == ("bf16", 3e-3)  # bf16's default eps
    assert {t.dtype for t in load_file(run / "model.safetensors").values()} == {torch.bfloat16}
    assert sorted(set(saved_at)) == [2, 4]


INF_REWARD = '''
def infinite(prompts, completions, answers, **columns):  # finite on a gold answer: passes the up-front check
    return [1.0 if c in golds else float("inf") for c, golds in zip(completions, answers)]


def always_infinite(prompts, completions, **columns):
    return [float("inf")] * len(completions)
'''


@pytest.mark.filterwarnings("ignore:skipping an estimate with non-finite loss")
def test_reward_file_and_on_nonfinite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inf_reward.py").write_text(INF_REWARD)
    args = ["--task", "squad", "--reward", "./inf_reward.py:infinite", "--steps", "1", "--batch-size", "2",
            "--eval-size", "2", "--no-eval-before", "--population", "0"]  # MeZO: one estimate per step
    assert tune(*args, "--on-nonfinite", "skip", "--output-dir", "skip") == 0, capsys.readouterr().err
    trajectory = load_checkpoint(tmp_path / "skip")["optimizer"]["mezo"]["trajectory"]
    assert trajectory[0]["grads"] == [None]  # skipped: the weights did not move
    capsys.readouterr()
    assert tune(*args, "--output-dir", "raise") == 1  # --on-nonfinite raise, the default: the run stops
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: non-finite loss" in err and "--on-nonfinite skip" in err
    # once, naming the reward (it was given twice, and named nothing)
    assert err.count("on-nonfinite") == 1 and "from the reward ./inf_reward.py:infinite (--reward)" in err
    args[3] = "./inf_reward.py:always_infinite"  # inf on the gold answer too: refused before any file is written
    assert tune(*args, "--on-nonfinite", "skip", "--output-dir", "refused") == 2
    err = capsys.readouterr().err
    assert "--reward gives inf on a gold answer" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()


HUGE_REWARD = '''
def huge(prompts, completions, **columns):  # finite, but a sum of two overflows
    return [1e308] * len(completions)
'''


def strict_json(text: str):
    """json.loads that refuses Infinity and NaN, which are not JSON (other readers reject them)."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))


@pytest.mark.filterwarnings("ignore:skipping an estimate with non-finite loss")
def test_an_overflowing_reward_writes_null_not_infinity_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "huge.py").write_text(HUGE_REWARD)
    assert tune("--task", "squad", "--reward", "./huge.py:huge", "--on-nonfinite", "skip", "--steps", "1",
                "--batch-size", "2", "--eval-size", "2", "--output-dir", "run") == 0, capsys.readouterr().err
    summary = strict_json((tmp_path / "run" / "eval.json").read_text())
    assert summary["after"] is None and summary["before"] is None and summary["rewards"]["huge"] is None
    err = capsys.readouterr().err
    assert "zo-tune: warning: eval.json: after is inf, not a JSON number: written as null" in err


def test_hub_without_a_network_is_one_line(tmp_path, monkeypatch, capsys):
    """datasets retried with a warning per try, then the error read "cannot write ... --resume continues it"."""
    import datasets
    from huggingface_hub.utils import logging as hub_logging

    def offline(*args, **kwargs):
        hub_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert tune("--data-source", "hub", "--steps", "1", "--output-dir", str(tmp_path / "run")) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("zo-tune: error: --data-source hub: cannot load glue/sst2 from the Hugging Face hub (Couldn't "
                   "reach 'glue' on the Hub (LocalEntryNotFoundError)): check the network, or use --data-source local")


SLOW_REWARD = '''
import time


def judge(prompts, completions, **columns):  # quick on the gold answer checked up front, then it hangs
    if len(completions) > 1:
        time.sleep(60)
    return [1.0] * len(completions)
'''


def test_a_slow_reward_stops_the_run_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "slow.py").write_text(SLOW_REWARD)
    began = time.monotonic()
    assert tune("--task", "squad", "--reward", "./slow.py:judge", "--reward-timeout", "0.5", "--steps", "2",
                "--batch-size", "2", "--eval-size", "2", "--no-eval-before", "--output-dir", "run") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the run's start lines: one line
    assert err.startswith("zo-tune: error: reward 'judge' took more than 0.5 s on 2 completions (--reward-timeout")
    assert time.monotonic() - began < 60  # stopped at the limit, not after the reward's minute
    assert json.loads((tmp_path / "run" / "config.json").read_text())["reward_timeout"] == 0.5


def test_label_column_names_the_labels_of_a_data_file(tmp_path, capsys):
    data = tmp_path / "reviews.csv"
    data.write_text("text,sentiment\n" + "".join(f"review {i},{i % 2}\n" for i in range(8)))
    custom = ["--data", str(data), "--dev-data", str(data), "--template", "{text}. It was", "--label-words", " bad",
              " good", "--steps", "1", "--eval-size", "4", "--batch-size", "4"]
    assert tune(*custom, "--output-dir", str(tmp_path / "a")) == 2
    assert "missing column 'label'" in capsys.readouterr().err
    assert tune(*custom, "--label-column", "sentiment", "--output-dir", str(tmp_path / "b")) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["label_column"] == "sentiment"


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


class Hang(BaseException):  # not an Exception: the code under test cannot take it for its own error
    pass


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail a call that runs past ``seconds`` (SIGALRM) instead of hanging the suite."""
    def expire(signum, frame):
        raise Hang(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("args,needle", [
    (["--task", "no_such_task"], "no_such_task"),
    (["--objective", "no_such_objective"], "no_such_objective"),
    (["--plugin", "no_such_plugin_module"], "no_such_plugin_module"),
    (["--steps", "0"], "--steps"),
    (["--eval-size", "-3"], "--eval-size"),
    (["--model", "/nonexistent/no-such-model"], "no-such-model"),
    (["--objective", "f1", "--metric-form", "log"], "per-example"),
    (["--metric-support", "model"], "generation task"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--eps", "inf"], "--eps must be a finite number"),
    (["--max-length", "0"], "--max-length must be > 0"),
    (["--smoothing", "-1"], "--smoothing must be >= 0"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
    (["--momentum", "1.5", "--momentum-window", "2"], "--momentum must be in [0, 1)"),
    (["--momentum", "0.5"], "--momentum-window > 1"),
    (["--batch-size", "64"], "--batch-size 64 is larger than the 32 training examples"),
    (["--plugin", "./no_such_file.py"], "no_such_file.py"),
    (["--trainable", "("], "not a regular expression"),
    (["--device", "foo"], "unknown --device 'foo'"),
    (["--template", "{text}"], "--template describes a custom data file: it needs --data"),
    (["--data", "no_such_file.csv", "--template", "{text}"], "--data no_such_file.csv: no such file"),
    (["--config", "no_such_config.json"], "cannot read config no_such_config.json"),
    (["--reward", "no_colon"], "expected module:function, path/to/file.py:function or a ready reward: answer_check"),
    (["--task", "squad", "--reward", "no_such_reward_module:fn"], "no_such_reward_module"),
    (["--task", "squad", "--reward", "os:no_such_function"], "no function 'no_such_function'"),
    (["--task", "squad", "--reward", "os:getcwd"], "reward 'getcwd' raised TypeError"),
    (["--reward", "math:fabs"], "--reward needs a generation task (such as squad); sst2 is classification"),
    (["--task", "squad", "--reward", "os:getcwd", "--reward-weights", "1", "2"], "2 weights for 1 --reward"),
    (["--task", "squad", "--reward", "os:getcwd", "--objective", "f1"], "exclude each other"),
    (["--reward-weights", "1"], "1 weights for 0 --reward"),
    (["--objective", "cross_entropy", "--smoothing", "2"], "--smoothing applies to metric objectives"),
    (["--task", "squad", "--reward", "os:getcwd", "--reward-candidates", "2"], "needs --sample-temperature > 0"),
    (["--reward-candidates", "2", "--sample-temperature", "1"], "apply to --reward runs (or a task scored by a"),
    # argparse's errors: the flag, the value and what it accepts, without the usage block (issue 35)
    *[([name, "1.5"], f"{name}: '1.5' is not an integer; accepted: an integer")
      for name in ("--steps", "--batch-size", "--train-size", "--eval-size", "--seed", "--samples", "--population",
                   "--eval-every", "--checkpoint-every", "--n-perturbations")],
    (["--lr", "fast"], "--lr: 'fast' is not a number; accepted: a number"),
    (["--dtype", "int8"], "--dtype: unknown value 'int8'; accepted: auto, fp32, bf16, fp16"),
    (["--peft", "bogus"], "--peft: unknown value 'bogus'; accepted: none, lora, prefix"),
    (["--chat-template", "maybe"], "--chat-template: 'maybe' is not a yes/no value; accepted: the flag alone"),
    (["--seed", "99999999999999999999999"], "--seed must be <= 9223372036854775807 (a 63-bit seed)"),
    (["--steps", "99999999999999999999999"], "--steps must be <= 1000000000"),
    (["--smoothing", "1e-300"], "--smoothing must be 0 (the hard metric) or >= 0.0001"),
    (["--samples", "1000000000"], "--samples must be <= 100000"),
    (["--n-perturbations", "1000000"], "--n-perturbations must be <= 1024"),
    (["--reward-timeout", "1e300"], "--reward-timeout must be <= 86400.0"),
    (["--task", "squad", "--reward", "os:getcwd", "--sample-temperature", "1", "--reward-candidates", "100000"],
     "--reward-candidates must be <= 1024"),
    (["--population", "4", "--perturbation-rank", "1000"], "--perturbation-rank 1000 is above the smallest side of "
                                                           "the model's trainable matrices"),
])
def test_bad_input_returns_2_naming_the_problem(args, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    with deadline(60):  # a cap that is missing is a hang (--n-perturbations 1000000): bounded here
        code = tune("--steps", "1", "--output-dir", str(tmp_path / "run"), *args)
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and "error" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # checked before the run folder is touched


def test_a_population_is_checked_against_memory(tmp_path, monkeypatch, capsys):
    """--population x --batch-size rows scored at once are refused when their logits alone exceed the memory
    available (here 1 GiB), before the first step; a population that fits runs."""
    monkeypatch.setattr(cli, "available_memory", lambda device: 2**30, raising=False)
    with deadline(60):  # unchecked, it ran out of memory after minutes
        assert tune("--population", "100000", "--steps", "1", "--output-dir", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("zo-tune: error: --population 100000 x --batch-size 8 = "
                                                         "800,000 rows scored at once need at least")
    assert "accepted: up to about" in err and not (tmp_path / "run").exists()
    assert tune("--population", "4", "--steps", "1", "--eval-size", "4", "--output-dir", str(tmp_path / "ok")) == 0


def test_eval_and_export_parse_errors_are_one_line(capsys):
    assert eval_main(["--model", "tiny-random", "--split", "test"]) == 2
    assert capsys.readouterr().err == "zo-eval: error: --split: unknown value 'test'; accepted: dev, validation\n"
    args, given = export_parser().given(["--merge", "RUN", "OUT"])  # --merge takes no value: RUN is the run
    assert (args.run_dir, args.out_dir, given["merge"]) == ("RUN", "OUT", True)
    assert export_parser().given(["RUN", "OUT"])[1].get("merge") in (None, False)


USER_CODE = '''
import sys


def quits(prompts, completions, **columns):
    sys.exit(0)


def returns_none(prompts, completions, **columns):
    return None


def ok(prompts, completions, **columns):
    return [1.0] * len(completions)
'''


@pytest.mark.parametrize("args,code,needle", [
    (["--reward", "./user.py:quits"], 1, "zo-tune: error: reward 'quits' raised SystemExit(0) (sys.exit, exit()): a "
                                         "reward must return one number per completion"),
    (["--reward", "./user.py:ok", "--plugin", "./quit_plugin.py"], 1,
     "zo-tune: error: --plugin './quit_plugin.py' raised SystemExit(0) (sys.exit, exit()) as it was imported"),
    (["--reward", "./user.py:returns_none"], 2, "zo-tune: error: reward 'returns_none' returned None (NoneType); a "
                                                "reward must return one float per completion"),
    (["--reward", "./user.py:ok", "--reward-timeout", "0.000001"], 2,
     "zo-tune: error: reward 'ok' took more than 1e-06 s on 1 completions (--reward-timeout"),
])
def test_user_code_that_exits_returns_none_or_runs_over_is_named(args, code, needle, tmp_path, monkeypatch, capsys):
    """SystemExit from a reward or a plugin is a failure of that code (exit 1; it ended zo-tune with exit 0, no
    output and no run); None from a reward says what a reward returns; a limit that expires at once is a
    RewardError, not the internal alarm escaping (issue 35)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user.py").write_text(USER_CODE)
    (tmp_path / "quit_plugin.py").write_text("raise SystemExit(0)\n")
    assert tune("--task", "squad", "--steps", "1", "--batch-size", "2", "--eval-size", "2", "--output-dir", "run",
                *args) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(needle), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("row,template,needle", [
    ({"prompt": None}, "{prompt}", "prompts.jsonl, row 3: column 'prompt' is null or empty"),
    ({"prompt": ""}, "{prompt}", "prompts.jsonl, row 3: the prompt is empty (template '{prompt}')"),
    ({"prompt": "Say hi:"}, "{prompt:>20000000}", "prompts.jsonl, row 1: the prompt is 20,000,000 characters "
                                                  "(template '{prompt:>20000000}'); accepted: up to 1,000,000"),
])
def test_null_empty_and_huge_prompts_are_refused_in_one_line(row, template, needle, tmp_path, monkeypatch, capsys):
    """A null prompt was the text "None", an empty one an IndexError in generate, a padded one a hang."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user.py").write_text(USER_CODE)
    lines = [{"prompt": "Say cat:"}, {"prompt": "Say dog:"}, row, {"prompt": "Say sun:"}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert tune("--data", "prompts.jsonl", "--template", template, "--reward", "./user.py:ok", "--steps", "1",
                "--batch-size", "2", "--output-dir", "run") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "run").exists()


BUSY_REWARD = '''
def busy(prompts, completions, **columns):
    if len(completions) > 1:  # the gold answer checked up front passes; the first step's call is stuck in C
        sum(range(10**12))  # holds the GIL: no signal handler runs until it returns (hours)
    return [1.0] * len(completions)
'''


def test_a_reward_stuck_in_c_code_stops_the_run_within_a_second_of_its_limit(tmp_path):
    """SIGALRM cannot interrupt C code that holds the GIL (it was caught only when it returned: 114 s for a 2 s
    limit); faulthandler's watchdog ends the process a second after the limit, the run's files as before."""
    (tmp_path / "busy.py").write_text(BUSY_REWARD)
    cmd = [sys.executable, "-m", "zo_objectives.cli", *BASE, "--task", "squad", "--reward", "./busy.py:busy",
           "--reward-timeout", "1", "--steps", "3", "--batch-size", "2", "--eval-size", "2", "--no-eval-before",
           "--output-dir", "run"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Timeout (0:00:02)!" in proc.stderr and 'busy.py", line 4 in busy' in proc.stderr
    assert not (tmp_path / "run" / "trajectory.json").exists()  # no step was taken
    assert "reward_timeout" in json.loads((tmp_path / "run" / "config.json").read_text())


@pytest.mark.parametrize("kwargs,needle", [
    ({"lr": float("nan")}, "--lr must be a finite number, got nan"),
    ({"steps": "4"}, "--steps must be int, got '4'"),
    ({"eps": True}, "--eps must be float, got True"),
    ({"update": "adam"}, "unknown --update 'adam'; accepted: sgd, sign, normalized"),
    ({"dtype": "fp8"}, "unknown --dtype 'fp8'; accepted: auto, fp32, bf16, fp16"),
    ({"label_words": " good"}, "--label-words must be a list"),
    ({"reward_weights": [1, "x"]}, "--reward-weights must be float, got 'x'"),
])
def test_config_checks_values_from_python(kwargs, needle):
    with pytest.raises(UsageError, match=re.escape(needle)):
        TuneConfig(**kwargs)


def test_output_dir_that_is_a_file_returns_2(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for target in (afile, afile / "run"):
        assert tune("--steps", "1", "--output-dir", str(target)) == 2
        assert f"{afile} is a file, not a folder" in capsys.readouterr().err
    assert afile.read_text() == "not a folder"


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
    records = load_checkpoint(run)["optimizer"]["mezo"]["trajectory"]
    assert [r["second_moment"][1] for r in records] == [1, 2]
    assert abs(records[0]["grads"][0]) == pytest.approx(1.0)  # the first estimate is its own RMS
    capsys.readouterr()
    assert tune("--update", "adam", "--steps", "1", "--output-dir", str(tmp_path / "bad")) == 2
    err = capsys.readouterr().err
    assert err == "zo-tune: error: --update: unknown value 'adam'; accepted: sgd, sign, normalized\n"


def test_rank_fitness_shaping_is_scale_free_with_its_own_lr(tmp_path, capsys):
    run = tmp_path / "rank"
    code = tune("--fitness-shaping", "rank", "--steps", "2", "--batch-size", "2", "--eval-size", "2",
                "--no-eval-before", "--output-dir", str(run))
    assert code == 0, capsys.readouterr().err
    config = json.loads((run / "config.json").read_text())
    assert (config["optimizer"]["fitness_shaping"], config["lr"]) == ("rank", 1e-4)
    records = load_checkpoint(run)["optimizer"]["mezo"]["trajectory"]
    assert all(abs(r["grads"][0]) == 1.0 for r in records)  # +-1, not +-1 / (2 eps) = +-500


def test_plugins_listed_in_a_run_folder_are_imported_only_when_named_again(straight_run, tmp_path, capsys):
    """A run folder (or a --config file) may come from someone else: the plugins its config.json lists are not
    imported (a planted .py would run) unless named again on the command line or with --trust-plugins."""
    import shutil

    planted = tmp_path / "planted.py"
    marker = tmp_path / "planted_ran"
    planted.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    run = tmp_path / "run"
    shutil.copytree(straight_run[1], run)
    config = json.loads((run / "config.json").read_text())
    # sealed again as the run would: manifest.json holds checksums, not signatures, so whoever plants can reseal
    write_sealed(run, "config.json", lambda tmp: Path(tmp).write_text(json.dumps({**config, "plugin": [str(planted)]})))
    capsys.readouterr()
    for command in (lambda *a: eval_main(["--run", str(run), "--eval-size", "2", *a]),
                    lambda *a: tune("--output-dir", str(run), "--resume", "--steps", "5", *a),
                    lambda *a: tune("--config", str(run / "config.json"), "--output-dir", str(tmp_path / "b"), *a)):
        assert command() == 2
        assert f"names code to import: --plugin {planted}" in capsys.readouterr().err
        assert not marker.exists()
    assert eval_main(["--run", str(run), "--eval-size", "2", "--plugin", str(planted)]) == 0  # named again
    assert marker.exists()
    marker.unlink()
    for name in [m for m in sys.modules if m.startswith("zo_source_planted_")]:  # imported again below
        del sys.modules[name]
    assert eval_main(["--run", str(run), "--eval-size", "2", "--trust-plugins"]) == 0
    assert marker.exists()


def test_the_optimized_metric_is_reported_and_metric_adds_others(tmp_path, capsys):
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"review {i},{i % 2}\n" for i in range(8)))
    custom = ["--data", str(data), "--dev-data", str(data), "--template", "{text}. It was", "--label-words", " bad",
              " good", "--steps", "2", "--eval-every", "1", "--batch-size", "4", "--no-eval-before"]
    assert tune(*custom, "--objective", "f1", "--output-dir", str(tmp_path / "f1")) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "f1" / "eval.json").read_text())["metric"] == "f1"  # was accuracy
    assert json.loads((tmp_path / "f1" / "config.json").read_text())["metrics"] == ["f1"]
    assert "dev f1 not measured ->" in capsys.readouterr().err
    run = tmp_path / "both"
    assert tune(*custom, "--objective", "f1", "--metric", "accuracy", "f1", "--output-dir", str(run)) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["metric"] == "accuracy" and set(result["after_metrics"]) == {"accuracy", "f1"}
    assert result["after"] == result["after_metrics"]["accuracy"]
    assert all({k for k in r if k.startswith("eval/")} == {"eval/accuracy", "eval/f1"} for r in rows(run))
    # zo-eval --run reports the run's metrics
    capsys.readouterr()
    assert eval_main(["--run", str(run)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["metric"] == "accuracy" and out["metrics"] == result["after_metrics"]
    assert tune(*custom, "--metric", "squad_f1", "--output-dir", str(tmp_path / "c")) == 2
    assert "'squad_f1' cannot score this task's predictions (class indices" in capsys.readouterr().err
    assert tune(*custom, "--metric", "no_such_metric", "--output-dir", str(tmp_path / "d")) == 2
    assert "unknown --metric no_such_metric; available: accuracy" in capsys.readouterr().err


def test_cb_warns_that_dev_is_training_data_and_heldout_fraction_holds_rows_out(tmp_path, capsys):
    common = ["--task", "cb", "--steps", "1", "--batch-size", "4", "--no-eval-before"]
    assert tune(*common, "--output-dir", str(tmp_path / "same")) == 0
    assert "warning: 32 of the 32 cb dev examples are training examples" in capsys.readouterr().err
    run = tmp_path / "heldout"
    assert tune(*common, "--heldout-fraction", "0.25", "--output-dir", str(run)) == 0
    err = capsys.readouterr().err
    assert "warning" not in err and "held-out accuracy" in err
    config, result = (json.loads((run / name).read_text()) for name in ("config.json", "eval.json"))
    assert (config["train_examples"], config["eval_examples"], result["split"]) == (24, 8, "held-out")
    from tasks import get_task

    pool = get_task("cb").examples("train", n=32, seed=0)  # the held-out rows: the seeded pool's last quarter
    trained = {ex["prompt"] for ex in pool[:24]}
    assert not trained & {ex["prompt"] for ex in pool[24:]}
    capsys.readouterr()
    assert eval_main(["--run", str(run)]) == 0  # zo-eval --run evaluates on the run's held-out rows
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["split"], out["examples"], out["value"]) == ("held-out", 8, result["after"])
    assert tune(*common, "--heldout-fraction", "1", "--output-dir", str(tmp_path / "x")) == 2
    assert "--heldout-fraction must be < 1" in capsys.readouterr().err


def test_chat_template_formats_generation_prompts(tmp_path, capsys, monkeypatch):
    import zo_objectives.scoring as scoring

    seen = []
    generate = scoring.GenerationPredictor.generate
    monkeypatch.setattr(scoring.GenerationPredictor, "generate",
                        lambda self, model, prompts, **kw: seen.extend(prompts) or generate(self, model, prompts, **kw))
    run = tmp_path / "chat"
    assert tune("--task", "squad", "--chat-template", "--steps", "1", "--batch-size", "2", "--eval-size", "2",
                "--no-eval-before", "--output-dir", str(run)) == 0, capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["chat_template"] is True
    assert seen and all(p.startswith("<|im_start|>") and p.endswith("<|im_start|>assistant\n") for p in seen)


def test_config_of_a_run_folder_asks_for_a_new_output_dir(straight_run, capsys):
    _, straight = straight_run
    capsys.readouterr()
    assert tune_main(["--config", str(straight / "config.json")]) == 2  # as README had it: the folder exists
    assert "pass --output-dir NEW_FOLDER to rerun its settings there" in capsys.readouterr().err


@pytest.mark.parametrize("again", [["--resume"], []])
def test_a_run_stopped_before_its_first_checkpoint_resumes_from_step_0(again, tmp_path, monkeypatch, capsys):
    """A full disk at the first checkpoint (--checkpoint-every 3): three logged steps, no trajectory.json. Both
    --resume and the same command again run it from step 0 in place (it read "no trajectory.json" and "exists;
    pass --resume"), and reach the weights of a run never stopped."""
    from zo_objectives import runfolder

    real = runfolder.atomic_write

    def full_disk(path, *args, **kwargs):
        if path.name == "trajectory.json":
            raise OSError(28, "No space left on device", str(path))
        return real(path, *args, **kwargs)

    args = ["--steps", "4", "--checkpoint-every", "3", "--eval-every", "0", "--eval-size", "4", "--no-eval-before"]
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(runfolder, "atomic_write", full_disk)
        assert tune(*args, "--output-dir", str(run)) == 1
    assert [r["step"] for r in rows(run)] == [1, 2, 3] and not (run / "trajectory.json").exists()
    capsys.readouterr()
    assert tune(*args, "--output-dir", str(run), *again) == 0, capsys.readouterr().err
    assert f"reusing {run}: the run there stopped before its first checkpoint" in capsys.readouterr().err
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4]
    assert tune(*args, "--output-dir", str(tmp_path / "straight")) == 0
    assert load_file(run / "model.safetensors").keys() == load_file(tmp_path / "straight" / "model.safetensors").keys()
    for name, value in load_file(run / "model.safetensors").items():
        assert torch.equal(value, load_file(tmp_path / "straight" / "model.safetensors")[name]), name


def test_run_statistics_cover_every_session_of_a_resumed_run(tmp_path, monkeypatch, capsys):
    """A first session whose steps all tie and take 0.3 s a call, a resume whose steps do not: eval.json's
    tied_fraction, train_seconds and the final line are the whole run's (they were the last session's)."""
    def flat(model, batch):  # the same loss on both sides: every estimate ties
        time.sleep(0.3)
        return 1.0

    run = tmp_path / "run"
    args = ["--objective", "cross_entropy", "--eval-size", "4", "--no-eval-before", "--output-dir", str(run)]
    with monkeypatch.context() as m:
        m.setattr(cli, "make_objective", lambda *a, **k: flat)
        assert tune(*args, "--steps", "2") == 0
    assert tune(*args, "--steps", "4", "--resume") == 0
    log = rows(run)
    assert [r["tied"] for r in log] == [True, True, False, False]
    summary = json.loads((run / "eval.json").read_text())
    assert summary["tied_fraction"] == sum(r["tied"] for r in log) / len(log)
    assert summary["train_seconds"] >= sum(r["seconds"] for r in log) >= 4 * 0.3
    assert f"{summary['tied_fraction']:.0%} of steps tied" in capsys.readouterr().err.strip().splitlines()[-1]


def flip_in(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))


@pytest.mark.parametrize("damage, blamed", [
    # the manifest's record of eval.json edited: it was blamed on eval.json
    (lambda run: flip_in(run / "manifest.json", json.loads((run / "manifest.json").read_text())["files"]["eval.json"]
                         ["sha256"][:12].encode(), b"0" * 12), "manifest.json was changed or damaged"),
    (lambda run: flip_in(run / "manifest.json", b'"run": "', b'"run": "0'), "manifest.json was changed or damaged"),
    # a flipped bit in config.json: it read "unknown --noise 't`ble'"
    (lambda run: flip_in(run / "config.json", b'\n "noise": "table"', b'\n "noise": "t`ble"'),
     "config.json was changed, damaged or replaced after the run wrote it"),
])
def test_a_damaged_manifest_or_config_is_named_on_resume_and_eval(damage, blamed, straight_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight_run[1], run)
    damage(run)
    capsys.readouterr()
    assert tune_main(["--output-dir", str(run), "--resume", "--steps", "6"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and blamed in err, err
    assert eval_main(["--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and blamed in err, err


@pytest.mark.parametrize("gap", [0.002, 0.01, 0.03])
def test_two_ctrl_c_a_few_ms_apart_print_one_line(tmp_path, gap):
    """The second Ctrl-C reached the interpreter's shutdown: a threading._shutdown traceback after the one line,
    or the process killed by SIGINT (status -2) instead of 130."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "zo_objectives.cli", *BASE, "--output-dir", str(run), "--steps", "100000",
           "--eval-size", "4"]
    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=root, env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not (run / "trajectory.json").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        time.sleep(gap)
        proc.send_signal(signal.SIGINT)
        code, err = proc.wait(60), proc.stderr.read()
    finally:
        proc.kill()
    assert code == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.strip().splitlines()[-1].startswith("zo-tune: stopped by SIGINT")
