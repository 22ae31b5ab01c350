"""benchmarks/seed_table.py at a tiny budget on the tiny random model: each kind of cell runs and stores its
result, a finished cell is not queued again, and the table marks what is missing."""

import json
import re
import shutil

import pytest
from test_benchmarks import load, no_write  # noqa: F401  (a fixture)


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
    assert re.fullmatch(r"not run: CPU budget \(~\d+ min estimated on this CPU\)", rows[("rte", "backprop")][3])
    assert rows[("squad", "linear-probe")][3].startswith("not applicable")
    assert (seed_table.RESULTS / "seed_table_sst2.png").exists()
    grid = {line.split(" | ")[0].strip("| "): line.strip("|").split(" | ")[1:]
            for line in seed_table.glance(result).splitlines()[2:]}
    tasks = list(seed_table.TASKS)
    assert grid["mezo-ce"][tasks.index("sst2")].strip() == ce[3]
    assert grid["backprop"][tasks.index("rte")].strip() == "-" and grid["linear-probe"][-1].strip() == "n/a"

    # a longer run continues the cell's finished run (its first steps are the cell's) and is listed beside the table
    longer = seed_table.run_cell("sst2", "mezo-ce", 5)
    assert longer["last_step"] == 5 and longer["resumed_at_step"] == 3 and [p[0] for p in longer["curve"]] == [
        0, 1, 2, 3, 4, 5]
    assert longer["curve"][:4] == mezo["curve"] and "--steps 5" in longer["command"]
    again = seed_table.table(write=False)
    assert again["rows"] == result["rows"]  # the cell itself is unchanged
    assert "sst2 mezo-ce to step 5: " in again["notes"] and "--cell sst2/mezo-ce --steps 5" in again["notes"]
    assert "steps 4-5;" in again["notes"]  # the wall time of the steps it added
    assert f"sst2 mezo-ce {100 * longer['value']:.1f} at step 5" in seed_table.readme_glance(again)
    shutil.rmtree(seed_table.RUNS / "sst2-mezo-ce-5")  # a fresh clone has no run folders: the plot reads the JSON
    assert ("mezo-ce", 5) in seed_table.longer_runs("sst2", {("sst2", "mezo-ce", 5): longer})
    fresh = seed_table.run_cell("rte", "mezo-ce", 4)  # no cell folder to continue (a fresh clone): from step 0
    assert fresh["resumed_at_step"] == 0 and [p[0] for p in fresh["curve"]] == [0, 1, 2, 3, 4]


def test_estimate_scales_the_finished_cells_pace_by_tokens_read(seed_table):
    one = {("sst2", "mezo-ce"): {"wall_s": 120.0}}
    assert seed_table.estimate("sst2", "mezo-ce", one) == pytest.approx(2.0)
    ratio = seed_table.work("rte", "mezo-lora") / seed_table.work("sst2", "mezo-ce")
    assert ratio > 1  # RTE's premise + hypothesis prompts are longer than SST-2's sentences
    assert seed_table.estimate("rte", "mezo-lora", one) == pytest.approx(2.0 * ratio)  # the family's pace
    assert seed_table.estimate("rte", "backprop", one) is None  # no finished backprop cell: no pace to go by
    assert seed_table.work("sst2", "icl") > seed_table.work("sst2", "zero-shot")
    resumed = {("sst2", "mezo-ce"): {"wall_s": 10.0, "resumed_at_step": 80}}
    assert seed_table.estimate("sst2", "mezo-ce", resumed) is None  # a resumed cell's wall time is partial


def test_cells_run_in_the_order_given_and_write_readme(seed_table, no_write, monkeypatch, tmp_path):  # noqa: F811
    started = []
    monkeypatch.setattr(seed_table, "drive", lambda workers, cells: started.extend(cells))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- seed_table:begin -->\nold\n<!-- seed_table:end -->\nkept\n")
    monkeypatch.setattr(seed_table, "README", readme)
    seed_table.main(["--cells", "rte/icl,cb/mezo-ce", "--write"])
    assert started == [("rte", "icl"), ("cb", "mezo-ce")]
    text = readme.read_text()
    assert "old" not in text and text.endswith("kept\n") and "| mezo-prefix |" in text
    with pytest.raises(SystemExit):
        seed_table.main(["--cells", "rte/nothing"])
    for wrong in (["--steps", "300"], ["--cell", "rte/icl", "--steps", "300"],
                  ["--cell", "rte/mezo-ce", "--steps", "2"]):
        with pytest.raises(SystemExit):
            seed_table.main(wrong)


def test_slope_is_per_100_steps_over_the_last_quarter():
    slope = load("seed_table").slope
    assert slope([[0, 0.5], [20, 0.5], [40, 0.5], [60, 0.5], [80, 0.6], [100, 0.7]]) == pytest.approx(
        100 * 100 * 0.1 / 20)  # the last three points: +10 points per 20 steps
    assert slope([[0, 0.5], [100, 0.5]]) is None


def test_a_cell_stopped_by_a_signal_is_not_called_failed(seed_table, monkeypatch):
    monkeypatch.setattr(seed_table, "ROOT", seed_table.RUNS.parent)  # the log's path is shown relative to it
    logs = seed_table.RUNS / "logs"
    logs.mkdir(parents=True)
    traceback = "Traceback (most recent call last):\n  ...\nRuntimeError: zo-tune exited with 1\n"
    monkeypatch.setattr("zo_objectives.cli.tune_main", lambda argv: 143)  # SIGTERM: stopped for time
    with pytest.raises(SystemExit) as stopped:
        seed_table.mezo("rte", "mezo-ce")
    (logs / "rte__mezo-ce.log").write_text(f"{stopped.value}\n")  # what the cell's process prints: no traceback
    (logs / "cb__mezo-ce.log").write_text(traceback)  # a real failure
    assert seed_table.missing("rte", "mezo-ce", {}).startswith("not run: CPU budget")
    assert seed_table.missing("cb", "mezo-ce", {}).startswith("failed: RuntimeError: zo-tune exited with 1")
