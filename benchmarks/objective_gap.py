"""Metric objective vs cross-entropy at the same forward-pass budget: runs zo-tune per configuration.

Every configuration uses the same task, seed, training sample, steps, batch size and dev set, so each
makes the same number of forward passes. The table reports dev metric before and after, the fraction of
steps whose two losses tied (no signal), the median step length (lr * |g|, the multiple of the noise z a step
moves the weights by: objectives on different scales move at different speeds at the same lr), and the wall
time. Configurations run as separate processes, ``--jobs`` at a time, each with ``--threads`` threads.

    python benchmarks/objective_gap.py --task sst2 --steps 400 --jobs 2 --threads 1 --write

``--reuse`` reads a configuration whose run folder already holds eval.json instead of running it again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load_results, markdown_table, publish, store  # noqa: E402

# name -> zo-tune options; each sets its objective and learning rate explicitly
CONFIGS = {
    "cross_entropy": ["--objective", "cross_entropy", "--lr", "1e-5"],
    # SQuAD: metric objectives sum an answer's token log-likelihoods (4.4 tokens on average) where cross-entropy
    # averages them, so their SPSA steps are ~4x longer at the same lr; this gives cross-entropy the same length
    "cross_entropy_4x": ["--objective", "cross_entropy", "--lr", "4e-5"],
    "accuracy_hard": ["--objective", "accuracy", "--smoothing", "0", "--lr", "1e-5"],
    "accuracy_mean": ["--objective", "accuracy", "--metric-form", "mean", "--lr", "1e-4"],
    "accuracy": ["--objective", "accuracy", "--lr", "1e-5"],  # the default: log form at T = 1, = cross-entropy here
    "squad_f1_greedy": ["--objective", "squad_f1", "--smoothing", "0", "--lr", "1e-5"],
    "squad_f1": ["--objective", "squad_f1", "--lr", "1e-5"],  # the default: log form, options weighed by the model
    "squad_f1_options": ["--objective", "squad_f1", "--metric-support", "options", "--lr", "1e-5"],
    "squad_f1_mean": ["--objective", "squad_f1", "--sequence-score", "mean", "--lr", "1e-5"],
    # normalized updates move ~lr * z per step whatever the loss's scale: both objectives at one lr, one step length
    "cross_entropy_normalized": ["--objective", "cross_entropy", "--update", "normalized", "--lr", "8e-4"],
    "squad_f1_normalized": ["--objective", "squad_f1", "--update", "normalized", "--lr", "8e-4"],
}


def run(name: str, options: list[str], args: argparse.Namespace, out: Path) -> subprocess.Popen:
    """Start zo-tune for one configuration; its run folder and log go under ``out``."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "zo_objectives.cli", "--task", args.task, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--eval-every", str(args.steps), "--seed", str(args.seed),
           "--output-dir", str(folder), "--overwrite", "--no-progress", *options, *args.extra]
    if args.eval_size:
        cmd += ["--eval-size", str(args.eval_size)]
    if args.device:
        cmd += ["--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else dict(os.environ)
    with open(folder.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.folder, proc.name, proc.cmd = folder, name, cmd  # type: ignore[attr-defined]
    return proc


def step_length(folder: Path) -> float | None:
    """Median over steps of |lr * g|, the multiple of z each step moves the weights by (from trajectory.json)."""
    path = folder / "trajectory.json"
    if not path.exists():
        return None
    if (folder / "trajectory.jsonl").exists():  # the records, one per line (the head holds their count)
        count = json.loads(path.read_text())["records"]["count"]
        records = [json.loads(line) for line in (folder / "trajectory.jsonl").read_text().splitlines()[:count]]
    else:  # a run folder written before checkpoints were appended
        records = json.loads(path.read_text())["optimizer"]["mezo"]["trajectory"]
    lengths = [abs(r["lrs"][0] * g) for r in records for g in r["grads"] if g is not None]
    return statistics.median(lengths) if lengths else None


def summarize(folder: Path) -> dict:
    """A run folder's config, dev metric before training, evals by step, tied fraction, step length and
    training seconds."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result = json.loads((folder / "eval.json").read_text()) if (folder / "eval.json").exists() else {}
    return {"config": json.loads((folder / "config.json").read_text()), "before": result.get("before"),
            "evals": {r["step"]: r["eval"] for r in rows if "eval" in r},
            "tied": sum(r["tied"] for r in rows) / max(1, len(rows)), "step": step_length(folder),
            "seconds": sum(r["seconds"] for r in rows), "steps_done": rows[-1]["step"] if rows else 0}


def main(argv: list[str] | None = None) -> list[list]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--configs", default="cross_entropy,accuracy,accuracy_mean,accuracy_hard",
                        help=f"comma-separated names from: {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None, help="zo-tune's --device (default: CUDA when available)")
    parser.add_argument("--output", default="runs/objective_gap")
    parser.add_argument("--reuse", action="store_true",
                        help="read configurations whose run folder already holds eval.json instead of rerunning them")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: tabulate the run folders under --output as they are (finished or not)")
    parser.add_argument("--environment", type=json.loads, default=None,
                        help="with --collect: a JSON object of where the runs were measured (hardware, device, torch, "
                        "transformers, command), replacing this machine's entries")
    parser.add_argument("--write", action="store_true", help="store this seed's result (benchmarks/results) and "
                        "update the objective_gap section of BENCHMARKS.md (all seeds of the task in one table)")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more zo-tune options after --")
    args = parser.parse_args(argv)
    args.extra = [a for a in args.extra if a != "--"]
    names = [n.strip() for n in args.configs.split(",")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; available: {', '.join(CONFIGS)}")

    out = Path(args.output) / args.task
    reused = [] if args.collect else [n for n in names if args.reuse and (out / n / "eval.json").exists()]
    pending, running = [] if args.collect else [n for n in names if n not in reused], []
    began = time.time()
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            running.append(run(name, CONFIGS[name], args, out))
        time.sleep(2)
        for proc in [p for p in running if p.poll() is not None]:
            running.remove(proc)
            if proc.returncode:
                raise SystemExit(f"{proc.name} failed ({proc.returncode}): {' '.join(proc.cmd)}")
            print(f"{proc.name} done", flush=True)
    runs = {name: summarize(out / name) for name in names}
    steps = sorted({k for r in runs.values() for k in r["evals"]})
    rows = []
    for name, r in runs.items():
        config, before = r["config"], r["before"]
        rows.append([name + (" (reused)" if name in reused else ""), config["lr"],
                     config["optimizer"].get("update", "sgd"), config["optimizer"]["eps"],
                     config.get("smoothing", config.get("temperature")), config.get("form") or "-",
                     config.get("support") or "-",
                     "-" if before is None else f"{before:.4f}",
                     *(f"{r['evals'][k]:.4f}" if k in r["evals"] else "-" for k in steps),
                     f"{r['tied']:.0%}", "-" if r["step"] is None else f"{r['step']:.1e}",
                     f"{r['seconds'] / 60:.1f}"])
    metric = runs[names[-1]]["config"]["metric"]
    header = ["objective", "lr", "update", "eps", "temperature", "form", "support", f"dev {metric} before",
              *(f"step {k}" for k in steps), "tied steps", "median step length", "train minutes"]
    stopped = "" if all(r["steps_done"] == args.steps for r in runs.values()) else (
        ", ".join(f"{n} at step {r['steps_done']}" for n, r in runs.items()))
    done = f" Runs stopped early: {stopped}." if stopped else ""
    how = "read from the run folders as they were (--collect)" if args.collect else (
        f"{args.jobs} job(s) at a time, {args.threads or 'default'} thread(s) each "
        f"({(time.time() - began) / 60:.0f} min in all, rows marked reused read from earlier runs with the same "
        "options)")
    title = (f"Task {args.task}, {args.steps} steps x batch {args.batch_size}, seed {args.seed}, dev examples: "
             f"{args.eval_size or 'all'}; {how}.{done}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    section = f"objective_gap_{args.task}_s{args.seed}" + ("_cuda" if on_gpu else "")
    heading = f"Objective gap ({args.task}, seed {args.seed}{', GPU' if on_gpu else ''})"
    params = {"task": args.task, "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size,
              "eval_size": args.eval_size, "metric": metric, "stopped": stopped}
    publish(section, heading, title, header, rows, device, args.write, environment=args.environment, params=params,
            markdown=False)
    if args.write:
        store(seeds_table(args.task, on_gpu))
    return rows


def _percent(cell: str | None) -> Decimal | None:
    """A stored metric cell (a fraction, as written) x 100, exact: no second rounding of a rounded value."""
    try:
        return Decimal(cell) * 100
    except (InvalidOperation, TypeError):
        return None


def generic_command(command: str) -> str:
    """A seed's command with the seed, its output folder and the configurations left open."""
    command = re.sub(r"--seed \d+", "--seed S", command)
    command = re.sub(r"--output (\S+?)(_s\d+)?(?=\s|$)", r"--output \1_sS", command)
    return re.sub(r"--configs \S+", "--configs NAMES", command)


def seeds_table(task: str, gpu: bool, results: dict[str, dict] | None = None) -> dict:
    """One result from every stored seed of ``task`` on CPU (or GPU): dev metric x 100 with seeds as columns, their
    mean and standard deviation at the last evaluation, and each seed's median step length."""
    results = load_results() if results is None else results
    device = "cuda" if gpu else "cpu"
    seeds = sorted((r for r in results.values() if r["params"].get("task") == task and "seed" in r["params"]
                    and r["environment"].get("device", "cpu") == device), key=lambda r: r["params"]["seed"])
    if not seeds:
        raise SystemExit(f"no stored results of objective_gap.py for task {task!r} on {device}")
    ids = [r["params"]["seed"] for r in seeds]
    cells: dict[str, dict[int, dict[str, str]]] = {}  # objective -> seed -> column -> cell
    for r in seeds:
        for row in r["rows"]:
            cells.setdefault(row[0].removesuffix(" (reused)"), {})[r["params"]["seed"]] = dict(zip(r["columns"], row))
    evals = sorted({c for r in seeds for c in r["columns"] if c.startswith("step ") or c == "after"},
                   key=lambda c: (c == "after", int(c.split()[1]) if c != "after" else 0))
    rows, lengths = [], []
    for name, by_seed in cells.items():
        first = next(iter(by_seed.values()))
        row = [name, first["lr"], first.get("update", "sgd")]
        values = [[_percent(by_seed.get(s, {}).get(column)) for s in ids] for column in evals]
        row += ["-" if v is None else f"{v:.2f}" for per_step in values for v in per_step]
        last = [v for v in values[-1] if v is not None]
        if len(ids) > 1:
            row += [f"{statistics.mean(last):.2f}", f"{statistics.stdev(last):.2f}"] if len(last) > 1 else ["-", "-"]
        row += [first.get("tied steps", "-"), first.get("train minutes", "-")]
        rows.append(row)
        lengths.append([name, *(by_seed.get(s, {}).get("median step length", "-") for s in ids)])
    prefix = [] if len(evals) == 1 else [f"{c}, " for c in evals]
    header = ["objective", "lr", "update", *(f"{p}seed {s}" for p in prefix or [""] for s in ids)]
    if len(ids) > 1:
        header += ["mean" if len(evals) == 1 else f"mean ({evals[-1]})", "sd"]
    header += [f"tied steps (seed {ids[0]})", f"train minutes (seed {ids[0]})"]
    p = seeds[0]["params"]
    befores = {c.get(k) for by in cells.values() for c in by.values() for k in c if k.endswith(" before")} - {"-"}
    title = (f"Dev {p['metric']} x 100 after tuning on {task}, by seed: {p['steps']} steps x batch {p['batch_size']}, "
             f"dev examples: {p['eval_size'] or 'all'}"
             + (f"; before tuning {_percent(befores.pop()):.2f}" if len(befores) == 1 else "") + ".")
    stopped = " ".join(f"Seed {r['params']['seed']}: stopped early, {r['params']['stopped']}." for r in seeds
                       if r["params"].get("stopped"))
    table = markdown_table(["objective", *(f"seed {s}" for s in ids)], lengths)
    notes = "\n\n".join(filter(None, [
        " ".join(filter(None, [stopped, *dict.fromkeys(r.get("notes", "") for r in seeds)])),
        f"Median step length (lr x |projected gradient| over the steps, from each run's trajectory):\n\n{table}"
        if any(c != "-" for r in lengths for c in r[1:]) else "",
        f"Each seed's own table, exact command and date: `benchmarks/results/objective_gap_{task}_sS"
        f"{'_cuda' if gpu else ''}.json`."]))
    env = {**seeds[0]["environment"], "command": generic_command(seeds[0]["environment"]["command"])}
    section = f"objective_gap_{task}" + ("_cuda" if gpu else "")
    result = {"section": section, "heading": f"Objective gap ({task}{', GPU' if gpu else ''})", "title": title,
              "columns": header, "rows": rows, "notes": notes, "environment": env,
              "params": {"task": task, "seeds": ids, "device": device}}
    if "tabulated_by" in seeds[0]:
        result["tabulated_by"] = {**seeds[0]["tabulated_by"],
                                  "command": generic_command(seeds[0]["tabulated_by"]["command"])}
    return result


if __name__ == "__main__":
    main()
