"""Objectives: ``(model, batch) -> float`` losses to minimize, built from any metric.

Like scikit-learn's ``make_scorer``: a metric plus ``greater_is_better`` becomes a loss (its negative when
greater is better). ``make_objective`` accepts a registered metric name, ``"cross_entropy"``, any function
``(predictions, references) -> float``, an object with ``.compute(predictions=..., references=...)`` (the
``evaluate`` convention), or an objective already built.
"""

from __future__ import annotations

import math
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


def candidate_logits(predictor: Any, model: torch.nn.Module, prompts: list[str], candidates: list[list[str]],
                     length_normalize: bool = False, single: bool = False) -> torch.Tensor:
    """Each prompt's candidates' log-likelihoods (per token with ``length_normalize``), shape (prompts, most
    candidates), -inf where missing.

    A prompt with a single candidate is scored only with ``single``: over its candidates its probability is 1
    whatever the weights (it gets 0)."""
    out = torch.full((len(prompts), max([1, *map(len, candidates)])), float("-inf"))
    if not single:
        out[[i for i, c in enumerate(candidates) if len(c) == 1], 0] = 0.0
    rows = [i for i, c in enumerate(candidates) if len(c) > 1 or (single and c)]
    if rows:
        scored = predictor.candidate_scores(model, [prompts[i] for i in rows], [candidates[i] for i in rows],
                                            length_normalize)
        out[rows, : scored.shape[1]] = scored
    return out


FORMS = ("auto", "log", "mean")
SUPPORTS = ("auto", "options", "model")
SEQUENCE_SCORES = ("mean", "sum")
LOG_FLOOR = 1e-6  # the log form gives an example whose options all score 0 this expected metric


def distinct(texts: list[str]) -> list[str]:
    """The texts that are not blank, the first of each stripped text kept (greedy before gold)."""
    kept: dict[str, str] = {}
    for t in texts:
        if t.strip():
            kept.setdefault(t.strip(), t)
    return list(kept.values())


@dataclass
class MetricObjective:
    """``-metric(predictions, references)`` when greater is better, else ``metric(...)``.

    With ``temperature > 0`` the metric is taken in expectation over each example's options: the classes or
    answer candidates of a predictor with scores; for generation, the greedy completion and the gold answers,
    each scored as the model continues the prompt. ``support`` says how the options are weighed:
    ``"options"`` draws one with probability softmax(log-likelihood / T) over the options; ``"model"``
    (generation only; the default there in log form) weighs each by its own probability under the model,
    exp(log-likelihood / T), and counts every other answer as scoring 0, a lower bound of the metric the
    model's answers would get: it raises the gold answers against every other sequence, not only against
    the greedy one. The expectation is a smooth function of the weights that does not tie on SPSA steps as
    the hard metric does (a batch of 16 moves accuracy in steps of 1/16). Generated options are scored by
    their total log-likelihood (``sequence_score="sum"``, the default) or its mean per token (``"mean"``,
    options only).

    ``form`` says how the examples' expectations combine. ``"log"`` (the default for per-example metrics
    where greater is better, scores in [0, 1]) optimizes the mean log of each example's expected metric, a
    minimum-risk objective that weighs an example by how badly it is missed: with accuracy over label words
    at temperature 1 it equals their cross-entropy. ``"mean"`` optimizes the expected metric itself (exact
    for per-example metrics, else a mean over ``samples`` Gumbel-max draws seeded by the batch, which both
    sides of an SPSA estimate share); it weighs confidently wrong examples little (BENCHMARKS.md).
    """

    metric: Metric
    predictor: Any
    temperature: float = 0.0
    samples: int = 256
    form: str = "auto"
    sequence_score: str = "sum"
    support: str = "auto"

    def __post_init__(self) -> None:
        if self.sequence_score not in SEQUENCE_SCORES:
            raise ValueError(f"unknown sequence_score {self.sequence_score!r}; accepted: {', '.join(SEQUENCE_SCORES)}")
        if self.temperature < 0 or self.samples < 1:
            raise ValueError(f"temperature must be >= 0 and samples >= 1, got {self.temperature}, {self.samples}")
        if self.temperature and not (hasattr(self.predictor, "scores") or hasattr(self.predictor, "generate")):
            raise ValueError(f"temperature > 0 needs a predictor with scores() or generate(); "
                             f"{type(self.predictor).__name__} has neither")
        if self.form not in FORMS:
            raise ValueError(f"unknown form {self.form!r}; accepted: {', '.join(FORMS)}")
        log_ok = self.metric.per_example and self.metric.greater_is_better
        if self.form == "auto":
            self.form = "log" if log_ok else "mean"
        elif self.form == "log" and not log_ok:
            raise ValueError(f"form 'log' needs a per-example metric where greater is better (scores in [0, 1]); "
                             f"{self.metric.name!r} is not; use form 'mean'")
        if self.support not in SUPPORTS:
            raise ValueError(f"unknown support {self.support!r}; accepted: {', '.join(SUPPORTS)}")
        model_ok = not hasattr(self.predictor, "scores") and self.sequence_score == "sum" and self.metric.per_example
        if self.support == "auto":  # measured best on SQuAD (README): model for generated answers in log form
            self.support = "model" if model_ok and self.form == "log" else "options"
        elif self.support == "model" and not model_ok:
            raise ValueError("support 'model' weighs generated options by their probability under the model: it "
                             "needs a generation task, sequence_score 'sum' and a per-example metric; use 'options'")
        self._candidates: tuple[int, list[list[str]]] | None = None

    def __call__(self, model: torch.nn.Module, batch: Batch) -> float:
        value = self.expected(model, batch) if self.temperature else self.metric(
            self.predictor.predict(model, batch), references(batch))
        return -value if self.metric.greater_is_better else value

    def options(self, model: torch.nn.Module, batch: Batch) -> tuple[list[list], torch.Tensor]:
        """Each example's options and their log-likelihoods, shape (batch, most options), -inf where missing.

        For generation the options are the greedy completion and the gold targets (each answer as the model
        continues the prompt, with its leading space), generated the first time a batch is seen and kept
        while it is evaluated again, so both sides of an SPSA estimate score the same texts."""
        if hasattr(self.predictor, "scores"):
            scores = self.predictor.scores(model, batch)
            return [list(range(scores.shape[1]))] * len(batch), scores
        prompts = [ex["prompt"] for ex in batch]
        key = prompts_seed(prompts)
        if self._candidates is None or self._candidates[0] != key:
            greedy = self.predictor.generate(model, prompts, strip=False)
            self._candidates = key, [distinct([g, *ex.get("targets", ex.get("answers", []))])
                                     for g, ex in zip(greedy, batch)]
        candidates = self._candidates[1]
        return candidates, candidate_logits(self.predictor, model, prompts, candidates,
                                            self.sequence_score == "mean", single=self.support == "model")

    def expected(self, model: torch.nn.Module, batch: Batch) -> float:
        """The metric's expectation (or mean log expectation) with options weighted as ``support`` says."""
        refs = references(batch)
        options, scores = self.options(model, batch)
        texts = [[o.strip() if isinstance(o, str) else o for o in opts] for opts in options]
        logw = scores.double() / self.temperature
        logw = logw if self.support == "model" else logw.log_softmax(-1)
        if self.metric.per_example:  # E[m(y_i)] = sum_c w_ic m(c)
            values = torch.zeros_like(logw)
            for i, (opts, ref) in enumerate(zip(texts, refs)):
                values[i, : len(opts)] = torch.tensor([float(self.metric([o], [ref])) for o in opts])
            if self.form == "log":  # log sum_c w_c m(c), over the options that score; log LOG_FLOOR if none does
                logs = torch.where(values > 0, logw + values.log(), float("-inf")).logsumexp(-1)
                return float(torch.where(logs.isneginf(), math.log(LOG_FLOOR), logs).mean())
            return float((logw.exp().nan_to_num(0.0) * values).sum(-1).mean())
        probs = logw.exp().nan_to_num(0.0)  # an example with no option: all 0
        gen = torch.Generator().manual_seed(prompts_seed([ex["prompt"] for ex in batch]))
        uniform = torch.rand((self.samples, *probs.shape), generator=gen).clamp_(1e-12, 1 - 1e-7)
        draws = (probs.log() - (-uniform.log()).log()).argmax(-1).tolist()
        return sum(self.metric([opts[d] for opts, d in zip(texts, draw)], refs) for draw in draws) / self.samples

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

    With ``candidates = k > 0`` each prompt gets k sampled completions, generated and rewarded once per batch
    (the first time it is seen); the loss is minus the mean over prompts of their expected reward when a
    completion is drawn from softmax(log-likelihood) over the distinct ones. One completion's text moves
    with the weights in jumps, so its reward ties on many steps; this expectation moves smoothly, and a
    costly reward (a test run, a judge) is called once per step instead of twice.
    """

    generator: Any
    rewards: Sequence[RewardFn]
    weights: Sequence[float] | None = None
    name: str = "reward"
    candidates: int = 0

    def __post_init__(self) -> None:
        if not self.rewards:
            raise ValueError("RewardObjective needs at least one reward function")
        if self.weights is not None and len(self.weights) != len(self.rewards):
            raise ValueError(f"{len(self.weights)} weights for {len(self.rewards)} reward functions")
        if self.candidates < 0:
            raise ValueError(f"candidates must be >= 0, got {self.candidates}")
        if self.candidates and not getattr(self.generator, "temperature", 0):
            raise ValueError("candidates > 0 needs a sampling generator (Generation(temperature=...) > 0); "
                             "greedy decoding gives every candidate the same text")
        self._cache: tuple[int, list[list[str]], list[list[float]]] | None = None
        self.last_means: dict[str, float] = {}

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
            self.last_means[label] = sum(map(float, values)) / max(1, len(values))
        return total

    greater_is_better = True  # the objective logged is the reward; the loss is its negative

    def generate(self, model: torch.nn.Module, batch: Batch,
                 strip: bool = True) -> tuple[list[str], list[str], dict[str, list]]:
        """Prompts, one generated completion per example (``strip=False``: with the whitespace generated),
        and the batch's other fields as columns."""
        prompts = [ex["prompt"] for ex in batch]
        completions = self.generator.generate(model, prompts, strip=strip)
        columns = {k: [ex.get(k) for ex in batch] for k in batch[0] if k not in ("prompt", "completion")}
        return prompts, completions, columns

    def rewards_for(self, model: torch.nn.Module, batch: Batch) -> list[float]:
        """Generate a completion per example and return its combined reward."""
        return self.scores(*self.generate(model, batch))

    def expected(self, model: torch.nn.Module, batch: Batch) -> list[float]:
        """Each prompt's expected reward over its sampled candidates (see ``candidates``)."""
        prompts = [ex["prompt"] for ex in batch]
        key = prompts_seed(prompts)
        if self._cache is None or self._cache[0] != key:
            repeated_prompts, raw, columns = self.generate(
                model, [ex for ex in batch for _ in range(self.candidates)], strip=False)
            rewards = self.scores(repeated_prompts, [t.strip() for t in raw], columns)
            options: list[dict[str, float]] = [{} for _ in batch]  # distinct texts, as generated -> reward
            for j, (text, reward) in enumerate(zip(raw, rewards)):
                if text.strip():
                    options[j // self.candidates].setdefault(text, reward)
            self._cache = key, [list(o) for o in options], [list(o.values()) for o in options]
        _, candidates, values = self._cache
        probs = candidate_logits(self.generator, model, prompts, candidates).softmax(-1).nan_to_num(0.0)
        return [sum(float(p) * r for p, r in zip(row, vals)) for row, vals in zip(probs, values)]

    def __call__(self, model: torch.nn.Module, batch: Batch) -> float:
        rewards = self.expected(model, batch) if self.candidates else self.rewards_for(model, batch)
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
                   key: str | None = None, temperature: float | None = None, samples: int = 256,
                   form: str = "auto", sequence_score: str = "sum", support: str = "auto") -> Objective:
    """Build an objective from a metric name, ``"cross_entropy"``, a metric function or a ``.compute`` object.

    Metric objectives optimize the metric's expectation at ``temperature`` (default ``DEFAULT_TEMPERATURE``;
    0 = the hard metric) combined by ``form`` ("auto", "log" or "mean"), see MetricObjective.
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
        temperature = DEFAULT_TEMPERATURE if hasattr(predictor, "scores") or hasattr(predictor, "generate") else 0.0
    return MetricObjective(metric, predictor, temperature=temperature, samples=samples, form=form,
                           sequence_score=sequence_score, support=support)
