"""Tasks from a user's CSV / TSV / JSONL file and a Python format-string template."""

from __future__ import annotations

import string
import warnings
from functools import cache
from pathlib import Path

from tasks.base import Task
from tasks.builtin import load_rows

# A prompt this long is a mistake (a padding width in the template, a file's whole text in one cell): no model's
# context holds it, and tokenizing millions of characters per example stalls the run
MAX_PROMPT_CHARS = 1_000_000
EXTENSIONS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json"}


def read_table(path: str | Path) -> list[dict]:
    """Rows of a CSV, TSV or JSON-lines file (by extension) via ``datasets``; a file that is empty, not UTF-8,
    without data rows or unparsable raises ValueError naming it."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in EXTENSIONS:
        raise ValueError(f"unsupported file extension {ext!r} for {path}; accepted: {', '.join(EXTENSIONS)}")
    if not path.is_file():
        raise FileNotFoundError(path)
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"{path} is empty: it needs {'a header line and ' if ext in ('.csv', '.tsv') else ''}"
                         "data rows")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:  # datasets would fail with a long traceback
        line = data[:err.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 text (byte {data[err.start]:#x} on line {line}): save it as UTF-8, "
                         f"e.g. iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}") from None
    kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
    import datasets  # here, as in tasks.builtin: importing it takes seconds

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # it logs parser errors as well as raising them
    try:
        rows = load_rows(EXTENSIONS[ext], path, **kwargs)
    except Exception as err:  # datasets wraps parser errors; the cause says what is wrong with the file
        cause = err.__cause__ or err
        if "corresponds to no data" in str(cause):
            rows = []
        else:
            raise ValueError(f"{path} cannot be read as {ext[1:].upper()}: "
                             f"{(str(cause).strip().splitlines() or [type(cause).__name__])[0]}") from None
    finally:
        datasets.logging.set_verbosity(level)
    if not rows:
        raise ValueError(f"{path} has no data rows{' (only a header line)' if ext in ('.csv', '.tsv') else ''}")
    return rows


def template_fields(template: str) -> list[str]:
    """Column names used by a format string, e.g. ``"{text} It was"`` -> ``["text"]``. A ValueError naming
    ``--template`` for a string Python cannot format, a template with no column, a positional field, an
    attribute or item access (``{text.upper}`` would put a method's address in every prompt) or an unknown
    conversion."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"--template {template!r} is not a valid format string: {err} (write {{{{ and }}}} for "
                         "literal braces)") from None
    names = []
    for _, field, _, conversion in parsed:
        if field is None:
            continue
        if not field.isidentifier():
            raise ValueError(f"--template {template!r} must use named fields like {{text}}, not {{{field}}} "
                             "(no positions, attributes or items)")
        if conversion not in (None, "r", "s", "a"):
            raise ValueError(f"--template {template!r}: unknown conversion !{conversion} in {{{field}}}; accepted: "
                             "!r, !s, !a")
        names.append(field)
    if not names:
        raise ValueError(f"--template {template!r} uses no column: name one in braces, e.g. '{{text}} It was'")
    return names


def _check_prompts(path: str | Path, rows: list[dict], template: str, fields: list[str]) -> None:
    """A ValueError naming the row whose prompt column is null (JSON null, an empty CSV cell), whose prompt is
    empty, or longer than MAX_PROMPT_CHARS."""
    for i, row in enumerate(rows, 1):
        missing = [f for f in fields if row[f] is None]
        if missing:
            raise ValueError(f"{path}, row {i}: column {missing[0]!r} is null or empty; every row needs a value in "
                             "each column the template uses")
        prompt = template.format(**row)
        size = len(prompt)
        if not prompt.strip():
            raise ValueError(f"{path}, row {i}: the prompt is empty (template {template!r}); every prompt needs text")
        if size > MAX_PROMPT_CHARS:
            raise ValueError(f"{path}, row {i}: the prompt is {size:,} characters (template {template!r}); "
                             f"accepted: up to {MAX_PROMPT_CHARS:,}")


def _check_columns(path: str | Path, rows: list[dict], needed: dict[str, str]) -> None:
    columns = list(rows[0]) if rows else []
    for column, role in needed.items():
        if column not in columns:
            raise ValueError(f"{path}: missing column {column!r} ({role}); columns present: {columns}")


def task_from_file(
    path: str | Path,
    *,
    name: str,
    template: str = "{prompt}",
    label_words: list[str] | None = None,
    labels: list | None = None,
    label_column: str = "label",
    answer_column: str | None = None,
    kind: str | None = None,
    metric: str | None = None,
    dev_path: str | Path | None = None,
    max_new_tokens: int = 16,
) -> Task:
    """A :class:`Task` whose training pool is ``path`` (CSV/TSV/JSONL) and dev set is ``dev_path``.

    ``template`` is a format string over the columns, e.g. ``"{text} It was"`` (default: the ``prompt`` column as
    it is, as ``zo-tune --data`` takes it). Classification (the default
    when ``label_words`` is given): int labels index ``label_words``; other labels (e.g. strings) are mapped
    through ``labels``, the label values in ``label_words`` order. Generation (the default when
    ``answer_column`` is given): the column holds a gold answer string or a list of them; ``kind="generation"``
    without it is a file of prompts for reward functions (no gold answers; every column reaches them). Without
    ``dev_path`` the dev split is the training file itself (with a warning).
    """
    kind = kind or ("generation" if answer_column else "classification")
    if kind not in ("classification", "generation"):
        raise ValueError(f"task_from_file supports kind 'classification' or 'generation', not {kind!r}")
    if kind == "classification" and not label_words:
        raise ValueError("classification tasks need label_words, e.g. [' terrible', ' great']")
    if labels is not None and label_words and len(labels) != len(label_words):
        raise ValueError(f"labels {labels} and label_words {label_words} must have the same length")
    metric = metric or ("squad_f1" if kind == "generation" else "accuracy")

    needed = {f: "used by the template" for f in template_fields(template)}
    if kind == "classification":
        needed[label_column] = "label_column"
    elif answer_column:
        needed[answer_column] = "answer_column"
    paths = {"train": Path(path), "dev": Path(dev_path) if dev_path else Path(path)}

    @cache
    def read(split: str) -> tuple[dict, ...]:
        rows = read_table(paths[split])
        _check_columns(paths[split], rows, needed)
        _check_prompts(paths[split], rows, template, template_fields(template))
        return tuple(rows)

    def load_split(split: str) -> list[dict]:
        if split not in paths:
            raise ValueError(f"unknown raw split {split!r}; expected 'train' or 'dev'")
        if split == "dev" and dev_path is None:
            warnings.warn(f"task {name!r} has no dev_path: the dev split is the training file", stacklevel=3)
        return [dict(r) for r in read(split)]

    def get_label(row: dict) -> int:
        value = row[label_column]
        if labels is not None:
            if value not in labels:
                raise ValueError(f"task {name!r}: label {value!r} not in labels {labels} (zo-tune: --labels)")
            return labels.index(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if not isinstance(value, int):
            raise ValueError(f"task {name!r}: label {value!r} is not an int; map the label values to ids in "
                             "label_words order with labels=[...] (on the command line: --labels VALUE ...)")
        return int(value)

    def get_answers(row: dict) -> list[str]:
        if answer_column is None:
            return []
        value = row[answer_column]
        return [str(a) for a in value] if isinstance(value, (list, tuple)) else [str(value)]

    for split in ("train", "dev") if dev_path is not None else ("train",):  # columns and labels checked now,
        rows = read(split)  # so that mistakes surface when the task is created, not at the first step
        if kind == "classification":
            for row in rows:
                get_label(row)
    return Task(
        name=name, kind=kind, metric=metric, template=lambda row: template.format(**row),
        label_words=list(label_words) if kind == "classification" else None, load_split=load_split,
        max_new_tokens=max_new_tokens, get_label=get_label if kind == "classification" else None,
        get_answers=get_answers if kind == "generation" else None,
    )
