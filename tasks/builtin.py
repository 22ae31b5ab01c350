"""Built-in tasks (sst2, rte, boolq, copa, cb, squad) with MeZO's OPT prompts, and arith (a reward task); and
the seed's other tasks (wsc, wic, multirc, record, drop, trec), which load from the hub only.

Local data ships in ``tasks/data`` (see ``tasks/data/PROVENANCE.md``); ``source="hub"`` loads the same
tasks with ``datasets.load_dataset`` for users with a network. Both map to the same raw fields.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path

from tasks.base import Task, check_source, register_task

DATA_DIR = Path(__file__).resolve().parent / "data"

# The shipped SQuAD dev file: 1,000 questions over 24 articles, in two slices on disjoint article sets (12 each,
# about 42 questions per article): dev[0:500] for choosing defaults, dev[500:1000] for confirming them
SQUAD_DEV_SLICES = {"choose": (0, 500), "confirm": (500, 1000)}

RTE_LABELS = ["entailment", "not_entailment"]
CB_LABELS = ["entailment", "contradiction", "neutral"]


# -- file readers -------------------------------------------------------------------------------------------
def load_rows(builder: str, path: Path, **kwargs) -> list[dict]:
    """``datasets.load_dataset(builder, data_files=path)`` rows, without progress bars."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs).to_list()
    finally:
        if bars:
            datasets.enable_progress_bars()


def read_tsv(path: Path, column_names: list[str] | None = None) -> list[dict]:
    """Rows of a TSV file (no quoting, no NA parsing: text is kept as is)."""
    kwargs = {"column_names": column_names} if column_names else {}
    return load_rows("csv", path, delimiter="\t", quoting=csv.QUOTE_NONE, na_filter=False, **kwargs)


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file."""
    return load_rows("json", path)


def flatten_squad(data: dict) -> list[dict]:
    """Official SQuAD JSON (data -> paragraphs -> qas) to one row per question."""
    return [
        {
            "id": qa["id"], "title": article.get("title", ""), "context": para["context"],
            "question": qa["question"], "answers": [a["text"] for a in qa["answers"]],
        }
        for article in data["data"] for para in article["paragraphs"] for qa in para["qas"]
    ]


def _hub(path: str, config: str | None, split: str, dev_split: str = "validation") -> list[dict]:
    """A split from the hub; without a network one ConnectionError line (huggingface_hub's retry warnings kept
    quiet: the error says it all)."""
    import datasets
    from huggingface_hub.utils import logging as hub_logging

    hub_split = "train" if split == "train" else dev_split
    logger = hub_logging.get_logger("huggingface_hub")
    level = logger.level
    logger.setLevel(hub_logging.ERROR)
    try:
        return datasets.load_dataset(path, config, split=hub_split).to_list()
    except ConnectionError as err:
        raise ConnectionError(f"--data-source hub: cannot load {path}{'/' + config if config else ''} from the "
                              f"Hugging Face hub ({str(err).splitlines()[0]}): check the network, or use "
                              "--data-source local") from None
    finally:
        logger.setLevel(level)


def _check_split(split: str) -> None:
    if split not in ("train", "dev"):
        raise ValueError(f"unknown raw split {split!r}; expected 'train' (the training pool) or 'dev'")


def _loader(local: Callable[[str], list[dict]], hub: Callable[[str], list[dict]]) -> Callable[..., list[dict]]:
    """A ``load_split(split, source="local")`` with per-process caching; returns fresh row dicts."""
    cached = cache(lambda split, source: local(split) if source == "local" else hub(split))

    def load_split(split: str, source: str = "local") -> list[dict]:
        _check_split(split)
        check_source(source)
        return [dict(r) for r in cached(split, source)]

    load_split.cache_clear = cached.cache_clear  # e.g. after the hub's data changed
    return load_split


# -- per-task row mapping -----------------------------------------------------------------------------------
def _sst2_local(split: str) -> list[dict]:
    rows = read_tsv(DATA_DIR / "sst2" / ("train.tsv" if split == "train" else "dev.tsv"))
    return [{"sentence": r["sentence"], "label": int(r["label"])} for r in rows]


def _sst2_hub(split: str) -> list[dict]:
    return [{"sentence": r["sentence"], "label": int(r["label"])} for r in _hub("glue", "sst2", split)]


def _rte_local(split: str) -> list[dict]:
    d = DATA_DIR / "rte"
    if split == "train":
        cols = ["index", "sentence1", "sentence2", "label"]
        rows = read_tsv(d / "train.tsv") + read_tsv(d / "train_extra_noheader.tsv", column_names=cols)
    else:
        rows = read_tsv(d / "dev.tsv")
    return [
        {"idx": int(r["index"]), "premise": r["sentence1"], "hypothesis": r["sentence2"],
         "label": RTE_LABELS.index(r["label"])}
        for r in rows
    ]


def _rte_hub(split: str) -> list[dict]:
    return [
        {"idx": r["idx"], "premise": r["premise"], "hypothesis": r["hypothesis"], "label": int(r["label"])}
        for r in _hub("super_glue", "rte", split)
    ]


def _boolq_row(r: dict) -> dict:
    if "query" in r:  # llm-foundry format: "Passage: ...\nQuestion: ...?", choices ["no", "yes"], gold
        passage, question = r["query"].rsplit("\nQuestion: ", 1)
        return {"passage": passage.removeprefix("Passage: "), "question": question.removesuffix("?"),
                "label": int(r["gold"])}
    return {"passage": r["passage"], "question": r["question"], "label": int(r["label"])}


def _boolq_local(split: str) -> list[dict]:
    name = "train32.jsonl" if split == "train" else "dev1000.jsonl"
    return [_boolq_row(r) for r in read_jsonl(DATA_DIR / "boolq" / name)]


def _boolq_hub(split: str) -> list[dict]:
    return [_boolq_row(r) for r in _hub("super_glue", "boolq", split)]


def _copa_row(r: dict) -> dict:
    if "query" in r:  # llm-foundry format: "<premise without period>, therefore|because", choices, gold
        stem, conn = r["query"].rsplit(", ", 1)
        if conn not in ("therefore", "because"):
            raise ValueError(f"unexpected COPA query ending: {r['query']!r}")
        return {"premise": stem + ".", "choice1": r["choices"][0], "choice2": r["choices"][1],
                "question": "effect" if conn == "therefore" else "cause", "label": int(r["gold"])}
    return {k: r[k] for k in ("premise", "choice1", "choice2", "question")} | {"label": int(r["label"])}


def _copa_local(split: str) -> list[dict]:
    name = "train32.jsonl" if split == "train" else "dev.jsonl"
    return [_copa_row(r) for r in read_jsonl(DATA_DIR / "copa" / name)]


def _copa_hub(split: str) -> list[dict]:
    return [_copa_row(r) for r in _hub("super_glue", "copa", split)]


def _cb_local(split: str) -> list[dict]:
    # Only 32 labelled CB rows ship: they are both the training pool and the dev set (see PROVENANCE.md);
    # use split="validation" for rows held out from a train sample.
    return [
        {"premise": r["premise"], "hypothesis": r["hypothesis"], "label": CB_LABELS.index(r["label"])}
        for r in read_jsonl(DATA_DIR / "cb" / "train32.jsonl")
    ]


def _cb_hub(split: str) -> list[dict]:
    return [
        {"premise": r["premise"], "hypothesis": r["hypothesis"], "label": int(r["label"])}
        for r in _hub("super_glue", "cb", split)
    ]


def _squad_local(split: str) -> list[dict]:
    path = DATA_DIR / "squad" / ("train.json" if split == "train" else "dev.json")
    return flatten_squad(json.loads(path.read_text(encoding="utf-8")))


def _squad_hub(split: str) -> list[dict]:
    return [
        {"id": r["id"], "title": r["title"], "context": r["context"], "question": r["question"],
         "answers": list(r["answers"]["text"])}
        for r in _hub("squad", None, split)
    ]


# -- tasks with no local copy -------------------------------------------------------------------------------
# No copy of these data sets was at hand to check and ship with its source and licence (PROVENANCE.md), so none
# ships: their rows come from the hub as they are there (the templates read the hub's field names)
HUB_ONLY_TASKS = ("wsc", "wic", "multirc", "record", "drop", "trec")


def _no_local_copy(name: str) -> Callable[[str], list[dict]]:
    def local(split: str) -> list[dict]:
        raise ValueError(f"task {name!r} has no local data: no copy ships with the toolkit (none was at hand to ship "
                         "with its source and licence, see tasks/data/PROVENANCE.md); load it from the Hugging Face "
                         "hub with source='hub' (zo-tune / zo-eval --data-source hub)")

    return local


def _hub_rows(path: str, config: str | None, dev_split: str = "validation") -> Callable[[str], list[dict]]:
    return lambda split: _hub(path, config, split, dev_split)


def _record_hub(split: str) -> list[dict]:
    """ReCoRD rows whose gold answer is among their entities (a row that is not could not be scored)."""
    return [r for r in _hub("super_glue", "record", split) if r["answers"] and r["answers"][0] in r["entities"]]


def _drop_hub(split: str) -> list[dict]:
    return [r for r in _hub("ucinlp/drop", None, split) if r["answers_spans"]["spans"]]  # the seed asserts some


# -- templates ----------------------------------------------------------------------------------------------
def _copa_candidates(row: dict) -> list[str]:
    return [" " + c[:1].lower() + c[1:] for c in (row["choice1"].strip(), row["choice2"].strip())]


def _copa_prompt(row: dict) -> str:
    premise = row["premise"].strip()
    premise = premise[:-1] if premise.endswith((".", "!", "?")) else premise
    return f"{premise} {'because' if row['question'] == 'cause' else 'so'}"


def _record_prompt(row: dict) -> str:
    return row["passage"].replace("@highlight\n", "- ") + "\n-"


def _record_options(row: dict) -> tuple[list[str], int]:
    """The query with each entity in its placeholder, and the index of the first gold answer (the one the seed
    trains on). The other gold answers (aliases of it) are left out: the seed counts any of them correct."""
    gold = row["answers"][0]
    entities = [e for e in dict.fromkeys(row["entities"]) if e == gold or e not in row["answers"]]
    if gold not in entities:
        raise ValueError(f"task 'record': gold answer {gold!r} is not among the row's entities {entities[:5]}...")
    return [" " + row["query"].replace("@placeholder", e) for e in entities], entities.index(gold)


def _arith_local(split: str) -> list[dict]:
    return read_jsonl(DATA_DIR / "arith" / ("train.jsonl" if split == "train" else "dev.jsonl"))


BUILTIN_TASKS = [
    Task(
        name="sst2", kind="classification", metric="accuracy",
        template=lambda r: f"{r['sentence'].strip()} It was",
        label_words=[" terrible", " great"], load_split=_loader(_sst2_local, _sst2_hub),
    ),
    Task(
        name="rte", kind="classification", metric="accuracy",
        template=lambda r: f"{r['premise']}\nDoes this mean that \"{r['hypothesis']}\" is true? Yes or No?\n",
        label_words=["Yes", "No"], load_split=_loader(_rte_local, _rte_hub),
    ),
    Task(
        name="boolq", kind="classification", metric="accuracy",
        template=lambda r: f"{r['passage']} {r['question']}?",
        label_words=[" No", " Yes"], load_split=_loader(_boolq_local, _boolq_hub),
    ),
    Task(
        name="cb", kind="classification", metric="accuracy",
        template=lambda r: f"Suppose {r['premise']} Can we infer that \"{r['hypothesis']}\"? Yes, No, or Maybe?\n",
        label_words=["Yes", "No", "Maybe"], load_split=_loader(_cb_local, _cb_hub),
    ),
    Task(
        name="copa", kind="multiple_choice", metric="accuracy", template=_copa_prompt, label_words=None,
        load_split=_loader(_copa_local, _copa_hub), candidates=_copa_candidates,
    ),
    Task(
        name="squad", kind="generation", metric="squad_f1",
        template=lambda r: f"Title: {r['title']}\nContext: {r['context']}\nQuestion: {r['question']}\nAnswer:",
        label_words=None, load_split=_loader(_squad_local, _squad_hub), max_new_tokens=16,
    ),
    # The seed's other tasks, hub only (HUB_ONLY_TASKS): prompts and label words of MeZO's OPT experiments
    # (princeton-nlp/MeZO @ 6acfd0ba922bf2940ff5fddf1cdd704e1b6de8f7, large_models/templates.py: WSCTemplate,
    # WICTemplate, MultiRCTemplate, ReCoRDTemplateGPT3, DROPTemplate; hub data sets and splits from its tasks.py)
    Task(
        name="wsc", kind="classification", metric="accuracy",
        template=lambda r: f"{r['text']}\nIn the previous sentence, does the pronoun \"{r['span2_text'].lower()}\" "
        f"refer to {r['span1_text']}? Yes or No?\n",
        label_words=["No", "Yes"], load_split=_loader(_no_local_copy("wsc"), _hub_rows("super_glue", "wsc.fixed")),
    ),
    Task(
        name="wic", kind="classification", metric="accuracy",
        template=lambda r: f"Does the word \"{r['word']}\" have the same meaning in these two sentences? Yes, No?\n"
        f"{r['sentence1']}\n{r['sentence2']}\n",
        label_words=["No", "Yes"], load_split=_loader(_no_local_copy("wic"), _hub_rows("super_glue", "wic")),
    ),
    Task(
        name="multirc", kind="classification", metric="accuracy",
        template=lambda r: f"{r['paragraph']}\nQuestion: {r['question']}\nI found this answer \"{r['answer']}\". Is "
        "that correct? Yes or No?\n",
        label_words=["No", "Yes"], load_split=_loader(_no_local_copy("multirc"), _hub_rows("super_glue", "multirc")),
    ),
    # ReCoRD: the passage (its "@highlight" lines as "- " bullets), then each entity filled into the query is a
    # candidate bullet; the seed trains on the first gold answer and counts any gold answer correct
    Task(
        name="record", kind="multiple_choice", metric="accuracy", template=_record_prompt, label_words=None,
        load_split=_loader(_no_local_copy("record"), _record_hub),
        candidates=lambda r: _record_options(r)[0], get_label=lambda r: _record_options(r)[1],
    ),
    # DROP: generation scored by SQuAD's token F1 against each gold span (the seed's "f1"); its answers_spans.spans
    Task(
        name="drop", kind="generation", metric="squad_f1",
        template=lambda r: f"Passage: {r['passage']}\nQuestion: {r['question'].strip()}\nAnswer:",
        label_words=None, load_split=_loader(_no_local_copy("drop"), _drop_hub), max_new_tokens=16,
        get_answers=lambda r: list(r["answers_spans"]["spans"]),
    ),
    # TREC (coarse, 6 classes): the label words of MeZO's RoBERTa-large runs (medium_models/run_fewshot.sh, from
    # LM-BFF), in the hub's label order ABBR, ENTY, DESC, HUM, LOC, NUM (an abbreviation's answer is an
    # "Expression"). The seed's template "<mask>: <question>" puts the word first, which a masked LM fills; a
    # causal LM predicts it after the question. The hub has no validation split: dev is its 500-question test set
    # (the set LM-BFF and MeZO report on)
    Task(
        name="trec", kind="classification", metric="accuracy",
        template=lambda r: f"{r['text'].strip()}\nAnswer type:",
        label_words=[" Expression", " Entity", " Description", " Human", " Location", " Number"],
        load_split=_loader(_no_local_copy("trec"), _hub_rows("CogComp/trec", None, dev_split="test")),
        get_label=lambda r: int(r["coarse_label"]),
    ),
    # One-digit sums and differences with no gold completion: a checker scores the answer alone (answer_check,
    # reading the "answer" column); made by tasks/data/arith/make_arith.py, train and dev disjoint
    Task(
        name="arith", kind="generation", metric="exact_match", template=lambda r: f"Question: What is "
        f"{r['question']}?\nAnswer:", label_words=None, load_split=_arith_local, max_new_tokens=8,
        get_answers=lambda r: [], reward="answer_check",
    ),
]

for _task in BUILTIN_TASKS:
    register_task(_task, overwrite=True)
