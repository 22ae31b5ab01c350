"""One description of a run: ``TuneConfig`` and ``EvalConfig``.

From these dataclasses come the ``zo-tune`` / ``zo-eval`` flags (through ``transformers.HfArgumentParser``, as
TRL does: a field ``batch_size`` is ``--batch-size``, its metadata the flag's help and accepted values), the run
folder's ``config.json`` (the fields, resolved, beside facts about the run; ``zo-tune --config`` and
``TuneConfig.load`` read it back) and the library call ``zo_objectives.cli.tune(TuneConfig(...))``. Every value
is checked when the dataclass is built, before any file is touched.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from metrics.rewards import list_rewards
from tasks import HUB_ONLY_TASKS, SOURCES, get_task, list_tasks
from zo_objectives.estimators import DIFFERENCES, NONFINITE_POLICIES, SHAPINGS, UPDATES, get_estimator
from zo_objectives.models import DEFAULT_MODEL, DTYPES, PEFT_KINDS
from zo_objectives.noise import NOISE_KINDS
from zo_objectives.objectives import (
    DEFAULT_SMOOTHING,
    FORMS,
    MAX_REWARD_TIMEOUT,
    SEQUENCE_SCORES,
    SUPPORTS,
    CrossEntropy,
    RewardObjective,
)
from zo_objectives.train import SCHEDULES

# Defaults chosen from measurements on SmolLM2-135M / SST-2 (docs/objectives.md).
# A metric in log form has cross-entropy's scale; the expected metric itself ("mean" form) is flatter.
# sign and normalized updates move ~lr * z per step whatever the loss: 1e-4 is about the median step of the
# default SST-2 run (cross-entropy at 1e-5: 7.8e-5)
DEFAULT_LR = {"cross_entropy": 1e-5, "log": 1e-5, "mean": 1e-4, "scale-free": 1e-4}
# --dtype auto (models.auto_dtype): bf16 on GPUs, and on CPUs with native bf16 arithmetic, where bf16 (eps 3e-3)
# matched fp32's accuracy at two thirds of the time (BENCHMARKS.md "Half precision"); fp32 on other CPUs, where a
# bf16 forward pass takes about six times fp32's
AUTO_DTYPE = "bf16 on a GPU and on a CPU with native bf16 arithmetic (AVX512-BF16 or AMX), else fp32"
# eps per dtype: a bf16 forward pass rounds the loss difference of +-1e-3 perturbations enough that the estimate
# keeps 0.83 correlation with fp32's; at 3e-3 it keeps 0.99 (benchmarks/eps_fidelity.py, docs/half_precision.md)
DEFAULT_EPS = {"fp32": 1e-3, "fp16": 1e-3, "bf16": 3e-3}
# Rewards of greedy completions, with normalized updates: at eps 1e-3 a perturbation seldom changes a greedy token
# (72% of a population's steps tied on arith), at 1e-2 almost none did, and the held-out reward rose (BENCHMARKS.md
# "Reward comparison (arith)"). Only for scale-free updates: under sgd a reward's difference does not grow with
# eps, so a larger eps would shrink the step
GREEDY_REWARD_EPS = 1e-2
SPLITS = ("dev", "validation")
REWARD = "reward"  # the objective of --reward runs
# The estimator each kind of objective gets by default: settings not given take these (zo-tune and ZOTrainer).
# Rewards of greedy completions: a population of 8 in evolution-strategy form, normalized updates, eps 1e-2, lr 1e-3
# was the measured setting (docs/rewards.md, BENCHMARKS.md "Reward comparison (arith)"); giving --population or
# --update (e.g. --population 0: MeZO, sgd) leaves the other one, lr and eps to the generic defaults
OBJECTIVE_DEFAULTS: dict[str, dict[str, Any]] = {
    REWARD: {"population": 8, "update": "normalized", "eps": GREEDY_REWARD_EPS, "lr": 1e-3},
}
# Where generated text ends unless --stop says otherwise: the first newline (short answers: SQuAD, arith)
DEFAULT_STOP = ["\n"]

# Upper bounds of counts and times: beyond them a run cannot finish (or a timer overflows); checked before anything
# is loaded. --population and --perturbation-rank are checked against the model and memory (cli.check_sizes)
MAX_SEED = 2**63 - 1
MAX_STEPS = 10**9
MAX_PERTURBATIONS = 1024
MAX_CANDIDATES = 1024
MAX_SAMPLES = 100_000
# Below this a smoothing temperature is the hard metric in all but name, and log-likelihood / T overflows
MIN_SMOOTHING = 1e-4

# What a setting may do on --resume: "free" ones may differ, "fixed" ones never (the checkpoint replays them or
# the run's data and weights depend on them); the others only with --allow-changed-settings.
FREE, FIXED = "free", "fixed"


def default_lr(objective: Any, update: str = "sgd", fitness_shaping: str = "none", population: int = 0,
               estimator: str = "mezo", eps: float | None = None) -> float:
    """The lr zo-tune takes for ``objective`` (an Objective: ``make_objective``'s, ``RewardObjective``) under this
    estimator, so that a library run and a CLI run of the same objective start from the same lr: the measured
    reward setting (OBJECTIVE_DEFAULTS, greedy completions) when the estimator is its own; else by the scale of the
    loss (DEFAULT_LR): scale-free updates, cross-entropy, a smoothed metric's form, or the mean form (a hard
    metric, rewards). An estimator whose step length is its own (``step_length``: FZOO divides by the losses'
    spread) takes ``step_length x eps`` (``eps``: default its class's)."""
    cls = get_estimator(estimator)
    if cls.step_length:
        return cls.step_length * (eps or inspect.signature(cls.__init__).parameters["eps"].default)
    bundle = OBJECTIVE_DEFAULTS.get(REWARD, {}) if isinstance(objective, RewardObjective) else {}
    greedy = not getattr(getattr(objective, "generator", None), "temperature", 0)
    if bundle and greedy and (population, update) == (bundle.get("population"), bundle.get("update")):
        return bundle["lr"]
    if update != "sgd" or fitness_shaping == "rank":
        return DEFAULT_LR["scale-free"]
    if isinstance(objective, CrossEntropy):
        return DEFAULT_LR["cross_entropy"]
    form = getattr(objective, "form", None) if getattr(objective, "smoothing", None) else None
    return DEFAULT_LR[form or "mean"]


class UsageError(ValueError):
    """Bad input: reported in one line (the CLI exits with code 2)."""


def arg(default: Any = None, help: str = "", *, choices: tuple | None = None, resume: str = "",
        at_least: float | None = None, above: float | None = None, at_most: float | None = None,
        why_most: str = "", repeat: bool = False, aliases: tuple[str, ...] = (), switch: bool = False,
        before: Any = None) -> Any:
    """A config field: its default, its flag's help, accepted values (``choices``, bounds, ``why_most`` saying
    why the upper one; floats must be finite), what it may do on resume, ``repeat`` for a flag that may be given
    several times, other spellings of its flag (``aliases``), ``switch`` for a boolean flag that takes no value
    (so that it never swallows the positional argument after it), and ``before``: the value a run written before
    the field existed had, when not its default (which ``__post_init__`` resolves)."""
    meta = {"help": help, "resume": resume, "at_least": at_least, "above": above, "at_most": at_most,
            "why_most": why_most, "switch": switch, "before": before}
    if aliases:
        meta["aliases"] = list(aliases)
    if choices is not None:
        meta["choices"] = choices
    if repeat:
        meta["action"] = "extend"  # --plugin a --plugin b and --plugin a b both give [a, b]
        return field(default_factory=list, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class CommonConfig:
    """The model, the task and how examples are scored: settings both commands share."""

    model: str = arg(DEFAULT_MODEL, f"'{DEFAULT_MODEL}' (shipped), 'tiny-random', a local folder or a hub id",
                     resume=FIXED)
    task: str = arg("sst2", "a registered task: " + ", ".join(list_tasks()), resume=FIXED)
    data_source: str = arg("local", "where a built-in task's data comes from: local, the copy shipped in tasks/data; "
                                    "hub, datasets.load_dataset from the Hugging Face hub (needs a network; the only "
                                    "source of " + ", ".join(HUB_ONLY_TASKS) + ")", choices=SOURCES, resume=FIXED)
    data: str | None = arg(None, "a CSV/TSV/JSONL file for a custom task (with --template)", resume=FIXED)
    dev_data: str | None = arg(None, "the custom task's evaluation file (default: --data)", resume=FIXED)
    template: str | None = arg(None, "custom task prompt, a format string over columns, e.g. '{text} It was'",
                               resume=FIXED)
    label_words: list[str] | None = arg(None, "custom classification task: one word per label id", resume=FIXED)
    labels: list[str] | None = arg(None, "custom task: the label values (strings) in --label-words order",
                                   resume=FIXED)
    label_column: str = arg("label", "custom classification task: the column of labels", resume=FIXED)
    answer_column: str | None = arg(None, "custom generation task: the column of gold answers", resume=FIXED)
    chat_template: bool = arg(False, "put each prompt in the tokenizer's chat template as the user's turn (instruct "
                                     "models, generation tasks)", resume=FIXED)
    plugin: list[str] = arg(help="a module or .py file to import first; it may register metrics or tasks "
                                 "(repeatable)", repeat=True, resume=FREE)
    eval_size: int | None = arg(None, "dev examples to evaluate on (default: all)", above=0, resume=FIXED)
    heldout_fraction: float = arg(0.0, "evaluate on this fraction of the training pool, held out from training "
                                       "(seeded by --seed) instead of the dev set: for tasks whose dev set is their "
                                       "training data (cb) or a --data file without --dev-data", at_least=0,
                                  resume=FIXED)
    metrics: list[str] = arg(help="the metrics to report on the evaluation set, the first the headline (default: the "
                                  "metric the run optimizes; for cross_entropy, --reward and zo-eval, the task's)",
                             repeat=True, aliases=("--metric",))
    batch_size: int = arg(16, "examples per step (and per evaluation batch)", above=0)
    max_new_tokens: int | None = arg(None, "generation tasks and --reward: most tokens generated per completion "
                                           "(default: the task's, 16 for a --data file)", above=0)
    stop: list[str] | None = arg(None, "generation tasks and --reward: strings that end a completion, cut there "
                                       "(default: a newline, '\\n'; --stop '' for none, --stop '\\n\\n' '}' for "
                                       "others; \\n and \\t are read as newline and tab)", before=DEFAULT_STOP)
    max_length: int | None = arg(None, "truncate prompts from the left to this many tokens", above=0)
    seed: int = arg(0, "seeds the training sample (zo-tune: its order and the perturbations; zo-eval: the "
                       "demonstrations)", resume=FIXED, at_least=0, at_most=MAX_SEED, why_most="a 63-bit seed")
    device: str | None = arg(None, "cpu, cuda, cuda:1, ... (default: cuda when available)", resume=FREE)
    dtype: str = arg("auto", f"weights' dtype; auto: {AUTO_DTYPE}", choices=("auto", *DTYPES), resume=FIXED)

    @classmethod
    def load(cls, path: str | Path, **changes: Any) -> Any:
        """The config in a JSON file (such as a run's config.json), with ``changes``."""
        return cls(**{**read_config(cls, path), **changes})

    def __post_init__(self) -> None:
        check(self)
        if self.stop is None:
            self.stop = list(DEFAULT_STOP)
        self.stop = [s.replace("\\n", "\n").replace("\\t", "\t") for s in self.stop if s]  # '' alone: none
        for name in ("template", "label_words", "labels", "answer_column", "dev_data"):
            if getattr(self, name) is not None and not self.data:
                raise UsageError(f"{flag(name)} describes a custom data file: it needs --data")
        if self.data and self.data_source != "local":
            raise UsageError(f"--data-source {self.data_source} loads a built-in task; --data is a local file")
        if self.data and not self.template:  # as task_from_file: the file's "prompt" column as it is
            self.template = "{prompt}"
        if self.heldout_fraction >= 1:
            raise UsageError(f"--heldout-fraction must be < 1 (the rest trains), got {self.heldout_fraction}")


@dataclass
class TuneConfig(CommonConfig):
    """A ``zo-tune`` run. ``None`` means "the default for this task and objective" (written resolved to
    config.json)."""

    objective: str | None = arg(None, "'cross_entropy' or a registered metric (default: the task's). A per-example "
                                      "metric such as accuracy is optimized in log form: on label-word and "
                                      "multiple-choice tasks that IS cross-entropy; --metric-form mean optimizes "
                                      "the expected metric, --smoothing 0 the hard metric")
    reward: list[str] = arg(help="a TRL-style reward reward(prompts=, completions=, **columns) -> list[float] to "
                                 "maximize on a generation task, instead of --objective (repeatable): module:function "
                                 "(the module may be a .py file) or a ready one: " + ", ".join(list_rewards()),
                            repeat=True)
    reward_weights: list[float] | None = arg(None, "one weight per --reward (default: 1 each)")
    reward_candidates: int = arg(0, "sampled completions rewarded per prompt: optimizes their expected reward "
                                    "(needs --sample-temperature > 0; 0: one completion)", at_least=0,
                                 at_most=MAX_CANDIDATES, why_most="each is generated and rewarded every step")
    sample_temperature: float = arg(0.0, "sampling temperature of the completions --reward scores (0: greedy)",
                                    at_least=0, aliases=("--temperature",))
    top_p: float = arg(1.0, "nucleus sampling of the completions --reward scores: the smallest set of tokens whose "
                            "probability reaches top_p (1: all; needs --sample-temperature > 0)", above=0)
    log_completions_every: int = arg(0, "also write a sample of prompts, completions and rewards to "
                                        "completions.jsonl every this many steps (always at each evaluation of a "
                                        "generation task; 0: only then)", at_least=0, resume=FREE)
    report_to: list[str] = arg(help="also log metrics.jsonl's scalars to: tensorboard (in the run folder's tb/; "
                                    "pip install tensorboard)", repeat=True, choices=("tensorboard",), resume=FREE)
    reward_timeout: float = arg(600.0, "seconds one call of a --reward may take before the run stops with one line "
                                       "(its last checkpoint kept; a hung judge or test run stalls nothing; code stuck "
                                       "in C ends the process a second later, docs/rewards.md); 0: no limit",
                                at_least=0, at_most=MAX_REWARD_TIMEOUT, why_most="a day; 0 for no limit", resume=FREE)
    steps: int = arg(400, "training steps (on --resume: the total to reach)", above=0, at_most=MAX_STEPS,
                     why_most="a billion steps", resume=FREE)
    lr: float | None = arg(None, f"default {OBJECTIVE_DEFAULTS[REWARD]['lr']} for --reward with its default "
                                 f"estimator; {DEFAULT_LR['cross_entropy']} for cross-entropy and metric objectives "
                                 f"in log form, {DEFAULT_LR['mean']} in mean form, as the hard metric or for --reward "
                                 f"under sgd, {DEFAULT_LR['scale-free']} with --update sign or normalized or "
                                 "--fitness-shaping rank (config.default_lr); --estimator fzoo: 2e-3 x eps (its step "
                                 "is lr / eps along the normalized estimate)", above=0)
    eps: float | None = arg(None, f"perturbation scale (default {DEFAULT_EPS['fp32']}, {DEFAULT_EPS['bf16']} in bf16, "
                                  f"whose rounding swamps smaller loss differences; {GREEDY_REWARD_EPS} for --reward "
                                  "on greedy completions with --update normalized or sign, or --estimator fzoo)",
                            above=0, resume=FIXED)
    estimator: str = arg("auto", "how each step estimates the gradient: a registered estimator (mezo, population, "
                                 "fzoo, grzo, or one a --plugin registers; docs/estimators.md); auto: population with "
                                 "--population N (and for --reward), else mezo", resume=FIXED)
    n_perturbations: int | None = arg(None, "perturbations per step: SPSA estimates averaged (mezo, default 1), "
                                            "one-sided members (fzoo, default 8)", above=0, at_most=MAX_PERTURBATIONS,
                                      why_most="each costs a forward pass of the batch per step", resume=FIXED)
    population: int | None = arg(None, "members per step of the population estimator (an even number: antithetic "
                                       "pairs, all scored in one batched pass; docs/mezo.md); 0: MeZO (default: "
                                       f"{OBJECTIVE_DEFAULTS[REWARD]['population']} for --reward and with --estimator "
                                       "population, else 0)", at_least=0, resume=FIXED)
    perturbation_rank: int | None = arg(None, "rank of each member's perturbation of a matrix (population, grzo: "
                                              "default 1; fzoo: default 0, full rank)", at_least=0, resume=FIXED)
    smoothing: float | None = arg(None, "metric objectives optimize the metric's expectation over each example's "
                                        "options (classes, candidates; for generation the greedy answer and the gold "
                                        "answers) drawn from softmax(log-likelihood / T) (default "
                                        f"{DEFAULT_SMOOTHING}; 0 = the hard metric, which ties on most steps)",
                                at_least=0)
    metric_form: str = arg("auto", "log: mean log of each example's expected metric (auto for per-example "
                                   "metrics; for accuracy over label words or choices at smoothing 1 it equals "
                                   "cross-entropy); mean: the expected metric itself (auto for corpus metrics such "
                                   "as macro-F1)", choices=FORMS)
    sequence_score: str = arg("sum", "generated answer candidates are scored by their total log-likelihood or its "
                                     "mean per token", choices=SEQUENCE_SCORES)
    metric_support: str = arg("auto", "how the options are weighed: options = softmax over them; model = for "
                                      "generation, their probability under the model, every other answer scoring 0 "
                                      "(auto: model for generation metrics in log form, else options)",
                              choices=SUPPORTS)
    samples: int = arg(256, "Monte Carlo draws for that expectation when the metric is not a per-example mean",
                       above=0, at_most=MAX_SAMPLES, why_most="each draw is one metric call per step")
    weight_decay: float = arg(0.0, "decoupled weight decay", at_least=0, resume=FIXED)
    schedule: str = arg("constant", "learning-rate schedule over --steps", choices=SCHEDULES)
    noise: str | None = arg(None, "how the perturbations are drawn (default: table; fzoo: rademacher, as published)",
                            choices=NOISE_KINDS, resume=FIXED)
    difference: str = arg("central", "central: losses at x +- eps z; forward: at x and x + eps z",
                          choices=DIFFERENCES, resume=FIXED)
    update: str | None = arg(None, "sgd, sign, or normalized: g over the running RMS of g (one lr for any loss "
                                   f"scale; default: {OBJECTIVE_DEFAULTS[REWARD]['update']} for --reward with a "
                                   "population, else sgd)", choices=UPDATES, resume=FIXED)
    fitness_shaping: str = arg("none", "rank (experimental): replace each step's losses by centered ranks (evolution "
                                       "strategies); the estimate is then scale-free, in [-1, 1]",
                               choices=SHAPINGS, resume=FIXED)
    momentum: float = arg(0.0, "momentum rebuilt from past seeds (no buffer); needs --momentum-window > 1", at_least=0,
                          resume=FIXED)
    momentum_window: int = arg(0, "past steps the momentum regenerates", at_least=0, resume=FIXED)
    on_nonfinite: str = arg("raise", "on a NaN/inf loss: stop with an error, or skip the estimate (with a warning)",
                            choices=NONFINITE_POLICIES)
    peft: str = arg("none", "tune a LoRA adapter (r=8 on q/v) or a 5-token prefix (started from the model's "
                    "activations of random tokens, as MeZO) instead of the weights", choices=PEFT_KINDS, resume=FIXED)
    trainable: str | None = arg(None, "regex: only parameters whose name matches are tuned", resume=FIXED)
    train_size: int = arg(1000, "training sample size (MeZO: 1000)", above=0)
    eval_every: int = arg(200, "evaluate on the dev set every this many steps (0: only at the end)", at_least=0,
                          resume=FREE)
    checkpoint_every: int = arg(1, "write the checkpoint (trajectory.json) every this many steps (0: only at "
                                   "evaluations)", at_least=0, resume=FREE)
    eval_before: bool = arg(True, "evaluate before tuning (--no-eval-before skips it, e.g. when zo-eval already "
                                  "measured it)", resume=FREE)
    output_dir: str | None = arg(None, "run folder (default runs/<task>-<objective>-s<seed>)", resume=FREE)
    progress: bool = arg(True, "show a progress bar (--no-progress hides it)", resume=FREE)

    def __post_init__(self) -> None:
        if self.reward and self.data and self.template is None:
            self.template = "{prompt}"  # a file of prompts for rewards: its "prompt" column as it is
        super().__post_init__()
        self._estimator_defaults()
        if self.smoothing is not None and 0 < self.smoothing < MIN_SMOOTHING:
            raise UsageError(f"--smoothing must be 0 (the hard metric) or >= {MIN_SMOOTHING:g} (smaller temperatures "
                             f"overflow log-likelihood / T), got {self.smoothing:g}")
        if self.momentum >= 1 or (self.momentum > 0) != (self.momentum_window > 1):
            raise UsageError(f"--momentum must be in [0, 1) with --momentum-window > 1 (or both 0), got "
                             f"{self.momentum}, {self.momentum_window}")
        if self.population and self.estimator not in ("auto", "population"):
            raise UsageError(f"--population is the population estimator's; with --estimator {self.estimator} leave "
                             "it at 0")
        if self.population and self.perturbation_rank == 0:
            raise UsageError("--perturbation-rank 0 (full rank) is FZOO's; the population estimator's members are "
                             "low-rank: accepted 1 or more")
        if self.population % 2:
            raise UsageError(f"--population must be even (antithetic pairs) or 0 (MeZO), got {self.population}")
        if self.population and (self.n_perturbations not in (None, 1) or self.momentum
                                or self.difference != "central"):
            raise UsageError("--population replaces --n-perturbations, --momentum and --difference forward: "
                             "leave them at their defaults")
        if self.reward and self.objective not in (None, REWARD):
            raise UsageError("--reward and --objective exclude each other: the rewards are the objective")
        for spec in self.reward:
            if spec not in list_rewards() and (spec.count(":") < 1 or not all(spec.rpartition(":")[::2])):
                raise UsageError(f"--reward {spec!r}: expected module:function, path/to/file.py:function or a ready "
                                 f"reward: {', '.join(list_rewards())}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward):
            raise UsageError(f"--reward-weights: {len(self.reward_weights)} weights for {len(self.reward)} --reward")
        # a task scored by a checker (arith) tunes on it unless given another objective (cli.resolve)
        checked = self.objective is None and not self.data and self.task in list_tasks() and get_task(self.task).reward
        if (self.reward_candidates or self.sample_temperature) and not (self.reward or checked):
            raise UsageError("--reward-candidates and --sample-temperature apply to --reward runs (or a task scored "
                             "by a checker) only")
        if self.reward_candidates and not self.sample_temperature:
            raise UsageError("--reward-candidates needs --sample-temperature > 0: greedy decoding gives every "
                             "candidate the same text")
        if self.top_p < 1 and not self.sample_temperature:
            raise UsageError(f"--top-p {self.top_p} needs --sample-temperature > 0: greedy decoding samples nothing")
        if self.top_p > 1:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")

    def _estimator_defaults(self) -> None:
        """Fill ``population``, ``update``, ``lr`` and ``eps`` left unset from OBJECTIVE_DEFAULTS for this kind of
        objective; lr and eps only when the estimator is the default one (else ``prepare`` resolves them)."""
        checked = self.objective is None and not self.data and self.task in list_tasks() and get_task(self.task).reward
        greedy = not (self.reward_candidates or self.sample_temperature)
        bundle = OBJECTIVE_DEFAULTS.get(REWARD if self.reward or checked else self.objective or "", {})
        if self.estimator != "auto":  # an estimator named: its own defaults, not the objective's bundle
            bundle = {}
        mezo_only = self.n_perturbations not in (None, 1) or self.momentum or self.difference != "central"
        if self.population is None:
            own = 8 if self.estimator == "population" else 0  # the population estimator's own default
            self.population = own if self.update is not None or mezo_only else bundle.get("population", own)
        if self.update is None:
            self.update = bundle.get("update", "sgd") if self.population else "sgd"
        if bundle and greedy and (self.population, self.update) == (bundle.get("population"), bundle.get("update")):
            self.lr = self.lr or bundle.get("lr")
            self.eps = self.eps or bundle.get("eps")


@dataclass
class EvalConfig(CommonConfig):
    """A ``zo-eval`` evaluation; with ``run``, that run's model and task settings are the defaults."""

    run: str | None = arg(None, "a zo-tune run folder: evaluate its tuned weights")
    shots: int = arg(0, "in-context demonstrations drawn from the train split", at_least=0)
    split: str = arg("dev", "dev: the standard evaluation set; validation: held out from the training pool",
                     choices=SPLITS)


@dataclass
class ExportConfig:
    """A ``zo-export`` export (the run folder and output folder are its two positional arguments)."""

    merge: bool = arg(False, "LoRA runs: merge the adapter into the weights and write a full model folder",
                      switch=True)
    best: bool = arg(False, "export the weights of the run's best evaluation in its metrics.jsonl (rebuilt by "
                            "replaying its trajectory to that step) instead of its last step", switch=True)

    def __post_init__(self) -> None:
        check(self)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the type ``hint`` (an int is accepted as a float), or a UsageError."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    kind = next(a for a in options if a is not type(None))
    if typing.get_origin(kind) is list and isinstance(value, list):
        return [_coerce(name, v, typing.get_args(kind)[0]) for v in value]
    if kind is float and type(value) is int:
        return float(value)
    if type(value) is kind:  # exactly: a bool is not an int here
        return value
    expected = "a list" if typing.get_origin(kind) is list else kind.__name__
    raise UsageError(f"{flag(name)} must be {expected}, got {value!r}")


def check(config: Any) -> None:
    """Types, choices, finite numbers and bounds of every field, from the fields' hints and metadata."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value = _coerce(f.name, getattr(config, f.name), hints[f.name])
        setattr(config, f.name, value)
        meta = f.metadata
        for v in value if isinstance(value, list) else [] if value is None else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise UsageError(f"{flag(f.name)} must be a finite number, got {v}")
            if "choices" in meta and v not in meta["choices"]:
                raise UsageError(f"unknown {flag(f.name)} {v!r}; accepted: {', '.join(meta['choices'])}")
            if meta["at_least"] is not None and v < meta["at_least"]:
                raise UsageError(f"{flag(f.name)} must be >= {meta['at_least']}, got {v}")
            if meta["above"] is not None and v <= meta["above"]:
                raise UsageError(f"{flag(f.name)} must be > {meta['above']}, got {v}")
            if meta["at_most"] is not None and v > meta["at_most"]:
                why = f" ({meta['why_most']})" if meta["why_most"] else ""
                raise UsageError(f"{flag(f.name)} must be <= {meta['at_most']}{why}, got {v}")


# Facts about a run that config.json holds beside its settings (ignored when it is read back as settings)
DERIVED = ("form", "support", "metric", "train_examples", "eval_examples", "trainable_parameters", "world_size",
           "optimizer", "resumed", "hardware")


def settings(cls: type, values: dict, source: str) -> dict:
    """The settings of ``cls`` in ``values`` (a config file's); a key that is neither one nor DERIVED is an error."""
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(names) - set(DERIVED))
    if unknown:
        raise UsageError(f"{source}: unknown settings {unknown}; accepted: {', '.join(names)}")
    out = {k: v for k, v in values.items() if k in names}
    if "estimator" in names and "estimator" not in out and "optimizer" in values:  # a run's, before --estimator
        out["estimator"] = "population" if out.get("population") else "mezo"
    return out


def read_config(cls: type, path: str | Path) -> dict:
    """The settings of ``cls`` in the JSON file ``path`` (such as a run's config.json), by name."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read config {path}: {err}") from err
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object of settings")
    return settings(cls, data, str(path))


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        shown = not (action.default is None or action.default is False or action.default == [])
        return super()._get_help_string(action) if shown else action.help


class Parser(HfArgumentParser):
    """HfArgumentParser over one config class, with ``--config``. Flags are spelled with hyphens (``--batch-size``;
    ``--batch_size`` works too); fields' metadata that argparse does not take (bounds, resume) stays out."""

    def __init__(self, cls: type, prog: str, description: str):
        super().__init__(cls, prog=prog, description=description, formatter_class=_Help)
        self.add_argument("--config", help="a JSON file of settings, such as a run's config.json; flags given "
                                           "beside it override it")

    def add_argument(self, *names: str, resume: str = "", at_least: Any = None, above: Any = None,
                     at_most: Any = None, why_most: str = "", switch: bool = False, before: Any = None,
                     **kwargs: Any):
        if switch:  # a flag without a value: ``--merge RUN OUT`` must not read RUN as the flag's value
            kwargs = {k: v for k, v in kwargs.items() if k not in ("type", "nargs", "const")} | {"action": "store_true"}
        return super().add_argument(*sorted(names, key=lambda n: "_" in n), **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        """A UsageError of one line, ``--flag: problem; accepted: ...``, instead of argparse's usage block and
        exit (the commands print it and exit with code 2)."""
        raise UsageError(parse_error(self, message))

    def given(self, argv: list[str] | None) -> tuple[argparse.Namespace, dict]:
        """The flags that are not settings (``--config``, ``--resume``, ...), and the settings given explicitly (in
        --config, overridden by flags), by name."""
        cls = self.dataclass_types[0]
        unset = object()  # argparse sets a default only where the namespace has no value yet
        preset = {f.name: None if "action" in f.metadata else unset for f in fields(cls)}
        args = self.parse_args(argv, namespace=argparse.Namespace(**preset))
        flags = {k: v for k, v in vars(args).items() if k in preset and v is not unset and v is not None}
        other = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in preset}, flagged=set(flags))
        return other, {**(read_config(cls, args.config) if args.config else {}), **flags}


def parse_error(parser: argparse.ArgumentParser, message: str) -> str:
    """argparse's ``argument --steps/--steps: invalid int value: '1.5'`` as ``--steps: '1.5' is not an integer;
    accepted: a whole number``: the flag's first spelling, the value, what it accepts."""
    found = re.fullmatch(r"argument ([^:]+): (.*)", message, re.S)
    if not found:
        return message
    name, problem = found[1].split("/")[0], found[2]
    action = parser._option_string_actions.get(name)
    given = re.search(r"'[^']*'", problem)
    value = given[0] if given else ""
    if problem.startswith("invalid choice") and action is not None and action.choices:
        return f"{name}: unknown value {value}; accepted: {', '.join(map(str, action.choices))}"
    if problem.startswith("Truthy value expected"):  # transformers' string_to_bool
        value = re.search(r"got (.*) but", problem)[1]
        return f"{name}: {value!r} is not a yes/no value; accepted: the flag alone, true/false, yes/no, 1/0"
    kind = re.match(r"invalid (\w+) value", problem)
    if kind:
        accepted = {"int": "an integer", "float": "a number"}.get(kind[1], kind[1])
        return f"{name}: {value} is not {accepted}; accepted: {accepted}"
    return f"{name}: {problem}"


def differences(saved: dict, config: Any) -> tuple[dict, dict]:
    """The settings of ``config`` that differ from a run's ``saved`` ones, as name: [saved, new]: those that may
    change on resume only when allowed, and those that may never change. A setting that ``saved`` lacks was added
    since that run was written: the run had its default (as ``--data-source local``)."""
    allowed, fixed = {}, {}
    for f in fields(config):
        unset = f.metadata.get("before") or (None if f.default is MISSING else f.default)
        old, new = saved.get(f.name, unset), getattr(config, f.name)
        if f.metadata["resume"] != FREE and old != new:
            (fixed if f.metadata["resume"] == FIXED else allowed)[f.name] = [old, new]
    return allowed, fixed


def describe(changes: dict) -> str:
    """``--name saved -> new, ...``"""
    return ", ".join(f"{flag(name)} {old} -> {new}" for name, (old, new) in changes.items())
