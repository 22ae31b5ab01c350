"""Command line: ``zo-tune`` (tune a model on a task's objective) and ``zo-eval`` (evaluate a model or run).

Both take their flags from the dataclasses of ``zo_objectives.config``; ``tune(TuneConfig(...))`` is the same
run from Python. Everything is checked before the run folder is touched: bad input (unknown model, task,
objective, plugin or reward, a bad number, a data file without the needed columns, a resume with changed
settings) prints one line naming the problem and the accepted values, and exits with code 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from metrics import Metric, get_metric, list_metrics
from tasks import Task, get_task, task_from_file, with_demonstrations
from zo_objectives import distributed
from zo_objectives.config import (
    DEFAULT_DTYPE,
    DEFAULT_EPS,
    DEFAULT_LR,
    REWARD,
    CommonConfig,
    EvalConfig,
    Parser,
    TuneConfig,
    UsageError,
    describe,
    differences,
    read_config,
)
from zo_objectives.models import apply_peft, load_model, load_run_weights, select_trainable
from zo_objectives.objectives import CROSS_ENTROPY, MetricObjective, RewardObjective, make_objective
from zo_objectives.optimizer import MeZO, make_scheduler
from zo_objectives.plots import plot_run
from zo_objectives.scoring import predictor_for
from zo_objectives.train import CHECKPOINT, evaluate_model, save_weights, train, write_json
from zo_objectives.train import resume as replay_checkpoint


def _fmt(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.4f}"


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
    except (ImportError, SyntaxError) as err:
        raise UsageError(f"cannot import {flag} {source!r}: {err}") from err


def reward_functions(specs: list[str]) -> list[Callable]:
    """The reward functions named ``module:function`` (or ``file.py:function``)."""
    out = []
    for spec in specs:
        source, _, name = spec.rpartition(":")
        fn = getattr(import_source(source, "--reward"), name, None)
        if not callable(fn):
            raise UsageError(f"--reward {spec!r}: {source} has no function {name!r}")
        out.append(fn)
    return out


def _task(config: CommonConfig) -> Task:
    for flag, path in (("--data", config.data), ("--dev-data", config.dev_data)):
        if path and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file")
    if config.data:
        return task_from_file(config.data, name=Path(config.data).stem, template=config.template,
                              label_words=config.label_words, labels=config.labels, label_column=config.label_column,
                              answer_column=config.answer_column, dev_path=config.dev_data)
    return get_task(config.task)


def _dtype(name: str, device: torch.device) -> str:
    """The dtype a run uses: ``auto`` resolves by device type (``DEFAULT_DTYPE``)."""
    return DEFAULT_DTYPE[device.type] if name == "auto" else name


def _device(name: str | None) -> torch.device:
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
    objective = REWARD if config.reward else config.objective or task.metric
    if objective not in (REWARD, CROSS_ENTROPY, *list_metrics()):
        raise UsageError(f"unknown objective {objective!r}; available: {', '.join([CROSS_ENTROPY, *list_metrics()])}")
    output_dir = config.output_dir or f"runs/{task.name}-{objective}-s{config.seed}"
    return replace(config, task=task.name, objective=objective, output_dir=output_dir), task


@dataclass
class Run:
    """A tune run ready to start: its settings resolved, model loaded, data drawn."""

    config: TuneConfig
    model: torch.nn.Module
    predictor: Any
    objective: Any
    metric: Metric
    train_set: list[dict]
    dev_set: list[dict]
    facts: dict  # what config.json holds beside the settings


def prepare(config: TuneConfig, task: Task, device: torch.device) -> Run:
    """Load the model and build the objective; resolve lr, eps, smoothing and dtype. Nothing is written."""
    config = replace(config, dtype=_dtype(config.dtype, device))
    torch.manual_seed(config.seed)
    model, tokenizer = load_model(config.model, dtype=config.dtype)
    model = apply_peft(model, config.peft).to(device)
    try:
        select_trainable(model, config.trainable)
    except re.error as err:
        raise UsageError(f"--trainable {config.trainable!r} is not a regular expression: {err}") from err
    predictor = predictor_for(task, tokenizer, max_length=config.max_length, model=model)
    if config.reward:
        generator = predictor_for(task, tokenizer, max_length=config.max_length,
                                  temperature=config.sample_temperature)
        if not hasattr(generator, "generate"):
            raise UsageError(f"--reward needs a generation task (such as squad); {task.name} is {task.kind}")
        objective = RewardObjective(generator, reward_functions(config.reward), config.reward_weights,
                                    candidates=config.reward_candidates)
        ex = task.examples("train", n=1, seed=config.seed)[0]  # a reward that fails fails now, on a gold answer
        objective.scores([ex["prompt"]], [ex["target"].strip()], {k: [v] for k, v in ex.items() if k != "prompt"})
    else:
        objective = make_objective(config.objective, predictor, smoothing=config.smoothing, samples=config.samples,
                                   form=config.metric_form, sequence_score=config.sequence_score,
                                   support=config.metric_support)
    metric_objective = isinstance(objective, MetricObjective)
    if config.smoothing is not None and not metric_objective:
        raise UsageError(f"--smoothing applies to metric objectives, not to {config.objective}")
    smoothing = objective.smoothing if metric_objective else None
    form = objective.form if metric_objective and smoothing else None
    if config.update != "sgd":
        kind = "scale-free"
    else:  # a hard metric or rewards: the scale of the mean form
        kind = "cross_entropy" if config.objective == CROSS_ENTROPY else form or "mean"
    config = replace(config, lr=config.lr or DEFAULT_LR[kind], eps=config.eps or DEFAULT_EPS[config.dtype],
                     smoothing=smoothing)
    train_set = task.examples("train", n=config.train_size, seed=config.seed)
    dev_set = task.examples("dev", n=config.eval_size)
    if config.batch_size > len(train_set):
        raise UsageError(f"--batch-size {config.batch_size} is larger than the {len(train_set)} training examples of "
                         f"{task.name}; use --batch-size {len(train_set)} or less")
    metric = get_metric(task.metric)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    facts = {"form": form, "support": objective.support if form else None, "metric": metric.name,
             "train_examples": len(train_set), "eval_examples": len(dev_set), "trainable_parameters": trainable,
             "world_size": distributed.world_size()}
    return Run(config, model, predictor, objective, metric, train_set, dev_set, facts)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run folder that is a file, exists without --resume or --overwrite, or has nothing to resume."""
    for path in (run_dir, *run_dir.parents):
        if path.exists() and not path.is_dir():
            raise UsageError(f"--output-dir {run_dir}: {path} is a file, not a folder")
    if resume:
        for name in (CHECKPOINT, "config.json", "eval.json"):
            if not (run_dir / name).is_file():
                raise UsageError(f"--resume: no {name} in {run_dir}")
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise UsageError(f"run folder {run_dir} exists; pass --resume to continue it, --overwrite to replace it, "
                         "or another --output-dir")


def check_resume(run_dir: Path, config: TuneConfig, allow_changed_settings: bool) -> list[dict]:
    """Refuse settings that differ from the run's config.json unless they may; return the run's record of
    changed settings ("resumed" in config.json), with this resume's changes added."""
    saved = json.loads((run_dir / "config.json").read_text())
    allowed, fixed = differences(read_config(TuneConfig, run_dir / "config.json"), config)
    if fixed:
        raise UsageError(f"--resume: {describe(fixed)}: cannot change on a resume of {run_dir} (the checkpoint "
                         "replays the run with its settings); use another --output-dir")
    if allowed and not allow_changed_settings:
        raise UsageError(f"--resume: settings differ from {run_dir / 'config.json'}: {describe(allowed)}; pass "
                         "--allow-changed-settings to continue with the new ones")
    step = json.loads((run_dir / CHECKPOINT).read_text())["step"]
    return saved.get("resumed", []) + ([{"step": step, "changed": allowed}] if allowed else [])


MEZO_SETTINGS = ("lr", "eps", "weight_decay", "n_perturbations", "seed", "noise", "difference", "update",
                 "fitness_shaping", "momentum", "momentum_window", "on_nonfinite")


def tune(config: TuneConfig, *, resume: bool = False, overwrite: bool = False,
         allow_changed_settings: bool = False) -> dict:
    """Tune a model as ``config`` says, in its run folder; return the summary that eval.json holds.

    ``resume`` continues the run folder from its checkpoint, with the settings of its config.json:
    ``steps`` (to extend it) and the other settings marked free in TuneConfig may differ, those marked fixed
    (the model's, the data's, the optimizer's) may not, and any other difference needs
    ``allow_changed_settings`` (config.json then records it under "resumed"). ``overwrite`` replaces an
    existing run folder.
    """
    rank, world = distributed.init()  # distributed: (0, 1) unless torchrun set WORLD_SIZE > 1
    main = rank == 0  # distributed: only rank 0 checks and writes the run folder, prints, shows progress
    distributed.quiet()  # distributed: silences warnings on ranks other than 0
    config, task = resolve(config)
    run_dir = Path(config.output_dir)
    if main:
        check_run_dir(run_dir, resume, overwrite)
    run = prepare(config, task, _device(config.device))
    config, model, metric, dev_set = run.config, run.model, run.metric, run.dev_set
    resumed = check_resume(run_dir, config, allow_changed_settings) if resume and main else []
    params = [p for p in model.parameters() if p.requires_grad]
    objective = distributed.ShardedObjective(run.objective) if world > 1 else run.objective  # batch[rank::world]

    def dev_metric() -> float:
        if world > 1:  # distributed: verify the ranks' weights agree, split the dev set across ranks
            distributed.check_in_sync(params)
            return distributed.evaluate_model(model, run.predictor, dev_set, metric, config.batch_size)
        return evaluate_model(model, run.predictor, dev_set, metric, config.batch_size)

    start, before = 0, None
    if resume:
        optimizer, start = replay_checkpoint(run_dir, params)
        optimizer.on_nonfinite = config.on_nonfinite
        for group in optimizer.param_groups:  # the lr of the steps to come (the trajectory keeps each step's)
            group.update(lr=config.lr, initial_lr=config.lr)
        before = json.loads((run_dir / "eval.json").read_text()).get("before")
    else:
        optimizer = MeZO(params, **{name: getattr(config, name) for name in MEZO_SETTINGS})
    scheduler = make_scheduler(optimizer, config.schedule, config.steps, last_step=start)
    if main:  # every check passed: from here on the run folder is written
        if overwrite and not resume:
            for stale in ("metrics.jsonl", CHECKPOINT, "eval.json"):
                (run_dir / stale).unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", {**asdict(config), **run.facts, "optimizer": optimizer.config(),
                                             **({"resumed": resumed} if resumed else {})})
    if not resume:
        if config.eval_before and main:
            print(f"zo-tune: evaluating {config.model} on {len(dev_set)} {task.name} dev examples before tuning "
                  "(--no-eval-before skips it)", file=sys.stderr)
        before = dev_metric() if config.eval_before else None
        if main:
            write_json(run_dir / "eval.json", {"metric": metric.name, "examples": len(dev_set), "before": before})
    if main:
        print(f"zo-tune: {task.name}, objective {config.objective}, {run.facts['trainable_parameters']:,} trainable "
              f"parameters, dev {metric.name} before: {_fmt(before)}", file=sys.stderr)
    t0 = time.perf_counter()
    history = train(model, optimizer, objective, run.train_set, steps=config.steps, batch_size=config.batch_size,
                    seed=config.seed, start_step=start, evaluate_fn=dev_metric, eval_every=config.eval_every,
                    run_dir=run_dir if main else None, scheduler=scheduler, progress=main and config.progress,
                    checkpoint_every=config.checkpoint_every)
    after = history[-1]["eval"] if history and "eval" in history[-1] else dev_metric()
    seconds = time.perf_counter() - t0
    ties = sum(r["tied"] for r in history) / max(1, len(history))
    summary = {"metric": metric.name, "examples": len(dev_set), "before": before, "after": after,
               "steps": config.steps, "train_seconds": seconds, "tied_fraction": ties}
    if main:  # distributed: rank 0 writes the results
        write_json(run_dir / "eval.json", summary)
        save_weights(model, run_dir / "model.safetensors")
        plot_run(run_dir)
        print(f"zo-tune: dev {metric.name} {_fmt(before)} -> {after:.4f} after {config.steps} steps "
              f"({seconds / 60:.1f} min, {ties:.0%} of steps tied). Run folder: {run_dir} (config.json, "
              f"metrics.jsonl, eval.json, curve.png, {CHECKPOINT}, model.safetensors)", file=sys.stderr)
    return summary


def evaluate_run(config: EvalConfig) -> dict:
    """Evaluate ``config.model`` (or the tuned weights of ``config.run``) on the task; print and return the result."""
    for plugin in config.plugin:
        import_source(plugin, "--plugin")
    task = _task(config)
    metric = get_metric(config.metric or task.metric)
    device = _device(config.device)
    examples = task.examples(config.split, n=config.eval_size, seed=config.seed)
    if config.shots:
        examples = with_demonstrations(examples, task.examples("train", n=config.shots, seed=config.seed))
    model, tokenizer = load_model(config.model, dtype=_dtype(config.dtype, device))
    if config.run:
        model = apply_peft(model, read_config(TuneConfig, Path(config.run) / "config.json").get("peft", "none"))
        load_run_weights(model, Path(config.run))
    model.to(device)
    predictor = predictor_for(task, tokenizer, max_length=config.max_length, model=model)
    value = evaluate_model(model, predictor, examples, metric, config.batch_size)
    result = {"model": config.model, "run": config.run, "task": task.name, "split": config.split,
              "shots": config.shots, "metric": metric.name, "examples": len(examples), "value": value}
    print(json.dumps(result))
    return result


# The settings a zo-eval --run takes from the run's config.json unless given
RUN_SETTINGS = ("model", "task", "data", "dev_data", "template", "label_words", "labels", "label_column",
                "answer_column", "plugin", "max_length", "dtype")


def tune_parser() -> Parser:
    parser = Parser(TuneConfig, "zo-tune", "Tune a causal LM on any objective with MeZO.")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint, "
                                                              "with its config.json's settings")
    parser.add_argument("--allow-changed-settings", action="store_true",
                        help="--resume with settings that differ from the run's config.json (recorded there)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    return parser


def eval_parser() -> Parser:
    return Parser(EvalConfig, "zo-eval", "Evaluate a model, or a zo-tune run, on a task.")


def _fail(prog: str, err: Exception) -> int:
    print(f"{prog}: error: {err}", file=sys.stderr)
    return 2


def tune_main(argv: list[str] | None = None) -> int:
    parser = tune_parser()
    try:
        args, given = parser.given(argv)
        config = TuneConfig(**given)
        if args.resume:  # the run's own settings, overridden by those given
            run_dir = Path(resolve(config)[0].output_dir)
            if (run_dir / "config.json").is_file():  # (not its device: the machine may be another)
                config = TuneConfig.load(run_dir / "config.json", **{"device": None, **given})
        tune(config, resume=args.resume, overwrite=args.overwrite,
             allow_changed_settings=args.allow_changed_settings)
    except (ValueError, FileNotFoundError) as err:  # UsageError and the library's own input errors
        return _fail(parser.prog, err)
    except FloatingPointError as err:  # a NaN/inf loss: not bad input, the run stops (its checkpoint kept)
        print(f"{parser.prog}: error: {err} (--on-nonfinite skip skips them)", file=sys.stderr)
        return 1
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    parser = eval_parser()
    try:
        _, given = parser.given(argv)
        if "run" in given:
            tuned = read_config(TuneConfig, Path(given["run"]) / "config.json")
            if given.get("model", tuned.get("model")) != tuned.get("model"):
                raise UsageError(f"--model {given['model']} is not the model of --run {given['run']}: "
                                 f"{tuned.get('model')}")
            given = {**{k: tuned[k] for k in RUN_SETTINGS if k in tuned}, **given}
        evaluate_run(EvalConfig(**given))
    except (ValueError, FileNotFoundError) as err:
        return _fail(parser.prog, err)
    return 0


if __name__ == "__main__":
    sys.exit(tune_main())
