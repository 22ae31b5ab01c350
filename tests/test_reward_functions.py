"""metrics.rewards: the ready reward functions (their doctests run here) and their registry."""

from __future__ import annotations

import doctest
import math

import pytest

import metrics.rewards as rewards
from metrics.rewards import (
    answer_check,
    exact_answer,
    format_match,
    get_reward,
    length_limit,
    list_rewards,
    number_close,
    register_reward,
    token_f1,
)


def test_doctests():
    results = doctest.testmod(rewards)
    assert results.failed == 0 and results.attempted >= 9


def test_every_reward_is_registered_by_its_name_and_has_an_example():
    for name in ("exact_answer", "number_close", "token_f1", "format_match", "length_limit", "answer_check"):
        fn = get_reward(name)
        assert fn.__name__ == name and ">>> " + name in fn.__doc__
    assert set(list_rewards()) >= {"exact_answer", "token_f1"}


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown reward 'nope'; available: answer_check, exact_answer"):
        get_reward("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("token_f1", len)
    with pytest.raises(TypeError, match="must be callable"):
        register_reward("mine", 3)


def test_columns_answer_or_answers_and_missing():
    assert exact_answer([""], ["paris"], answer=["Paris"]) == [1.0]
    assert exact_answer([""], ["paris"], answers=[{"text": ["Rome", "Paris"]}]) == [1.0]  # SQuAD's dict
    assert exact_answer([""], ["7"], answer=[7]) == [1.0]  # a number in a JSON column
    with pytest.raises(ValueError, match="needs an 'answer' or 'answers' column"):
        token_f1([""], ["x"], context=["y"])
    with pytest.raises(ValueError, match="2 gold answers for 1 completions"):
        token_f1([""], ["x"], answer=["a", "b"])


def test_number_close_tolerance_and_formats():
    assert number_close([""] * 4, ["1,000", "-3", "x 2.5 y", "0.0000001"], answer=["1000", "-3.0", "2.4", "0"]) == [
        1.0, 1.0, 0.0, 1.0]  # 1e-7 within the 1e-6 absolute floor
    assert number_close([""], ["2.5"], answer=["2.4"], tolerance=[0.05]) == [1.0]
    assert number_close([""], ["2.5"], answer=["2.4"], tolerance=[None]) == [0.0]  # a blank cell: the default


def test_format_length_and_checker_edges():
    assert format_match([""] * 2, ["  Answer: -4 ", "Answer: 4 and more"]) == [1.0, 0.0]
    assert length_limit([""] * 2, ["a b c", "a b c"], max_words=[3, 2]) == [1.0, 0.0]
    assert answer_check([""] * 4, [" -5. ", "- 5", "5", "-5\n6"], answer=["-5"] * 4) == [1.0, 0.0, 0.1, 0.0]
    assert all(isinstance(v, float) and math.isfinite(v) for v in token_f1([""], [""], answer=["a"]))
