"""Tests for zo-export: a tuned run leaves as a Hugging Face folder whose model gives the tuned model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from zo_objectives.cli import export_main, tune_main
from zo_objectives.models import apply_peft, export_run, load_model, load_run_weights

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
    model, _ = load_model("tiny-random")
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
                          ([str(unfinished), str(tmp_path / "b")], "no model.safetensors in"),
                          ([str(folder), str(full)], "exists and is not an empty folder")]:
        capsys.readouterr()
        assert export_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("zo-export: error: ") and message in err[0], err
    with pytest.raises(SystemExit) as stop:
        export_main([str(folder)])
    assert stop.value.code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "unfinished"]  # nothing written
