"""Command line: ``zo-tune`` (tune a model on a task's objective) and ``zo-eval`` (evaluate a model or run).

Bad input (unknown model, task, objective or plugin, a data file without the needed columns, a multi-token
label word) prints one line naming the problem and the accepted values, and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from metrics import get_metric, list_metrics
from tasks import Task, get_task, list_tasks, task_from_file, with_demonstrations
from zo_objectives import distributed
from zo_objectives.models import DEFAULT_MODEL, apply_peft, load_model, load_run_weights, select_trainable
from zo_objectives.objectives import (
    CROSS_ENTROPY,
    DEFAULT_SMOOTHING,
    FORMS,
    SEQUENCE_SCORES,
    SUPPORTS,
    MetricObjective,
    make_objective,
)
from zo_objectives.optimizer import SCHEDULES, UPDATES, MeZO, make_scheduler
from zo_objectives.plots import plot_run
from zo_objectives.scoring import predictor_for
from zo_objectives.train import CHECKPOINT, evaluate_model, resume, save_weights, train, write_json

# Defaults chosen from measurements on SmolLM2-135M / SST-2 (see README "Why these defaults").
# A metric in log form has cross-entropy's scale; the expected metric itself ("mean" form) is flatter.
# sign and normalized updates move ~lr * z per step whatever the loss: 1e-4 is about the median step of the
# default SST-2 run (cross-entropy at 1e-5: 7.8e-5)
DEFAULT_LR = {"cross_entropy": 1e-5, "log": 1e-5, "mean": 1e-4, "scale-free": 1e-4}


class UsageError(ValueError):
    """Bad command-line input: reported in one line, exit code 2."""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"'{DEFAULT_MODEL}' (shipped), 'tiny-random', a local folder or a hub id")
    parser.add_argument("--task", default="sst2", help="a registered task: " + ", ".join(list_tasks()))
    parser.add_argument("--data", help="a CSV/TSV/JSONL file for a custom task (with --template)")
    parser.add_argument("--dev-data", help="the custom task's evaluation file (default: --data)")
    parser.add_argument("--template", help="custom task prompt, a format string over columns, e.g. '{text} It was'")
    parser.add_argument("--label-words", nargs="+", help="custom classification task: one word per label id")
    parser.add_argument("--labels", nargs="+", help="custom task: the label values (strings) in --label-words order")
    parser.add_argument("--answer-column", help="custom generation task: the column of gold answers")
    parser.add_argument("--plugin", action="append", default=[],
                        help="a module to import first; it may register metrics or tasks (repeatable)")
    parser.add_argument("--eval-size", type=int, default=None, help="dev examples to evaluate on (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=None, help="truncate prompts from the left to this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")


def _positive(name: str, value: float | int | None) -> None:
    if value is not None and value <= 0:
        raise UsageError(f"--{name} must be > 0, got {value}")


def _fmt(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.4f}"


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


def _load_plugins(modules: list[str]) -> None:
    sys.path.insert(0, str(Path.cwd()))
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UsageError(f"cannot import plugin {module!r}: {err}") from err


def _task(args: argparse.Namespace) -> Task:
    if args.data:
        if not args.template:
            raise UsageError("--data needs --template (a format string over the file's columns)")
        return task_from_file(args.data, name=Path(args.data).stem, template=args.template,
                              label_words=args.label_words, labels=args.labels, answer_column=args.answer_column,
                              dev_path=args.dev_data)
    return get_task(args.task)


def tune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zo-tune", description="Tune a causal LM on any objective with MeZO.")
    _common(p)
    p.add_argument("--objective", default=None,
                   help=f"'{CROSS_ENTROPY}' or a registered metric ({', '.join(list_metrics())}); default: the "
                        "task's metric")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=None,
                   help=f"default {DEFAULT_LR['cross_entropy']} for cross-entropy and metric objectives in log form, "
                        f"{DEFAULT_LR['mean']} in mean form or as the hard metric, {DEFAULT_LR['scale-free']} with "
                        "--update sign or normalized")
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--n-perturbations", type=int, default=1)
    p.add_argument("--temperature", type=float, default=None,
                   help="metric objectives optimize the metric's expectation over each example's options (classes, "
                        "candidates; for generation the greedy answer and the gold answers) drawn from "
                        f"softmax(log-likelihood / T) (default {DEFAULT_SMOOTHING}; 0 = the hard metric)")
    p.add_argument("--metric-form", choices=FORMS, default="auto",
                   help="log: mean log of each example's expected metric (auto for per-example metrics); mean: the "
                        "expected metric itself (auto for corpus metrics such as macro-F1)")
    p.add_argument("--sequence-score", choices=SEQUENCE_SCORES, default="sum",
                   help="generated answer candidates are scored by their total log-likelihood (default) or its "
                        "mean per token")
    p.add_argument("--metric-support", choices=SUPPORTS, default="auto",
                   help="how the options are weighed: options = softmax over them; model = for generation, their "
                        "probability under the model, every other answer scoring 0 (auto: model for generation "
                        "metrics in log form, else options)")
    p.add_argument("--samples", type=int, default=256,
                   help="Monte Carlo draws for that expectation when the metric is not a per-example mean")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", choices=SCHEDULES, default="constant")
    p.add_argument("--noise", choices=("table", "gaussian", "rademacher"), default="table")
    p.add_argument("--difference", choices=("central", "forward"), default="central")
    p.add_argument("--update", choices=UPDATES, default="sgd",
                   help="sgd, sign, or normalized: g over the running RMS of g (one lr for any loss scale)")
    p.add_argument("--fitness-shaping", choices=("none", "rank"), default="none",
                   help="rank: replace each step's losses by centered ranks (evolution strategies)")
    p.add_argument("--momentum", type=float, default=0.0, help="momentum rebuilt from past seeds (no buffer)")
    p.add_argument("--momentum-window", type=int, default=0, help="past steps the momentum regenerates")
    p.add_argument("--peft", choices=("none", "lora", "prefix"), default="none")
    p.add_argument("--trainable", default=None, help="regex: only parameters whose name matches are tuned")
    p.add_argument("--train-size", type=int, default=1000, help="training sample size (MeZO: 1000)")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--no-eval-before", action="store_true",
                   help="skip the zero-shot evaluation (e.g. when zo-eval already measured it)")
    p.add_argument("--output-dir", default=None, help="run folder (default runs/<task>-<objective>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its trajectory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--no-progress", action="store_true")
    return p


def tune(args: argparse.Namespace) -> dict:
    for name in ("steps", "batch_size", "lr", "eps", "train_size", "eval_size", "n_perturbations", "samples"):
        _positive(name.replace("_", "-"), getattr(args, name))
    _load_plugins(args.plugin)
    rank, world = distributed.init()  # distributed: (0, 1) unless torchrun set WORLD_SIZE > 1
    main = rank == 0  # distributed: only rank 0 checks and writes the run folder, prints, shows progress
    distributed.quiet()  # distributed: silences warnings on ranks other than 0
    task = _task(args)
    objective_name = args.objective or task.metric
    if objective_name != CROSS_ENTROPY and objective_name not in list_metrics():
        raise UsageError(f"unknown objective {objective_name!r}; available: "
                         f"{', '.join([CROSS_ENTROPY, *list_metrics()])}")
    run_dir = Path(args.output_dir or f"runs/{task.name}-{objective_name}-s{args.seed}")
    if main and run_dir.exists() and any(run_dir.iterdir()) and not (args.resume or args.overwrite):
        raise UsageError(f"run folder {run_dir} exists; pass --resume to continue it, --overwrite to replace it, "
                         "or another --output-dir")
    if args.resume and not (run_dir / CHECKPOINT).exists():
        raise UsageError(f"--resume: no {CHECKPOINT} in {run_dir}")
    if main and args.overwrite and not args.resume:
        for stale in ("metrics.jsonl", CHECKPOINT, "eval.json"):
            (run_dir / stale).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, dtype={"fp32": torch.float32, "bf16": torch.bfloat16,
                                                     "fp16": torch.float16}[args.dtype])
    model = apply_peft(model, args.peft).to(_device(args.device))
    select_trainable(model, args.trainable)
    predictor = predictor_for(task, tokenizer, max_length=args.max_length)
    objective = make_objective(objective_name, predictor, smoothing=args.temperature, samples=args.samples,
                               form=args.metric_form, sequence_score=args.sequence_score, support=args.metric_support)
    is_metric = isinstance(objective, MetricObjective)
    temperature = objective.smoothing if is_metric else None
    form = objective.form if is_metric and temperature else None
    support = objective.support if form else None
    if world > 1:  # distributed: each rank scores batch[rank::world]; the losses are all-reduced
        objective = distributed.ShardedObjective(objective)
    kind = "scale-free" if args.update != "sgd" else form or ("mean" if is_metric else "cross_entropy")
    lr = args.lr or DEFAULT_LR[kind]

    train_set = task.examples("train", n=args.train_size, seed=args.seed)
    dev_set = task.examples("dev", n=args.eval_size)
    metric = get_metric(task.metric)
    params = [p for p in model.parameters() if p.requires_grad]
    settings = dict(lr=lr, eps=args.eps, weight_decay=args.weight_decay, n_perturbations=args.n_perturbations,
                    seed=args.seed, noise=args.noise, difference=args.difference, update=args.update,
                    fitness_shaping=args.fitness_shaping, momentum=args.momentum,
                    momentum_window=args.momentum_window)
    config = {**vars(args), "task": task.name, "objective": objective_name, "temperature": temperature, "form": form,
              "support": support, "lr": lr, "optimizer": settings, "train_examples": len(train_set),
              "eval_examples": len(dev_set), "metric": metric.name,
              "trainable_parameters": sum(p.numel() for p in params), "world_size": world}
    if main:
        write_json(run_dir / "config.json", config)

    def dev_metric() -> float:
        if world > 1:  # distributed: verify the ranks' weights agree, split the dev set across ranks
            distributed.check_in_sync(params)
            return distributed.evaluate_model(model, predictor, dev_set, metric, args.batch_size)
        return evaluate_model(model, predictor, dev_set, metric, args.batch_size)

    start = 0
    if args.resume:
        optimizer, start = resume(run_dir, params)
        before = json.loads((run_dir / "eval.json").read_text()).get("before")
    else:
        optimizer = MeZO(params, **settings)
        before = None if args.no_eval_before else dev_metric()
        if main:
            write_json(run_dir / "eval.json", {"metric": metric.name, "examples": len(dev_set), "before": before})
    scheduler = make_scheduler(optimizer, args.schedule, args.steps, last_step=start)
    if main:
        print(f"zo-tune: {task.name}, objective {objective_name}, {config['trainable_parameters']:,} trainable "
              f"parameters, dev {metric.name} before: {_fmt(before)}", file=sys.stderr)
    t0 = time.perf_counter()
    history = train(model, optimizer, objective, train_set, steps=args.steps, batch_size=args.batch_size,
                    seed=args.seed, start_step=start, evaluate_fn=dev_metric, eval_every=args.eval_every,
                    run_dir=run_dir if main else None, scheduler=scheduler, progress=main and not args.no_progress)
    after = history[-1]["eval"] if history and "eval" in history[-1] else dev_metric()
    seconds = time.perf_counter() - t0
    ties = sum(r["tied"] for r in history) / max(1, len(history))
    summary = {"metric": metric.name, "examples": len(dev_set), "before": before, "after": after,
               "steps": args.steps, "train_seconds": seconds, "tied_fraction": ties}
    if not main:  # distributed: rank 0 writes the results
        return summary
    write_json(run_dir / "eval.json", summary)
    save_weights(model, run_dir / "model.safetensors")
    plot_run(run_dir)
    print(f"zo-tune: dev {metric.name} {_fmt(before)} -> {after:.4f} after {args.steps} steps "
          f"({seconds / 60:.1f} min, {ties:.0%} of steps tied). Run folder: {run_dir} (config.json, "
          f"metrics.jsonl, eval.json, curve.png, {CHECKPOINT}, model.safetensors)", file=sys.stderr)
    return summary


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zo-eval", description="Evaluate a model, or a zo-tune run, on a task.")
    _common(p)
    p.add_argument("--run", help="a zo-tune run folder: evaluate its tuned weights")
    p.add_argument("--shots", type=int, default=0, help="in-context demonstrations drawn from the train split")
    p.add_argument("--metric", default=None, help="default: the task's metric")
    p.add_argument("--split", choices=("dev", "validation"), default="dev")
    return p


def evaluate_cli(args: argparse.Namespace) -> dict:
    _positive("eval-size", args.eval_size)
    if args.shots < 0:
        raise UsageError(f"--shots must be >= 0, got {args.shots}")
    _load_plugins(args.plugin)
    task = _task(args)
    metric = get_metric(args.metric or task.metric)
    model_name = args.model
    if args.run:
        config = json.loads((Path(args.run) / "config.json").read_text())
        model_name = config["model"]
    model, tokenizer = load_model(model_name)
    model.to(_device(args.device))
    if args.run:
        model = apply_peft(model, config.get("peft", "none"))
        load_run_weights(model, Path(args.run))
    examples = task.examples(args.split, n=args.eval_size, seed=args.seed)
    if args.shots:
        demos = task.examples("train", n=args.shots, seed=args.seed)
        examples = with_demonstrations(examples, demos)
    predictor = predictor_for(task, tokenizer, max_length=args.max_length)
    value = evaluate_model(model, predictor, examples, metric, args.batch_size)
    result = {"model": model_name, "run": args.run, "task": task.name, "split": args.split, "shots": args.shots,
              "metric": metric.name, "examples": len(examples), "value": value}
    print(json.dumps(result))
    return result


def _main(parser: argparse.ArgumentParser, run, argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as err:  # UsageError and the library's own input errors
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


def tune_main(argv: list[str] | None = None) -> int:
    return _main(tune_parser(), tune, argv)


def eval_main(argv: list[str] | None = None) -> int:
    return _main(eval_parser(), evaluate_cli, argv)


if __name__ == "__main__":
    sys.exit(tune_main())
