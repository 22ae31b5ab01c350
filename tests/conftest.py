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
