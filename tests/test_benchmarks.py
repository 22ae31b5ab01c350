"""Smoke tests of the benchmark scripts (tiny model, tiny batch, one repeat, no timing assertions) and a check
that the reference MeZO step and ours both descend a quadratic."""

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zo_objectives.estimators import MeZO

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SMALL = ["--model", "tiny-random", "--batch-size", "2", "--seq-len", "8"]


def load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_write(monkeypatch, tmp_path):
    """Point BENCHMARKS.md and benchmarks/results to temporary ones so that no test touches the real ones."""
    common = load("_common")
    monkeypatch.setattr(common, "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(common.write_section, "__defaults__", (tmp_path / "BENCHMARKS.md",))
    return tmp_path / "BENCHMARKS.md"


def test_eps_fidelity_compares_with_fp32(no_write):
    result = load("eps_fidelity").main(["--model", "tiny-random", "--batches", "3", "--batch-size", "2",
                                        "--settings", "bf16:1e-2", "fp32:1e-3"])
    reference, bf16, same = result["rows"]
    assert reference[:3] == ["fp32", "0.001", "1.000"] and bf16[:2] == ["bf16", "0.01"]
    assert same[2:4] == ["1.000", "0.00"]  # the reference setting again: the same estimates exactly
    assert -1.0 <= float(bf16[2]) <= 1.0


def test_step_speed_runs(no_write, capsys):
    step_speed = load("step_speed")
    table = step_speed.main([*SMALL, "--repeats", "1", "--warmup", "0", "--threads", "1"])
    names = [row[0] for row in table]
    assert "forward (logits_to_keep=1)" in names and "reference MeZO" in names
    assert any(n.startswith("MeZO table (default)") for n in names)
    assert any(n.endswith("weights only") for n in names)
    assert all(float(row[1]) > 0 for row in table)
    assert "| configuration |" in capsys.readouterr().out
    assert not no_write.exists()


def test_step_speed_proxy_writes_ours_and_the_reference_per_tensor(no_write):
    table = load("step_speed").main(["--proxy", "--repeats", "2", "--warmup", "0", "--write"])
    assert [row[0] for row in table] == ["closure (forward pass and loss)", "MeZO step (table noise)",
                                         "reference MeZO step", "closure with perturbed weights (x 2 per step)",
                                         "update pass only (closure without a forward)"]
    assert table[2][3] == "1.000" and float(table[1][3]) == pytest.approx(float(table[1][2]) / float(table[2][2]),
                                                                          abs=2e-3)
    result = json.loads((no_write.parent / "results" / "step_speed_proxy.json").read_text())
    assert result["params"]["tensors"] == 75 and result["environment"]["native_bf16"] in (True, False)
    assert result["environment"]["hardware"] and "step_speed_proxy:begin" in no_write.read_text()


def test_memory_runs(no_write, monkeypatch):
    memory = load("memory")
    names = [name for name in memory.CONFIGS if name != "inference"]  # inference runs in the subprocess below
    results = [memory.run_config(name, "tiny-random", "cpu", 1, 2, 8, steps=1) for name in names]
    header, table = memory.rows(results)
    assert [row[0] for row in table] == names
    # the kernel's RSS counters lag a little: the peak may read a few hundred KiB under the loaded RSS
    assert all(r["peak_kib"] >= r["loaded_kib"] - 4096 > 0 for r in results)
    by = {r["config"]: r for r in results}  # LoRA trains its small adapters; frozen embeddings leave smaller tensors
    assert by["lora"]["largest_trainable_bytes"] < by["mezo-frozen-embeddings"]["largest_trainable_bytes"]
    assert by["mezo-frozen-embeddings"]["largest_trainable_bytes"] < by["mezo"]["largest_trainable_bytes"]
    # the real entry point: one configuration in two fresh subprocesses (the median's row, the range of both),
    # written to a (temporary) BENCHMARKS.md
    measured, measure = [], memory.measure
    monkeypatch.setattr(memory, "measure", lambda *args, **kwargs: measured.append(measure(*args, **kwargs)) or
                        measured[-1])
    table = memory.main([*SMALL, "--threads", "1", "--configs", "inference", "--processes", "2", "--write"])
    assert [row[0] for row in table] == ["inference"]
    (inference,), = measured
    assert len(inference["peaks_kib"]) == 2 and str(round(inference["peak_kib"] / 1024)) == table[0][3]
    low, high = (int(v) for v in table[0][4].split("-"))
    assert low <= int(table[0][3]) <= high
    text = no_write.read_text()
    assert "<!-- memory_tiny-random_fp32:begin -->" in text and "| inference |" in text
    stored = json.loads((no_write.parent / "results" / "memory_tiny-random_fp32.json").read_text())
    assert stored["rows"][0][0] == "inference" and stored["environment"]["command"].startswith("python ")
    assert load("_common").render(stored) in text and "<!-- environments:begin -->" in text


def test_memory_half_precision_and_lora():
    memory = load("memory")
    result = memory.run_config("mezo-lora", "tiny-random", "cpu", 1, 2, 8, steps=1, dtype="bf16")
    assert result["config"] == "mezo-lora" and result["peak_kib"] >= result["loaded_kib"] - 4096
    # LoRA r=8 on q and v of a hidden-64 model: the largest adapter is 64 x 8 (fp32, as peft keeps adapters)
    assert result["largest_trainable_bytes"] == 64 * 8 * 4
    assert memory.section_name("smollm2-135m", "fp32") == "memory"  # README's summary reads this one
    assert memory.section_name("random-1.1b", "bf16") == "memory_random-1.1b_bf16"


def test_memory_notes_say_whether_the_goal_is_met():
    notes = load("memory").notes
    mib = 1 << 20

    def result(config: str, peak_kib: int) -> dict:
        return {"config": config, "peak_kib": peak_kib, "loaded_kib": 1000, "largest_trainable_bytes": 125 * mib}

    met = notes([result("inference", 2000 * 1024), result("mezo", 2040 * 1024)], "bf16")
    assert "Measured: 1.020 (met)" in met and "40 MiB above inference" in met and "125 MiB in bf16" in met
    missed = notes([result("inference", 2000 * 1024), result("mezo", 2200 * 1024),
                    result("mezo-frozen-embeddings", 2050 * 1024)], "bf16")
    assert "1.100 (not met)" in missed and "frozen" in missed and "1.025 x inference" in missed
    assert notes([result("mezo", 1)], "bf16") == "Goal: mezo / inference <= 1.05."


def test_memory_refuses_an_unknown_config_or_dtype(capsys):
    memory = load("memory")
    for argv, message in ((["--configs", "mezo,sgd"], "unknown config 'sgd'; accepted: inference, mezo"),
                          (["--dtype", "fp8"], "invalid choice: 'fp8'")):
        with pytest.raises(SystemExit, match="2"):
            memory.main([*SMALL, *argv])
        assert message in capsys.readouterr().err


def _synthetic_points(a: dict, b: dict, c: float = 300e6) -> list[dict]:
    """Points exactly on peak = a*params + b*tokens*layers*hidden + c for three sizes and two batch shapes."""
    points = []
    for method in a:
        for params, layers, hidden in ((135e6, 30, 576), (362e6, 32, 960), (1.1e9, 22, 2048)):
            for batch_size, seq_len in ((2, 32), (8, 32)):
                peak = a[method] * params + b[method] * batch_size * seq_len * layers * hidden + c
                points.append({"model": f"m{params:.0f}", "method": method, "params": int(params), "layers": layers,
                               "hidden": hidden, "batch_size": batch_size, "seq_len": seq_len, "loaded": c,
                               "peak": peak})
    return points


def test_scaling_fit_recovers_bytes_per_parameter_and_per_token():
    scaling = load("scaling")
    points = _synthetic_points({"mezo": 2.1}, {"mezo": 3.0})
    points[-1]["peak"] = None  # out of memory: left out of the fit
    coef = scaling.fit(points)
    assert coef["a"] == pytest.approx(2.1) and coef["b"] == pytest.approx(3.0) and coef["c"] == pytest.approx(300e6)
    assert coef["points"] == 5 and coef["max_error"] < 1e-9
    with pytest.raises(ValueError, match="two model sizes or more"):
        scaling.fit([p for p in points if p["params"] == 135e6])
    # a Llama with OPT-30B's layers and hidden size has OPT-30B's parameter count (29.97B) to 0.2%
    assert scaling.opt_params(48, 7168) == pytest.approx(29.97e9, rel=2e-3)


def test_scaling_projects_the_largest_shape_per_method(no_write, monkeypatch):
    scaling = load("scaling")
    # 2 B/param: OPT-30B (60 GB) fits 80 GiB, OPT-66B (131 GB) does not; 8 B/param + 48 bytes of activations per
    # token x layer x hidden: OPT-6.7B takes 53 + 25 GiB; with fp32 states (12 B/param) only OPT-2.7B fits
    points = _synthetic_points({"inference": 2.0, "mezo": 2.0, "adamw": 8.0}, {"inference": 0.5, "mezo": 0.5,
                                                                           "adamw": 48.0}, c=0.0)
    monkeypatch.setattr(scaling, "measure", lambda *args: points)
    rows = scaling.main(["--sizes", "a,b,c", "--write"])
    largest = {row[0]: row[-1] for row in rows}
    assert largest == {"inference": "OPT-30B", "MeZO": "OPT-30B",
                       "backprop + AdamW, bf16 states (measured)": "OPT-6.7B",
                       "backprop + AdamW, fp32 states (measured + 4 B/param)": "OPT-2.7B",
                       "backprop + AdamW, fp32 master weights and states (measured + 8 B/param)": "OPT-2.7B"}
    assert [row[1] for row in rows][-3:] == ["8.00", "12.00", "16.00"]
    text = no_write.read_text()
    assert "<!-- scaling:begin -->" in text and "Offloading" in text and "| OPT-30B (30.0B) |" in text
    stored = json.loads((no_write.parent / "results" / "scaling.json").read_text())
    assert stored["params"]["fits"]["mezo"]["a"] == pytest.approx(2.0)


def test_scaling_worker_measures_each_shape():
    scaling = load("scaling")
    for method in ("inference", "mezo", "lora", "adamw"):
        points = scaling.worker("tiny-random", method, [(1, 8), (2, 8)], "cpu", "bf16", 1, 1)
        assert [(p["batch_size"], p["seq_len"]) for p in points] == [(1, 8), (2, 8)]
        assert all(p["peak"] >= p["loaded"] - (4 << 20) > 0 and p["layers"] == 2 and p["hidden"] == 64
                   for p in points)


def test_scaling_refuses_bad_arguments(capsys):
    scaling = load("scaling")
    for argv, message in ((["--shapes", "2x32,8"], "bad batch shape '8': expected BATCHxTOKENS"),
                          (["--sizes", "random-135m"], "the fit needs two model sizes or more"),
                          (["--methods", "mezo,sgd"], "unknown method 'sgd'; accepted: inference, mezo")):
        with pytest.raises(SystemExit, match="2"):
            scaling.main(argv)
        assert message in capsys.readouterr().err


def test_write_section_keeps_other_sections(tmp_path):
    common = load("_common")
    path = tmp_path / "BENCHMARKS.md"
    common.write_section("a", "first", path)
    common.write_section("b", "other", path)
    common.write_section("a", "second", path)
    text = path.read_text()
    assert "second" in text and "first" not in text and "other" in text
    assert text.count("<!-- a:begin -->") == 1 and text.index("<!-- a:begin -->") < text.index("<!-- b:begin -->")


def _toy():
    torch.manual_seed(0)
    module = torch.nn.Linear(8, 1)
    x, y = torch.randn(64, 8), torch.randn(64, 1)

    def closure() -> float:
        with torch.no_grad():
            return float(((module(x) - y) ** 2).mean())

    return module, closure


@pytest.mark.parametrize("which", ["reference", "ours"])
def test_reference_and_ours_descend_a_quadratic(which):
    reference_step = load("reference_mezo").reference_step
    module, closure = _toy()
    start = closure()
    opt = MeZO(module.parameters(), lr=0.02, eps=1e-3, seed=1)
    for step in range(150):
        if which == "reference":
            reference_step(module, closure, lr=0.02, eps=1e-3, seed=step)
        else:
            opt.step(closure)
    assert closure() < 0.7 * start


def test_reference_step_with_zero_lr_restores_weights():
    reference_step = load("reference_mezo").reference_step
    module, closure = _toy()
    before = [p.detach().clone() for p in module.parameters()]
    loss = reference_step(module, closure, lr=0.0, eps=1e-3, seed=3)
    assert abs(loss - closure()) < 1e-4
    for p, b in zip(module.parameters(), before):
        torch.testing.assert_close(p.detach(), b, atol=1e-6, rtol=0)


def test_gradient_weights_runs(no_write):
    rows = load("gradient_weights").main(["--model", "tiny-random", "--n", "8", "--temperatures", "1,4", "--write"])
    assert [r[0] for r in rows] == ["cross-entropy", "expected accuracy, T = 1", "expected accuracy, T = 4"]
    assert "gradient_weights:begin" in no_write.read_text()
    with pytest.raises(SystemExit):
        load("gradient_weights").main(["--model", "tiny-random", "--task", "squad"])


def test_objective_gap_runs_and_reuses(no_write, tmp_path):
    gap = load("objective_gap")
    argv = ["--configs", "cross_entropy", "--steps", "1", "--batch-size", "2", "--eval-size", "4",
            "--output", str(tmp_path / "runs"), "--write", "--", "--model", "tiny-random", "--train-size", "4"]
    rows = gap.main(argv)
    assert [r[0] for r in rows] == ["cross_entropy"] and "objective_gap_sst2:begin" in no_write.read_text()
    assert [r[0] for r in gap.main(["--reuse", *argv])] == ["cross_entropy (reused)"]
    # --collect runs nothing and reads unfinished runs too: the table shows the evals logged so far
    log = tmp_path / "runs" / "sst2" / "cross_entropy" / "metrics.jsonl"
    row = json.loads(log.read_text().splitlines()[-1])
    log.write_text(json.dumps({**row, "eval": 0.123}) + "\n")
    collected = gap.main(["--collect", "--steps", "2", *argv[:2], *argv[4:]])
    assert collected[0][0] == "cross_entropy" and "0.1230" in collected[0]
    assert "Seed 0: stopped early, cross_entropy at step 1." in no_write.read_text()
    assert json.loads((no_write.parent / "results" / "objective_gap_sst2_s0.json").read_text())["params"]["seed"] == 0


def _seed_result(seed: int, values: list[str], device: str = "cpu") -> dict:
    rows = [[name + " (reused)", "1e-05", "sgd", value, "0%", "1.0e-04", "1.5"]
            for name, value in zip(["cross_entropy", "squad_f1"], values)]
    return {"section": f"objective_gap_squad_s{seed}", "title": "", "notes": "",
            "columns": ["objective", "lr", "update", "step 60", "tied steps", "median step length", "train minutes"],
            "rows": rows, "params": {"task": "squad", "seed": seed, "steps": 60, "batch_size": 8, "eval_size": 500,
                                     "metric": "squad_f1", "stopped": ""},
            "environment": {"command": f"python benchmarks/objective_gap.py --seed {seed} --configs a,b --output "
                            f"runs/gap_s{seed} --write", "date": "today", "device": device}}


def test_objective_gap_seeds_table_has_seeds_as_columns_and_mean_sd():
    gap = load("objective_gap")
    results = {f"s{s}": _seed_result(s, v) for s, v in [(0, ["0.3155", "0.2820"]), (1, ["0.2924", "-"])]}
    results["gpu"] = _seed_result(2, ["0.9", "0.9"], device="cuda")  # another device: not in the CPU table
    table = gap.seeds_table("squad", gpu=False, results=results)
    assert table["columns"][3:7] == ["seed 0", "seed 1", "mean", "sd"]
    assert table["rows"][0][:7] == ["cross_entropy", "1e-05", "sgd", "31.55", "29.24", "30.40", "1.63"]
    assert table["rows"][1][3:7] == ["28.20", "-", "-", "-"]  # one seed: no mean
    assert table["environment"]["command"] == ("python benchmarks/objective_gap.py --seed S --configs NAMES "
                                               "--output runs/gap_sS --write")
    with pytest.raises(SystemExit, match="no stored results of objective_gap.py for task 'sst2'"):
        gap.seeds_table("sst2", gpu=False, results=results)


def test_stored_result_is_the_data_of_its_section(no_write):
    common = load("_common")
    result = common.publish("demo", "Demo", "A caption.", ["a", "b"], [[1, "x"]], "cpu", write=True, notes="N.")
    text = no_write.read_text()
    assert "## Demo\n\nA caption.\n\n| a | b |\n|---|---|\n| 1 | x |" in text and "N." in text
    stored = json.loads((no_write.parent / "results" / "demo.json").read_text())
    assert stored == result and stored["rows"] == [["1", "x"]]
    assert "demo" in text[text.index("environments:begin"):text.index("environments:end")]


def test_squad_candidates_runs(no_write):
    rows = load("squad_candidates").main(["--model", "tiny-random", "--n", "4", "--write"])
    assert [r[2] for r in rows[:3]] == [4, 4, 4] and "squad_candidates:begin" in no_write.read_text()


def test_objective_gap_step_length_is_median_lr_times_grad(tmp_path):
    step_length = load("objective_gap").step_length
    assert step_length(tmp_path) is None  # no trajectory.json
    records = [{"lrs": [1e-5], "grads": [30.0]}, {"lrs": [1e-5], "grads": [-10.0, None]},
               {"lrs": [2e-5], "grads": [0.0]}]
    (tmp_path / "trajectory.json").write_text(json.dumps({"step": 3, "optimizer": {"mezo": {"trajectory": records}}}))
    assert step_length(tmp_path) == pytest.approx(1e-4)  # median of 3e-4, 1e-4 and 0


def test_heldout_gap_evaluates_saved_runs_once(no_write, tmp_path):
    from zo_objectives.models import load_model, save_weights

    model = load_model("tiny-random")[0]
    runs = tmp_path / "runs"
    for name, after in [("cross_entropy", 0.25), ("squad_f1", 0.5)]:  # two finished run folders, as zo-tune leaves
        folder = runs / "squad" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"model": "tiny-random", "seed": 3, "eval_size": 2}))
        (folder / "eval.json").write_text(json.dumps({"after": after}))
        save_weights(model, folder / "model.safetensors")
    argv = ["--runs", str(runs), "--configs", "cross_entropy,squad_f1", "--start", "2", "--end", "4",
            "--model", "tiny-random", "--write"]
    rows = load("heldout_gap").main(argv)
    assert rows[0][:4] == [3, "25.0", "50.0", "+25.0"] and rows[-1][0] == "mean"
    assert "heldout_gap_squad:begin" in no_write.read_text()
    stored = runs / "squad" / "squad_f1" / "heldout_2_4.json"
    assert json.loads(stored.read_text())["end"] == 4 and (runs / "squad" / "heldout_2_4.json").exists()
    # a second call reads the stored results: a changed value shows in the table
    stored.write_text(json.dumps({**json.loads(stored.read_text()), "value": 0.5}))
    assert load("heldout_gap").main(argv)[0][5] == "50.0"
    with pytest.raises(SystemExit, match="no tuned weights"):
        load("heldout_gap").main(["--runs", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="overlaps the runs' own dev examples"):
        load("heldout_gap").main([*argv[:4], "--start", "1"])
    with pytest.raises(SystemExit, match="dev set has 1000 examples"):
        load("heldout_gap").main([*argv[:4], "--end", "1001"])


def test_half_precision_table_pairs_settings_by_seed(no_write, tmp_path):
    runs = []
    for dtype, eps, seed, after in [("fp32", 1e-3, 0, 0.70), ("fp32", 1e-3, 1, 0.68), ("bf16", 3e-3, 0, 0.69),
                                    ("bf16", 3e-3, 1, 0.69)]:
        run = tmp_path / f"{dtype}_{seed}"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"dtype": dtype, "eps": eps, "seed": seed, "task": "sst2",
                                                     "objective": "accuracy", "steps": 2, "batch_size": 4,
                                                     "model": "m"}))
        (run / "eval.json").write_text(json.dumps({"before": 0.5, "after": after, "train_seconds": 60}))
        (run / "metrics.jsonl").write_text('{"seconds": 1.0}\n{"seconds": 3.0}\n')
        runs.append(str(run))
    rows = {(r[0], r[1]): r[3] for r in load("half_precision").main(["--runs", *runs])["rows"]}
    assert rows["fp32", "mean"] == "69.00" and rows["bf16, eps 0.003", "mean"] == "69.00"
    assert rows["bf16, eps 0.003 - fp32", "mean"] == "0.00" and rows["bf16, eps 0.003 - fp32", "sd"] == "1.41"


def test_reward_comparison_cells_budget_and_choice_on_training_prompts(no_write, tmp_path):
    rc = load("reward_comparison")
    small = ["--model", "tiny-random", "--held-out", "3", "--train-eval", "2", "--completions", "16", "--batch-size",
             "2", "--max-new-tokens", "3", "--out", str(tmp_path / "cells")]
    grid = rc.GRIDS["arith"]["mezo_es"][:2]  # two settings of eps 1e-3 (cells named without their eps)
    for cell in ["greedy:0:0", "best_of_4:0:0", *(rc.cell_name("mezo_es", g, 0) for g in grid)]:
        rc.main([*small, "--cell", cell])
    rc.main([*small, "--cell", "population_es:0.001:0", "--population", "4"])
    cells = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "cells").glob("*.json")}
    assert cells["best_of_4_0_0"]["scored_completions"] == 12  # 4 per held-out prompt
    rc.main([*small, "--cell", "fzoo_es:1e-05:0:0.01", "--population", "4"])  # FZOO: 4 members and the unperturbed
    fzoo = json.loads((tmp_path / "cells" / "fzoo_es_1e-05_0_0.01.json").read_text())
    assert (fzoo["steps"], fzoo["batch"], fzoo["scored_completions"], fzoo["n_perturbations"]) == (3, 1, 15, 4)
    assert rc.FZOO_ES[-1] == (1e-3 * 1e-2, 1e-2)  # the ES grid's step lengths: lr x eps
    cells = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "cells").glob("*.json")}
    population = cells["population_es_0.001_0"]  # 4 members x 1 prompt per step: the same completions per step
    assert (population["steps"], population["batch"], population["scored_completions"]) == (4, 1, 16)
    assert population["population"] == 4 and population["tune_cpu_seconds"] > 0
    (low, eps), (high, _) = grid
    es = cells[f"mezo_es_{low:g}_0"]
    assert (es["steps"], es["scored_completions"], es["eps"]) == (4, 16, eps)  # 2 x batch per step, in the budget
    assert es["peak_rss_mib"] > 0 and 0 <= es["after"] <= 1
    assert len(es["train_reward_curve"]) == 4 and all(0 <= r <= 1 for r in es["train_reward_curve"])
    # the grid is chosen by the reward on training prompts, whatever the held-out reward says
    for lr, train_after, after in ((low, 0.5, 0.1), (high, 0.2, 0.9)):
        path = tmp_path / "cells" / f"mezo_es_{lr:g}_0.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "train_after": train_after, "after": after}))
    assert rc.chosen(tmp_path / "cells", "arith", "mezo_es", partial=True) == grid[0]
    assert rc.chosen(tmp_path / "cells", "arith", "mezo_es") is None  # two of its four settings ran
    assert rc.chosen(tmp_path / "cells", "arith", "mezo_expected", partial=True) is None  # its grid has not run
    # another eps is part of the cell's name and reaches the optimizer; an equal-time cell tunes until its CPU time
    rc.main([*small, "--cell", "mezo_es:0.001:0:0.01"])
    assert json.loads((tmp_path / "cells" / "mezo_es_0.001_0_0.01.json").read_text())["eps"] == 0.01
    one_step = [*small[:small.index("--completions")], "--completions", "4", *small[small.index("--completions") + 2:]]
    rc.main([*one_step, "--cell", "population_es_time:0.001:1", "--population", "4", "--budget-cpu-seconds", "0.5"])
    timed = json.loads((tmp_path / "cells" / "population_es_time_0.001_1.json").read_text())
    assert timed["tune_cpu_seconds"] >= 0.5 and timed["budget_cpu_seconds"] == 0.5  # the time, not 4 completions
    assert timed["steps"] >= 4 and timed["steps"] % 4 == 0 and timed["scored_completions"] == timed["steps"] * 4
    for bad in (["--cell", "population_es_time:0.001:2"], ["--cell", "mezo_es:0.001:2", "--budget-cpu-seconds", "1"]):
        with pytest.raises(SystemExit, match="needs --budget-cpu-seconds > 0"):
            rc.main([*small, *bad])
    with pytest.raises(SystemExit, match="squad runs equal-time cells of population_es only"):
        rc.main([*small, "--task", "squad", "--cell", "mezo_es_time:0.001:0", "--budget-cpu-seconds", "1"])
    rc.main([*small, "--write"])
    stored = json.loads((no_write.parent / "results" / "reward_comparison_arith.json").read_text())
    rows = {r[0]: r for r in stored["rows"]}
    es_row = rows["MeZO, evolution-strategy form (each perturbed model decodes greedily)"]
    assert es_row[2] == "0.100 (1 seed)" and es_row[3] == f"lr {low:g}, eps {eps:g} (3 of 4 grid points ran)"
    assert es_row[1] == "0.000"  # before: the untuned greedy cell
    assert "oracle" in next(k for k in rows if k.startswith("best of 4"))
    assert rows["population of 4 (rank 1; 1 prompts per step), evolution-strategy form (all members decode greedily in "
                "one batched generate)"][4] == "16"
    assert "## Reward comparison (arith)" in no_write.read_text()


def test_population_time_table_compares_at_mezo_cpu_time(no_write, tmp_path):
    """The quality-per-time table reads each run folder's evaluations against its tuning CPU time (evaluations
    excluded), at a third of MeZO's time and at all of it, and the time to MeZO's final accuracy."""
    pop = load("population")
    runs = tmp_path / "runs"

    def run(name: str, cpu: float, evals: dict[int, float], steps: int) -> None:
        folder = pop.time_folder(argparse.Namespace(runs=str(runs)), name)
        folder.mkdir(parents=True)
        (folder / "eval.json").write_text(json.dumps({"before": 0.5, "after": evals[steps]}))
        (folder / "config.json").write_text(json.dumps({"dtype": "bf16", "steps": steps, "hardware": {
            "name": "a CPU", "native_bf16": True}}))
        lines = [{"step": s, "seconds": 10 * cpu, "cpu_seconds": cpu, **({"eval": evals[s]} if s in evals else {})}
                 for s in range(1, steps + 1)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))

    names = list(pop.TIME_RUNS)
    run(names[0], 1.0, {3: 0.6, 6: 0.7, 9: 0.8}, 9)  # MeZO: 9 s of CPU, 0.8 at the end
    run(names[1], 0.5, {2: 0.7, 6: 0.8, 18: 0.9, 20: 0.9}, 20)  # reaches 0.8 at 3 s: a third of MeZO's time
    run(names[2], 2.0, {1: 0.55, 2: 0.6}, 2)  # stops (4 s) before MeZO's time: never reaches 0.8
    out = pop.main(["--part", "time", "--no-run", "--runs", str(runs), "--write"])
    rows = {r[0]: r for r in out["time"]["rows"]}
    assert rows[names[0]][1:9] == ["9", "1.00", "0.600", "3", "0.800", "9", "1.00", "9 s (step 9)"]
    assert rows[names[1]][3:9] == ["0.800", "6", "0.900", "18", "0.33", "3 s (step 6)"]
    assert rows[names[2]][3:8] == ["0.550", "1", "0.600", "2 (its last)", "not reached"]
    stored = json.loads((tmp_path / "results" / "population_time.json").read_text())
    assert stored["environment"]["hardware"] == "a CPU" and stored["environment"]["native_bf16"]
    assert stored["params"]["budget_cpu_seconds"] == 9.0 and stored["params"]["target_accuracy"] == 0.8
    assert "## Population quality per time (SST-2)" in no_write.read_text()
    # MeZO's run stopped at step 3 of 9: its time for 9 steps from its CPU per step, the target from a finished run
    mezo = pop.time_folder(argparse.Namespace(runs=str(runs)), names[0])
    (mezo / "eval.json").write_text(json.dumps({"before": 0.5}))
    (mezo / "metrics.jsonl").write_text("".join((mezo / "metrics.jsonl").read_text().splitlines(True)[:3]))
    with pytest.raises(SystemExit, match="unfinished"):
        pop.main(["--part", "time", "--no-run", "--runs", str(runs), "--target-run", str(tmp_path / "none")])
    (tmp_path / "made").mkdir()
    (tmp_path / "made" / "eval.json").write_text(json.dumps({"after": 0.6}))
    out = pop.main(["--part", "time", "--no-run", "--runs", str(runs), "--target-run", str(tmp_path / "made")])
    rows = {r[0]: r for r in out["time"]["rows"]}
    assert rows[names[0]][1:9] == ["3", "1.00", "0.600", "3", "0.600", "3 (its last)", "0.33", "3 s (step 3)"]
    assert rows[names[1]][7] == "0.11" and "stopped at step 3 of 9" in out["time"]["notes"]


def test_reward_comparison_driver_order_and_shared_queue(tmp_path, monkeypatch):
    """The driver runs a grid, then the other seeds at the setting chosen on training prompts; equal-time cells
    wait for all of GRPO's seeds; a cell another live driver holds is left to it, a dead driver's is taken over."""
    rc = load("reward_comparison")
    folder = tmp_path / "cells"
    ran: list[tuple[str, float | None]] = []

    def fake_run(command, check):  # a cell "runs": its JSON appears, its training reward from the lr
        cell = command[command.index("--cell") + 1]
        method, lr, seed, eps = rc.parse_cell(cell)
        flag = "--budget-cpu-seconds"
        budget = float(command[command.index(flag) + 1]) if flag in command else None
        ran.append((cell, budget))
        rc.cell_path(folder, cell).write_text(json.dumps({"method": method, "lr": lr, "seed": seed, "after": 0.5,
                                                          "train_after": lr, "tune_cpu_seconds": 10.0 + seed}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(rc.subprocess, "run", fake_run)
    args = rc.parse(["--task", "arith", "--run", "--only", "population_es_time", "grpo", "population_es_time"])
    rc.run_all(args, folder, ["--task", "arith"])
    grpo = [c for c, _ in ran if c.startswith("grpo")]
    best = max(g for g, _ in rc.GRIDS["arith"]["grpo"])
    assert grpo == [rc.cell_name("grpo", g, 0) for g in rc.GRIDS["arith"]["grpo"]] + [
        rc.cell_name("grpo", (best, None), s) for s in (1, 2)]
    assert ran[0][0].startswith("grpo")  # the first population_es_time waited: GRPO's seeds had not run
    assert not any(c.startswith("population_es_time") for c, _ in ran)  # its grid (population_es) has not run
    ran.clear()
    args = rc.parse(["--task", "arith", "--run", "--only", "population_es", "population_es_time"])
    rc.run_all(args, folder, ["--task", "arith"])
    timed = [(c, b) for c, b in ran if c.startswith("population_es_time")]
    assert len(timed) == 3 and all(b == 11.0 for _, b in timed)  # GRPO's mean CPU time over its 3 seeds
    # markers: a live driver's cell is left to it; a dead one's is taken over
    live, dead = "greedy:0:0", "best_of_4:0:0"
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "reward_comparison"])
    cmdline = Path(f"/proc/{driver.pid}/cmdline")
    while b"reward_comparison" not in cmdline.read_bytes():  # until its exec has finished
        time.sleep(0.05)
    try:
        for cell, pid in ((live, driver.pid), (dead, 2 ** 22 + 7)):  # above any pid_max: no such process
            path = rc.cell_path(folder, cell)
            path.with_name(f".{path.stem}.pid").write_text(str(pid))
        ran.clear()
        rc.run_one([], folder, live)
        rc.run_one([], folder, dead)
    finally:
        driver.kill()
    assert [c for c, _ in ran] == [dead] and not rc.cell_path(folder, live).exists()
    assert not list(folder.glob(".best_of_4*.pid"))  # the marker goes when the cell is done


def test_macro_f1_benchmark_runs_quick_and_reads_finished_runs_back(no_write, tmp_path, monkeypatch):
    bench = load("macro_f1")
    rows = bench.main(["--quick", "--output", str(tmp_path / "runs"), "--write"])
    assert [r[:2] for r in rows[:2]] == [[0, "cross_entropy"], [0, "macro_f1"]] and rows[-1][0] == "mean"
    assert not (tmp_path / "results" / "macro_f1.json").exists()  # --quick never stores a result
    monkeypatch.setattr(bench, "tune", lambda *a, **k: pytest.fail("a finished run is read back, not tuned again"))
    assert bench.main(["--quick", "--output", str(tmp_path / "runs")]) == rows


def test_estimators_benchmark_reads_curves_at_equal_work():
    estimators = load("estimators")

    assert estimators.steps_for("mezo") == 400 and estimators.steps_for("fzoo") * 9 * 16 >= 400 * 32
    curve = [[0, 0, 0.0, 0.5], [25, 3600, 100.0, 0.6], [50, 7200, 210.0, 0.72], [75, 10800, 300.0, 0.7]]
    assert estimators.first_reaching(curve, 0.7) == (7200, 210.0)
    assert estimators.first_reaching(curve, 0.8) == (None, None)
    assert estimators.at_budget(curve, 250.0) == 0.72 and estimators.at_budget(curve, 50.0) == 0.5
    assert estimators.mean_sd([1.0, 3.0]) == "2.00 (sd 1.41)" and estimators.mean_sd([]) == "-"


def test_make_run_keeps_the_rows_of_another_dtype(no_write, monkeypatch):
    """A run on one CPU replaces the rows of the dtype it used and keeps the others (the bf16 row of a CPU with
    AVX512-BF16 beside the fp32 row of one without), each with the date it was measured on."""
    make_run = load("make_run")
    results = no_write.parent / "results"
    monkeypatch.setattr(make_run, "RESULTS", results)
    header = ["--dtype", "dtype used", "CPU", "wall minutes, all of make run", "measured on"]
    assert make_run.kept_rows(header, [["auto", "fp32", "B", "20.7", "2026-12-07"]]) == []  # nothing stored yet
    results.mkdir()
    (results / "make_run.json").write_text(json.dumps({"columns": header[:4], "rows": [
        ["auto", "bf16", "A", "6.1"], ["auto", "fp32", "C", "30.0"]], "environment": {"date": "2026-12-02T04:12"}}))
    assert make_run.kept_rows(header, [["auto", "fp32", "B", "20.7", "2026-12-07"]]) == [
        ["auto", "bf16", "A", "6.1", "2026-12-02"]]
