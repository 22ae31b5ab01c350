"""Checkpoints: the trajectory format, replay, resume and the weights checksum, top to bottom.

A checkpoint holds no weights: an estimator's ``state_dict()`` holds its settings and one record per step (the
seeds, the coefficient of each seed's noise, the learning rates), and the noise is regenerated from the seeds.
Replaying the records with the training arithmetic (``replay_record``) gives the tuned weights bitwise, for every
estimator, and an estimator positioned to continue training (resume).

In a run folder the records are appended to trajectory.jsonl, and a small head, trajectory.json, written
atomically after them, says how many records the checkpoint covers, with their running checksum, its own checksum
and the base weights' checksum, which resume checks. So a run stopped anywhere resumes exactly, and a damaged,
cut or foreign file is refused with one line naming it. Only JSON is read or written: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from zo_objectives.estimators import Estimator, estimator_from_state
from zo_objectives.estimators.base import describe_params, weights_sha256
from zo_objectives.runfolder import (
    CHECKPOINT,
    CONFIG,
    EVAL,
    LOG,
    MANIFEST,
    RECORDS,
    check_sealed,
    checked_log,
    read_json,
    read_manifest,
    write_json,
)


def trainable_only(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p for p in params if p.requires_grad]


def optimizer_params(optimizer: Estimator) -> list[torch.Tensor]:
    return trainable_only(p for group in optimizer.param_groups for p in group["params"])


def canonical(data: Any) -> str:
    """Compact JSON (json's fast C encoder), keys in insertion order: what a loaded file re-encodes to."""
    return json.dumps(data, separators=(",", ":"))


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def chain_sha256(digest: str, lines: Iterable[str]) -> str:
    """The running checksum of trajectory records: each line's sha256 taken over the previous checksum too,
    so it covers every record, their order and their count, and extends by the new lines alone."""
    for line in lines:
        digest = text_sha256(digest + line)
    return digest


def read_head(run_dir: Path) -> dict | None:
    path = Path(run_dir) / CHECKPOINT
    return read_json(path) if path.exists() else None


def save_checkpoint(run_dir: Path, optimizer: Estimator, step: int, base_sha256: str) -> None:
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
    head = read_head(run_dir)
    if head:
        done, size, chain, previous, run = (head["records"][k] for k in ("count", "bytes", "sha256", "previous",
                                                                          "run"))
        if step < done or (done and chain_sha256(previous, [canonical(records[done - 1]) + "\n"]) != chain):
            raise ValueError(f"cannot checkpoint step {step} in {run_dir}: its {CHECKPOINT} is of another run or "
                             "a later step")
    else:  # the first checkpoint: the run id of the folder's manifest (a zo-tune run) or a new one
        done, size, chain, previous = 0, 0, "", ""
        run = read_manifest(run_dir)["run"] if (run_dir / MANIFEST).exists() else uuid.uuid4().hex
    lines = [canonical(r) + "\n" for r in records[done:step]]
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
        previous = chain_sha256(chain, lines[:-1])
        chain = chain_sha256(previous, lines[-1:])
    body = {"step": step, "optimizer": state, "records": {"count": step, "bytes": size + len(data), "run": run,
                                                          "sha256": chain, "previous": previous}}
    integrity = {"sha256": text_sha256(canonical(body)), "base_sha256": base_sha256}
    write_json(run_dir / CHECKPOINT, {**body, "integrity": integrity})


def check_records(trajectory: Any) -> None:
    """A ValueError naming the first trajectory record that is not a list of seeds (integers) with one finite
    coefficient (or None: skipped) each and finite learning rates."""
    if not isinstance(trajectory, list):
        raise ValueError(f"has no trajectory list (got {type(trajectory).__name__})")
    for i, record in enumerate(trajectory):
        seeds = record.get("seeds") if isinstance(record, dict) else None
        if not (isinstance(seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
                and finite_numbers(record.get("grads"), allow_none=True) and finite_numbers(record.get("lrs"))
                and len(record["grads"]) == len(seeds)):
            raise ValueError(f"has a non-finite or malformed gradient or lr in trajectory record {i} (step {i + 1})")


def finite_numbers(values: Any, allow_none: bool = False) -> bool:
    return isinstance(values, list) and all(
        (v is None and allow_none) or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
        for v in values)


def _read(run_dir: Path) -> dict:
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
        if (text_sha256(canonical(body)) != integrity["sha256"] or not isinstance(records["run"], str)
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
        if (len(lines) != step or chain_sha256("", lines) != records["sha256"]
                or (step and chain_sha256(records["previous"], lines[-1:]) != records["sha256"])):
            raise ValueError(f"fails its sha256 checksum: {path} was changed, damaged or replaced")
        trajectory = [json.loads(line) for line in lines]
        check_records(trajectory)
        optimizer = {**head["optimizer"], "mezo": {**head["optimizer"]["mezo"], "trajectory": trajectory}}
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
        raise ValueError(f"is malformed ({type(err).__name__}: {err})") from None
    return {"step": step, "optimizer": optimizer, "integrity": integrity, "run": records["run"]}


def load_checkpoint(run_dir: Path, base_sha256: str | None = None) -> dict:
    """The run folder's checkpoint, checked (``base_sha256``: also that it was written for those base weights),
    as ``{"step", "optimizer": an estimator's state_dict(), "integrity"}``. A ValueError naming the file when it is
    missing, damaged, truncated, cut from its records, or written for other base weights."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise ValueError(f"cannot resume: no {CHECKPOINT} in {run_dir}")
    try:
        saved = _read(run_dir)
    except ValueError as err:
        message = str(err)
        raise ValueError(f"cannot resume: {'' if message.startswith(str(path)) else f'{path} '}{message}") from None
    if base_sha256 is not None and saved["integrity"]["base_sha256"] != base_sha256:
        raise ValueError(f"cannot resume: {path} was written for other base weights (another model, dtype, peft "
                         "or set of trainable parameters; or a prefix adapter, whose start the model computes, "
                         "started on another machine or by a version before prefixes started from real activations)")
    return saved


def replay(params: Iterable, state: dict, steps: int | None = None) -> Estimator:
    """Rebuild tuned weights in place from the base weights and an estimator's ``state_dict()``.

    ``params`` must be the same parameters (same order, same groups) the optimizer was built with, holding
    the base weights: their count, dtypes and shapes, and the weights' checksum (``base_sha256``, which every
    ``state_dict()`` of an estimator that took a step carries) are checked first, and so is every record (finite
    coefficients and learning rates): a mismatch is a ValueError with the weights untouched. Returns
    an optimizer of the state's class positioned after the replayed steps (``steps``: the first ones only),
    ready to continue training.
    """
    estimator = estimator_from_state(state)
    mezo = state["mezo"]
    try:  # every record checked before any weight is written
        check_records(mezo.get("trajectory"))
    except ValueError as err:
        raise ValueError(f"replay: the state {err}") from None
    opt = estimator.from_config(params, mezo)
    given = [p for group in opt.param_groups for p in group["params"]]
    described = mezo.get("params") or []  # [dtype, shape] of each (a state_dict() of an older version: none)
    count = len(described) or sum(len(g["params"]) for g in state.get("param_groups", []))
    if count and count != len(given):
        raise ValueError(f"replay: the state is of {count} parameters, got {len(given)}")
    for i, (now, then) in enumerate(zip(describe_params(given), described)):
        if now != then:
            raise ValueError(f"replay: parameter {i} is {now[0]} {tuple(now[1])} but the state's is {then[0]} "
                             f"{tuple(then[1])}: not the parameters the optimizer was built with")
    if mezo.get("base_sha256"):
        if weights_sha256(p for p in given if p.requires_grad) != mezo["base_sha256"]:
            raise ValueError("replay: the parameters do not hold the base weights the state was made from")
        opt.base_sha256 = mezo["base_sha256"]
    if "param_groups" in state:
        for group, saved in zip(opt.param_groups, state["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
    for record in mezo["trajectory"][:steps]:
        opt.replay_record(record)
    return opt


def resume(run_dir: Path, params: list) -> tuple[Estimator, int]:
    """Check the run folder's checkpoint, replay it onto ``params`` (the base weights); return (optimizer,
    next step). Raises ValueError naming the file when the checkpoint is damaged, was written for other
    base weights, or would give non-finite weights."""
    path = Path(run_dir) / CHECKPOINT
    saved = load_checkpoint(run_dir, weights_sha256(trainable_only(params)))
    try:
        optimizer = replay(params, saved["optimizer"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # RuntimeError: e.g. a step past float range
        raise ValueError(f"cannot resume: {path} does not replay ({type(err).__name__}: {err})") from None
    if not all(torch.isfinite(p).all() for p in trainable_only(params)):
        raise ValueError(f"cannot resume: replaying {path} gives non-finite weights")
    return optimizer, saved["step"]


def base_checksum(run_dir: Path, optimizer: Estimator, start_step: int) -> str:
    """The base weights' checksum: of the weights now for a new run, else the checkpoint's it resumed from,
    whose records must be the optimizer's (a ValueError otherwise, before anything is written)."""
    head = read_head(run_dir)
    if start_step == 0:
        if head:
            raise ValueError(f"{run_dir} holds a run at step {head.get('step')} ({CHECKPOINT}): continue it with "
                             "resume(), or train in an empty folder")
        if optimizer.base_sha256 is None:  # (kept: the first step does not hash the weights again)
            optimizer.base_sha256 = weights_sha256(optimizer_params(optimizer))
        return optimizer.base_sha256
    saved = load_checkpoint(run_dir) if head else {}
    if saved.get("step") != start_step:
        raise ValueError(f"cannot continue {run_dir} at step {start_step}: its {CHECKPOINT} is not at that step")
    lines = (canonical(r) + "\n" for r in optimizer.trajectory)
    if chain_sha256("", lines) != head["records"]["sha256"]:
        raise ValueError(f"cannot continue {run_dir}: the optimizer's trajectory is not the one in its {RECORDS}")
    return saved["integrity"]["base_sha256"]


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
