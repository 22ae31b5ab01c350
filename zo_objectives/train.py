"""The training loop: batches, steps, metrics.jsonl, evaluations and checkpoints at their times.

Each step asks the estimator to score the objective on a batch and update; the loop logs the step's row, and
checkpoints (:mod:`zo_objectives.checkpoint`) every ``checkpoint_every`` steps, at evaluations and when stopped.
Every file is written to a temporary name and renamed into place, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.optim import Optimizer
from tqdm.auto import tqdm

from zo_objectives.checkpoint import base_checksum, save_checkpoint
from zo_objectives.estimators import Estimator
from zo_objectives.objectives import Objective, PerExampleObjective, PopulationObjective
from zo_objectives.runfolder import LOG, clean, lock, truncate_log

SCHEDULES = ("constant", "linear", "cosine")


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of step ``step``'s batch: epochs of seeded shuffles, a pure function of (seed, step)."""
    if n <= 0 or batch_size <= 0:
        raise ValueError(f"need examples and a positive batch size, got {n} examples, batch size {batch_size}")
    out: list[int] = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out += order[offset: offset + batch_size - len(out)]
    return out


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal (``signum``): KeyboardInterrupt, as Ctrl-C raises, with which signal."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (``kill``, job schedulers, container stops) into :class:`Stopped`, a KeyboardInterrupt as
    Ctrl-C raises, so a run stops cleanly and saves its checkpoint. Only the main thread can set signal
    handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise Stopped(f"stopped by signal {signal.Signals(signum).name}", signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:  # None: a handler set outside Python, which cannot be put back; the default is the closest
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def train(model: torch.nn.Module, optimizer: Estimator, objective: Objective, examples: Sequence[dict], *,
          steps: int, batch_size: int = 16, seed: int = 0, start_step: int | None = None,
          evaluate_fn: Callable[[], float | dict[str, float]] | None = None, eval_every: int = 0,
          run_dir: Path | None = None, checkpoint_every: int = 1, scheduler: Any = None, progress: bool = True,
          callbacks: Sequence[Callable[[dict], None]] = ()) -> list[dict]:
    """Run estimator steps ``start_step..steps-1``; log each to ``run_dir/metrics.jsonl`` and checkpoint every
    ``checkpoint_every`` steps (0: only at evaluations), at evaluations and when stopped.

    ``steps`` is the total to reach; ``start_step`` (default: the steps the optimizer has taken, so a second
    call continues where the first ended) must be the optimizer's. The loss of a step is the mean objective
    over its perturbed evaluations: what MeZO minimizes, logged as ``"loss"`` (lower is better). Beside it each
    row holds the objective's own values (its ``last_values``), named ``train/<name>``, in their own units and
    direction, averaged over the step's evaluations: ``"train/accuracy"`` the batch's expected accuracy (higher
    is better), ``"train/cross_entropy"``, ``"train/reward"``; under torchrun they are rank 0's share of the
    batch, the loss the whole batch's. A step "ties" when both sides of its estimate scored the same (no signal:
    the weights do not move).
    SIGTERM stops a run as Ctrl-C does (:class:`Stopped`, a KeyboardInterrupt, after saving the checkpoint).
    With ``run_dir`` the run holds the folder's lock; a row is logged before its step is checkpointed, and rows
    past ``start_step`` are dropped first, so metrics.jsonl matches the checkpoint after any kill; a new run
    (``start_step`` 0) refuses a folder that holds a checkpoint. ``evaluate_fn`` returns the evaluation metric,
    or several by name (the first logged as ``"eval"``, each as ``"eval/<name>"``). Each of ``callbacks`` is
    called with each row once it is logged (to log elsewhere: a tracker, a sample of completions). With a
    batched estimator (one whose ``members`` is set, e.g. a Population) the objective is wrapped in a
    PopulationObjective (one loss per member) unless it has no predictor: it must then return one loss per member
    itself.
    """
    if not (isinstance(checkpoint_every, int) and checkpoint_every >= 0):
        raise ValueError(f"checkpoint_every must be an int >= 0 (0: only at evaluations), got {checkpoint_every!r}")
    splittable = any(hasattr(objective, f) for f in ("predictor", "generator", "terms"))  # else: per member already
    per_example = getattr(optimizer, "per_example", False)  # GRZO: each example scored under its own pair
    if per_example and batch_size != optimizer.batch_size:
        raise ValueError(f"{type(optimizer).__name__} draws one direction per example of its batch_size "
                         f"{optimizer.batch_size}: train with batch_size={optimizer.batch_size}, got {batch_size}")
    if per_example and splittable and not isinstance(objective, PerExampleObjective):
        objective = PerExampleObjective(objective)  # two losses per example, one pass
    elif optimizer.members and splittable and not isinstance(objective, PopulationObjective):
        objective = PopulationObjective(objective, lambda: optimizer.members)  # one loss per member, one pass
    start_step = len(optimizer.trajectory) if start_step is None else start_step
    if len(optimizer.trajectory) != start_step:
        raise ValueError(f"start_step {start_step} does not match the optimizer's {len(optimizer.trajectory)} "
                         "trajectory records: resume a run folder with resume()")
    if steps < start_step:
        raise ValueError(f"steps {steps} is below start_step {start_step}: steps is the total to reach")
    with ExitStack() as held:
        if run_dir:
            held.enter_context(lock(Path(run_dir)))
        return _train(model, optimizer, objective, examples, steps=steps, batch_size=batch_size, seed=seed,
                      start_step=start_step, evaluate_fn=evaluate_fn, eval_every=eval_every, run_dir=run_dir,
                      checkpoint_every=checkpoint_every, scheduler=scheduler, progress=progress,
                      callbacks=callbacks)


def _train(model: torch.nn.Module, optimizer: Estimator, objective: Objective, examples: Sequence[dict], *,
           steps: int, batch_size: int, seed: int, start_step: int, evaluate_fn: Callable[[], float] | None,
           eval_every: int, run_dir: Path | None, checkpoint_every: int, scheduler: Any,
           progress: bool, callbacks: Sequence[Callable[[dict], None]] = ()) -> list[dict]:
    history: list[dict] = []
    log, base, saved_step = None, "", start_step
    if run_dir:
        clean(Path(run_dir))  # temporaries a killed run left
        base = base_checksum(Path(run_dir), optimizer, start_step)
        truncate_log(Path(run_dir) / LOG, start_step)
        log = open(Path(run_dir) / LOG, "a")
    bar = tqdm(range(start_step, steps), desc="zo-tune", disable=not progress, dynamic_ncols=True)
    began = time.perf_counter()
    try:
        with sigterm_as_interrupt():
            for step in bar:
                batch = [examples[i] for i in batch_indices(len(examples), batch_size, seed, step)]
                t0, c0 = time.perf_counter(), time.process_time()
                measured: list[dict] = []  # each evaluation's last_values

                def closure(b: list[dict] = batch, measured: list[dict] = measured) -> float:
                    loss = objective(model, b)
                    measured.append(dict(getattr(objective, "last_values", None) or {}))
                    return loss

                loss = optimizer.step(closure)
                record = optimizer.trajectory[-1]
                values = {name: sum(m[name] for m in measured) / len(measured)
                          for name in measured[-1] if all(name in m for m in measured)} if measured else {}
                # "train/": the training batch's (expected) values, never mistaken for the evaluation's "eval/"
                row = {**{f"train/{k}": v for k, v in values.items()}, "step": step + 1, "loss": loss,
                       "lr": optimizer.param_groups[0]["lr"], "tied": all(g == 0 for g in record["grads"]),
                       "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
                if getattr(objective, "last_means", None):  # each reward function's mean on the last batch
                    row["rewards"] = dict(objective.last_means)
                if scheduler is not None:
                    scheduler.step()
                evaluated = bool(evaluate_fn and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps))
                if evaluated:
                    result = evaluate_fn()
                    if isinstance(result, dict):
                        row["eval"] = next(iter(result.values()))
                        row.update({f"eval/{k}": v for k, v in result.items()})
                    else:
                        row["eval"] = result
                if log:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                history.append(row)
                for callback in callbacks:
                    callback(row)
                if run_dir and (evaluated or (checkpoint_every and (step + 1) % checkpoint_every == 0)):
                    save_checkpoint(Path(run_dir), optimizer, step + 1, base)
                    saved_step = step + 1
                ties = sum(r["tied"] for r in history) / len(history)
                bar.set_postfix({**{f"train/{k} (expected, batch)": f"{v:.4f}" for k, v in values.items()},
                                 "loss": f"{loss:.4f}", "ties": f"{ties:.0%}",
                                 **{k: f"{v:.4f}" for k, v in row.items() if k.startswith("eval/")},
                                 **({"eval": f"{row['eval']:.4f}"} if "eval" in row and not isinstance(result, dict)
                                    else {})})
    finally:
        if log:
            log.close()
        if run_dir and history and history[-1]["step"] != saved_step:
            save_checkpoint(Path(run_dir), optimizer, history[-1]["step"], base)
    if history:
        history[-1]["total_seconds"] = time.perf_counter() - began
    return history


def make_scheduler(optimizer: Optimizer, kind: str, total_steps: int,
                   last_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A constant, linear-decay or cosine-decay learning-rate schedule over ``total_steps``."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; accepted: {', '.join(SCHEDULES)}")
    shapes = {"constant": lambda t: 1.0, "linear": lambda t: 1.0 - t,
              "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t))}
    shape = shapes[kind]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: shape(min(step, total_steps) / total_steps))
    with warnings.catch_warnings():  # fast-forwarding a resumed run steps the schedule before the optimizer
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(last_step):
            scheduler.step()
    return scheduler
