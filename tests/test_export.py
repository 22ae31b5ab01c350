"""Tests for zo-export: a tuned run leaves as a Hugging Face folder whose model gives the tuned model's logits;
the run folder is verified as zo-eval --run verifies it; the folder holds the task and a model card (issues 34, 35)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks import get_task
from zo_objectives import cli
from zo_objectives.cli import eval_main, export_main, tune_main
from zo_objectives.export import export_run
from zo_objectives.models import apply_peft, load_model, load_run_weights
from zo_objectives.scoring import predictor_for

TUNE = ["--model", "tiny-random", "--task", "sst2", "--train-size", "16", "--batch-size", "8", "--steps", "2",
        "--lr", "1e-2", "--eval-every", "0", "--eval-size", "8", "--no-eval-before", "--no-progress"]


@pytest.fixture(scope="module", params=["none", "lora", "prefix"])
def run(request, tmp_path_factory):
    """A finished 2-step run tuning the weights, a LoRA adapter or a prefix (lr 1e-2: the weights move)."""
    folder = tmp_path_factory.mktemp("runs") / request.param
    assert tune_main([*TUNE, "--peft", request.param, "--output-dir", str(folder)]) == 0
    return request.param, folder


def tuned_model(folder):
    """The run's tuned model as zo-eval --run rebuilds it."""
    config = json.loads((folder / "config.json").read_text())
    model, _ = load_model(config["model"], dtype=config["dtype"])
    model = apply_peft(model, json.loads((folder / "config.json").read_text())["peft"])
    load_run_weights(model, folder)
    return model.eval()


def logits(model, tokenizer):
    batch = tokenizer(["a fine film. It was", "dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_exported_folder_loads_with_hugging_face_and_gives_the_tuned_logits(run, tmp_path):
    kind, folder = run
    out = tmp_path / "hf"
    assert export_main([str(folder), str(out)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    if kind == "none":
        exported = AutoModelForCausalLM.from_pretrained(out)
    else:
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == {"lora": "LORA",
                                                                                        "prefix": "PREFIX_TUNING"}[kind]
        exported = PeftModel.from_pretrained(load_model("tiny-random")[0], out)
    expected = logits(tuned_model(folder), tokenizer)
    assert torch.equal(logits(exported.eval(), tokenizer), expected)
    assert not torch.equal(logits(load_model("tiny-random")[0], tokenizer), expected)  # tuning changed them


def test_a_merged_lora_export_is_a_full_model_with_the_tuned_logits(run, tmp_path):
    kind, folder = run
    if kind != "lora":
        assert export_main([str(folder), str(tmp_path / "m"), "--merge"]) == 2  # merge is for LoRA runs only
        return
    out = export_run(folder, tmp_path / "merged", merge=True)
    assert not (out / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(merged, tokenizer), logits(tuned_model(folder), tokenizer))


def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys):
    _, folder = run
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((folder / "config.json").read_text())
    for argv, message in [([str(tmp_path / "missing"), str(tmp_path / "a")], "is not a zo-tune run folder"),
                          ([str(unfinished), str(tmp_path / "b")], "no model.safetensors and no trajectory.json in"),
                          ([str(folder), str(full)], "exists and is not an empty folder")]:
        capsys.readouterr()
        assert export_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("zo-export: error: ") and message in err[0], err
    assert export_main([str(folder)]) == 2  # a missing argument: one line too, no usage block
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zo-export: error: ") and "out_dir" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "unfinished"]  # nothing written


def tune(folder, *extra):
    assert tune_main([*TUNE, "--output-dir", str(folder), *extra]) == 0
    return folder


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Two finished runs tuning the weights, with seeds 0 and 1."""
    root = tmp_path_factory.mktemp("plain")
    return tune(root / "s0"), tune(root / "s1", "--seed", "1")


def one_error_line(capsys, code, expected_code=2):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == expected_code and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("damage", ["flipped weight byte", "another run's weights", "config dtype edited"])
def test_export_verifies_the_run_folder_as_zo_eval_does(plain, damage, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(plain[0], folder)
    weights = folder / "model.safetensors"
    if damage == "flipped weight byte":
        data = bytearray(weights.read_bytes())
        data[-7] ^= 0x10  # in the tensors, past the header
        weights.write_bytes(bytes(data))
    elif damage == "another run's weights":
        shutil.copy(plain[1] / "model.safetensors", weights)
    else:
        config = folder / "config.json"
        config.write_text(config.read_text().replace('"dtype": "fp32"', '"dtype": "bf16"'))
    line = one_error_line(capsys, export_main([str(folder), str(tmp_path / "out")]))
    named = "config.json" if "config" in damage else "model.safetensors"
    assert line.startswith("zo-export: error: ") and named in line, line
    zo_eval = one_error_line(capsys, eval_main(["--run", str(folder), "--eval-size", "2"]))
    assert line.removeprefix("zo-export: ") == zo_eval.removeprefix("zo-eval: ")  # the same check, the same words
    assert not (tmp_path / "out").exists()


def nothing_left(parent, name="out"):
    return not [p.name for p in parent.iterdir() if p.name.startswith((name, f".{name}"))]


@pytest.mark.parametrize("fault", ["full disk", "read-only folder"])
def test_a_write_that_fails_is_one_line_and_leaves_nothing(plain, fault, tmp_path, capsys, monkeypatch):
    code = {"full disk": errno.ENOSPC, "read-only folder": errno.EACCES}[fault]

    def failing(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(args[1]) if len(args) > 1 else None)

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", failing)
    line = one_error_line(capsys, export_main([str(plain[0]), str(tmp_path / "out")]))
    assert line.startswith("zo-export: error: cannot write") and os.strerror(code) in line, line
    assert nothing_left(tmp_path)


def test_an_export_stopped_by_sigterm_is_one_line_and_leaves_nothing(plain, tmp_path, capsys, monkeypatch):
    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs before this returns
        pytest.fail("SIGTERM did not stop the export")

    def unhandled(signum, frame):  # (without it, an export that does not handle SIGTERM would end pytest)
        raise RuntimeError("zo-export left SIGTERM to the handler it found")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", stopped)
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        code = export_main([str(plain[0]), str(tmp_path / "out")])
        assert signal.getsignal(signal.SIGTERM) is unhandled  # put back
    finally:
        signal.signal(signal.SIGTERM, previous)
    line = one_error_line(capsys, code, 128 + signal.SIGTERM)
    assert line == f"zo-export: stopped by SIGTERM; {tmp_path / 'out'} was not written"
    assert nothing_left(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_one_line(plain, tmp_path, capsys):
    tmp_path.chmod(0o555)
    try:
        line = one_error_line(capsys, export_main([str(plain[0]), str(tmp_path / "out")]))
    finally:
        tmp_path.chmod(0o755)
    assert "Permission denied" in line


def test_an_output_path_under_a_file_is_one_line(plain, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    line = one_error_line(capsys, export_main([str(plain[0]), str(tmp_path / "file" / "out")]))
    assert "is a file, not a folder" in line


def test_temporaries_of_a_killed_export_are_removed_and_files_are_0644(plain, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    left = tmp_path / f".out.tmp-{dead.pid}"  # what an export killed by SIGKILL leaves
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"half")
    previous = os.umask(0o022)
    try:
        out = export_run(plain[0], tmp_path / "out")
    finally:
        os.umask(previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes  # model.safetensors was 0600


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_exported_logits_equal_the_runs_in_half_precision(dtype, tmp_path):
    folder = tune(tmp_path / "run", "--dtype", dtype)
    out = export_run(folder, tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(out)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    assert torch.equal(logits(exported.eval(), tokenizer), logits(tuned_model(folder), tokenizer))  # bf16: 0.0039 off
    assert f"load it in torch.{'bfloat16' if dtype == 'bf16' else 'float16'}" in (out / "README.md").read_text()


def test_the_folder_holds_the_task_a_model_card_and_the_padding_side(run, tmp_path):
    kind, folder = run
    out = export_run(folder, tmp_path / "out")
    task, sst2 = json.loads((out / "task.json").read_text()), get_task("sst2")
    assert task["task"] == "sst2" and task["kind"] == "classification" and task["label_words"] == sst2.label_words
    assert task["example"]["prompt"] == sst2.examples("dev", n=1)[0]["prompt"] and "template_code" in task
    assert AutoTokenizer.from_pretrained(out).padding_side == "left"  # was right: batches disagreed with the run
    card = (out / "README.md").read_text()
    evaluation = json.loads((folder / "eval.json").read_text())
    assert "tiny-random" in card and f"{evaluation['after']:.4f}" in card and "task.json" in card
    if kind != "none":
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-random"


def test_a_stopped_run_exports_its_checkpoint_rebuilt_by_replay(run, tmp_path, monkeypatch, capsys):
    kind, finished = run
    real = cli.train

    def stopped_after(*args, **kwargs):  # stopped after its last checkpoint, before its weights were written
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "train", stopped_after)
    stopped = tmp_path / "stopped"
    assert tune_main([*TUNE, "--peft", kind, "--output-dir", str(stopped)]) == 130
    assert not (stopped / "model.safetensors").exists()
    monkeypatch.undo()
    assert export_main([str(stopped), str(tmp_path / "out")]) == 0, capsys.readouterr().err
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    exported = (AutoModelForCausalLM.from_pretrained(tmp_path / "out") if kind == "none"
                else PeftModel.from_pretrained(load_model("tiny-random")[0], tmp_path / "out"))
    assert torch.equal(logits(exported.eval(), tokenizer), logits(tuned_model(finished), tokenizer))  # same 2 steps
    assert "the run stopped before its final evaluation" in (tmp_path / "out" / "README.md").read_text()


def test_best_exports_the_weights_of_the_best_evaluation(tmp_path, capsys):
    folder = tune(tmp_path / "run", "--steps", "3", "--eval-every", "1")
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda r: r["eval"])["step"]  # accuracy: greater is better; the first of equals
    assert export_main([str(folder), str(tmp_path / "best"), "--best"]) == 0, capsys.readouterr().err
    reference = tune(tmp_path / "short", "--steps", str(best))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "best")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "best").eval()
    assert torch.equal(logits(exported, tokenizer), logits(tuned_model(reference), tokenizer))
    if best != 3:
        assert not torch.equal(logits(exported, tokenizer), logits(tuned_model(folder), tokenizer))
    value = next(r["eval"] for r in rows if r["step"] == best)
    assert f"step {best}, is the run's best evaluation: {value:.4f}" in (tmp_path / "best" / "README.md").read_text()
    no_eval = tune(tmp_path / "no-eval")
    capsys.readouterr()
    line = one_error_line(capsys, export_main([str(no_eval), str(tmp_path / "x"), "--best"]))
    assert "holds no evaluation" in line


def test_a_lora_classifier_export_loads_by_the_base_models_name_and_predicts_as_the_run(tmp_path):
    base = tmp_path / "hub" / "base-model"  # a local folder standing in for a hub name
    model, tokenizer = load_model("tiny-random")
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    folder = tmp_path / "run"
    assert tune_main([*TUNE, "--model", str(base), "--peft", "lora", "--output-dir", str(folder)]) == 0
    task = get_task("sst2")
    examples = task.examples("dev", n=8)
    tuned, tok = load_model(str(base))
    tuned = apply_peft(tuned, "lora")
    load_run_weights(tuned, folder)
    expected = predictor_for(task, tok).predict(tuned.eval(), examples)  # as the run (zo-eval) predicts
    export_run(folder, tmp_path / "export")
    elsewhere = tmp_path / "colleague" / "classifier"  # another machine: only the export and the base model
    shutil.copytree(tmp_path / "export", elsewhere)
    shutil.rmtree(folder)
    shutil.rmtree(tmp_path / "export")
    name = json.loads((elsewhere / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert name == str(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(name), elsewhere).eval()
    tokenizer = AutoTokenizer.from_pretrained(elsewhere)
    saved = json.loads((elsewhere / "task.json").read_text())
    label_ids = [tokenizer.encode(w, add_special_tokens=False)[0] for w in saved["label_words"]]
    batch = tokenizer([ex["prompt"] for ex in examples], return_tensors="pt", padding=True, add_special_tokens=False)
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as the model card says
    with torch.no_grad():
        predicted = model(**batch, position_ids=positions).logits[:, -1, label_ids].argmax(-1).tolist()
    assert predicted == expected
