"""Built-in tasks (sst2, rte, boolq, copa, cb, squad) with MeZO's OPT prompts.

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


def _hub(path: str, config: str | None, split: str) -> list[dict]:
    import datasets

    hub_split = "train" if split == "train" else "validation"
    return datasets.load_dataset(path, config, split=hub_split).to_list()


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


# -- templates ----------------------------------------------------------------------------------------------
def _copa_candidates(row: dict) -> list[str]:
    return [" " + c[:1].lower() + c[1:] for c in (row["choice1"].strip(), row["choice2"].strip())]


def _copa_prompt(row: dict) -> str:
    premise = row["premise"].strip()
    premise = premise[:-1] if premise.endswith((".", "!", "?")) else premise
    return f"{premise} {'because' if row['question'] == 'cause' else 'so'}"


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
]

for _task in BUILTIN_TASKS:
    register_task(_task, overwrite=True)
