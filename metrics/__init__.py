"""Metric callables ``fn(predictions, references) -> float`` and a registry that turns them into losses.

``register_metric(name, fn, greater_is_better=...)`` (or as a decorator) adds a metric; ``get_metric(name)``
returns a :class:`Metric` whose ``greater_is_better`` tells an objective which sign to minimize.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from metrics.classification import accuracy, exact_match, f1
from metrics.squad import squad_em, squad_f1

MetricFn = Callable[[list, list], float]


@dataclass(frozen=True)
class Metric:
    """A named metric and the direction that is better."""

    name: str
    fn: MetricFn
    greater_is_better: bool = True
    per_example: bool = False  # the metric is a mean of per-example scores (lets objectives take expectations)

    def __call__(self, predictions: list, references: list) -> float:
        return float(self.fn(predictions, references))


_REGISTRY: dict[str, Metric] = {}


def register_metric(name: str, fn: MetricFn | None = None, *, greater_is_better: bool = True,
                    per_example: bool = False):
    """Register ``fn`` under ``name``; without ``fn`` it returns a decorator.

    ``per_example=True`` declares that the metric is the mean over examples of a per-example score (as
    accuracy is, and macro-F1 is not): smoothed objectives then compute its expectation exactly.
    """

    def add(f: MetricFn) -> MetricFn:
        if not callable(f):
            raise TypeError(f"metric {name!r} must be callable, got {type(f).__name__}")
        _REGISTRY[name] = Metric(name, f, greater_is_better, per_example)
        return f

    return add if fn is None else add(fn)


def get_metric(name: str) -> Metric:
    """The registered metric ``name``; unknown names raise ``ValueError`` listing the available ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(list_metrics())}")
    return _REGISTRY[name]


def list_metrics() -> list[str]:
    return sorted(_REGISTRY)


for _fn in (accuracy, exact_match, squad_em, squad_f1):
    register_metric(_fn.__name__, _fn, per_example=True)
register_metric("f1", f1)

__all__ = [
    "Metric", "accuracy", "exact_match", "f1", "get_metric", "list_metrics", "register_metric", "squad_em",
    "squad_f1",
]
