"""The hub-only tasks (wsc, wic, multirc, record, drop, trec): their prompts and labels on rows in each data set's
hub schema (``datasets.load_dataset`` faked: no network here), the one-line error for local data, and
``--data-source`` from the command line to the loader."""

from __future__ import annotations

import json
import sys

import datasets
import pytest

from tasks import HUB_ONLY_TASKS, get_task
from zo_objectives.cli import eval_main, tune_main
from zo_objectives.config import EvalConfig, TuneConfig, UsageError, differences

# A few rows per (path, config) in the hub's schema (field names and nesting as there), by hub split
WSC = {"text": "Mark told Pete many lies about himself, which Pete included in his book. He should have been more "
               "truthful.", "span1_index": 0, "span2_index": 13, "span1_text": "Mark", "span2_text": "He", "idx": 0}
WIC = {"word": "place", "sentence1": "Do you want to come over to my place later?",
       "sentence2": "A political system with no place for the less prominent groups.", "start1": 31, "start2": 27,
       "end1": 36, "end2": 32, "idx": 0}
MULTIRC = {"paragraph": "While this process moved along, diplomacy continued its rounds.",
           "question": "What continued its rounds?", "answer": "Diplomacy",
           "idx": {"paragraph": 0, "question": 0, "answer": 0}}
RECORD = {"passage": "The harrowing stories of women and children locked up for so-called 'moral crimes' in "
                     "Afghanistan.\n@highlight\nThe Afghan government has promised to release them",
          "query": "Human Rights Watch has urged @placeholder to do more.",
          "entities": ["Afghan", "Afghanistan", "Human Rights Watch", "Kabul"],
          "entity_spans": {"text": ["Afghan", "Afghanistan", "Human Rights Watch", "Kabul"],
                           "start": [0, 10, 20, 40], "end": [5, 20, 38, 45]},
          "answers": ["Afghanistan", "Afghan"], "idx": {"passage": 0, "query": 0}}
DROP = {"section_id": "nfl_1184", "query_id": "f37e81fa", "passage": "The Chargers led 14-3 at halftime.",
        "question": "How many points did the Chargers lead by at halftime? ",
        "answers_spans": {"spans": ["11", "eleven"], "types": ["number", "number"]}}
TREC = {"text": "What does NASA stand for ?", "fine_label": 1}

HUB = {
    ("super_glue", "wsc.fixed"): {"train": [WSC | {"label": 0}, WSC | {"label": 1}],
                                  "validation": [WSC | {"label": 1}]},
    ("super_glue", "wic"): {"train": [WIC | {"label": 0}, WIC | {"label": 1}], "validation": [WIC | {"label": 0}]},
    ("super_glue", "multirc"): {"train": [MULTIRC | {"label": 1}, MULTIRC | {"label": 0}],
                                "validation": [MULTIRC | {"label": 1}]},
    ("super_glue", "record"): {"train": [RECORD, RECORD], "validation": [RECORD]},
    ("ucinlp/drop", None): {"train": [DROP, DROP], "validation": [
        DROP, DROP | {"answers_spans": {"spans": [], "types": []}}]},  # a row with no gold answer is left out
    ("CogComp/trec", None): {"train": [TREC | {"coarse_label": 0}, TREC | {"coarse_label": 5}],
                             "test": [TREC | {"coarse_label": 5}, TREC | {"coarse_label": 3}]},  # no validation
}


@pytest.fixture
def hub(monkeypatch):
    """``datasets.load_dataset`` answering from HUB (as a real Dataset); returns the calls it got."""
    calls = []

    def load_dataset(path, name=None, *, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(HUB[path, name][split])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for name in HUB_ONLY_TASKS:  # rows are cached per process: start from the fake hub
        get_task(name).load_split.cache_clear()
    yield calls
    for name in HUB_ONLY_TASKS:
        get_task(name).load_split.cache_clear()


def test_wsc_wic_multirc_prompts_are_the_seeds(hub):
    wsc = get_task("wsc").examples("train", source="hub", seed=0)
    assert {ex["label"] for ex in wsc} == {0, 1} and wsc[0]["candidates"] == ["No", "Yes"]
    assert wsc[0]["prompt"] == (f"{WSC['text']}\nIn the previous sentence, does the pronoun \"he\" refer to Mark? "
                                "Yes or No?\n")
    wic = get_task("wic").examples("dev", source="hub")
    assert wic[0]["prompt"] == ("Does the word \"place\" have the same meaning in these two sentences? Yes, No?\n"
                                f"{WIC['sentence1']}\n{WIC['sentence2']}\n")
    assert wic[0]["label"] == 0 and wic[0]["target"] == "No"
    multirc = get_task("multirc").examples("dev", source="hub")
    assert multirc[0]["prompt"] == (f"{MULTIRC['paragraph']}\nQuestion: What continued its rounds?\nI found this "
                                    "answer \"Diplomacy\". Is that correct? Yes or No?\n")
    assert multirc[0]["target"] == "Yes"
    assert ("super_glue", "wsc.fixed", "train") in hub and ("super_glue", "wic", "validation") in hub


def test_record_scores_each_entity_filled_into_the_query(hub):
    ex = get_task("record").examples("dev", source="hub")[0]
    assert ex["prompt"] == RECORD["passage"].replace("@highlight\n", "- ") + "\n-"
    assert "@highlight" not in ex["prompt"] and ex["prompt"].endswith("\n- The Afghan government has promised "
                                                                      "to release them\n-")
    # the first gold answer is the label; its alias "Afghan" (also gold) is no candidate
    assert ex["candidates"] == [" Human Rights Watch has urged Afghanistan to do more.",
                                " Human Rights Watch has urged Human Rights Watch to do more.",
                                " Human Rights Watch has urged Kabul to do more."]
    assert ex["label"] == 0 and ex["target"] == ex["candidates"][0]


def test_record_drops_a_row_whose_gold_answer_is_no_entity(hub):
    HUB["super_glue", "record"]["validation"] = [RECORD | {"answers": ["Kandahar"]}, RECORD]
    try:
        get_task("record").load_split.cache_clear()
        assert len(get_task("record").examples("dev", source="hub")) == 1  # one odd row leaves the task usable
    finally:
        HUB["super_glue", "record"]["validation"] = [RECORD]
        get_task("record").load_split.cache_clear()
    with pytest.raises(ValueError, match="gold answer 'Kandahar' is not among"):  # formatting one is refused
        get_task("record").format(RECORD | {"answers": ["Kandahar"]})


def test_drop_is_generation_against_every_gold_span(hub):
    task = get_task("drop")
    dev = task.examples("dev", source="hub")
    assert len(dev) == 1  # the row without gold spans is left out
    ex = dev[0]
    assert ex["prompt"] == ("Passage: The Chargers led 14-3 at halftime.\nQuestion: How many points did the "
                            "Chargers lead by at halftime?\nAnswer:")
    assert ex["answers"] == ["11", "eleven"] and ex["target"] == " 11"
    assert task.kind == "generation" and task.metric == "squad_f1"
    from metrics import get_metric

    assert get_metric(task.metric)(["eleven points"], [ex["answers"]]) == pytest.approx(2 / 3)
    assert ("ucinlp/drop", None, "validation") in hub


def test_trec_has_six_label_words_in_the_hubs_label_order_and_its_test_set_as_dev(hub):
    task = get_task("trec")
    assert task.label_words == [" Expression", " Entity", " Description", " Human", " Location", " Number"]
    train = sorted(task.examples("train", source="hub"), key=lambda ex: ex["index"])
    assert [ex["target"] for ex in train] == [" Expression", " Number"]  # ABBR (0): "What does NASA stand for"
    dev = task.examples("dev", source="hub")
    assert [ex["target"] for ex in dev] == [" Number", " Human"]
    assert dev[0]["prompt"] == "What does NASA stand for ?\nAnswer type:"
    assert ("CogComp/trec", None, "test") in hub and ("CogComp/trec", None, "validation") not in hub


@pytest.mark.parametrize("name", HUB_ONLY_TASKS)
def test_local_data_of_a_hub_only_task_is_one_clear_line(name, hub):
    with pytest.raises(ValueError) as err:
        get_task(name).examples("dev")
    message = str(err.value)
    assert f"task {name!r} has no local data" in message and "no copy ships" in message
    assert "source='hub'" in message and "--data-source hub" in message and "\n" not in message
    assert not hub  # nothing was asked of the hub


def test_zo_eval_data_source_reaches_the_loader(hub, capsys):
    base = ["--model", "tiny-random", "--task", "trec", "--eval-size", "2", "--batch-size", "2"]
    assert eval_main([*base, "--data-source", "hub"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["task"] == "trec" and result["examples"] == 2 and result["metric"] == "accuracy"
    assert hub == [("CogComp/trec", None, "test")]
    assert eval_main(base) == 2  # the default, local: the one line saying how to load it
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "zo-eval: error: task 'trec' has no local data" in err


def test_zo_tune_data_source_reaches_the_loader_and_the_run_keeps_it(hub, tmp_path, capsys):
    run = tmp_path / "run"
    assert tune_main(["--model", "tiny-random", "--task", "wic", "--data-source", "hub", "--steps", "1",
                      "--train-size", "2", "--batch-size", "2", "--eval-size", "1", "--no-progress",
                      "--output-dir", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["data_source"] == "hub"
    assert {split for _, _, split in hub} == {"train", "validation"}
    capsys.readouterr()
    assert eval_main(["--run", str(run), "--batch-size", "2"]) == 0  # zo-eval --run takes the run's source
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["task"] == "wic"


def test_a_bad_data_source_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["zo-tune"])
    assert tune_main(["--model", "tiny-random", "--data-source", "web"]) == 2  # one line, no usage block
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data-source" in err[0] and "'web'" in err[0], err
    with pytest.raises(UsageError, match="unknown --data-source 'web'; accepted: local, hub"):
        EvalConfig(data_source="web")
    with pytest.raises(UsageError, match="--data-source hub loads a built-in task; --data is a local file"):
        TuneConfig(data="rows.csv", template="{text}", data_source="hub")


def test_a_run_written_before_data_source_existed_resumes_as_local():
    saved = {"task": "sst2", "model": "tiny-random"}  # a config.json with no data_source
    config = TuneConfig(model="tiny-random")
    assert "data_source" not in differences(saved, config)[1]
    assert differences(saved, TuneConfig(model="tiny-random", data_source="hub"))[1]["data_source"] == ["local", "hub"]
