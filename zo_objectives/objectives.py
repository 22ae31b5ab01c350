"""Objectives: ``(model, batch) -> float`` losses to minimize, built from any metric.

Like scikit-learn's ``make_scorer``: a metric plus ``greater_is_better`` becomes a loss (its negative when
greater is better). ``make_objective`` accepts a registered metric name, ``"cross_entropy"``, any function
``(predictions, references) -> float`` (scikit-learn's metrics, which take ``(y_true, y_pred)``, are called in
their own order), an object with ``.compute(predictions=..., references=...)`` (the ``evaluate`` convention;
pass ``key=`` naming the result to optimize), or an objective already built (an :class:`Objective`, passed
through unchanged).

What a metric objective optimizes depends on its form (docs/objectives.md):

- ``form="log"`` (the default for per-example metrics such as accuracy and SQuAD F1, smoothing 1): the mean log
  of each example's expected metric. For accuracy over label words or answer choices this IS cross-entropy:
  the same loss, the same projected gradients, the same run.
- ``form="mean"``: the expected metric itself (each example's options drawn from softmax(scores / T)).
- ``smoothing=0``: the hard metric of the predictions (it ties on most SPSA steps).

After each call an objective's ``last_values`` holds what it measured on the batch, by name, each in its own
units and direction (``{"accuracy": expected accuracy}``, ``{"cross_entropy": ...}``): what training logs.
"""

from __future__ import annotations

import contextlib
import copy
import faulthandler
import inspect
import math
import numbers
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from metrics import MACRO_F1, Metric, MetricError, get_metric, list_metrics
from zo_objectives import distributed
from zo_objectives.scoring import MESSAGES, Batch, prompts_seed, sampling_seed
from zo_objectives.step import current_step

CROSS_ENTROPY = "cross_entropy"
DEFAULT_SMOOTHING = 1.0  # metric objectives on predictors with scores optimize the expected metric (docs/objectives.md)


class Objective(ABC):
    """An objective: ``objective(model, batch)`` returns the loss to minimize.

    ``make_objective`` and ``train`` recognize objectives by this class; any other callable given to
    ``make_objective`` is taken for a metric ``(predictions, references)``. Mark your own objective by
    subclassing it (define ``__call__``), or, for a class you cannot change, ``Objective.register(YourClass)``.
    An objective may set ``last_values`` (``{name: value}``, what it measured on the last batch, each in its
    own units and direction) on each call: training logs them beside the loss.
    """

    @abstractmethod
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
class MetricObjective(Objective):
    """``-metric(predictions, references)`` when greater is better, else ``metric(...)``.

    ``smoothing`` is a temperature T (``None``: ``DEFAULT_SMOOTHING`` when the predictor has scores or
    generates, else 0, the hard metric). With ``smoothing > 0`` the metric is taken in expectation over each
    example's options: the classes or answer candidates of a predictor with scores; for generation, the greedy
    completion and the gold answers, each scored as the model continues the prompt. ``support`` says how the
    options are weighed: ``"options"`` draws one with probability softmax(log-likelihood / T) over the options;
    ``"model"`` (generation only; the default there in log form) weighs each by its own probability under the
    model, exp(log-likelihood / T), and counts every other answer as scoring 0, a lower bound of the metric the
    model's answers would get: it raises the gold answers against every other sequence, not only against the
    greedy one. The expectation is a smooth function of the weights that does not tie on SPSA steps as the hard
    metric does (a batch of 16 moves accuracy in steps of 1/16). Generated options are scored by their total
    log-likelihood (``sequence_score="sum"``, the default) or its mean per token (``"mean"``, options only).

    ``form`` says how the examples' expectations combine. ``"log"`` (the default for per-example metrics
    where greater is better, scores in [0, 1]) optimizes the mean log of each example's expected metric, a
    minimum-risk objective that weighs an example by how badly it is missed: with accuracy over label words
    or answer choices at smoothing 1 it IS their cross-entropy (the same loss to float rounding, so the same
    run). ``"mean"`` optimizes the expected metric itself (exact for per-example metrics, else a mean over
    ``samples`` Gumbel-max draws seeded by the batch, which both sides of an SPSA estimate share); it weighs
    confidently wrong examples little (docs/objectives.md).

    ``last_values`` holds ``{metric name: value}`` of the last batch: the expected metric (whatever the form),
    or the hard metric at smoothing 0.
    """

    metric: Metric
    predictor: Any
    smoothing: float | None = None
    samples: int = 256
    form: str = "auto"
    sequence_score: str = "sum"
    support: str = "auto"
    # what PerExampleObjective resets for each example's members: no cached options (each member decodes its own),
    # and no first-batch check (a check of the whole batch, which one example would fail alone)
    per_example_reset: ClassVar[dict] = {"_candidates": None, "_checked": True}

    def __post_init__(self) -> None:
        if self.sequence_score not in SEQUENCE_SCORES:
            raise ValueError(f"unknown sequence_score {self.sequence_score!r}; accepted: {', '.join(SEQUENCE_SCORES)}")
        smoothable = hasattr(self.predictor, "scores") or hasattr(self.predictor, "generate")
        if self.smoothing is None:
            self.smoothing = DEFAULT_SMOOTHING if smoothable else 0.0
        if self.smoothing < 0 or self.samples < 1:
            raise ValueError(f"smoothing must be >= 0 and samples >= 1, got {self.smoothing}, {self.samples}")
        if self.smoothing and not smoothable:
            raise ValueError(f"smoothing > 0 needs a predictor with scores() or generate(); "
                             f"{type(self.predictor).__name__} has neither (use smoothing=0)")
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
        if self.support == "auto":  # measured best on SQuAD (docs/squad.md): model for generated answers in log form
            self.support = "model" if model_ok and self.form == "log" else "options"
        elif self.support == "model" and not model_ok:
            raise ValueError("support 'model' weighs generated options by their probability under the model: it "
                             "needs a generation task, sequence_score 'sum' and a per-example metric; use 'options'")
        self._candidates: tuple[int, list[list[str]]] | None = None
        self._checked = not (self.form == "log" and self.smoothing)  # the first batch's values are checked
        self.last_values = {}
        check_metric(self.metric, self.predictor, self.form if self.smoothing else "hard")

    def __call__(self, model: torch.nn.Module, batch: Batch) -> float:
        if self.smoothing:
            value = self.expected(model, batch)
        else:
            value = self.metric(self.predictor.predict(model, batch), references(batch))
            self.last_values = {self.name: value}
        return -value if self.metric.greater_is_better else value

    def options(self, model: torch.nn.Module, batch: Batch) -> tuple[list[list], torch.Tensor]:
        """Each example's options and their log-likelihoods, shape (batch, most options), -inf where missing.

        For generation the options are the greedy completion and the gold targets (each answer as the model
        continues the prompt, with its leading space), generated the first time a batch is seen and kept
        while it is evaluated again in the same step, so both sides of an SPSA estimate score the same texts."""
        if hasattr(self.predictor, "scores"):
            scores = self.predictor.scores(model, batch)
            return [list(range(scores.shape[1]))] * len(batch), scores
        prompts = [ex["prompt"] for ex in batch]
        key = sampling_seed(prompts)  # new each MeZO step: a batch seen again later gets the model's new answers
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
        logw = scores.double() / self.smoothing
        logw = logw if self.support == "model" else logw.log_softmax(-1)
        if self.metric.per_example:  # E[m(y_i)] = sum_c w_ic m(c)
            values = torch.zeros_like(logw)
            for i, (opts, ref) in enumerate(zip(texts, refs)):
                values[i, : len(opts)] = torch.tensor([float(self.metric([o], [ref])) for o in opts])
            expected = (logw.exp().nan_to_num(0.0) * values).sum(-1)
            self.last_values = {self.name: float(expected.mean())}
            if self.form == "log":  # log sum_c w_c m(c), over the options that score; log LOG_FLOOR if none does
                self._check_log_values(values)
                logs = torch.where(values > 0, logw + values.log(), float("-inf")).logsumexp(-1)
                return float(torch.where(logs.isneginf(), math.log(LOG_FLOOR), logs).mean())
            return float(expected.mean())
        probs = logw.exp().nan_to_num(0.0)  # an example with no option: all 0
        gen = torch.Generator().manual_seed(sampling_seed([ex["prompt"] for ex in batch]))  # the same for both sides
        uniform = torch.rand((self.samples, *probs.shape), generator=gen).clamp_(1e-12, 1 - 1e-7)
        draws = (probs.log() - (-uniform.log()).log()).argmax(-1).tolist()
        value = sum(self.metric([opts[d] for opts, d in zip(texts, draw)], refs) for draw in draws) / self.samples
        self.last_values = {self.name: value}
        return value

    def _check_log_values(self, values: torch.Tensor) -> None:
        """The log form needs per-example values >= 0, some > 0: a negative value has no log, and a batch where no
        option scores gives every example the floor, a constant loss that trains nothing (checked on every
        batch for negatives, on the first for all zeros)."""
        fix = f"use form 'mean' (zo-tune: --metric-form mean) to optimize the expected {self.name}"
        if (values < 0).any():
            raise MetricError(f"metric {self.name!r} gave {float(values.min()):g} for an option: the log form "
                              f"takes the log of each example's expected metric and needs values in [0, 1]; {fix}")
        if not self._checked:
            self._checked = True
            if not (values > 0).any():
                raise MetricError(f"metric {self.name!r} scored 0 on every option of every example of the first "
                                  f"batch (gold answers included): in log form the loss is then a constant; {fix}")

    @property
    def name(self) -> str:
        return self.metric.name

    @property
    def greater_is_better(self) -> bool:
        return self.metric.greater_is_better


def soft_macro_f1(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Macro-F1 over every class (the columns of ``probs``, shape (examples, classes)), the examples' predictions
    drawn from ``probs``: each class counts, whether the batch holds it or not.

    A class the labels hold scores 2 TP / (2 TP + FP + FN) from its expected counts (TP = sum of its probability
    on its rows, FP on the other rows, FN = its rows' probability of other classes). A class they do not hold
    has F1 1 when no row is predicted as it and 0 otherwise (scikit-learn's ``zero_division=1`` over all labels):
    its expectation, the probability that no row is, prod_i (1 - p_ic), falls as the batch leans towards it.
    """
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(probs.dtype)
    tp, fp, fn = (probs * onehot).sum(0), (probs * (1 - onehot)).sum(0), ((1 - probs) * onehot).sum(0)
    present = onehot.sum(0) > 0
    f1 = torch.where(present, 2 * tp / (2 * tp + fp + fn).clamp(min=1e-12), (1 - probs).prod(0))
    return f1.mean()


@dataclass
class MacroF1Objective(MetricObjective):
    """``macro_f1`` as an objective: macro-F1 over all the task's classes, every class counted even when the batch
    has no example of it (:func:`soft_macro_f1`), from predictions drawn from softmax(scores / T).

    Why: ``f1``'s expectation is taken per batch over the classes it holds or predicts; with 6 of 40 rows of one
    class and batches of 8, many batches hold none of it, and those steps give that class no weight. Stateless
    (a function of the weights and the batch), so a resumed run replays as the uninterrupted one. Generation
    tasks (no class scores) and ``smoothing=0`` fall back to the metric objective's expectation and hard metric.
    """

    def expected(self, model: torch.nn.Module, batch: Batch) -> float:
        if not hasattr(self.predictor, "scores"):
            return super().expected(model, batch)
        scores = self.predictor.scores(model, batch).double()
        probs = (scores / self.smoothing).log_softmax(-1).exp().nan_to_num(0.0)
        value = float(soft_macro_f1(probs, torch.tensor(references(batch))))
        self.last_values = {self.name: value}
        return value


@dataclass
class CrossEntropy(Objective):
    """Cross-entropy of the gold target under the model (the usual MeZO objective)."""

    predictor: Any
    name: str = CROSS_ENTROPY

    def __call__(self, model: torch.nn.Module, batch: Batch) -> float:
        loss = self.predictor.cross_entropy(model, batch)
        self.last_values = {self.name: float(loss)}
        return loss


@dataclass
class WeightedSum(Objective):
    """``sum(weight * objective(model, batch))`` over ``terms``: a loss (lower is better).

    ``last_values`` holds each term's own values (a name repeated gets its position appended)."""

    terms: Sequence[tuple[float, Objective]]
    name: str = "weighted_sum"

    def __call__(self, model: torch.nn.Module, batch: Batch) -> float:
        total, values = 0.0, {}
        for k, (w, obj) in enumerate(self.terms):
            total += w * float(obj(model, batch))
            for name, v in getattr(obj, "last_values", {}).items():
                values[name if name not in values else f"{name}_{k}"] = v
        self.last_values = values
        return total


RewardFn = Callable[..., Sequence[float]]


class RewardError(ValueError):
    """A reward function raised, ran past its time limit, or returned something other than one number per
    completion."""


class UserCodeExit(RuntimeError):
    """User code (a reward function, a plugin) raised SystemExit: reported as a failure of that code (the
    command line exits with status 1), never taken as the command's own exit."""


class _Expired(BaseException):  # not an Exception: a reward's own ``except Exception`` cannot swallow it
    pass


# A call still inside C code this long past its limit (a C loop holding the GIL, which no signal handler can
# interrupt) ends the process: faulthandler's watchdog is a C thread, so it fires whatever the interpreter does
HARD_STOP_GRACE = 1.0
MAX_REWARD_TIMEOUT = 86_400.0  # a day: a longer limit is no limit, and setitimer overflows on huge ones


@contextlib.contextmanager
def time_limit(seconds: float | None, label: str, count: int):
    """Raise RewardError once a reward call runs ``seconds``: interrupted by SIGALRM in a Unix process's main
    thread, elsewhere checked when the call returns. A call that no signal reaches (busy in C code that holds the
    interpreter; outside the main thread, any call) and is still running ``HARD_STOP_GRACE`` seconds after the
    limit ends the process: faulthandler's watchdog prints its stack and exits with status 1 (the run's files are
    as its last checkpoint left them)."""
    if not seconds:
        yield
        return
    message = (f"reward {label!r} took more than {seconds:g} s on {count} completions (--reward-timeout; 0: no "
               "limit): make it faster, or raise the limit")
    alarm = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    armed = [False]  # the handler raises only while the call runs: never from the cleanup after it

    def expire(signum: int, frame: Any) -> None:
        if armed[0]:
            raise _Expired
    previous = signal.signal(signal.SIGALRM, expire) if alarm else None
    began = time.monotonic()
    try:
        try:  # armed inside the try: an alarm that fires at once is still a RewardError
            armed[0] = True
            if alarm:
                signal.setitimer(signal.ITIMER_REAL, seconds)
            # to file descriptor 2: the process's stderr even where sys.stderr is replaced (it has no fileno)
            faulthandler.dump_traceback_later(seconds + HARD_STOP_GRACE, exit=True, file=2)
            yield
        finally:
            armed[0] = False
            faulthandler.cancel_dump_traceback_later()
    except _Expired:
        raise RewardError(message) from None
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    if time.monotonic() - began > seconds:
        raise RewardError(message)


def callable_name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def reward_columns(batch: Batch) -> dict[str, list]:
    """The columns a reward function gets: every field of the examples but the prompt, and the fields of their
    raw data row (``"raw"``: a data file's own columns) that the example does not have under the same name."""
    fields = [{**ex.get("raw", {}), **ex} if isinstance(ex.get("raw"), Mapping) else ex for ex in batch]
    passed = [k for k in fields[0] if k not in ("prompt", "prompts", "completion", "completions")]
    return {k: [f.get(k) for f in fields] for k in passed}


@dataclass
class RewardObjective(Objective):
    """Generate completions and score them with TRL-style reward functions; the loss is -(weighted mean reward).

    ``rewards`` is one reward function or a list of them. Each is called as ``reward(prompts=...,
    completions=..., **columns)`` where ``columns`` holds every other field of the batch's examples (one list
    per field), and must return one number per completion (Python or numpy numbers). After each batch scored,
    ``last_means`` maps each reward function's name to its mean (unweighted) over the completions rewarded.
    Sampling (``generator.temperature > 0``) is seeded by the prompts and, inside a MeZO step, by the
    optimizer's seed and the step (``GenerationPredictor``), so both sides of an SPSA estimate compare the
    same random draws and every step draws new ones.

    With ``candidates = k > 0`` each prompt gets k sampled completions, generated and rewarded once per step
    and batch (the first time the step sees it: a batch repeated in a later step or epoch gets fresh ones,
    sampled by the weights of then); the loss is minus the mean over prompts of their expected reward when a
    completion is drawn from softmax(log-likelihood) over the distinct ones. One completion's text moves
    with the weights in jumps, so its reward ties on many steps; this expectation moves smoothly, and a
    costly reward (a test run, a judge) is called once per step instead of twice.

    A reward call that runs ``timeout`` seconds raises RewardError (``time_limit``); None: no limit.
    """

    generator: Any
    rewards: RewardFn | Sequence[RewardFn]
    weights: Sequence[float] | None = None
    name: str = "reward"
    candidates: int = 0
    timeout: float | None = None

    per_example_reset: ClassVar[dict] = {"_cache": None}  # each member decodes its own completions

    def __post_init__(self) -> None:
        if not hasattr(self.generator, "generate"):
            raise ValueError(f"the generator must have .generate(model, prompts) (a GenerationPredictor); got "
                             f"{callable_name(self.generator)!r}: pass reward functions as rewards=, after it")
        if callable(self.rewards):
            self.rewards = [self.rewards]
        self.rewards = list(self.rewards)
        if not self.rewards:
            raise ValueError("RewardObjective needs at least one reward function")
        for fn in self.rewards:
            if not callable(fn):
                raise ValueError(f"reward {fn!r:.40} is not callable; a reward is a function (prompts, completions, "
                                 "**columns) -> one number per completion")
        if self.weights is not None and len(self.weights) != len(self.rewards):
            raise ValueError(f"{len(self.weights)} weights for {len(self.rewards)} reward functions")
        if self.candidates < 0:
            raise ValueError(f"candidates must be >= 0, got {self.candidates}")
        if self.timeout is not None and not 0 < self.timeout <= MAX_REWARD_TIMEOUT:  # a timer overflows beyond
            raise ValueError(f"timeout must be > 0 and <= {MAX_REWARD_TIMEOUT:g} seconds (a day) or None (no limit), "
                             f"got {self.timeout}")
        if self.candidates and not getattr(self.generator, "temperature", 0):
            raise ValueError("candidates > 0 needs a sampling generator (GenerationPredictor(temperature=...) > 0); "
                             "greedy decoding gives every candidate the same text")
        names = [callable_name(fn) for fn in self.rewards]  # a repeated name gets its position appended
        self._names = [n if names.count(n) == 1 else f"{n}_{k}" for k, n in enumerate(names)]
        self.last_means: dict[str, float] = {}
        self.last_values: dict[str, float] = {}
        self._cache: tuple[tuple, list[list[str]], list[list[float]]] | None = None

    def scores(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> list[float]:
        """The weighted sum of the rewards for each completion (and each reward's mean in ``last_means``).

        Conversational examples (their prompt given as messages: a ``prompt_messages`` column) reach the rewards
        as TRL hands them: ``prompts`` the message lists, each completion ``[{"role": "assistant", "content":
        text}]``."""
        total = [0.0] * len(prompts)
        means = {}
        if MESSAGES in columns:
            columns = dict(columns)
            messages = columns.pop(MESSAGES)
            if all(m is not None for m in messages):
                prompts = messages
                completions = [[{"role": "assistant", "content": c}] for c in completions]
        for weight, fn, label in zip(self.weights or [1.0] * len(self.rewards), self.rewards, self._names):
            with time_limit(self.timeout, label, len(completions)):  # outside: its expiry is no reward's error
                try:
                    result = fn(prompts=prompts, completions=completions, **columns)
                    values = list(result) if isinstance(result, Iterable) and not isinstance(result, str) else None
                except SystemExit as err:
                    raise UserCodeExit(f"reward {label!r} raised SystemExit({err.code!r}) (sys.exit, exit()): a "
                                       "reward must return one number per completion") from None
                except Exception as err:
                    raise RewardError(f"reward {label!r} raised {type(err).__name__}: {err}") from err
            if values is None:
                raise RewardError(f"reward {label!r} returned {result!r:.40} ({type(result).__name__}); a reward must "
                                  "return one float per completion (a list)")
            if len(values) != len(prompts):
                raise RewardError(f"reward {label!r} returned {len(values)} values for {len(prompts)} completions")
            for i, v in enumerate(values):
                if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):  # a 0-d numpy array or tensor
                    v = v.item()
                if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v):
                    raise RewardError(f"reward {label!r} returned {v!r} ({type(v).__name__}) for completion {i}; "
                                      "rewards must be numbers (int or float, not NaN)")
                values[i] = float(v)
                total[i] += weight * values[i]
            means[label] = sum(values) / len(values)
        self.last_means = means
        return total

    greater_is_better = True  # the objective logged is the reward; the loss is its negative

    def generate(self, model: torch.nn.Module, batch: Batch,
                 strip: bool = True) -> tuple[list[str], list[str], dict[str, list]]:
        """Prompts, one generated completion per example (``strip=False``: with the whitespace generated),
        and the batch's other fields as columns."""
        prompts = [ex["prompt"] for ex in batch]
        completions = self.generator.generate(model, prompts, strip=strip)
        return prompts, completions, reward_columns(batch)

    def rewards_for(self, model: torch.nn.Module, batch: Batch) -> list[float]:
        """Generate a completion per example and return its combined reward."""
        return self.scores(*self.generate(model, batch))

    def expected(self, model: torch.nn.Module, batch: Batch) -> list[float]:
        """Each prompt's expected reward over its sampled candidates (see ``candidates``)."""
        prompts = [ex["prompt"] for ex in batch]
        key = (current_step(), prompts_seed(prompts))  # outside a MeZO step: kept while the batch repeats
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
        self.last_values = {self.name: sum(rewards) / len(rewards)}  # the (expected) weighted reward
        return -self.last_values[self.name]

    def evaluate(self, model: torch.nn.Module, examples: Batch, generator: Any = None,
                 batch_size: int = 16) -> tuple[float, dict[str, float]]:
        """The weighted reward of ``generator``'s completions (default: this objective's; pass a greedy one for
        held-out figures) averaged over ``examples``, and each reward's own mean, in batches."""
        generator = generator or self.generator
        total, sums = 0.0, dict.fromkeys(self._names, 0.0)
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            prompts = [ex["prompt"] for ex in batch]
            total += sum(self.scores(prompts, generator.generate(model, prompts), reward_columns(batch)))
            for name, mean in self.last_means.items():
                sums[name] += mean * len(batch)
        return total / len(examples), {name: value / len(examples) for name, value in sums.items()}


def example_io(predictor: Any) -> tuple[list, list] | None:
    """One prediction and reference of the kind ``predictor`` gives a metric (None when it is not known)."""
    if hasattr(predictor, "scores"):
        return [0], [0]
    if hasattr(predictor, "generate"):
        return ["Paris"], [["Paris"]]
    return None


def check_metric(metric: Metric, predictor: Any, form: str) -> None:
    """Score one perfect prediction of the kind ``predictor`` gives, so that mistakes fail when the objective is
    built, not at the first step: a registered metric that cannot read these predictions (``squad_f1`` on
    class indices), or, in log form, a metric whose perfect prediction scores <= 0 (the log form takes the log
    of each example's expected metric). A function that raises on this one example is left to report its
    error when the objective is evaluated (some metrics need more than one example)."""
    example = example_io(predictor)
    if example is None:
        return
    try:
        value = metric(*example)
    except MetricError as err:
        if metric.name in list_metrics() and get_metric(metric.name).fn is metric.fn:
            kind = "class indices" if hasattr(predictor, "scores") else "generated texts"
            raise ValueError(f"metric {metric.name!r} cannot score this task's predictions ({kind}, such as "
                             f"{example[0]!r} against {example[1]!r}): {err.__cause__ or err}") from err
        return
    if form == "log" and value <= 0:
        raise ValueError(f"metric {metric.name!r} gives a perfect prediction {value:g}: the log form takes the log "
                         "of each example's expected metric, which needs values in [0, 1] (a perfect prediction "
                         f"> 0); use form 'mean' (zo-tune: --metric-form mean) to optimize the expected {metric.name}")


def sklearn_order(fn: Callable) -> bool:
    """Whether ``fn`` is one of scikit-learn's metrics (or a ``functools.partial`` of one), which take
    ``(y_true, y_pred)``: the reverse of ours."""
    fn = getattr(fn, "func", fn)
    return getattr(fn, "__module__", "").startswith("sklearn.")


def from_compute(module: Any, key: str, greater_is_better: bool = True, per_example: bool = False,
                 example: tuple[list, list] | None = None) -> Metric:
    """Adapt an object with ``.compute(predictions=..., references=...) -> dict`` (e.g. an ``evaluate`` metric).

    ``example`` (predictions, references) is computed once here, so that a ``key`` the result lacks is
    reported now; a compute that raises on it is left to report its error when the objective is evaluated."""
    label = getattr(module, "name", None) or key

    def value(result: Any) -> Any:
        if not isinstance(result, Mapping):
            raise TypeError(f"{type(module).__name__}.compute() returned {type(result).__name__}, not a dict")
        if key not in result:
            raise ValueError(f"{type(module).__name__}.compute() returned keys {sorted(result)}; no {key!r} "
                             "(pass key= one of them)")
        return result[key]

    if example is not None:
        try:
            result = module.compute(predictions=example[0], references=example[1])
        except Exception:  # the tiny example may not suit this metric; its first evaluation reports the error
            result = None
        if result is not None:
            value(result)
    return Metric(label, lambda predictions, refs: value(module.compute(predictions=predictions, references=refs)),
                  greater_is_better, per_example)


def looks_like_objective(fn: Callable) -> bool:
    """Whether a callable's first parameter is named ``model``: an objective, not a metric."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return bool(params) and params[0] == "model"


def make_objective(spec: str | Callable | Any, predictor: Any, *, greater_is_better: bool | None = None,
                   key: str | None = None, per_example: bool | None = None, smoothing: float | None = None,
                   samples: int = 256, form: str = "auto", sequence_score: str = "sum",
                   support: str = "auto") -> Objective:
    """Build an objective from a metric name, ``"cross_entropy"``, a metric function or a ``.compute`` object;
    an :class:`Objective` passes through unchanged.

    Which objective you get (docs/objectives.md has what each costs on the shipped tasks):

    - ``"cross_entropy"``: the gold target's cross-entropy (MeZO's objective).
    - a per-example metric such as ``"accuracy"`` or ``"squad_f1"`` with the defaults (``form="log"``,
      ``smoothing=1``): the mean log of each example's expected metric. For accuracy on label-word and
      multiple-choice tasks this is cross-entropy under another name (the same loss and projected gradients).
    - ``form="mean"``: the expected metric itself; ``smoothing=0``: the hard metric (it ties on most steps).
      Metrics that are not means over examples (macro ``"f1"``) are optimized in the mean form.
    - ``"macro_f1"``: macro-F1 over every class of the task, those a batch lacks included
      (:class:`MacroF1Objective`); ``"f1"`` takes each batch's classes only.

    ``greater_is_better`` and ``per_example`` (the metric is a mean of per-example scores, so its expectation
    is exact; registered metrics declare it, functions and ``.compute`` objects default to False) override
    the metric's own. Functions take ``(predictions, references)``; scikit-learn's metrics (``y_true, y_pred``)
    are recognized by their module and called in their own order, and those named ``*_loss`` or ``*_error``
    are minimized unless ``greater_is_better`` says otherwise. A ``.compute`` object needs ``key=``. A metric
    that cannot score the predictor's predictions, or whose perfect prediction scores <= 0 in log form, is
    refused here.
    """
    if isinstance(spec, Objective):
        return spec
    if isinstance(spec, str) and spec == CROSS_ENTROPY:
        return CrossEntropy(predictor)
    gib = True if greater_is_better is None else greater_is_better
    if isinstance(spec, str):
        if spec not in list_metrics():
            raise ValueError(f"unknown objective {spec!r}; available: {', '.join([CROSS_ENTROPY, *list_metrics()])}")
        metric = get_metric(spec)
    elif hasattr(spec, "compute"):
        if key is None:
            raise ValueError(f"{type(spec).__name__} has .compute(): pass key= naming the result to optimize (one of "
                             f"the keys its result dict holds, e.g. key='f1' for evaluate's f1), and "
                             "greater_is_better=False for an error or loss")
        metric = from_compute(spec, key, gib, bool(per_example), example_io(predictor))
    elif isinstance(spec, Metric):
        metric = spec
    elif callable(spec) and looks_like_objective(spec):
        raise TypeError(f"{callable_name(spec)!r} takes (model, ...): an objective, not a metric (predictions, "
                        "references); subclass zo_objectives.Objective (or Objective.register it) to pass it through")
    elif callable(spec) and sklearn_order(spec):  # (y_true, y_pred): called in its own order
        name = callable_name(getattr(spec, "func", spec))
        if greater_is_better is None and name.endswith(("_loss", "_error")):  # scikit-learn's naming convention
            gib = greater_is_better = False
        metric = Metric(name, lambda predictions, refs: spec(refs, predictions), gib)
    elif callable(spec):
        metric = Metric(getattr(spec, "__name__", "metric"), spec, gib)
    else:
        raise TypeError(f"cannot make an objective from {type(spec).__name__}; pass a metric name, "
                        "'cross_entropy', a function (predictions, references) -> float, or an object with .compute()")
    if greater_is_better is not None and metric.greater_is_better != greater_is_better:
        metric = replace(metric, greater_is_better=greater_is_better)  # a copy: the registry keeps its own
    if per_example is not None and metric.per_example != per_example:
        metric = replace(metric, per_example=per_example)
    kind = MacroF1Objective if metric.name == MACRO_F1 and metric.fn is get_metric(MACRO_F1).fn else MetricObjective
    return kind(metric, predictor, smoothing=smoothing, samples=samples, form=form,
                           sequence_score=sequence_score, support=support)


# Wrappers: an objective scored for every member of a population at once, or split across ranks


class _Shared:
    """One pass for all members: a predictor's passes (``_forward``, ``candidate_scores``, ``generate``) run on the
    arguments repeated once per member, rows grouped by member, and are split; each member reads its part."""

    PASSES = ("_forward", "candidate_scores", "generate")

    def __init__(self, predictor: Any, members: int):
        self.predictor, self.members = predictor, members
        self.shared = copy.copy(predictor)
        self.shared.members = members
        self.results: dict[tuple, list] = {}

    def view(self, member: int) -> Any:
        """The predictor as member ``member`` sees it."""
        view = copy.copy(self.predictor)
        for name in self.PASSES:
            if hasattr(view, name):
                setattr(view, name, self._pass(name, member))
        return view

    def _pass(self, name: str, member: int) -> Callable:
        def run(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            key = (name, repr(args), repr(sorted(kwargs.items())))
            if key not in self.results:
                n = self.members
                repeated = [a * n if isinstance(a, list | tuple) else a for a in args]
                out = getattr(type(self.predictor), name)(self.shared, model, *repeated, **kwargs)
                per = len(out) // n
                self.results[key] = [out[m * per:(m + 1) * per] for m in range(n)]
            return self.results[key][member]
        return run


PREDICTOR_FIELDS = ("predictor", "generator")


class PopulationObjective(Objective):
    """``objective`` scored for every member in one pass: returns one loss per member.

    ``members`` is the count (or a function returning it, e.g. ``lambda: optimizer.members``). The objective's
    predictor runs its passes once on the batch repeated once per member (rows grouped by member, as
    :class:`Population` expects); then the objective is computed for each member from that member's part, so
    any objective built on a predictor (metric, cross-entropy, reward, weighted sums of them) works unchanged.
    Generation decodes all members' completions in one ``generate`` call; sampled completions draw different
    random numbers per member (the rows of one call), not the same as MeZO's two sides share. Caches an
    objective keeps between calls (a batch's candidates) are those the first member built.
    """

    def __init__(self, objective: Any, members: int | Callable[[], int]):
        self.objective, self._members = objective, members
        self.name = getattr(objective, "name", type(objective).__name__)

    def __getattr__(self, name: str) -> Any:  # greater_is_better, last_means, ... of the wrapped objective
        if name == "objective":
            raise AttributeError(name)
        return getattr(self.objective, name)

    def __call__(self, model: torch.nn.Module, batch: Sequence[dict]) -> list[float]:
        n = self._members() if callable(self._members) else self._members
        shared: dict[int, _Shared] = {}
        return [float(self._member(self.objective, model, batch, n, m, shared)) for m in range(n)]

    def _member(self, objective: Any, model: torch.nn.Module, batch: Sequence[dict], n: int, m: int,
                shared: dict) -> float:
        terms = getattr(objective, "terms", None)
        if terms is not None:  # a WeightedSum
            return sum(w * self._member(o, model, batch, n, m, shared) for w, o in terms)
        field = next((f for f in PREDICTOR_FIELDS if hasattr(objective, f)), None)
        if field is None:
            raise TypeError(f"PopulationObjective needs an objective that scores through a predictor (metric, "
                            f"cross-entropy, reward); {type(objective).__name__} has none: write a closure that "
                            "returns one loss per member")
        predictor = getattr(objective, field)
        view = shared.setdefault(id(predictor), _Shared(predictor, n)).view(m)
        mine = copy.copy(objective)
        setattr(mine, field, view)
        loss = mine(model, batch)
        kept = {k: v for k, v in vars(mine).items() if k != field}
        vars(objective).update(kept)  # caches (a batch's candidates) and last_means: the next member reads them
        return loss

    def __repr__(self) -> str:
        return f"PopulationObjective({self.objective!r})"


class _Pending(Exception):  # noqa: N818 (a signal, not an error): a member waits for a pass the others share
    pass


class PerExampleObjective(Objective):
    """``objective`` on each example of the batch on its own, under ``copies`` members per example: returns
    ``copies * len(batch)`` losses, members ``copies * k`` to ``copies * k + copies - 1`` scoring example k (a
    per-example estimator's antithetic pair: :class:`~zo_objectives.estimators.grzo.GRZO`).

    Every member's predictor passes still run as batched passes: the members' objectives run until each asks for
    a pass, each pass asked for runs once on the arguments of the members that wait for it, joined (rows grouped by
    member, as the population's forward hooks expect, a member that waits for another pass or none filling its rows
    with a copy), and they run again with the results, until every member is done. Each example must give a pass as
    many rows as the others, except candidates: each example's list is padded to the longest with its first
    candidate and cut back after. A generation metric's options hold each member's own greedy answer (MeZO scores
    its pair on the + side's). ``last_values`` is the members' mean; other attributes are the last member's.
    """

    def __init__(self, objective: Any, copies: int = 2):
        self.objective, self.copies = objective, copies
        self.name = getattr(objective, "name", type(objective).__name__)

    def __getattr__(self, name: str) -> Any:  # greater_is_better, ... of the wrapped objective
        if name == "objective":
            raise AttributeError(name)
        return getattr(self.objective, name)

    def __call__(self, model: torch.nn.Module, batch: Sequence[dict]) -> list[float]:
        n = self.copies * len(batch)
        results: list[list] = [[] for _ in range(n)]  # per member, the results of its passes in the order asked
        # every member starts from the objective as the call found it, with what the objective resets per example
        # (its cached generations: a member that found another's, or an earlier call's, would skip a pass)
        objectives = self._objectives(self.objective)
        start = {id(o): {**vars(o), **getattr(o, "per_example_reset", {})} for o in objectives}
        while True:
            waiting: dict[int, tuple] = {}
            losses, values = [], []
            for m in range(n):
                mine: list = []
                for o in objectives:
                    vars(o).clear()
                    vars(o).update(start[id(o)])
                try:
                    losses.append(float(self._member(self.objective, model, [batch[m // self.copies]], m, results,
                                                     waiting, [0], mine)))
                    values += mine
                except _Pending:
                    pass
            if not waiting:
                names = set().union(*(v.keys() for v in values)) if values else set()
                self.objective.last_values = {k: sum(v[k] for v in values) / len(values) for k in names
                                              if all(k in v for v in values)}
                return losses
            groups: dict[tuple, list[int]] = {}
            for m, (predictor, name, _, kwargs) in waiting.items():
                groups.setdefault((id(predictor), name, repr(kwargs)), []).append(m)
            for members in groups.values():
                for m, part in zip(members, self._run(model, {m: waiting[m] for m in members}, n)):
                    results[m].append(part)

    @staticmethod
    def _objectives(objective: Any) -> list:
        """The objective and those it sums (a WeightedSum's terms), each holding its own caches."""
        terms = getattr(objective, "terms", None)
        return [objective] if terms is None else [objective, *(o for _, t in terms for o in
                                                               PerExampleObjective._objectives(t))]

    def _member(self, objective: Any, model: torch.nn.Module, batch: list[dict], m: int, results: list,
                waiting: dict, count: list[int], values: list) -> float:
        terms = getattr(objective, "terms", None)
        if terms is not None:  # a WeightedSum: its terms' values named as WeightedSum.__call__ names them
            total, merged = 0.0, {}
            for k, (w, o) in enumerate(terms):
                total += w * self._member(o, model, batch, m, results, waiting, count, values)
                for name, v in (getattr(o, "last_values", None) or {}).items():
                    merged[name if name not in merged else f"{name}_{k}"] = v
            if objective is self.objective:
                values.append(merged)
            return total
        field = next((f for f in PREDICTOR_FIELDS if hasattr(objective, f)), None)
        if field is None:
            raise TypeError(f"PerExampleObjective needs an objective that scores through a predictor (metric, "
                            f"cross-entropy, reward); {type(objective).__name__} has none")
        predictor = getattr(objective, field)
        view = copy.copy(predictor)
        for name in _Shared.PASSES:
            if hasattr(view, name):
                setattr(view, name, self._pass(predictor, name, results[m], m, waiting, count))
        mine = copy.copy(objective)
        setattr(mine, field, view)
        loss = mine(model, batch)
        vars(objective).update({k: v for k, v in vars(mine).items() if k != field})  # what it logs: the last's
        if isinstance(getattr(mine, "last_values", None), dict) and objective is self.objective:
            values.append(mine.last_values)
        return loss

    @staticmethod
    def _pass(predictor: Any, name: str, done: list, m: int, waiting: dict, count: list[int]) -> Callable:
        def run(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            index = count[0]
            count[0] += 1
            if index < len(done):
                return done[index]
            waiting[m] = (predictor, name, args, kwargs)
            raise _Pending
        return run

    @staticmethod
    def _run(model: torch.nn.Module, waiting: dict, n: int) -> list:
        """One pass for the members that wait for it (the others' rows filled with a copy): their parts, in order."""
        (predictor, name, first, kwargs), *_ = waiting.values()
        rows = [waiting.get(m, waiting[next(iter(waiting))]) for m in range(n)]  # the hooks expect n members' rows
        joined, widths = [], None
        for i, arg in enumerate(first):
            parts = [r[2][i] for r in rows]
            if name == "candidate_scores" and i == 1:  # (prompts, candidates, ...): examples may hold different
                # numbers of candidates (gold answers), and each member's rows must be as many as the others':
                # each list is padded to the longest with its first candidate, each member's scores cut back
                widths = [max([1, *map(len, p)]) for p in parts]
                most = max(widths)
                parts = [[[*c, *[c[0]] * (most - len(c))] if c else c for c in p] for p in parts]
            if isinstance(arg, list | tuple):
                if len({len(p) for p in parts}) != 1:
                    raise ValueError("PerExampleObjective: the examples give a pass different numbers of rows "
                                     "(candidates); each member's rows must be as many as the others'")
                joined.append([x for p in parts for x in p])
            elif any(repr(p) != repr(arg) for p in parts):
                raise RuntimeError(f"PerExampleObjective: the members pass {name} different arguments")
            else:
                joined.append(arg)
        shared = copy.copy(predictor)
        shared.members = n
        out = getattr(type(predictor), name)(shared, model, *joined, **kwargs)
        per = len(out) // n
        parts = [out[m * per:(m + 1) * per] for m in waiting]
        return parts if widths is None else [part[:, :widths[m]] for part, m in zip(parts, waiting)]

    def __repr__(self) -> str:
        return f"PerExampleObjective({self.objective!r}, copies={self.copies})"


class ShardedObjective(Objective):
    """``objective`` on the whole batch, computed as ``batch[rank::world]`` on each rank and all-reduced.

    Returns the mean of the shards' losses weighted by shard size, identical on every rank. This equals the
    single-process loss on the whole batch (up to float rounding) for objectives that are means over
    examples: accuracy, per-example cross-entropy, exact match, SQuAD EM/F1, mean rewards. Corpus-level
    metrics that are not means over examples, such as macro-F1, become a size-weighted mean of per-shard
    values: a different (noisier) objective whose estimate still agrees on every rank. Objectives with
    sampled predictions (``MetricObjective(samples > 0)``, sampled generation) seed their noise by the
    prompts they see, so a sharded run draws other (equally valid) random numbers than a single-process one;
    both sides of an SPSA estimate still share them. A rank with an empty shard (batch smaller than the
    world) contributes weight 0. If the objective raises on one rank only, the others wait in the all-reduce
    until torchrun ends them.
    """

    def __init__(self, objective: Any):
        self.objective = objective

    def __call__(self, model: torch.nn.Module, batch: Sequence[dict]) -> float:
        part = distributed.shard(batch)
        loss = float(self.objective(model, part)) if part else 0.0
        return distributed.weighted_mean(loss, len(part))

    def __getattr__(self, name: str) -> Any:  # name, metric, samples, ... of the wrapped objective
        if name == "objective":
            raise AttributeError(name)
        return getattr(self.objective, name)

    def __repr__(self) -> str:
        return f"ShardedObjective({self.objective!r})"
