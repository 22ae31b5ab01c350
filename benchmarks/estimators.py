"""Estimators against each other at equal work: how much does a forward pass teach the model?

Protocol 1 (the ``make run`` setting): SmolLM2-135M on SST-2, 1,000 training rows, batches of 16, the whole dev
set (872 rows) scored at fixed points. Each row is one estimator (``zo-tune --estimator NAME``) or backpropagation
with AdamW on the same rows, run for MeZO's 400-step budget of process CPU time; per row and seed the dev accuracy
against forward rows (examples x passes: a MeZO step scores 2 x 16 rows, an FZOO step (N + 1) x 16, a population
step N x 16) and against the process CPU time of the tuning steps (evaluations excluded), and the peak RSS beside an
inference process's. Settings are chosen on training data only (``--grid``: the training loss after a fixed budget,
the same number of lrs for every method).

Protocol 3: SQuAD under the F1 objective, batches of 8: F1 on the confirm slice (dev 500-999) at the CPU time of
MeZO's 60 steps (cells ``squad-ROW/SEED``, ``--squad-table``).

Every (row, seed) cell runs in its own process and writes ``benchmarks/results/estimators/sst2/<row>-s<seed>.json``
when it finishes; a finished cell is never run again, a stopped one resumes from its run folder's checkpoint
(``runs/estimators/``).

    python benchmarks/estimators.py --cell mezo/0              # one cell (the command printed beside it)
    python benchmarks/estimators.py --cells mezo/0,fzoo/0 --workers 2
    python benchmarks/estimators.py --grid fzoo --seed 0       # the lr grid on training data (a JSON per point)
    python benchmarks/estimators.py --table --write            # BENCHMARKS.md "Estimators" and estimators.json
    python benchmarks/estimators.py --cells squad-mezo/0,squad-fzoo/0 --workers 2 --squad-table --write
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, ROOT, markdown_table, publish  # noqa: E402

from tasks import SQUAD_DEV_SLICES  # noqa: E402

CELLS = RESULTS / "estimators" / "sst2"
RUNS = ROOT / "runs" / "estimators" / "sst2"
MODEL, TASK, TRAIN, BATCH, DEV = "smollm2-135m", "sst2", 1000, 16, 872
MEZO_STEPS = 400  # the make run budget: MeZO's 400 steps of CPU time is every row's budget
# the rows: zo-tune flags per estimator (lr chosen by --grid on training data; see LRS)
ROWS = {
    "mezo": ["--estimator", "mezo"],
    "fzoo": ["--estimator", "fzoo", "--n-perturbations", "8"],
    "fzoo-lr2e-6": ["--estimator", "fzoo", "--n-perturbations", "8"],
    # the population setting that reached MeZO's accuracy in 0.37 x its CPU time on the Xeon (BENCHMARKS.md
    # "Population quality per time"): 4 members of rank 4 on batches of 8, 32 rows a step as MeZO's
    "population": ["--estimator", "population", "--population", "4", "--perturbation-rank", "4", "--batch-size", "8"],
    # one antithetic pair of rank-1 members per example: MeZO's 2 x 16 rows a step, 16 directions
    "grzo": ["--estimator", "grzo"],
}
ROWS_PER_STEP = {"mezo": 2 * BATCH, "fzoo": 9 * BATCH, "fzoo-lr2e-6": 9 * BATCH, "population": 4 * 8, "grzo": 2 * BATCH}
# MeZO: the make run lr. FZOO: a first placeholder (1e-7; no published lr was found), and the lr that
# matches MeZO's expected progress per forward row, from training statistics: FZOO moves lr / eps along the
# gradient per step; MeZO lr_mezo * |grad| (|grad| ~ 15.5, the spread of MeZO's projected gradients on the
# training batches of mezo/0), 4.5 MeZO steps per FZOO step of rows: 1e-3 * 1e-5 * 15.5 * 4.5 = 7e-7, times about
# 3 for the lower variance of 8 averaged directions: 2e-6 (now FZOO's default). No dev row chose an lr (--grid
# was not run)
# GRZO: its default, FZOO's step length (lr / eps 2e-3; its step is lr / (2 eps) along a normalized estimate),
# checked against the training statistics of benchmarks/per_example_directions.py: with r = 0.23 its expected
# progress per step is about 3x MeZO's at a smaller move per weight (docs/estimators.md). No dev row chose it
LRS = {"mezo": 1e-5, "fzoo": 1e-7, "fzoo-lr2e-6": 2e-6, "population": 2e-5, "grzo": 2e-6}
GRID = {"mezo": [3e-6, 1e-5, 3e-5], "fzoo": [1e-7, 1e-6, 1e-5], "population": [7e-6, 2e-5, 6e-5]}
EVALS = 4  # dev evaluations per run, evenly spaced in steps (each scores 872 rows: 27 MeZO steps' worth)
BACKPROP_LR = 1e-5  # the seed table's AdamW lr for full fine-tuning (chosen by --grid as the others)

# Protocol 3: SQuAD under the F1 objective (the default log form of the expected F1 over the greedy and gold
# answers), batches of 8, fp32; F1 of greedy answers on the confirm slice (dev 500-999) after each row's steps.
# Its budget is MeZO's 60 steps of CPU time. A row's steps are that budget over its CPU time per step, from a
# 3-step probe of each on the same machine (AMD EPYC, fp32): MeZO 47 s (steps 2-3), FZOO 228 s (step 1: its 9
# members each generate), GRZO 1.45 x MeZO's (steps 1-2: each of its 16 members generates, MeZO's 8 rows once),
# so FZOO was given 12 steps and GRZO 41; FZOO's first 4 steps then took 294 s each (the probe's one step: 228 s),
# so it was cut to 9 after step 5 (stopped and resumed to fewer steps: the same run). The table reports each row's
# CPU time as a multiple of MeZO's, measured.
SQUAD_CELLS, SQUAD_RUNS = RESULTS / "estimators" / "squad", ROOT / "runs" / "estimators" / "squad"
SQUAD_BATCH = 8
SQUAD_ROWS = {"mezo": (60, 1e-5, ["--estimator", "mezo"]),  # steps, lr (objective_gap's squad_f1 lr), flags
              "fzoo": (9, 2e-6, ["--estimator", "fzoo", "--n-perturbations", "8"]),  # lr: FZOO's default
              "grzo": (41, 2e-6, ["--estimator", "grzo"])}  # lr: GRZO's default


def steps_for(row: str) -> int:
    """Steps that score as many rows as MeZO's 400 (rounded up to a multiple of EVALS)."""
    steps = -(-MEZO_STEPS * ROWS_PER_STEP["mezo"] // ROWS_PER_STEP[row])
    return -(-steps // EVALS) * EVALS


def argv_for(row: str, seed: int, steps: int, lr: float, run: Path, eval_every: int, dev: int = DEV,
             train: int = TRAIN) -> list[str]:
    return ["--model", MODEL, "--task", TASK, "--objective", "accuracy", "--dtype", "fp32", "--seed", str(seed),
            "--train-size", str(train), "--batch-size", str(BATCH), "--eval-size", str(dev), "--steps", str(steps),
            "--eval-every", str(eval_every), "--lr", str(lr), "--no-progress", "--output-dir", str(run), *ROWS[row]]


def cell_path(row: str, seed: int) -> Path:
    if row.startswith("squad-"):
        return SQUAD_CELLS / f"{row.removeprefix('squad-')}-s{seed}.json"
    return CELLS / f"{row}-s{seed}.json"


def curve(run: Path, rows_per_step: int) -> dict:
    """The run's dev accuracy against steps, forward rows and tuning CPU seconds (0: before tuning)."""
    summary = json.loads((run / "eval.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    points, cpu = [[0, 0, 0.0, summary.get("before")]], 0.0
    for r in rows:
        cpu += r["cpu_seconds"]
        if "eval" in r:
            points.append([r["step"], r["step"] * rows_per_step, round(cpu, 2), r["eval"]])
    config = json.loads((run / "config.json").read_text())
    return {"curve": points, "cpu_seconds": round(cpu, 2), "steps": len(rows), "lr": config["lr"],
            "eps": config["eps"], "tied_fraction": summary.get("tied_fraction"), "optimizer": config.get("optimizer")}


def zo_cell(row: str, seed: int) -> dict:
    from zo_objectives.cli import tune_main

    steps = steps_for(row)
    run = RUNS / f"{row}-s{seed}"
    argv = argv_for(row, seed, steps, LRS[row], run, steps // EVALS)
    resume = (run / "trajectory.json").exists() and (run / "eval.json").exists()
    code = tune_main([*argv, "--resume" if resume else "--overwrite"])
    if code != 0:
        raise SystemExit(f"zo-tune exited with {code}; the cell resumes from its checkpoint")
    return {**curve(run, ROWS_PER_STEP[row]), "command": "zo-tune " + " ".join(argv)}


def backprop_cell(seed: int, budget: float, lr: float = BACKPROP_LR, dev: int = DEV, train: int = TRAIN) -> dict:
    """AdamW (fp32) on the same rows, batches of 16 in the same seeded order, until its tuning CPU time reaches
    ``budget``; the dev accuracy at EVALS evenly spaced CPU times."""
    from seed_table import backprop_loss

    from metrics import get_metric
    from tasks import get_task
    from zo_objectives.evaluate import evaluate_model
    from zo_objectives.models import load_model
    from zo_objectives.scoring import model_device, predictor_for
    from zo_objectives.train import batch_indices

    torch.manual_seed(seed)
    task = get_task(TASK)
    model, tokenizer = load_model(MODEL, dtype=torch.float32)
    model_device(model)
    predictor, metric = predictor_for(task, tokenizer), get_metric("accuracy")
    train_set, dev_set = task.examples("train", n=train, seed=seed), task.examples("dev")[:dev]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    points = [[0, 0, 0.0, evaluate_model(model, predictor, dev_set, metric)]]
    cpu, step, marks = 0.0, 0, [budget * (k + 1) / EVALS for k in range(EVALS)]
    while marks:
        batch = [train_set[i] for i in batch_indices(len(train_set), BATCH, seed, step)]
        c0 = time.process_time()
        model.train()
        loss = backprop_loss(model, tokenizer, task.kind, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        cpu += time.process_time() - c0
        step += 1
        if cpu >= marks[0]:
            marks.pop(0)
            model.eval()
            with torch.no_grad():
                points.append([step, step * BATCH * 3, round(cpu, 2), evaluate_model(model, predictor, dev_set,
                                                                                      metric)])
    # a backprop step: a forward, and a backward of about twice its cost: counted as 3 forward passes of its rows
    return {"curve": points, "cpu_seconds": round(cpu, 2), "steps": step, "lr": lr,
            "command": f"python benchmarks/estimators.py --cell backprop/{seed}"}


def squad_cell(row: str, seed: int) -> dict:
    """Protocol 3: ``row`` tuned on SQuAD's F1 objective for its steps, then the F1 of its weights (or of the
    untuned model, row ``untuned``) on the confirm slice, by heldout_gap.py's evaluation."""
    from heldout_gap import heldout

    from zo_objectives.cli import tune_main

    result, run = {"cpu_seconds": 0.0, "steps": 0}, SQUAD_RUNS / f"{row}-s{seed}"
    if row != "untuned":
        steps, lr, flags = SQUAD_ROWS[row]
        argv = ["--model", MODEL, "--task", "squad", "--objective", "squad_f1", "--dtype", "fp32", "--seed",
                str(seed), "--batch-size", str(SQUAD_BATCH), "--steps", str(steps), "--lr", str(lr), "--eval-size",
                "8", "--eval-every", "0", "--no-eval-before", "--no-progress", "--output-dir", str(run), *flags]
        resume = (run / "trajectory.json").exists()
        if tune_main([*argv, "--resume" if resume else "--overwrite"]) != 0:
            raise SystemExit("zo-tune failed; the cell resumes from its checkpoint")
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        result = {"cpu_seconds": round(sum(r["cpu_seconds"] for r in rows), 2), "steps": len(rows), "lr": lr,
                  "command": "zo-tune " + " ".join(argv).replace(str(ROOT) + "/", "")}
    run.mkdir(parents=True, exist_ok=True)
    start, end = SQUAD_DEV_SLICES["confirm"]
    where = argparse.Namespace(task="squad", start=start, end=end, model=MODEL, dtype="fp32", threads=1)
    return {**result, "f1": heldout(run, where, tuned=row != "untuned")}


def inference_cell() -> dict:
    """Peak RSS of loading the model and scoring the dev set: the memory every row is compared with."""
    from metrics import get_metric
    from tasks import get_task
    from zo_objectives.evaluate import evaluate_model
    from zo_objectives.models import load_model
    from zo_objectives.scoring import predictor_for

    model, tokenizer = load_model(MODEL, dtype=torch.float32)
    task = get_task(TASK)
    value = evaluate_model(model, predictor_for(task, tokenizer), task.examples("dev")[:DEV], get_metric("accuracy"))
    return {"curve": [[0, 0, 0.0, value]], "cpu_seconds": 0.0, "steps": 0,
            "command": "python benchmarks/estimators.py --cell inference/0"}


def run_cell(row: str, seed: int) -> dict:
    torch.set_num_threads(1)  # every row on one thread: CPU seconds compare
    os.chdir(ROOT)
    t0 = time.perf_counter()
    if row.startswith("squad-"):
        result = squad_cell(row.removeprefix("squad-"), seed)
    elif row == "inference":
        result = inference_cell()
    elif row == "backprop":
        result = backprop_cell(seed, mezo_budget())
    else:
        result = zo_cell(row, seed)
    from zo_objectives.models import cpu_name

    result.update(row=row, seed=seed, wall_s=round(time.perf_counter() - t0, 1), cpu=cpu_name(),
                  peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    cell_path(row, seed).parent.mkdir(parents=True, exist_ok=True)
    tmp = cell_path(row, seed).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(cell_path(row, seed))
    return result


def mezo_budget() -> float:
    """MeZO's tuning CPU seconds for its 400 steps, mean over its cells: the budget every row gets (the table's)."""
    mezo = [json.loads(p.read_text())["cpu_seconds"] for p in sorted(CELLS.glob("mezo-s*.json"))]
    if not mezo:
        raise SystemExit("the backprop row runs for MeZO's CPU time: run --cell mezo/0 first")
    return sum(mezo) / len(mezo)


def grid_point(row: str, lr: float, seed: int) -> dict:
    """The training objective after a short run at ``lr``: 1,000 training rows, 25% of MeZO's budget in forward
    rows, the train loss of the last quarter of steps (no dev row is read)."""
    from zo_objectives.cli import tune_main

    torch.set_num_threads(1)
    run = RUNS.parent / "grid" / f"{row}-lr{lr:g}-s{seed}"
    if row == "backprop":
        raise SystemExit("the backprop grid reads the dev set in its curve: not implemented")
    steps = steps_for(row) // 4
    argv = argv_for(row, seed, steps, lr, run, 0, dev=8)[:]
    argv += ["--no-eval-before"]
    assert tune_main([*argv, "--overwrite"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tail = rows[-max(1, len(rows) // 4):]
    result = {"row": row, "lr": lr, "seed": seed, "steps": steps,
              "train_accuracy_last_quarter": sum(r.get("accuracy", float("nan")) for r in tail) / len(tail),
              "loss_last_quarter": sum(r["loss"] for r in tail) / len(tail)}
    out = RESULTS / "estimators" / "grid" / f"{row}-lr{lr:g}-s{seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


def drive(cells: list[str], workers: int) -> None:
    """Run the cells not finished yet, ``workers`` processes at a time, each with its log beside its run folder."""
    pending = [c for c in cells if not cell_path(c.split("/")[0], int(c.split("/")[1])).exists()]
    running: list[subprocess.Popen] = []
    RUNS.mkdir(parents=True, exist_ok=True)
    while pending or running:
        running = [p for p in running if p.poll() is None]
        while pending and len(running) < workers:
            cell = pending.pop(0)
            log = open(RUNS / f"{cell.replace('/', '-s')}.log", "a")
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            running.append(subprocess.Popen([sys.executable, __file__, "--cell", cell], cwd=ROOT, env=env,
                                            stdout=log, stderr=subprocess.STDOUT))
        time.sleep(5)


def half_precision_mezo() -> dict[int, float]:
    """MeZO's final dev accuracy per seed (0-2) in the half-precision benchmark's fp32 runs: the make run
    command in fp32, as the mezo row runs it (same steps, batch, lr, rows)."""
    path = RESULTS / "half_precision.json"
    if not path.exists():
        return {}
    result = json.loads(path.read_text())
    rows = [dict(zip(result["columns"], r)) for r in result["rows"]]
    return {int(r["seed"]): float(r["dev after"]) / 100 for r in rows
            if r["setting"] == "fp32" and r["seed"] in ("0", "1", "2")}


def at_budget(points: list, budget: float) -> float | None:
    """The dev accuracy of the last evaluation within ``budget`` CPU seconds."""
    within = [p for p in points if p[2] <= budget * 1.02 and p[3] is not None]
    return within[-1][3] if within else None


def first_reaching(points: list, target: float) -> tuple[int, float] | tuple[None, None]:
    """(forward rows, CPU seconds) of the first evaluation at or above ``target``."""
    for _, rows, cpu, value in points[1:]:
        if value is not None and value >= target:
            return rows, cpu
    return None, None


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
    return f"{mean:.2f}" + (f" (sd {sd:.2f})" if sd is not None else "")


def table(write: bool) -> dict:
    cells = {p.stem: json.loads(p.read_text()) for p in sorted(CELLS.glob("*.json"))}
    mezo = [c for c in cells.values() if c["row"] == "mezo"]
    if not mezo:
        raise SystemExit("no MeZO cell yet: run --cell mezo/0 first")
    finals = half_precision_mezo() | {c["seed"]: c["curve"][-1][3] for c in mezo}  # a cell's own figure first
    target = sum(finals.values()) / len(finals)
    budget = sum(c["cpu_seconds"] for c in mezo) / len(mezo)
    mezo_rows = MEZO_STEPS * ROWS_PER_STEP["mezo"]
    inference = next((c["peak_rss_mib"] for c in cells.values() if c["row"] == "inference"), None)
    out = []
    for row in [*ROWS, "backprop"]:
        mine = sorted((c for c in cells.values() if c["row"] == row), key=lambda c: c["seed"])
        if not mine:
            continue
        reach = [first_reaching(c["curve"], target) for c in mine]
        at = [at_budget(c["curve"], budget) for c in mine]
        seeds = f"{len(mine)} (+{len(finals) - len(mine)}: last step only)" if row == "mezo" and len(finals) > len(
            mine) else len(mine)
        out.append([row, seeds, f"{mine[0]['lr']:g}",
                    f"{sum(r is not None for r, _ in reach)}/{len(mine)}",
                    mean_sd([r / mezo_rows for r, _ in reach if r is not None]),
                    mean_sd([cpu / budget for _, cpu in reach if cpu is not None]),
                    mean_sd([100 * a for a in at if a is not None]),
                    ", ".join("-" if a is None else f"{100 * a:.2f}" for a in at),
                    mean_sd([100 * a for a in finals.values()]) if row == "mezo" else
                    mean_sd([100 * c["curve"][-1][3] for c in mine]),
                    mean_sd([c["cpu_seconds"] / budget for c in mine]),
                    mean_sd([c["peak_rss_mib"] / inference for c in mine]) if inference else
                    mean_sd([c["peak_rss_mib"] for c in mine]) + " MiB (no inference cell)"])
    header = ["row", "seeds", "lr", "seeds reaching MeZO's accuracy", "forward rows to it, x MeZO's",
              "CPU time to it, x MeZO's", "dev accuracy at MeZO's CPU time", "per seed",
              "dev accuracy at its last step", "its CPU time, x MeZO's", "peak RSS / inference"]
    borrowed = sorted(set(finals) - {c["seed"] for c in mezo})
    notes = (f"Target: MeZO's dev accuracy at step {MEZO_STEPS}, mean over seeds {sorted(finals)} "
             f"({100 * target:.2f}"
             + (f"; seeds {borrowed} from the half-precision benchmark's fp32 runs, the same command on the same CPU "
                "type: a MeZO run is bitwise reproducible, and its seed 0 gave the same accuracy there and here"
                if borrowed else "") + "); budget: "
             f"MeZO's tuning CPU time for {MEZO_STEPS} steps, mean over its seeds ({budget:.0f} s, one thread; "
             "evaluations excluded). Forward rows: the rows a step scores (MeZO 2 x 16, FZOO 9 x 16, population "
             "4 x 8, GRZO 2 x 16; backprop counts 3 x 16: a forward and a backward of about twice its cost), summed "
             f"to the first evaluation at or above the target (evaluations at {EVALS} evenly spaced points). CPU: "
             f"{mezo[0]['cpu']}, shared with other jobs (process CPU seconds, which slow less than wall time). "
             "Commands: " + "; ".join(f"`{c['command'].replace(str(ROOT) + '/', '')}`" for c in cells.values()
                                      if c.get("command")))
    print(markdown_table(header, out))
    print(notes)
    return publish("estimators", "Estimators", "Estimators: SST-2 at MeZO's budget (protocol 1)", header, out, "cpu",
                   write, notes=notes) if write else {}


def squad_table(write: bool) -> dict:
    """Protocol 3's table: F1 on the confirm slice per row, at the CPU time its steps took (x MeZO's)."""
    cells = [json.loads(p.read_text()) for p in sorted(SQUAD_CELLS.glob("*.json"))]
    mezo = [c for c in cells if c["row"] == "squad-mezo"]
    if not mezo:
        raise SystemExit("no protocol-3 MeZO cell yet: run --cell squad-mezo/0 first")
    budget = sum(c["cpu_seconds"] for c in mezo) / len(mezo)
    per_step = budget / mezo[0]["steps"]
    out = []
    for row in ["squad-untuned", *(f"squad-{r}" for r in SQUAD_ROWS)]:
        mine = sorted((c for c in cells if c["row"] == row), key=lambda c: c["seed"])
        if mine:
            out.append([row.removeprefix("squad-"), ", ".join(str(c["seed"]) for c in mine),
                        mine[0]["steps"], f"{mine[0]['lr']:g}" if "lr" in mine[0] else "-",
                        mean_sd([c["cpu_seconds"] / budget for c in mine]),
                        mean_sd([c["cpu_seconds"] / c["steps"] / per_step for c in mine if c["steps"]]),
                        mean_sd([100 * c["f1"] for c in mine]), ", ".join(f"{100 * c['f1']:.2f}" for c in mine),
                        mean_sd([c["peak_rss_mib"] for c in mine])])
    header = ["row", "seeds", "steps", "lr", "tuning CPU time, x MeZO's", "per step, x MeZO's", "F1 on dev 500-999",
              "per seed",
              "peak RSS (MiB)"]
    notes = (f"SmolLM2-135M (fp32) tuned on SQuAD's F1 objective (the expected F1 over each example's greedy answer "
             f"and its gold answers, log form), batches of {SQUAD_BATCH}, then F1 x 100 of greedy answers on the "
             f"confirm slice (dev {SQUAD_DEV_SLICES['confirm'][0]}-{SQUAD_DEV_SLICES['confirm'][1] - 1}, articles "
             "no setting was chosen on). Budget: "
             f"MeZO's tuning CPU time for {SQUAD_ROWS['mezo'][0]} steps ({budget:.0f} s, one thread); each other "
             "row's steps were set from a 3-step probe of its CPU time per step on this machine (FZOO's cut from 12 "
             "to 9 after its first 5 steps ran slower than the probe's), and the column beside it is the CPU time "
             "they took. lr: MeZO's of the objective-gap study, FZOO's and GRZO's "
             "defaults (2e-3 x eps); no row had an lr grid. Issue 33's goal: 33.5 at this budget, what MeZO reached "
             "at step 300 of cross-entropy in the seed table (bf16, Intel Xeon, 100 dev questions of the old file); "
             "the untuned model scores 15.9 on this slice (Baselines). CPU: "
             f"{mezo[0]['cpu']}, shared with other jobs (process CPU seconds). Commands: "
             + "; ".join(f"`{c['command']}`" for c in cells if c.get("command"))
             + "; each cell: `python benchmarks/estimators.py --cell squad-ROW/SEED`.")
    print(markdown_table(header, out))
    print(notes)
    return publish("estimators_squad", "Estimators: SQuAD F1 (protocol 3)",
                   "Estimators: SQuAD F1 at MeZO's 60-step CPU time (protocol 3)", header, out, "cpu", write,
                   notes=notes) if write else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", help="ROW/SEED: run one cell in this process")
    parser.add_argument("--cells", help="ROW/SEED,...: run these cells, --workers at a time")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--grid", help="ROW: its lr grid on training data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--squad-table", action="store_true", help="protocol 3's table")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.cell:
        row, seed = args.cell.split("/")
        print(json.dumps(run_cell(row, int(seed)), indent=1))
    elif args.cells:
        drive(args.cells.split(","), args.workers)
    elif args.grid:
        for lr in GRID[args.grid]:
            print(json.dumps(grid_point(args.grid, lr, args.seed)))
    if args.table:
        table(args.write)
    if args.squad_table:
        squad_table(args.write)


if __name__ == "__main__":
    main()
