"""The training loop, evaluation, and run folders (metrics.jsonl, checkpoints, trajectory, curve, weights).

A checkpoint is the optimizer's trajectory (kilobytes): resuming reloads the base weights and replays it,
which rebuilds the weights bitwise, so a run stopped anywhere resumes exactly. Every file is written to a
temporary name and renamed into place, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from metrics import Metric
from zo_objectives.objectives import Objective, references
from zo_objectives.optimizer import MeZO, replay

CHECKPOINT = "trajectory.json"


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the file over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))


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


def predict_all(model: torch.nn.Module, predictor: Any, examples: Sequence[dict], batch_size: int = 16) -> list:
    """Predictions for every example, in batches."""
    preds: list = []
    for i in range(0, len(examples), batch_size):
        preds += predictor.predict(model, examples[i:i + batch_size])
    return preds


def evaluate(model: torch.nn.Module, predictor: Any, examples: Sequence[dict], metric: Metric,
             batch_size: int = 16) -> float:
    """The metric on ``examples`` (predictions batched, no perturbation)."""
    return metric(predict_all(model, predictor, examples, batch_size), references(examples))


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
    atomic_write(path, lambda tmp: save_file(trainable_state(model), tmp))


def save_checkpoint(run_dir: Path, optimizer: MeZO, step: int) -> None:
    write_json(run_dir / CHECKPOINT, {"step": step, "optimizer": optimizer.state_dict()})


def resume(run_dir: Path, params: list) -> tuple[MeZO, int]:
    """Replay the run folder's checkpoint onto ``params`` (the base weights); return (optimizer, next step)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise ValueError(f"cannot resume: no {CHECKPOINT} in {run_dir}")
    saved = json.loads(path.read_text())
    return replay(params, saved["optimizer"]), saved["step"]


def train(model: torch.nn.Module, optimizer: MeZO, objective: Objective, examples: Sequence[dict], *,
          steps: int, batch_size: int = 16, seed: int = 0, start_step: int = 0,
          evaluate_fn: Callable[[], float] | None = None, eval_every: int = 0, run_dir: Path | None = None,
          scheduler: Any = None, progress: bool = True, checkpoint_every: int = 1) -> list[dict]:
    """Run MeZO steps ``start_step..steps-1``; log each to ``run_dir/metrics.jsonl`` and checkpoint at evals.

    The loss of a step is the mean objective over its perturbed evaluations. A step "ties" when both sides
    of its estimate scored the same (no signal: the weights do not move).
    """
    history: list[dict] = []
    log = open(Path(run_dir) / "metrics.jsonl", "a") if run_dir else None
    bar = tqdm(range(start_step, steps), desc="zo-tune", disable=not progress, dynamic_ncols=True)
    began = time.perf_counter()
    try:
        for step in bar:
            batch = [examples[i] for i in batch_indices(len(examples), batch_size, seed, step)]
            t0 = time.perf_counter()
            loss = optimizer.step(lambda b=batch: objective(model, b))
            record = optimizer.trajectory[-1]
            sign = -1.0 if getattr(objective, "greater_is_better", False) else 1.0  # log the metric, not the loss
            row = {"step": step + 1, "loss": loss, "objective": sign * loss,
                   "lr": optimizer.param_groups[0]["lr"], "tied": all(g == 0 for g in record["grads"]),
                   "seconds": time.perf_counter() - t0}
            if getattr(objective, "last_means", None):  # each reward function's mean on the last scored batch
                row["rewards"] = dict(objective.last_means)
            if scheduler is not None:
                scheduler.step()
            if evaluate_fn and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
                row["eval"] = evaluate_fn()
            if run_dir and ("eval" in row or (checkpoint_every and (step + 1) % checkpoint_every == 0)):
                save_checkpoint(Path(run_dir), optimizer, step + 1)
            history.append(row)
            if log:
                log.write(json.dumps(row) + "\n")
                log.flush()
            ties = sum(r["tied"] for r in history) / len(history)
            bar.set_postfix(objective=f"{row['objective']:.4f}", ties=f"{ties:.0%}",
                            **({"eval": f"{row['eval']:.4f}"} if "eval" in row else {}))
    finally:
        if log:
            log.close()
        if run_dir and history:
            save_checkpoint(Path(run_dir), optimizer, history[-1]["step"])
    if history:
        history[-1]["total_seconds"] = time.perf_counter() - began
    return history

