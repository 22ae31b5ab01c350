"""Metric callables ``fn(predictions, references) -> float`` and a registry that turns them into losses.

``register_metric(name, fn, greater_is_better=...)`` (or as a decorator) adds a metric; ``get_metric(name)``
returns a :class:`Metric` whose ``greater_is_better`` tells an objective which sign to minimize.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

from metrics.classification import accuracy, exact_match, f1
from metrics.squad import squad_em, squad_f1

MetricFn = Callable[[list, list], float]


class MetricError(ValueError, TypeError):
    """A metric raised, or returned something other than one finite number; the message names the metric.
    Both a ValueError and a TypeError, so that either ``except`` catches it."""


@dataclass(frozen=True)
class Metric:
    """A named metric and the direction that is better."""

    name: str
    fn: MetricFn
    greater_is_better: bool = True
    per_example: bool = False  # the metric is a mean of per-example scores (lets objectives take expectations)

    def __call__(self, predictions: list, references: list) -> float:
        """The metric's value as a float; a metric that raises or returns anything but one finite number fails
        here with a ``MetricError`` naming it, not steps later."""
        try:
            value = self.fn(predictions, references)
        except Exception as err:
            raise MetricError(f"metric {self.name!r} raised {type(err).__name__}: {err}") from err
        if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a 0-d numpy array or tensor
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise MetricError(f"metric {self.name!r} returned {value!r:.60} ({type(value).__name__}); a metric must "
                            "return one number (int or float)")
        if not math.isfinite(value):
            raise MetricError(f"metric {self.name!r} returned {value} on {len(predictions)} predictions; a metric "
                              "must return a finite number")
        return float(value)


_REGISTRY: dict[str, Metric] = {}


def callable_name(fn: object) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def register_metric(name: str, fn: MetricFn | None = None, *, greater_is_better: bool = True,
                    per_example: bool = False, overwrite: bool = False):
    """Register ``fn`` under ``name``; without ``fn`` it returns a decorator.

    ``per_example=True`` declares that the metric is the mean over examples of a per-example score (as
    accuracy is, and macro-F1 is not): smoothed objectives then compute its expectation exactly. A name
    already registered to another metric (``accuracy``, say) is refused unless ``overwrite=True``, as
    ``register_task`` does: a plugin cannot silently change what a built-in name optimizes.
    """

    def add(f: MetricFn) -> MetricFn:
        if not callable(f):
            raise TypeError(f"metric {name!r} must be callable, got {type(f).__name__}")
        metric = Metric(name, f, greater_is_better, per_example)
        if _REGISTRY.get(name, metric) != metric and not overwrite:
            raise ValueError(f"metric {name!r} is already registered (to {callable_name(_REGISTRY[name].fn)}); "
                             "choose another name, or pass overwrite=True to replace it")
        _REGISTRY[name] = metric
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
register_metric("macro_f1", f1)  # the same on predictions; as an objective it counts every class of the task

MACRO_F1 = "macro_f1"

__all__ = [
    "MACRO_F1", "Metric", "MetricError", "accuracy", "exact_match", "f1", "get_metric", "list_metrics",
    "register_metric", "squad_em", "squad_f1",
]
