"""Shared test fixtures. Tests use one thread: tiny models gain nothing from more, and the suite then
runs beside other work on a 2-core machine without oversubscription."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def cpu_without_native_bf16():
    """``--dtype auto`` picks fp32 on the CPU in every test, as on a CPU without native bf16 arithmetic, so that a
    test that sets no dtype means the same on every machine; the tests of that choice patch it again."""
    from zo_objectives import models

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "_cpu_has_bf16_here", lambda: False)
        yield


@pytest.fixture(scope="session")
def tokenizer():
    """The SmolLM2 tokenizer (left padding, a pad token), as ``load_model("tiny-random")`` returns it."""
    from zo_objectives.models import load_model

    _, tok = load_model("tiny-random")
    return tok


def build_small_lm(vocab_size: int, seed: int = 0, max_positions: int = 64, tie: bool = False,
                   layers: int = 2) -> torch.nn.Module:
    """A tiny random Llama whose logits vary enough between inputs (initializer_range 0.2) for
    comparisons at atol 1e-4 to mean something."""
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         tie_word_embeddings=tie, initializer_range=0.2)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def small_lm(tokenizer):
    """A fresh tiny random LM over the tokenizer's vocabulary (64 positions)."""
    return build_small_lm(len(tokenizer))


def objective_cases(tokenizer, extra_row: bool = False) -> list[tuple]:
    """(objective, batch) of every kind an estimator's batched pass must score: a metric and cross-entropy over
    label words, cross-entropy of a generation target, and a reward of generated completions."""
    from metrics import get_metric
    from zo_objectives.objectives import CrossEntropy, MetricObjective, RewardObjective
    from zo_objectives.scoring import GenerationPredictor, LabelWordPredictor

    labels = LabelWordPredictor(tokenizer, [" bad", " good"])
    batch = [{"prompt": "A fine film. It was", "label": 1}, {"prompt": "Dull and long, so long. It was", "label": 0},
             *([{"prompt": "Yes", "label": 1}] if extra_row else [])]
    generator = GenerationPredictor(tokenizer, max_new_tokens=4)
    gen_batch = [{"prompt": "Q: capital of France? A:", "answers": ["Paris"], "target": " Paris"},
                 {"prompt": "Q: two plus two, written out? A:", "answers": ["four"], "target": " four"}]

    def length(prompts, completions, **_):
        return [float(len(c)) for c in completions]

    return [(MetricObjective(get_metric("accuracy"), labels), batch), (CrossEntropy(labels), batch),
            (CrossEntropy(generator), gen_batch), (RewardObjective(generator, length), gen_batch)]


def killed_then_resumed(cli: list[str], tmp_path) -> tuple[dict, object]:
    """Run zo-tune ``cli`` in a subprocess, SIGKILL it after its second checkpoint, ``--resume`` it two steps
    further, and run the same steps straight in another folder; assert the two end on the same weights with one
    metrics row per step. Returns the straight run's config.json and its folder."""
    import json
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from zo_objectives.cli import tune_main

    run = tmp_path / "killed"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "zo_objectives.cli", *cli, "--steps", "1000", "--output-dir",
                             str(run)], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "trajectory.json").exists() and
                                          json.loads((run / "trajectory.json").read_text())["step"] >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads((run / "trajectory.json").read_text())["step"]
    assert 2 <= step < 1000
    assert tune_main(["--output-dir", str(run), "--resume", "--steps", str(step + 2), "--no-progress"]) == 0
    straight = tmp_path / "straight"
    assert tune_main([*cli, "--steps", str(step + 2), "--output-dir", str(straight)]) == 0
    a, b = load_file(run / "model.safetensors"), load_file(straight / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, step + 3))
    return json.loads((straight / "config.json").read_text()), straight
