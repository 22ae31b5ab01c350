"""Weights after a few steps in the scenarios the estimators' code must keep bitwise across a refactor: dtypes,
noise kinds, momentum, populations, PEFT, tied weights. ``python tests/layout_scenarios.py --write`` records their
checksums (tests/data/pre_estimators/weights.json, written by the code before the estimators moved into
``zo_objectives.estimators``); tests/test_layout.py checks today's code gives the same. Only the public API is used,
so the same file runs on both."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from zo_objectives import MeZO, Population, train

GOLDEN = Path(__file__).parent / "data" / "pre_estimators" / "weights.json"
VOCAB, STEPS = 64, 3
IDS = torch.arange(24).remainder(VOCAB).view(3, 8)  # three rows of eight tokens


def model(dtype: torch.dtype = torch.float32, tie: bool = False, peft: str = "none") -> torch.nn.Module:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                         tie_word_embeddings=tie, initializer_range=0.2)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    if peft != "none":
        from zo_objectives import apply_peft

        m = apply_peft(m, peft)
    return m


def next_token_loss(m: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Per-row next-token cross-entropy."""
    logits = m(input_ids=rows).logits.float()
    per = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), rows[:, 1:].reshape(-1), reduction="none")
    return per.view(rows.shape[0], -1).mean(1)


def mezo_objective(m: torch.nn.Module, batch: list[dict]) -> float:
    return float(next_token_loss(m, IDS).mean())


def population_objective(members: int):
    def objective(m: torch.nn.Module, batch: list[dict]) -> list[float]:
        losses = next_token_loss(m, IDS.repeat(members, 1))  # rows grouped by member
        return losses.view(members, -1).mean(1).tolist()
    return objective


SCENARIOS = {
    "fp32-table": dict(),
    "bf16-table": dict(dtype=torch.bfloat16, eps=3e-3),
    "fp16-table": dict(dtype=torch.float16),
    "gaussian": dict(noise="gaussian"),
    "rademacher": dict(noise="rademacher"),
    "momentum": dict(momentum=0.9, momentum_window=3),
    "normalized-forward": dict(update="normalized", difference="forward", n_perturbations=2),
    "weight-decay": dict(weight_decay=0.1),
    "tied": dict(tie=True),
    "lora": dict(peft="lora"),
    "population": dict(population=4),
    "population-rank2-bf16": dict(population=4, perturbation_rank=2, dtype=torch.bfloat16, update="normalized"),
}


def run(name: str) -> str:
    """sha256 of the trainable weights after STEPS steps of scenario ``name``."""
    settings = dict(SCENARIOS[name])
    m = model(settings.pop("dtype", torch.float32), settings.pop("tie", False), settings.pop("peft", "none"))
    params = [p for p in m.parameters() if p.requires_grad]
    if "population" in settings:
        opt = Population(params, lr=1e-3, seed=1, **settings)
        objective = population_objective(opt.members)
    else:
        opt = MeZO(params, lr=1e-3, seed=1, **settings)
        objective = mezo_objective
    train(m, opt, objective, [{}] * 4, steps=STEPS, batch_size=2, progress=False)
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


if __name__ == "__main__":
    torch.set_num_threads(1)
    results = {name: run(name) for name in SCENARIOS}
    if "--write" in sys.argv:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
