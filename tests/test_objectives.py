"""Tests for objectives: make_objective's inputs, signs, WeightedSum and the sampled (smoothed) metric."""

from __future__ import annotations

import math

import pytest
import torch

import metrics
from metrics import Metric, MetricError, get_metric, register_metric
from zo_objectives.objectives import (
    CROSS_ENTROPY,
    DEFAULT_SMOOTHING,
    CrossEntropy,
    MetricObjective,
    Objective,
    RewardObjective,
    ShardedObjective,
    WeightedSum,
    make_objective,
    references,
)


class FixedPredictor:
    """Predicts ``ex["pred"]``; no scores, so metric objectives use the hard metric."""

    def __init__(self):
        self.ce_calls = 0

    def predict(self, model, batch):
        return [ex["pred"] for ex in batch]

    def cross_entropy(self, model, batch):
        self.ce_calls += 1
        return 1.25


class ScorePredictor(FixedPredictor):
    """Scores from ``ex["scores"]`` times ``model.scale`` (a stand-in for LabelWordPredictor / ChoicePredictor)."""

    def scores(self, model, batch):
        return torch.stack([ex["scores"] for ex in batch]) * model.scale

    def predict(self, model, batch):
        return self.scores(model, batch).argmax(-1).tolist()


class Scale(torch.nn.Module):
    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale


BATCH = [{"prompt": "a", "pred": 1, "label": 1}, {"prompt": "b", "pred": 0, "label": 1},
         {"prompt": "c", "pred": 2, "label": 2}, {"prompt": "d", "pred": 0, "label": 0}]
MODEL = Scale()


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(metrics, "_REGISTRY", dict(metrics._REGISTRY))


def test_references_are_labels_or_answers():
    assert references(BATCH) == [1, 1, 2, 0]
    assert references([{"prompt": "q", "answers": ["x", "y"]}]) == [["x", "y"]]


def test_metric_name_greater_is_better_is_negated():
    obj = make_objective("accuracy", FixedPredictor())
    assert isinstance(obj, MetricObjective) and obj.name == "accuracy" and obj.smoothing == 0
    assert obj(MODEL, BATCH) == -0.75


def test_metric_name_lower_is_better_is_not_negated(clean_registry):
    register_metric("error_rate", lambda p, r: sum(a != b for a, b in zip(p, r)) / len(p), greater_is_better=False)
    obj = make_objective("error_rate", FixedPredictor())
    assert obj(MODEL, BATCH) == 0.25


def test_greater_is_better_override_for_a_name():
    obj = make_objective("accuracy", FixedPredictor(), greater_is_better=False)
    assert obj(MODEL, BATCH) == 0.75
    assert get_metric("accuracy").greater_is_better  # the registry is not changed


def test_greater_is_better_true_keeps_the_metric_per_example_and_the_log_form():
    batch = scored_batch(n=12)
    default = make_objective("accuracy", ScorePredictor())
    stated = make_objective("accuracy", ScorePredictor(), greater_is_better=True)
    assert stated.metric.per_example and stated.form == "log" == default.form
    assert stated(MODEL, batch) == default(MODEL, batch)
    # flipping the direction keeps per_example too (the mean form then, as log needs greater is better)
    lower = make_objective("accuracy", ScorePredictor(), greater_is_better=False)
    assert lower.metric.per_example and lower.form == "mean"


def test_cross_entropy():
    predictor = FixedPredictor()
    obj = make_objective(CROSS_ENTROPY, predictor)
    assert isinstance(obj, CrossEntropy) and obj.name == "cross_entropy"
    assert obj(MODEL, BATCH) == 1.25 and predictor.ce_calls == 1


def test_plain_function():
    def first_correct(predictions, references):
        return float(predictions[0] == references[0])

    obj = make_objective(first_correct, FixedPredictor())
    assert obj.name == "first_correct" and obj(MODEL, BATCH) == -1.0
    lower = make_objective(first_correct, FixedPredictor(), greater_is_better=False)
    assert lower(MODEL, BATCH) == 1.0
    assert make_objective(lambda p, r: 0.5, FixedPredictor())(MODEL, BATCH) == -0.5


def test_metric_instance():
    obj = make_objective(Metric("m", lambda p, r: 0.3, greater_is_better=False), FixedPredictor())
    assert obj(MODEL, BATCH) == pytest.approx(0.3)


class ComputeMetric:
    """The ``evaluate`` convention: ``.compute(predictions=..., references=...)`` returns a dict."""

    name = "computed"

    def __init__(self):
        self.seen = None

    def compute(self, predictions, references):
        self.seen = (list(predictions), list(references))
        return {"accuracy": sum(p == r for p, r in zip(predictions, references)) / len(predictions), "n": 4}


def test_compute_object():
    module = ComputeMetric()
    obj = make_objective(module, FixedPredictor(), key="accuracy")
    assert obj.name == "computed"
    assert obj(MODEL, BATCH) == -0.75
    assert module.seen == ([1, 0, 2, 0], [1, 1, 2, 0])
    assert make_objective(module, FixedPredictor(), key="accuracy", greater_is_better=False)(MODEL, BATCH) == 0.75


def test_compute_object_needs_an_existing_key():
    with pytest.raises(ValueError, match="key="):
        make_objective(ComputeMetric(), FixedPredictor())
    # a predictor of known kind: one tiny compute when the objective is built reports the wrong key at once
    module = ComputeMetric()
    with pytest.raises(ValueError, match=r"returned keys \['accuracy', 'n'\]; no 'f1'"):
        make_objective(module, ScorePredictor(), key="f1")
    assert module.seen == ([0], [0])
    # a predictor of unknown kind: no guess at its predictions; the first evaluation reports it, naming the metric
    obj = make_objective(ComputeMetric(), FixedPredictor(), key="f1")
    with pytest.raises(MetricError, match=r"metric 'computed' raised ValueError: .*keys \['accuracy', 'n'\]; no 'f1'"):
        obj(MODEL, BATCH)


class StringsOnlyCompute:
    """A ``.compute`` metric that refuses the integer labels of the tiny build-time example."""

    name = "strings_only"

    def compute(self, predictions, references):
        if not all(isinstance(p, str) for p in predictions):
            raise TypeError("predictions must be strings")
        return {"score": 1.0}


def test_compute_object_that_fails_on_the_build_example_reports_when_evaluated():
    obj = make_objective(StringsOnlyCompute(), ScorePredictor(), key="score", smoothing=0)
    with pytest.raises(MetricError, match="metric 'strings_only' raised TypeError: predictions must be strings"):
        obj(MODEL, scored_batch(n=4))


def test_compute_object_can_be_per_example():
    batch = scored_batch(n=40)
    probs = torch.stack([ex["scores"] for ex in batch]).softmax(-1)
    expected = float(probs[torch.arange(len(batch)), [ex["label"] for ex in batch]].mean())
    corpus = make_objective(ComputeMetric(), ScorePredictor(), key="accuracy", form="mean")
    assert not corpus.metric.per_example and corpus.form == "mean"  # a corpus metric: Monte Carlo draws
    exact = make_objective(ComputeMetric(), ScorePredictor(), key="accuracy", per_example=True, form="mean")
    assert exact.metric.per_example
    assert -exact(MODEL, batch) == pytest.approx(expected, abs=1e-6)  # exact expectation, no draws
    assert -corpus(MODEL, batch) != pytest.approx(expected, abs=1e-6)
    assert make_objective(ComputeMetric(), ScorePredictor(), key="accuracy", per_example=True).form == "log"
    # per_example also declares a plain function's, or overrides a registered metric's
    assert make_objective(metrics.accuracy, ScorePredictor(), per_example=True).metric.per_example
    assert not make_objective("accuracy", ScorePredictor(), per_example=False, form="mean").metric.per_example


@pytest.mark.parametrize("returned,needle", [
    ([0.5], r"returned \[0.5\] \(list\)"),
    (None, r"returned None \(NoneType\)"),
    ("0.5", r"returned '0.5' \(str\)"),
    (float("nan"), "returned nan"),
    (True, r"returned True \(bool\)"),
])
def test_a_metric_returning_no_number_fails_when_evaluated_naming_it(returned, needle):
    def my_metric(predictions, references):
        return returned

    obj = make_objective(my_metric, FixedPredictor())  # built fine: nothing is evaluated yet
    with pytest.raises(MetricError, match=f"metric 'my_metric' {needle}") as err:
        obj(MODEL, BATCH)
    assert isinstance(err.value, TypeError) and isinstance(err.value, ValueError)
    smooth = make_objective(Metric("mine", my_metric, per_example=True), ScorePredictor())
    with pytest.raises(MetricError, match=f"metric 'mine' {needle}"):
        smooth(MODEL, scored_batch(n=4))


def test_a_metric_that_raises_is_named():
    def broken(predictions, references):
        return 1 / 0

    with pytest.raises(MetricError, match="metric 'broken' raised ZeroDivisionError: division by zero"):
        make_objective(broken, FixedPredictor())(MODEL, BATCH)
    # numpy numbers and 0-d arrays are numbers
    import numpy as np

    assert make_objective(lambda p, r: np.float32(0.25), FixedPredictor())(MODEL, BATCH) == -0.25
    assert make_objective(lambda p, r: np.array(0.5), FixedPredictor())(MODEL, BATCH) == -0.5


def test_weighted_sum():
    acc = make_objective("accuracy", FixedPredictor())
    ce = make_objective(CROSS_ENTROPY, FixedPredictor())
    obj = WeightedSum([(0.5, acc), (2.0, ce)])
    assert obj(MODEL, BATCH) == pytest.approx(0.5 * -0.75 + 2.0 * 1.25)
    assert make_objective(obj, FixedPredictor()) is obj


class MyObjective(Objective):
    """A user's own objective, marked by subclassing Objective."""

    def __call__(self, model, batch):
        return 7.0


class Unmarked:
    """An objective class that does not subclass Objective (registered in a test)."""

    def __call__(self, model, batch):
        return 3.0


class EchoGenerator:
    def generate(self, model, prompts, strip=True):
        return list(prompts)


def test_built_objectives_pass_through():
    obj = MetricObjective(get_metric("f1"), FixedPredictor())
    assert make_objective(obj, None) is obj
    ce = CrossEntropy(FixedPredictor())
    assert make_objective(ce, None) is ce
    reward = RewardObjective(EchoGenerator(), lambda prompts, completions, **kw: [1.0] * len(prompts))
    assert make_objective(reward, None) is reward
    # a user's objective and a sharded one are objectives too: returned as they are, not wrapped as metrics
    mine = MyObjective()
    assert make_objective(mine, FixedPredictor()) is mine and mine(MODEL, BATCH) == 7.0
    sharded = ShardedObjective(mine)
    assert make_objective(sharded, FixedPredictor()) is sharded and sharded(MODEL, BATCH) == 7.0


def test_objective_is_a_class_to_subclass_not_any_callable():
    assert not isinstance(lambda model, batch: 0.0, Objective)
    assert not isinstance(Unmarked(), Objective)
    with pytest.raises(TypeError, match="Can't instantiate abstract class"):
        Objective()
    # a class one cannot change is marked with register()
    Objective.register(Unmarked)
    try:
        unmarked = Unmarked()
        assert make_objective(unmarked, FixedPredictor()) is unmarked
    finally:  # undo the registration for the other tests
        Objective._abc_registry_clear()
        Objective._abc_caches_clear()
    assert not isinstance(Unmarked(), Objective)


def test_a_function_of_model_and_batch_is_refused_not_taken_for_a_metric():
    def my_loss(model, batch):
        return 1.0

    with pytest.raises(TypeError, match="'my_loss' takes \\(model, ...\\): an objective, not a metric.*subclass"):
        make_objective(my_loss, FixedPredictor())


def test_unknown_name_lists_options():
    with pytest.raises(ValueError, match="unknown objective 'accurracy'") as err:
        make_objective("accurracy", FixedPredictor())
    for name in ("cross_entropy", "accuracy", "f1", "squad_f1"):
        assert name in str(err.value)


def test_not_an_objective_raises_type_error():
    with pytest.raises(TypeError, match="metric name"):
        make_objective(42, FixedPredictor())


def test_smoothing_default_with_and_without_scores():
    assert DEFAULT_SMOOTHING == 1.0
    assert make_objective("accuracy", ScorePredictor()).smoothing == DEFAULT_SMOOTHING
    assert MetricObjective(get_metric("accuracy"), ScorePredictor()).smoothing == DEFAULT_SMOOTHING  # one default
    assert make_objective("accuracy", ScorePredictor(), smoothing=0).smoothing == 0
    assert make_objective("accuracy", FixedPredictor()).smoothing == 0  # no scores: the hard metric
    assert MetricObjective(get_metric("accuracy"), FixedPredictor()).smoothing == 0


def test_invalid_sampling_settings_raise():
    with pytest.raises(ValueError, match="scores"):
        MetricObjective(get_metric("accuracy"), FixedPredictor(), smoothing=1.0)
    with pytest.raises(ValueError, match="samples >= 1, got 1.0, 0"):
        MetricObjective(get_metric("accuracy"), ScorePredictor(), smoothing=1.0, samples=0)
    with pytest.raises(ValueError, match="smoothing must be >= 0.*got -1.0"):
        MetricObjective(get_metric("accuracy"), ScorePredictor(), smoothing=-1.0)


def scored_batch(n=24, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, classes, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return [{"prompt": f"p{i}", "scores": scores[i], "label": int(labels[i])} for i in range(n)]


def test_sampled_metric_uses_common_random_numbers():
    batch = scored_batch()
    obj = MetricObjective(get_metric("f1"), ScorePredictor(), smoothing=1.0, samples=16)  # not per-example: drawn
    before = torch.get_rng_state()
    values = {obj(MODEL, batch) for _ in range(3)}
    assert len(values) == 1
    assert torch.equal(torch.get_rng_state(), before)  # a private generator
    # the noise is fixed by the batch's prompts: another batch with the same scores draws other noise
    renamed = [{**ex, "prompt": ex["prompt"] + "!"} for ex in batch]
    assert obj(MODEL, renamed) != obj(MODEL, batch)
    # and a small change of the scores moves the value only a little (no noise redrawn)
    assert abs(obj(Scale(1.01), batch) - obj(MODEL, batch)) < 0.1


def test_smoothed_metric_is_expected_accuracy_of_softmax_sampler(clean_registry):
    batch = scored_batch(n=40)
    probs = torch.stack([ex["scores"] for ex in batch]).softmax(-1)
    expected = float(probs[torch.arange(len(batch)), [ex["label"] for ex in batch]].mean())
    exact = MetricObjective(get_metric("accuracy"), ScorePredictor(), smoothing=1.0, form="mean")  # exact
    assert -exact(MODEL, batch) == pytest.approx(expected, abs=1e-6)
    register_metric("accuracy_drawn", metrics.accuracy)  # the same function, not declared per-example: drawn
    drawn = MetricObjective(get_metric("accuracy_drawn"), ScorePredictor(), smoothing=1.0, samples=2000)
    assert -drawn(MODEL, batch) == pytest.approx(expected, abs=0.02)


def test_small_smoothing_approaches_hard_metric():
    batch = scored_batch(n=40)
    for name in ("accuracy", "f1"):
        hard = MetricObjective(get_metric(name), ScorePredictor(), smoothing=0)
        hot = MetricObjective(get_metric(name), ScorePredictor(), samples=64, smoothing=3.0, form="mean")
        cold = MetricObjective(get_metric(name), ScorePredictor(), samples=64, smoothing=1e-3, form="mean")
        assert cold(MODEL, batch) == pytest.approx(hard(MODEL, batch), abs=1e-12)
        assert hot(MODEL, batch) != pytest.approx(hard(MODEL, batch), abs=1e-3)
    # the gap shrinks as the smoothing goes down
    hard_value = MetricObjective(get_metric("accuracy"), ScorePredictor(), smoothing=0)(MODEL, batch)
    gaps = [abs(MetricObjective(get_metric("accuracy"), ScorePredictor(), smoothing=t, form="mean")(MODEL, batch)
                - hard_value) for t in (2.0, 0.5, 0.05)]
    assert gaps[0] > gaps[2] and gaps[2] < 0.05


def test_sampled_lower_is_better_metric_keeps_sign(clean_registry):
    register_metric("err", lambda p, r: sum(a != b for a, b in zip(p, r)) / len(p), greater_is_better=False,
                    per_example=True)
    batch = scored_batch()
    err = MetricObjective(get_metric("err"), ScorePredictor(), smoothing=1.0, samples=32)
    acc = MetricObjective(get_metric("accuracy"), ScorePredictor(), smoothing=1.0, samples=32, form="mean")
    assert err.form == "mean"  # lower is better: no log form
    assert err(MODEL, batch) == pytest.approx(1 + acc(MODEL, batch))


def test_log_form_is_default_for_per_example_metrics_and_equals_cross_entropy_of_accuracy():
    batch = scored_batch(n=40)
    scores = torch.stack([ex["scores"] for ex in batch])
    labels = torch.tensor([ex["label"] for ex in batch])
    log_acc = make_objective("accuracy", ScorePredictor())
    assert log_acc.form == "log" and make_objective("f1", ScorePredictor()).form == "mean"
    # -mean_i log p_i(gold) at temperature 1: the cross-entropy over the classes
    assert log_acc(MODEL, batch) == pytest.approx(float(torch.nn.functional.cross_entropy(scores, labels)), abs=1e-5)
    # the smoothing temperature divides the scores first
    hot = make_objective("accuracy", ScorePredictor(), smoothing=2.0)
    assert hot(MODEL, batch) == pytest.approx(float(torch.nn.functional.cross_entropy(scores / 2, labels)), abs=1e-5)


def test_form_must_be_known_and_log_needs_a_per_example_metric():
    with pytest.raises(ValueError, match="accepted: auto, log, mean"):
        MetricObjective(get_metric("accuracy"), ScorePredictor(), smoothing=1.0, form="sqrt")
    with pytest.raises(ValueError, match="per-example"):
        MetricObjective(get_metric("f1"), ScorePredictor(), smoothing=1.0, form="log")


class CandidatePredictor:
    """A stand-in for GenerationPredictor: greedy answers from ``ex["greedy"]``, candidate scores from
    ``model.table``."""

    def __init__(self):
        self.generated = 0

    def generate(self, model, prompts, strip=True):
        self.generated += 1
        self.strip = strip
        return [model.greedy[p] for p in prompts]

    def candidate_scores(self, model, prompts, candidates, length_normalize=False):
        self.length_normalize = length_normalize
        out = torch.full((len(prompts), max(len(c) for c in candidates)), float("-inf"))
        for row, cands in enumerate(candidates):
            for col, c in enumerate(cands):
                out[row, col] = model.table[c]
        return out


def test_generation_options_are_greedy_and_gold_answers_scored_by_likelihood():
    model = Scale()
    model.greedy = {"q1": "Paris", "q2": "the city of Rome", "q3": ""}
    model.table = {"Paris": 0.0, "the city of Rome": 0.0, "Rome": 0.0, "Lyon": -1.0}
    batch = [{"prompt": "q1", "answers": ["Paris"]}, {"prompt": "q2", "answers": ["Rome"]},
             {"prompt": "q3", "answers": ["Lyon"]}]
    predictor = CandidatePredictor()
    obj = make_objective("squad_f1", predictor, support="options")
    assert obj.smoothing == 1.0 and obj.form == "log"
    assert make_objective("squad_f1", predictor).support == "model"  # the default for generation in log form
    assert make_objective("squad_f1", predictor, form="mean").support == "options"
    assert make_objective("squad_f1", predictor, sequence_score="mean").support == "options"
    options, _ = obj.options(model, batch)
    assert options == [["Paris"], ["the city of Rome", "Rome"], ["Lyon"]]  # deduplicated, empty dropped
    # q1: greedy is gold (1); q2: half "the city of Rome" (F1 0.4) and half "Rome" (1); q3: only gold (1)
    f1_q2 = metrics.squad_f1(["the city of Rome"], [["Rome"]])
    assert obj(model, batch) == pytest.approx(-sum(map(math.log, [1.0, 0.5 * f1_q2 + 0.5, 1.0])) / 3)
    # the candidates are generated once per batch, so both sides of an SPSA step score the same set
    model.greedy = {"q1": "Lyon", "q2": "Lyon", "q3": "Lyon"}
    obj(model, batch)
    assert predictor.generated == 1
    obj(model, batch[:2])
    assert predictor.generated == 2
    # candidates are scored by their total log-likelihood by default, or per token
    assert predictor.length_normalize is False
    make_objective("squad_f1", predictor, sequence_score="mean")(model, batch)
    assert predictor.length_normalize is True
    with pytest.raises(ValueError, match="accepted: mean, sum"):
        make_objective("squad_f1", predictor, sequence_score="max")


def test_generated_options_are_generated_again_at_each_step_of_a_repeated_batch():
    """Both sides of an estimate score the same greedy answers; the next step (the same batch in a later epoch)
    gets the model's new ones, not the ones cached by the prompts (issue 25)."""
    from zo_objectives.estimators import MeZO

    model = Scale()
    model.w = torch.nn.Parameter(torch.zeros(1))
    model.greedy, model.table = {"q1": "Paris"}, {"Paris": 0.0, "Lyon": 0.0, "Rome": 0.0}
    batch = [{"prompt": "q1", "answers": ["Rome"]}]
    predictor = CandidatePredictor()
    obj = make_objective("squad_f1", predictor, support="options")
    optimizer = MeZO(model.parameters(), lr=0.0, eps=1e-3, seed=0)
    optimizer.step(lambda: obj(model, batch))
    assert predictor.generated == 1 and obj._candidates[1] == [["Paris", "Rome"]]
    model.greedy = {"q1": "Lyon"}  # the model has moved
    optimizer.step(lambda: obj(model, batch))
    assert predictor.generated == 2  # once per step, shared by its two evaluations
    assert obj._candidates[1] == [["Lyon", "Rome"]]


def test_generated_options_are_scored_as_generated_and_targets_with_their_leading_space():
    model = Scale()
    model.greedy = {"q1": " Paris\t", "q2": " the city of Rome", "q3": " "}
    model.table = {" Paris\t": 0.0, " the city of Rome": -1.0, " Rome": -2.0, " Lyon": -3.0}
    batch = [{"prompt": "q1", "answers": ["Paris"], "targets": [" Paris"]},
             {"prompt": "q2", "answers": ["Rome"], "targets": [" Rome"]},
             {"prompt": "q3", "answers": ["Lyon"], "targets": [" Lyon"]}]
    predictor = CandidatePredictor()
    obj = make_objective("squad_f1", predictor)
    options, scores = obj.options(model, batch)
    assert predictor.strip is False  # the greedy text keeps the whitespace it was generated with
    assert options == [[" Paris\t"], [" the city of Rome", " Rome"], [" Lyon"]]  # same stripped text: greedy kept
    assert scores[1].tolist() == [-1.0, -2.0]


def test_model_support_weighs_options_by_their_probability_under_the_model():
    model = Scale()
    model.greedy = {"q1": " Paris", "q2": " the city of Rome"}
    model.table = {" Paris": -0.5, " the city of Rome": -1.0, " Rome": -2.0, " Lyon": -3.0}
    batch = [{"prompt": "q1", "answers": ["Paris"], "targets": [" Paris"]},
             {"prompt": "q2", "answers": ["Rome", "Lyon"], "targets": [" Rome", " Lyon"]}]
    f1_q2 = metrics.squad_f1(["the city of Rome"], [["Rome", "Lyon"]])
    expected_q2 = math.exp(-1.0) * f1_q2 + math.exp(-2.0) + math.exp(-3.0)  # other answers count as F1 0
    log_form = make_objective("squad_f1", CandidatePredictor(), support="model")
    assert log_form.support == "model"
    assert log_form(model, batch) == pytest.approx(-(-0.5 + math.log(expected_q2)) / 2)
    mean_form = make_objective("squad_f1", CandidatePredictor(), support="model", form="mean")
    assert mean_form(model, batch) == pytest.approx(-(math.exp(-0.5) + expected_q2) / 2)
    # a single option has probability 1 over the options, but its own probability under the model
    only_gold = {"q1": " Paris", "q2": " Rome"}
    model.greedy = only_gold
    alone = make_objective("squad_f1", CandidatePredictor(), support="model")
    assert alone(model, batch) == pytest.approx(-(-0.5 + math.log(math.exp(-2.0) + math.exp(-3.0))) / 2)
    assert make_objective("squad_f1", CandidatePredictor(), support="options")(model, batch[:1]) == 0.0
    # however unlikely, an answer counts (no floor); an example no option scores on contributes log(1e-6)
    model.greedy = {"q1": " Paris", "q2": " Oslo"}
    model.table = {" Paris": -40.0, " Oslo": -1.0, " Rome": -2.0, " Lyon": -3.0}
    tail = make_objective("squad_f1", CandidatePredictor())
    assert tail(model, batch[:1]) == pytest.approx(40.0)
    assert tail(model, [{"prompt": "q2", "answers": ["Rome"], "targets": []}]) == pytest.approx(-math.log(1e-6))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(support="everything"), "accepted: auto, options, model"),
    (dict(support="model", sequence_score="mean"), "sequence_score 'sum'"),
])
def test_support_rejects_bad_values(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        make_objective("squad_f1", CandidatePredictor(), **kwargs)
    with pytest.raises(ValueError, match="generation task"):
        make_objective("accuracy", ScorePredictor(), support="model")


# --- what each objective is, and what it logs ------------------------------------------------------------------
def test_accuracy_in_log_form_is_cross_entropy_on_label_words(tokenizer, small_lm):
    """The default ``accuracy`` objective on a label-word task is cross-entropy under another name: the same loss
    to float rounding, so the same SPSA estimates; the mean form is another objective."""
    from zo_objectives.scoring import LabelWordPredictor

    predictor = LabelWordPredictor(tokenizer, [" bad", " good"])
    batch = [{"prompt": f"Review {i}: it was", "label": i % 2} for i in range(6)]
    ce, log_acc = CrossEntropy(predictor)(small_lm, batch), make_objective("accuracy", predictor)(small_lm, batch)
    assert log_acc == pytest.approx(ce, abs=1e-6)
    mean_acc = make_objective("accuracy", predictor, form="mean")
    gold = predictor.scores(small_lm, batch).softmax(-1)[range(6), [ex["label"] for ex in batch]]
    assert -mean_acc(small_lm, batch) == pytest.approx(float(gold.mean()), abs=1e-6)  # the expected accuracy
    # what each logs: its own value by name, in its own direction
    assert mean_acc.last_values == {"accuracy": pytest.approx(-mean_acc(small_lm, batch))}
    log_obj = make_objective("accuracy", predictor)
    log_obj(small_lm, batch)
    assert log_obj.last_values["accuracy"] == pytest.approx(mean_acc.last_values["accuracy"])  # expected accuracy


def test_last_values_are_each_objectives_own_value_and_weighted_sum_keeps_the_terms():
    acc = make_objective("accuracy", FixedPredictor())
    ce = make_objective(CROSS_ENTROPY, FixedPredictor())
    both = WeightedSum([(0.5, acc), (2.0, ce)])
    both(MODEL, BATCH)
    assert both.last_values == {"accuracy": 0.75, "cross_entropy": 1.25}  # accuracy, not its negative
    twice = WeightedSum([(1.0, acc), (1.0, make_objective("accuracy", FixedPredictor()))])
    twice(MODEL, BATCH)
    assert twice.last_values == {"accuracy": 0.75, "accuracy_1": 0.75}


def test_scikit_learn_metrics_are_called_in_their_own_order():
    from functools import partial

    from sklearn.metrics import mean_absolute_error, precision_score, recall_score

    batch = [{"prompt": str(i), "pred": p, "label": y} for i, (p, y) in enumerate([(1, 1), (1, 0), (1, 0), (0, 1)])]
    # predictions [1, 1, 1, 0], references [1, 0, 0, 1]: recall 1/2, precision 1/3
    assert -make_objective(recall_score, FixedPredictor())(MODEL, batch) == pytest.approx(1 / 2)
    assert -make_objective(precision_score, FixedPredictor())(MODEL, batch) == pytest.approx(1 / 3)
    assert -make_objective(partial(recall_score, pos_label=0), FixedPredictor())(MODEL, batch) == pytest.approx(0.0)
    error = make_objective(mean_absolute_error, FixedPredictor())  # *_error and *_loss are minimized
    assert not error.greater_is_better and error(MODEL, batch) == pytest.approx(3 / 4)
    assert make_objective(recall_score, FixedPredictor()).name == "recall_score"


def test_log_form_refuses_a_metric_that_gives_a_perfect_prediction_nothing(clean_registry):
    register_metric("neg_abs_error", lambda p, r: -sum(abs(a - b) for a, b in zip(p, r)) / len(p), per_example=True)
    with pytest.raises(ValueError, match=r"perfect prediction 0.*--metric-form mean"):
        make_objective("neg_abs_error", ScorePredictor())
    assert make_objective("neg_abs_error", ScorePredictor(), form="mean").form == "mean"


def test_log_form_refuses_negative_and_all_zero_values_on_the_first_batch():
    def shifted(predictions, references):  # perfect predictions score 1, the others -1
        return sum(1.0 if p == r else -1.0 for p, r in zip(predictions, references)) / len(predictions)

    obj = make_objective(shifted, ScorePredictor(), per_example=True)  # builds: a perfect prediction scores 1
    with pytest.raises(MetricError, match=r"gave -1 for an option.*--metric-form mean"):
        obj(MODEL, scored_batch())

    def class_zero_recall(predictions, references):  # builds (0 against 0 scores 1), but scores only class 0
        return sum(p == r == 0 for p, r in zip(predictions, references)) / len(predictions)

    no_class_zero = [{**ex, "label": 1 + ex["label"] % 2} for ex in scored_batch()]
    with pytest.raises(MetricError, match="scored 0 on every option.*constant"):
        make_objective(class_zero_recall, ScorePredictor(), per_example=True)(MODEL, no_class_zero)


def test_a_registered_metric_of_another_kind_is_refused_when_built():
    with pytest.raises(ValueError, match=r"'squad_f1' cannot score this task's predictions \(class indices"):
        make_objective("squad_f1", ScorePredictor())
    with pytest.raises(ValueError, match=r"'accuracy' cannot score this task's predictions \(generated texts"):
        make_objective("accuracy", CandidatePredictor())
    with pytest.raises(ValueError, match="'squad_f1' cannot score"):
        make_objective("squad_f1", ScorePredictor(), smoothing=0)


def test_compute_object_without_key_says_what_key_is():
    with pytest.raises(ValueError, match=r"ComputeMetric has \.compute\(\): pass key= naming the result"):
        make_objective(ComputeMetric(), ScorePredictor())


def test_macro_f1_objective_scores_every_class_of_the_task_even_those_the_batch_lacks():
    from sklearn.metrics import f1_score

    gen = torch.Generator().manual_seed(0)
    batch = [{"prompt": str(i), "label": i % 2, "scores": torch.randn(3, generator=gen)} for i in range(6)]  # no 2s
    objective = make_objective("macro_f1", ScorePredictor(), smoothing=1.0)
    probs = torch.stack([ex["scores"] for ex in batch]).double().softmax(-1)
    labels = [ex["label"] for ex in batch]
    per_class = []
    for c in range(3):  # expected counts for the classes present; P(no row predicted c) for the absent one
        tp = sum(float(p[c]) for p, y in zip(probs, labels) if y == c)
        fp = sum(float(p[c]) for p, y in zip(probs, labels) if y != c)
        fn = sum(1 - float(p[c]) for p, y in zip(probs, labels) if y == c)
        per_class.append(2 * tp / (2 * tp + fp + fn) if c in labels else math.prod(1 - float(p[c]) for p in probs))
    assert -objective(MODEL, batch) == pytest.approx(sum(per_class) / 3, abs=1e-9)
    assert objective.last_values == {"macro_f1": pytest.approx(sum(per_class) / 3, abs=1e-9)}
    # the absent class counts: leaning a row towards it lowers the score
    leaning = [{**ex, "scores": ex["scores"] + torch.tensor([0.0, 0.0, 2.0]) * (i == 0)} for i, ex in enumerate(batch)]
    assert -objective(MODEL, leaning) < -objective(MODEL, batch)
    # at a low temperature it is scikit-learn's macro-F1 over all three labels (an absent, unpredicted class: 1)
    cold = make_objective("macro_f1", ScorePredictor(), smoothing=1e-4)
    predictions = probs.argmax(-1).tolist()
    hard = f1_score(labels, predictions, labels=[0, 1, 2], average="macro", zero_division=1)
    assert -cold(MODEL, batch) == pytest.approx(hard, abs=1e-6)
    assert get_metric("macro_f1")([0, 1, 1], [0, 1, 0]) == get_metric("f1")([0, 1, 1], [0, 1, 0])
