"""Tests for the tasks package: shipped data, MeZO-style splits, registry and custom tasks (no model needed)."""

from __future__ import annotations

import json
import re
import runpy
from collections import Counter
from pathlib import Path

import pytest

import tasks
from tasks import Task, get_task, list_tasks, register_task, task_from_file

BUILTINS = ["boolq", "cb", "copa", "rte", "squad", "sst2"]
POOL_SIZES = {"sst2": 6000, "rte": 2490, "boolq": 32, "copa": 32, "cb": 32, "squad": 2000}
DEV_SIZES = {"sst2": 872, "rte": 277, "boolq": 1000, "copa": 100, "cb": 32, "squad": 1000}


def _check_example(task: Task, ex: dict) -> None:
    assert isinstance(ex["prompt"], str) and ex["prompt"]
    assert not ex["prompt"].endswith(" ")
    assert isinstance(ex["raw"], dict)
    if task.kind == "generation":
        assert ex["answers"] and all(isinstance(a, str) and a.strip() for a in ex["answers"])
        assert ex["targets"] == [" " + a for a in ex["answers"]] and ex["target"] == ex["targets"][0]
    else:
        cands = ex["candidates"]
        assert len(cands) >= 2 and all(c.strip() for c in cands)
        assert 0 <= ex["label"] < len(cands)
        assert ex["target"] == cands[ex["label"]]
        if task.kind == "classification":
            assert cands == task.label_words


def test_registry_lists_builtins():
    assert set(BUILTINS) <= set(list_tasks())


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_splits(name):
    task = get_task(name)
    assert len(task.load_split("train")) == POOL_SIZES[name]
    dev = task.examples("dev")
    assert len(dev) == DEV_SIZES[name]
    assert [e["index"] for e in dev] == list(range(len(dev)))
    train = task.examples("train")
    assert len(train) == min(1000, POOL_SIZES[name])
    if POOL_SIZES[name] > 1000:
        val = task.examples("validation", n=200)
    else:
        train = task.examples("train", n=24)
        val = task.examples("validation", exclude=train)
        assert len(val) == POOL_SIZES[name] - 24
    assert {e["index"] for e in train}.isdisjoint(e["index"] for e in val)
    for ex in train[:50] + val[:50] + dev[:50]:
        _check_example(task, ex)
    if task.kind != "generation":  # every label occurs in the dev set
        assert {e["label"] for e in dev} == set(range(len(dev[0]["candidates"])))


def test_sampling_is_deterministic_and_seeded():
    task = get_task("sst2")
    a = task.examples("train", n=100, seed=3)
    b = task.examples("train", n=100, seed=3)
    c = task.examples("train", n=100, seed=4)
    assert [e["index"] for e in a] == [e["index"] for e in b]
    assert [e["prompt"] for e in a] == [e["prompt"] for e in b]
    assert [e["index"] for e in a] != [e["index"] for e in c]
    v1 = task.examples("validation", n=100, seed=3)
    assert [e["index"] for e in v1] == [e["index"] for e in task.examples("validation", n=100, seed=3)]
    default_train = {e["index"] for e in task.examples("train", seed=3)}
    assert default_train.isdisjoint(e["index"] for e in task.examples("validation", seed=3))
    assert [e["index"] for e in task.examples("dev", n=5)] == [0, 1, 2, 3, 4]


def test_small_pool_validation_needs_exclude():
    with pytest.raises(ValueError, match="exclude"):
        get_task("copa").examples("validation")


def test_prompts_follow_mezo_templates():
    sst2 = get_task("sst2").examples("dev", n=1)[0]
    assert sst2["prompt"].endswith(" It was") and sst2["candidates"] == [" terrible", " great"]
    rte = get_task("rte").examples("dev", n=1)[0]
    assert rte["prompt"].endswith('" is true? Yes or No?\n') and rte["candidates"] == ["Yes", "No"]
    assert rte["raw"]["label"] == 1  # first GLUE RTE dev row is not_entailment
    cb = get_task("cb").examples("dev", n=1)[0]
    assert cb["prompt"].startswith("Suppose ") and cb["prompt"].endswith("Yes, No, or Maybe?\n")
    boolq_train = get_task("boolq").examples("train", n=1)[0]
    boolq_dev = get_task("boolq").examples("dev", n=1)[0]
    for ex in (boolq_train, boolq_dev):
        assert set(ex["raw"]) >= {"passage", "question", "label"}
        assert ex["prompt"].endswith("?") and not ex["prompt"].endswith("??")
        assert not ex["raw"]["passage"].startswith("Passage:")
    copa_dev = get_task("copa").examples("dev", n=1)[0]  # "The man turned on the faucet, therefore"
    assert copa_dev["prompt"] == "The man turned on the faucet so"
    assert copa_dev["candidates"] == [" the toilet filled with water.", " water flowed from the spout."]
    copa_train = get_task("copa").examples("train", n=32)
    assert all(e["prompt"].endswith((" because", " so")) for e in copa_train)
    assert all(c[1].islower() or not c[1].isalpha() for e in copa_train for c in e["candidates"])
    squad = get_task("squad").examples("dev", n=1)[0]
    assert squad["prompt"].startswith("Title: Super_Bowl_50\nContext: ") and squad["prompt"].endswith("\nAnswer:")
    assert squad["answers"] == ["Cam Newton"] * 3 and get_task("squad").metric == "squad_f1"


def test_squad_dev_is_spread_over_articles_in_two_slices_on_disjoint_articles():
    dev = get_task("squad").examples("dev")
    titles = {name: Counter(e["raw"]["title"] for e in dev[slice(*span)])
              for name, span in tasks.SQUAD_DEV_SLICES.items()}
    assert [sum(t.values()) for t in titles.values()] == [500, 500]
    assert not set(titles["choose"]) & set(titles["confirm"])
    for per_article in titles.values():  # 12 articles each, none weighing more than its share
        assert len(per_article) == 12 and set(per_article.values()) == {41, 42}
    assert len({e["raw"]["id"] for e in dev}) == 1000


SOURCE = Path("/work/shared/data")


@pytest.mark.skipif(not (SOURCE / "squad" / "squad_v1.1_dev_part1.json").exists(), reason="source data not here")
def test_make_subsets_rebuilds_the_shipped_squad_dev_file(tmp_path, monkeypatch):
    make = runpy.run_path(str(Path(tasks.DATA_DIR) / "make_subsets.py"), run_name="make_subsets")
    make["squad_slices"].__globals__.update(SRC=SOURCE, DST=tmp_path)
    make["squad_slices"]("squad/squad_v1.1_dev_part1.json", "squad/dev.json")
    assert (tmp_path / "squad" / "dev.json").read_bytes() == (Path(tasks.DATA_DIR) / "squad" / "dev.json").read_bytes()


def test_errors():
    with pytest.raises(ValueError, match="sst2"):
        get_task("nope")
    with pytest.raises(ValueError, match="'local'.*'hub'"):
        get_task("sst2").examples("dev", source="web")
    with pytest.raises(ValueError, match="split"):
        get_task("sst2").examples("test")


@pytest.fixture
def csv_file(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = [f"review number {i},{'pos' if i % 2 else 'neg'}" for i in range(20)]
    path.write_text("text,sentiment\n" + "\n".join(rows) + "\n")
    return path


def test_custom_csv_with_string_labels(csv_file):
    task = task_from_file(
        csv_file, name="reviews", template="{text} It was", label_words=[" bad", " good"],
        labels=["neg", "pos"], label_column="sentiment",
    )
    assert task.kind == "classification" and task.metric == "accuracy"
    train = task.examples("train", n=12, seed=1)
    val = task.examples("validation", n=5, seed=1, exclude=train)
    assert len(train) == 12 and len(val) == 5
    assert {e["index"] for e in train}.isdisjoint(e["index"] for e in val)
    ex = train[0]
    assert ex["prompt"] == f"{ex['raw']['text']} It was"
    assert ex["target"] == (" good" if ex["raw"]["sentiment"] == "pos" else " bad")
    with pytest.warns(UserWarning, match="dev_path"):
        assert len(task.examples("dev")) == 20
    register_task(task, overwrite=True)
    assert get_task("reviews") is task and "reviews" in list_tasks()


def test_custom_jsonl_classification_and_generation(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"q": f"What is {i}+{i}?", "a": [str(2 * i), f"two times {i}"], "y": i % 3} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gen = task_from_file(path, name="qa", template="Q: {q}\nA:", answer_column="a")
    assert gen.kind == "generation" and gen.metric == "squad_f1"
    ex = gen.examples("train", n=3)[0]
    assert ex["answers"] == ex["raw"]["a"] and ex["target"] == " " + ex["raw"]["a"][0]
    cls = task_from_file(path, name="qa3", template="{q}", label_words=[" a", " b", " c"], label_column="y",
                         dev_path=path)
    assert [e["label"] for e in cls.examples("dev")] == [i % 3 for i in range(10)]


def test_custom_errors(csv_file, tmp_path):
    with pytest.raises(ValueError, match=r"missing column 'label'.*\['text', 'sentiment'\]"):
        task_from_file(csv_file, name="x", template="{text}", label_words=[" a", " b"])
    with pytest.raises(ValueError, match=r"missing column 'body'.*template.*\['text', 'sentiment'\]"):
        task_from_file(csv_file, name="x", template="{body} It was", label_words=[" a", " b"],
                       label_column="sentiment", labels=["neg", "pos"])
    bad = tmp_path / "data.parquet"
    bad.write_text("x")
    with pytest.raises(ValueError, match=r"\.csv.*\.tsv.*\.jsonl"):
        task_from_file(bad, name="x", template="{text}", label_words=[" a", " b"])
    with pytest.raises(ValueError, match=r"labels=\[\.\.\.\] \(on the command line: --labels"):  # when built
        task_from_file(csv_file, name="x", template="{text}", label_words=[" a", " b"], label_column="sentiment")


def test_data_files_and_provenance_ship():
    for rel in ["PROVENANCE.md", "sst2/LICENSE.alps-repo.txt", "squad/LICENSE.expmrc-CC-BY-SA-4.0.txt"]:
        assert (tasks.DATA_DIR / rel).is_file()
    total = sum(p.stat().st_size for p in tasks.DATA_DIR.rglob("*") if p.is_file())
    assert total < 6 * 1024 * 1024


@pytest.mark.parametrize("name, content, problem", [
    ("empty.csv", b"", "is empty: it needs a header line and data rows"),
    ("blank.jsonl", b"\n\n", "is empty"),
    ("header.csv", b"text,label\n", r"has no data rows \(only a header line\)"),
    ("header.tsv", b"text\tlabel\n", r"has no data rows \(only a header line\)"),
    ("latin1.csv", "text,label\ngood,1\ncaf\u00e9 tr\u00e8s bon,1\n".encode("latin-1"),
     r"is not UTF-8 text \(byte 0xe9 on line 3\): save it as UTF-8"),
    ("broken.jsonl", b'{"text": "a", "label": 1}\n{"text": \n', "cannot be read as JSONL"),
])
def test_bad_data_files_fail_with_one_line(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + " " + problem) as err:
        task_from_file(path, name="x", template="{text} It was", label_words=[" a", " b"])
    assert "\n" not in str(err.value)


def test_label_column_names_another_column(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label,gold\nfine,0,1\nbad,0,0\n")
    task = task_from_file(path, name="x", template="{text} It was", label_words=[" a", " b"], label_column="gold",
                          dev_path=path)
    assert [e["label"] for e in task.examples("dev")] == [1, 0]


