"""How faithful a half-precision SPSA estimate is: the same perturbations scored in fp32 and in bf16 or fp16.

For each of ``--batches`` SST-2 training batches and one seeded perturbation per batch, the projected gradient
g = (L(x + eps z) - L(x - eps z)) / (2 eps) of the accuracy objective (the `make run` setting) is computed on
SmolLM2-135M (``--model``) in fp32 at eps 1e-3 (the reference) and in each half-precision setting. Rounding in a
half-precision forward pass adds noise to L+ - L-, which a larger eps shrinks relative to the signal; the table
gives the correlation of each setting's g with the reference's and the sd of their difference.

    python benchmarks/eps_fidelity.py --batches 16 --settings bf16:1e-3 bf16:3e-3 bf16:1e-2 --write
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DTYPES, publish  # noqa: E402

REFERENCE = ("fp32", 1e-3)


def projected_gradients(model_name: str, dtype: str, eps: float, batches: list[list[dict]]) -> list[float]:
    """g of perturbation i on batch i, with the optimizer's own perturbation (inside the forward passes)."""
    from tasks import get_task
    from zo_objectives import MeZO, load_model, make_objective, predictor_for
    from zo_objectives.noise import mix

    model, tokenizer = load_model(model_name, dtype=DTYPES[dtype])
    objective = make_objective("accuracy", predictor_for(get_task("sst2"), tokenizer))
    opt = MeZO(model.eval().parameters(), lr=0.0, eps=eps)
    grads = []
    for i, batch in enumerate(batches):
        seed = mix(0, i)  # the same z for every setting: only the dtype and eps differ
        plus = opt.score(lambda b=batch: objective(model, b), seed, 1.0)
        minus = opt.score(lambda b=batch: objective(model, b), seed, -1.0)
        grads.append((plus - minus) / (2 * eps))
    return grads


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--settings", nargs="+", default=["bf16:1e-3", "bf16:3e-3", "bf16:1e-2"],
                        help="dtype:eps pairs compared with fp32 at eps 1e-3")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tasks import get_task

    rng = random.Random(0)
    train = get_task("sst2").examples("train")
    batches = [rng.sample(train, args.batch_size) for _ in range(args.batches)]
    reference = projected_gradients(args.model, *REFERENCE, batches)
    rows = [["fp32", "0.001", "1.000", "0.00", f"{statistics.stdev(reference):.2f}"]]
    for setting in args.settings:
        dtype, eps = setting.split(":")
        grads = projected_gradients(args.model, dtype, float(eps), batches)
        diff = statistics.stdev(a - b for a, b in zip(grads, reference))
        rows.append([dtype, f"{float(eps):g}", f"{statistics.correlation(grads, reference):.3f}", f"{diff:.2f}",
                     f"{statistics.stdev(grads):.2f}"])
        print(rows[-1], file=sys.stderr, flush=True)
    return publish("eps_fidelity", "Half-precision estimates against fp32",
                   f"Projected gradients of the accuracy objective on {args.model}, {args.batches} SST-2 training "
                   f"batches of {args.batch_size}, one seeded perturbation each, compared with fp32 at eps 1e-3.",
                   ["dtype", "eps", "correlation with fp32", "sd of difference", "sd of g"], rows, "cpu", args.write,
                   notes="Rounding in a bf16 forward pass adds noise to L+ - L-; a larger eps shrinks it relative "
                         "to the signal while the estimate still follows the fp32 one.",
                   params={"model": args.model, "batches": args.batches, "batch_size": args.batch_size})


if __name__ == "__main__":
    main()
