"""The :class:`Task` dataclass, MeZO-style seeded splits, and the task registry."""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

KINDS = ("classification", "multiple_choice", "generation")
SPLITS = ("train", "validation", "dev")
SOURCES = ("local", "hub")
DEFAULT_TRAIN_N = 1000


def check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {list(SOURCES)}")


@dataclass
class Task:
    """A prompted task: how to load raw rows, turn a row into a prompt, and score it.

    ``load_split(split, source="local")`` returns raw rows for ``"train"`` (the training pool) or ``"dev"``.
    Raw rows carry ``label`` (int) for classification / multiple choice and ``answers`` (list of str) for
    generation, unless ``get_label`` / ``get_answers`` say otherwise.
    """

    name: str
    kind: str  # "classification" | "multiple_choice" | "generation"
    metric: str  # default metric name, e.g. "accuracy" or "squad_f1"
    template: Callable[[dict], str]  # raw row -> prompt (no trailing space; candidates start with a space)
    label_words: list[str] | None  # classification only; index = label id
    load_split: Callable[..., list[dict]]  # (split, source="local") -> raw rows
    candidates: Callable[[dict], list[str]] | None = None  # multiple_choice only
    max_new_tokens: int = 16  # generation only
    get_label: Callable[[dict], int] | None = None  # default: int(row["label"])
    get_answers: Callable[[dict], list[str]] | None = None  # default: list(row["answers"])
    reward: str | None = None  # generation tasks scored by a checker: its name in metrics.rewards (zo-tune's default)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: unknown kind {self.kind!r}; expected one of {list(KINDS)}")
        if self.kind == "classification" and not self.label_words:
            raise ValueError(f"task {self.name!r}: classification needs label_words")
        if self.kind == "multiple_choice" and self.candidates is None:
            raise ValueError(f"task {self.name!r}: multiple_choice needs a candidates function")

    # -- raw rows -------------------------------------------------------------------------------------------
    def _rows(self, split: str, source: str) -> list[dict]:
        check_source(source)
        if "source" in inspect.signature(self.load_split).parameters:
            return self.load_split(split, source=source)
        if source != "local":
            raise ValueError(f"task {self.name!r} only has local data (source='local')")
        return self.load_split(split)

    def label_of(self, row: dict) -> int:
        return self.get_label(row) if self.get_label else int(row["label"])

    def answers_of(self, row: dict) -> list[str]:
        return self.get_answers(row) if self.get_answers else [str(a) for a in row["answers"]]

    # -- formatted examples ---------------------------------------------------------------------------------
    def format(self, row: dict, index: int | None = None) -> dict[str, Any]:
        """One formatted example: prompt, candidates/label/target or answers/targets/target, index and raw row."""
        ex: dict[str, Any] = {"prompt": self.template(row)}
        if self.kind == "generation":
            answers = self.answers_of(row)
            ex["answers"] = answers
            ex["targets"] = [" " + a for a in answers]  # the answers as the model continues the prompt
            ex["target"] = ex["targets"][0] if answers else ""
        else:
            cands = list(self.label_words) if self.kind == "classification" else list(self.candidates(row))
            label = self.label_of(row)
            if not 0 <= label < len(cands):
                raise ValueError(f"task {self.name!r}: label {label} out of range for candidates {cands}")
            ex.update(candidates=cands, label=label, target=cands[label])
        ex["index"] = index
        ex["raw"] = row
        return ex

    def examples(
        self,
        split: str,
        n: int | None = None,
        seed: int = 0,
        exclude: Iterable[int | dict] | None = None,
        source: str = "local",
    ) -> list[dict[str, Any]]:
        """Formatted examples of a split (MeZO-style).

        - ``"train"``: a seeded sample of ``n`` rows (default 1000, or all if fewer) of the training pool.
        - ``"validation"``: a seeded sample of ``n`` (default 1000, or all that remain) from the training
          pool, never overlapping the train sample with the same seed: by default the rows of
          ``examples("train", seed=seed)`` are left out; pass ``exclude`` (train examples or their
          ``"index"`` values) when the train sample used another ``n``.
        - ``"dev"``: the standard evaluation set in file order (first ``n`` rows if ``n`` is given).

        Each example keeps ``"index"``, its row position in the pool (train/validation) or dev set.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        if n is not None and n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if split == "dev":
            rows = self._rows("dev", source)
            idx = range(len(rows) if n is None else min(n, len(rows)))
            return [self.format(rows[i], i) for i in idx]

        rows = self._rows("train", source)
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        if split == "train":
            k = min(DEFAULT_TRAIN_N if n is None else n, len(rows))
            return [self.format(rows[i], i) for i in order[:k]]

        if exclude is None:
            skip = set(order[: min(DEFAULT_TRAIN_N, len(rows))])
        else:
            skip = {e["index"] if isinstance(e, dict) else int(e) for e in exclude}
        free = [i for i in order if i not in skip]
        if not free:
            raise ValueError(
                f"task {self.name!r}: the training pool has {len(rows)} rows, all taken by the train sample; "
                f"draw a smaller train sample (examples('train', n=...)) and pass it as exclude="
            )
        k = min(DEFAULT_TRAIN_N if n is None else n, len(free))
        return [self.format(rows[i], i) for i in free[:k]]


_REGISTRY: dict[str, Task] = {}


def register_task(task: Task, *, overwrite: bool = False) -> Task:
    """Add a task to the registry (built-ins and user tasks alike); returns it."""
    if task.name in _REGISTRY and not overwrite:
        raise ValueError(f"task {task.name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task called ``name``; unknown names raise ``ValueError`` listing the available ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(list_tasks())}") from None


def list_tasks() -> list[str]:
    """Names of all registered tasks, sorted."""
    return sorted(_REGISTRY)


def with_demonstrations(examples: list[dict], demonstrations: list[dict], separator: str = "\n\n") -> list[dict]:
    """In-context learning: prefix each prompt with the demonstrations' prompts and gold targets."""
    context = separator.join(d["prompt"] + d["target"] for d in demonstrations)
    return [{**ex, "prompt": context + separator + ex["prompt"]} for ex in examples]
