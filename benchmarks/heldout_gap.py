"""The objective gap on dev examples no choice was made on: re-evaluates saved ``objective_gap.py`` runs.

``objective_gap.py`` evaluates on the first ``--eval-size`` dev examples, the same ones the defaults were
compared on (for SQuAD, ``--eval-size 500``: the "choose" slice of ``tasks.SQUAD_DEV_SLICES``). This script
evaluates the tuned weights of the same run folders on dev examples ``[--start, --end)`` instead (by default
SQuAD's "confirm" slice, dev 500-999, on articles the choose slice does not hold), and tabulates, seed by seed,
two configurations and their gap on each slice and on both together. The untuned model is evaluated on the
held-out slice too. Each result is stored next to the weights (``heldout_<start>_<end>.json``), so an interrupted
invocation picks up what is done. ``--jobs`` evaluations run at a time, each in its own process with
``--threads`` threads; ``--write`` updates the ``heldout_gap_<task>`` section of BENCHMARKS.md.

    python benchmarks/heldout_gap.py --task squad --runs runs/gap runs/gap_s1 --jobs 2 --threads 1 --write
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import publish  # noqa: E402

from metrics import get_metric  # noqa: E402
from tasks import SQUAD_DEV_SLICES, get_task  # noqa: E402
from zo_objectives.evaluate import evaluate_model  # noqa: E402
from zo_objectives.models import load_model, load_run_weights  # noqa: E402
from zo_objectives.runfolder import write_json  # noqa: E402
from zo_objectives.scoring import predictor_for  # noqa: E402


def result_path(folder: Path, args: argparse.Namespace) -> Path:
    return folder / f"heldout_{args.start}_{args.end}.json"


def heldout(folder: Path, args: argparse.Namespace, tuned: bool = True) -> float:
    """Dev metric on dev[start:end] of a run's tuned weights, or with ``tuned=False`` of the untuned model
    (the result then goes in ``folder``); read from, or written to, the result file."""
    path = result_path(folder, args)
    if path.exists():
        return json.loads(path.read_text())["value"]
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    # in the dtype the runs were tuned and evaluated in (the untuned model: the runs' dtype, args.dtype)
    config = json.loads((folder / "config.json").read_text()) if tuned else {"model": args.model, "dtype": args.dtype}
    name = config["model"]
    model, tokenizer = load_model(name, config.get("dtype", "fp32"))
    if tuned:
        load_run_weights(model, folder)
    examples = task.examples("dev")[args.start:args.end]
    began = time.time()
    value = evaluate_model(model.eval(), predictor_for(task, tokenizer), examples, get_metric(task.metric))
    write_json(path, {"run": str(folder) if tuned else None, "model": name, "dtype": config.get("dtype", "fp32"),
                      "start": args.start, "end": args.end, "metric": task.metric, "value": value,
                      "seconds": time.time() - began})
    print(f"{folder if tuned else name}: {value:.4f}", flush=True)
    return value


def first_slice(folder: Path) -> float:
    """The run's own evaluation (the first eval_size dev examples), from eval.json."""
    return json.loads((folder / "eval.json").read_text())["after"]


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):+.1f} (sd {100 * sd:.1f})"


def main(argv: list[str] | None = None) -> list[list]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="squad")
    parser.add_argument("--runs", nargs="+", required=True, help="objective_gap.py --output folders, one per seed")
    parser.add_argument("--configs", default="cross_entropy_4x,squad_f1",
                        help="two configuration names: the reference, then the metric objective")
    parser.add_argument("--start", type=int, default=SQUAD_DEV_SLICES["confirm"][0],
                        help="first held-out dev example (default: SQuAD's confirm slice)")
    parser.add_argument("--end", type=int, default=SQUAD_DEV_SLICES["confirm"][1])
    parser.add_argument("--model", default="smollm2-135m", help="the untuned model (for the untuned row)")
    parser.add_argument("--jobs", type=int, default=1, help="evaluations at a time, one process each")
    parser.add_argument("--threads", type=int, default=None, help="threads per evaluation")
    parser.add_argument("--write", action="store_true", help="update the heldout_gap section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",")]
    if len(names) != 2:
        parser.error(f"--configs takes two names (reference, metric objective), got {names}")
    if not 0 <= args.start < args.end:
        parser.error(f"need 0 <= --start < --end, got {args.start} and {args.end}")
    if args.threads:
        torch.set_num_threads(args.threads)  # so that the environment line states the threads per evaluation
    folders = [[Path(r) / args.task / n for n in names] for r in args.runs]
    missing = [str(f) for pair in folders for f in pair if not (f / "model.safetensors").exists()]
    if missing:
        raise SystemExit(f"no tuned weights (model.safetensors) in: {', '.join(missing)}")
    first = json.loads((folders[0][0] / "config.json").read_text())
    eval_size, args.dtype = first["eval_size"], first.get("dtype", "fp32")
    if args.start < eval_size:
        raise SystemExit(f"--start {args.start} overlaps the runs' own dev examples (the first {eval_size})")
    task = get_task(args.task)
    available = len(task.examples("dev"))
    if args.end > available:
        raise SystemExit(f"--end {args.end}: the {args.task} dev set has {available} examples")
    base = Path(args.runs[0]) / args.task  # where the untuned model's result goes
    jobs = [(base, False)] + [(f, True) for pair in folders for f in pair]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        values = dict(zip(jobs, pool.map(heldout, [f for f, _ in jobs], [args] * len(jobs), [t for _, t in jobs])))
    n_held = args.end - args.start
    rows, gaps = [], []  # gaps: per seed, (first slice, held-out slice, both)
    for pair in folders:
        seed = json.loads((pair[0] / "config.json").read_text())["seed"]
        first = [first_slice(f) for f in pair]
        held = [values[f, True] for f in pair]
        gap = first[1] - first[0], held[1] - held[0]
        gaps.append((*gap, (gap[0] * eval_size + gap[1] * n_held) / (eval_size + n_held)))
        rows.append([seed, *(f"{100 * v:.1f}" for v in first), f"{100 * gap[0]:+.1f}",
                     *(f"{100 * v:.1f}" for v in held), f"{100 * gap[1]:+.1f}", f"{100 * gaps[-1][2]:+.1f}"])
    rows.append(["mean", "", "", mean_sd([g[0] for g in gaps]), "", "", mean_sd([g[1] for g in gaps]),
                 mean_sd([g[2] for g in gaps])])
    header = ["seed", *(f"{n}, dev 0-{eval_size}" for n in names), "gap",
              *(f"{n}, dev {args.start}-{args.end}" for n in names), "gap",
              f"gap on both ({eval_size + n_held} examples)"]
    title = (f"Task {args.task}, dev {task.metric} x 100 of each run's tuned weights; "
             f"gap = {names[1]} minus {names[0]}. Runs: {', '.join(args.runs)}. "
             f"The untuned model on dev {args.start}-{args.end}: {100 * values[base, False]:.1f}. Every evaluation "
             f"in the runs' dtype ({args.dtype}).")
    publish(f"heldout_gap_{args.task}", f"Objective gap on held-out dev examples ({args.task})", title, header, rows,
            "cpu", args.write, params={"task": args.task, "configs": names, "start": args.start, "end": args.end,
                                       "eval_size": eval_size, "untuned": values[base, False]})
    return rows


if __name__ == "__main__":
    main()
