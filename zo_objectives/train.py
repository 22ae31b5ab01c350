"""The training loop, evaluation, metrics.jsonl and checkpoints.

A checkpoint is the optimizer's trajectory (kilobytes): resuming reloads the base weights and replays it,
which rebuilds the weights bitwise, so a run stopped anywhere resumes exactly. Its records are appended to
trajectory.jsonl and a small head, trajectory.json, written atomically after them, says how many records the
checkpoint covers, with their running checksum, its own checksum and the base weights' checksum, which
resume checks. Every other file is written to a temporary name and renamed into place, so a crash never leaves
a half-written file. Only JSON and safetensors are read or written: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from metrics import Metric
from zo_objectives.objectives import Objective, references
from zo_objectives.optimizer import MeZO
from zo_objectives.population import Population, PopulationObjective
from zo_objectives.replay import replay
from zo_objectives.runfolder import (
    CHECKPOINT,
    CONFIG,
    EVAL,
    LOG,
    MANIFEST,
    RECORDS,
    atomic_write,
    check_sealed,
    clean,
    lock,
    read_json,
    read_manifest,
    write_json,
)


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


def evaluate_metrics(model: torch.nn.Module, predictor: Any, examples: Sequence[dict], metrics: Sequence[Metric],
                     batch_size: int = 16, predict: Callable = predict_all) -> dict[str, float]:
    """Each metric on ``examples``, by name, from one pass of predictions (``predict``: how they are made)."""
    predictions, refs = predict(model, predictor, examples, batch_size), references(examples)
    return {metric.name: metric(predictions, refs) for metric in metrics}


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


def _chain(digest: str, lines: Iterable[str]) -> str:
    """The running checksum of trajectory records: each line's sha256 taken over the previous checksum too,
    so it covers every record, their order and their count, and extends by the new lines alone."""
    for line in lines:
        digest = _sha256(digest + line)
    return digest


def _head(run_dir: Path) -> dict | None:
    path = Path(run_dir) / CHECKPOINT
    return read_json(path) if path.exists() else None


def save_checkpoint(run_dir: Path, optimizer: MeZO, step: int, base_sha256: str) -> None:
    """Checkpoint the optimizer's first ``step`` trajectory records: append the records the checkpoint does
    not hold yet to trajectory.jsonl, then write the head (trajectory.json) atomically. The head holds the
    optimizer's settings, the records' count, byte length and running checksum, a sha256 of itself, the base
    weights' checksum (:func:`weights_sha256`) and the run's id. A kill before the head is renamed into place
    leaves the previous head, which covers a prefix of trajectory.jsonl: the bytes past it are ignored and
    written over. Cost: the new records and the head, whatever the run's length."""
    run_dir = Path(run_dir)
    records = optimizer.trajectory
    if len(records) < step:
        raise ValueError(f"cannot checkpoint step {step}: the optimizer holds {len(records)} trajectory records")
    head = _head(run_dir)
    if head:
        done, size, chain, previous, run = (head["records"][k] for k in ("count", "bytes", "sha256", "previous",
                                                                          "run"))
        if step < done or (done and _chain(previous, [_canonical(records[done - 1]) + "\n"]) != chain):
            raise ValueError(f"cannot checkpoint step {step} in {run_dir}: its {CHECKPOINT} is of another run or "
                             "a later step")
    else:  # the first checkpoint: the run id of the folder's manifest (a zo-tune run) or a new one
        done, size, chain, previous = 0, 0, "", ""
        run = read_manifest(run_dir)["run"] if (run_dir / MANIFEST).exists() else uuid.uuid4().hex
    lines = [_canonical(r) + "\n" for r in records[done:step]]
    data = "".join(lines).encode()
    path = run_dir / RECORDS
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(path, "r+b" if path.exists() else "wb") as f:
        if f.seek(0, os.SEEK_END) < size:
            raise ValueError(f"{path} is shorter than {run_dir / CHECKPOINT} says: it was cut")
        f.seek(size)
        f.write(data)
        f.truncate()
    trajectory, optimizer.trajectory = optimizer.trajectory, []  # the state without its records, in O(1)
    try:
        state = optimizer.state_dict()
    finally:
        optimizer.trajectory = trajectory
    # an interrupted step (not logged yet) is left out: it reruns
    state["mezo"]["num_perturbations_done"] -= sum(len(r["seeds"]) for r in records[step:])
    del state["mezo"]["trajectory"]
    if lines:  # the checksum before the last record too: the next checkpoint checks it continues this one
        previous = _chain(chain, lines[:-1])
        chain = _chain(previous, lines[-1:])
    body = {"step": step, "optimizer": state, "records": {"count": step, "bytes": size + len(data), "run": run,
                                                          "sha256": chain, "previous": previous}}
    integrity = {"sha256": _sha256(_canonical(body)), "base_sha256": base_sha256}
    write_json(run_dir / CHECKPOINT, {**body, "integrity": integrity})


def _finite_numbers(values: Any, allow_none: bool = False) -> bool:
    return isinstance(values, list) and all(
        (v is None and allow_none) or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
        for v in values)


def _load(run_dir: Path) -> dict:
    """The checkpoint as one ``{"step", "optimizer", "integrity"}`` dict (the optimizer state with its
    trajectory), every check made but the base weights'; a ValueError saying what is wrong."""
    head = read_json(Path(run_dir) / CHECKPOINT)
    if not isinstance(head, dict) or not {"step", "optimizer"} <= set(head):
        raise ValueError("is not a zo-objectives checkpoint (no step and optimizer)")
    if not isinstance(head.get("integrity"), dict) or not isinstance(head.get("records"), dict):
        raise ValueError("has no integrity record (an older version wrote it): start the run again")
    try:
        step, integrity, records = head["step"], head["integrity"], head["records"]
        body = {k: head[k] for k in ("step", "optimizer", "records")}
        if (_sha256(_canonical(body)) != integrity["sha256"] or not isinstance(records["run"], str)
                or not isinstance(integrity["base_sha256"], str)):
            raise ValueError("fails its sha256 checksum: it was changed or damaged after it was written")
        if not (isinstance(step, int) and not isinstance(step, bool) and step == records["count"] >= 0):
            raise ValueError(f"says step {step!r} but holds {records['count']!r} trajectory records")
        path = Path(run_dir) / RECORDS
        data = path.read_bytes() if path.exists() else b""
        if len(data) < records["bytes"]:
            raise ValueError(f"covers {records['bytes']} bytes of {RECORDS} but it holds {len(data)}: {path} "
                             "was cut or deleted")
        try:
            lines = data[:records["bytes"]].decode().splitlines(keepends=True)
        except UnicodeDecodeError:
            lines = []
        if (len(lines) != step or _chain("", lines) != records["sha256"]
                or (step and _chain(records["previous"], lines[-1:]) != records["sha256"])):
            raise ValueError(f"fails its sha256 checksum: {path} was changed, damaged or replaced")
        trajectory = [json.loads(line) for line in lines]
        for i, record in enumerate(trajectory):
            if not (_finite_numbers(record["grads"], allow_none=True) and _finite_numbers(record["lrs"])
                    and len(record["grads"]) == len(record["seeds"])):
                raise ValueError(f"has a non-finite or malformed gradient or lr in trajectory record {i} "
                                 f"(step {i + 1})")
        optimizer = {**head["optimizer"], "mezo": {**head["optimizer"]["mezo"], "trajectory": trajectory}}
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
        raise ValueError(f"is malformed ({type(err).__name__}: {err})") from None
    return {"step": step, "optimizer": optimizer, "integrity": integrity, "run": records["run"]}


def load_checkpoint(run_dir: Path, base_sha256: str | None = None) -> dict:
    """The run folder's checkpoint, checked (``base_sha256``: also that it was written for those base weights),
    as ``{"step", "optimizer": a MeZO.state_dict(), "integrity"}``. A ValueError naming the file when it is
    missing, damaged, truncated, cut from its records, or written for other base weights."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise ValueError(f"cannot resume: no {CHECKPOINT} in {run_dir}")
    try:
        saved = _load(run_dir)
    except ValueError as err:
        message = str(err)
        raise ValueError(f"cannot resume: {'' if message.startswith(str(path)) else f'{path} '}{message}") from None
    if base_sha256 is not None and saved["integrity"]["base_sha256"] != base_sha256:
        raise ValueError(f"cannot resume: {path} was written for other base weights (another model, dtype, peft "
                         "or set of trainable parameters; or a prefix adapter, whose start the model computes, "
                         "started on another machine or by a version before prefixes started from real activations)")
    return saved


def resume(run_dir: Path, params: list) -> tuple[MeZO, int]:
    """Check the run folder's checkpoint, replay it onto ``params`` (the base weights); return (optimizer,
    next step). Raises ValueError naming the file when the checkpoint is damaged, was written for other
    base weights, or would give non-finite weights."""
    path = Path(run_dir) / CHECKPOINT
    saved = load_checkpoint(run_dir, weights_sha256(_trainable(params)))
    try:
        optimizer = replay(params, saved["optimizer"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # RuntimeError: e.g. a step past float range
        raise ValueError(f"cannot resume: {path} does not replay ({type(err).__name__}: {err})") from None
    if not all(torch.isfinite(p).all() for p in _trainable(params)):
        raise ValueError(f"cannot resume: replaying {path} gives non-finite weights")
    return optimizer, saved["step"]


def checked_log(path: Path, step: int) -> list[str]:
    """The rows of steps 1..``step`` of a metrics.jsonl (a row per step, in order). Rows past ``step`` (logged
    after the checkpoint by a killed run: they rerun) and a line torn by a kill are left out. A ValueError
    naming the file when a row up to ``step`` is missing, repeated or unreadable."""
    if not path.exists():
        if step:
            raise ValueError(f"{path} is missing: the checkpoint is at step {step}")
        return []
    try:
        lines = path.read_bytes().decode().splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is damaged (not UTF-8: {err})") from None
    kept: list[str] = []
    for number, line in enumerate(lines, 1):
        if len(kept) == step:
            break
        try:
            logged = json.loads(line)["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            raise ValueError(f"{path} line {number} is not a metrics row ({line[:40]!r}): it was damaged") from None
        if logged != len(kept) + 1:
            raise ValueError(f"{path} line {number} logs step {logged!r} after step {len(kept)}: rows are "
                             f"{'repeated' if isinstance(logged, int) and logged <= len(kept) else 'missing'}")
        kept.append(line + "\n")
    if len(kept) < step:
        raise ValueError(f"{path} ends at step {len(kept)} but the checkpoint is at step {step}: rows were cut")
    return kept


def truncate_log(path: Path, step: int) -> None:
    """Keep the rows of steps up to ``step`` in a metrics.jsonl (:func:`checked_log`): a run killed after
    logging a step but before checkpointing it logs the step again on resume."""
    if path.exists():
        kept = checked_log(path, step)
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))


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


def _base_sha256(run_dir: Path, optimizer: MeZO, start_step: int) -> str:
    """The base weights' checksum: of the weights now for a new run, else the checkpoint's it resumed from,
    whose records must be the optimizer's (a ValueError otherwise, before anything is written)."""
    head = _head(run_dir)
    if start_step == 0:
        if head:
            raise ValueError(f"{run_dir} holds a run at step {head.get('step')} ({CHECKPOINT}): continue it with "
                             "resume(), or train in an empty folder")
        return weights_sha256(_optimizer_params(optimizer))
    saved = load_checkpoint(run_dir) if head else {}
    if saved.get("step") != start_step:
        raise ValueError(f"cannot continue {run_dir} at step {start_step}: its {CHECKPOINT} is not at that step")
    lines = (_canonical(r) + "\n" for r in optimizer.trajectory)
    if _chain("", lines) != head["records"]["sha256"]:
        raise ValueError(f"cannot continue {run_dir}: the optimizer's trajectory is not the one in its {RECORDS}")
    return saved["integrity"]["base_sha256"]


def train(model: torch.nn.Module, optimizer: MeZO, objective: Objective, examples: Sequence[dict], *,
          steps: int, batch_size: int = 16, seed: int = 0, start_step: int | None = None,
          evaluate_fn: Callable[[], float | dict[str, float]] | None = None, eval_every: int = 0,
          run_dir: Path | None = None, checkpoint_every: int = 1, scheduler: Any = None, progress: bool = True,
          callbacks: Sequence[Callable[[dict], None]] = ()) -> list[dict]:
    """Run MeZO steps ``start_step..steps-1``; log each to ``run_dir/metrics.jsonl`` and checkpoint every
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
    :class:`~zo_objectives.population.Population` optimizer the objective is wrapped in a PopulationObjective
    (one loss per member) unless it has no predictor: it must then return one loss per member itself.
    """
    if not (isinstance(checkpoint_every, int) and checkpoint_every >= 0):
        raise ValueError(f"checkpoint_every must be an int >= 0 (0: only at evaluations), got {checkpoint_every!r}")
    splittable = any(hasattr(objective, f) for f in ("predictor", "generator", "terms"))  # else: per member already
    if isinstance(optimizer, Population) and splittable and not isinstance(objective, PopulationObjective):
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


def _train(model: torch.nn.Module, optimizer: MeZO, objective: Objective, examples: Sequence[dict], *,
           steps: int, batch_size: int, seed: int, start_step: int, evaluate_fn: Callable[[], float] | None,
           eval_every: int, run_dir: Path | None, checkpoint_every: int, scheduler: Any,
           progress: bool, callbacks: Sequence[Callable[[dict], None]] = ()) -> list[dict]:
    history: list[dict] = []
    log, base, saved_step = None, "", start_step
    if run_dir:
        clean(Path(run_dir))  # temporaries a killed run left
        base = _base_sha256(Path(run_dir), optimizer, start_step)
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


def check_run_folder(run_dir: Path) -> int:
    """Check that a run folder's files belong together before it is resumed: config.json and eval.json as the
    run wrote them (manifest.json), the checkpoint sound and this run's, metrics.jsonl a row for each step up
    to it. Return the checkpoint's step; a ValueError naming the file otherwise."""
    manifest = read_manifest(run_dir)
    for name in (CONFIG, EVAL):
        check_sealed(run_dir, name, manifest)
    saved = load_checkpoint(run_dir)
    if saved["run"] != manifest["run"]:
        raise ValueError(f"cannot resume: {Path(run_dir) / CHECKPOINT} belongs to another run (its run id is not "
                         f"the one in {MANIFEST}): it was copied in from another run folder")
    checked_log(Path(run_dir) / LOG, saved["step"])
    return saved["step"]
