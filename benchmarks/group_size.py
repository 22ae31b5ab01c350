"""A MeZO step over two objective evaluations, by the predictor's group size (SST-2, accuracy objective).

Under MeZO each forward pass rebuilds the perturbed weights, so the number of forward passes per closure call
(batch / group size) adds passes over the weights. Rounds alternate between the group sizes in one process.

    python benchmarks/group_size.py --dtype bf16 --threads 1 --write
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DTYPES, publish  # noqa: E402

from tasks import get_task  # noqa: E402
from zo_objectives.estimators import MeZO  # noqa: E402
from zo_objectives.models import load_model  # noqa: E402
from zo_objectives.objectives import make_objective  # noqa: E402
from zo_objectives.scoring import predictor_for  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    task = get_task("sst2")
    train = task.examples("train", n=16 * args.batches, seed=0)
    batches = [train[i * 16:(i + 1) * 16] for i in range(args.batches)]
    rows = []
    for r in range(args.rounds):
        for group in args.groups:
            predictor = predictor_for(task, tokenizer)
            predictor.group_size = group
            objective = make_objective("accuracy", predictor)
            optimizer = MeZO(model.parameters(), lr=0.0)  # lr 0: every round sees the same weights
            evaluation = step = 0.0
            for batch in batches:
                t0 = time.perf_counter()
                objective(model, batch)
                t1 = time.perf_counter()
                optimizer.step(lambda b=batch, f=objective: f(model, b))
                evaluation, step = evaluation + t1 - t0, step + time.perf_counter() - t1
            rows.append([r + 1, group, f"{evaluation:.2f}", f"{step:.2f}", f"{step / (2 * evaluation):.3f}"])
            print(rows[-1], file=sys.stderr, flush=True)
    return publish(f"group_size_{args.dtype}", f"Predictor group size under MeZO ({args.dtype})",
                   f"{args.model} in {args.dtype}, SST-2 accuracy objective, {args.batches} batches of 16 per round, "
                   "rounds alternating group sizes in one process.",
                   ["round", "group size", "objective s", "step s", "step / (2 x objective)"], rows, "cpu", args.write,
                   params={"model": args.model, "dtype": args.dtype})


if __name__ == "__main__":
    main()
