"""Which objectives are the same objective: the projected gradients of MeZO's first steps under each.

Each objective runs ``--steps`` MeZO steps from the same weights with the same seed (the same batches and the
same noise z), so two objectives that are one function of the weights give the same projected gradient on
every step, and the same run. The table gives each step's projected gradient and the largest relative
difference from cross-entropy's. The default ``accuracy`` objective (log form, smoothing 1) on a label-word task
is cross-entropy over the label words; its mean form (the expected accuracy) is another objective.

    python benchmarks/objective_identity.py --task sst2 --steps 3 --write
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import publish  # noqa: E402

# name -> make_objective keyword arguments (after the objective's spec)
OBJECTIVES = {
    "cross_entropy": ("cross_entropy", {}),
    "accuracy (log form, the default)": ("accuracy", {}),
    "accuracy (mean form: expected accuracy)": ("accuracy", {"form": "mean"}),
}


def main(argv: list[str] | None = None) -> list[list]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--write", action="store_true", help="store benchmarks/results/objective_identity.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from tasks import get_task
    from zo_objectives import MeZO, load_model, make_objective, predictor_for, train

    task = get_task(args.task)
    model, tokenizer = load_model(args.model)
    predictor = predictor_for(task, tokenizer)
    examples = task.examples("train", seed=args.seed)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {}
    for name, (spec, kwargs) in OBJECTIVES.items():
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n])
        objective = make_objective(spec, predictor, **kwargs)
        lr = 1e-4 if kwargs.get("form") == "mean" else 1e-5  # zo-tune's defaults (DEFAULT_LR)
        optimizer = MeZO([p for p in model.parameters() if p.requires_grad], lr=lr, eps=1e-3, seed=args.seed)
        train(model, optimizer, objective, examples, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
              progress=False)
        grads[name] = [r["grads"][0] for r in optimizer.trajectory]
        print(name, grads[name], flush=True)
    reference = grads["cross_entropy"]
    rows = []
    for name, values in grads.items():
        worst = max(abs(g - r) / abs(r) for g, r in zip(values, reference))
        rows.append([name, *(f"{g:.6g}" for g in values), f"{worst:.1e}"])
    header = ["objective", *(f"step {k + 1}" for k in range(args.steps)), "largest relative difference from CE"]
    title = (f"Projected gradients of MeZO's first {args.steps} steps on {args.task} ({args.model}, batch "
             f"{args.batch_size}, seed {args.seed}: the same batches and noise in every row, each from the same "
             "weights; steps after the first start from weights each objective moved)")
    publish("objective_identity", "Which objectives are the same objective", title, header, rows, "cpu",
            args.write, params={"task": args.task, "steps": args.steps})
    return rows


if __name__ == "__main__":
    main()
