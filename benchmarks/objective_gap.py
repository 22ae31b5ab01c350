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
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, publish  # noqa: E402

# name -> zo-tune options; each sets its objective and learning rate explicitly
CONFIGS = {
    "cross_entropy": ["--objective", "cross_entropy", "--lr", "1e-5"],
    # SQuAD: metric objectives sum an answer's token log-likelihoods (4.4 tokens on average) where cross-entropy
    # averages them, so their SPSA steps are ~4x longer at the same lr; this gives cross-entropy the same length
    "cross_entropy_4x": ["--objective", "cross_entropy", "--lr", "4e-5"],
    "accuracy_hard": ["--objective", "accuracy", "--temperature", "0", "--lr", "1e-5"],
    "accuracy_mean": ["--objective", "accuracy", "--metric-form", "mean", "--lr", "1e-4"],
    "accuracy": ["--objective", "accuracy", "--lr", "1e-5"],  # the default: log form at T = 1
    "squad_f1_greedy": ["--objective", "squad_f1", "--temperature", "0", "--lr", "1e-5"],
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
    parser.add_argument("--environment", default=None,
                        help="with --collect: where the runs were measured (replaces this machine's description)")
    parser.add_argument("--write", action="store_true", help="update the objective_gap section of BENCHMARKS.md")
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
                     config.get("temperature"), config.get("form") or "-", config.get("support") or "-",
                     "-" if before is None else f"{before:.4f}",
                     *(f"{r['evals'][k]:.4f}" if k in r["evals"] else "-" for k in steps),
                     f"{r['tied']:.0%}", "-" if r["step"] is None else f"{r['step']:.1e}",
                     f"{r['seconds'] / 60:.1f}"])
    metric = runs[names[-1]]["config"]["metric"]
    table = markdown_table(["objective", "lr", "update", "eps", "temperature", "form", "support",
                            f"dev {metric} before", *(f"step {k}" for k in steps), "tied steps",
                            "median step length", "train minutes"], rows)
    done = "" if all(r["steps_done"] == args.steps for r in runs.values()) else (
        " Runs stopped early: " + ", ".join(f"{n} at step {r['steps_done']}" for n, r in runs.items()) + ".")
    how = "read from the run folders as they were (--collect)" if args.collect else (
        f"{args.jobs} job(s) at a time, {args.threads or 'default'} thread(s) each "
        f"({(time.time() - began) / 60:.0f} min in all, rows marked reused read from earlier runs with the same "
        "options)")
    title = (f"Task {args.task}, {args.steps} steps x batch {args.batch_size}, seed {args.seed}, dev examples: "
             f"{args.eval_size or 'all'}; {how}.{done}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    section = f"objective_gap_{args.task}" + (f"_s{args.seed}" if args.seed else "") + ("_cuda" if on_gpu else "")
    heading = f"Objective gap ({args.task}, seed {args.seed}{', GPU' if on_gpu else ''})"
    publish(section, heading, title, table, device, args.write, environment=args.environment)
    return rows


if __name__ == "__main__":
    main()
