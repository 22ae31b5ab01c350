"""Objectives: ``(model, batch) -> float`` losses to minimize, built from any metric.

Like scikit-learn's ``make_scorer``: a metric plus ``greater_is_better`` becomes a loss (its negative when
greater is better). ``make_objective`` accepts a registered metric name, ``"cross_entropy"``, any function
``(predictions, references) -> float``, an object with ``.compute(predictions=..., references=...)`` (the
``evaluate`` convention), or an objective already built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from metrics import Metric, get_metric, list_metrics
from zo_objectives.scoring import Batch, prompts_seed

CROSS_ENTROPY = "cross_entropy"
DEFAULT_TEMPERATURE = 1.0  # metric objectives on predictors with scores optimize the expected metric (README)


@runtime_checkable
class Objective(Protocol):
    """Anything called as ``objective(model, batch)`` that returns the loss to minimize."""

    def __call__(self, model: torch.nn.Module, batch: Batch) -> float: ...


def references(batch: Batch) -> list:
    """What a metric compares predictions against: the gold answers (generation) or the gold label index."""
    return [ex["answers"] if "answers" in ex else ex["label"] for ex in batch]


@dataclass
class MetricObjective:
    """``-metric(predictions, references)`` when greater is better, else ``metric(...)``.

    With ``temperature > 0`` (predictors with scores: label words, multiple choice) the value is the metric's
    expectation when each prediction is drawn from softmax(scores / temperature): exact for per-example
    metrics (accuracy, exact match), else a mean over ``samples`` Gumbel-max draws seeded by the batch (the
    two sides of an SPSA estimate share them). It is a smooth function of the weights that tends to the
    metric as the temperature goes to 0. The hard metric on a batch of 16 moves in steps of 1/16 and ties on
    most SPSA steps, so the weights do not move; its expectation does not tie.
    """

    metric: Metric
    predictor: Any
    temperature: float = 0.0
    samples: int = 256

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.samples < 1:
            raise ValueError(f"temperature must be >= 0 and samples >= 1, got {self.temperature}, {self.samples}")
        if self.temperature and not hasattr(self.predictor, "scores"):
            raise ValueError(f"temperature > 0 needs a predictor with scores(); {type(self.predictor).__name__} "
                             "has none (for generation, sample with Generation(temperature=...) instead)")

    def __call__(self, model: torch.nn.Module, batch: Batch) -> float:
        value = self.expected(model, batch) if self.temperature else self.metric(
            self.predictor.predict(model, batch), references(batch))
        return -value if self.metric.greater_is_better else value

    def expected(self, model: torch.nn.Module, batch: Batch) -> float:
        """The metric's expectation under predictions sampled from softmax(scores / temperature)."""
        refs = references(batch)
        probs = (self.predictor.scores(model, batch) / self.temperature).softmax(-1)
        if self.metric.per_example:  # E[mean_i m(y_i)] = mean_i sum_c p_ic m(c)
            return sum(float(p) * self.metric([c], [ref]) for row, ref in zip(probs, refs)
                       for c, p in enumerate(row) if p > 0) / len(refs)
        gen = torch.Generator().manual_seed(prompts_seed([ex["prompt"] for ex in batch]))
        uniform = torch.rand((self.samples, *probs.shape), generator=gen).clamp_(1e-12, 1 - 1e-7)
        draws = (probs.log() - (-uniform.log()).log()).argmax(-1).tolist()
        return sum(self.metric(d, refs) for d in draws) / self.samples

    @property
    def name(self) -> str:
        return self.metric.name

    @property
    def greater_is_better(self) -> bool:
        return self.metric.greater_is_better


@dataclass
class CrossEntropy:
    """Cross-entropy of the gold target under the model (the usual MeZO objective)."""

    predictor: Any
    name: str = CROSS_ENTROPY

    def __call__(self, model: torch.nn.Module, batch: Batch) -> float:
        return self.predictor.cross_entropy(model, batch)


@dataclass
class WeightedSum:
    """``sum(weight * objective(model, batch))`` over ``terms``."""

    terms: Sequence[tuple[float, Objective]]
    name: str = "weighted_sum"

    def __call__(self, model: torch.nn.Module, batch: Batch) -> float:
        return sum(w * float(obj(model, batch)) for w, obj in self.terms)


RewardFn = Callable[..., Sequence[float]]


class RewardError(ValueError):
    """A reward function raised, or returned something other than one number per completion."""


@dataclass
class RewardObjective:
    """Generate completions and score them with TRL-style reward functions; the loss is -(weighted mean reward).

    Each reward is called as ``reward(prompts=..., completions=..., **columns)`` where ``columns`` holds every
    other field of the batch's examples (one list per field), and must return one number per completion.
    Sampling (``generator.temperature > 0``) is seeded by the prompts, so both sides of an SPSA estimate
    compare the same random draws.
    """

    generator: Any
    rewards: Sequence[RewardFn]
    weights: Sequence[float] | None = None
    name: str = "reward"

    def __post_init__(self) -> None:
        if not self.rewards:
            raise ValueError("RewardObjective needs at least one reward function")
        if self.weights is not None and len(self.weights) != len(self.rewards):
            raise ValueError(f"{len(self.weights)} weights for {len(self.rewards)} reward functions")

    def scores(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> list[float]:
        """The weighted sum of the rewards for each completion."""
        total = [0.0] * len(prompts)
        for weight, fn in zip(self.weights or [1.0] * len(self.rewards), self.rewards):
            label = getattr(fn, "__name__", type(fn).__name__)
            try:
                values = list(fn(prompts=prompts, completions=completions, **columns))
            except Exception as err:
                raise RewardError(f"reward {label!r} raised {type(err).__name__}: {err}") from err
            if len(values) != len(prompts):
                raise RewardError(f"reward {label!r} returned {len(values)} values for {len(prompts)} completions")
            for i, v in enumerate(values):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise RewardError(f"reward {label!r} returned {v!r} ({type(v).__name__}) for completion {i}; "
                                      "rewards must be int or float")
                total[i] += weight * float(v)
        return total

    greater_is_better = True  # the objective logged is the reward; the loss is its negative

    def generate(self, model: torch.nn.Module, batch: Batch) -> tuple[list[str], list[str], dict[str, list]]:
        """Prompts, one generated completion per example, and the batch's other fields as columns."""
        prompts = [ex["prompt"] for ex in batch]
        completions = self.generator.generate(model, prompts)
        columns = {k: [ex.get(k) for ex in batch] for k in batch[0] if k not in ("prompt", "completion")}
        return prompts, completions, columns

    def rewards_for(self, model: torch.nn.Module, batch: Batch) -> list[float]:
        """Generate a completion per example and return its combined reward."""
        return self.scores(*self.generate(model, batch))

    def __call__(self, model: torch.nn.Module, batch: Batch) -> float:
        rewards = self.rewards_for(model, batch)
        return -sum(rewards) / len(rewards)


def from_compute(module: Any, key: str, greater_is_better: bool = True) -> Metric:
    """Adapt an object with ``.compute(predictions=..., references=...) -> dict`` (e.g. an ``evaluate`` metric)."""

    def fn(predictions: list, refs: list) -> float:
        result = module.compute(predictions=predictions, references=refs)
        if key not in result:
            raise ValueError(f"{type(module).__name__}.compute() returned keys {sorted(result)}; no {key!r}")
        return float(result[key])

    return Metric(getattr(module, "name", key), fn, greater_is_better)


def make_objective(spec: str | Callable | Any, predictor: Any, *, greater_is_better: bool | None = None,
                   key: str | None = None, temperature: float | None = None, samples: int = 256) -> Objective:
    """Build an objective from a metric name, ``"cross_entropy"``, a metric function or a ``.compute`` object.

    Metric objectives on predictors with scores (label words, multiple choice) optimize the metric's
    expectation at ``temperature`` (default ``DEFAULT_TEMPERATURE``; 0 = the hard metric), see MetricObjective.
    """
    if isinstance(spec, (MetricObjective, CrossEntropy, WeightedSum, RewardObjective)):
        return spec
    if isinstance(spec, str) and spec == CROSS_ENTROPY:
        return CrossEntropy(predictor)
    gib = True if greater_is_better is None else greater_is_better
    if isinstance(spec, str):
        if spec not in list_metrics():
            raise ValueError(f"unknown objective {spec!r}; available: {', '.join([CROSS_ENTROPY, *list_metrics()])}")
        metric = get_metric(spec)
        if greater_is_better is not None:
            metric = Metric(metric.name, metric.fn, greater_is_better)
    elif hasattr(spec, "compute"):
        if key is None:
            raise ValueError("an object with .compute() needs key=... naming the result to optimize")
        metric = from_compute(spec, key, gib)
    elif isinstance(spec, Metric):
        metric = spec
    elif callable(spec):
        metric = Metric(getattr(spec, "__name__", "metric"), spec, gib)
    else:
        raise TypeError(f"cannot make an objective from {type(spec).__name__}; pass a metric name, "
                        "'cross_entropy', a function (predictions, references) -> float, or an object with .compute()")
    if temperature is None:
        temperature = DEFAULT_TEMPERATURE if hasattr(predictor, "scores") else 0.0
    return MetricObjective(metric, predictor, temperature=temperature, samples=samples)
