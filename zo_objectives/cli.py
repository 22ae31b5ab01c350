"""Command line: ``zo-tune`` (tune a model on a task's objective), ``zo-eval`` (evaluate a model or run) and
``zo-export`` (write a run's tuned model as a Hugging Face folder).

Both take their flags from the dataclasses of ``zo_objectives.config``; ``tune(TuneConfig(...))`` is the same
run from Python. Everything is checked before the run folder is touched: bad input (unknown model, task,
objective, plugin or reward, a bad number, a data file without the needed columns, a resume with changed
settings) prints one line naming the problem and the accepted values, and exits with code 2.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import save_file

from metrics import Metric, get_metric, list_metrics
from metrics.rewards import get_reward, list_rewards
from tasks import Task, get_task, task_from_file, with_demonstrations
from zo_objectives import distributed
from zo_objectives.checkpoint import check_run_folder
from zo_objectives.checkpoint import resume as replay_checkpoint
from zo_objectives.config import (
    DEFAULT_EPS,
    GREEDY_REWARD_EPS,
    REWARD,
    CommonConfig,
    EvalConfig,
    ExportConfig,
    Parser,
    TuneConfig,
    UsageError,
    default_lr,
    describe,
    differences,
    flag,
    read_config,
)
from zo_objectives.estimators import get_estimator
from zo_objectives.evaluate import evaluate_metrics, predict_all, sharded_predict_all
from zo_objectives.export import export_run
from zo_objectives.models import (
    DTYPES,
    apply_peft,
    auto_dtype,
    cpu_has_bf16,
    cpu_name,
    load_model,
    load_run_weights,
    select_trainable,
    trainable_state,
)
from zo_objectives.objectives import (
    CROSS_ENTROPY,
    MetricObjective,
    RewardObjective,
    ShardedObjective,
    UserCodeExit,
    check_metric,
    make_objective,
    reward_columns,
)
from zo_objectives.plots import plot_run
from zo_objectives.reporting import (
    SAMPLE,
    CompletionsLog,
    require_tensorboard,
    tensorboard_callback,
    tensorboard_writer,
)
from zo_objectives.runfolder import (
    CHECKPOINT,
    COMPLETIONS,
    CONFIG,
    EVAL,
    LOG,
    MANIFEST,
    RUN_FILES,
    TENSORBOARD,
    WEIGHTS,
    check_run_weights,
    check_sealed,
    clean,
    holds_files,
    left_before_first_checkpoint,
    lock,
    new_manifest,
    read_json,
    write_sealed,
)
from zo_objectives.scoring import chat_formatted, conversational, predictor_for
from zo_objectives.train import Stopped, make_scheduler, sigterm_as_interrupt, train

DEFAULT_ESTIMATOR = "mezo"  # --estimator auto without --population
# settings whose default is the estimator's, and the value written for an estimator that does not take them
ESTIMATOR_DEFAULTS = {"n_perturbations": 1, "perturbation_rank": 1, "noise": "table"}
# every estimator's setting, at the value that means "not asked for": another value given to an estimator that
# does not take the setting is refused
ESTIMATOR_SETTINGS = {**ESTIMATOR_DEFAULTS, "population": 0, "difference": "central", "update": "sgd",
                      "fitness_shaping": "none", "momentum": 0.0, "momentum_window": 0}


def _fmt(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.4f}"


def headline(values: dict[str, float] | None) -> float | None:
    """The first (headline) metric's value of an evaluation, None when there was none."""
    return next(iter(values.values())) if values else None


def import_source(source: str, flag: str) -> ModuleType:
    """A module by name (found from the working directory too) or a ``.py`` file by path."""
    try:
        if source.endswith(".py") or os.sep in source or "/" in source:
            path = Path(source).resolve()
            if path.suffix != ".py" or not path.is_file():
                raise UsageError(f"{flag} {source!r}: no such .py file")
            name = f"zo_source_{path.stem}_{abs(hash(str(path)))}"  # one module per file, imported once
            if name not in sys.modules:
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                sys.modules[name] = module
            return sys.modules[name]
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        return importlib.import_module(source)
    except UsageError:
        raise
    except SystemExit as err:  # the module's failure, not the command's exit
        raise UserCodeExit(f"{flag} {source!r} raised SystemExit({err.code!r}) (sys.exit, exit()) as it was "
                           "imported") from None
    except Exception as err:  # a module that raises as it is imported: ImportError, SyntaxError or its own
        raise UsageError(f"cannot import {flag} {source!r}: {type(err).__name__}: {err}") from err


def reward_functions(specs: list[str]) -> list[Callable]:
    """The reward functions named ``module:function`` (or ``file.py:function``), or ready ones by name
    (``metrics.rewards``)."""
    out = []
    for spec in specs:
        if spec in list_rewards():
            out.append(get_reward(spec))
            continue
        source, _, name = spec.rpartition(":")
        fn = getattr(import_source(source, "--reward"), name, None)
        if not callable(fn):
            raise UsageError(f"--reward {spec!r}: {source} has no function {name!r}")
        out.append(fn)
    return out


def _task(config: CommonConfig) -> Task:
    for name, path in (("--data", config.data), ("--dev-data", config.dev_data)):
        if path and not Path(path).is_file():
            raise UsageError(f"{name} {path}: no such file")
    if config.data:
        rewards = bool(getattr(config, "reward", None))  # a file of prompts for rewards: generation, answers optional
        if not (config.label_words or config.answer_column or rewards):
            raise UsageError(f"--data {config.data}: say what it holds: --label-words (classification), "
                             "--answer-column (generation) or --reward (a file of prompts); --template makes a row a "
                             "prompt (default: its 'prompt' column)")
        return task_from_file(config.data, name=Path(config.data).stem, template=config.template,
                              label_words=config.label_words, labels=config.labels, label_column=config.label_column,
                              answer_column=config.answer_column, dev_path=config.dev_data,
                              kind="generation" if rewards else None)
    return get_task(config.task)


def pick_dtype(name: str, device: torch.device) -> str:
    """The dtype a run uses: ``auto`` resolves by the device (``models.auto_dtype``)."""
    return auto_dtype(device) if name == "auto" else name


def hardware(device: torch.device) -> dict:
    """What config.json records of the machine: the device, its model name, and (CPU) native bf16 arithmetic."""
    if device.type == "cuda":
        return {"device": "cuda", "name": torch.cuda.get_device_name(device)}
    return {"device": device.type, "name": cpu_name(), "native_bf16": cpu_has_bf16()}


def pick_device(name: str | None) -> torch.device:
    """The requested device; by default CUDA when available (under torchrun, this rank's GPU)."""
    if name is None:
        name = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def resolve(config: TuneConfig) -> tuple[TuneConfig, Task]:
    """Load the plugins and the task; fill in the task's name, the objective and the run folder."""
    for plugin in config.plugin:
        import_source(plugin, "--plugin")
    task = _task(config)
    if task.reward and not config.reward and config.objective is None:  # a task scored by a checker: its reward
        config = replace(config, reward=[task.reward])
    objective = REWARD if config.reward else config.objective or task.metric
    if objective not in (REWARD, CROSS_ENTROPY, *list_metrics()):
        raise UsageError(f"unknown objective {objective!r}; available: {', '.join([CROSS_ENTROPY, *list_metrics()])}")
    output_dir = config.output_dir or f"runs/{task.name}-{objective}-s{config.seed}"
    estimator = config.estimator if config.estimator != "auto" else "population" if config.population else (
        DEFAULT_ESTIMATOR)
    try:
        accepted = inspect.signature(get_estimator(estimator).__init__).parameters
    except ValueError as err:
        raise UsageError(f"--estimator: {err}") from None
    # settings left unset take the estimator's own default (else the neutral one: it does not read them)
    unset = {name: accepted[name].default if name in accepted else neutral
             for name, neutral in ESTIMATOR_DEFAULTS.items() if getattr(config, name) is None}
    for name, neutral in ESTIMATOR_SETTINGS.items():  # another estimator's setting would be silently ignored
        if name not in accepted and getattr(config, name) not in (None, neutral):
            raise UsageError(f"{flag(name)} is not a setting of --estimator {estimator}; it takes: "
                             f"{', '.join(flag(n) for n in ESTIMATOR_SETTINGS if n in accepted)}")
    config = replace(config, task=task.name, objective=objective, output_dir=output_dir, estimator=estimator,
                     **unset)
    return replace(config, metrics=[m.name for m in evaluation_metrics(config, task)]), task


def evaluation_metrics(config: CommonConfig, task: Task) -> list[Metric]:
    """The metrics a run reports on its evaluation set, the headline first: ``--metric``'s, else the metric the
    run optimizes (its objective, where that is a metric; for --reward runs "reward", the weighted reward of greedy
    completions), else the task's (cross-entropy, zo-eval)."""
    objective = getattr(config, "objective", None)
    names = config.metrics or [objective if objective in (*list_metrics(), REWARD) else task.metric]
    unknown = [n for n in names if n not in list_metrics() and not (n == REWARD and objective == REWARD)]
    if unknown:
        available = [*list_metrics(), *([REWARD] if objective == REWARD else [])]
        raise UsageError(f"unknown --metric {' '.join(unknown)}; available: {', '.join(available)}")
    return [Metric(REWARD, _reward_run_metric) if n == REWARD else get_metric(n) for n in dict.fromkeys(names)]


def heldout_split(task: Task, fraction: float, seed: int, source: str = "local") -> tuple[list[dict], list[dict]]:
    """The training pool shuffled by ``seed``, split into the rows to train on and the last ``fraction`` held out
    (the same rows for zo-tune and zo-eval --run)."""
    pool = task.examples("train", n=sys.maxsize, seed=seed, source=source)
    held = max(1, round(fraction * len(pool)))
    if held >= len(pool):
        raise UsageError(f"--heldout-fraction {fraction} of {task.name}'s {len(pool)} training examples leaves none "
                         "to train on")
    return pool[: len(pool) - held], pool[len(pool) - held:]


def split_examples(config: TuneConfig, task: Task) -> tuple[list[dict], list[dict], str]:
    """The training sample, the evaluation set and its name. With ``heldout_fraction`` the evaluation set is that
    fraction of the training pool (seeded by ``seed``), never trained on; else the task's dev set, with a
    warning when it holds training examples (CB's dev set is its training pool)."""
    if config.heldout_fraction:
        pool, held = heldout_split(task, config.heldout_fraction, config.seed, config.data_source)
        return pool[: config.train_size], held[: config.eval_size], "held-out"
    train_set = task.examples("train", n=config.train_size, seed=config.seed, source=config.data_source)
    dev_set = task.examples("dev", n=config.eval_size, source=config.data_source)
    seen = {ex["prompt"] for ex in train_set}
    overlap = sum(ex["prompt"] in seen for ex in dev_set)
    if overlap and distributed.rank() == 0:
        print(f"zo-tune: warning: {overlap} of the {len(dev_set)} {task.name} dev examples are training examples, so "
              "the dev metric measures training data; --heldout-fraction 0.25 evaluates on examples held out from "
              "training", file=sys.stderr)
    return train_set, dev_set, "dev"


def _reward_run_metric(predictions: list, references: list) -> float:
    raise TypeError("a reward run is evaluated by RewardObjective.evaluate (its rewards need prompts and columns)")


@dataclass
class Run:
    """A tune run ready to start: its settings resolved, model loaded, data drawn."""

    config: TuneConfig
    model: torch.nn.Module
    predictor: Any
    objective: Any
    metrics: list[Metric]  # reported on dev_set, the headline first
    train_set: list[dict]
    dev_set: list[dict]
    split: str  # what dev_set is: "dev" or "held-out"
    facts: dict  # what config.json holds beside the settings


def prepare(config: TuneConfig, task: Task, device: torch.device, loaded: tuple | None = None) -> Run:
    """Load the model (or take ``loaded``: a model and its tokenizer, already in memory) and build the objective;
    resolve lr, eps, smoothing and dtype. Nothing is written."""
    if loaded:  # its dtype is the one it has
        dtype = next(loaded[0].parameters()).dtype
        config = replace(config, dtype=next((k for k, v in DTYPES.items() if v == dtype), config.dtype))
    config = replace(config, dtype=pick_dtype(config.dtype, device))
    torch.manual_seed(config.seed)
    model, tokenizer = loaded or load_model(config.model, dtype=config.dtype)
    model = apply_peft(model, config.peft, seed=config.seed).to(device)
    try:
        select_trainable(model, config.trainable)
    except re.error as err:
        raise UsageError(f"--trainable {config.trainable!r} is not a regular expression: {err}") from err
    check_sizes(config, model, device)
    generation = {"max_new_tokens": config.max_new_tokens, "stop": config.stop}
    predictor = predictor_for(task, tokenizer, max_length=config.max_length, model=model, **generation)
    if config.reward:
        generator = predictor_for(task, tokenizer, max_length=config.max_length,
                                  temperature=config.sample_temperature, top_p=config.top_p, **generation)
        if not hasattr(generator, "generate"):
            raise UsageError(f"--reward needs a generation task (such as squad); {task.name} is {task.kind}")
        objective = RewardObjective(generator, reward_functions(config.reward), config.reward_weights,
                                    candidates=config.reward_candidates, timeout=config.reward_timeout or None)
        # a reward that fails fails now, on a gold answer
        ex = conversational(task.examples("train", n=1, seed=config.seed, source=config.data_source), tokenizer)[0]
        score = objective.scores([ex["prompt"]], [ex["target"].strip()], reward_columns([ex]))[0]
        if not math.isfinite(score):
            raise UsageError(f"--reward gives {score} on a gold answer: rewards must be finite numbers")
    else:
        objective = make_objective(config.objective, predictor, smoothing=config.smoothing, samples=config.samples,
                                   form=config.metric_form, sequence_score=config.sequence_score,
                                   support=config.metric_support)
    metric_objective = isinstance(objective, MetricObjective)
    if config.smoothing is not None and not metric_objective:
        raise UsageError(f"--smoothing applies to metric objectives, not to {config.objective}")
    smoothing = objective.smoothing if metric_objective else None
    form = objective.form if metric_objective and smoothing else None
    if config.update != "sgd" or config.fitness_shaping == "rank" or get_estimator(config.estimator).step_length:
        kind = "scale-free"
    else:  # a hard metric or rewards: the scale of the mean form
        kind = "cross_entropy" if config.objective == CROSS_ENTROPY else form or "mean"
    # rewards of greedy completions under a scale-free update (a step's length does not shrink as eps grows)
    greedy = not (config.reward_candidates or config.sample_temperature)
    greedy_reward = config.reward and greedy and kind == "scale-free"
    eps = config.eps or (GREEDY_REWARD_EPS if greedy_reward else DEFAULT_EPS[config.dtype])
    lr = config.lr or default_lr(objective, config.update, config.fitness_shaping, config.population, config.estimator,
                                 eps)
    config = replace(config, lr=lr, eps=eps, smoothing=smoothing)
    metrics = evaluation_metrics(config, task)
    for metric in metrics:  # a metric that cannot score these predictions fails now, not at the first evaluation
        check_metric(metric, predictor, "hard")
    train_set, dev_set, split = split_examples(config, task)
    train_set, dev_set = conversational(train_set, tokenizer), conversational(dev_set, tokenizer)  # prompts as messages
    if config.chat_template:
        train_set, dev_set = chat_formatted(train_set, tokenizer), chat_formatted(dev_set, tokenizer)
    if config.batch_size > len(train_set):
        raise UsageError(f"--batch-size {config.batch_size} is larger than the {len(train_set)} training examples of "
                         f"{task.name}; use --batch-size {len(train_set)} or less")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    facts = {"form": form, "support": objective.support if form else None, "metric": metrics[0].name,
             "train_examples": len(train_set), "eval_examples": len(dev_set), "trainable_parameters": trainable,
             "world_size": distributed.world_size(), "hardware": hardware(device)}
    return Run(config, model, predictor, objective, metrics, train_set, dev_set, split, facts)


def available_memory(device: torch.device) -> int:
    """Bytes the run may still allocate on ``device``: free GPU memory, or the system's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = Path("/proc/meminfo").read_text()
        return int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo)[1]) * 1024
    except (OSError, TypeError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_sizes(config: TuneConfig, model: torch.nn.Module, device: torch.device) -> None:
    """Refuse a population or a number of sampled candidates that cannot fit, before the first step: each of the
    ``rows`` a batched pass scores needs at least the logits of one position (vocabulary x 4 bytes), a lower bound
    of its memory; and a perturbation rank above a trainable matrix's smaller side."""
    takes_rank = "perturbation_rank" in inspect.signature(get_estimator(config.estimator).__init__).parameters
    if takes_rank and config.perturbation_rank:  # low-rank members (population, fzoo, grzo, a plugin's)
        matrices = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        side = min((min(p.shape[0], p.numel() // p.shape[0]) for p in matrices), default=None)
        if side is not None and config.perturbation_rank > side:
            raise UsageError(f"--perturbation-rank {config.perturbation_rank} is above the smallest side of the "
                             f"model's trainable matrices ({side}); accepted: 1 to {side}")
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 1
    members = config.n_perturbations + 1 if config.estimator == "fzoo" else 0  # and the unperturbed one
    for name, count in (("--population", config.population), ("--n-perturbations", members),
                        ("--reward-candidates", config.reward_candidates)):
        rows = count * config.batch_size
        need, free = rows * vocab * 4, available_memory(device)
        if need > free:
            fits = max(0, free // (vocab * 4 * config.batch_size))
            raise UsageError(f"{name} {count} x --batch-size {config.batch_size} = {rows:,} rows scored at once need "
                             f"at least {need / 2**30:,.1f} GiB (their logits), more than the {free / 2**30:,.1f} GiB "
                             f"available on {device.type}; accepted: up to about {fits:,}")


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run folder that is a file, holds a run without --resume or --overwrite, or has nothing to
    resume. A folder left by a run that stopped before its first checkpoint may be reused as it is."""
    for path in (run_dir, *run_dir.parents):
        if path.exists() and not path.is_dir():
            raise UsageError(f"--output-dir {run_dir}: {path} is a file, not a folder")
    if resume:
        for name in (CHECKPOINT, CONFIG, EVAL):
            if not (run_dir / name).is_file():
                raise UsageError(f"--resume: no {name} in {run_dir}")
    elif holds_files(run_dir) and not overwrite and not left_before_first_checkpoint(run_dir):
        raise UsageError(f"run folder {run_dir} exists; pass --resume to continue it, --overwrite to replace it, "
                         "or another --output-dir")


def check_resume_early(run_dir: Path, config: TuneConfig) -> int:
    """What a resume can check before loading the model: the folder's files belong together
    (:func:`check_run_folder`), ``--steps`` is not below the checkpoint's step and the settings that may never
    change did not (but those ``prepare`` resolves). Return the checkpoint's step."""
    try:
        step = check_run_folder(run_dir)
    except ValueError as err:
        raise UsageError(f"--resume: {err}") from None
    if config.steps < step:
        raise UsageError(f"--steps {config.steps} is below the step of the checkpoint in {run_dir} ({step}): --steps "
                         f"is the total to reach; pass --steps {step} or more")
    _, fixed = differences(read_config(TuneConfig, run_dir / CONFIG), config)
    fixed = {k: v for k, v in fixed.items() if k not in ("dtype", "eps")}  # "auto" and None resolve later
    if fixed:
        raise UsageError(f"--resume: {describe(fixed)}: cannot change on a resume of {run_dir} (the checkpoint "
                         "replays the run with its settings); use another --output-dir")
    return step


def check_resume(run_dir: Path, config: TuneConfig, allow_changed_settings: bool, step: int) -> list[dict]:
    """Refuse settings that differ from the run's config.json unless they may; return the run's record of
    changed settings ("resumed" in config.json), with this resume's changes added."""
    saved = read_json(run_dir / CONFIG)
    allowed, fixed = differences(read_config(TuneConfig, run_dir / CONFIG), config)
    if fixed:
        raise UsageError(f"--resume: {describe(fixed)}: cannot change on a resume of {run_dir} (the checkpoint "
                         "replays the run with its settings); use another --output-dir")
    if allowed and not allow_changed_settings:
        raise UsageError(f"--resume: settings differ from {run_dir / CONFIG}: {describe(allowed)}; pass "
                         "--allow-changed-settings to continue with the new ones")
    return saved.get("resumed", []) + ([{"step": step, "changed": allowed}] if allowed else [])


def claim(run_dir: Path, resume: bool, overwrite: bool, held: ExitStack) -> None:
    """Take the run folder's lock (held until ``held`` closes), then check it again: another run may have
    written it since the first check."""
    held.enter_context(lock(run_dir))
    check_run_dir(run_dir, resume, overwrite)


def stop_message(run_dir: Path, signum: int) -> str:
    """One line for a run stopped by a signal: where, what was saved, how to go on."""
    name = signal.Signals(signum).name
    try:
        step = read_json(run_dir / CHECKPOINT)["step"]
    except (ValueError, TypeError, KeyError):
        return f"stopped by {name} before the first checkpoint: nothing to resume; run the command again"
    return (f"stopped by {name} at step {step}; checkpoint saved in {run_dir / CHECKPOINT}; continue with: "
            f"zo-tune --output-dir {run_dir} --resume")


def build_estimator(config: TuneConfig, params: list) -> Any:
    """The estimator ``config.estimator`` names, given the settings of ``config`` its constructor takes."""
    cls = get_estimator(config.estimator)
    accepted = [name for name in inspect.signature(cls.__init__).parameters if name != "params"]
    return cls(params, **{name: getattr(config, name) for name in accepted if hasattr(config, name)})


def tune(config: TuneConfig, *, resume: bool = False, overwrite: bool = False,
         allow_changed_settings: bool = False, callbacks: Sequence[Callable[[dict], None]] = (),
         loaded: tuple | None = None) -> dict:
    """Tune a model as ``config`` says, in its run folder; return the summary that eval.json holds.

    ``resume`` continues the run folder from its checkpoint, with the settings of its config.json:
    ``steps`` (to extend it) and the other settings marked free in TuneConfig may differ, those marked fixed
    (the model's, the data's, the optimizer's) may not, and any other difference needs
    ``allow_changed_settings`` (config.json then records it under "resumed"). ``overwrite`` replaces an
    existing run folder: every file a run writes is removed before anything is written. The run holds the
    folder's lock from its checks to its end; a stop by SIGINT or SIGTERM raises :class:`Stopped` saying
    where the run stopped and how to continue it. Each of ``callbacks`` is called with each row of
    metrics.jsonl as it is logged (rank 0); ``loaded`` is (model, tokenizer) already in memory, tuned in place,
    instead of loading ``config.model`` (which config.json then names).
    """
    rank, world = distributed.init()  # distributed: (0, 1) unless torchrun set WORLD_SIZE > 1
    main = rank == 0  # distributed: only rank 0 checks and writes the run folder, prints, shows progress
    distributed.quiet()  # distributed: silences warnings on ranks other than 0
    config, task = resolve(config)
    run_dir = Path(config.output_dir)
    with ExitStack() as held:
        try:
            return _tune(config, task, run_dir, main, world, held, resume, overwrite, allow_changed_settings,
                         callbacks, loaded)
        except FloatingPointError as err:  # the optimizer's message, with the objective named
            raise FloatingPointError(nonfinite_message(config, err)) from None
        except KeyboardInterrupt as err:
            signum = getattr(err, "signum", signal.SIGINT)
            raise Stopped(stop_message(run_dir, signum), signum) from None


def nonfinite_message(config: TuneConfig, err: FloatingPointError) -> str:
    """One line for a non-finite loss: its values, the objective or rewards that gave it, and the flag."""
    values = re.search(r"\(plus=[^)]*\)", str(err))
    source = (f"reward {', '.join(config.reward)} (--reward)" if config.reward
              else f"objective {config.objective} (--objective)")
    return (f"non-finite loss {values[0] if values else str(err)} from the {source}; the weights are as before the "
            "step and the checkpoint is kept: --on-nonfinite skip skips such estimates")


def _tune(config: TuneConfig, task: Task, run_dir: Path, main: bool, world: int, held: ExitStack, resume: bool,
          overwrite: bool, allow_changed_settings: bool, callbacks: Sequence[Callable[[dict], None]] = (),
          loaded: tuple | None = None) -> dict:
    step, claimed = 0, False
    if resume and run_dir.is_dir() and left_before_first_checkpoint(run_dir):  # nothing to replay: from step 0
        resume = False
    if main:
        check_run_dir(run_dir, resume, overwrite)
        if run_dir.is_dir():
            claim(run_dir, resume, overwrite, held)
            claimed = True
        if resume:
            step = check_resume_early(run_dir, config)
    if main and "tensorboard" in config.report_to:  # checked before the folder is written
        require_tensorboard()
    run = prepare(config, task, pick_device(config.device), loaded)
    auto = config.dtype == "auto"
    config, model, metrics, dev_set = run.config, run.model, run.metrics, run.dev_set
    metric, split = metrics[0], run.split  # the headline metric, and what the evaluation set is
    resumed = check_resume(run_dir, config, allow_changed_settings, step) if resume and main else []
    params = [p for p in model.parameters() if p.requires_grad]

    held_out_rewards: dict[str, float] = {}  # reward runs: each reward's mean at the last evaluation

    def dev_metrics(progress: bool = False) -> dict[str, float]:
        values: dict[str, float] = {}
        if any(m.name == REWARD for m in metrics):  # the weighted reward of greedy completions
            values[REWARD], means = run.objective.evaluate(model, dev_set, run.predictor, config.batch_size)
            held_out_rewards.update(means)
        others = [m for m in metrics if m.name != REWARD]
        if not others:
            return values
        if world > 1:  # distributed: verify the ranks' weights agree, split the dev set across ranks
            distributed.check_in_sync(params)
            values.update(evaluate_metrics(model, run.predictor, dev_set, others, config.batch_size,
                                           sharded_predict_all))
        else:
            values.update(evaluate_metrics(model, run.predictor, dev_set, others, config.batch_size,
                                           functools.partial(predict_all, progress=progress)))  # a bar on stderr
        return {m.name: values[m.name] for m in metrics}

    start, before = 0, None
    if resume:
        optimizer, start = replay_checkpoint(run_dir, params)
        optimizer.on_nonfinite = config.on_nonfinite
        for group in optimizer.param_groups:  # the lr of the steps to come (the trajectory keeps each step's)
            group.update(lr=config.lr, initial_lr=config.lr)
        saved = read_json(run_dir / EVAL)
        before = saved.get("before_metrics") or ({metric.name: saved["before"]} if saved.get("before") is not None
                                                 else None)
    else:
        optimizer = build_estimator(config, params)
    # distributed: MeZO splits the batch (batch[rank::world]); a batched estimator splits its members instead
    objective = ShardedObjective(run.objective) if world > 1 and not optimizer.members else run.objective
    scheduler = make_scheduler(optimizer, config.schedule, config.steps, last_step=start)
    if main:  # every check passed: from here on the run folder is written
        if not claimed:  # a new folder: claimed as it is created
            claim(run_dir, resume, overwrite, held)
        if not (resume or overwrite) and left_before_first_checkpoint(run_dir):
            print(f"zo-tune: reusing {run_dir}: the run there stopped before its first checkpoint (nothing to resume: "
                  "it runs again from step 0)", file=sys.stderr)
        clean(run_dir, everything=not resume)  # temporaries a kill left; for a new run every earlier file
        if not resume:
            new_manifest(run_dir)
        write_sealed(run_dir, CONFIG, _json_writer({**asdict(config), **run.facts, "optimizer": optimizer.config(),
                                                    **({"resumed": resumed} if resumed else {})}))
    if main and auto:  # every check passed: say what --dtype auto chose here
        machine = run.facts["hardware"]
        native = machine.get("native_bf16")
        bf16 = "" if native is None else f", {'' if native else 'no '}native bf16 arithmetic"
        print(f"zo-tune: --dtype auto: {config.dtype} on {machine['device']} ({machine['name']}{bf16})",
              file=sys.stderr)
    if not resume:
        if config.eval_before and main:
            print(f"zo-tune: evaluating {config.model} on {len(dev_set)} {task.name} {split} examples before tuning "
                  "(--no-eval-before skips it)", file=sys.stderr)
        before = dev_metrics(progress=main and config.progress) if config.eval_before else None
        if main:
            write_sealed(run_dir, EVAL, _json_writer(finite_json({
                "metric": metric.name, "split": split, "examples": len(dev_set), "before": headline(before),
                "before_metrics": before}, EVAL)))
    if main:
        print(f"zo-tune: {task.name}, objective {config.objective}, {run.facts['trainable_parameters']:,} trainable "
              f"parameters, {split} {metric.name} before: {_fmt(headline(before))}", file=sys.stderr)
    hooks = [*reporters(config, run, run_dir, held, before_step=start if not resume else None), *callbacks] if (
        main) else []
    t0 = time.perf_counter()
    history = train(model, optimizer, objective, run.train_set, steps=config.steps, batch_size=config.batch_size,
                    seed=config.seed, start_step=start, evaluate_fn=dev_metrics, eval_every=config.eval_every,
                    run_dir=run_dir if main else None, scheduler=scheduler, progress=main and config.progress,
                    checkpoint_every=config.checkpoint_every, callbacks=hooks)
    last = history[-1] if history and "eval" in history[-1] else {}
    after = eval_values(last) or ({metric.name: last["eval"]} if last else dev_metrics())
    if not last:  # evaluated after the loop: its sample of completions too
        for hook in hooks:
            if isinstance(hook, CompletionsLog):
                hook.write(config.steps, "eval", dev_set[:SAMPLE])
    # the whole run's statistics: earlier sessions' steps are in the log (their time: their steps' own seconds)
    logged = logged_rows(run_dir) if main else history
    earlier = [r for r in logged if r["step"] <= start]
    seconds = time.perf_counter() - t0 + sum(r.get("seconds", 0.0) for r in earlier)
    every = earlier + history
    ties = sum(r["tied"] for r in every) / max(1, len(every))
    summary = {"metric": metric.name, "split": split, "examples": len(dev_set), "before": headline(before),
               "after": after[metric.name], "before_metrics": before, "after_metrics": after,
               "steps": config.steps, "train_seconds": seconds, "tied_fraction": ties,
               **({"rewards": dict(held_out_rewards)} if held_out_rewards else {})}
    if main:  # distributed: rank 0 writes the results
        write_sealed(run_dir, EVAL, _json_writer(finite_json(summary, EVAL)))
        write_sealed(run_dir, WEIGHTS, lambda tmp: save_file(trainable_state(model), tmp), step=config.steps)
        plot_run(run_dir)
        others = "".join(f", {name} {_fmt((before or {}).get(name))} -> {value:.4f}" for name, value in after.items()
                         if name != metric.name)
        print(f"zo-tune: {split} {metric.name} {_fmt(headline(before))} -> {after[metric.name]:.4f}{others} after "
              f"{config.steps} steps ({seconds / 60:.1f} min, {ties:.0%} of steps tied). Run folder: {run_dir} "
              f"({', '.join(RUN_FILES)})", file=sys.stderr)
    return summary


def eval_values(row: dict) -> dict[str, float]:
    """A metrics.jsonl row's evaluation metrics by name: its ``eval/<name>`` values (``eval_metrics`` in rows
    written before issue 34)."""
    return {k[len("eval/"):]: v for k, v in row.items() if k.startswith("eval/")} or dict(row.get("eval_metrics") or {})


def reporters(config: TuneConfig, run: Run, run_dir: Path, held: ExitStack,
              before_step: int | None = None) -> list[Callable[[dict], None]]:
    """The run's own callbacks: a sample of completions in completions.jsonl (generation tasks and rewards: at
    each evaluation, before tuning when ``before_step`` is given, and every ``log_completions_every`` steps), and
    TensorBoard (``report_to``)."""
    hooks: list[Callable[[dict], None]] = []
    generator = run.predictor if hasattr(run.predictor, "generate") else None
    if generator is not None:
        log = CompletionsLog(run_dir / COMPLETIONS, run.model, generator, run.train_set, run.dev_set,
                             config.batch_size, config.seed, config.log_completions_every,
                             run.objective if config.reward else None)
        if before_step is not None and config.eval_before:
            log.write(before_step, "eval", run.dev_set[:SAMPLE])
        hooks.append(log)
    if "tensorboard" in config.report_to:
        writer = tensorboard_writer(run_dir / TENSORBOARD)
        held.callback(writer.close)
        hooks.append(tensorboard_callback(writer))
    return hooks
def logged_rows(run_dir: Path) -> list[dict]:
    """The rows of the run's metrics.jsonl (every session's steps; a resume cut it back to its checkpoint); a
    row that does not parse is left out of the statistics rather than failing a finished run."""
    rows = []
    for line in (run_dir / LOG).read_text().splitlines() if (run_dir / LOG).exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _json_writer(data: Any) -> Callable[[str], None]:
    return lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1, allow_nan=False))


def finite_json(data: Any, name: str, path: str = "") -> Any:
    """``data`` with each non-finite float (a reward's mean that overflowed) written as null, which JSON readers
    accept (``Infinity`` is not JSON), and a warning naming it."""
    if isinstance(data, dict):
        return {k: finite_json(v, name, f"{path}.{k}" if path else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [finite_json(v, name, f"{path}[{i}]") for i, v in enumerate(data)]
    if isinstance(data, float) and not math.isfinite(data):
        print(f"zo-tune: warning: {name}: {path} is {data}, not a JSON number: written as null", file=sys.stderr)
        return None
    return data


def evaluate_run(config: EvalConfig) -> dict:
    """Evaluate ``config.model`` (or the tuned weights of ``config.run``) on the task; print and return the result."""
    for plugin in config.plugin:
        import_source(plugin, "--plugin")
    task = _task(config)
    metrics = evaluation_metrics(config, task)
    device = pick_device(config.device)
    if config.heldout_fraction:  # the rows a zo-tune run with this fraction and seed held out
        examples = heldout_split(task, config.heldout_fraction, config.seed, config.data_source)[1][: config.eval_size]
    else:
        examples = task.examples(config.split, n=config.eval_size, seed=config.seed, source=config.data_source)
    if config.shots:
        demonstrations = task.examples("train", n=config.shots, seed=config.seed, source=config.data_source)
        examples = with_demonstrations(examples, demonstrations)
    model, tokenizer = load_model(config.model, dtype=pick_dtype(config.dtype, device))
    if config.run:
        model = apply_peft(model, read_config(TuneConfig, Path(config.run) / "config.json").get("peft", "none"))
        load_run_weights(model, Path(config.run))
    model.to(device)
    examples = conversational(examples, tokenizer)  # prompts given as messages: in the chat template
    if config.chat_template:
        examples = chat_formatted(examples, tokenizer)
    predictor = predictor_for(task, tokenizer, max_length=config.max_length, model=model,
                              max_new_tokens=config.max_new_tokens, stop=config.stop)
    for metric in metrics:
        check_metric(metric, predictor, "hard")
    values = evaluate_metrics(model, predictor, examples, metrics, config.batch_size)
    split = "held-out" if config.heldout_fraction else config.split
    result = {"model": config.model, "run": config.run, "task": task.name, "split": split,
              "shots": config.shots, "metric": metrics[0].name, "examples": len(examples),
              "value": values[metrics[0].name], **({"metrics": values} if len(values) > 1 else {})}
    print(json.dumps(result))
    return result


# Settings that name code to import: a file (a run folder's config.json, --config) may list them, but they are
# imported only when named again on the command line or with --trust-plugins (importing a module runs it)
CODE_SETTINGS = ("plugin", "reward")


def check_code_named(settings: dict, flagged: set[str], source: str | Path, trust: bool) -> None:
    """Refuse code (plugins, reward modules) that a file names and the command line does not, unless trusted."""
    listed = [f"{flag(k)} {v}" for k in CODE_SETTINGS if k not in flagged for v in settings.get(k) or []]
    if listed and not trust:
        raise UsageError(f"{source} names code to import: {' '.join(listed)}; importing runs it, so it is imported "
                         "only when named again on the command line (or with --trust-plugins)")


TRUST_HELP = ("import the plugins and reward modules that --config or a run folder's config.json lists (without it "
              "they must be named again on the command line)")


# The settings a zo-eval --run takes from the run's config.json unless given
RUN_SETTINGS = ("model", "task", "data_source", "data", "dev_data", "template", "label_words", "labels", "label_column",
                "answer_column", "plugin", "max_length", "dtype", "metrics", "chat_template", "heldout_fraction",
                "max_new_tokens", "stop")


def tune_parser() -> Parser:
    parser = Parser(TuneConfig, "zo-tune", "Tune a causal LM on any objective with MeZO.")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint, "
                                                              "with its config.json's settings")
    parser.add_argument("--allow-changed-settings", action="store_true",
                        help="--resume with settings that differ from the run's config.json (recorded there)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    parser.add_argument("--trust-plugins", action="store_true", help=TRUST_HELP)
    return parser


def eval_parser() -> Parser:
    parser = Parser(EvalConfig, "zo-eval", "Evaluate a model, or a zo-tune run, on a task.")
    parser.add_argument("--trust-plugins", action="store_true", help=TRUST_HELP)
    return parser


def _fail(prog: str, err: Exception) -> int:
    print(f"{prog}: error: {err}", file=sys.stderr)
    return 2


def check_config_sealed(run_dir: Path) -> None:
    """Refuse a run's config.json that is not the one its run wrote before its settings are read (a flipped
    bit would read as an unknown setting's value)."""
    if (run_dir / MANIFEST).is_file():
        try:
            check_sealed(run_dir, CONFIG)
        except ValueError as err:
            raise UsageError(f"--resume: {err}") from None


def tune_main(argv: list[str] | None = None) -> int:
    parser = tune_parser()
    try:
        args, given = parser.given(argv)
        if args.config:
            check_code_named(given, args.flagged, args.config, args.trust_plugins)
            folder = Path(args.config).resolve().parent
            if not args.resume and "output_dir" not in args.flagged and given.get("output_dir") and (
                    Path(given["output_dir"]).resolve() == folder):
                raise UsageError(f"--config {args.config} is the config of the run in {given['output_dir']}, which it "
                                 "names as its run folder: pass --output-dir NEW_FOLDER to rerun its settings there "
                                 "(or --output-dir ... --resume to continue that run)")
        config = TuneConfig(**given)
        if args.resume:  # the run's own settings, overridden by those given
            run_dir = Path(resolve(config)[0].output_dir)
            if (run_dir / "config.json").is_file():  # (not its device: the machine may be another)
                check_config_sealed(run_dir)
                saved = read_config(TuneConfig, run_dir / "config.json")
                check_code_named(saved, args.flagged, run_dir / "config.json", args.trust_plugins)
                config = TuneConfig.load(run_dir / "config.json", **{"device": None, **given})
        with sigterm_as_interrupt():
            tune(config, resume=args.resume, overwrite=args.overwrite,
                 allow_changed_settings=args.allow_changed_settings)
    except (ValueError, FileNotFoundError) as err:  # UsageError and the library's own input errors
        return _fail(parser.prog, err)
    except (UserCodeExit, FloatingPointError, ConnectionError) as err:  # not bad input: a reward or plugin called
        print(f"{parser.prog}: error: {err}", file=sys.stderr)  # sys.exit, a NaN/inf loss (the checkpoint kept),
        return 1  # no network for --data-source hub
    except OSError as err:  # a full disk, a read-only folder: the files written so far are whole
        print(f"{parser.prog}: error: {_os_error(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (Stopped): one line, the conventional exit status
        if argv is None:  # the command (not a call from Python): it ends now, so a second Ctrl-C a few ms later
            for sig in (signal.SIGINT, signal.SIGTERM):  # must not raise in the interpreter's shutdown
                signal.signal(sig, signal.SIG_IGN)
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"{parser.prog}: {err if isinstance(err, Stopped) else 'stopped by ' + signal.Signals(signum).name}",
              file=sys.stderr)
        return 128 + signum
    return 0


def _os_error(err: OSError) -> str:
    """``cannot write PATH: No space left on device`` (the checkpoint, written atomically, stays whole)."""
    where = f" {err.filename}" if err.filename else ""
    return f"cannot write{where}: {err.strerror or err} (the checkpoint stays as last saved; --resume continues it)"


def eval_main(argv: list[str] | None = None) -> int:
    parser = eval_parser()
    try:
        args, given = parser.given(argv)
        if args.config:
            check_code_named(given, args.flagged, args.config, args.trust_plugins)
        if "run" in given:
            check_run_weights(Path(given["run"]))
            tuned = read_config(TuneConfig, Path(given["run"]) / "config.json")
            check_code_named({k: tuned.get(k) for k in RUN_SETTINGS}, args.flagged, Path(given["run"]) / "config.json",
                             args.trust_plugins)
            if given.get("model", tuned.get("model")) != tuned.get("model"):
                raise UsageError(f"--model {given['model']} is not the model of --run {given['run']}: "
                                 f"{tuned.get('model')}")
            if REWARD in (tuned.get("metrics") or []) and "metrics" not in given:
                # a reward run's held-out reward needs its reward functions: it is in the run's eval.json
                where = f"{given['run']} was tuned on rewards (its held-out reward is in its eval.json)"
                if tuned.get("data"):
                    raise UsageError(f"{where}; zo-eval evaluates metrics of tasks with answers, not a file of prompts")
                print(f"zo-eval: {where}; evaluating the task's metric, or those --metric names", file=sys.stderr)
                tuned = {**tuned, "metrics": [m for m in tuned["metrics"] if m != REWARD]}
            given = {**{k: tuned[k] for k in RUN_SETTINGS if k in tuned}, **given}
            if given.get("heldout_fraction"):  # its held-out rows are drawn by the run's seed
                given.setdefault("seed", tuned.get("seed", 0))
        evaluate_run(EvalConfig(**given))
    except (ValueError, FileNotFoundError) as err:
        return _fail(parser.prog, err)
    except (UserCodeExit, ConnectionError) as err:  # a plugin called sys.exit as it was imported; no network
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    return 0


def export_parser() -> Parser:
    parser = Parser(ExportConfig, "zo-export", "Write a zo-tune run's tuned model as a Hugging Face folder: a full "
                                               "model, or a PEFT adapter for --peft lora/prefix runs, with the task "
                                               "(task.json) and a model card (README.md).")
    parser.add_argument("run_dir", help="a zo-tune run folder (a stopped run: its checkpoint's step)")
    parser.add_argument("out_dir", help="the folder to write (new or empty)")
    return parser


def export_main(argv: list[str] | None = None) -> int:
    parser = export_parser()
    try:
        args, given = parser.given(argv)
        config = ExportConfig(**given)
        with sigterm_as_interrupt():  # a stop removes the export's temporary folder
            out = export_run(args.run_dir, args.out_dir, merge=config.merge, best=config.best)
    except (ValueError, FileNotFoundError) as err:
        return _fail(parser.prog, err)
    except OSError as err:  # a full disk, a read-only folder: nothing is left behind
        where = f"{err.filename}: " if err.filename else ""
        return _fail(parser.prog, f"cannot write {args.out_dir}: {where}{err.strerror or err} (nothing was written)")
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"{parser.prog}: stopped by {signal.Signals(signum).name}; {args.out_dir} was not written",
              file=sys.stderr)
        return 128 + signum
    print(f"zo-export: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(tune_main())
