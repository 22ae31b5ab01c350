"""PEFT (LoRA, prefix) and parameter filters: only the chosen tensors move, and only they are saved."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tasks import get_task
from zo_objectives.cli import eval_main, tune_main
from zo_objectives.estimators import MeZO
from zo_objectives.models import apply_peft, load_model, prefix_tokens, select_trainable, tiny_random_model
from zo_objectives.scoring import ChoicePredictor, GenerationPredictor, LabelWordPredictor

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_peft_trains_only_the_adapter(kind, tokenizer):
    model = apply_peft(tiny_random_model(vocab_size=len(tokenizer)), kind)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n) if kind == "lora" else ("prompt_encoder" in n) for n in trainable)
    before = snapshot(model)
    batch = get_task("sst2").examples("train", n=8)
    predictor = LabelWordPredictor(tokenizer, [" terrible", " great"])
    optimizer = MeZO([p for p in model.parameters() if p.requires_grad], lr=1e-2, eps=1e-2)
    for _ in range(2):
        optimizer.step(lambda: predictor.cross_entropy(model, batch))
    after = snapshot(model)
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    assert moved and moved <= set(trainable)


def test_peft_rejects_unknown_kind():
    with pytest.raises(ValueError, match="lora"):
        apply_peft(tiny_random_model(vocab_size=64), "adapters")


def test_select_trainable_filters_by_name():
    model = tiny_random_model(vocab_size=64)
    count = select_trainable(model, r"norm")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("norm" in n for n in names)
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="matches no parameter"):
        select_trainable(tiny_random_model(vocab_size=64), r"no_such_layer")


def test_cli_lora_saves_only_the_adapter(tmp_path, capsys):
    run = tmp_path / "lora"
    args = ["--model", "tiny-random", "--task", "sst2", "--train-size", "16", "--batch-size", "8", "--steps", "2",
            "--eval-every", "2", "--eval-size", "8", "--no-progress", "--peft", "lora", "--output-dir", str(run)]
    assert tune_main(args) == 0
    saved = load_file(run / "model.safetensors")
    assert saved and all("lora_" in name for name in saved)
    capsys.readouterr()
    assert eval_main(["--task", "sst2", "--eval-size", "8", "--run", str(run)]) == 0
    result = json.loads(capsys.readouterr().out)
    # zo-eval rebuilds the tuned model (base + saved adapter): the dev accuracy zo-tune measured after training
    after = json.loads((run / "eval.json").read_text())["after"]
    assert (result["metric"], result["examples"]) == ("accuracy", 8) and result["value"] == pytest.approx(after)


def test_cli_trainable_filter(tmp_path):
    run = tmp_path / "head"
    args = ["--model", "tiny-random", "--task", "sst2", "--train-size", "16", "--batch-size", "8", "--steps", "1",
            "--eval-every", "1", "--eval-size", "8", "--no-progress", "--trainable", r"layers\.1\.",
            "--output-dir", str(run)]
    assert tune_main(args) == 0
    assert all("layers.1." in name for name in load_file(run / "model.safetensors"))


@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_candidate_scores_under_peft_match_whole_sequences(kind):
    model, tokenizer = load_model("tiny-random")
    model = apply_peft(model, kind)
    gen = GenerationPredictor(tokenizer)
    prompts, candidates = ["Q: capital? A:", "Q: colour of the sky? A:"], [[" Paris", " Lyon city"], [" blue"]]
    scores = gen.candidate_scores(model, prompts, candidates)
    for row, cands in enumerate(candidates):
        total, _ = gen.continuation_logprobs(model, [prompts[row]] * len(cands), cands)
        assert torch.allclose(scores[row, : len(cands)], total, atol=1e-4)


@pytest.mark.parametrize("kind", ["multiple_choice", "label_words"])
def test_prefix_tuning_scores_in_any_grouping(kind, tokenizer):
    """Under prefix tuning, candidates score as whole sequences in groups sorted by length, each group's logits cut
    to the batch's longest candidate: a group of short sequences must still give that many positions (a COPA
    batch under MeZO prefix tuning raised "stack expects each tensor to be equal size"), scoring as one group does.
    Label words (one position kept) score the same in any grouping too; and a MeZO step moves only the prefix."""
    model = apply_peft(tiny_random_model(vocab_size=len(tokenizer)), "prefix")
    if kind == "multiple_choice":  # COPA-shaped: a 4-token premise + choice beside a 10-token choice
        batch = [{"prompt": "It rained so", "candidates": [" we hid.", " we ran."], "label": 0},
                 {"prompt": "The man broke his toe because", "label": 1,
                  "candidates": [" he sang.", " he dropped a heavy hammer on his own foot yesterday."]}]
        make = ChoicePredictor
    else:
        batch, make = get_task("sst2").examples("train", n=4), lambda tok: LabelWordPredictor(tok, [" bad", " good"])
    together, alone = make(tokenizer), make(tokenizer)
    alone.group_size = 1
    assert torch.allclose(alone.scores(model, batch), together.scores(model, batch), atol=1e-4)
    before = snapshot(model)
    MeZO([p for p in model.parameters() if p.requires_grad], lr=1e-2, eps=1e-2).step(
        lambda: alone.cross_entropy(model, batch))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("prompt_encoder" in n for n in moved)


def test_prefix_starts_as_the_activations_of_real_tokens():
    """A causal LM's prefix holds the keys and values the model computes for random tokens (MeZO's init by real
    activations): the prefixed model scores a sequence as the plain model scores those tokens followed by it, where
    peft's N(0, 1) start was far from any activation. The tokens follow the seed."""
    model = apply_peft(tiny_random_model(vocab_size=64), "prefix", seed=3)
    ids = torch.tensor([[5, 9, 2, 33, 17, 8]])
    with torch.no_grad():
        prefixed = model(input_ids=ids).logits
        plain = model.get_base_model()(input_ids=torch.cat([prefix_tokens(model, 3), ids], 1)).logits
    torch.testing.assert_close(prefixed, plain[:, -ids.shape[1]:], atol=1e-5, rtol=0)
    assert not torch.equal(prefix_tokens(model, 3), prefix_tokens(model, 4))


def test_a_prefix_run_resumed_from_another_start_is_refused(tmp_path, monkeypatch, capsys):
    """A prefix's start is computed by the model: where it comes out otherwise (another machine's kernels), the
    resume is refused in one line that says so, not replayed onto other weights."""
    from zo_objectives import models

    run = tmp_path / "prefix"
    args = ["--model", "tiny-random", "--task", "sst2", "--train-size", "16", "--batch-size", "8", "--eval-every", "0",
            "--eval-size", "8", "--no-progress", "--no-eval-before", "--peft", "prefix", "--output-dir", str(run)]
    assert tune_main([*args, "--steps", "1"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(models, "prefix_tokens", lambda model, seed: torch.ones((1, 5), dtype=torch.long))
    assert tune_main([*args, "--steps", "2", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot resume" in err[0] and "prefix adapter" in err[0]
