"""A Trainer-style entry for users of TRL's GRPOTrainer and transformers' Trainer: ``ZOConfig`` and ``ZOTrainer``.

A GRPO script needs only its import and class names changed::

    from zo_objectives import ZOConfig, ZOTrainer          # was: from trl import GRPOConfig, GRPOTrainer

    def reward_len(completions, **kwargs):
        return [-abs(20 - len(completion)) for completion in completions]

    args = ZOConfig(output_dir="Qwen2-0.5B-ZO", logging_steps=10)
    trainer = ZOTrainer(model="Qwen/Qwen2-0.5B-Instruct", reward_funcs=reward_len, args=args, train_dataset=dataset)
    trainer.train()
    trainer.save_model()

ZOConfig uses GRPOConfig's names where the meaning is the same; what differs is said per field. The run is a
``zo-tune`` run (``zo_objectives.cli.tune``): the run folder ``output_dir`` holds config.json, metrics.jsonl,
completions.jsonl, eval.json and the checkpoint, and ``train(resume_from_checkpoint=True)`` continues it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from metrics import get_metric, list_metrics, register_metric
from metrics.rewards import get_reward, list_rewards, register_reward
from zo_objectives.cli import pick_device, pick_dtype, tune
from zo_objectives.config import TuneConfig
from zo_objectives.models import load_model

EVAL_STRATEGIES = ("no", "steps", "epoch")


@dataclass
class ZOConfig:
    """The settings of a ZOTrainer run, named as GRPOConfig (and transformers' TrainingArguments) name them."""

    output_dir: str = "zo-trainer-output"  # the run folder
    learning_rate: float | None = None  # default: the objective's (config.OBJECTIVE_DEFAULTS, DEFAULT_LR)
    max_steps: int = -1  # > 0: the steps to run; else num_train_epochs over train_dataset
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 8  # prompts per step (GRPO counts completions)
    # completions per prompt and step: each member of the population estimator (antithetic pairs of perturbed
    # models) completes every prompt once; an even number (default: OBJECTIVE_DEFAULTS' population)
    num_generations: int | None = None
    max_completion_length: int = 256  # most tokens generated per completion
    temperature: float = 0.0  # 0: greedy completions, the measured setting (GRPO samples at 1.0)
    top_p: float = 1.0
    reward_weights: list[float] | None = None
    logging_steps: int = 10  # rows kept in trainer.state.log_history (metrics.jsonl holds every step)
    eval_strategy: str = "no"  # "steps" (every eval_steps), "epoch" or "no" (only after training)
    eval_steps: int | None = None  # default: logging_steps
    report_to: str | list[str] = "none"  # "none" or "tensorboard"
    seed: int = 42
    # beyond GRPOConfig
    eps: float | None = None  # the perturbation scale (default: the objective's)
    stop: list[str] = field(default_factory=list)  # strings that end a completion (default none: as TRL)
    log_completions_every: int = 0  # also sample completions to completions.jsonl every this many steps
    chat_template: bool = False  # put plain-string prompts in the tokenizer's chat template
    template: str | None = None  # the metric form: the prompt, a format string over the columns
    label_words: list[str] | None = None  # the metric form, classification: one word per label
    labels: list[str] | None = None
    label_column: str = "label"
    answer_column: str | None = None  # the metric form, generation: the column of gold answers
    device: str | None = None
    overwrite_output_dir: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # any other zo-tune setting (TuneConfig's names)
    # GRPOConfig's (TrainingArguments') names with a meaning here
    bf16: bool = False  # tune in bfloat16 (default: the dtype "auto" picks)
    fp16: bool = False
    use_cpu: bool = False
    log_completions: bool = False  # completions.jsonl every logging_steps (it always holds each evaluation's)
    # any other GRPOConfig / TrainingArguments name given: accepted so that a GRPO script runs unchanged, and
    # ignored with one warning naming it (gradient accumulation, schedulers, KL beta: no meaning here)
    ignored: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both set; accepted: one of them, or neither (the dtype 'auto' picks)")
        if self.eval_strategy not in EVAL_STRATEGIES:
            raise ValueError(f"unknown eval_strategy {self.eval_strategy!r}; accepted: {', '.join(EVAL_STRATEGIES)}")
        reports = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        unknown = [r for r in reports if r not in ("none", "tensorboard")]
        if unknown:
            raise ValueError(f"unknown report_to {unknown}; accepted: none, tensorboard (or pass callbacks=[fn] to "
                             "ZOTrainer: each logged row reaches fn)")


# GRPOConfig's own settings in a GRPO script (TRL 0.2x), for when TRL is not installed: TrainingArguments holds the rest
GRPO_ONLY = ("beta", "epsilon", "epsilon_high", "num_iterations", "loss_type", "scale_rewards", "max_prompt_length",
             "top_k", "min_p", "repetition_penalty", "generation_batch_size", "steps_per_generation", "use_vllm",
             "vllm_mode", "vllm_gpu_memory_utilization", "mask_truncated_completions", "sync_ref_model",
             "ref_model_sync_steps", "ref_model_mixup_alpha", "num_completions_to_print", "model_init_kwargs",
             "remove_unused_columns", "shuffle_dataset", "generation_kwargs", "importance_sampling_level")


def _grpo_names() -> set[str]:
    """The setting names of TRL's GRPOConfig (TrainingArguments' and GRPO_ONLY where TRL is not installed)."""
    try:
        from trl import GRPOConfig
    except ImportError:
        from transformers import TrainingArguments

        return {f.name for f in dataclasses.fields(TrainingArguments)} | set(GRPO_ONLY)
    return {f.name for f in dataclasses.fields(GRPOConfig)}


_fields_init = ZOConfig.__init__  # the dataclass's own


def _init(self: ZOConfig, *args: Any, **settings: Any) -> None:
    """ZOConfig's own fields as a dataclass takes them; a GRPOConfig name without a meaning here is kept in
    ``ignored`` (warned once); any other name is refused in one line. (A dataclass refuses every unknown
    keyword, so its generated __init__ is wrapped: a GRPO script's config must construct unchanged.)"""
    own = {f for f in ZOConfig.__dataclass_fields__}
    foreign = {k: settings.pop(k) for k in [k for k in settings if k not in own]}
    if foreign:
        grpo = _grpo_names()
        unknown = sorted(k for k in foreign if k not in grpo)
        if unknown:
            hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, own | grpo, 1)) else k
                     for k in unknown]
            raise TypeError(f"ZOConfig: unknown setting {', '.join(hints)}; accepted: ZOConfig's fields, "
                            "GRPOConfig's names (ignored where they have no meaning here), or extra={...} "
                            "for zo-tune's own settings")
        warnings.warn(f"ZOConfig ignores {', '.join(sorted(foreign))}: GRPOConfig settings with no meaning for "
                      "zeroth-order tuning", stacklevel=2)
    _fields_init(self, *args, **settings)
    self.ignored = {**self.ignored, **foreign}


ZOConfig.__init__ = _init  # type: ignore[method-assign]


class TrainOutput(NamedTuple):
    """What ``ZOTrainer.train`` returns, as transformers' Trainer: the last step, the mean loss, the metrics
    (eval.json's summary)."""

    global_step: int
    training_loss: float
    metrics: dict


@dataclass
class TrainerState:
    log_history: list[dict] = field(default_factory=list)
    global_step: int = 0


def _registered(fn: Callable, names: Callable[[], list[str]], get: Callable[[str], Any], register: Callable,
                key: Callable | None = None) -> str:
    """The name ``fn`` is registered under: its own, or with a suffix where another function holds that name;
    ``key``: the user's function ``fn`` wraps (registered once, however many trainers take it)."""
    base = getattr(fn, "__name__", type(fn).__name__)
    key = key or fn
    for k in range(1000):
        name = base if k == 0 else f"{base}_{k}"
        if name not in names():
            register(name, fn)
            return name
        if get(name) is key or getattr(get(name), "fn", None) is key:
            return name
    raise ValueError(f"cannot register {base!r}: too many functions of that name")


def _metric(compute_metrics: Callable) -> str:
    """Register a Trainer-style ``compute_metrics(eval_pred) -> {name: value}`` as a metric of (predictions,
    references): its first value is the objective."""

    from transformers import EvalPrediction

    def metric(predictions: list, references: list) -> float:
        # a generation task's references are lists of gold answers: passed as they are
        refs = references if any(isinstance(r, list) for r in references) else np.asarray(references)
        result = compute_metrics(EvalPrediction(np.asarray(predictions, dtype=object if isinstance(
            predictions[0], str) else None), refs))
        return float(next(iter(result.values()))) if isinstance(result, dict) else float(result)

    metric.__name__ = getattr(compute_metrics, "__name__", "compute_metrics")
    metric.fn = compute_metrics  # how _registered finds it again
    return _registered(metric, list_metrics, lambda n: get_metric(n).fn, register_metric, key=compute_metrics)


def _jsonl(dataset: Any, what: str) -> str:
    """A ``datasets.Dataset`` (or a list of dicts) as a JSONL file named by its content, written once."""
    from datasets import Dataset

    if isinstance(dataset, list):
        dataset = Dataset.from_list(dataset)
    if not isinstance(dataset, Dataset):
        raise ValueError(f"{what} must be a datasets.Dataset (or a list of dicts), got {type(dataset).__name__}")
    key = getattr(dataset, "_fingerprint", None) or hashlib.sha256(str(dataset.to_list()).encode()).hexdigest()
    path = Path(tempfile.gettempdir()) / "zo-trainer" / f"{key}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(row, default=str) + "\n" for row in dataset.to_list()))
        os.replace(tmp, path)  # whole or absent
    return str(path)


class ZOTrainer:
    """Tune ``model`` on ``reward_funcs`` (TRL's reward functions: ``fn(prompts=, completions=, **columns)``) or,
    the metric form, on ``compute_metrics`` (a Trainer-style callable of an EvalPrediction, its first value the
    objective), with MeZO-style zeroth-order estimates: no gradients, no optimizer states.

    ``model`` is a name (a hub id, a local folder, "tiny-random") or a loaded model (then pass its tokenizer as
    ``processing_class``), tuned in place. ``train_dataset`` and ``eval_dataset`` are ``datasets.Dataset``: a
    ``prompt`` column (a string, or a list of messages: TRL's conversational format) and any other columns,
    which reach the reward functions. Without ``eval_dataset`` the run is checked after training on its first
    ``per_device_train_batch_size`` training prompts."""

    def __init__(self, model: str | torch.nn.Module, reward_funcs: Callable | Sequence[Callable] | None = None,
                 args: ZOConfig | None = None, train_dataset: Any = None, eval_dataset: Any = None,
                 processing_class: Any = None, compute_metrics: Callable | None = None,
                 callbacks: Sequence[Callable[[dict], None]] | None = None):
        self.args = args or ZOConfig()
        if (reward_funcs is None) == (compute_metrics is None):
            raise ValueError("pass reward_funcs (the reward form) or compute_metrics (the metric form), one of them")
        if train_dataset is None:
            raise ValueError("ZOTrainer needs a train_dataset")
        funcs = [reward_funcs] if callable(reward_funcs) else list(reward_funcs or [])
        if any(not callable(fn) for fn in funcs):
            raise ValueError("reward_funcs must be functions (reward models by name are not supported)")
        a = self.args
        dtype = "bf16" if a.bf16 else "fp16" if a.fp16 else "auto"
        device = "cpu" if a.use_cpu else a.device
        if isinstance(model, str):
            name = model
            model, tokenizer = load_model(name, dtype=pick_dtype(dtype, pick_device(device)))
            processing_class = processing_class or tokenizer
        else:
            name = getattr(model, "name_or_path", None) or type(model).__name__
            if processing_class is None:
                from transformers import AutoTokenizer

                processing_class = AutoTokenizer.from_pretrained(name)
        self.model, self.processing_class = model, processing_class
        self.state = TrainerState()
        self.callbacks = list(callbacks or [])
        n_train = len(train_dataset)
        per_epoch = max(1, math.ceil(n_train / a.per_device_train_batch_size))
        steps = a.max_steps if a.max_steps > 0 else max(1, math.ceil(a.num_train_epochs * per_epoch))
        eval_every = {"no": 0, "steps": a.eval_steps or a.logging_steps, "epoch": per_epoch}[a.eval_strategy]
        objective = {"reward": [_registered(fn, list_rewards, get_reward, register_reward) for fn in funcs]} if (
            funcs) else {"objective": _metric(compute_metrics)}
        self.config = TuneConfig(
            model=name, data=_jsonl(train_dataset, "train_dataset"),
            dev_data=_jsonl(eval_dataset, "eval_dataset") if eval_dataset is not None else None,
            eval_size=None if eval_dataset is not None else min(n_train, a.per_device_train_batch_size),
            template=a.template, label_words=a.label_words, labels=a.labels, label_column=a.label_column,
            answer_column=a.answer_column, chat_template=a.chat_template, reward_weights=a.reward_weights,
            steps=steps, batch_size=min(a.per_device_train_batch_size, n_train), lr=a.learning_rate, eps=a.eps,
            population=a.num_generations, sample_temperature=a.temperature, top_p=a.top_p,
            max_new_tokens=a.max_completion_length, stop=list(a.stop), eval_every=eval_every,
            eval_before=a.eval_strategy != "no",
            report_to=[r for r in ([a.report_to] if isinstance(a.report_to, str) else a.report_to) if r != "none"],
            seed=a.seed, train_size=n_train, device=device, output_dir=a.output_dir, dtype=dtype,
            log_completions_every=a.log_completions_every or (a.logging_steps if a.log_completions else 0),
            **objective, **a.extra)

    def _log(self, row: dict) -> None:
        self.state.global_step = row["step"]
        if row["step"] % max(1, self.args.logging_steps) == 0 or "eval" in row:
            self.state.log_history.append(dict(row))

    def train(self, resume_from_checkpoint: bool = False) -> TrainOutput:
        """Run the steps (``resume_from_checkpoint``: continue the run in ``output_dir`` from its checkpoint);
        return the last step, the mean loss and eval.json's summary."""
        losses: list[float] = []
        summary = tune(self.config, resume=resume_from_checkpoint, overwrite=self.args.overwrite_output_dir,
                       callbacks=[self._log, lambda row: losses.append(row["loss"]), *self.callbacks],
                       loaded=(self.model, self.processing_class))
        return TrainOutput(self.state.global_step, sum(losses) / max(1, len(losses)), summary)

    def save_model(self, output_dir: str | None = None) -> str:
        """Write the tuned model and its tokenizer as a Hugging Face folder (default: ``output_dir``/model)."""
        out = Path(output_dir or Path(self.args.output_dir) / "model")
        self.model.save_pretrained(out)
        self.processing_class.save_pretrained(out)
        return str(out)
