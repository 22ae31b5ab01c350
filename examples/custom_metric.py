"""Register your own metric and tune a model on it directly.

As a plugin for the CLI (the module registers the metric when imported):

    zo-tune --plugin examples.custom_metric --objective balanced_accuracy --task sst2 --steps 200

Or through the library API (this file's main), on the shipped SmolLM2-135M and SST-2:

    python examples/custom_metric.py --steps 200
"""

from __future__ import annotations

import argparse

from sklearn.metrics import balanced_accuracy_score

from metrics import register_metric


@register_metric("balanced_accuracy")
def balanced_accuracy(predictions: list[int], references: list[int]) -> float:
    """Mean per-class recall: a model that always answers one class scores 1 / classes, not its share."""
    return float(balanced_accuracy_score(references, predictions))


def main() -> None:
    from metrics import get_metric
    from tasks import get_task
    from zo_objectives import MeZO, evaluate_model, load_model, make_objective, predictor_for, train

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-size", type=int, default=200)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    task = get_task("sst2")
    predictor = predictor_for(task, tokenizer)
    objective = make_objective("balanced_accuracy", predictor)  # greater is better: the loss is its negative
    optimizer = MeZO(model.parameters(), lr=1e-4, eps=1e-3, seed=0)
    dev = task.examples("dev", n=args.eval_size)
    metric = get_metric("balanced_accuracy")
    before = evaluate_model(model, predictor, dev, metric)
    train(model, optimizer, objective, task.examples("train", n=1000), steps=args.steps, batch_size=16)
    after = evaluate_model(model, predictor, dev, metric)
    print(f"dev balanced accuracy: {before:.4f} -> {after:.4f} after {args.steps} steps")


if __name__ == "__main__":
    main()
