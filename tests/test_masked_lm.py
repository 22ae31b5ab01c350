"""Masked LMs (the MeZO paper's RoBERTa-large half): label words scored at a mask token, trained with MeZO from
the library and the CLI, on a tiny random RoBERTa saved to a local folder with an offline word-level tokenizer:
the same loading path as ``roberta-large`` from a local folder."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoModelForMaskedLM, PreTrainedTokenizerFast, RobertaConfig

from tasks import get_task
from zo_objectives import MeZO, make_objective, train
from zo_objectives.cli import eval_main, tune_main
from zo_objectives.evaluate import evaluate_model
from zo_objectives.models import apply_peft, is_masked_lm, load_model
from zo_objectives.scoring import LabelWordPredictor, MaskedLabelWordPredictor, predictor_for

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids: bos 0, pad 1, eos 2, mask after unk


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer with RoBERTa's special tokens, built without any download."""
    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIALS + words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", model_max_length=62)


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    """A folder holding a tiny random RobertaForMaskedLM (save_pretrained) and its tokenizer."""
    words = sorted({w for ex in get_task("sst2").examples("train", n=64, seed=0)
                    for w in pre_tokenizers.Whitespace().pre_tokenize_str(ex["prompt"].lower())
                    for w in [w[0]]} | {"great", "terrible", "yes", "no", "maybe"})
    tokenizer = word_tokenizer(words)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2, initializer_range=0.2)
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(config)
    folder = tmp_path_factory.mktemp("tiny-roberta")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_load_model_detects_a_masked_lm(mlm_dir, tokenizer):
    model, tok = load_model(str(mlm_dir))
    assert type(model).__name__ == "RobertaForMaskedLM" and is_masked_lm(model)
    assert is_masked_lm(apply_peft(model, "lora"))
    predictor = predictor_for(get_task("sst2"), tok, model=model)
    assert isinstance(predictor, MaskedLabelWordPredictor)
    assert type(predictor_for(get_task("sst2"), tokenizer)) is LabelWordPredictor  # causal: as before
    with pytest.raises(ValueError, match="classification tasks; copa is multiple_choice"):
        predictor_for(get_task("copa"), tok, model=model)


def test_mask_goes_where_the_label_word_goes(mlm_dir):
    _, tok = load_model(str(mlm_dir))
    sst2 = MaskedLabelWordPredictor(tok, [" terrible", " great"])
    assert sst2.masked_prompt("fine . It was") == "fine . It was <mask>"
    assert sst2.masked_prompt("It was <mask> .") == "It was <mask> ."  # a template's own mask is kept
    assert MaskedLabelWordPredictor(tok, ["Yes", "No"]).masked_prompt("Yes or No?\n") == "Yes or No?\n<mask>"


def test_scores_are_the_logits_at_the_mask_whatever_the_padding(mlm_dir):
    model, tok = load_model(str(mlm_dir))
    predictor = MaskedLabelWordPredictor(tok, [" terrible", " great"])
    batch = get_task("sst2").examples("dev", n=6)
    together = predictor.scores(model, batch)
    label_ids = [tok.convert_tokens_to_ids(w) for w in ("terrible", "great")]
    for row, ex in enumerate(batch):  # one prompt at a time, unpadded, by hand
        ids = tok(predictor.masked_prompt(ex["prompt"]), return_tensors="pt").input_ids
        assert ids[0, 0] == tok.bos_token_id and ids[0, -1] == tok.eos_token_id
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, (ids[0] == tok.mask_token_id).nonzero()[0, 0]]
        torch.testing.assert_close(together[row], logits[label_ids], atol=1e-5, rtol=1e-5)


def test_a_prompt_cut_past_its_mask_is_refused(mlm_dir):
    model, tok = load_model(str(mlm_dir))
    predictor = MaskedLabelWordPredictor(tok, [" terrible", " great"], max_length=8)
    ex = {"prompt": "It was <mask> " + "fine " * 20, "label": 0}
    with pytest.warns(UserWarning, match="cut from the left"), pytest.raises(ValueError, match="exactly one <mask>"):
        predictor.scores(model, [ex])


@pytest.mark.parametrize("peft", ["none", "lora", "prefix"])
def test_mezo_trains_a_masked_lm_from_the_library(mlm_dir, peft):
    model, tok = load_model(str(mlm_dir))
    model = apply_peft(model, peft)
    task = get_task("sst2")
    predictor = predictor_for(task, tok, model=model)
    train_set = task.examples("train", n=16, seed=0)
    objective = make_objective("cross_entropy", predictor)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    loss_before = objective(model, train_set)
    history = train(model, MeZO(params, lr=1e-2 if peft == "prefix" else 1e-3, eps=1e-3), objective, train_set,
                    steps=30, batch_size=16, progress=False)
    assert not any(r["tied"] for r in history)  # every estimate saw a loss difference: the mask's logits move
    assert any(not torch.equal(a, b) for a, b in zip(before, params))
    assert objective(model, train_set) < loss_before  # 30 steps on the whole 16-example set lower its loss
    assert 0.0 <= evaluate_model(model, predictor, task.examples("dev", n=16), make_metric()) <= 1.0


def make_metric():
    from metrics import get_metric

    return get_metric("accuracy")


def test_zo_tune_and_zo_eval_take_a_masked_lm_folder(mlm_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert tune_main(["--model", str(mlm_dir), "--task", "rte", "--steps", "3", "--batch-size", "4",
                      "--train-size", "8", "--eval-size", "8", "--eval-every", "0", "--no-progress",
                      "--device", "cpu", "--output-dir", str(run)]) == 0
    summary = json.loads((run / "eval.json").read_text())
    assert summary["steps"] == 3 and 0.0 <= summary["after"] <= 1.0
    assert eval_main(["--run", str(run), "--eval-size", "8", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["value"] == summary["after"]
    assert tune_main(["--model", str(mlm_dir), "--task", "copa", "--steps", "1", "--device", "cpu",
                      "--output-dir", str(tmp_path / "copa")]) == 2
    assert "classification tasks; copa is multiple_choice" in capsys.readouterr().err
