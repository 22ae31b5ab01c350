"""Would one perturbation per example (GRZO, Tan et al. 2026) teach more per forward pass than MeZO, here?

A MeZO step projects the batch's gradient g_B on one random direction (2 x B forward rows). Drawing one direction
per example instead (GRZO: x + eps z_i and x - eps z_i on example i only, the same 2 x B rows) projects each
example's own gradient g_i on its own direction, B directions per step. For d parameters and Gaussian (or
Rademacher) directions, an estimate (1/K) sum_k <h_k, z_k> z_k has mean (1/K) sum_k h_k and mean square about
(d / K^2) sum_k |h_k|^2, so its quality (expected progress squared over mean square, the figure the step length
is tuned against) is

    MeZO (K = 1, h = g_B):           |g_B|^2 / d                         per 2 B rows
    per example (K = B, h_k = g_k):  B |g_B|^2 / d * |g_B|^2 / mean|g_i|^2   per 2 B rows
    FZOO (K = N one-sided, h = g_B): N |g_B|^2 / d                       per (N + 1) B rows

so at equal forward rows per-example directions gain B x r over MeZO, r = |g_B|^2 / mean_i |g_i|^2 (1/B when the
examples' gradients are unrelated, 1 when they agree), and FZOO gains 2N / (N + 1) (1.78 at N 8) before its
normalization. r is measured here with backpropagation: the per-example gradients of the protocol-1 objective
(SST-2's accuracy in log form, the cross-entropy over the two label words) on the protocol's first training
batches, SmolLM2-135M in fp32.

    python benchmarks/per_example_directions.py --batches 4 --write
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table, publish  # noqa: E402

MODEL, TASK, TRAIN, BATCH, N_FZOO = "smollm2-135m", "sst2", 1000, 16, 8


def batch_ratio(model: torch.nn.Module, tokenizer, kind: str, batch: list[dict]) -> dict:
    """|g_B|^2, mean |g_i|^2 and their ratio for one batch (g_B the mean of the examples' gradients)."""
    from seed_table import backprop_loss

    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros(sum(p.numel() for p in params))
    squares = []
    for example in batch:
        grads = torch.autograd.grad(backprop_loss(model, tokenizer, kind, [example]), params)
        flat = torch.cat([g.reshape(-1) for g in grads])
        squares.append(float(flat.square().sum()))
        total += flat
    mean = total / len(batch)
    g_b = float(mean.square().sum())
    return {"batch_grad_sq": g_b, "example_grad_sq": sum(squares) / len(squares),
            "ratio": g_b / (sum(squares) / len(squares))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=4, help="training batches of 16 (the protocol's first ones)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    from tasks import get_task
    from zo_objectives.models import cpu_name, load_model
    from zo_objectives.train import batch_indices

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    task = get_task(TASK)
    model, tokenizer = load_model(MODEL, dtype=torch.float32)
    model.eval()  # as the estimators score it (no dropout)
    train = task.examples("train", n=TRAIN, seed=args.seed)
    rows, t0 = [], time.process_time()
    for step in range(args.batches):
        batch = [train[i] for i in batch_indices(len(train), BATCH, args.seed, step)]
        r = batch_ratio(model, tokenizer, task.kind, batch)
        rows.append([step, f"{r['batch_grad_sq']:.3g}", f"{r['example_grad_sq']:.3g}", f"{r['ratio']:.3f}",
                     f"{BATCH * r['ratio']:.2f}", f"{2 * N_FZOO / (N_FZOO + 1):.2f}"])
        print(f"batch {step}: {r}", flush=True)
    ratios = [float(r[3]) for r in rows]
    mean = sum(ratios) / len(ratios)
    rows.append(["mean", "", "", f"{mean:.3f}", f"{BATCH * mean:.2f}", f"{2 * N_FZOO / (N_FZOO + 1):.2f}"])
    header = ["training batch (step)", "|g_B|^2", "mean |g_i|^2", "r = |g_B|^2 / mean |g_i|^2",
              "per-example directions' gain over MeZO per forward row (B r)", "FZOO's (N 8: 2N / (N + 1))"]
    print(markdown_table(header, rows))
    notes = (f"{MODEL} fp32, {TASK}: {TRAIN} training rows (seed {args.seed}), batches of {BATCH} in the protocol's "
             f"order; per-example gradients by backpropagation of the cross-entropy over the label words (the "
             f"accuracy objective's log form), {time.process_time() - t0:.0f} CPU s on {cpu_name()}. r = 1/B = "
             f"{1 / BATCH:.4f} would mean unrelated examples (no gain), r = 1 identical ones (a gain of B). The gains "
             "are the large-d formula's (the docstring of benchmarks/per_example_directions.py), before any "
             "normalization of the step. Command: `python benchmarks/per_example_directions.py --batches "
             f"{args.batches} --write`.")
    print(notes)
    publish("per_example_directions", "Per-example directions: what one perturbation per example would gain (sst2)",
            "Batch gradient against per-example gradients, SmolLM2-135M on SST-2 (protocol 1's batches)", header,
            rows, "cpu", args.write, notes=notes)


if __name__ == "__main__":
    main()
