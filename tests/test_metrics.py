"""Tests for the metrics package: classification metrics, SQuAD v1.1 EM/F1 and the registry."""

from __future__ import annotations

import collections
import re
import string

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import f1_score

import metrics
from metrics import (
    Metric,
    MetricError,
    accuracy,
    exact_match,
    f1,
    get_metric,
    list_metrics,
    register_metric,
    squad_em,
    squad_f1,
)
from metrics.squad import normalize_answer


# --- the official SQuAD v1.1 evaluation script (evaluate-v1.1.py), verbatim logic, as the reference ---------
def official_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def official_f1_score(prediction, ground_truth):
    prediction_tokens = official_normalize_answer(prediction).split()
    ground_truth_tokens = official_normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def official_exact_match_score(prediction, ground_truth):
    return official_normalize_answer(prediction) == official_normalize_answer(ground_truth)


def official_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


@pytest.fixture
def clean_registry(monkeypatch):
    """Metrics registered by a test disappear after it."""
    monkeypatch.setattr(metrics, "_REGISTRY", dict(metrics._REGISTRY))


# --- classification ------------------------------------------------------------------------------------------
def test_accuracy_hand_computed():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy([0, 0, 0], [0, 0, 0]) == 1.0
    assert accuracy(["a", "b"], ["b", "a"]) == 0.0
    assert accuracy([2], [2]) == 1.0


def test_f1_is_macro_and_matches_sklearn():
    preds = [0, 0, 1, 1, 2, 2, 0, 1]
    refs = [0, 1, 1, 1, 2, 0, 0, 2]
    # per class: 0: tp=2 fp=1 fn=1 -> 2/3; 1: tp=2 fp=1 fn=1 -> 2/3; 2: tp=1 fp=1 fn=1 -> 1/2
    assert f1(preds, refs) == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)
    assert f1(preds, refs) == pytest.approx(f1_score(refs, preds, average="macro"))
    # macro, not micro: a rare class counts as much as a frequent one
    preds, refs = [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]
    assert f1(preds, refs) == pytest.approx(f1_score(refs, preds, average="macro", zero_division=0))
    assert f1(preds, refs) != pytest.approx(accuracy(preds, refs))
    assert f1([1, 1], [1, 1]) == 1.0


def test_exact_match_strips_whitespace_only():
    assert exact_match([" Paris\n", "paris", "Rome"], ["Paris", "Paris", "Rome "]) == pytest.approx(2 / 3)
    assert exact_match(["the cat"], ["cat"]) == 0.0  # no SQuAD normalization here


@pytest.mark.parametrize("fn", [accuracy, f1, exact_match, squad_em, squad_f1])
def test_length_mismatch_and_empty_raise(fn):
    with pytest.raises(ValueError, match="lengths must match"):
        fn(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one example"):
        fn([], [])


@pytest.mark.parametrize("fn", [accuracy, f1])
def test_labels_must_not_mix_strings_and_numbers(fn):
    with pytest.raises(TypeError, match="mix strings and numbers"):
        fn([1, "1"], [1, 1])
    with pytest.raises(TypeError, match="mix strings and numbers"):
        fn(["1", "0"], [1, 0])
    assert fn(["1", "0"], ["1", "0"]) == 1.0


def test_accuracy_refuses_what_is_not_one_label_per_example():
    with pytest.raises(TypeError, match=r"prediction 0 is .*ndarray of shape \(2,\)"):
        accuracy(np.array([[1, 0], [0, 1]]), np.array([[1, 0], [0, 1]]))
    with pytest.raises(TypeError, match="prediction 1 is None"):
        accuracy([1, None], [1, 0])
    with pytest.raises(TypeError, match=r"reference 0 is \[1\] \(list\)"):
        accuracy([1], [[1]])
    # numpy arrays of labels, numpy scalars and 0-d tensors are labels
    assert accuracy(np.array([1, 0, 2]), np.array([1, 1, 2])) == pytest.approx(2 / 3)
    assert isinstance(accuracy(np.array([1, 0]), np.array([1, 1])), float)
    assert accuracy(torch.tensor([3, 4]), [3, 3]) == 0.5


def test_squad_refuses_a_prediction_that_is_not_a_string():
    with pytest.raises(TypeError, match="prediction 1 is None .*compare strings"):
        squad_f1(["Paris", None], [["Paris"], ["Rome"]])
    with pytest.raises(TypeError, match="prediction 0 is 3"):
        squad_em([3], [["3"]])
    with pytest.raises(TypeError, match="gold answers must be strings"):
        squad_f1(["Paris"], [[None]])
    with pytest.raises(TypeError, match="prediction 0 is None"):
        exact_match([None], ["None"])  # not "None" == "None"


def test_squad_accepts_the_answers_dict_of_the_squad_dataset():
    ref = {"text": ["Denver Broncos", "the Broncos"], "answer_start": [177, 250]}
    assert squad_f1(["Broncos"], [ref]) == pytest.approx(1.0)
    assert squad_f1(["Denver"], [ref]) == pytest.approx(squad_f1(["Denver"], [ref["text"]]))
    assert squad_f1(["Denver"], [ref]) == pytest.approx(2 / 3)
    assert squad_em(["denver broncos!"], [ref]) == 1.0
    with pytest.raises(ValueError, match=r"'text' list of gold answers; got keys \['answer_start'\]"):
        squad_f1(["Denver"], [{"answer_start": [0]}])


# --- SQuAD ---------------------------------------------------------------------------------------------------
NORMALIZE_CASES = [
    "The Eiffel Tower!",
    "  an  apple, a day... ",
    "THE END",
    "theatre the",  # "the" only as a whole word
    "a.b.c",  # punctuation removed before the article rule: "abc"
    "Rock 'n' Roll",
    "$1,000.50",
    "An",
    "",
    "   ",
    "tab\tand\nnewline",
    "Anna and the band",
    "don't-stop",
]


@pytest.mark.parametrize("text", NORMALIZE_CASES)
def test_normalize_matches_official(text):
    assert normalize_answer(text) == official_normalize_answer(text)


def test_normalize_hand_computed():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("a.b.c") == "abc"
    assert normalize_answer("theatre") == "theatre"
    assert normalize_answer("A an THE") == ""


def test_squad_em_hand_computed():
    assert squad_em(["The Eiffel Tower."], [["eiffel tower"]]) == 1.0
    assert squad_em(["Eiffel"], [["Eiffel Tower"]]) == 0.0
    # several gold answers: max over them
    assert squad_em(["1990", "blue"], [["in 1990", "1990"], ["red", "Blue!"]]) == 1.0
    assert squad_em(["x", "blue"], [["y"], ["blue"]]) == 0.5
    # a reference may be a single string
    assert squad_em(["Paris"], ["paris"]) == 1.0
    # empty strings: two empty answers match exactly
    assert squad_em([""], [[""]]) == 1.0
    assert squad_em([""], [["a"]]) == 1.0  # "a" normalizes to "" (article)
    assert squad_em([""], [["b"]]) == 0.0


def test_squad_f1_hand_computed():
    # pred tokens: [eiffel, tower, paris], gold: [eiffel, tower] -> p=2/3, r=1 -> 0.8
    assert squad_f1(["the Eiffel Tower, Paris"], [["Eiffel Tower"]]) == pytest.approx(0.8)
    # repeated tokens count with multiplicity: pred [a1 a1 b] vs gold [a1 b b] -> common 2, p=r=2/3
    assert squad_f1(["x x y"], [["x y y"]]) == pytest.approx(2 / 3)
    # max over gold answers, mean over questions
    assert squad_f1(["red car", "nothing"], [["blue car", "red car"], ["something"]]) == pytest.approx(0.5)
    assert squad_f1(["blue"], [["blue car", "car"]]) == pytest.approx(2 / 3)
    # v1.1: an empty prediction or gold scores 0 F1 (no common token), even when both are empty
    assert squad_f1([""], [["Paris"]]) == 0.0
    assert squad_f1(["Paris"], [[""]]) == 0.0
    assert squad_f1([""], [[""]]) == 0.0


SQUAD_CASES = [
    ("The Eiffel Tower", ["Eiffel Tower", "the tower"]),
    ("in the year 1990", ["1990"]),
    ("  ", ["an"]),
    ("New York City", ["new-york city", "NYC"]),
    ("Denver Broncos!", ["Denver Broncos", "The Denver Broncos", "Broncos"]),
    ("a b c d e", ["c d e f g"]),
    ("", [""]),
]


def test_squad_matches_official_script():
    preds = [p for p, _ in SQUAD_CASES]
    refs = [g for _, g in SQUAD_CASES]
    em = sum(official_max_over_ground_truths(official_exact_match_score, p, g) for p, g in SQUAD_CASES)
    f1_total = sum(official_max_over_ground_truths(official_f1_score, p, g) for p, g in SQUAD_CASES)
    assert squad_em(preds, refs) == pytest.approx(em / len(SQUAD_CASES))
    assert squad_f1(preds, refs) == pytest.approx(f1_total / len(SQUAD_CASES))
    for p, g in SQUAD_CASES:
        assert squad_f1([p], [g]) == pytest.approx(official_max_over_ground_truths(official_f1_score, p, g))


def test_squad_empty_gold_list_raises():
    with pytest.raises(ValueError, match="gold"):
        squad_em(["x"], [[]])


# --- registry ------------------------------------------------------------------------------------------------
# --- properties (hypothesis) -----------------------------------------------------------------------------------
WORDS = ["the", "The", "an", "A", "a", "Paris", "paris.", "x", "b,c", "don't", "New-York", "1,000", "Ærø", "\t", "\n",
         "!", ""]
TEXT = st.one_of(st.text(max_size=20), st.lists(st.sampled_from(WORDS), max_size=8).map(" ".join))


@given(TEXT)
def test_normalize_matches_official_idempotent_and_canonical(text):
    norm = normalize_answer(text)
    assert norm == official_normalize_answer(text)
    assert normalize_answer(norm) == norm  # idempotent
    assert norm == norm.strip() and "  " not in norm and norm == norm.lower()
    assert not set(norm) & set(string.punctuation)
    assert not {"a", "an", "the"} & set(norm.split())


@given(TEXT, st.lists(TEXT, min_size=1, max_size=3))
def test_squad_scores_match_official_and_are_bounded(prediction, golds):
    em, f1_value = squad_em([prediction], [golds]), squad_f1([prediction], [golds])
    assert em == float(official_max_over_ground_truths(official_exact_match_score, prediction, golds))
    assert f1_value == pytest.approx(official_max_over_ground_truths(official_f1_score, prediction, golds))
    assert 0.0 <= f1_value <= 1.0 and em in (0.0, 1.0)
    if em == 1.0 and normalize_answer(prediction):
        assert f1_value == pytest.approx(1.0)  # an exact match has full token overlap
    # F1 is symmetric in prediction and gold, and ignores a leading article and trailing punctuation
    assert squad_f1([golds[0]], [[prediction]]) == pytest.approx(squad_f1([prediction], [[golds[0]]]))
    assert squad_f1([f"The {prediction}!"], [golds]) == pytest.approx(f1_value)
    # the max over gold answers: adding the prediction itself as a gold gives EM 1
    assert squad_em([prediction], [[*golds, prediction]]) == 1.0


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=20))
def test_accuracy_is_the_mean_of_matches_and_agrees_on_strings(pairs):
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    value = accuracy(preds, refs)
    assert value == sum(p == r for p, r in pairs) / len(pairs)
    assert accuracy([str(p) for p in preds], [str(r) for r in refs]) == value
    assert accuracy(np.array(preds), np.array(refs)) == value


# --- registry ------------------------------------------------------------------------------------------------
def test_metric_call_names_the_metric_when_it_fails():
    with pytest.raises(MetricError, match="metric 'accuracy' raised TypeError: labels mix strings and numbers"):
        get_metric("accuracy")([1, "1"], [1, 1])
    with pytest.raises(MetricError, match=r"metric 'listy' returned \[1.0\] \(list\)"):
        Metric("listy", lambda p, r: [1.0])([1], [1])
    with pytest.raises(MetricError, match="metric 'infinite' returned inf"):
        Metric("infinite", lambda p, r: float("inf"))([1], [1])


def test_builtins_registered():
    assert {"accuracy", "f1", "exact_match", "squad_em", "squad_f1"} <= set(list_metrics())
    m = get_metric("accuracy")
    assert m.greater_is_better and m.name == "accuracy" and m.per_example and m.fn is accuracy
    assert m([1, 0], [1, 1]) == 0.5
    assert get_metric("squad_f1").per_example and not get_metric("f1").per_example  # macro-F1 is not a mean


def test_get_metric_unknown_lists_available():
    with pytest.raises(ValueError, match="no_such_metric") as err:
        get_metric("no_such_metric")
    for name in ("accuracy", "f1", "squad_f1"):
        assert name in str(err.value)


def test_register_metric_as_decorator(clean_registry):
    @register_metric("first_is_one")
    def first_is_one(predictions, references):
        return float(predictions[0] == 1)

    assert first_is_one([1], [0]) == 1.0  # the decorator returns the function itself
    m = get_metric("first_is_one")
    assert m.greater_is_better is True and m.fn is first_is_one
    assert "first_is_one" in list_metrics()


def test_register_metric_as_call_lower_is_better(clean_registry):
    def mean_abs_error(predictions, references):
        return sum(abs(p - r) for p, r in zip(predictions, references)) / len(predictions)

    assert register_metric("mae", mean_abs_error, greater_is_better=False) is mean_abs_error
    m = get_metric("mae")
    assert m.greater_is_better is False
    assert m([1, 2], [2, 4]) == 1.5
    assert m([1], [1]) == 0.0 and type(m([1], [1])) is float  # an int result comes back as a float


def test_register_metric_rejects_non_callable(clean_registry):
    with pytest.raises(TypeError, match="metric 'bad' must be callable, got int"):
        register_metric("bad", 3)
    assert "bad" not in list_metrics()



def test_register_metric_refuses_to_replace_a_registered_name(clean_registry):
    def always_one(predictions, references):
        return 1.0

    with pytest.raises(ValueError, match="metric 'accuracy' is already registered.*overwrite=True"):
        register_metric("accuracy", always_one)
    assert get_metric("accuracy").fn is accuracy  # the built-in is kept
    register_metric("accuracy", accuracy, per_example=True)  # registering the same metric again is harmless
    register_metric("accuracy", always_one, overwrite=True)
    assert get_metric("accuracy").fn is always_one
