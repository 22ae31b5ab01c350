"""Issue 34: the reward and metric paths as a TRL or Trainer user meets them: generation settings, TRL's
conversational format, the measured reward defaults, completions in the open, names, one set of defaults and a
Trainer-style entry (ZOTrainer)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from zo_objectives.cli import tune_main, tune_parser
from zo_objectives.config import OBJECTIVE_DEFAULTS, REWARD, TuneConfig
from zo_objectives.scoring import GenerationPredictor

pytestmark = [pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`"),
              pytest.mark.filterwarnings("ignore:.* prompts cut from the left")]

BASE = ["--model", "tiny-random", "--batch-size", "2", "--eval-size", "2", "--no-progress", "--no-eval-before"]


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


class Scripted(torch.nn.Module):
    """A 'model' whose generate() returns the token ids of scripted texts: the predictor's cutting and warnings
    are tested on text a real instruct model writes."""

    def __init__(self, tokenizer, texts: list[str], width: int | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"max_position_embeddings": 512})()
        self.tokenizer, self.texts, self.width = tokenizer, texts, width

    def generate(self, input_ids, max_new_tokens, **kwargs):
        rows = [self.tokenizer.encode(t, add_special_tokens=False)[:max_new_tokens] for t in self.texts]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        new = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], 1)


# 1. Generation settings
def test_generation_flags_reach_the_generator_and_are_recorded(tmp_path, capsys, monkeypatch):
    import zo_objectives.scoring as scoring

    built = []
    init = scoring.GenerationPredictor.__init__
    monkeypatch.setattr(scoring.GenerationPredictor, "__init__",
                        lambda self, *a, **kw: built.append(kw) or init(self, *a, **kw))
    run = tmp_path / "run"
    code = tune_main([*BASE, "--task", "squad", "--reward", "token_f1", "--max-new-tokens", "24", "--stop", "\\n\\n",
                      "}", "--temperature", "0.7", "--top-p", "0.9", "--steps", "1", "--population", "0",
                      "--output-dir", str(run)])
    assert code == 0, capsys.readouterr().err
    config = json.loads((run / "config.json").read_text())
    assert (config["max_new_tokens"], config["stop"], config["sample_temperature"], config["top_p"]) == (
        24, ["\n\n", "}"], 0.7, 0.9)
    sampler = [kw for kw in built if kw.get("temperature")]
    assert sampler and sampler[0]["max_new_tokens"] == 24 and sampler[0]["stop"] == ["\n\n", "}"]
    assert sampler[0]["top_p"] == 0.9
    assert TuneConfig().stop == ["\n"]  # the default made explicit (and written to config.json)
    assert TuneConfig(stop=[""]).stop == []  # --stop '' : none
    assert "--max-new-tokens" in tune_parser().format_help() and "--top-p" in tune_parser().format_help()


def test_a_stop_that_cuts_json_to_a_brace_is_warned(tokenizer):
    model = Scripted(tokenizer, ['{\n  "answer": 3\n}', '{\n  "answer": 4\n}'])
    generator = GenerationPredictor(tokenizer, max_new_tokens=32)
    with pytest.warns(UserWarning, match=r"2 of 2 completions were cut at a stop string .*'\{'.*--stop"):
        assert generator.generate(model, ["a", "b"]) == ["{", "{"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert generator.generate(model, ["a", "b"]) == ["{", "{"]  # warned once
        whole = GenerationPredictor(tokenizer, max_new_tokens=32, stop=[])
        assert json.loads(whole.generate(model, ["a", "b"])[0]) == {"answer": 3}  # no stop: the whole answer
        fine = GenerationPredictor(tokenizer, max_new_tokens=32)
        assert fine.generate(Scripted(tokenizer, ["Paris\n", "Rome\n"]), ["a", "b"]) == ["Paris", "Rome"]


def test_completions_cut_by_the_length_limit_are_warned(tokenizer):
    model = Scripted(tokenizer, ["one two three four five six seven eight nine ten"] * 3)
    with pytest.warns(UserWarning, match="3 of 3 completions reached max_new_tokens=4 unfinished"):
        GenerationPredictor(tokenizer, max_new_tokens=4).generate(model, ["a", "b", "c"])


# 9. TRL's conversational format
CONVERSATIONAL_REWARD = '''
import json


def short_reply(prompts, completions, **kwargs):
    """TRL's conversational reward: each completion a list of one assistant message."""
    with open("seen.jsonl", "a") as f:
        f.write(json.dumps({"prompts": prompts, "completions": completions}) + "\\n")
    return [1.0 / (1 + len(c[0]["content"])) for c in completions]
'''


def test_conversational_prompts_and_rewards_as_trl_gives_them(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conv.py").write_text(CONVERSATIONAL_REWARD)
    lines = [{"prompt": [{"role": "system", "content": "Answer in one word."},
                         {"role": "user", "content": f"Name a {w}."}], "topic": w}
             for w in ["colour", "fruit", "city", "river"]]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    run = tmp_path / "run"
    code = tune_main([*BASE, "--data", "chat.jsonl", "--reward", "conv.py:short_reply", "--steps", "1",
                      "--population", "0", "--output-dir", str(run)])
    assert code == 0, capsys.readouterr().err  # was: IndexError: string index out of range
    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert seen and all(isinstance(p, list) and p[-1]["role"] == "user" for call in seen for p in call["prompts"])
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
               for call in seen for c in call["completions"])
    assert {p[-1]["content"] for call in seen for p in call["prompts"]} <= {r["prompt"][-1]["content"] for r in lines}


def test_conversational_examples_are_put_in_the_chat_template(tokenizer):
    from zo_objectives.scoring import MESSAGES, conversational

    messages = [{"role": "user", "content": "Hi?"}]
    plain, chat = conversational([{"prompt": "x", "raw": {"prompt": "x"}},
                                  {"prompt": str(messages), "raw": {"prompt": messages}}], tokenizer)
    assert plain == {"prompt": "x", "raw": {"prompt": "x"}}
    assert chat["prompt"] == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat[MESSAGES] == messages


# 2. The measured reward setting by default
def test_reward_runs_default_to_the_measured_setting_and_flags_override(tmp_path, capsys):
    measured = OBJECTIVE_DEFAULTS[REWARD]
    run = tmp_path / "run"
    assert tune_main([*BASE, "--task", "arith", "--steps", "1", "--output-dir", str(run)]) == 0, (
        capsys.readouterr().err)
    config = json.loads((run / "config.json").read_text())
    assert {k: config[k] for k in measured} == measured
    assert config["optimizer"]["population"] == measured["population"]  # the estimator that ran
    old = TuneConfig(task="arith", population=0)  # the old behaviour, one flag away: MeZO, sgd, generic lr/eps
    assert (old.population, old.update, old.lr, old.eps) == (0, "sgd", None, None)
    assert TuneConfig(task="arith", lr=5e-4).lr == 5e-4 and TuneConfig(task="arith", update="sgd").population == 0
    plain = TuneConfig(task="sst2")
    assert (plain.population, plain.update, plain.lr) == (0, "sgd", None)  # other objectives as before


# 3. Completions in the open, TensorBoard, callbacks
def test_completions_sample_tensorboard_and_callbacks(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from zo_objectives.cli import tune
    from zo_objectives.reporting import SAMPLE

    seen = []
    run = tmp_path / "run"
    config = TuneConfig(model="tiny-random", task="squad", reward=["token_f1"], population=0, steps=4, batch_size=2,
                        eval_size=3, eval_every=2, log_completions_every=3, report_to=["tensorboard"],
                        progress=False, output_dir=str(run))
    tune(config, callbacks=[seen.append])
    assert [r["step"] for r in seen] == [1, 2, 3, 4]  # each row, once logged
    assert [r["loss"] for r in seen] == [r["loss"] for r in rows(run)]
    samples = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    at = {(s["step"], s["split"]) for s in samples}
    assert at == {(0, "eval"), (2, "eval"), (3, "train"), (4, "eval")}  # before, at evaluations, every 3 steps
    assert all(isinstance(s["completion"], str) and isinstance(s["reward"], float) for s in samples)
    assert sum(s["step"] == 2 for s in samples) == min(3, SAMPLE)
    events = EventAccumulator(str(run / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "train/reward", "rewards/token_f1", "eval/reward", "tied"} <= tags
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in rows(run)])
    # --overwrite replaces the TensorBoard folder with the run's other files: no earlier curve drawn over the new one
    tune(TuneConfig(**{**config.__dict__, "steps": 2, "eval_every": 0, "log_completions_every": 0}), overwrite=True)
    events = EventAccumulator(str(run / "tb")).Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2]


def test_completions_log_drops_a_torn_line(tmp_path):
    from zo_objectives.reporting import append_jsonl

    path = tmp_path / "c.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "compl')  # a kill mid-line
    append_jsonl(path, [{"step": 3}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1}, {"step": 3}]


# 5. One name, one number
def test_training_and_evaluation_values_have_their_own_names(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert tune_main(["--model", "tiny-random", "--task", "sst2", "--train-size", "16", "--batch-size", "4",
                      "--eval-size", "8", "--objective", "f1", "--steps", "2", "--eval-every", "2",
                      "--output-dir", str(run)]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "train/f1 (expected, batch)" in err and "eval/f1" in err  # the progress bar
    log = rows(run)
    assert all("train/f1" in r and "f1" not in r for r in log) and "eval/f1" in log[-1]
    summary = json.loads((run / "eval.json").read_text())
    assert summary["after"] == log[-1]["eval/f1"]
    import matplotlib.axes

    from zo_objectives.plots import plot_run

    titles = []
    set_axes = matplotlib.axes.Axes.set
    monkeypatch.setattr(matplotlib.axes.Axes, "set", lambda self, **kw: titles.append(kw.get("title")) or set_axes(
        self, **kw))
    plot_run(run)  # curve.png
    assert titles[0].startswith("train/f1 (expected") and titles[1].startswith("eval/f1")


# A Trainer-style entry: a TRL GRPO script with only its import and class names changed
GRPO_SCRIPT = '''
from datasets import Dataset
from zo_objectives import ZOConfig, ZOTrainer            # was: from trl import GRPOConfig, GRPOTrainer

dataset = Dataset.from_dict({"prompt": ["The sky is", "Once upon a time", "My favourite food is", "Water is"]})


def reward_len(completions, **kwargs):                    # TRL's quickstart reward: completions near 20 characters
    return [-abs(20 - len(completion)) for completion in completions]


training_args = ZOConfig(output_dir=OUTPUT, logging_steps=1, learning_rate=1e-3, per_device_train_batch_size=2,
                         num_generations=4, max_completion_length=8, max_steps=2, report_to="none")
trainer = ZOTrainer(model="tiny-random", reward_funcs=reward_len, args=training_args, train_dataset=dataset)
trainer.train()
trainer.save_model()
'''


def test_a_trl_grpo_script_runs_through_zotrainer(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "zo"
    namespace = {"OUTPUT": str(out)}
    exec(GRPO_SCRIPT, namespace)  # noqa: S102 (the user's script, as written)
    trainer = namespace["trainer"]
    log = rows(out)
    assert [r["step"] for r in log] == [1, 2] and all("reward_len" in r["rewards"] for r in log)
    config = json.loads((out / "config.json").read_text())
    assert (config["population"], config["max_new_tokens"], config["lr"], config["stop"]) == (4, 8, 1e-3, [])
    assert [r["step"] for r in trainer.state.log_history] == [1, 2]
    tuned = AutoModelForCausalLM.from_pretrained(out / "model")  # save_model: a Hugging Face folder
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), trainer.model.state_dict().values()))
    assert (out / "completions.jsonl").exists() and json.loads((out / "eval.json").read_text())["metric"] == "reward"


def test_zotrainer_conversational_dataset_loaded_model_and_metric_form(tmp_path, capsys):
    from datasets import Dataset

    from zo_objectives import ZOConfig, ZOTrainer, load_model

    model, tokenizer = load_model("tiny-random")
    chats = Dataset.from_list([{"prompt": [{"role": "user", "content": f"Say {w}."}], "word": w}
                               for w in ["yes", "no", "up", "down"]])
    got = []

    def says_word(completions, word, **kwargs):
        got.extend(completions)
        return [float(w in c[0]["content"]) for c, w in zip(completions, word)]

    args = ZOConfig(output_dir=str(tmp_path / "chat"), per_device_train_batch_size=2, num_generations=2,
                    max_completion_length=4, max_steps=1)
    result = ZOTrainer(model=model, processing_class=tokenizer, reward_funcs=[says_word], args=args,
                       train_dataset=chats, eval_dataset=chats).train()
    assert got and all(c[0]["role"] == "assistant" for c in got) and result.global_step == 1
    assert result.metrics["metric"] == "reward"

    calls = []

    def compute_metrics(eval_pred):  # a Trainer user's: an EvalPrediction in, a dict of figures out
        calls.append(eval_pred)
        return {"accuracy": float((eval_pred.predictions == eval_pred.label_ids).mean())}

    reviews = Dataset.from_list([{"text": t, "label": y} for t, y in
                                 [("great film", 1), ("awful film", 0), ("loved it", 1), ("hated it", 0)]])
    args = ZOConfig(output_dir=str(tmp_path / "metric"), per_device_train_batch_size=2, max_steps=2,
                    template="{text}. It was", label_words=[" bad", " good"], eval_strategy="steps", eval_steps=1)
    result = ZOTrainer(model=model, processing_class=tokenizer, compute_metrics=compute_metrics, args=args,
                       train_dataset=reviews, eval_dataset=reviews).train()
    config = json.loads((tmp_path / "metric" / "config.json").read_text())
    assert config["objective"] == "compute_metrics" and config["population"] == 0
    assert calls and hasattr(calls[0], "label_ids") and 0 <= result.metrics["after"] <= 1
    assert [("eval" in r) for r in rows(tmp_path / "metric")] == [True, True]


# 8. One set of defaults for the library and the CLI
def test_library_and_cli_share_their_defaults(tmp_path, capsys, tokenizer):
    from tasks import task_from_file
    from zo_objectives import CrossEntropy, RewardObjective, make_objective, predictor_for
    from zo_objectives.config import DEFAULT_LR, default_lr

    (tmp_path / "reviews.csv").write_text("prompt,label\ngreat film. It was,1\nawful film. It was,0\n"
                                          "loved it. It was,1\nhated it. It was,0\n")
    task = task_from_file(tmp_path / "reviews.csv", name="reviews", label_words=[" bad", " good"])  # no template=
    assert [ex["prompt"] for ex in task.examples("dev")][:1] == ["great film. It was"]
    run = tmp_path / "run"
    assert tune_main(["--model", "tiny-random", "--data", str(tmp_path / "reviews.csv"), "--label-words", " bad",
                      " good", "--objective", "f1", "--steps", "1", "--batch-size", "2", "--no-progress",
                      "--no-eval-before", "--output-dir", str(run)]) == 0, capsys.readouterr().err  # no --template
    config = json.loads((run / "config.json").read_text())
    predictor = predictor_for(task, tokenizer)
    assert config["template"] == "{prompt}"
    assert default_lr(make_objective("f1", predictor)) == config["lr"] == DEFAULT_LR["mean"]  # the library's lr
    assert default_lr(make_objective("accuracy", predictor)) == DEFAULT_LR["log"]
    assert default_lr(CrossEntropy(predictor)) == DEFAULT_LR["cross_entropy"]
    greedy = GenerationPredictor(tokenizer)
    measured = OBJECTIVE_DEFAULTS[REWARD]
    reward = RewardObjective(greedy, [lambda prompts, completions, **kw: [0.0] * len(completions)])
    assert default_lr(reward, measured["update"], population=measured["population"]) == measured["lr"]
    assert default_lr(reward) == DEFAULT_LR["mean"]  # MeZO, sgd: the old setting's lr


# Every snippet that uses rewards runs as written, with its lr
def test_readme_reward_and_one_call_snippets_run_as_written(tmp_path):
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = root / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    rewards = next(b for b in blocks if "RewardObjective(" in b)
    one_call = next(b for b in blocks if "tune(TuneConfig(" in b)
    assert "lr=" in rewards and 'load_model("tiny-random")' in rewards and 'model="tiny-random"' in one_call
    for code in (rewards, one_call):
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env={"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PATH": ""})
        assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "runs" / "q" / "eval.json").exists()
    assert len(readme.read_bytes()) <= 12 * 1024


def test_ready_rewards_read_conversational_completions():
    from metrics.rewards import get_reward

    as_messages = [[{"role": "assistant", "content": "Answer: 4"}], [{"role": "assistant", "content": "five"}]]
    as_text = ["Answer: 4", "five"]
    columns = {"answer": ["4", "5"], "answers": [["4"], ["5"]]}
    for name in ("exact_answer", "number_close", "token_f1", "format_match", "length_limit", "answer_check"):
        reward = get_reward(name)
        assert reward(["q", "q"], as_messages, **columns) == reward(["q", "q"], as_text, **columns), name


def test_zo_tune_warns_when_chat_answers_are_cut_to_a_brace(tmp_path, capsys, monkeypatch, tokenizer):
    """Finding 1 as reported: an instruct model's JSON answers, cut at the first newline to '{' (every reward 0):
    the run says why and how to change it."""
    from transformers.generation.utils import GenerationMixin

    answer = tokenizer.encode('{\n  "answer": "Paris"\n}', add_special_tokens=False)

    def writes_json(self, input_ids, max_new_tokens, **kwargs):
        return torch.cat([input_ids, torch.tensor([answer[:max_new_tokens]] * len(input_ids))], 1)

    monkeypatch.setattr(GenerationMixin, "generate", writes_json)
    with pytest.warns(UserWarning, match=r"cut at a stop string \['\\n'\] before any letter or digit .*'\{'.*--stop"):
        assert tune_main([*BASE, "--task", "squad", "--chat-template", "--reward", "token_f1", "--steps", "1",
                          "--population", "0", "--output-dir", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "completions were cut")
        assert tune_main([*BASE, "--task", "squad", "--chat-template", "--reward", "token_f1", "--steps", "1",
                          "--population", "0", "--max-new-tokens", "32", "--stop", "", "--output-dir",
                          str(tmp_path / "whole")]) == 0, capsys.readouterr().err


def test_report_to_tensorboard_without_the_package_is_one_line(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    run = tmp_path / "run"
    assert tune_main([*BASE, "--task", "sst2", "--steps", "1", "--report-to", "tensorboard", "--output-dir",
                      str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install tensorboard" in err and len(err.splitlines()) == 1 and not run.exists()
    assert tune_main([*BASE, "--report-to", "wandb", "--output-dir", str(run)]) == 2  # one line, as every flag
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--report-to" in err and "tensorboard" in err, err


def test_zoconfig_takes_grpoconfig_names_and_refuses_unknown_ones(tmp_path):
    """A GRPO script's settings without a meaning here (gradient accumulation, KL beta) are accepted and named
    in one warning; bf16 / use_cpu / log_completions carry over; a misspelt name is refused in one line."""
    from datasets import Dataset

    from zo_objectives import ZOConfig, ZOTrainer

    with pytest.warns(UserWarning, match="ignores beta, gradient_accumulation_steps"):
        args = ZOConfig(output_dir=str(tmp_path / "r"), gradient_accumulation_steps=4, beta=0.04, bf16=True,
                        use_cpu=True, log_completions=True, logging_steps=3, max_steps=1)
    assert args.ignored == {"gradient_accumulation_steps": 4, "beta": 0.04}
    dataset = Dataset.from_dict({"prompt": ["a", "b"]})
    trainer = ZOTrainer(model="tiny-random", reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                        args=args, train_dataset=dataset)
    assert (trainer.config.dtype, trainer.config.device, trainer.config.log_completions_every) == ("bf16", "cpu", 3)
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"unknown setting lerning_rate \(did you mean learning_rate\?\)") as info:
        ZOConfig(lerning_rate=1e-3)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="bf16 and fp16"):
        ZOConfig(bf16=True, fp16=True)
