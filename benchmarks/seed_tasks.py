"""A plugin for ``benchmarks/seed_table.py`` (``zo-tune --plugin benchmarks/seed_tasks.py``): ``cb_split``, CB with
a held-out dev set. Only 32 labelled CB rows ship (tasks/data/PROVENANCE.md), which are both the training pool and
the dev set of ``cb``; ``cb_split`` splits them 16/16 (a seeded shuffle, seed 0), so that a score is on rows
the model was not tuned on."""

from __future__ import annotations

import random
from dataclasses import replace

from tasks import get_task, register_task

CB = get_task("cb")


def _split_rows(split: str, source: str = "local") -> list[dict]:
    rows = CB.load_split(split, source=source)
    if source != "local":  # the hub has CB's own train and validation splits
        return rows
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    half = order[: len(rows) // 2] if split == "train" else order[len(rows) // 2:]
    return [rows[i] for i in sorted(half)]


register_task(replace(CB, name="cb_split", load_split=_split_rows), overwrite=True)
