"""Evaluation: predictions in batches and the metrics on them, in one process or split across ranks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from metrics import Metric
from zo_objectives import distributed
from zo_objectives.objectives import references


def predict_all(model: torch.nn.Module, predictor: Any, examples: Sequence[dict], batch_size: int = 16,
                progress: bool = False) -> list:
    """Predictions for every example, in batches (``progress``: a bar over the batches on stderr)."""
    preds: list = []
    starts = range(0, len(examples), batch_size)
    for i in tqdm(starts, desc="evaluating", unit="batch", disable=not progress, dynamic_ncols=True, leave=False):
        preds += predictor.predict(model, examples[i:i + batch_size])
    return preds


def evaluate_model(model: torch.nn.Module, predictor: Any, examples: Sequence[dict], metric: Metric,
                   batch_size: int = 16, progress: bool = False) -> float:
    """The metric on ``examples`` (predictions batched, no perturbation; ``progress``: a bar on stderr)."""
    return metric(predict_all(model, predictor, examples, batch_size, progress), references(examples))


def evaluate_metrics(model: torch.nn.Module, predictor: Any, examples: Sequence[dict], metrics: Sequence[Metric],
                     batch_size: int = 16, predict: Callable = predict_all) -> dict[str, float]:
    """Each metric on ``examples``, by name, from one pass of predictions (``predict``: how they are made)."""
    predictions, refs = predict(model, predictor, examples, batch_size), references(examples)
    return {metric.name: metric(predictions, refs) for metric in metrics}


def sharded_predict_all(model: torch.nn.Module, predictor: Any, examples: Sequence[dict],
                        batch_size: int = 16) -> list:
    """Predictions for every example, each rank predicting its ``[rank::world]`` share; all ranks get all."""
    return distributed.gather(predict_all(model, predictor, distributed.shard(examples), batch_size), len(examples))


def sharded_evaluate_model(model: torch.nn.Module, predictor: Any, examples: Sequence[dict], metric: Any,
                           batch_size: int = 16) -> float:
    """:func:`evaluate_model` split across ranks: each rank predicts its share, the predictions are all-gathered,
    and every rank computes the metric on the full set (exact for any metric, macro-F1 too)."""
    return metric(sharded_predict_all(model, predictor, examples, batch_size), references(examples))
