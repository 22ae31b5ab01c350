"""How each smoothed objective weights the training examples, at the zero-shot model (no training).

For two classes, with margin m = score(gold) - score(other), expected accuracy at temperature T is
sigmoid(m / T) per example and its derivative in m is w = p (1 - p) / T; cross-entropy's is 1 - sigmoid(m).
The table reports, over the first ``--n`` training examples, the mean weight, how much more a wrongly
classified example weighs than a correctly classified one, and the net push along the class bias (the
direction that moves every margin toward one label): positive means toward the minority class of the sample.

    python benchmarks/gradient_weights.py --task sst2 --n 256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import publish  # noqa: E402


def weights(margins: torch.Tensor, temperature: float | None) -> torch.Tensor:
    """d(objective)/d(margin) per example: expected accuracy at ``temperature``, or cross-entropy if None."""
    if temperature is None:
        return 1 - torch.sigmoid(margins)
    p = torch.sigmoid(margins / temperature)
    return p * (1 - p) / temperature


def main(argv: list[str] | None = None) -> list[list]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--temperatures", default="0.5,1,2,4")
    parser.add_argument("--write", action="store_true", help="update the gradient_weights section of BENCHMARKS.md")
    args = parser.parse_args(argv)

    from tasks import get_task
    from zo_objectives import load_model, predictor_for

    model, tokenizer = load_model(args.model)
    task = get_task(args.task)
    if task.kind == "generation" or len(task.label_words or []) != 2:
        parser.error(f"task {args.task!r} is not a two-class label-word task; try sst2, boolq or rte")
    predictor = predictor_for(task, tokenizer)
    examples = task.examples("train")[: args.n]
    scores = torch.cat([predictor.scores(model, examples[i:i + 16]) for i in range(0, len(examples), 16)])
    labels = torch.tensor([ex["label"] for ex in examples])
    rows_ = torch.arange(len(labels))
    margins = scores[rows_, labels] - scores[rows_, 1 - labels]
    minority = int((labels == 1).float().mean() > 0.5) ^ 1  # the class with fewer examples
    toward_minority = torch.where(labels == minority, 1.0, -1.0)

    rows = []
    for t in [None, *(float(x) for x in args.temperatures.split(","))]:
        w = weights(margins, t)
        rows.append(["cross-entropy" if t is None else f"expected accuracy, T = {t:g}", f"{w.mean():.4f}",
                     f"{w[margins < 0].mean() / w[margins > 0].mean():.2f}",
                     f"{(w * toward_minority).mean() / w.mean():+.2f}"])
    acc = (margins > 0).float().mean()
    quartiles = [round(q, 2) for q in torch.quantile(margins, torch.tensor([0.25, 0.5, 0.75])).tolist()]
    title = (f"Gradient weights: {args.model}, {args.task}, first {len(labels)} training examples (seed 0), zero-shot "
             f"accuracy {acc:.3f}, class {1 - minority} is {(labels != minority).float().mean():.1%} of them; "
             f"margin quartiles {quartiles}.")
    header = ["objective", "mean weight", "wrong / right weight", "net bias push toward minority"]
    publish("gradient_weights", "Gradient weights per example", title, header, rows, "cpu", args.write,
            params={"model": args.model, "task": args.task, "n": len(labels)})
    return rows


if __name__ == "__main__":
    main()
