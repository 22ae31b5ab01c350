"""benchmarks/seed_table.py at a tiny budget on the tiny random model: each kind of cell runs and stores its
result, a finished cell is not queued again, and the table marks what is missing."""

import json

import pytest
from test_benchmarks import load


@pytest.fixture
def seed_table(monkeypatch, tmp_path):
    module = load("seed_table")  # table(write=False) stores nothing; the plots go to RESULTS, patched here
    small = dict(MODEL="tiny-random", TRAIN=4, SHOTS=1, STEPS=3, BATCH=2, EVAL_EVERY=1, EPOCHS=1, FT_BATCH=2,
                 DEV={t: 4 for t in module.TASKS}, CELLS=tmp_path / "cells", RUNS=tmp_path / "runs",
                 RESULTS=tmp_path / "results")
    for name, value in small.items():
        monkeypatch.setattr(module, name, value)
    (tmp_path / "results").mkdir()
    return module


CELLS = [("cb", "zero-shot"), ("sst2", "icl"), ("sst2", "linear-probe"), ("copa", "linear-probe"),
         ("cb", "backprop"), ("copa", "backprop-lora"), ("squad", "backprop"), ("sst2", "mezo-ce"),
         ("sst2", "mezo-metric"), ("sst2", "mezo-prefix")]


def test_cells_run_store_and_tabulate(seed_table):
    for task, method in CELLS:
        result = seed_table.run_cell(task, method)
        assert 0.0 <= result["value"] <= 1.0 and result["peak_rss_mib"] > 0
        assert json.loads(seed_table.cell_path(task, method).read_text())["command"] == result["command"]
    assert seed_table.run_cell("cb", "zero-shot")["examples"] == 4  # CB's held-out half, 4 of its rows
    mezo = json.loads(seed_table.cell_path("sst2", "mezo-ce").read_text())
    assert [p[0] for p in mezo["curve"]] == [0, 1, 2, 3] and mezo["last_step"] == 3
    assert "zo-tune" in mezo["equivalent"] and "--objective cross_entropy" in mezo["equivalent"]
    assert "--metric-form mean" in json.loads(seed_table.cell_path("sst2", "mezo-metric").read_text())["equivalent"]
    queued = seed_table.queue()
    assert not set(CELLS) & set(queued) and ("sst2", "backprop") in queued and ("squad", "linear-probe") not in queued

    result = seed_table.table(write=False)
    rows = {(r[0], r[1]): r for r in result["rows"]}
    ce = rows[("sst2", "mezo-ce")]
    assert ce[2] == seed_table.METHODS["mezo-ce"] and ce[3] == f"{100 * mezo['value']:.1f}"
    assert ce[-1] == "`python benchmarks/seed_table.py --cell sst2/mezo-ce`"
    assert rows[("rte", "backprop")][3] == "not run: budget"
    assert rows[("squad", "linear-probe")][3].startswith("not applicable")
    assert (seed_table.RESULTS / "seed_table_sst2.png").exists()


def test_slope_is_per_100_steps_over_the_last_quarter():
    slope = load("seed_table").slope
    assert slope([[0, 0.5], [20, 0.5], [40, 0.5], [60, 0.5], [80, 0.6], [100, 0.7]]) == pytest.approx(
        100 * 100 * 0.1 / 20)  # the last three points: +10 points per 20 steps
    assert slope([[0, 0.5], [100, 0.5]]) is None
