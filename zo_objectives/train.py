"""The training loop, evaluation, and run folders (metrics.jsonl, checkpoints, trajectory, curve, weights).

A checkpoint is the optimizer's trajectory (kilobytes): resuming reloads the base weights and replays it,
which rebuilds the weights bitwise, so a run stopped anywhere resumes exactly. It carries an integrity record
(record count, checksum, the base weights' checksum) that resume checks. Every file is written to a temporary
name and renamed into place, so a crash never leaves a half-written file. Only JSON and safetensors are read
or written: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from metrics import Metric
from zo_objectives.objectives import Objective, references
from zo_objectives.optimizer import MeZO, replay

CHECKPOINT = "trajectory.json"
LOG = "metrics.jsonl"


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


def predict_all(model: torch.nn.Module, predictor: Any, examples: Sequence[dict], batch_size: int = 16,
                progress: bool = False) -> list:
    """Predictions for every example, in batches (``progress``: a bar over the batches on stderr)."""
    preds: list = []
    starts = range(0, len(examples), batch_size)
    for i in tqdm(starts, desc="evaluating", unit="batch", disable=not progress, dynamic_ncols=True, leave=False):
        preds += predictor.predict(model, examples[i:i + batch_size])
    return preds


def evaluate_model(model: torch.nn.Module, predictor: Any, examples: Sequence[dict], metric: Metric,
                   batch_size: int = 16, progress: bool = False) -> float:
    """The metric on ``examples`` (predictions batched, no perturbation; ``progress``: a bar on stderr)."""
    return metric(predict_all(model, predictor, examples, batch_size, progress), references(examples))


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


def weights_sha256(params: Iterable[torch.Tensor]) -> str:
    """sha256 over the tensors' dtypes, shapes and bytes, in order: identifies the weights a trajectory must
    be replayed onto."""
    digest = hashlib.sha256()
    for p in params:
        t = p.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _trainable(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p for p in params if p.requires_grad]


def _optimizer_params(optimizer: MeZO) -> list[torch.Tensor]:
    return _trainable(p for group in optimizer.param_groups for p in group["params"])


def _canonical(data: Any) -> str:
    """Compact JSON (json's fast C encoder), keys in insertion order: what a loaded file re-encodes to."""
    return json.dumps(data, separators=(",", ":"))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def save_checkpoint(run_dir: Path, optimizer: MeZO, step: int, base_sha256: str) -> None:
    """Write the optimizer's first ``step`` trajectory records with their integrity record: the record count,
    a sha256 of everything else in the file, and the sha256 of the base weights (:func:`weights_sha256`)."""
    state = optimizer.state_dict()
    records = state["mezo"]["trajectory"]
    if len(records) < step:
        raise ValueError(f"cannot checkpoint step {step}: the optimizer holds {len(records)} trajectory records")
    state["mezo"]["trajectory"] = records[:step]  # an interrupted step (not logged yet) is left out: it reruns
    state["mezo"]["num_perturbations_done"] = sum(len(r["seeds"]) for r in records[:step])
    body = _canonical({"step": step, "optimizer": state})
    integrity = {"records": step, "sha256": _sha256(body), "base_sha256": base_sha256}
    text = f'{body[:-1]},"integrity":{_canonical(integrity)}}}'  # the body encoded once: {..., "integrity": ...}
    atomic_write(Path(run_dir) / CHECKPOINT, lambda tmp: Path(tmp).write_text(text))


def _finite_numbers(values: Any, allow_none: bool = False) -> bool:
    return isinstance(values, list) and all(
        (v is None and allow_none) or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
        for v in values)


def checkpoint_problem(saved: Any, base_sha256: str) -> str | None:
    """What is wrong with a loaded checkpoint, or None: its structure, record count, finite gradients and
    learning rates, checksum, and the checksum of the base weights it is to be replayed onto."""
    if not isinstance(saved, dict) or not {"step", "optimizer"} <= set(saved):
        return "is not a zo-objectives checkpoint (no step and optimizer)"
    if not isinstance(saved.get("integrity"), dict):
        return "has no integrity record (an older version wrote it): start the run again"
    try:
        step, integrity, records = saved["step"], saved["integrity"], saved["optimizer"]["mezo"]["trajectory"]
        if not isinstance(step, int) or isinstance(step, bool) or not len(records) == step == integrity["records"]:
            return (f"says step {step!r} but holds {len(records)} trajectory records "
                    f"(integrity: {integrity['records']!r})")
        for i, record in enumerate(records):
            if not (_finite_numbers(record["grads"], allow_none=True) and _finite_numbers(record["lrs"])
                    and len(record["grads"]) == len(record["seeds"])):
                return f"has a non-finite or malformed gradient or lr in trajectory record {i} (step {i + 1})"
        if _sha256(_canonical({"step": step, "optimizer": saved["optimizer"]})) != integrity["sha256"]:
            return "fails its sha256 checksum: it was changed or damaged after it was written"
        if integrity["base_sha256"] != base_sha256:
            return "was written for other base weights (another model, dtype, peft or set of trainable parameters)"
    except (KeyError, TypeError, AttributeError) as err:
        return f"is malformed ({type(err).__name__}: {err})"
    return None


def resume(run_dir: Path, params: list) -> tuple[MeZO, int]:
    """Check the run folder's checkpoint, replay it onto ``params`` (the base weights); return (optimizer,
    next step). Raises ValueError naming the file when the checkpoint is damaged, was written for other
    base weights, or would give non-finite weights."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise ValueError(f"cannot resume: no {CHECKPOINT} in {run_dir}")
    try:
        saved = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot resume: {path} is not valid JSON ({err})") from None
    problem = checkpoint_problem(saved, weights_sha256(_trainable(params)))
    if problem:
        raise ValueError(f"cannot resume: {path} {problem}")
    try:
        optimizer = replay(params, saved["optimizer"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # RuntimeError: e.g. a step past float range
        raise ValueError(f"cannot resume: {path} does not replay ({type(err).__name__}: {err})") from None
    if not all(torch.isfinite(p).all() for p in _trainable(params)):
        raise ValueError(f"cannot resume: replaying {path} gives non-finite weights")
    return optimizer, saved["step"]


def truncate_log(path: Path, step: int) -> None:
    """Keep the rows of steps up to ``step`` in a metrics.jsonl: a run killed after logging a step but before
    checkpointing it logs the step again on resume. A line torn by the kill is dropped too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (``kill``, job schedulers, container stops) into KeyboardInterrupt, as Ctrl-C does, so a run
    stops cleanly and saves its checkpoint. Only the main thread can set signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:  # None: a handler set outside Python, which cannot be put back; the default is the closest
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _base_sha256(run_dir: Path, optimizer: MeZO, start_step: int) -> str:
    """The base weights' checksum: of the weights now for a new run, else the checkpoint's it resumed from."""
    if len(optimizer.trajectory) != start_step:
        raise ValueError(f"start_step {start_step} does not match the optimizer's {len(optimizer.trajectory)} "
                         "trajectory records: resume a run folder with resume()")
    if start_step == 0:
        return weights_sha256(_optimizer_params(optimizer))
    path = Path(run_dir) / CHECKPOINT
    saved = json.loads(path.read_text()) if path.exists() else {}
    if saved.get("step") != start_step or "integrity" not in saved:
        raise ValueError(f"cannot continue {run_dir} at step {start_step}: its {CHECKPOINT} is not at that step")
    return saved["integrity"]["base_sha256"]


def train(model: torch.nn.Module, optimizer: MeZO, objective: Objective, examples: Sequence[dict], *,
          steps: int, batch_size: int = 16, seed: int = 0, start_step: int = 0,
          evaluate_fn: Callable[[], float] | None = None, eval_every: int = 0, run_dir: Path | None = None,
          checkpoint_every: int = 1, scheduler: Any = None, progress: bool = True) -> list[dict]:
    """Run MeZO steps ``start_step..steps-1``; log each to ``run_dir/metrics.jsonl`` and checkpoint every
    ``checkpoint_every`` steps (0: only at evaluations), at evaluations and when stopped.

    The loss of a step is the mean objective over its perturbed evaluations. A step "ties" when both sides
    of its estimate scored the same (no signal: the weights do not move). SIGTERM stops a run as Ctrl-C does
    (KeyboardInterrupt, after saving the checkpoint). A row is logged before its step is checkpointed, and
    rows past ``start_step`` are dropped first, so metrics.jsonl matches the checkpoint after any kill.
    """
    if not (isinstance(checkpoint_every, int) and checkpoint_every >= 0):
        raise ValueError(f"checkpoint_every must be an int >= 0 (0: only at evaluations), got {checkpoint_every!r}")
    history: list[dict] = []
    log, base, saved_step = None, "", start_step
    if run_dir:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        base = _base_sha256(Path(run_dir), optimizer, start_step)
        truncate_log(Path(run_dir) / LOG, start_step)
        log = open(Path(run_dir) / LOG, "a")
    bar = tqdm(range(start_step, steps), desc="zo-tune", disable=not progress, dynamic_ncols=True)
    began = time.perf_counter()
    try:
        with sigterm_as_interrupt():
            for step in bar:
                batch = [examples[i] for i in batch_indices(len(examples), batch_size, seed, step)]
                t0 = time.perf_counter()
                loss = optimizer.step(lambda b=batch: objective(model, b))
                record = optimizer.trajectory[-1]
                sign = -1.0 if getattr(objective, "greater_is_better", False) else 1.0  # log the metric
                row = {"step": step + 1, "loss": loss, "objective": sign * loss,
                       "lr": optimizer.param_groups[0]["lr"], "tied": all(g == 0 for g in record["grads"]),
                       "seconds": time.perf_counter() - t0}
                if getattr(objective, "last_means", None):  # each reward function's mean on the last batch
                    row["rewards"] = dict(objective.last_means)
                if scheduler is not None:
                    scheduler.step()
                evaluated = bool(evaluate_fn and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps))
                if evaluated:
                    row["eval"] = evaluate_fn()
                if log:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                history.append(row)
                if run_dir and (evaluated or (checkpoint_every and (step + 1) % checkpoint_every == 0)):
                    save_checkpoint(Path(run_dir), optimizer, step + 1, base)
                    saved_step = step + 1
                ties = sum(r["tied"] for r in history) / len(history)
                bar.set_postfix(objective=f"{row['objective']:.4f}", ties=f"{ties:.0%}",
                                **({"eval": f"{row['eval']:.4f}"} if "eval" in row else {}))
    finally:
        if log:
            log.close()
        if run_dir and history and history[-1]["step"] != saved_step:
            save_checkpoint(Path(run_dir), optimizer, history[-1]["step"], base)
    if history:
        history[-1]["total_seconds"] = time.perf_counter() - began
    return history
