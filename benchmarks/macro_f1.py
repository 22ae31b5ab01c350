"""Macro-F1 as the objective against cross-entropy on an imbalanced task: held-out macro-F1, seed by seed.

CB (shipped: 32 rows, 19 entailment / 10 contradiction / 3 neutral) is tuned with ``--objective macro_f1`` (macro-F1
over every class, those a batch lacks included: ``zo_objectives.objectives.MacroF1Objective``) and with
``--objective cross_entropy``, each with its default lr, on the rows of the training pool that
``--heldout-fraction`` leaves, and evaluated on the rows it holds out (drawn by the seed, never trained on):
macro-F1 first, accuracy beside it. Each run is a zo-tune run folder under ``--output``; a folder whose run
finished is read back, so an interrupted invocation picks up where it stopped.

    python benchmarks/macro_f1.py --write          # smollm2-135m, 100 steps, seeds 0 1 2 (BENCHMARKS.md's run)
    python benchmarks/macro_f1.py --seeds 1 --objectives macro_f1   # one run per process, then --write reads back

A run of 100 steps takes about 15 minutes of one CPU thread on a 2-core AMD EPYC (fp32): six of them were what
the session could hold, not a budget chosen to favour either objective.
    python benchmarks/macro_f1.py --quick          # tiny-random, 2 steps, one seed: checks that the script runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import publish  # noqa: E402

from zo_objectives.cli import tune  # noqa: E402
from zo_objectives.config import TuneConfig  # noqa: E402

OBJECTIVES = ("cross_entropy", "macro_f1")
METRICS = ["macro_f1", "accuracy"]  # held-out, the headline first


def run_one(args: argparse.Namespace, objective: str, seed: int) -> dict:
    """One run's eval.json (tuned now, or read back from a finished run folder) with its lr and the training
    objective's mean over the first and the last quarter of its steps (``train_quarters``)."""
    folder = Path(args.output) / args.task / f"{objective}-{args.steps}steps-s{seed}"
    done = folder / "eval.json"
    if not (done.exists() and json.loads(done.read_text()).get("after") is not None):
        config = TuneConfig(model=args.model, task=args.task, objective=objective, seed=seed, steps=args.steps,
                            batch_size=args.batch_size, heldout_fraction=args.heldout_fraction, metrics=METRICS,
                            eval_every=0, output_dir=str(folder), progress=False, dtype=args.dtype)
        began = time.time()
        summary = tune(config, overwrite=True)
        print(f"{objective} seed {seed}: held-out macro-F1 {summary['before']:.4f} -> {summary['after']:.4f} "
              f"({(time.time() - began) / 60:.1f} min)", flush=True)
    return {**json.loads(done.read_text()), "train_quarters": train_quarters(folder, objective),
            "lr": json.loads((folder / "config.json").read_text())["lr"]}


def train_quarters(folder: Path, objective: str) -> tuple[float, float]:
    """The training objective (``train/<objective>``: the batch's expected macro-F1, or its cross-entropy) averaged
    over the first and the last quarter of the run's steps: whether it learned on the rows it saw."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    values = [r[f"train/{objective}"] for r in rows]
    quarter = max(1, len(values) // 4)
    return statistics.mean(values[:quarter]), statistics.mean(values[-quarter:])


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} (sd {100 * sd:.1f})"


def main(argv: list[str] | None = None) -> list[list]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="cb", help="an imbalanced classification task (default: CB)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES),
                        help="run only these (to split the runs over processes; --write wants both)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--heldout-fraction", type=float, default=0.5,
                        help="the share of the training pool held out for evaluation (CB: 16 of 32 rows at 0.5)")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default="runs/macro_f1", help="where the run folders go")
    parser.add_argument("--quick", action="store_true", help="tiny-random, 2 steps, seed 0: check that it runs")
    parser.add_argument("--write", action="store_true", help="store benchmarks/results/macro_f1.json and its "
                                                             "BENCHMARKS.md section")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.seeds = "tiny-random", 2, [0]
        args.output = str(Path(args.output) / "quick")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.write and sorted(args.objectives) != sorted(OBJECTIVES):
        parser.error(f"--write compares both objectives: drop --objectives (accepted with --write: {OBJECTIVES})")
    results = {(o, s): run_one(args, o, s) for s in args.seeds for o in args.objectives}
    rows = []
    for seed in args.seeds:
        for objective in args.objectives:
            r = results[objective, seed]
            first, last = r["train_quarters"]
            rows.append([seed, objective, f"{100 * r['before']:.1f}", f"{100 * r['after']:.1f}",
                         f"{100 * r['after_metrics']['accuracy']:.1f}", f"{first:.3f} -> {last:.3f}",
                         f"{r['train_seconds'] / 60:.1f}"])
    for objective in args.objectives:
        mine = [results[objective, s] for s in args.seeds]
        rows.append(["mean", objective, mean_sd([r["before"] for r in mine]), mean_sd([r["after"] for r in mine]),
                     mean_sd([r["after_metrics"]["accuracy"] for r in mine]), "", ""])
    first = results[args.objectives[0], args.seeds[0]]
    header = ["seed", "objective", "held-out macro-F1 before", "held-out macro-F1 after", "held-out accuracy after",
              "training objective, first -> last quarter of steps", "minutes"]
    lrs = ", ".join(f"{o} {results[o, args.seeds[0]]['lr']:g}" for o in args.objectives)
    title = (f"{args.model} on {args.task}, {args.steps} steps, batch {args.batch_size}, each objective with its "
             f"default lr ({lrs}); evaluated on the {first['examples']} rows of the training pool held out by "
             f"--heldout-fraction {args.heldout_fraction} (drawn by the seed, never trained on), x 100. macro_f1 "
             "counts every class in every batch; cross_entropy is MeZO's objective.")
    publish("macro_f1", f"Macro-F1 objective against cross-entropy ({args.task})", title, header, rows, "cpu",
            args.write and not args.quick,
            params={"task": args.task, "model": args.model, "steps": args.steps, "seeds": args.seeds,
                    "batch_size": args.batch_size, "heldout_fraction": args.heldout_fraction,
                    "after": {o: [results[o, s]["after"] for s in args.seeds] for o in args.objectives}})
    return rows


if __name__ == "__main__":
    main()
