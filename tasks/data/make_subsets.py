"""Rebuild the shipped data subsets from the source files (see PROVENANCE.md).

Usage: python tasks/data/make_subsets.py /work/shared/data
Rows are copied unchanged: text lines are copied byte-for-byte, SQuAD JSON is subset and re-serialised.
"""

import json
import random
import shutil
import sys
from pathlib import Path

SRC = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data")
DST = Path(__file__).resolve().parent
SQUAD_SLICE = 500  # questions in each of the SQuAD dev slices (choose: dev 0-499, confirm: dev 500-999)


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def write(path: Path, text_lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(text_lines), encoding="utf-8")


def seeded_rows(rows: list[str], k: int, seed: int = 0) -> list[str]:
    """k rows chosen with random.Random(seed).sample, kept in their original file order."""
    keep = sorted(random.Random(seed).sample(range(len(rows)), k))
    return [rows[i] for i in keep]


def copy(src: str, dst: str) -> None:
    (DST / dst).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SRC / src, DST / dst)


def squad_first(src: str, dst: str, n_questions: int) -> None:
    """Keep the first n questions in article/paragraph/question order, in the official nested format."""
    data = json.loads((SRC / src).read_text(encoding="utf-8"))
    left, articles = n_questions, []
    for article in data["data"]:
        paragraphs = []
        for para in article["paragraphs"]:
            if left == 0:
                break
            qas = para["qas"][:left]
            left -= len(qas)
            paragraphs.append({**para, "qas": qas})
        if paragraphs:
            articles.append({**article, "paragraphs": paragraphs})
        if left == 0:
            break
    write_squad(dst, articles, data["version"])


def write_squad(dst: str, articles: list[dict], version: str) -> None:
    (DST / dst).parent.mkdir(parents=True, exist_ok=True)
    (DST / dst).write_text(json.dumps({"data": articles, "version": version}), encoding="utf-8")


def squad_slices(src: str, dst: str, per_slice: int = SQUAD_SLICE, seed: int = 0) -> None:
    """SQuAD dev questions spread over the articles, in two slices on disjoint article sets.

    The articles are shuffled with random.Random(seed) and split in halves: the first half is the "choose"
    slice (dev 0 .. per_slice-1, for choosing defaults), the second the "confirm" slice (the next per_slice,
    for confirming them). Within a slice every article gives the same number of questions (per_slice split
    evenly, the remainder one each to the first articles in file order), a random.Random(seed) sample of its
    questions kept in paragraph/question order. Articles are written choose slice first, each slice in file
    order, in the official nested format.
    """
    data = json.loads((SRC / src).read_text(encoding="utf-8"))
    order = list(range(len(data["data"])))
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    rng = random.Random(seed)
    articles = []
    for members in (sorted(order[:half]), sorted(order[half:2 * half])):
        quota, extra = divmod(per_slice, len(members))
        for rank, i in enumerate(members):
            article = data["data"][i]
            qas = [(p, q) for p, para in enumerate(article["paragraphs"]) for q in range(len(para["qas"]))]
            keep = set(sorted(rng.sample(qas, quota + (rank < extra))))
            paragraphs = [{**para, "qas": [qa for q, qa in enumerate(para["qas"]) if (p, q) in keep]}
                          for p, para in enumerate(article["paragraphs"])]
            articles.append({**article, "paragraphs": [para for para in paragraphs if para["qas"]]})
    write_squad(dst, articles, data["version"])


def main() -> None:
    sst2 = lines(SRC / "sst2/alps_train.tsv")
    write(DST / "sst2/train.tsv", sst2[:1] + seeded_rows(sst2[1:], 6000))
    copy("sst2/alps_test.tsv", "sst2/dev.tsv")
    copy("sst2/LICENSE.alps-repo.txt", "sst2/LICENSE.alps-repo.txt")

    copy("rte/glue_rte_train.tsv", "rte/train.tsv")
    copy("rte/glue_rte_val.tsv", "rte/train_extra_noheader.tsv")
    copy("rte/glue_rte_dev.tsv", "rte/dev.tsv")

    copy("fewglue/BoolQ_train32.jsonl", "boolq/train32.jsonl")
    write(DST / "boolq/dev1000.jsonl", seeded_rows(lines(SRC / "boolq/llmfoundry_boolq_val.jsonl"), 1000))

    copy("fewglue/COPA_train32.jsonl", "copa/train32.jsonl")
    copy("copa/llmfoundry_copa_val.jsonl", "copa/dev.jsonl")

    copy("fewglue/CB_train32.jsonl", "cb/train32.jsonl")

    squad_first("squad/squad_v1.1_train_subset_du.json", "squad/train.json", 2000)
    squad_slices("squad/squad_v1.1_dev_part1.json", "squad/dev.json")
    copy("squad/LICENSE.bloomsburyai-repo.txt", "squad/LICENSE.bloomsburyai-repo.txt")
    copy("squad/LICENSE.expmrc-CC-BY-SA-4.0.txt", "squad/LICENSE.expmrc-CC-BY-SA-4.0.txt")


if __name__ == "__main__":
    main()
