"""Properties of the built-in tasks' templates on arbitrary rows (hypothesis): every field reaches the prompt, and
the prompt ends so that the label words (or candidates) follow it as a reader would write them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasks import get_task

TEXT = st.text(min_size=1, max_size=40).filter(lambda t: t.strip())
FIELDS = {"sst2": ["sentence"], "rte": ["premise", "hypothesis"], "boolq": ["passage", "question"],
          "cb": ["premise", "hypothesis"], "squad": ["title", "context", "question"],
          "wic": ["word", "sentence1", "sentence2"], "multirc": ["paragraph", "question", "answer"],
          "drop": ["passage", "question"], "trec": ["text"]}


@pytest.mark.parametrize("name", sorted(FIELDS))
@given(data=st.data())
def test_prompt_holds_every_field_and_ends_where_the_label_words_begin(name, data):
    task = get_task(name)
    row = {field: data.draw(TEXT, label=field) for field in FIELDS[name]}
    prompt = task.template(row)
    for field in FIELDS[name]:
        assert row[field].strip() in prompt
    if task.label_words is None:  # generation: the answer follows "Answer:" with a space the model writes
        assert prompt.endswith("Answer:")
    elif all(w.startswith(" ") for w in task.label_words):
        assert not prompt[-1].isspace()  # " great" after "It was": one space between
    else:
        assert prompt.endswith("\n")  # "Yes" at the start of a line


@given(premise=TEXT, question=st.sampled_from(["cause", "effect"]), choices=st.tuples(TEXT, TEXT))
def test_copa_prompt_and_candidates_join_into_one_sentence(premise, question, choices):
    task = get_task("copa")
    row = {"premise": premise, "question": question, "choice1": choices[0], "choice2": choices[1]}
    prompt = task.template(row)
    stem = premise.strip()
    assert prompt.startswith(stem[:-1] if stem.endswith((".", "!", "?")) else stem)
    assert prompt.endswith(" because" if question == "cause" else " so")
    for candidate, choice in zip(task.candidates(row), choices):
        assert candidate.startswith(" ") and candidate[1:].lower() == choice.strip().lower()
