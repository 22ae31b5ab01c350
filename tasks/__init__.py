"""Prompted tasks for zeroth-order fine-tuning: data, templates, label words and MeZO-style splits.

>>> from tasks import get_task
>>> task = get_task("sst2")
>>> train = task.examples("train", n=1000, seed=0)     # seeded sample of the training pool
>>> val = task.examples("validation", n=500, seed=0)   # disjoint from that train sample
>>> dev = task.examples("dev")                          # the standard dev set, file order

Built-ins: sst2, rte, boolq, copa, cb, squad, arith (data shipped in ``tasks/data``, see PROVENANCE.md there);
wsc, wic, multirc, record, drop, trec (``HUB_ONLY_TASKS``: no copy ships; ``examples(..., source="hub")``).
SQuAD's dev set holds two slices on disjoint articles, ``SQUAD_DEV_SLICES``: "choose" (dev 0-499, where defaults
are chosen) and "confirm" (dev 500-999, where they are confirmed).
User tasks: ``register_task(task_from_file("my.csv", name="mine", template="{text} It was", ...))``.
"""

from tasks.base import (
    DEFAULT_TRAIN_N,
    KINDS,
    SOURCES,
    SPLITS,
    Task,
    get_task,
    list_tasks,
    register_task,
    with_demonstrations,
)
from tasks.builtin import BUILTIN_TASKS, DATA_DIR, HUB_ONLY_TASKS, SQUAD_DEV_SLICES, flatten_squad
from tasks.custom import task_from_file

__all__ = [
    "BUILTIN_TASKS",
    "DATA_DIR",
    "DEFAULT_TRAIN_N",
    "HUB_ONLY_TASKS",
    "KINDS",
    "SOURCES",
    "SPLITS",
    "SQUAD_DEV_SLICES",
    "Task",
    "flatten_squad",
    "get_task",
    "list_tasks",
    "register_task",
    "task_from_file",
    "with_demonstrations",
]
