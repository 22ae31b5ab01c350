"""What a run shows beside metrics.jsonl: a sample of its completions (completions.jsonl) and TensorBoard.

Both are callbacks of :func:`zo_objectives.train.train`, called with each row once it is logged; a user who logs
elsewhere passes their own the same way (``train(..., callbacks=[fn])``).
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from zo_objectives.config import UsageError
from zo_objectives.objectives import reward_columns
from zo_objectives.scoring import MESSAGES
from zo_objectives.train import batch_indices

SAMPLE = 8  # prompts per sample of completions


def append_jsonl(path: Path, records: Sequence[dict]) -> None:
    """Append ``records`` as JSON lines, each whole: a line a kill tore off at the end is dropped first, and the
    lines go out in one write, flushed and synced."""
    path = Path(path)
    with open(path, "ab+") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":  # a line torn by a kill: cut back to the last whole one
                f.seek(0)
                f.truncate(f.read().rfind(b"\n") + 1)
        f.write("".join(json.dumps(r) + "\n" for r in records).encode())
        f.flush()
        os.fsync(f.fileno())


class CompletionsLog:
    """Writes the completions of the first ``SAMPLE`` evaluation prompts at each evaluation, and those of the
    first ``SAMPLE`` prompts of the step's training batch every ``every`` steps (0: never), to ``path``: one line
    per prompt, {"step", "split", "prompt", "completion", and "reward" (the weighted reward, for reward runs) or
    "answers" (the gold answers)}. Completions are greedy, by the weights after the step."""

    def __init__(self, path: Path, model: torch.nn.Module, generator: Any, train_set: Sequence[dict],
                 dev_set: Sequence[dict], batch_size: int, seed: int, every: int = 0, objective: Any = None):
        self.path, self.model, self.generator, self.objective = Path(path), model, generator, objective
        self.train_set, self.dev_set, self.batch_size, self.seed, self.every = (train_set, dev_set, batch_size, seed,
                                                                               every)

    def __call__(self, row: dict) -> None:
        step = row["step"]
        if "eval" in row:
            self.write(step, "eval", self.dev_set[:SAMPLE])
        if self.every and step % self.every == 0:
            indices = batch_indices(len(self.train_set), self.batch_size, self.seed, step - 1)[:SAMPLE]
            self.write(step, "train", [self.train_set[i] for i in indices])

    def write(self, step: int, split: str, examples: Sequence[dict]) -> None:
        if not examples:
            return
        prompts = [ex["prompt"] for ex in examples]
        completions = self.generator.generate(self.model, prompts)
        records = [{"step": step, "split": split, "prompt": ex.get(MESSAGES, ex["prompt"]), "completion": c}
                   for ex, c in zip(examples, completions)]
        if hasattr(self.objective, "scores"):  # a reward run: each completion's weighted reward
            means = self.objective.last_means
            rewards = self.objective.scores(prompts, completions, reward_columns(examples))
            self.objective.last_means = means  # the step's own means stay what the run logged
            for record, reward in zip(records, rewards):
                record["reward"] = reward
        else:
            for record, ex in zip(records, examples):
                record["answers"] = ex.get("answers")
        append_jsonl(self.path, records)


def scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics.jsonl row by name (a dict's as ``name/key``; booleans as 0/1), but its step."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": float(v) for k, v in value.items() if isinstance(v, numbers.Real)})
        elif isinstance(value, numbers.Real):
            out[key] = float(value)
    return out


def require_tensorboard() -> None:
    """A UsageError (one line) when the tensorboard package is missing."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError as err:
        raise UsageError("--report-to tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or pip install 'zo-objectives[tensorboard]')") from err


def tensorboard_writer(log_dir: Path) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` writing to ``log_dir``."""
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


def tensorboard_callback(writer: Any) -> Callable[[dict], None]:
    """Writes each row's scalars (those of metrics.jsonl) to ``writer`` at the row's step."""

    def log(row: dict) -> None:
        for name, value in scalars(row).items():
            writer.add_scalar(name, value, row["step"])
        writer.flush()

    return log
